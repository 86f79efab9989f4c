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


def test_volumes_look_like_abdominal_ct(synth_task):
    ds = json.loads((synth_task / "dataset.json").read_text())
    directions, tumour_cases = set(), 0
    for e in ds["training"]:
        case = e["image"].split("/")[-1][:-7]
        img, lab, g, gl = load_case(synth_task, case)
        assert g == gl  # image and label share one geometry
        assert 0.6 <= g.spacing[1] == g.spacing[2] <= 0.9 and 0.7 <= g.spacing[0] <= 5.0
        assert set(np.unique(lab)) <= {0, 1, 2} and (lab == 1).sum() > 100
        assert np.percentile(img, 1) < -900  # air around the body
        assert img.max() > 400  # bone
        liver = img[lab == 1].mean()
        assert 60 < liver < 160  # contrast-enhanced liver parenchyma, HU
        if (lab == 2).sum() >= 30:  # smaller ones are mostly partial-volume edge
            tumour_cases += 1
            core = ndimage.binary_erosion(lab == 2, iterations=1)  # away from the partial-volume rim
            if core.sum() >= 10:
                assert 5 < liver - img[core].mean() < 45  # hypodense: 10-40 HU below the liver
            grown = ndimage.binary_dilation(lab == 2)
            assert (lab[grown & (lab != 2)] == 1).mean() > 0.25  # inside the liver (large ones reach its capsule)
        plane = np.zeros((3, 3, 3), bool)
        plane[1] = True  # in-plane only: thick-slice cases have few slices
        inner = ndimage.binary_erosion(lab == 1, plane, iterations=2)
        smooth = ndimage.uniform_filter(img.astype(np.float32), (1, 5, 5))
        noise = (img - smooth)[inner]  # high-pass: the noise, not the anatomy
        assert 8 < noise.std() < 22  # CT quantum noise of 10-20 HU
        directions.add(tuple(np.round(g.direction, 3)))
    assert tumour_cases >= 1
    assert len(directions) >= 3
    assert any(-1 in d for d in directions)  # stored with flipped axes
    assert any(v not in (0, 1, -1) for d in directions for v in d)  # an oblique (tilted) case


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
