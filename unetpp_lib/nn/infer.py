"""Inference: sliding window on the device, export with the input's exact geometry, prediction of new cases.

Functional core shared by validation, `predict` on new images and the benchmark:
`sliding_window` (tiles, Gaussian weights, mirroring, batched tiles, autocast, optionally a
compiled forward pass; softmax probabilities averaged over mirrorings and tiles, as nnU-Net v1
does, accumulated on the device when they fit) -> `export` (probabilities back to the cropped
original shape on the device, argmax, pasted into the full volume, written as uint8 NIfTI whose spacing, origin
and direction are the input image's).

Uncertainty (`save_uncertainty`): the sliding window also accumulates, in one extra channel and with the same
Gaussian weights, the entropy of every softmax it averages (each mirroring of each tile; over folds, each fold's);
`export` then writes three maps beside the segmentation (`uncertainty_maps`): the entropy of the mean softmax
(total uncertainty), the spread (that entropy minus the mean entropy: the mutual information between the prediction
and which mirroring, tile or fold made it, i.e. how much they disagree) and the confidence (the mean probability of
the predicted class); uint8 percent 0-100, entropies as % of ln C. No copy of the softmax is kept per mirroring.
"""
from __future__ import annotations

import functools
import itertools
import math
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from tqdm import tqdm

from . import autotune, checkpoint
from ..core.device import autocast, resolve_device, synchronize
from ..core.io import Geometry, atomic_path, read_image, read_json, write_image
from ..core.pool import progress
from ..core.layout import FoldLayout, PredLayout, case_of_file, prediction_name, probabilities_path
from ..core.params import setting
from .model import build_model, load_weights
from ..prep.resample import ANISO_THRESHOLD
from ..prep.transforms import preprocess_arrays


@dataclass(frozen=True)
class InferenceSettings:
    """How trained models predict: which checkpoint, on which device, with which sliding-window options.

    The fields read from 05_validate's parameters have the parameters' names (`params.build` fills them) and take
    their defaults from the schema (core/params.py); `pruned_level` None (the deepest level) is the library's."""

    checkpoint: str = setting("checkpoint")  # final | best | latest
    device: str = setting("device")  # auto | cpu | cuda[:N] | npu[:N]
    step_size: float = setting("step_size")  # sliding-window step, fraction of the patch
    mirror_axes: tuple[int, ...] = setting("mirror_axes")  # test-time mirroring axes, () for none
    head_mode: str = setting("head_mode")  # UNet++ heads: deepest | average | pruned
    pruned_level: int | None = None  # level k of the pruned mode (None: the deepest); other modes ignore it
    tile_batch: int = 2  # tiles per forward pass (speed only)
    compile: bool = setting("compile")  # torch.compile the forward pass (speed only; the first case compiles)
    save_probabilities: bool = False  # also write <case>.npz with float16 probabilities
    save_uncertainty: bool = False  # also write the uncertainty maps (module docstring); 05_validate's default: on
    precision: str = setting("precision")  # autocast: auto (autotune's probe) | fp32 | bf16 | fp16 (speed only)
    channels_last: bool | str = setting("channels_last")  # layout of the forward pass: auto (measured) | True | False

    def __post_init__(self):
        object.__setattr__(self, "mirror_axes", tuple(self.mirror_axes))  # parameters hold a list

    def key(self) -> dict:
        """What a set of predictions depends on (stored beside them; a change invalidates them).

        The stored names (step, mode, level) predate the fields' names; kept so earlier predictions stay current."""
        return {"checkpoint": self.checkpoint, "step": self.step_size, "mirror_axes": list(self.mirror_axes),
                "mode": self.head_mode, "level": self.pruned_level if self.head_mode == "pruned" else None}


TILE_BAR_DELAY = 3.0  # seconds a case runs before its tile bar shows


