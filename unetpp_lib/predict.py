"""Predict a folder of NIfTI images from the command line, as `nnUNet_predict -i IN -o OUT` does.

`python -m unetpp_lib.predict -i IMAGES_DIR -o OUT_DIR -m FOLD_DIR [FOLD_DIR ...]`: each fold folder
(a trained fold folder, copied anywhere on its own) brings its checkpoint and `plans.json`; several folds
predict as their ensemble (mean probabilities, as `infer.predict`). Post-processing is the one
decided in validation. Resumable: a case whose output is there is skipped (outputs are renamed
into place only when whole). Bad inputs stop the command with one line naming the file and the
fix, and exit status 2: names, headers (core/image_folder.py), folds and settings are checked before any
prediction; a damaged image (whose voxels ITK would read as zeros) when its turn comes, earlier cases kept.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from .core import currency
from .core.device import DeviceError, resolve_device
from .core.image_folder import NAMING_HELP, PredictError, check_image, list_cases
from .nn.checkpoint import PlansMismatch, check_plans
from .nn.infer import InferenceSettings, announce, export, inference_choice, load_model, segment_image
from .core.io import (discard, last_line, read_image, read_image_strict, read_json, remove_partials, write_image,
                      write_json)
from .core.layout import CHECKPOINT_KINDS, UNCERTAINTY_KINDS, FoldLayout, PredLayout, RunLayout, probabilities_path
from .evaluation.postprocess import apply_postprocessing

EXIT_BAD_INPUT = 2


# ----------------------------------------------------------------------------- the models
def check_fold(fold_dir: Path, which: str) -> dict:
    """The plans of a fold folder that holds a complete `which` checkpoint trained for them."""
    fold = FoldLayout(fold_dir)
    if not fold.root.is_dir():
        raise PredictError(f"{fold.root}: fold folder not found; pass -m a trained fold folder")
    if not fold.plans.is_file():
        raise PredictError(f"{fold.plans}: missing; a fold folder needs its plans.json (copy the run's "
                           f"preprocessed/plans.json there)")
    try:
        plans = read_json(fold.plans)
        plans["preprocessing_hash"]  # without it (or not a mapping) the plans are unreadable here
    except (ValueError, KeyError, TypeError) as e:
        raise PredictError(f"{fold.plans}: unreadable plans ({e!r}); copy the run's preprocessed/plans.json "
                           f"there") from None
    if not (fold.checkpoint(which).is_file() and fold.sidecar(which).is_file()):
        have = [k for k in CHECKPOINT_KINDS if fold.checkpoint(k).is_file() and fold.sidecar(k).is_file()]
        fix = f"pass --checkpoint {have[-1]}" if have else "train the fold first"
        raise PredictError(f"{fold.checkpoint(which)}: no complete {which} checkpoint (.pt + .json) in "
                           f"{fold.root}; {fix}")
    try:
        check_plans(fold.root, which, read_json(fold.sidecar(which)), plans)
    except PlansMismatch as e:
        raise PredictError(f"{e}; copy the fold's own plans.json back") from None
    except (ValueError, KeyError, TypeError) as e:
        raise PredictError(f"{fold.sidecar(which)}: unreadable checkpoint sidecar ({e!r}); copy the fold folder "
                           f"again") from None
    return plans


def load_models(fold_dirs: list[Path], s: InferenceSettings) -> list[tuple[torch.nn.Module, dict]]:
    """(network, plans) of each fold, or PredictError naming a checkpoint that does not load."""
    models = []
    for d in fold_dirs:
        try:
            models.append(load_model(d, s.checkpoint, s.device))
        except (RuntimeError, ValueError, OSError, KeyError) as e:  # torch's errors for a damaged .pt
            raise PredictError(f"{FoldLayout(d).checkpoint(s.checkpoint)}: does not load ({type(e).__name__}: "
                               f"{last_line(e)}); copy the fold folder again") from None
    return models


def check_folds(fold_dirs: list[Path], which: str) -> dict:
    """The plans shared by every fold (an ensemble needs the same preprocessing and classes)."""
    plans = [check_fold(d, which) for d in fold_dirs]
    for d, p in zip(fold_dirs[1:], plans[1:]):
        for key in ("preprocessing_hash", "num_classes", "num_input_channels"):
            if p.get(key) != plans[0].get(key):
                raise PredictError(f"{FoldLayout(d).plans}: {key} differs from {FoldLayout(fold_dirs[0]).plans}; "
                                   f"an ensemble needs folds of one run")
    if plans[0].get("num_input_channels", 1) != 1:
        raise PredictError(f"{FoldLayout(fold_dirs[0]).plans}: {plans[0]['num_input_channels']} input channels; "
                           f"this command predicts single-channel (CT) models")
    return plans[0]


def check_head(fold_dirs: list[Path], s: InferenceSettings) -> None:
    """A pruned level the networks have (1 .. the number of poolings of each fold's plans)."""
    if s.head_mode != "pruned" or s.pruned_level is None:
        return
    for d in fold_dirs:
        depth = len(read_json(FoldLayout(d).plans)["pool_op_kernel_sizes"])
        if not 1 <= s.pruned_level <= depth:
            raise PredictError(f"--pruned-level {s.pruned_level}: {FoldLayout(d).plans} has heads at levels "
                               f"1..{depth}; pick one of them")


def read_decision(path: Path) -> dict:
    """A post-processing decision file (`postprocessing.json` of 05_validate), checked."""
    try:
        decision = read_json(path)
        if isinstance(decision["lcc_all_foreground"], bool) and all(int(c) == c for c in decision["lcc_classes"]):
            return decision
    except (OSError, ValueError, KeyError, TypeError):
        pass
    raise PredictError(f"{path}: not a post-processing decision (lcc_all_foreground, lcc_classes); point at the "
                       f"postprocessing.json 05_validate wrote, or pass --no-postprocessing")


def postprocessing_decision(fold_dirs: list[Path]) -> tuple[dict | None, str]:
    """(decision, where it was read): one fold's validation decision, or for several folds the decision
    the run's test ensemble made on all their validation cases; (None, why) when there is none."""
    if len(fold_dirs) == 1:
        path = FoldLayout(fold_dirs[0]).validation.postprocessing
        return (read_decision(path), str(path)) if path.is_file() else (None, f"none ({path} not found)")
    resolved = {Path(d).resolve() for d in fold_dirs}
    parents = {d.parent for d in resolved}
    run = RunLayout(parents.pop()) if len(parents) == 1 else None
    if run is not None and run.test_ensemble.settings.is_file() and run.test_ensemble.postprocessing.is_file():
        folds = read_json(run.test_ensemble.settings).get("folds", [])
        if {run.fold(k).root for k in folds} == resolved:
            return read_decision(run.test_ensemble.postprocessing), str(run.test_ensemble.postprocessing)
    return None, ("none (no test_ensemble/postprocessing.json of these folds beside them: run 05_validate with all "
                  "of them, or pass --postprocessing-json)")


def choose_decision(fold_dirs: list[Path], enabled: bool, path: Path | None) -> tuple[dict | None, str]:
    """The decision to apply: none when turned off, the file named on the command line, else the validation's."""
    if not enabled:
        return None, "off (--no-postprocessing)"
    if path is not None:
        return read_decision(path), str(path)
    return postprocessing_decision(fold_dirs)


# ----------------------------------------------------------------------------- prediction
def settings_key(fold_dirs: list[Path], s: InferenceSettings, decision: dict | None) -> dict:
    """What the outputs depend on: models (epoch, save time, plans), sliding-window options, post-processing."""
    members = [{m: read_json(FoldLayout(d).sidecar(s.checkpoint)).get(m) for m in ("epoch", "saved", "plans_hash")}
               for d in fold_dirs]
    pp = {k: decision[k] for k in ("lcc_all_foreground", "lcc_classes")} if decision else None
    return {**s.key(), "members": members, "postprocessing": pp}


def _renew_settings(out: PredLayout, key: dict, fold_dirs: list[Path], overwrite: bool) -> None:
    """Record the settings in OUT_DIR/settings.json; predictions made with others are an error unless --overwrite."""
    if out.settings.is_file() and not overwrite:
        old = read_json(out.settings).get("key")
        if old != key:
            changed = currency.changed(old, key)
            raise PredictError(f"{out.settings}: {out.root} holds predictions made with other settings "
                               f"({', '.join(changed)}); pass --overwrite to redo them, or choose another -o")
    write_json(out.settings, {"key": key, "folds": [str(Path(d).resolve()) for d in fold_dirs]})


def _done(out: PredLayout, case: str, save_probabilities: bool, save_uncertainty: bool = False) -> bool:
    """An output renamed into place (hence whole), with its probabilities and uncertainty maps when asked for."""
    return (out.case(case).is_file() and (not save_probabilities or probabilities_path(out.case(case)).is_file())
            and (not save_uncertainty or all(out.uncertainty(case, k).is_file() for k in UNCERTAINTY_KINDS)))


def _read_checked(image: Path) -> tuple:
    """(voxels, Geometry), every voxel decompressed with length and CRC checks: ITK would read a truncated file
    as zeros. One read serves the check and the prediction."""
    try:
        return read_image_strict(image)
    except Exception as e:  # nibabel and gzip raise many kinds for a damaged file
        raise PredictError(f"{image}: truncated or corrupt NIfTI ({type(e).__name__}: {last_line(e)}); replace "
                           f"the file (cases before it are kept)") from None


@torch.no_grad()
def predict_case(image: Path, models: list, target: Path, s: InferenceSettings, decision: dict | None) -> dict:
    """Segment one image with the models' mean probabilities (as `infer.predict`), post-process, write
    `target` last; returns timings (s)."""
    t: dict = {}
    probs, props = segment_image(image, models, s, t, reader=_read_checked, desc=f"{target.name} tiles")
    t0 = time.perf_counter()
    staged = PredLayout(target.parent).staging / target.name  # final name only once whole and post-processed
    export(probs, props, staged, s.save_probabilities, PredLayout(target.parent) if s.save_uncertainty else None)
    if s.save_probabilities:
        os.replace(probabilities_path(staged), probabilities_path(target))
    if decision and (decision["lcc_all_foreground"] or decision["lcc_classes"]):
        seg, g = read_image(staged)
        write_image(target, apply_postprocessing(seg, decision), g)
        staged.unlink()
    else:
        os.replace(staged, target)
    t["export_write"] = time.perf_counter() - t0
    return {k: round(v, 4) for k, v in t.items()}


def _clear_staging(out: PredLayout) -> None:
    """Remove what a killed run left in the staging folder (only this command writes there)."""
    if out.staging.is_dir():
        remove_partials(out.staging)
        discard([*out.staging.glob("*.nii.gz"), *out.staging.glob("*.npz")])


def predict_folder(images_dir: Path, out_dir: Path, fold_dirs: list[Path], s: InferenceSettings,
                   postprocess: bool = True, overwrite: bool = False, decision_file: Path | None = None,
                   log=print) -> dict:
    """Check everything, then predict every case not yet done into `out_dir`; returns what was done."""
    images_dir, out_dir, fold_dirs = Path(images_dir), Path(out_dir), [Path(d) for d in fold_dirs]
    if out_dir.resolve() == images_dir.resolve():
        raise PredictError(f"{out_dir}: the output folder is the input folder; choose another -o")
    plans = check_folds(fold_dirs, s.checkpoint)
    check_head(fold_dirs, s)
    cases = list_cases(images_dir, plans.get("num_input_channels", 1))
    for path in cases.values():
        check_image(path)
    try:
        resolve_device(s.device)
    except DeviceError as e:
        raise PredictError(f"--device {s.device}: {e}") from None
    decision, source = choose_decision(fold_dirs, postprocess, decision_file)
    out = PredLayout(out_dir)
    _renew_settings(out, settings_key(fold_dirs, s, decision), fold_dirs, overwrite)
    todo = [c for c in cases if overwrite or not _done(out, c, s.save_probabilities, s.save_uncertainty)]
    log(f"{len(cases)} case(s) in {images_dir}: {len(cases) - len(todo)} already predicted, {len(todo)} to do; "
        f"{len(fold_dirs)} fold(s), checkpoint {s.checkpoint}; post-processing: {source}")
    _clear_staging(out)
    timings = read_json(out.timings) if out.timings.is_file() else {}
    if todo:
        models = load_models(fold_dirs, s)
        announce(inference_choice(*models[0], s), log)
        with tqdm(todo, desc="predict", unit="case", dynamic_ncols=True, file=sys.stderr) as bar:
            for case in bar:
                bar.set_postfix_str(case)
                timings[case] = predict_case(cases[case], models, out.case(case), s, decision)
                write_json(out.timings, timings)
    if out.staging.is_dir() and not any(out.staging.iterdir()):
        out.staging.rmdir()
    return {"cases": list(cases), "predicted": todo, "skipped": [c for c in cases if c not in todo],
            "postprocessing": source, "out_dir": str(out_dir)}


# ----------------------------------------------------------------------------- the command line
def build_parser() -> argparse.ArgumentParser:
    """The command's options, named as nnUNet_predict's where they exist."""
    ap = argparse.ArgumentParser(prog="python -m unetpp_lib.predict", epilog=NAMING_HELP,
                                 description="Segment every NIfTI image of a folder with one trained fold or the "
                                             "ensemble of several (mean probabilities).")
    ap.add_argument("-i", "--input", required=True, type=Path, metavar="IMAGES_DIR", help="folder of images")
    ap.add_argument("-o", "--output", required=True, type=Path, metavar="OUT_DIR", help="where segmentations go")
    ap.add_argument("-m", "--models", required=True, type=Path, nargs="+", metavar="FOLD_DIR",
                    help="trained fold folder(s) (checkpoints + plans.json); several: their ensemble")
    ap.add_argument("--checkpoint", "-chk", choices=CHECKPOINT_KINDS, default="final", help="default: final")
    ap.add_argument("--device", default="auto", help="auto (CUDA if present, else CPU), cpu, cuda[:N], npu[:N]")
    mirror = ap.add_mutually_exclusive_group()
    mirror.add_argument("--mirror-axes", type=int, nargs="*", choices=[0, 1, 2], default=[0, 1, 2], metavar="AXIS",
                        help="test-time mirroring axes, of the (z, y, x) array (default 0 1 2: all 8 flips)")
    mirror.add_argument("--disable-mirroring", "--disable-tta", action="store_true", help="no test-time mirroring")
    ap.add_argument("--head-mode", choices=("deepest", "average", "pruned"), default="deepest",
                    help="UNet++ output head(s): deepest (default), average of all, or pruned at --pruned-level")
    ap.add_argument("--pruned-level", type=int, default=None, help="level k of --head-mode pruned")
    ap.add_argument("--step-size", type=float, default=0.5, help="sliding-window step, fraction of the patch")
    ap.add_argument("--tile-batch", type=int, default=2, help="tiles per forward pass (speed and memory only)")
    ap.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                    help="autocast of the forward pass; auto (default): the fastest allowed here, measured by a "
                         "short probe cached per machine (fp32 or native bf16 on a CPU, fp16 on a GPU)")
    ap.add_argument("--channels-last", choices=("auto", "true", "false"), default="auto",
                    help="channels-last 3D memory layout; auto (default): measured by the same probe")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile the forward pass (speed only: the first case pays the compilation; "
                         "outputs made without it stay current)")
    ap.add_argument("--save-probabilities", action="store_true",
                    help="also write <case>.npz (float16 probabilities before post-processing)")
    ap.add_argument("--save-uncertainty", action="store_true",
                    help="also write OUT_DIR/uncertainty/<case>_{entropy,spread,confidence}.nii.gz: uint8 percent "
                         "0-100 in the image's geometry; entropy of the mean softmax and its spread over the "
                         "mirrorings, tiles and folds (mutual information), both as %% of ln(classes), and the "
                         "predicted class's mean probability")
    pp = ap.add_mutually_exclusive_group()
    pp.add_argument("--no-postprocessing", action="store_true",
                    help="skip the largest-component post-processing decided in validation (by default read from "
                         "FOLD_DIR/validation/postprocessing.json; for several folds from the run's "
                         "test_ensemble/postprocessing.json, when the folds sit in that run folder)")
    pp.add_argument("--postprocessing-json", type=Path, default=None, metavar="FILE",
                    help="apply this decision instead (e.g. a copied test_ensemble/postprocessing.json)")
    ap.add_argument("--overwrite", action="store_true", help="predict again cases whose output exists")
    return ap


