"""Preprocessing parity: nnU-Net v1.6.4's GenericPreprocessor (v2.1 plans) and our store on the same cases.

v1 runs its real path (crop, analyse, plan, run_preprocessing); we run plan_task and
preprocess_task on the same raw folder. Per case: crop box and resampled shape equal, labels
equal voxel for voxel, the image equal within float16 quantisation (our store keeps float16),
class locations of the same number per class (v1's rule), each on a voxel of its class.
Cases: isotropic ones resampled cubic in 3D, and anisotropic ones (3-5 mm slices, or a thick
target spacing) resampled in-plane per slice and nearest along z; some with a zero border.
"""
from __future__ import annotations

import json
import time

import numpy as np
import pytest

from scipy import ndimage

from unetpp_lib import plan, preprocess
from unetpp_lib.core import io
from unetpp_lib.prep import store
from unetpp_lib.prep.resample import resample_image, resample_label

from .datasets import write_raw_task

# (spacing (z, y, x) mm, shape): target ~(1.25, 0.75, 0.75); the 5 mm and 2.5 mm cases are anisotropic
MIXED = [((0.8, 0.7, 0.7), (40, 40, 40)), ((1.0, 0.75, 0.75), (30, 38, 38)), ((5.0, 0.8, 0.8), (6, 36, 36)),
         ((2.5, 0.72, 0.72), (14, 40, 40)), ((1.25, 0.8, 0.8), (24, 36, 36))]
# thick slices everywhere: the target itself is anisotropic (z at its 10th percentile), z upsampled nearest
THICK = [((5.0, 0.75, 0.75), (8, 40, 40)), ((5.0, 0.7, 0.7), (8, 42, 42)), ((2.5, 0.8, 0.8), (16, 38, 38)),
         ((4.0, 0.75, 0.75), (10, 40, 40)), ((5.0, 0.78, 0.78), (8, 40, 40))]

# resampling alone, (shape, spacing, target): cubic 3D up/down; a thick axis in the source, in the
# target, or last; two equally coarse axes (v1 then does not resample any axis apart)
RESAMPLE = [((20, 23, 25), (1.0, 1.0, 1.0), (0.7, 1.3, 0.9)),
            ((9, 30, 28), (3.5, 0.8, 1.0), (1.0, 0.8, 0.8)),
            ((24, 20, 22), (1.0, 1.0, 1.0), (4.0, 0.9, 1.1)),
            ((26, 24, 7), (0.8, 0.8, 4.0), (0.8, 0.7, 2.0)),
            ((8, 9, 30), (5.0, 5.0, 1.0), (2.0, 2.0, 1.0))]


def resample_inputs(root, seed: int = 0) -> list[dict]:
    """Smooth images with sharp class edges (spline overshoot) and 3-class labels, as .npy files."""
    rng = np.random.default_rng(seed)
    jobs = []
    for i, (shape, spacing, target) in enumerate(RESAMPLE):
        field = ndimage.gaussian_filter(rng.normal(size=shape), 2)
        lab = np.digitize(field, np.quantile(field, [0.5, 0.85])).astype(np.uint8)
        img = (100 * field / field.std() + 60 * lab).astype(np.float32)
        np.save(root / f"rs{i}_image.npy", img)
        np.save(root / f"rs{i}_label.npy", lab)
        jobs.append({"image": str(root / f"rs{i}_image.npy"), "label": str(root / f"rs{i}_label.npy"),
                     "spacing": list(spacing), "target": list(target)})
    return jobs


def f16_ulp(x: np.ndarray) -> np.ndarray:
    """One float16 step at each value (storage quantisation is at most half of it)."""
    return np.spacing(np.abs(x).astype(np.float16)).astype(np.float64)


def location_count(n: int) -> int:
    """v1's number of sampled voxels for a class of n voxels."""
    return max(min(10_000, n), int(np.ceil(n * 0.01)))


