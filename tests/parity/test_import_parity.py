"""A fold of the v1 UNet++ fork, imported, predicts as v1 predicts it.

The reference (ref/ref_import.py) plans a small anisotropic dataset with v1's ExperimentPlanner3D_v21
(base 8, coarse x axis, so transpose_forward is [2, 0, 1]), saves the fork's network (perturbed weights, an SGD
step) with v1's own NetworkTrainer/nnUNetTrainer.save_checkpoint, and predicts a raw CT image as predict_cases
does (restore from the .pkl, preprocess_patient, predict_3D: mirroring, sliding window, step 0.5, Gaussian).
Here the folder goes through `python -m unetpp_lib.import_v1`; the kit fold's plans.json must carry v1's
values, and the kit's preprocessing and sliding window with that fold give v1's input and softmax.
"""
from __future__ import annotations

import numpy as np
import torch

from unetpp_lib import import_v1
from unetpp_lib.nn.infer import load_model, sliding_window
from unetpp_lib.core.io import Geometry, read_image, read_json, write_image
from unetpp_lib.core.layout import FoldLayout
from unetpp_lib.prep.transforms import preprocess_arrays

SPACING = (1.0, 1.0, 3.0)  # (z, y, x) mm: x is the coarse axis, first after v1's transpose
CASES = [[list(SPACING), [32, 32, 8]], [list(SPACING), [30, 34, 9]], [list(SPACING), [34, 32, 8]]]  # patch 8x32x32
INTENSITY = {"median": 95.0, "mean": 99.4, "sd": 39.4, "mn": -50.0, "mx": 300.0,
             "percentile_00_5": -17.0, "percentile_99_5": 201.0}


def _image(path) -> None:
    """A CT at the plan's spacing (no resampling on either side): two tiles along z, padded to the patch along
    y and along the coarse x, whose last two slices are zero and cropped away on both sides."""
    rng = np.random.default_rng(0)
    img = rng.normal(90, 70, (44, 30, 9)).astype(np.int16)
    img[:, :, -2:] = 0
    write_image(path, img, Geometry(img.shape, SPACING, (0.0, 0.0, 0.0), tuple(float(v) for v in np.eye(3).ravel())))


def test_imported_fork_fold_predicts_as_v1(run_ref, tmp_path, capsys):
    image = tmp_path / "case_0000.nii.gz"
    _image(image)
    ref = run_ref("ref_import.py", cases=CASES, intensity=INTENSITY, base=8, seed=3, epochs=5, image=image)

    kit = tmp_path / "kit_fold"
    assert import_v1.main([ref["fold"], str(kit)]) == 0
    assert "nnUNetPlusPlusTrainerV2" in capsys.readouterr().out
    plans, stage = read_json(FoldLayout(kit).plans), ref["plans"]
    assert plans["patch_size"] == stage["patch_size"]
    assert plans["target_spacing"] == stage["current_spacing"] == [3.0, 1.0, 1.0]
    assert plans["transpose_forward"] == ref["transpose_forward"] == [2, 0, 1]
    assert plans["pool_op_kernel_sizes"] == stage["pool_op_kernel_sizes"]
    assert plans["conv_kernel_sizes"] == stage["conv_kernel_sizes"]
    assert plans["num_pool_per_axis"] == stage["num_pool_per_axis"]
    assert plans["batch_size"] == stage["batch_size"]
    assert plans["num_classes"] == ref["num_classes"] == 3  # v1's plans count 2: no background
    assert plans["base_num_features"] == 8
    assert plans["normalization"] == {"scheme": "CT", "clip": [-17.0, 201.0], "mean": 99.4, "std": 39.4}
    meta = read_json(FoldLayout(kit).sidecar("final"))
    assert meta["epoch"] == 5 and meta["imported_from"]["trainer"] == "nnUNetPlusPlusTrainerV2"

    net, plans = load_model(kit, "final", "cpu")  # what predict and 05_validate load
    img, geom = read_image(image)
    x, _, _ = preprocess_arrays(img, None, geom.spacing, plans)
    v1_x = ref.array("data")[0]
    assert x.shape == v1_x.shape == (7, 44, 30)
    assert np.abs(x - v1_x).max() < 1e-5
    probs = sliding_window(net, torch.from_numpy(v1_x)[None], plans["patch_size"], plans["num_classes"], 0.5,
                           tuple(ref["mirror_axes"]), tile_batch=2).numpy()
    v1 = ref.array("softmax")
    worst = float(np.abs(probs - v1).max())
    print(f"imported fork fold: max |prob - v1| {worst:.1e}")
    assert worst < 1e-4  # as test_infer_parity
    assert np.array_equal(probs.argmax(0), ref.array("seg"))
    assert probs.max(0).mean() > 0.45  # far from uniform: the weights matter
