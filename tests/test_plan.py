import json

import numpy as np
import pytest

from unetpp_lib import convert, plan
from unetpp_lib.core import io
from unetpp_lib.prep import transforms

SEED_FOLD0 = [3, 5, 11, 12, 17, 19, 24, 25, 27, 38, 40, 41, 42, 44, 51, 52, 58, 64, 70, 75, 77,
              82, 101, 112, 115, 120, 128]


def fingerprint(spacings, shapes, stats=None):
    stats = stats or {"mean": 100.0, "std": 40.0, "percentile_00_5": -20.0, "percentile_99_5": 200.0}
    return {"modality": {"0": "CT"}, "labels": {"0": "background", "1": "liver", "2": "cancer"},
            "foreground_intensity": stats,
            "cases": {f"liver_{i}": {"spacing": list(sp), "shape": list(sh)}
                      for i, (sp, sh) in enumerate(zip(spacings, shapes))}}


def test_task03_plan_matches_the_original():
    fp = fingerprint([[1.0, 0.768, 0.768]] * 131, [[482, 512, 512]] * 131)
    p = plan.plan_3d(fp)
    assert p["target_spacing"] == [1.0, 0.768, 0.768]
    assert p["patch_size"] == [128, 128, 128] and p["batch_size"] == 2
    assert p["num_pool_per_axis"] == [5, 5, 5] and p["pool_op_kernel_sizes"] == [[2, 2, 2]] * 5
    assert p["conv_kernel_sizes"] == [[3, 3, 3]] * 6
    assert p["memory"]["units_per_sample"] == 454_893_568  # nnU-Net v1's proxy for this network
    assert p["normalization"] == {"scheme": "CT", "clip": [-20.0, 200.0], "mean": 100.0, "std": 40.0}


def test_unetpp_planner_sizes_for_the_device():
    fp = fingerprint([[1.0, 0.768, 0.768]] * 131, [[482, 512, 512]] * 131)
    small, v100 = plan.plan_3d(fp, "unetpp", 8.0), plan.plan_3d(fp, "unetpp", 32.0)
    assert np.prod(small["patch_size"]) < 128 ** 3  # UNet++ at 128^3 x 2 does not fit 8 GB
    assert small["batch_size"] >= 2 and small["memory"]["estimated_gb_per_sample"] * 2 <= 8.0
    assert v100["memory"]["estimated_gb_per_sample"] * v100["batch_size"] <= 32.0
    assert np.prod(v100["patch_size"]) >= 128 ** 3
    unet = plan.activation_units([128] * 3, [[2, 2, 2]] * 5, 32, 320, 1, 3, "unet")
    unetpp = plan.activation_units([128] * 3, [[2, 2, 2]] * 5, 32, 320, 1, 3, "unetpp")
    assert 2.5 < unetpp / unet < 4  # the seed's 8-10 GB per sample vs nnU-Net's ~3


def test_anisotropic_rule_on_5mm_slices():
    z = [5.0] * 6 + [4.0, 3.0, 2.5, 5.0]
    fp = fingerprint([[s, 0.8, 0.8] for s in z], [[60, 512, 512]] * 10)
    p = plan.plan_3d(fp)
    assert p["target_spacing"][0] == pytest.approx(np.percentile(z, 10))  # not the median 5.0
    assert p["target_spacing"][1:] == [0.8, 0.8]
    assert p["pool_op_kernel_sizes"][0] == [1, 2, 2] and p["conv_kernel_sizes"][0] == [1, 3, 3]
    assert p["patch_size"][0] < p["patch_size"][1]
    # a coarse axis that is not much shorter keeps the median
    iso_fp = fingerprint([[s, 0.8, 0.8] for s in z], [[400, 512, 512]] * 10)
    assert plan.plan_3d(iso_fp)["target_spacing"][0] == 5.0


def test_transpose_puts_the_coarsest_axis_first():
    fp = fingerprint([[0.8, 0.8, 3.0]] * 4, [[200, 200, 100]] * 4)
    p = plan.plan_3d(fp)
    assert p["transpose_forward"] == [2, 0, 1] and p["target_spacing"] == [3.0, 0.8, 0.8]


