"""Checkpoints (nn/checkpoint.py): a damaged file is named with the fix, and a damaged latest is never the only copy."""
import pytest
import torch

from conftest import prepared_run
from unetpp_lib.core.layout import FoldLayout
from unetpp_lib.nn import checkpoint
from unetpp_lib.train import TrainConfig, Trainer, train


def save_epoch(fold_dir, epoch: int) -> None:
    """A `latest` checkpoint as training writes it: weights and the epoch, a sidecar naming the epoch."""
    checkpoint.save(fold_dir, "latest", {"model": {"w": torch.full((3,), float(epoch))}, "epoch": epoch},
                    {"epoch": epoch, "plans_hash": "h"})


def test_a_new_latest_keeps_the_one_it_replaces(tmp_path):
    save_epoch(tmp_path, 1)
    assert not FoldLayout(tmp_path).sidecar("previous").exists()  # nothing to keep yet
    save_epoch(tmp_path, 2)
    save_epoch(tmp_path, 3)
    (latest, meta), (prev, prev_meta) = checkpoint.load(tmp_path, "latest"), checkpoint.load(tmp_path, "previous")
    assert (meta["epoch"], prev_meta["epoch"]) == (3, 2) and float(prev["model"]["w"][0]) == 2.0
    assert float(latest["model"]["w"][0]) == 3.0  # the link did not tie the new latest to the old file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_latest.json", "checkpoint_latest.pt",
                                                          "checkpoint_previous.json", "checkpoint_previous.pt"]


@pytest.mark.parametrize("damage", ["truncated", "garbage", "sidecar", "swapped"])
def test_a_damaged_checkpoint_is_named_with_the_fix_and_the_one_before_it_is_used(tmp_path, damage):
    save_epoch(tmp_path, 1)
    save_epoch(tmp_path, 2)
    fold = FoldLayout(tmp_path)
    pt, meta = fold.checkpoint("latest"), fold.sidecar("latest")
    if damage == "truncated":  # a copy cut short
        pt.write_bytes(pt.read_bytes()[: pt.stat().st_size // 2])
    elif damage == "garbage":
        pt.write_bytes(b"\x00" * 512)
    elif damage == "sidecar":
        meta.write_text('{"epoch": 2, "plans_')
    else:  # weights of another epoch beside this sidecar
        pt.write_bytes(fold.checkpoint("previous").read_bytes())
    bad = meta if damage == "sidecar" else pt
    with pytest.raises(checkpoint.DamagedCheckpoint, match="damaged checkpoint|do not belong") as err:
        checkpoint.load(tmp_path, "latest")
    assert str(bad) in str(err.value) and "fix:" in str(err.value)
    state, got, warning = checkpoint.load_latest(tmp_path)
    assert got["epoch"] == 1 == state["epoch"] and str(bad) in warning and "checkpoint_previous.pt" in warning
    fold.sidecar("previous").unlink()  # no good copy left: the error itself
    with pytest.raises(checkpoint.DamagedCheckpoint):
        checkpoint.load_latest(tmp_path)


@pytest.fixture(scope="module")
def run_dir(synth_task, tmp_path_factory):
    return prepared_run(tmp_path_factory.mktemp("ckpt"), synth_task,
                        {"patch_size": [16, 32, 32], "base_num_features": 4, "batch_size": 2})


def test_training_continues_from_the_checkpoint_before_a_damaged_latest(run_dir, capsys):
    fast = dict(iterations_per_epoch=2, val_iterations=1, num_workers=0, device="cpu", save_every=1)
    train(TrainConfig(str(run_dir), fold=0, num_epochs=3, **fast))
    fold = FoldLayout(run_dir / "fold_0")
    pt = fold.checkpoint("latest")
    pt.write_bytes(pt.read_bytes()[:1000])  # e.g. the folder was copied while a save was under way
    capsys.readouterr()
    resumed = Trainer(TrainConfig(str(run_dir), fold=0, num_epochs=4, continue_training=True, **fast))
    out = capsys.readouterr().out
    assert resumed.epoch == 2 and len(resumed.log) == 2  # epoch 3's checkpoint was lost, epoch 2's is used
    assert f"{pt}: damaged checkpoint" in out and "continuing from the checkpoint before it" in out
    assert len(resumed.fit()) == 4 and checkpoint.load(fold.root, "latest")[1]["epoch"] == 4
