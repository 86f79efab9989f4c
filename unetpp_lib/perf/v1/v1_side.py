"""The original's side of the GPU check: nnU-Net v1.6.4's trainer and predict_3D, timed in v1's own interpreter.

    python v1_side.py JOB.json      (run by unetpp_lib/perf/vs_original.py; prints one `RESULT {json}` line)

Never imported by the kit: it imports nnunet, batchgenerators and v1's pins, which the kit does not share.
The trainer is v1.6.4's nnUNetTrainerV2 (its process_plans, setup_DA_params, DataLoader3D, moreDA on
MultiThreadedAugmenter's CPU processes, SGD, poly lr, fp16 AMP with gradient clipping, run_iteration)
with the network the fork's nnUNetPlusPlusTrainerV2 puts in it (fork_unetpp.py, deep supervision on) and
the fork's loss rule: v1's Dice + CE on the X(0,1) head alone, against the full-resolution label.

JOB: {"mode": "train" | "infer", "plans": v1's plans as plain JSON (see vs_original.v1_plans), "max_features",
"fp16", "scratch" (v1's folders live there), and
  train: "cases" (names of <scratch>/stage/<name>.npy, v1's unpacked (image, label) float32 arrays, with
         <name>_loc<c>.npy per foreground class c: the voxel locations v1's preprocessing samples), "warmup", "steps";
  infer: "shape", "mirror_axes", "step_size", "all_in_gpu"}.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
import types
from pathlib import Path

import numpy as np


class Absent:
    """What stands in for SimpleITK where it is not installed: usable as an annotation, raises when called."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"SimpleITK.{self.name}: SimpleITK is not installed here. v1 imports it at module level "
                           "for its NIfTI export and evaluation, which the GPU check's timed path never calls; "
                           "install SimpleITK to run those parts")

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return Absent(f"{self.name}.{name}")


