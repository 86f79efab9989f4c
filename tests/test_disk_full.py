"""A full disk (ENOSPC injected at the write calls) stops each stage with one line naming the folder and the space it
needs; nothing half-written stays; with space again, the rerun completes."""
import errno

import pytest

from conftest import prepared_run
from unetpp_lib import convert, preprocess, validate
from unetpp_lib.core import io
from unetpp_lib.core.io import PARTIAL, DiskFullError, atomic_path
from unetpp_lib.core.layout import RunLayout
from unetpp_lib.nn import checkpoint, infer
from unetpp_lib.nn.infer import InferenceSettings
from unetpp_lib.prep import store
from unetpp_lib.train import TrainConfig, train

TINY = dict(iterations_per_epoch=2, val_iterations=1, num_workers=0, device="cpu", save_every=1)


def disk_fills(real, calls_before: int):
    """copy_file that succeeds `calls_before` times, then fills the disk mid-write: part of the file is written
    under its temporary name, then ENOSPC."""
    left = [calls_before]

    def copy(src, dst, *args, **kwargs):
        if left[0] > 0:
            left[0] -= 1
            return real(src, dst, *args, **kwargs)
        with atomic_path(dst) as tmp:
            tmp.write_bytes(b"\0" * 4096)
            raise OSError(errno.ENOSPC, "No space left on device")
    return copy


def no_partials(folder) -> bool:
    return not [p for p in folder.rglob("*") if PARTIAL in p.name]


def test_convert(task_copy, tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    monkeypatch.setattr(convert, "copy_file", disk_fills(convert.copy_file, 2))
    with pytest.raises(DiskFullError, match=rf"01_convert: no space left in {raw} \(.* free; the stage needs about "):
        convert.convert_task(task_copy, raw)
    assert no_partials(raw) and not (raw / "dataset.json").exists()
    monkeypatch.undo()
    assert not convert.convert_task(task_copy, raw).problems() and (raw / "dataset.json").is_file()


@pytest.fixture(scope="module")
def run_dir(synth_task, tmp_path_factory):
    return prepared_run(tmp_path_factory.mktemp("full"), synth_task,
                        {"patch_size": [16, 32, 32], "base_num_features": 4, "batch_size": 2})


def test_preprocess(run_dir, monkeypatch):
    pre = RunLayout(run_dir).pre
    case = sorted(p.stem for p in pre.store.glob("*.zarr"))[1]
    pre.case_properties(case).unlink()  # this case is to be redone (as after a change of its raw files)
    real = store._array

    def full_array(group, name, *args, **kwargs):
        real(group, name, *args, **kwargs)  # the image is written, then the disk is full
        if case in str(group.store) and name == "image":
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store, "_array", full_array)
    with pytest.raises(DiskFullError, match=rf"03_preprocess: no space left in {pre.store} .*needs about .*B there"):
        preprocess.preprocess_task(run_dir / "raw", pre.root, cases=None)
    assert no_partials(pre.store) and not pre.manifest.exists()
    monkeypatch.undo()
    done = preprocess.preprocess_task(run_dir / "raw", pre.root)
    assert {r["case"]: r["status"] for r in done}[case] == "preprocessed" and pre.manifest.is_file()


def test_train_checkpoint(run_dir, monkeypatch):
    fold = RunLayout(run_dir).fold(0)
    real, latest_writes = checkpoint.torch.save, []

    def full_save(state, f, *args, **kwargs):
        if "checkpoint_latest" in str(f):
            latest_writes.append(f)
            if len(latest_writes) == 2:  # epoch 2's latest: the disk fills while it is written
                with open(f, "wb") as fh:
                    fh.write(b"\0" * 4096)
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(state, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", full_save)
    with pytest.raises(DiskFullError, match=rf"04_train: no space left in {fold.root} .*needs about .*B there"):
        train(TrainConfig(str(run_dir), fold=0, num_epochs=3, **TINY))
    assert no_partials(fold.root)
    state, meta, warning = checkpoint.load_latest(fold.root)  # epoch 1's, kept as previous
    assert meta["epoch"] == 1 and "continuing from the checkpoint before it" in warning
    monkeypatch.undo()
    log = train(TrainConfig(str(run_dir), fold=0, num_epochs=3, continue_training=True, **TINY))
    assert len(log) == 3 and fold.checkpoint("final").is_file()


def test_validate(run_dir, monkeypatch):
    fold = RunLayout(run_dir).fold(0)
    if not fold.checkpoint("final").is_file():
        train(TrainConfig(str(run_dir), fold=0, num_epochs=1, **TINY))
    real, calls = infer.write_image, {"n": 0}

    def full_write(path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:  # the first validation case's prediction
            with atomic_path(path) as tmp:
                tmp.write_bytes(b"\0" * 4096)
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(infer, "write_image", full_write)
    settings = InferenceSettings(device="cpu", mirror_axes=())
    with pytest.raises(DiskFullError, match=rf"05_validate: no space left in {fold.root} "):
        validate.validate_fold(run_dir, 0, settings)
    assert no_partials(fold.root)
    monkeypatch.undo()
    result = validate.validate_fold(run_dir, 0, settings)
    assert result["summary"]["results"]["mean"]["1"]["Dice"] >= 0


def test_other_errors_pass_through(tmp_path):
    with pytest.raises(PermissionError):
        with io.disk_space(tmp_path, 1e9, "01_convert"):
            raise PermissionError(errno.EACCES, "Permission denied")
    with pytest.raises(DiskFullError, match=r"quota|no space left in"):
        with io.disk_space(tmp_path / "not" / "yet", 2.5e9, "03_preprocess"):
            raise RuntimeError("wrapped") from OSError(errno.EDQUOT, "Disk quota exceeded")