def settings_from(args: argparse.Namespace) -> InferenceSettings:
    """InferenceSettings from parsed options (PredictError for a value out of range)."""
    if not 0 < args.step_size <= 1:
        raise PredictError(f"--step-size {args.step_size}: use a fraction of the patch in (0, 1], e.g. 0.5")
    if args.tile_batch < 1:
        raise PredictError(f"--tile-batch {args.tile_batch}: use 1 or more")
    axes = () if args.disable_mirroring else tuple(sorted(set(args.mirror_axes)))
    return InferenceSettings(checkpoint=args.checkpoint, device=args.device, step_size=args.step_size,
                             mirror_axes=axes, head_mode=args.head_mode, pruned_level=args.pruned_level,
                             tile_batch=args.tile_batch, save_probabilities=args.save_probabilities,
                             save_uncertainty=args.save_uncertainty,
                             compile=args.compile, precision=args.precision,
                             channels_last={"true": True, "false": False}.get(args.channels_last, "auto"))


def main(argv: list[str] | None = None) -> int:
    """Run the command; exit status 0, or 2 with one line on stderr for an input it cannot predict."""
    args = build_parser().parse_args(argv)
    try:
        res = predict_folder(args.input, args.output, args.models, settings_from(args),
                             postprocess=not args.no_postprocessing, overwrite=args.overwrite,
                             decision_file=args.postprocessing_json, log=lambda msg: print(msg, file=sys.stderr))
    except PredictError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"{len(res['predicted'])} predicted, {len(res['skipped'])} skipped (already there) -> {res['out_dir']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
