"""`python -m unetpp_lib.predict`: a copied fold folder predicts a folder of images as `infer.predict` does,
with a progress bar, resumable, and one clear line (exit 2) for inputs it cannot take."""
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import prepared_run
from unetpp_lib import predict
from unetpp_lib.core import image_folder, io
from unetpp_lib.nn.infer import InferenceSettings
from unetpp_lib.nn.infer import predict as api_predict
from unetpp_lib.core.layout import PredLayout, RunLayout
from unetpp_lib.evaluation.postprocess import apply_postprocessing
from unetpp_lib.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--device", "cpu", "--disable-mirroring"]
PP = {"lcc_all_foreground": True, "lcc_classes": [1, 2]}


@pytest.fixture(scope="module")
def fold(synth_task, tmp_path_factory) -> Path:
    """A fold trained for one short epoch, then copied alone (no run folder around it)."""
    root = tmp_path_factory.mktemp("predict")
    run = prepared_run(root, synth_task, {"patch_size": [16, 32, 32], "base_num_features": 4})
    train(TrainConfig(str(run), fold=0, num_epochs=1, iterations_per_epoch=2, val_iterations=1, num_workers=0,
                      device="cpu", augment=False))
    copy = Path(shutil.copytree(RunLayout(run).fold(0).root, root / "elsewhere" / "my_model"))
    shutil.rmtree(run)  # the copy must predict on its own
    return copy


@pytest.fixture(scope="module")
def images(synth_task, tmp_path_factory) -> Path:
    """Two test images named nnU-Net style (<case>_0000.nii.gz)."""
    folder = tmp_path_factory.mktemp("images")
    for src in sorted((synth_task / "imagesTs").glob("liver_*.nii.gz"))[:2]:
        shutil.copyfile(src, folder / src.name.replace(".nii.gz", "_0000.nii.gz"))
    return folder


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "unetpp_lib.predict", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_copied_fold_predicts_a_folder_like_the_api_and_resumes(fold, images, tmp_path):
    out = tmp_path / "out"
    res = cli("-i", images, "-o", out, "-m", fold, *FAST)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "predict" in res.stderr and "2/2" in res.stderr and "<" in res.stderr  # tqdm's bar with its ETA
    ref = api_predict(sorted(images.glob("*.nii.gz")), [fold], tmp_path / "api",
                      InferenceSettings(device="cpu", mirror_axes=()))
    for r in ref:
        case = Path(r["image"]).name.removesuffix("_0000.nii.gz")
        seg, geom = io.read_image(out / f"{case}.nii.gz")
        assert io.same_geometry(geom, io.read_image(r["image"])[1]) and seg.dtype == np.uint8
        assert np.array_equal(seg, io.read_image(r["prediction"])[0])  # voxel for voxel
    assert not list(out.rglob("*partial*")) and not (out / "raw").exists()
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*.nii.gz")}
    staging = PredLayout(out).staging  # what a run killed mid-case leaves: cleared, never taken for an output
    staging.mkdir()
    (staging / "liver_6.partial.nii.gz").write_bytes(b"half")
    again = cli("-i", images, "-o", out, "-m", fold, *FAST)
    assert again.returncode == 0 and "0 predicted, 2 skipped" in again.stdout
    assert {p: p.stat().st_mtime_ns for p in out.glob("*.nii.gz")} == stamps and not staging.exists()


