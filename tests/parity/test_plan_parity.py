"""Planning parity: nnU-Net v1.6.4's ExperimentPlanner3D_v21 and our plan_task / plan_3d on the same data.

Real path (v1's cropping, DatasetAnalyzer, plan_experiment on the raw task) for four small
datasets, and v1's planner on fingerprints without images (Task03's numbers, large volumes
that make the memory-proxy loop shrink the patch, many small cases that hit the batch-size
cap, and random ones). Every plan value that shapes the network must be identical.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from unetpp_lib import convert, plan
from unetpp_lib.prep.synthetic import make_msd_task

from .datasets import fingerprint_like, task03_like, write_raw_task

# (spacing (z, y, x) mm, shape) per case
ISOTROPIC = [((0.8, 0.8, 0.8), (40, 48, 48)), ((0.75, 0.78, 0.78), (44, 50, 50)), ((0.9, 0.85, 0.85), (36, 44, 44)),
             ((0.8, 0.8, 0.8), (38, 46, 46)), ((0.7, 0.82, 0.82), (46, 47, 47))]
SLICES_5MM = [((5.0, 0.75, 0.75), (8, 64, 64)), ((5.0, 0.7, 0.7), (9, 68, 68)), ((2.5, 0.8, 0.8), (16, 60, 60)),
              ((5.0, 0.78, 0.78), (8, 62, 62)), ((4.0, 0.75, 0.75), (10, 64, 64))]
# slice count and thickness vary independently (Task03: 0.7-5 mm, 74-987 slices): median(spacing x shape)
# differs from median(spacing) x median(shape)
HETEROGENEOUS = [((0.8, 0.7, 0.7), (70, 48, 48)), ((1.0, 0.75, 0.75), (30, 46, 46)), ((1.25, 0.8, 0.8), (50, 44, 44)),
                 ((2.5, 0.72, 0.72), (24, 48, 48)), ((5.0, 0.85, 0.85), (6, 40, 40)), ((0.7, 0.78, 0.78), (40, 45, 45)),
                 ((3.0, 0.7, 0.7), (20, 50, 50))]
NETWORK_KEYS = ("target_spacing", "median_shape", "transpose_forward", "patch_size", "num_pool_per_axis",
                "pool_op_kernel_sizes", "conv_kernel_sizes", "batch_size", "do_dummy_2D_data_aug")


def v1_as_ours(v1: dict) -> dict:
    """v1's 3d_fullres stage under our plans.json keys."""
    return {"target_spacing": [float(s) for s in v1["current_spacing"]],
            "median_shape": [int(n) for n in v1["median_patient_size_in_voxels"]],
            "transpose_forward": [int(i) for i in v1["transpose_forward"]],
            "patch_size": [int(n) for n in v1["patch_size"]],
            "num_pool_per_axis": [int(n) for n in v1["num_pool_per_axis"]],
            "pool_op_kernel_sizes": [[int(k) for k in p] for p in v1["pool_op_kernel_sizes"]],
            "conv_kernel_sizes": [[int(k) for k in c] for c in v1["conv_kernel_sizes"]],
            "batch_size": int(v1["batch_size"]), "do_dummy_2D_data_aug": bool(v1["do_dummy_2D_data_aug"])}


def differences(ours: dict, v1: dict) -> list[str]:
    """Plan values that differ (spacings to 1e-9 relative, everything else exactly)."""
    ref = v1_as_ours(v1)
    out = []
    for k in NETWORK_KEYS:
        same = (np.allclose(ours[k], ref[k], rtol=1e-9, atol=0) if k == "target_spacing" else ours[k] == ref[k])
        if not same:
            out.append(f"{k}: ours {ours[k]} v1 {ref[k]}")
    return out


def old_median_shape(fp: dict, plans: dict) -> list[int]:
    """The rule we had before (median spacing x median shape / target), to show the dataset tells them apart."""
    order = plans["transpose_forward"]
    sp = np.array([c["spacing"] for c in fp["cases"].values()])[:, order]
    sh = np.array([c["shape"] for c in fp["cases"].values()])[:, order]
    return np.round(np.median(sp, 0) / plans["target_spacing"] * np.median(sh, 0)).astype(int).tolist()