def test_splits_match_the_seed_fold0():
    splits = plan.make_splits([f"liver_{i}" for i in range(131)])
    assert len(splits) == 5
    assert sorted(int(c.split("_")[1]) for c in splits[0]["val"]) == SEED_FOLD0
    allval = [c for s in splits for c in s["val"]]
    assert len(allval) == len(set(allval)) == 131
    assert all(not set(s["train"]) & set(s["val"]) for s in splits)
    assert len(plan.make_splits(["a", "b", "c"])) == 3
    assert plan.make_splits(["a"]) == [{"train": ["a"], "val": ["a"]}]


def test_overrides_are_recorded_and_checked():
    fp = fingerprint([[1.0, 0.768, 0.768]] * 131, [[482, 512, 512]] * 131)
    p = plan.apply_overrides(plan.plan_3d(fp), {"batch_size": 8, "patch_size": [96, 160, 160]})
    assert p["batch_size"] == 8 and p["patch_size"] == [96, 160, 160]
    assert p["overrides"]["batch_size"] == {"planned": 2, "used": 8}
    assert p["num_pool_per_axis"] == [4, 5, 5]
    with pytest.raises(ValueError, match="not divisible.*use \\[96, 160, 160\\]"):
        plan.apply_overrides(plan.plan_3d(fp), {"patch_size": [90, 150, 150]})
    with pytest.raises(ValueError, match="unknown key.*'lr'"):
        plan.apply_overrides(plan.plan_3d(fp), {"lr": 0.1})


def test_fingerprint_statistics_equal_numpy(synth_task, tmp_path):
    raw = tmp_path / "raw"
    convert.convert_task(synth_task, raw)
    fp = plan.compute_fingerprint(raw, num_workers=2)
    values, expected_cases = [], {}
    ds = json.loads((raw / "dataset.json").read_text())
    for e in ds["training"]:
        case = e["image"].split("/")[-1][:-7]
        img, g = io.read_image(raw / "imagesTr" / f"{case}_0000.nii.gz")
        lab, _ = io.read_image(raw / "labelsTr" / f"{case}.nii.gz")
        values.append(img[lab > 0][::10].astype(np.float64))
        expected_cases[case] = (list(g.spacing), list(img.shape))
    v = np.concatenate(values)
    st = fp["foreground_intensity"]
    assert st["num_samples"] == v.size
    for key, ref in (("mean", v.mean()), ("std", v.std()), ("min", v.min()), ("max", v.max()),
                     ("median", np.median(v)), ("percentile_00_5", np.percentile(v, 0.5)),
                     ("percentile_99_5", np.percentile(v, 99.5))):
        assert st[key] == pytest.approx(ref, rel=1e-6), key
    for case, (sp, shape) in expected_cases.items():
        assert fp["cases"][case]["spacing"] == sp and fp["cases"][case]["shape"] == shape


def test_nonzero_bbox_crops_padding():
    img = np.zeros((6, 7, 8), np.int16)
    img[1:4, 2:6, 3:5] = -1000
    assert transforms.nonzero_bbox(img) == [[1, 4], [2, 6], [3, 5]]
    assert transforms.nonzero_bbox(np.zeros((2, 3, 4))) == [[0, 2], [0, 3], [0, 4]]


def test_plan_task_writes_json_and_user_splits_win(synth_task, tmp_path):
    raw, pre = tmp_path / "raw", tmp_path / "pre"
    convert.convert_task(synth_task, raw)
    fp, plans, splits = plan.plan_task(raw, pre, planner="nnunet_v1", overrides={"batch_size": 3})
    for name in ("fingerprint.json", "plans.json", "splits.json"):
        assert json.loads((pre / name).read_text())  # readable JSON, no pickle
    assert json.loads((pre / "plans.json").read_text())["batch_size"] == 3
    mine = [{"train": ["liver_0", "liver_1", "liver_2"], "val": ["liver_3", "liver_5"]}]
    (tmp_path / "mine.json").write_text(json.dumps(mine))
    _, _, splits = plan.plan_task(raw, pre, splits_file=str(tmp_path / "mine.json"))
    assert splits == mine == json.loads((pre / "splits.json").read_text())
    (tmp_path / "bad.json").write_text(json.dumps([{"train": ["liver_0"], "val": ["liver_404"]}]))
    with pytest.raises(ValueError, match="liver_404"):
        plan.plan_task(raw, pre, splits_file=str(tmp_path / "bad.json"))


def test_plan_needs_a_converted_dataset(tmp_path):
    with pytest.raises(FileNotFoundError, match="run 01_convert first"):
        plan.plan_task(tmp_path / "raw", tmp_path / "pre")