def tile_starts(size: int, patch: int, step: float = 0.5) -> list[int]:
    """Tile start positions along one axis, evenly spread: ceil((size - patch) / (step x patch)) + 1 tiles."""
    if size <= patch:
        return [0]
    n = math.ceil((size - patch) / (step * patch)) + 1
    stride = (size - patch) / (n - 1)  # stride x i, not i x span / (n - 1): the same rounding as nnU-Net v1
    return [int(np.round(stride * i)) for i in range(n)]


def gaussian_weights(patch, sigma_scale: float = 1 / 8) -> torch.Tensor:
    """Importance map: Gaussian with sigma = patch / 8 per axis centred on voxel patch // 2, max 1, no zeros."""
    axes = []
    for p in patch:
        # nnU-Net v1 blurs a delta at p // 2 (not the geometric centre (p - 1) / 2: even patches are
        # weighted half a voxel off-centre); its 4-sigma truncation never reaches inside the patch
        x = torch.arange(p, dtype=torch.float64) - p // 2
        axes.append(torch.exp(-0.5 * (x / (p * sigma_scale)) ** 2))
    w = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    w = (w / w.max()).float()
    w[w == 0] = w[w > 0].min()
    return w


def mirror_sets(axes) -> list[tuple[int, ...]]:
    """All flip combinations of the chosen spatial axes (8 for three axes), the identity first."""
    axes = list(axes)
    return [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]


