import json

import pytest

import numpy as np
from scipy import ndimage

from unetpp_lib.core import io
from unetpp_lib.prep import anatomy
from unetpp_lib.prep.synthetic import make_msd_task, make_sized_task

from conftest import TINY

MSD_KEYS = {"name", "description", "reference", "licence", "release", "tensorImageSize", "modality",
            "labels", "numTraining", "numTest", "training", "test"}


def load_case(task, case):
    img, g = io.read_image(task / "imagesTr" / f"{case}.nii.gz")
    lab, gl = io.read_image(task / "labelsTr" / f"{case}.nii.gz")
    return img.astype(np.float32), np.rint(lab).astype(np.uint8), g, gl


def test_msd_layout_and_dataset_json(synth_task):
    ds = json.loads((synth_task / "dataset.json").read_text())
    assert set(ds) == MSD_KEYS
    assert ds["modality"] == {"0": "CT"}
    assert ds["labels"] == {"0": "background", "1": "liver", "2": "cancer"}
    assert ds["numTraining"] == len(ds["training"]) == TINY["num_training"]
    assert ds["numTest"] == len(ds["test"]) == TINY["num_test"]
    ids = []
    for e in ds["training"]:
        name = e["image"].split("/")[-1]
        assert e["image"] == f"./imagesTr/{name}" and e["label"] == f"./labelsTr/{name}"
        assert (synth_task / e["image"]).is_file() and (synth_task / e["label"]).is_file()
        ids.append(int(name[len("liver_"):-len(".nii.gz")]))
    assert all((synth_task / t).is_file() for t in ds["test"])
    assert not (synth_task / "labelsTr" / ds["test"][0].split("/")[-1]).exists()
    assert 4 not in ids and ids[:4] == [0, 1, 2, 3]  # quirks: gaps in the ids, no zero padding
    assert (synth_task / "imagesTr" / "._liver_0.nii.gz").read_bytes()[:4] == b"\x00\x05\x16\x07"


def test_deterministic_for_a_seed(synth_task, tmp_path):
    again = make_msd_task(tmp_path / "again", **TINY)
    other = make_msd_task(tmp_path / "other", **{**TINY, "seed": TINY["seed"] + 1})
    a, _, ga, _ = load_case(synth_task, "liver_1")
    b, _, gb, _ = load_case(again, "liver_1")
    c, _, gc, _ = load_case(other, "liver_1")
    assert ga == gb and np.array_equal(a, b)
    assert ga != gc or not np.array_equal(a, c)


PHASE_LIVER_HU = {"non-contrast": (45, 80), "arterial": (58, 98), "portal-venous": (85, 140)}