def stand_in_for_simpleitk() -> bool:
    """Register a SimpleITK module whose every use raises, if the real one is missing; True if it was missing."""
    if importlib.util.find_spec("SimpleITK") is not None:
        return False
    mod = types.ModuleType("SimpleITK")

    def attribute(name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return Absent(name)

    mod.__getattr__ = attribute
    sys.modules["SimpleITK"] = mod
    return True


def cpu_only() -> None:
    """On a machine without CUDA (the suite's dry run): v1's tiled prediction calls .cuda() unconditionally."""
    import torch

    if not torch.cuda.is_available():
        torch.Tensor.cuda = lambda self, *a, **k: self
        torch.nn.Module.cuda = lambda self, *a, **k: self


def as_v1_plans(p: dict) -> dict:
    """The JSON plans with the types v1 reads: integer stage and modality keys, the patch as an array."""
    stage = dict(p["plans_per_stage"]["0"])
    stage["patch_size"] = np.array(stage["patch_size"])
    return {**p, "plans_per_stage": {0: stage}, "modalities": {0: "CT"}, "normalization_schemes": {0: "CT"},
            "use_mask_for_norm": {0: False},
            "dataset_properties": {"intensityproperties": {0: p["dataset_properties"]["intensityproperties"]["0"]}}}


def trainer_class(max_features: int):
    """nnUNetTrainerV2 with the fork's network and loss rule (the fork's nnUNetPlusPlusTrainerV2, as v1.6.4 runs)."""
    import torch
    from nnunet.training.network_training.nnUNetTrainerV2 import nnUNetTrainerV2
    from nnunet.utilities.nd_softmax import softmax_helper
    from fork_unetpp import ForkUNetPlusPlus

    class HeadX01Loss(torch.nn.Module):
        """The fork's deep-supervision wrapper: the base loss on the last output (X(0,1)) and the first target."""

        def __init__(self, loss):
            super().__init__()
            self.loss = loss

        def forward(self, x, y):
            return self.loss(x[-1], y[0])

    class ForkTrainer(nnUNetTrainerV2):
        """v1.6.4's trainer; the fork's UNet++ (all heads full resolution) and its loss on X(0,1)."""

        def setup_DA_params(self):
            super().setup_DA_params()
            self.deep_supervision_scales = [[1, 1, 1]]  # every UNet++ head is full resolution: one target

        def initialize(self, training=True, force_load_plans=False):
            super().initialize(training, force_load_plans)
            self.loss = HeadX01Loss(self.loss.loss)  # v1's Dice + CE, unwrapped from MultipleOutputLoss2

        def initialize_network(self):
            p = self.plans["plans_per_stage"][self.stage]
            self.network = ForkUNetPlusPlus(self.num_input_channels, self.base_num_features, self.num_classes,
                                            p["pool_op_kernel_sizes"], p["conv_kernel_sizes"], max_features,
                                            self.conv_per_stage)
            self.network._deep_supervision = self.network.do_ds = True
            if torch.cuda.is_available():
                self.network.cuda()
            self.network.inference_apply_nonlin = softmax_helper

    return ForkTrainer


def make_trainer(job: dict, scratch: Path, training: bool):
    """The trainer on v1's folders under `scratch`, initialised as run_training does; (trainer, seconds)."""
    from batchgenerators.utilities.file_and_folder_operations import save_pickle

    plans_file = scratch / "plans.pkl"
    save_pickle(as_v1_plans(job["plans"]), str(plans_file))
    # fold "all": v1 trains on every case (no split file, any number of cases)
    trainer = trainer_class(job["max_features"])(str(plans_file), "all", output_folder=str(scratch / "out"),
                                                 dataset_directory=str(scratch), batch_dice=True, stage=0,
                                                 unpack_data=True, deterministic=False, fp16=job["fp16"])
    t0 = time.perf_counter()
    trainer.initialize(training)
    return trainer, time.perf_counter() - t0


def write_v1_folder(job: dict, scratch: Path) -> float:
    """v1's preprocessed folder: each case's .npz (np.savez: uncompressed) and .pkl (class locations) beside its .npy."""
    from batchgenerators.utilities.file_and_folder_operations import save_pickle

    t0 = time.perf_counter()
    stage = scratch / (job["plans"]["data_identifier"] + "_stage0")
    for name in job["cases"]:
        data = np.load(stage / f"{name}.npy", mmap_mode="r")
        np.savez(stage / f"{name}.npz", data=data)  # get_case_identifiers lists .npz; the .npy is what is read
        locs = {c: (np.load(stage / f"{name}_loc{c}.npy") if (stage / f"{name}_loc{c}.npy").is_file() else [])
                for c in job["plans"]["all_classes"]}
        save_pickle({"class_locations": locs, "original_size_of_raw_data": data.shape[1:],
                     "size_after_resampling": data.shape[1:], "spacing_after_resampling":
                         job["plans"]["plans_per_stage"]["0"]["current_spacing"]}, str(stage / f"{name}.pkl"))
    return time.perf_counter() - t0


class TimedBatches:
    """The training generator with the time each `next` waits for a batch recorded."""

    def __init__(self, gen):
        self.gen, self.waits = gen, []

    def __iter__(self):
        return self

    def __next__(self):
        t0 = time.perf_counter()
        batch = next(self.gen)
        self.waits.append(time.perf_counter() - t0)
        return batch


def cached(gen) -> int | None:
    """Batches ready in a MultiThreadedAugmenter (its workers' queues + its pin-memory queue), if it says."""
    try:
        n = sum(q.qsize() for q in gen._queues)
        pin = getattr(gen, "pin_memory_queue", None)
        return n + (pin.qsize() if pin is not None else 0)
    except (AttributeError, NotImplementedError, TypeError):
        return None


def train(job: dict, scratch: Path) -> dict:
    """Setup, warm-up, then `steps` timed iterations: samples/s, the share of time spent waiting for data, memory."""
    import torch

    cuda = torch.cuda.is_available()
    write_s = write_v1_folder(job, scratch)
    trainer, setup_s = make_trainer(job, scratch, True)
    trainer._maybe_init_amp()  # run_training's first step (the GradScaler of fp16)
    trainer.network.train()
    batches = TimedBatches(trainer.tr_gen)
    try:
        for _ in range(job["warmup"]):  # fills the workers' queues, runs cuDNN's search
            trainer.run_iteration(batches, True)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        waits_before, cache_start = len(batches.waits), cached(trainer.tr_gen)
        steps, t0 = [], time.perf_counter()
        for _ in range(job["steps"]):
            s0 = time.perf_counter()
            trainer.run_iteration(batches, True)  # ends with the loss on the host: one sync per step
            steps.append(time.perf_counter() - s0)
        elapsed, cache_end = time.perf_counter() - t0, cached(trainer.tr_gen)
        waits = batches.waits[waits_before:]
    finally:
        for gen in (trainer.tr_gen, trainer.val_gen):
            gen._finish()
    b = trainer.batch_size
    consumed = b * len(steps) / elapsed
    # The queues hold batches made before the window: a window that drained them ran faster than the workers
    # make batches. Steady state is the slower of consuming and producing (batches made in the window / its time).
    produced = b * (len(steps) + cache_end - cache_start) / elapsed if None not in (cache_start, cache_end) else None
    return {"samples_per_s_window": round(consumed, 3),
            "samples_per_s_produced": None if produced is None else round(produced, 3),
            "samples_per_s": round(min(consumed, produced) if produced is not None else consumed, 3),
            "data_wait_fraction": round(sum(waits) / elapsed, 4), "step_s_median": round(float(np.median(steps)), 4),
            "step_s_p10_p90": [round(float(v), 4) for v in np.percentile(steps, [10, 90])],
            "wait_s_median": round(float(np.median(waits)), 4), "batches_cached_start_end": [cache_start, cache_end],
            "steps": len(steps), "warmup": job["warmup"], "batch_size": b, "patch_size": [int(v) for v in trainer.patch_size],
            "workers": trainer.data_aug_params["num_threads"],
            "val_workers": max(trainer.data_aug_params["num_threads"] // 2, 1),
            "cached_per_worker": trainer.data_aug_params["num_cached_per_thread"], "fp16": trainer.fp16,
            "parameters": sum(p.numel() for p in trainer.network.parameters()),
            "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
            "setup_s": round(setup_s, 2), "write_npz_pkl_s": round(write_s, 2)}


def infer(job: dict, scratch: Path) -> dict:
    """predict_3D through the trainer (as v1's predict does) on a random case of `shape`: seconds, memory."""
    import torch

    cuda = torch.cuda.is_available()
    trainer, setup_s = make_trainer(job, scratch, False)
    patch = [int(v) for v in trainer.patch_size]
    rng = np.random.RandomState(0)
    run = dict(do_mirroring=bool(job["mirror_axes"]), mirror_axes=tuple(job["mirror_axes"]), use_sliding_window=True,
               step_size=job["step_size"], use_gaussian=True, all_in_gpu=job["all_in_gpu"], verbose=False,
               mixed_precision=job["fp16"])
    two = [patch[0] + patch[0] // 2] + patch[1:]  # the kit's probe's first call: cuDNN's search, paid once
    t0 = time.perf_counter()
    trainer.predict_preprocessed_data_return_seg_and_softmax(rng.standard_normal((1, *two)).astype(np.float32), **run)
    first_s = time.perf_counter() - t0
    x = rng.standard_normal((1, *job["shape"])).astype(np.float32)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    seg, probs = trainer.predict_preprocessed_data_return_seg_and_softmax(x, **run)  # both on the host
    seconds = time.perf_counter() - t0
    steps = trainer.network._compute_steps_for_sliding_window(patch, list(job["shape"]), job["step_size"])
    tiles = int(np.prod([len(s) for s in steps])) * 2 ** len(job["mirror_axes"])
    return {"predict_3d_s": round(seconds, 3), "shape": list(job["shape"]), "patch_size": patch,
            "tile_passes": tiles, "tiles_per_s": round(tiles / seconds, 2), "first_call_s": round(first_s, 2),
            "mirrorings": 2 ** len(job["mirror_axes"]), "step_size": job["step_size"], "fp16": job["fp16"],
            "all_in_gpu": job["all_in_gpu"], "outputs": [list(seg.shape), list(probs.shape)],
            "parameters": sum(p.numel() for p in trainer.network.parameters()),
            "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
            "setup_s": round(setup_s, 2)}


def versions() -> dict:
    """What ran: v1, batchgenerators, torch, numpy, the device."""
    import batchgenerators
    import nnunet
    import torch

    def version(mod) -> str:
        try:
            from importlib.metadata import version as v
            return v(mod.__name__)
        except Exception:
            return getattr(mod, "__version__", "?")

    return {"nnunet": version(nnunet), "batchgenerators": version(batchgenerators), "torch": torch.__version__,
            "numpy": np.__version__, "python": sys.version.split()[0],
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}


def main(path: str) -> None:
    """Run the job and print its RESULT line."""
    job = json.loads(Path(path).read_text())
    scratch = Path(job["scratch"])
    for key, sub in (("nnUNet_raw_data_base", "raw"), ("nnUNet_preprocessed", "."), ("RESULTS_FOLDER", "results")):
        os.environ[key] = str(scratch / sub)  # read by nnunet.paths at import
        (scratch / sub).mkdir(parents=True, exist_ok=True)
    placeholder = stand_in_for_simpleitk()
    cpu_only()
    result = (train if job["mode"] == "train" else infer)(job, scratch)
    result.update(versions(), simpleitk="absent: a stand-in that raises on use" if placeholder else "installed")
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