def entropy(p: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Shannon entropy (nats) of probabilities along `dim` (0 log 0 = 0)."""
    return -(p * torch.log(p.clamp_min(1e-12))).sum(dim)


def _accumulator_device(device: torch.device, shape, num_classes: int) -> torch.device:
    """Accumulate on the device when probabilities + weights take under half its free memory, else on the host."""
    if device.type != "cuda":
        return device
    need = (num_classes + 1) * 4 * int(np.prod(shape))
    free, _ = torch.cuda.mem_get_info(device)
    return device if need < free / 2 else torch.device("cpu")


def pad_to_patch(image: torch.Tensor, patch) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """(C, D, H, W) image zero-padded to at least `patch` (odd remainders go after), and the crop that undoes it."""
    pad = [max(0, p - s) for s, p in zip(image.shape[1:], patch)]
    lo = [p // 2 for p in pad]  # as batchgenerators' pad_nd_image: half below, the larger half above
    img = F.pad(image.float(), [v for a, p in zip(reversed(lo), reversed(pad)) for v in (a, p - a)])
    return img, (slice(None),) + tuple(slice(a, a + s) for a, s in zip(lo, image.shape[1:]))


def tile_forward(net, x: torch.Tensor, mode: str, level: int | None) -> torch.Tensor:
    """The network's logits for a batch of tiles in one head mode (what `compiled_forward` compiles)."""
    return net(x, mode=mode, level=level)


@functools.cache
def compiled_forward(backend: str = "inductor") -> Callable:
    """`tile_forward` compiled with static shapes, once per process and backend. Dynamo guards on the network's
    structure, not its identity (the weights are graph inputs), so one graph serves every network of an
    architecture in a head mode, tile-batch shape and autocast dtype; the first such batch compiles it."""
    return torch.compile(tile_forward, dynamic=False, backend=backend)


def tile_batch_input(img: torch.Tensor, boxes: list, size: int) -> torch.Tensor:
    """The tiles of `boxes` stacked, zero tiles appended up to `size` (one shape: the compiled graph is reused)."""
    x = torch.stack([img[(slice(None),) + box] for box in boxes])
    pad = size - len(boxes)  # instance norm keeps samples apart: the zero tiles change nothing in the others
    return torch.cat([x, x.new_zeros((pad, *x.shape[1:]))]) if pad > 0 else x


@torch.no_grad()
def sliding_window(net, image: torch.Tensor, patch, num_classes: int, step: float = 0.5, mirror_axes=(0, 1, 2),
                   mode: str = "deepest", level: int | None = None, tile_batch: int = 2,
                   dtype: torch.dtype | None = None, timings: dict | None = None, compile: bool = False,
                   compile_backend: str = "inductor", channels_last: bool = False, desc: str | None = None,
                   uncertainty: bool = False) -> torch.Tensor:
    """Class probabilities (classes, D, H, W) of a (C, D, H, W) image: softmax averaged over the mirrorings
    of each tile, then over overlapping tiles weighted by the Gaussian importance map (nnU-Net v1's rule).

    `uncertainty`: one more channel (last), the mean entropy (nats) of the averaged softmaxes, with the same
    weights (so that entropy of the mean minus it is their mutual information; `uncertainty_maps`).
    `compile`: the forward pass through `compiled_forward(compile_backend)`, every batch padded to `tile_batch`.
    `channels_last`: tiles in channels-last 3D layout (the network should be too: `inference_choice`). `desc`: a
    case that takes longer than TILE_BAR_DELAY s shows a bar of its tiles (done, rate, time left) named `desc`."""
    device = next(net.parameters()).device
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # one tile shape throughout: cuDNN's fastest kernels (v1 sets it too)
    img, crop = pad_to_patch(image, patch)
    padded = img.shape[1:]
    channels = num_classes + int(uncertainty)
    acc_dev = _accumulator_device(device, padded, channels)
    probs = torch.zeros((channels, *padded), dtype=torch.float32, device=acc_dev)
    norm = torch.zeros(padded, dtype=torch.float32, device=acc_dev)
    starts = list(itertools.product(*[tile_starts(n, p, step) for n, p in zip(padded, patch)]))
    # a single tile is not weighted (v1 does the same; the ratio would be the same up to rounding)
    weights = gaussian_weights(patch) if len(starts) > 1 else torch.ones(tuple(patch))
    weights, weights_acc = weights.to(device), weights.to(acc_dev)
    flips = mirror_sets(mirror_axes)
    run = compiled_forward(compile_backend) if compile else tile_forward
    img = img.to(device)
    t_start, t_net = time.perf_counter(), 0.0
    bar = tqdm(total=len(starts) * len(flips), desc=desc, unit="tile", delay=TILE_BAR_DELAY, mininterval=1.0,
               dynamic_ncols=True, leave=False, disable=desc is None, position=0)  # on the case bar's line, which
    # it hands back when it closes: no cursor moves (a log or a notebook would show them as `[A`)
    for b in range(0, len(starts), tile_batch):
        boxes = [tuple(slice(s, s + p) for s, p in zip(st, patch)) for st in starts[b:b + tile_batch]]
        x = tile_batch_input(img, boxes, tile_batch if compile else len(boxes))
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        out = torch.zeros((len(boxes), channels, *patch), device=device)
        synchronize(device)
        t0 = time.perf_counter()  # network: every mirroring of a batch (flips, forward, softmax), timed as one
        for flip in flips:
            dims = [d + 2 for d in flip]
            xi = x.flip(dims) if dims else x
            with autocast(device, dtype):
                y = run(net, xi, mode, level)
            y = torch.softmax(y[:len(boxes)].float(), 1)
            y = y.flip(dims) if dims else y
            out[:, :num_classes] += y
            if uncertainty:
                out[:, num_classes] += entropy(y, 1)
        synchronize(device)
        t_net += time.perf_counter() - t0
        out = out * (weights / len(flips))
        for box, o in zip(boxes, out.to(acc_dev)):
            probs[(slice(None),) + box] += o
            norm[box] += weights_acc
        bar.update(len(boxes) * len(flips))
    bar.close()
    probs /= norm
    synchronize(device)
    if timings is not None:  # network: forward passes of the mirrorings; sliding_window: tiling, weighting, sums
        timings["network"] = timings.get("network", 0.0) + t_net
        timings["sliding_window"] = timings.get("sliding_window", 0.0) + time.perf_counter() - t_start - t_net
        timings["tiles"] = timings.get("tiles", 0) + len(starts) * len(flips)
    return probs[crop]


def inference_choice(net, plans: dict, s: InferenceSettings) -> autotune.Choice:
    """Precision and layout of the forward passes: autotune's probe (cached) of this network at `tile_batch`
    tiles in the head mode, where `auto`; the network is put in the chosen layout."""
    device = next(net.parameters()).device
    choice = autotune.choose("infer", plans, s.tile_batch, device, s.precision, s.channels_last, s.head_mode)
    net.to(memory_format=torch.channels_last_3d if choice.channels_last else torch.contiguous_format)
    return choice


def announce(choice: autotune.Choice, log: Callable[[str], None] = print) -> None:
    """The choice and the probe's figures (and a warning for a slow explicit setting), before the first case."""
    log(f"precision and layout: {choice.summary()}")
    if choice.warning:
        log(choice.warning)


def lowres_axis(original_spacing, network_spacing) -> int | None:
    """The axis resampled with nearest neighbour on export: the coarsest of the original spacing if it is
    anisotropic (max/min > 3), else of the network's spacing if that is, else none (nnU-Net v1's rule)."""
    for sp in (original_spacing, network_spacing):
        if max(sp) / min(sp) > ANISO_THRESHOLD:
            return int(np.argmax(sp))
    return None


def resample_probabilities(probs: torch.Tensor, shape, spacing_from, spacing_to) -> torch.Tensor:
    """(C, D, H, W) probabilities to `shape`: linear, or linear in-plane and nearest along the coarse axis."""
    shape = [int(s) for s in shape]
    if list(probs.shape[1:]) == shape:
        return probs
    axis = lowres_axis(spacing_to, spacing_from)
    if axis is None:
        return F.interpolate(probs[None], size=shape, mode="trilinear", align_corners=False)[0]
    plane = [s for i, s in enumerate(shape) if i != axis]
    x = F.interpolate(probs.movedim(axis + 1, 0), size=plane, mode="bilinear", align_corners=False)  # slices first
    x = x.movedim(0, axis + 1)[None]  # (1, C, ...) with the coarse axis back in place
    return F.interpolate(x, size=shape, mode="nearest-exact")[0]  # round half up, as ndimage order 0


def uncertainty_maps(probs: torch.Tensor, mean_entropy: torch.Tensor) -> dict[str, torch.Tensor]:
    """uint8 percent maps of (C, ...) mean probabilities and the mean entropy (nats) of what was averaged:
    entropy of the mean and spread (mutual information), both as % of ln C, and the predicted class's probability."""
    p = probs / probs.sum(0, keepdim=True).clamp_min(1e-12)
    total, per_nat = entropy(p), 1.0 / math.log(p.shape[0])

    def pct(fraction: torch.Tensor) -> torch.Tensor:
        return fraction.mul(100.0).round_().clamp_(0, 100).to(torch.uint8)

    return {"entropy": pct(total * per_nat), "spread": pct((total - mean_entropy).clamp_min(0) * per_nat),
            "confidence": pct(p.max(0).values)}


def _paste(seg: np.ndarray, props: dict, geom: Geometry, fill: int = 0) -> np.ndarray:
    """A (z, y, x) array of the cropped, transposed network frame back in the full image: transpose undone, pasted
    into its crop box, `fill` around it."""
    full = np.full(geom.shape, fill, np.uint8)
    full[tuple(slice(a, b) for a, b in props["crop_box"])] = np.transpose(seg, np.argsort(props["transpose_forward"]))
    return full


def export(probs: torch.Tensor, props: dict, out_path: str | Path, save_probabilities: bool = False,
           maps_to: PredLayout | None = None) -> Path:
    """Segmentation of (C, D, H, W) probabilities in the input's space: resample, argmax, undo transpose and
    crop, write uint8 NIfTI. `maps_to`: `probs` holds the mean-entropy channel last (`sliding_window(uncertainty=
    True)`); the case's uncertainty maps are written into that folder first (the segmentation last: it marks the
    case complete)."""
    geom = props["geometry"] if isinstance(props["geometry"], Geometry) else Geometry.from_dict(props["geometry"])
    probs = resample_probabilities(probs.float(), props["shape_after_crop"], props["target_spacing"],
                                   props["spacing_transposed"])
    if maps_to is not None:
        probs, mean_entropy = probs[:-1], probs[-1]
        case = case_of_file(out_path)
        for kind, m in uncertainty_maps(probs, mean_entropy).items():
            write_image(maps_to.uncertainty(case, kind), _paste(m.cpu().numpy(), props, geom,
                                                                100 if kind == "confidence" else 0), geom)
    back = np.argsort(props["transpose_forward"])
    write_image(out_path, _paste(probs.argmax(0).to(torch.uint8).cpu().numpy(), props, geom), geom)
    if save_probabilities:
        p = np.transpose(probs.half().cpu().numpy(), [0] + [1 + int(i) for i in back])
        with atomic_path(probabilities_path(out_path)) as tmp:
            with open(tmp, "wb") as f:
                np.savez_compressed(f, probabilities=p, crop_box=np.array(props["crop_box"]))
    return Path(out_path)


def load_model(model_dir: str | Path, which: str = "final", device: str | torch.device = "cpu"):
    """(network in eval mode, plans) from a trained fold folder alone: its checkpoint and the plans beside it."""
    fold = FoldLayout(model_dir)
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    if not fold.plans.is_file():
        raise FileNotFoundError(f"{fold.plans} not found: training writes it beside the checkpoints; for a fold "
                                f"trained before it did, copy the run's preprocessed/plans.json there")
    plans = read_json(fold.plans)
    state, meta = checkpoint.load(fold.root, which, map_location=dev)
    checkpoint.check_plans(fold.root, which, meta, plans)
    net = build_model(plans).to(dev)
    load_weights(net, state["model"], f"{fold.root} ({which} checkpoint)")
    return net.eval(), plans


def segment_image(path: str | Path, models: list, settings: InferenceSettings, timings: dict,
                  reader: Callable[[str | Path], tuple] = read_image, desc: str | None = None) -> tuple:
    """(class probabilities (C, z, y, x) at network spacing, properties) of one raw NIfTI: read (`reader`: array,
    Geometry), preprocess, the models' mean softmax; stage seconds are added to `timings`; `desc` names the
    tile bar of a slow case."""
    s, plans = settings, models[0][1]
    choices = [inference_choice(net, p, s) for net, p in models]  # cached after the first case: a file read
    t0 = time.perf_counter()
    img, geom = reader(path)
    timings["read"] = timings.get("read", 0.0) + time.perf_counter() - t0
    t0 = time.perf_counter()
    arr, _, props = preprocess_arrays(img, None, geom.spacing, plans)
    props["geometry"] = geom
    timings["preprocess"] = timings.get("preprocess", 0.0) + time.perf_counter() - t0
    x, total = torch.from_numpy(arr)[None], None
    for (net, p), choice in zip(models, choices):
        probs = sliding_window(net, x, p["patch_size"], p["num_classes"], s.step_size, s.mirror_axes,
                               s.head_mode, s.pruned_level, s.tile_batch, dtype=choice.dtype, timings=timings,
                               compile=s.compile, channels_last=choice.channels_last, desc=desc,
                               uncertainty=s.save_uncertainty)
        total = probs if total is None else total + probs
    return total / len(models), props


def predict(images: list[str | Path], model_dirs: list[str | Path], out_dir: str | Path,
            settings: InferenceSettings = InferenceSettings()) -> list[dict]:
    """Segment raw NIfTI images with one fold or the average of several folds' probabilities."""
    s = settings
    models = [load_model(d, s.checkpoint, s.device) for d in model_dirs]
    announce(inference_choice(*models[0], s))
    records = []
    for path in progress(list(images), "predict"):
        t = defaultdict(float)
        probs, props = segment_image(path, models, s, t, desc=f"{prediction_name(path)} tiles")
        t0 = time.perf_counter()
        name = prediction_name(path)
        export(probs, props, Path(out_dir) / name, s.save_probabilities,
               PredLayout(out_dir) if s.save_uncertainty else None)
        t["export_write"] = time.perf_counter() - t0
        records.append({"image": str(path), "prediction": str(Path(out_dir) / name), **{k: round(v, 4) for k, v in t.items()}})
    return records