def test_volumes_look_like_abdominal_ct(synth_task):
    ds = json.loads((synth_task / "dataset.json").read_text())
    described = {c["case"]: c for c in json.loads((synth_task / "synthetic_cases.json").read_text())}
    directions, tumour_cases = set(), 0
    for e in ds["training"]:
        case = e["image"].split("/")[-1][:-7]
        img, lab, g, gl = load_case(synth_task, case)
        assert g == gl  # image and label share one geometry
        assert 0.6 <= g.spacing[1] == g.spacing[2] <= 0.9 and 0.7 <= g.spacing[0] <= 5.0
        assert described[case]["shape"] == list(g.shape)
        assert set(np.unique(lab)) <= {0, 1, 2} and (lab == 1).sum() > 100
        assert np.percentile(img, 1) < -900  # air around the body
        assert img.max() > 150  # bone (thin and blurred in these miniature patients; life-size below)
        lo, hi = PHASE_LIVER_HU[described[case]["phase"]]
        assert lo < np.median(img[lab == 1]) < hi  # parenchyma in its phase (vessels and lesions aside)
        if (lab == 2).sum() >= 30:
            tumour_cases += 1
            grown = ndimage.binary_dilation(lab == 2)
            assert (lab[grown & (lab != 2)] == 1).mean() > 0.25  # inside the liver (large ones reach its capsule)
        plane = np.zeros((3, 3, 3), bool)
        plane[1] = True  # in-plane only: thick-slice cases have few slices
        inner = ndimage.binary_erosion(lab == 1, plane, iterations=2)
        smooth = ndimage.median_filter(img.astype(np.float32), footprint=np.ones((1, 5, 5), bool))
        noise = (img - smooth)[inner]  # high-pass: the noise, not the anatomy (vessels have edges: a robust sd)
        robust_sd = 1.4826 * np.median(np.abs(noise - np.median(noise)))
        expected = described[case]["noise_hu"]  # 10-20 HU at 0.75 x 0.75 x 5 mm, scaled to this voxel's volume
        assert 10 * np.sqrt(0.75 * 0.75 * 5 / np.prod(g.spacing)) - 0.01 <= expected
        assert expected <= 20 * np.sqrt(0.75 * 0.75 * 5 / np.prod(g.spacing)) + 0.01
        assert 0.6 * expected < robust_sd < 1.1 * expected  # the median filter takes a little of it
        directions.add(tuple(np.round(g.direction, 3)))
    assert tumour_cases >= 1
    assert len(directions) >= 3
    assert any(-1 in d for d in directions)  # stored with flipped axes
    assert any(v not in (0, 1, -1) for d in directions for v in d)  # an oblique (tilted) case


def life_size_case(seed: int, shape=(90, 80, 80), spacing=(5.0, 5.0, 5.0)):
    """One scan of a life-size patient (400 mm field of view) at coarse voxels, identity direction; with its frame."""
    from unetpp_lib.prep import shapes

    geom = io.Geometry(shape, spacing, (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))
    img, lab, info = anatomy.draw_case(geom, np.random.default_rng([seed, 1]))
    z0, z1 = info["body_z_mm"]
    return img, lab, info, shapes.body_frame(geom, info["scale"], (z0 + z1) / 2)


def ball_mean(img, frame, centre, radius=12.0):
    """Mean HU within `radius` body mm of a body-frame point."""
    d = sum((c - m) ** 2 for c, m in zip((frame.x, frame.y, frame.z), centre))
    ball = np.broadcast_to(d < radius ** 2, img.shape)
    return float(img[ball].mean()) if ball.sum() >= 5 else None


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_long_scans_hold_the_organs_around_the_liver_at_their_attenuation(seed):
    from unetpp_lib.prep import tissues

    img, lab, info, f = life_size_case(seed)
    z = np.broadcast_to(f.z, img.shape)[:, 0, 0]  # body Z of each slice (identity direction)
    liver_slices = np.flatnonzero((lab > 0).any(axis=(1, 2)))
    assert len(liver_slices) < 0.8 * img.shape[0]  # the scan is longer than the liver
    above, below = z > z[liver_slices].max() + 10, z < z[liver_slices].min() - 10
    assert above.any() and below.any()
    body = img > -500
    assert all(body[i].sum() > 500 for i in np.flatnonzero(above | below))  # tissue above and below the liver
    assert not lab[above | below].any()
    hu = tissues.case_hu(tissues.PHASES.index(info["phase"]), np.random.default_rng(0))  # the table, for ranges
    checks = {"lung": ((110, 30, 120), (-900, -780)), "spine": ((0, 68, -60), (150, 300)),
              "aorta": ((18, 40, -60), (20, 380)), "bladder": ((0, -25, -400), (-15, 30)),
              "spleen": ((105, 48, -62), (30, 160)), "kidney": ((74, 58, -140), (20, 220))}
    seen = 0
    for name, (point, (lo, hi)) in checks.items():
        m = ball_mean(img, f, point)
        if m is not None and z.min() + 20 < point[2] < z.max() - 20:
            seen += 1
            assert lo < m < hi, (name, m, info["phase"])
    assert seen >= 4 and hu["fat"] < -80