def test_save_uncertainty_writes_maps_in_the_images_geometry_and_completes_a_folder(fold, images, tmp_path):
    from unetpp_lib.core.layout import UNCERTAINTY_KINDS

    out = PredLayout(tmp_path / "out")
    first = cli("-i", images, "-o", out.root, "-m", fold, *FAST)  # without maps
    assert first.returncode == 0 and not (out.root / "uncertainty").exists()
    segs = {p.name: io.read_image(p)[0] for p in out.root.glob("*.nii.gz")}
    again = cli("-i", images, "-o", out.root, "-m", fold, *FAST, "--save-uncertainty")
    assert again.returncode == 0 and "2 predicted" in again.stdout, again.stderr[-2000:]  # completed with maps
    for image in sorted(images.glob("*.nii.gz")):
        case = image.name.removesuffix("_0000.nii.gz")
        seg, g = io.read_image(out.case(case))
        assert np.array_equal(seg, segs[f"{case}.nii.gz"])  # the same segmentation
        for kind in UNCERTAINTY_KINDS:
            m, gm = io.read_image(out.uncertainty(case, kind))
            assert io.same_geometry(gm, io.read_image(image)[1]) and m.dtype == np.uint8 and m.max() <= 100
    third = cli("-i", images, "-o", out.root, "-m", fold, *FAST, "--save-uncertainty")
    assert third.returncode == 0 and "0 predicted, 2 skipped" in third.stdout


def test_postprocessing_from_validation_and_changed_settings(fold, images, tmp_path, capsys):
    decision = fold / "validation" / "postprocessing.json"
    decision.parent.mkdir(exist_ok=True)
    io.write_json(decision, {**PP, "dice_before": {}, "dice_after": {}})
    try:
        one = sorted(images.glob("*.nii.gz"))[:1]
        folder = tmp_path / "one"
        folder.mkdir()
        shutil.copyfile(one[0], folder / one[0].name)
        raw = api_predict(one, [fold], tmp_path / "api", InferenceSettings(device="cpu", mirror_axes=()))
        assert predict.main(["-i", str(folder), "-o", str(tmp_path / "pp"), "-m", str(fold), *FAST,
                             "--save-probabilities"]) == 0
        assert str(decision) in capsys.readouterr().err
        probs = np.load(tmp_path / "pp" / Path(raw[0]["prediction"]).name.replace(".nii.gz", ".npz"))
        assert probs["probabilities"].shape[0] == 3
        seg = io.read_image(tmp_path / "pp" / Path(raw[0]["prediction"]).name)[0]
        assert np.array_equal(seg, apply_postprocessing(io.read_image(raw[0]["prediction"])[0], PP))
        # the same folder with post-processing off: other settings, refused unless --overwrite
        args = ["-i", str(folder), "-o", str(tmp_path / "pp"), "-m", str(fold), *FAST, "--no-postprocessing"]
        assert predict.main(args) == 2
        assert "settings.json" in capsys.readouterr().err
        assert predict.main(args + ["--overwrite"]) == 0
        assert np.array_equal(io.read_image(tmp_path / "pp" / Path(raw[0]["prediction"]).name)[0],
                              io.read_image(raw[0]["prediction"])[0])
    finally:
        decision.unlink()


def test_non_nifti_file_exits_2_naming_it(fold, images, tmp_path):
    bad = Path(shutil.copytree(images, tmp_path / "in"))
    (bad / "notes.txt").write_text("not an image")
    res = cli("-i", bad, "-o", tmp_path / "out", "-m", fold, *FAST)
    assert res.returncode == 2 and "notes.txt" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()  # checked before anything is written


def bad_input(tmp_path, fold, capsys, *extra) -> str:
    """Run main() in-process; assert exit 2 and one line on stderr; return that line."""
    code = predict.main(["-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "-m", *map(str, extra or [fold]),
                         *FAST])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    return err