def random_fingerprints(n: int, seed: int = 11) -> dict:
    """Random datasets: isotropic or thick-sliced, small or large, few or many cases, in-plane x != y."""
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(n):
        cases = int(rng.choice([5, 9, 40, 300]))
        z = rng.uniform(*[(0.6, 1.5), (2.0, 6.0), (0.7, 5.0)][i % 3], cases)
        y = rng.uniform(0.5, 1.2, cases)
        x = y * rng.choice([1.0, rng.uniform(0.8, 1.3)])
        big = rng.uniform(30, 600)
        shp = np.stack([np.round(rng.uniform(0.5, 1.0, cases) * big / z), np.round(rng.uniform(40, 520, cases)),
                        np.round(rng.uniform(40, 520, cases))], 1).clip(4)
        out[f"random_{i}"] = fingerprint_like(np.stack([z, y, x], 1), shp)
    return out


def fingerprints() -> dict:
    """Named fingerprints for v1's planner alone."""
    n = 9
    fps = {
        "task03": task03_like(),
        # 5 mm slices, 512^2: anisotropy rule, pooling in-plane first, the patch shrunk to fit the proxy
        "large_5mm": fingerprint_like([[5.0, 0.7, 0.7]] * 6 + [[2.5, 0.78, 0.78]] * 3, [[80, 512, 512]] * 6 + [[160, 512, 512]] * 3),
        # in-plane spacings differ (x coarser than y): v1 compares the slice axis with the finest other axis
        "inplane_differs": fingerprint_like([[3.5, 1.0, 1.2]] * 7 + [[1.5, 1.0, 1.2], [2.0, 1.0, 1.2]], [[40, 300, 250]] * n),
        # 400 small cases: the proxy allows a large batch, the 5 % of the dataset cap decides
        "many_small": fingerprint_like([[1.0, 0.8, 0.8]] * 400, [[40, 60, 60]] * 400),
        # ~100^3: the proxy alone gives a batch above 2
        "mid_batch": fingerprint_like([[1.0, 1.0, 1.0]] * 200, [[100, 110, 96]] * 200),
    }
    return {**fps, **random_fingerprints(24)}


@pytest.fixture(scope="module")
def raw_tasks(tmp_path_factory) -> dict:
    """The four raw datasets (the demo through our converter), in v1's raw layout."""
    root = tmp_path_factory.mktemp("plan_parity")
    msd = make_msd_task(root / "msd", num_training=5, num_test=0, shape=(48, 96, 96), seed=0, quirks=True)
    convert.convert_task(msd, root / "demo")  # params/demo.yaml's synthetic settings, fewer cases
    return {"demo": root / "demo", "isotropic": write_raw_task(root / "iso", ISOTROPIC, seed=1),
            "slices_5mm": write_raw_task(root / "aniso", SLICES_5MM, seed=2),
            "heterogeneous": write_raw_task(root / "hetero", HETEROGENEOUS, seed=3, zero_border=2)}