def test_contrast_phases_enhance_as_published():
    from unetpp_lib.prep import tissues

    hu = [tissues.case_hu(p, np.random.default_rng(3)) for p in range(3)]
    nc, art, pv = hu
    assert art["aorta"] > 200 > pv["aorta"] > 100 > nc["aorta"]  # the bolus: arterial peak, portal-venous plateau
    assert pv["liver"] > art["liver"] > nc["liver"] and 90 < pv["liver"] < 135
    assert pv["portal_vein"] > art["portal_vein"] > nc["portal_vein"]
    assert art["kidney_cortex"] - art["kidney_medulla"] > 60  # corticomedullary phase
    assert all(abs(h["fat"] + 100) < 6 and h["lung"] < -800 for h in hu)
    hcc = tissues.LESIONS["hepatocellular carcinoma"][1]
    assert hcc[1] > 0 > hcc[2]  # arterial hyperenhancement, portal-venous washout


def test_every_labelled_lesion_is_visible_in_its_phase(synth_task):
    """A lesion's contrast keeps its kind's sign in that phase and is never under VISIBLE_HU (a reader's mask holds
    only what the reader saw); the cases record it."""
    from unetpp_lib.prep import tissues

    rng = np.random.default_rng(5)
    for kind, (_, deltas, _, _) in tissues.LESIONS.items():
        for phase, table in enumerate(deltas):
            c = np.array([tissues.lesion_contrast(kind, phase, rng) for _ in range(300)])
            assert (np.sign(c) == np.sign(table)).all() and np.abs(c).min() >= tissues.VISIBLE_HU, (kind, phase)
            if abs(table) * 0.7 > tissues.VISIBLE_HU:  # a conspicuous kind keeps its spread around the table value
                assert abs(np.median(c) - table) < 0.1 * abs(table) and c.std() > 0.1 * abs(table), (kind, phase)
    drawn = [les for row in json.loads((synth_task / "synthetic_cases.json").read_text()) for les in row["lesions"]]
    assert drawn and all(abs(les["contrast_hu"]) >= tissues.VISIBLE_HU for les in drawn)


def test_lesion_counts_and_sizes_are_spread_as_in_lits():
    from unetpp_lib.prep import tissues

    rng = np.random.default_rng(11)
    counts = np.array([tissues.lesion_count(rng) for _ in range(2000)])
    assert 0.08 < (counts == 0).mean() < 0.16 and counts.max() >= 10 and np.median(counts[counts > 0]) <= 2
    index = np.array([tissues.lesion_diameter(rng, True) for _ in range(2000)])
    others = np.array([tissues.lesion_diameter(rng, False) for _ in range(2000)])
    assert np.median(others) < 15 < np.median(index) and (index > 60).mean() > 0.05  # many small, a few large
    assert others.min() >= 5 and index.max() <= 110


def test_holdout_scans_are_longer_and_of_another_seed(tmp_path):
    from unetpp_lib.prep import synthetic

    train = make_msd_task(tmp_path / "t", **{**TINY, "num_training": 4, "num_test": 0, "quirks": False})
    held = synthetic.make_holdout(tmp_path / "h", 4, 1.6, TINY["shape"], TINY["seed"], (0.6, 0.9), (0.7, 5.0))
    length = lambda task: np.mean([c["length_mm"] for c in json.loads((task / "synthetic_cases.json").read_text())])  # noqa: E731
    assert length(held) > 1.2 * length(train)
    a, _, _, _ = load_case(train, "liver_0")
    b, _, _, _ = load_case(held, "liver_0")
    assert a.shape != b.shape or not np.array_equal(a, b)
    rows = synthetic.case_table(held)
    assert [r["case"] for r in rows] == [f"liver_{i}" for i in range(4)] and {"phase", "lesions"} <= set(rows[0])


def test_quirks_mix_dtypes_and_float_labels(synth_task):
    img_types, lab_types = set(), set()
    for f in sorted((synth_task / "imagesTr").glob("liver_*.nii.gz")):
        img_types.add(io.read_image(f)[0].dtype.name)
        lab_types.add(io.read_image(synth_task / "labelsTr" / f.name)[0].dtype.name)
    assert {"int16", "float32", "float64"} <= img_types
    assert "uint8" in lab_types and lab_types & {"float32", "float64"}