def test_4d_image_and_other_bad_inputs_exit_2(fold, images, tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    assert "no .nii.gz images" in bad_input(tmp_path, fold, capsys)
    four_d = sitk.GetImageFromArray(np.zeros((2, 3, 4, 5), np.int16), isVector=False)  # (t, z, y, x)
    sitk.WriteImage(four_d, str(src / "a_0000.nii.gz"))
    err = bad_input(tmp_path, fold, capsys)
    assert "a_0000.nii.gz" in err and "4D" in err
    (src / "a_0000.nii.gz").unlink()
    first = sorted(images.glob("*.nii.gz"))[0]
    shutil.copyfile(first, src / "b_0000.nii.gz")
    shutil.copyfile(first, src / "b_0001.nii.gz")  # a second channel the model does not take
    assert "b_0001.nii.gz" in bad_input(tmp_path, fold, capsys)
    (src / "b_0001.nii.gz").unlink()
    assert "not found" in bad_input(tmp_path, fold, capsys, tmp_path / "nowhere")
    broken = Path(shutil.copytree(fold, tmp_path / "broken"))
    (broken / "plans.json").unlink()
    assert str(broken / "plans.json") in bad_input(tmp_path, fold, capsys, broken)
    no_final = Path(shutil.copytree(fold, tmp_path / "no_final"))
    (no_final / "checkpoint_final.pt").unlink()
    err = bad_input(tmp_path, fold, capsys, no_final)
    assert "checkpoint_final.pt" in err and "pass --checkpoint best" in err  # one the folder has
    assert not (tmp_path / "out").exists()
    data = (src / "b_0000.nii.gz").read_bytes()
    (src / "b_0000.nii.gz").write_bytes(data[: len(data) // 2])  # the header reads; the voxels would be zeros
    code = predict.main(["-i", str(src), "-o", str(tmp_path / "out"), "-m", str(fold), *FAST])
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the plan line and the progress bar
    assert code == 2 and last.startswith("error: ") and "b_0000.nii.gz" in last and "truncated" in last
    assert not list((tmp_path / "out").glob("*.nii.gz"))


def test_naming_rules(tmp_path):
    g = io.Geometry((2, 3, 3), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    for name in ("liver_1.nii.gz", "liver_12.nii", ".hidden.nii.gz"):
        io.write_image(tmp_path / "msd" / name, np.zeros(g.shape, np.int16), g)
    (tmp_path / "msd" / "sub").mkdir()
    assert list(image_folder.list_cases(tmp_path / "msd")) == ["liver_1", "liver_12"]  # MSD style: names kept
    for name in ("a_0000.nii.gz", "b_0000.nii.gz"):
        io.write_image(tmp_path / "nn" / name, np.zeros(g.shape, np.int16), g)
    assert list(image_folder.list_cases(tmp_path / "nn")) == ["a", "b"]  # nnU-Net style: _0000 dropped
    assert "<case>_0000.nii.gz" in predict.build_parser().format_help()  # --help says how names are read


def test_ensemble_decision_is_the_runs(tmp_path):
    run = RunLayout(tmp_path / "run")
    for k in (0, 1, 2):
        run.fold(k).root.mkdir(parents=True)
    io.write_json(run.test_ensemble.settings, {"folds": [0, 1]})
    io.write_json(run.test_ensemble.postprocessing, PP)
    decision, source = predict.postprocessing_decision([run.fold(0).root, run.fold(1).root])
    assert decision == PP and source.endswith("postprocessing.json")
    assert predict.postprocessing_decision([run.fold(0).root, run.fold(2).root])[0] is None  # other folds


def test_compile_flag_reaches_the_sliding_window_and_is_speed_only(fold, images, tmp_path, monkeypatch):
    from unetpp_lib.nn import infer

    calls = []
    monkeypatch.setattr(infer, "compiled_forward", lambda backend: calls.append(backend) or infer.tile_forward)
    parse = predict.build_parser().parse_args
    assert predict.settings_from(parse(["-i", "a", "-o", "b", "-m", "c", "--compile"])).compile
    assert not predict.settings_from(parse(["-i", "a", "-o", "b", "-m", "c"])).compile
    assert InferenceSettings(compile=True).key() == InferenceSettings().key()  # outputs stay current
    one = sorted(images.glob("*.nii.gz"))[:1]
    folder = tmp_path / "one"
    folder.mkdir()
    shutil.copyfile(one[0], folder / one[0].name)
    args = ["-i", str(folder), "-o", str(tmp_path / "out"), "-m", str(fold), *FAST, "--no-postprocessing"]
    assert predict.main(args + ["--compile"]) == 0 and calls == ["inductor"]
    assert predict.main(args) == 0  # the same settings: nothing to redo
