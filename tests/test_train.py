"""Training on tiny synthetic data: learning, checkpoints, resume, DDP with gloo."""
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict

import numpy as np
import psutil
import pytest
import torch

from conftest import prepared_run
from unetpp_lib import launch as launcher
from unetpp_lib.nn import checkpoint
from unetpp_lib.launch import TrainingFailed, launch
from unetpp_lib.prep.store import StalePreprocessedError
from unetpp_lib.nn.schedule import poly_lr, rescue_zero_dice
from unetpp_lib.train import FAIL_AT, TrainConfig, Trainer, train

FAST = dict(iterations_per_epoch=4, val_iterations=2, num_workers=0, device="cpu", save_every=1)


@pytest.fixture(scope="module")
def run_dir(synth_task, tmp_path_factory):
    return prepared_run(tmp_path_factory.mktemp("train"), synth_task,
                        {"patch_size": [16, 32, 32], "base_num_features": 4, "batch_size": 2})


def test_loss_falls_and_liver_dice_rises(run_dir):
    log = launcher.run(TrainConfig(str(run_dir), fold=0, num_epochs=6, seed=1, **{**FAST, "iterations_per_epoch": 6}))
    assert len(log) == 6
    assert np.mean([e["train_loss"] for e in log[-2:]]) < np.mean([e["train_loss"] for e in log[:2]]) - 0.1
    assert max(e["pseudo_dice"][0] for e in log[-3:]) > log[0]["pseudo_dice"][0]  # liver
    fold = run_dir / "fold_0"
    assert {p.name for p in fold.iterdir()} >= {"train_log.json", "progress.png", "checkpoint_final.pt",
                                                "checkpoint_final.json", "checkpoint_best.pt", "checkpoint_latest.pt"}
    state, meta = checkpoint.load(fold, "final")  # weights_only=True inside
    assert meta["epoch"] == 6 and meta["plans_hash"] == json.loads((run_dir / "preprocessed" / "plans.json").read_text())["preprocessing_hash"]
    assert set(state["model"]) and meta["params"]["num_epochs"] == 6



def test_a_run_stuck_at_dice_0_gets_v1s_rescue(run_dir):
    """Heads zeroed and lr 0: every voxel is background, the pseudo-Dice stays 0; after the rule's epoch
    (here 1, v1's is 100) momentum is 0.95 and the weights are new, as nnUNetTrainerV2.on_epoch_end."""
    trainer = Trainer(TrainConfig(str(run_dir), fold=4, num_epochs=2, initial_lr=0.0, zero_dice_epoch=1, **FAST))
    with torch.no_grad():
        for head in trainer.net.heads:
            head.weight.zero_()
    before = {k: v.clone() for k, v in trainer.net.state_dict().items()}
    log = trainer.fit()
    assert [e["pseudo_dice"] for e in log] == [[0.0, 0.0]] * 2 and "rescued" not in log[0] and "rescued" in log[1]
    assert trainer.opt.param_groups[0]["momentum"] == 0.95
    after = trainer.net.state_dict()
    assert all(float(h.weight.detach().abs().sum()) > 0 for h in trainer.net.heads)
    convs = [k for k in after if after[k].dim() == 5]  # convs, transposed convs, heads
    assert all(not torch.equal(before[k], after[k]) for k in convs)  # every conv re-drawn
    norms = [k for k in after if after[k].dim() == 1]  # instance-norm scales and shifts, conv biases
    assert norms and all(torch.equal(before[k], after[k]) for k in norms)  # norms kept, biases zero before and after, as v1
    saved, _ = checkpoint.load(run_dir / "fold_4", "final")
    assert saved["optimizer"]["param_groups"][0]["momentum"] == 0.95  # a resumed run keeps the lowered momentum


@pytest.mark.parametrize("dice, fires", [([0.0, 0.0], True), ([0.0, float("nan")], True), ([0.0, 1e-4], False),
                                         ([float("nan")] * 2, False)])
def test_rescue_fires_on_a_mean_dice_of_exactly_0(dice, fires):
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3))
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.99, nesterov=True)
    weight = net[0].weight.detach().clone()
    assert rescue_zero_dice(opt, net, dice) is fires
    assert opt.param_groups[0]["momentum"] == (0.95 if fires else 0.99)
    assert torch.equal(net[0].weight, weight) is not fires


def test_on_epoch_sees_each_epoch_on_rank_0(run_dir):
    seen = []
    train(TrainConfig(str(run_dir), fold=1, num_epochs=2, **FAST),
          on_epoch=lambda log, fold: seen.append((len(log), (fold.root / "train_log.json").is_file())))
    assert seen == [(1, True), (2, True)]  # after each epoch, once its log is written