def test_settings_change_regenerates(tmp_path):
    task = make_msd_task(tmp_path / "t", **{**TINY, "num_training": 2, "num_test": 0})
    assert json.loads((task / "dataset.json").read_text())["numTraining"] == 2
    task = make_msd_task(tmp_path / "t", **{**TINY, "num_training": 3, "num_test": 0, "quirks": False})
    assert sorted(p.name for p in (task / "imagesTr").iterdir()) == [f"liver_{i}.nii.gz" for i in range(3)]


def test_interrupted_generation_is_not_resumed_with_other_settings(tmp_path, monkeypatch):
    from unetpp_lib.prep import synthetic

    real = synthetic.map_cases

    def killed_after_one(fn, items, *args, **kwargs):
        fn(items[0])
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "map_cases", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        make_msd_task(tmp_path / "t", **{**TINY, "num_training": 2, "num_test": 0, "shape": (16, 60, 60)})
    big = io.read_image(tmp_path / "t" / "imagesTr" / "liver_0.nii.gz")[1].shape
    monkeypatch.setattr(synthetic, "map_cases", real)
    task = make_msd_task(tmp_path / "t", **{**TINY, "num_training": 2, "num_test": 0, "shape": (12, 30, 30)})
    small = io.read_image(task / "imagesTr" / "liver_0.nii.gz")[1].shape
    assert small[1] < big[1] / 1.5  # regenerated with the new field of view, not kept from the killed run


def test_sized_task_has_exactly_the_asked_geometry(tmp_path):
    cases = [((20, 40, 36), (1.0, 0.77, 0.77)), ((4, 40, 36), (5.0, 0.77, 0.77))]
    task = make_sized_task(tmp_path / "t", cases, seed=2)
    ds = json.loads((task / "dataset.json").read_text())
    assert ds["numTraining"] == 2 and ds["numTest"] == 0
    for i, (shape, spacing) in enumerate(cases):
        img, lab, g, gl = load_case(task, f"liver_{i}")
        assert g == gl and g.shape == shape and np.allclose(g.spacing, spacing)
        assert io.read_image(task / "imagesTr" / f"liver_{i}.nii.gz")[0].dtype == np.int16
        assert (lab == 1).sum() > 50 and np.percentile(img, 1) < -900


@pytest.mark.parametrize("kind", ["flip_xy", "flip_z", "oblique", "identity"])
def test_compact_coordinates_and_separable_field_equal_the_direct_formula(kind):
    from unetpp_lib.prep import synthetic

    rng = np.random.default_rng(5)
    d = synthetic.direction_matrix(kind, rng)
    geom = io.Geometry((7, 9, 11), (2.5, 0.8, 0.7), (0.0, 0.0, 0.0), tuple(d.ravel()))
    u = anatomy.patient_coords(geom)
    idx = np.stack(np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * s for n, s in zip(geom.shape, geom.spacing)],
                               indexing="ij"))[::-1]  # x, y, z offsets in mm, each (z, y, x)
    direct = np.einsum("rk,kzyx->rzyx", d, idx)
    assert all(np.allclose(np.broadcast_to(c, geom.shape), direct[r], atol=1e-4) for r, c in enumerate(u))
    field = anatomy.smooth_field(u, np.random.default_rng(9))
    rng, expected = np.random.default_rng(9), np.zeros(geom.shape)
    for _ in range(4):
        w = rng.normal(size=3) * rng.uniform(1.5, 4.0)
        expected += np.sin(w[0] * direct[0] + w[1] * direct[1] + w[2] * direct[2] + rng.uniform(0, 2 * np.pi))
    assert field.dtype == np.float32 and field.shape == geom.shape
    assert np.abs(field - expected / 4).max() < 1e-5