@pytest.fixture(scope="module")
def raw_tasks(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("pre_parity")
    return {"mixed": write_raw_task(root / "mixed", MIXED, seed=5, zero_border=2),
            "thick": write_raw_task(root / "thick", THICK, seed=6)}


def test_preprocessed_cases_equal_v1(run_ref, raw_tasks, tmp_path):
    jobs = resample_inputs(tmp_path)
    (tmp_path / "resample.json").write_text(json.dumps(jobs))
    ref = run_ref("ref_preprocess.py", raw={k: str(v) for k, v in raw_tasks.items()}, resample=tmp_path / "resample.json")
    for i, job in enumerate(jobs):  # resampling alone: equal to float32 rounding, labels voxel for voxel
        img, lab = np.load(job["image"]), np.load(job["label"])
        shape = preprocess.new_shape(img.shape, job["spacing"], job["target"])
        ours_img = resample_image(img, shape, job["spacing"], job["target"], 3)
        ours_lab = resample_label(lab, shape, job["spacing"], job["target"], 1)
        v1_img, v1_lab = ref.array(f"rs{i}_image"), ref.array(f"rs{i}_label")
        assert ours_img.shape == v1_img.shape, (i, ours_img.shape, v1_img.shape)
        worst, differing = float(np.abs(ours_img - v1_img).max()), int((ours_lab != v1_lab).sum())
        scale = float(np.abs(v1_img).max())
        print(f"resample {RESAMPLE[i]}: image max abs diff {worst:.2e} (range {scale:.0f}), "
              f"label voxels differing {differing}")
        assert worst < 1e-5 * scale and differing == 0, (i, worst, differing)
    rows, t_ours = [], 0.0
    for name, raw in raw_tasks.items():
        pre = tmp_path / name
        plan.plan_task(raw, pre)
        t0 = time.perf_counter()
        preprocess.preprocess_task(raw, pre)
        t_ours += time.perf_counter() - t0
        plans = json.loads((pre / "plans.json").read_text())
        assert np.allclose(plans["target_spacing"], ref[name]["current_spacing"], rtol=1e-9)
        for case, v1 in ref[name]["cases"].items():
            props = json.loads((pre / "3d_fullres" / f"{case}.json").read_text())
            g = store.open_case(pre / "3d_fullres" / f"{case}.zarr")
            img, lab = g["image"][...].astype(np.float64), g["label"][...]
            v1_img = ref.array(f"{name}__{case}__image").astype(np.float64)
            # v1 marks zero voxels outside the nonzero mask -1; its loader turns them into background
            v1_lab = np.maximum(ref.array(f"{name}__{case}__label"), 0).astype(np.uint8)
            assert props["crop_box"] == v1["crop_bbox"], case
            assert props["shape_after_resampling"] == v1["size_after_resampling"] == list(img.shape), case
            diff = np.abs(img - v1_img)
            raw_img, geom = io.read_image(raw / "imagesTr" / f"{case}_0000.nii.gz")
            f32 = preprocess.preprocess_arrays(raw_img, None, geom.spacing, plans)[0]  # before float16 storage
            rows.append({"case": f"{name}/{case}", "label_voxels_differing": int((lab != v1_lab).sum()),
                         "image_max_abs_f32": float(np.abs(f32 - v1_img).max()), "image_max_abs": float(diff.max()),
                         "image_excess_over_half_ulp": float((diff - f16_ulp(v1_img) / 2).max()),
                         "aniso": max(v1["original_spacing"]) / min(v1["original_spacing"]) > 3})
            ours_locs = store.class_locations(g)
            for cls in v1["classes"]:
                v1_locs = ref.array(f"{name}__{case}__locs{cls}")
                n = int((v1_lab == cls).sum())
                assert len(v1_locs) == location_count(n), (case, cls)
                assert len(ours_locs.get(cls, [])) == len(v1_locs), (case, cls)  # same rule, same class size
                if len(v1_locs):
                    assert (lab[tuple(ours_locs[cls].T)] == cls).all() and (v1_lab[tuple(v1_locs.T)] == cls).all()
    print(f"\npreprocessing wall time: v1 {sum(ref[n]['preprocess_seconds'] for n in ref):.2f} s, ours {t_ours:.2f} s")
    print("\n".join(str(r) for r in rows))
    assert any(r["aniso"] for r in rows) and any(not r["aniso"] for r in rows)
    assert all(r["label_voxels_differing"] == 0 for r in rows), rows
    # the same resampling up to float32 rounding (v1 computes in float64) ...
    assert all(r["image_max_abs_f32"] < 2e-5 for r in rows), rows
    # ... so the store is v1's image rounded to float16: half a float16 step, plus that rounding
    assert all(r["image_excess_over_half_ulp"] < 2e-5 for r in rows), rows


def test_location_counts_are_v1s(run_ref, tmp_path):
    """Per class v1 keeps 10,000 locations, all when fewer, 1 % when that is more (_run_internal); v1's own
    _run_internal on the same label maps gives the counts, ours must match and lie on their class."""
    lab = np.zeros((110, 110, 110), np.uint8)
    lab[:, :, :100] = 1  # 1.21 M voxels: 1 % = 12,100 > 10,000
    lab[:20, :20, 100:] = 2  # 4,000 voxels: all of them
    lab[50:80, 50:80, 100:] = 3  # 9,000 voxels: all of them
    lab[90:, :, 100:] = 4  # 22,000 voxels: capped at 10,000
    small = np.zeros((20, 30, 40), np.uint8)
    small[2:5, 3:9, 4:30] = 2  # 468 voxels; classes 1, 3 and 4 absent
    labels = {"large": lab, "small": small}
    for name, arr in labels.items():
        np.save(tmp_path / f"{name}.npy", arr)
    ref = run_ref("ref_locations.py", labels=[str(tmp_path / f"{n}.npy") for n in labels], classes=[1, 2, 3, 4])
    for k, (name, arr) in enumerate(labels.items()):
        locs = store.sample_locations(arr, seed=0)
        for cls in (1, 2, 3, 4):
            theirs = ref.array(f"loc_{k}_{cls}")
            ours = locs.get(cls, np.zeros((0, 3), int))
            assert len(ours) == ref["counts"][k][str(cls)] == len(theirs), (name, cls)
            assert len(np.unique(np.ravel_multi_index(ours.T, arr.shape))) == len(ours)  # drawn without replacement
            assert (arr[tuple(ours.T)] == cls).all() and (arr[tuple(theirs.T)] == cls).all()
    assert ref["counts"][0] == {"1": 12_100, "2": 4_000, "3": 9_000, "4": 10_000}