def test_plans_equal_v1(run_ref, raw_tasks, tmp_path):
    fps = fingerprints()
    (tmp_path / "fps.json").write_text(json.dumps(fps))
    ref = run_ref("ref_plan.py", raw={k: str(v) for k, v in raw_tasks.items()}, fingerprints=tmp_path / "fps.json")
    bad = {}
    for name, raw in raw_tasks.items():  # the real path: raw images -> fingerprint -> plans
        fp, plans, _ = plan.plan_task(raw, tmp_path / name)
        v1 = ref[name]
        bad[name] = differences(plans, v1)
        for case, c in v1["cases"].items():  # v1's crop box and the sizes/spacings its planner saw
            ours = fp["cases"][case]
            if ours["crop_box"] != c["crop_bbox"] or ours["shape"] != c["size_after_cropping"] \
                    or not np.allclose(ours["spacing"], c["original_spacing"], rtol=1e-12):
                bad[name].append(f"{case}: crop {ours['crop_box']} {ours['shape']} v1 {c['crop_bbox']} {c['size_after_cropping']}")
        st, ip = fp["foreground_intensity"], v1["intensity"]
        print(name, {k: plans[k] for k in ("target_spacing", "median_shape", "patch_size", "batch_size")},
              "intensity max rel diff %.1e" % max(abs(st[o] / ip[r] - 1) for o, r in
                                                  (("mean", "mean"), ("std", "sd"), ("percentile_00_5", "percentile_00_5"),
                                                   ("percentile_99_5", "percentile_99_5"))))
        for ours_key, v1_key in (("mean", "mean"), ("std", "sd"), ("percentile_00_5", "percentile_00_5"),
                                 ("percentile_99_5", "percentile_99_5")):
            if not np.isclose(st[ours_key], ip[v1_key], rtol=1e-5, atol=1e-4):  # v1 sums in float32
                bad[name].append(f"intensity {ours_key}: ours {st[ours_key]} v1 {ip[v1_key]}")
    for name, fp in fps.items():
        ours = plan.plan_3d(fp)
        bad[name] = differences(ours, ref[name])
        print(name, {k: ours[k] for k in ("target_spacing", "median_shape", "patch_size", "batch_size", "num_pool_per_axis")})
    assert not any(bad.values()), {k: v for k, v in bad.items() if v}

    # each dataset shows what it was built for
    iso, aniso, het = ref["isotropic"], ref["slices_5mm"], ref["heterogeneous"]
    assert max(iso["current_spacing"]) / min(iso["current_spacing"]) < 1.2
    assert aniso["current_spacing"][0] == pytest.approx(np.percentile([5, 5, 2.5, 5, 4], 10), abs=1e-3)
    assert aniso["pool_op_kernel_sizes"][0] == [1, 2, 2] and aniso["conv_kernel_sizes"][0] == [1, 3, 3]
    fp_het = json.loads((tmp_path / "heterogeneous" / "fingerprint.json").read_text())
    plans_het = json.loads((tmp_path / "heterogeneous" / "plans.json").read_text())
    assert old_median_shape(fp_het, plans_het) != v1_as_ours(het)["median_shape"]  # the old rule fails here
    assert any(c["crop_bbox"] != [[0, n] for n in c["size_after_cropping"]] for c in het["cases"].values())
    # Task03's plan from v1 and from us: 128^3, 5 poolings of 2, batch 2
    for p in (v1_as_ours(ref["task03"]), plan.plan_3d(fps["task03"])):
        assert p["patch_size"] == [128, 128, 128] and p["batch_size"] == 2
        assert p["pool_op_kernel_sizes"] == [[2, 2, 2]] * 5 and p["conv_kernel_sizes"] == [[3, 3, 3]] * 6
    assert old_median_shape(fps["task03"], plan.plan_3d(fps["task03"])) != plan.plan_3d(fps["task03"])["median_shape"]
    # the memory proxy shrank the patch below the median shape, and the batch rules were both exercised
    large = v1_as_ours(ref["large_5mm"])
    assert any(p < m for p, m in zip(large["patch_size"], large["median_shape"]))
    assert ref["many_small"]["batch_size"] > 2 and ref["mid_batch"]["batch_size"] > 2
    assert ref["inplane_differs"]["current_spacing"][0] < 3.5  # anisotropy rule against the finest axis


def test_splits_equal_v1_do_split(run_ref):
    """Our folds are v1's own nnUNetTrainerV2.do_split (KFold 5, shuffled with 12345, ids sorted as strings)."""
    datasets = {"task03": [f"liver_{i}" for i in range(131)], "five": [f"case_{i}" for i in range(5)],
                "string_order": [f"case_{i}" for i in range(23)], "odd": [f"p{i:03d}x" for i in range(48)]}
    ref = run_ref("ref_splits.py", datasets=datasets)
    for name, ids in datasets.items():
        assert plan.make_splits(ids) == ref[name], name