def test_resume_restores_epoch_lr_and_optimiser(run_dir):
    cfg = TrainConfig(str(run_dir), fold=1, num_epochs=2, **FAST)
    train(cfg)
    saved, meta = checkpoint.load(run_dir / "fold_1", "latest")
    resumed = Trainer(TrainConfig(str(run_dir), fold=1, num_epochs=4, continue_training=True, **FAST))
    assert resumed.epoch == 2 == meta["epoch"] and len(resumed.log) == 2
    assert poly_lr(0.01, resumed.epoch, 4, 0.9) == pytest.approx(0.01 * (1 - 2 / 4) ** 0.9)
    opt_now, opt_then = resumed.opt.state_dict(), saved["optimizer"]
    for k, v in opt_then["state"].items():
        assert torch.equal(opt_now["state"][k]["momentum_buffer"], v["momentum_buffer"])
    assert all(torch.equal(a, b) for a, b in zip(resumed.net.state_dict().values(), saved["model"].values()))
    assert torch.equal(resumed.gen.get_state(), saved["rng_augment"])
    log = resumed.fit()
    assert [e["epoch"] for e in log] == [0, 1, 2, 3]


@pytest.mark.slow
def test_killed_run_resumes(run_dir):
    cfg = TrainConfig(str(run_dir), fold=2, num_epochs=30, **FAST)
    code = f"from unetpp_lib.train import TrainConfig, train; train(TrainConfig(**{asdict(cfg)!r}))"
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.DEVNULL)
    sidecar = run_dir / "fold_2" / "checkpoint_latest.json"
    deadline = time.time() + 120
    while not sidecar.exists() and time.time() < deadline:
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert sidecar.exists()
    done = json.loads(sidecar.read_text())["epoch"]
    assert 1 <= done < 30
    log = train(TrainConfig(str(run_dir), fold=2, num_epochs=done + 1, continue_training=True, **FAST))
    assert [e["epoch"] for e in log] == list(range(done + 1))


def test_stale_store_is_refused(run_dir, tmp_path):
    import shutil
    run = tmp_path / "stale"
    shutil.copytree(run_dir / "preprocessed", run / "preprocessed")
    plans = json.loads((run / "preprocessed" / "plans.json").read_text())
    plans["target_spacing"][0] *= 2
    (run / "preprocessed" / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(StalePreprocessedError, match="Run 03_preprocess again"):
        Trainer(TrainConfig(str(run), **FAST))


def _our_processes() -> list:
    return [p for p in psutil.Process().children(recursive=True) if "unetpp_lib.launch" in " ".join(p.cmdline())]


@pytest.mark.slow
def test_ddp_two_cpu_processes_train(run_dir):
    log = launch(TrainConfig(str(run_dir), fold=3, num_epochs=2, **FAST), nproc=2, timeout=300)
    assert [e["epoch"] for e in log] == [0, 1] and all(np.isfinite(e["train_loss"]) for e in log)
    meta = json.loads((run_dir / "fold_3" / "checkpoint_final.json").read_text())
    assert meta["world_size"] == 2
    assert not _our_processes()


@pytest.mark.slow
def test_ddp_failing_rank_ends_all_ranks(run_dir, monkeypatch):
    monkeypatch.setenv(FAIL_AT, "2")  # the ranks inherit it through torchrun
    t0 = time.time()
    with pytest.raises(TrainingFailed, match="test hook: rank 1 fails"):
        launch(TrainConfig(str(run_dir), fold=4, num_epochs=3, **FAST), nproc=2, timeout=300)
    assert time.time() - t0 < 120 and not _our_processes()  # nobody left holding the port


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_mixed_precision_training(run_dir):
    log = train(TrainConfig(str(run_dir), fold=0, num_epochs=1, precision="auto", channels_last=True,
                            **{**FAST, "device": "cuda", "num_workers": 1}))
    assert np.isfinite(log[0]["train_loss"])


@pytest.mark.slow
def test_launch_timeout_stops_every_rank(run_dir):
    with pytest.raises(TrainingFailed, match="exceeded 8 s"):
        launch(TrainConfig(str(run_dir), fold=4, num_epochs=500, **FAST), nproc=2, timeout=8)
    time.sleep(1)
    assert not _our_processes()


def test_continuing_with_other_learning_parameters_is_refused_by_name(run_dir):
    train(TrainConfig(str(run_dir), fold=3, num_epochs=1, **FAST))
    changed = {**FAST, "initial_lr": 0.02}
    with pytest.raises(ValueError, match=r"other initial_lr; set continue_training: false"):
        Trainer(TrainConfig(str(run_dir), fold=3, num_epochs=2, continue_training=True, **changed))
    # where and how it runs (workers, device) and a longer schedule do not block continuing
    resumed = Trainer(TrainConfig(str(run_dir), fold=3, num_epochs=2, continue_training=True,
                                  **{**FAST, "num_workers": 1}))
    assert resumed.epoch == 1
