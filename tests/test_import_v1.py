"""`python -m unetpp_lib.import_v1`: the v1 plans mapping, the import and the command's errors.

The v1-format folds here are written in the kit's venv (numpy 2 names in the pickles); the parity suite
(tests/parity/test_import_parity.py) imports one written by nnU-Net v1 itself (numpy 1 names) and compares
predictions.
"""
from __future__ import annotations

import os
import pickle
import shutil
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from unetpp_lib import import_v1, predict
from unetpp_lib.nn import autotune
from unetpp_lib.import_v1 import kit_plans
from unetpp_lib.nn.fork_names import kit_to_fork
from unetpp_lib.nn.v1_pickle import ImportV1Error
from unetpp_lib.nn.infer import load_model
from unetpp_lib.core.io import Geometry, read_image, read_json, write_image
from unetpp_lib.core.layout import FoldLayout
from unetpp_lib.nn.model import UNetPlusPlus, config_from_plans

TRAINER = "nnUNetPlusPlusTrainerV2"


class Payload:
    """Unpickling this runs `os.system`: a file appears if the unpickler lets it through."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def stage(patch=(8, 16, 16)) -> dict:
    """One stage of v1 plans, with the planner's types (arrays, numpy integers and bool)."""
    return {"batch_size": 2, "num_pool_per_axis": [1, 2, 2], "patch_size": np.array(patch),
            "median_patient_size_in_voxels": np.array([9, 20, 20]), "current_spacing": np.array([3.0, 1.0, 1.0]),
            "original_spacing": np.array([3.0, 1.0, 1.0]), "do_dummy_2D_data_aug": np.bool_(False),
            "pool_op_kernel_sizes": [[1, 2, 2], [2, 2, 2]], "conv_kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3]]}


def v1_plans(stages: int = 1) -> dict:
    """v1 plans as ExperimentPlanner3D_v21 writes them (the values an import reads, with v1's types)."""
    intensity = OrderedDict((k, np.float64(v)) for k, v in
                            [("median", 95.0), ("mean", 99.4), ("sd", 39.4), ("mn", -50.0), ("mx", 300.0),
                             ("percentile_99_5", 201.0), ("percentile_00_5", -17.0)])
    lowres = {**stage((8, 8, 8)), "current_spacing": np.array([6.0, 2.0, 2.0])}
    return {"num_stages": stages, "num_modalities": 1, "modalities": {0: "CT"},
            "normalization_schemes": OrderedDict([(0, "CT")]),
            "dataset_properties": {"intensityproperties": OrderedDict([(0, intensity)]), "all_classes": [1, 2],
                                   "all_spacings": [np.array([1.0, 1.0, 3.0])], "all_sizes": [(20, 20, 9)]},
            "num_classes": 2, "all_classes": [1, 2], "base_num_features": 4,
            "use_mask_for_norm": OrderedDict([(0, False)]), "keep_only_largest_region": None,
            "transpose_forward": [np.int64(2), 0, 1], "transpose_backward": [np.int64(1), np.int64(2), np.int64(0)],
            "plans_per_stage": {0: lowres, 1: stage()} if stages == 2 else {0: stage()},
            "preprocessor_name": "GenericPreprocessor", "conv_per_stage": 2,
            "data_identifier": "nnUNetData_plans_v2.1"}


def fork_state(plans: dict, stage_key: int, seed: int = 0) -> tuple[OrderedDict, dict]:
    """Random weights of the kit's network for these plans: under the fork's names, and under the kit's."""
    cfg = config_from_plans(kit_plans(plans, stage_key, "test"))
    torch.manual_seed(seed)
    net = UNetPlusPlus(cfg)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return OrderedDict(kit_to_fork(net.state_dict(), cfg)), net.state_dict()


def write_fork_fold(folder: Path, plans: dict | None = None, stage_key: int | None = 0, name: str = TRAINER,
                    state: dict | None = None) -> Path:
    """A fork fold folder as v1's trainer leaves it: <ckpt>.model (torch.save), <ckpt>.model.pkl, ../plans.pkl."""
    plans = plans or v1_plans()
    fold = folder / f"{name}__nnUNetPlansv2.1" / "fold_0"
    fold.mkdir(parents=True)
    if state is None:
        state = fork_state(plans, stage_key if stage_key is not None else 0)[0]
    epochs = 3
    torch.save({"epoch": epochs, "state_dict": state, "optimizer_state_dict": None, "lr_scheduler_state_dict": None,
                "plot_stuff": ([np.float64(1.0)] * epochs, [np.float64(0.9)] * epochs, [], [np.float64(0.5)] * epochs),
                "amp_grad_scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                                    "growth_interval": 2000, "_growth_tracker": 0}},
               fold / "model_final_checkpoint.model")
    info = OrderedDict([("init", ("/data/plans_3D.pkl", 0, str(fold.parent), "/data", True, stage_key, True, True, True)),
                        ("name", name), ("class", f"<class 'nnunet.training.network_training.{name}.{name}'>"),
                        ("plans", plans)])
    (fold / "model_final_checkpoint.model.pkl").write_bytes(pickle.dumps(info))
    (fold.parent / "plans.pkl").write_bytes(pickle.dumps(plans))
    return fold


def run_cli(*args) -> tuple[int, str]:
    """The command's exit status and its stderr (in-process)."""
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = import_v1.main([str(a) for a in args])
    return rc, err.getvalue()


# ----------------------------------------------------------------------------- plans and import
def test_kit_plans_take_v1s_stage_values():
    plans = kit_plans(v1_plans(), 0, "p")
    assert plans["patch_size"] == [8, 16, 16] and plans["target_spacing"] == [3.0, 1.0, 1.0]
    assert plans["transpose_forward"] == [2, 0, 1] and plans["num_classes"] == 3 and plans["num_input_channels"] == 1
    assert plans["pool_op_kernel_sizes"] == [[1, 2, 2], [2, 2, 2]] and plans["base_num_features"] == 4
    assert plans["normalization"] == {"scheme": "CT", "clip": [-17.0, 201.0], "mean": 99.4, "std": 39.4}
    assert plans["do_dummy_2D_data_aug"] is False and len(plans["preprocessing_hash"]) == 16
    assert import_v1.select_stage(v1_plans(2), 1, "p") == (1, "3d_fullres")
    assert import_v1.select_stage(v1_plans(2), 0, "p") == (0, "3d_lowres")
    with pytest.raises(ImportV1Error, match="named no stage and the plans have 2"):
        import_v1.select_stage(v1_plans(2), None, "p")


def test_imported_fold_predicts_with_the_forks_weights(tmp_path, monkeypatch):
    # fp32 without autotune's probe (speed only, ~10 s here; tested in test_autotune)
    monkeypatch.setattr(autotune, "choose", lambda kind, plans, batch, device, *a, **k:
                        autotune.Choice("fp32", False, kind, str(device), cached=True))
    plans = v1_plans(2)
    fork, kit_state = fork_state(plans, 1, seed=1)
    v1 = write_fork_fold(tmp_path / "v1", plans, stage_key=1, state=OrderedDict(("module." + k, v) for k, v in fork.items()))
    kit = tmp_path / "kit"
    rc, err = run_cli(v1, kit)
    assert rc == 0, err
    fold = FoldLayout(kit)
    meta = read_json(fold.sidecar("final"))
    assert meta["epoch"] == 3 and meta["imported_from"]["stage"] == 1
    assert meta["imported_from"]["trainer"] == TRAINER and meta["imported_from"]["path"] == str(v1.resolve())
    assert predict.check_fold(kit, "final")["patch_size"] == [8, 16, 16]  # stage 1, not the lowres stage 0
    net, _ = load_model(kit, "final", "cpu")
    for k, v in net.state_dict().items():
        assert torch.equal(v, kit_state[k]), k

    rng = np.random.default_rng(0)  # a CT at the plan's spacing: crop, transpose, predict, export
    img = rng.normal(90, 70, (20, 20, 9)).astype(np.int16)
    images = tmp_path / "images"
    write_image(images / "ct_0000.nii.gz", img, Geometry(img.shape, (1.0, 1.0, 3.0), (0.0, 0.0, 0.0),
                                                         tuple(float(v) for v in np.eye(3).ravel())))
    assert predict.main(["-i", str(images), "-o", str(tmp_path / "out"), "-m", str(kit), "--device", "cpu",
                         "--disable-mirroring"]) == 0
    seg, geom = read_image(tmp_path / "out" / "ct.nii.gz")
    assert seg.shape == img.shape and geom.spacing == (1.0, 1.0, 3.0) and set(np.unique(seg)) <= {0, 1, 2}

    rc, err = run_cli(v1, kit)  # a second import must not overwrite silently
    assert rc == 2 and "--overwrite" in err
    assert run_cli(v1, kit, "--overwrite")[0] == 0


def _break(tmp_path: Path, how: str) -> tuple[Path, str]:
    """A fork fold folder damaged one way, and the words the error must contain."""
    if how == "no folder":
        return tmp_path / "nowhere", "folder not found"
    if how == "2d":
        plans = v1_plans()
        plans["plans_per_stage"][0]["patch_size"] = np.array([16, 16])
        return write_fork_fold(tmp_path, plans, state={}), "2D model"
    if how == "cascade":
        return write_fork_fold(tmp_path, name="nnUNetTrainerV2CascadeFullRes"), "cascade"
    if how == "mri":
        plans = v1_plans()
        plans["normalization_schemes"] = OrderedDict([(0, "nonCT")])
        return write_fork_fold(tmp_path, plans, state={}), "'CT' scheme only"
    if how == "plain unet":
        state = OrderedDict({"conv_blocks_localization.0.0.blocks.0.conv.weight": torch.zeros(1)})
        return write_fork_fold(tmp_path, state=state), "plain U-Net"
    if how == "other width":
        wider = {**v1_plans(), "base_num_features": 8}
        return write_fork_fold(tmp_path, wider, state=fork_state(v1_plans(), 0)[0]), "do not fit"
    fold = write_fork_fold(tmp_path)
    if how == "no pkl":
        (fold / "model_final_checkpoint.model.pkl").unlink()
        return fold, "model_final_checkpoint.model.pkl: missing"
    if how == "no checkpoint":
        shutil.move(fold / "model_final_checkpoint.model", fold / "model_best.model")
        return fold, "--checkpoint model_best"
    if how == "corrupt checkpoint":
        (fold / "model_final_checkpoint.model").write_bytes(b"PK\x03\x04 not a zip")
        return fold, "unreadable checkpoint"
    if how == "corrupt pkl":
        (fold / "model_final_checkpoint.model.pkl").write_bytes(b"\x80\x04garbage")
        return fold, "not a readable pickle"
    if how == "hostile pkl":
        (fold / "model_final_checkpoint.model.pkl").write_bytes(pickle.dumps(Payload(tmp_path / "ran")))
        return fold, "refused"
    raise ValueError(how)


@pytest.mark.parametrize("how", ["no folder", "no pkl", "no checkpoint", "corrupt checkpoint", "corrupt pkl",
                                 "hostile pkl", "2d", "cascade", "mri", "plain unet", "other width"])
def test_cli_errors_name_the_file_and_the_fix(how, tmp_path):
    src, words = _break(tmp_path / "v1", how)
    rc, err = run_cli(src, tmp_path / "kit")
    assert rc == 2, err
    assert err.startswith("error: ") and words in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "kit").exists()  # nothing written before every check passed
    assert not (tmp_path / "v1" / "ran").exists()


def v1_plans_of(kit: dict) -> dict:
    """v1 plans (one stage) holding a kit plans.json's values: what v1 would have planned for that run."""
    plans = v1_plans()
    n = kit["normalization"]
    plans["dataset_properties"]["intensityproperties"][0].update(
        mean=np.float64(n["mean"]), sd=np.float64(n["std"]), percentile_00_5=np.float64(n["clip"][0]),
        percentile_99_5=np.float64(n["clip"][1]))
    order = np.array(kit["transpose_forward"])
    plans.update(transpose_forward=order.tolist(), transpose_backward=np.argsort(order).tolist(),
                 base_num_features=kit["base_num_features"], num_classes=kit["num_classes"] - 1)
    plans["plans_per_stage"][0].update(
        patch_size=np.array(kit["patch_size"]), current_spacing=np.array(kit["target_spacing"]),
        median_patient_size_in_voxels=np.array(kit["median_shape"]), batch_size=kit["batch_size"],
        num_pool_per_axis=kit["num_pool_per_axis"], pool_op_kernel_sizes=kit["pool_op_kernel_sizes"],
        conv_kernel_sizes=kit["conv_kernel_sizes"], do_dummy_2D_data_aug=np.bool_(kit["do_dummy_2D_data_aug"]))
    return plans


def test_05_validate_takes_an_imported_fold(synth_task, tmp_path, monkeypatch):
    """A fork fold trained on the run's data (plans v1 would make for it: the kit plans by v1's rules) imports
    with the run's preprocessing hash, so 05_validate scores it as a fold the kit trained."""
    from conftest import prepared_run

    from unetpp_lib import validate
    from unetpp_lib.nn.infer import InferenceSettings
    from unetpp_lib.core.layout import RunLayout

    monkeypatch.setattr(autotune, "choose", lambda kind, plans, batch, device, *a, **k:
                        autotune.Choice("fp32", False, kind, str(device), cached=True))
    run = RunLayout(prepared_run(tmp_path, synth_task, {"patch_size": [16, 32, 32], "base_num_features": 4}))
    ours = read_json(run.pre.plans)
    plans = v1_plans_of(ours)
    v1 = write_fork_fold(tmp_path / "v1", plans, state=fork_state(plans, 0, seed=2)[0])
    assert run_cli(v1, run.fold(0).root)[0] == 0
    imported = read_json(run.fold(0).plans)
    assert imported["preprocessing_hash"] == ours["preprocessing_hash"]
    for key in ("patch_size", "target_spacing", "transpose_forward", "pool_op_kernel_sizes", "conv_kernel_sizes",
                "num_classes", "normalization", "resampling"):
        assert imported[key] == ours[key], key
    res = validate.validate_fold(run.root, 0, InferenceSettings("final", "cpu", mirror_axes=()))
    cases = read_json(run.pre.splits)[0]["val"]
    assert len(res["summary"]["results"]["all"]) == len(cases) and run.fold(0).validation.postprocessing.is_file()
