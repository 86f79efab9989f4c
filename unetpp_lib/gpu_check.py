"""The GPU check in one command: every Task03-scale figure the kit needs from one GPU, inside a time budget.

    python -m unetpp_lib.gpu_check --out DIR [--params params/gpu_check.yaml] [--set key=value ...]

Sections, run in order of importance, each capped (`caps`, seconds) and all inside `budget_s`:
facts (nvidia-smi, versions, measured matmul peaks), training (the Task03 plan's eager grid),
original_training (nnU-Net v1.6.4's trainer with the fork's UNet++, its loader and augmentation on CPU
processes, in its own interpreter: `original_python`, `original_path`), inference (a two-tile probe eager and
compiled, the compiled one in a child process killed at its cap, then one median case, 8 mirrorings, with the
faster), original_inference (v1's predict_3D on the same case shape), training_compile (torch.compile
configurations, each in a child process killed at its cap), data_pipeline (loader workers on a synthetic store
of Task03 size + augmentation on the device, and how long a training step waits for its batch), profile (top
operators of a training step and of inference) and pytest_gpu (`pytest -m gpu`); candidates (speed-ups for
the norm, their rounding against PyTorch's kernel and their speed) runs only when `sections` names it. The
report starts with the kit against the original: samples/s, seconds per median case and their ratios. A
section that would not fit, or is not in `sections`, is recorded as skipped with the reason. gpu_check.json
and gpu_check.md are rewritten after every section, so a run killed from outside still leaves what it measured.
At most 7 files land in DIR (the scratch store lives in a temp folder and is deleted).

This module is the command line, the settings, the budget and the report; the sections themselves are
unetpp_lib/perf/gpu_sections.py. `--set` may be repeated and takes several KEY=VALUE each; the later value wins.
One section alone, e.g.: --set "sections=[facts, inference]" "caps={inference: 400}" budget_s=420
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

from . import plan
from .perf import timing
from .perf.gpu_sections import SECTIONS, Section, infer_variant
from .perf.candidates import worst_norm_ratio
from .perf.vs_original import comparison
from .core import params as P
from .core.io import atomic_path, write_json

FILES = {"json": "gpu_check.json", "md": "gpu_check.md", "log": "gpu_check.log", "smi": "nvidia_smi.txt",
         "pytest": "pytest_gpu.log", "profile_train": "profile_train.txt", "profile_infer": "profile_infer.txt"}
ORDER = ("facts", "training", "original_training", "inference", "original_inference", "training_compile",
         "data_pipeline", "profile", "pytest_gpu", "candidates")
# the default run: everything but the speed-up candidates, which have a run of their own (docs/gpu.md)
DEFAULT_SECTIONS = tuple(n for n in ORDER if n != "candidates")


@dataclass
class CheckSettings:
    """What the check measures and how long each section may take; defaults are the real thing on one GPU."""

    device: str = "auto"
    budget_s: float = 470.0  # whole check, seconds (the command's own timeout sits above it)
    caps: dict = field(default_factory=lambda: {
        "facts": 40, "training": 60, "original_training": 110, "inference": 210, "original_inference": 200,
        "training_compile": 150, "data_pipeline": 110, "profile": 45, "pytest_gpu": 60, "candidates": 150})
    plan_overrides: dict = field(default_factory=dict)  # on plan.task03_plans(); the dry run shrinks it
    matmul_n: int = 8192
    precisions: list = field(default_factory=lambda: ["fp16", "bf16"])  # Task03's configuration first
    channels_last: list = field(default_factory=lambda: [False])  # channels-last: 5.4 vs 8.0 samples/s on an H200
    compile: list = field(default_factory=lambda: [False, True])
    compile_backend: str = "inductor"
    compile_config_cap_s: float = 150.0  # one compiled child: compilation + warm-up + timed steps (or the probe)
    warmup: int = 2
    steps: int = 12
    sections: list = field(default_factory=lambda: list(DEFAULT_SECTIONS))  # the sections to run (others: skipped)
    inference_shape: list = field(default_factory=lambda: [482, 512, 512])
    inference_compile: list = field(default_factory=lambda: [False, True])  # probe eager and/or compiled
    mirror_axes: list = field(default_factory=lambda: [0, 1, 2])
    tile_batch: int = 2
    pipeline_cases: int = 3
    pipeline_case_shape: list = field(default_factory=lambda: [482, 512, 512])
    pipeline_batches: int = 40
    pipeline_workers: int = 0  # 0: os.cpu_count()
    fed_steps: int = 20
    profile_steps: int = 3
    profile_infer_shape: list = field(default_factory=lambda: [192, 192, 192])
    profile_rows: int = 30
    pytest_args: list = field(default_factory=lambda: ["-m", "gpu", "-q", "tests"])
    scratch_dir: str = ""  # where the data pipeline's store is built and deleted ("": the system's temp folder)
    original_python: str = ""  # nnU-Net v1.6.4's interpreter ("": the check's own, with original_path first)
    original_path: str = ""  # folder with v1.6.4 and its packages (pip install --target), first on its PYTHONPATH
    original_workers: int = 0  # v1's augmentation processes (0: its default, 12, or nnUNet_n_proc_DA)
    original_warmup: int = 10  # iterations before timing: queues filled, cuDNN's search done
    original_steps: int = 50  # timed iterations of v1's trainer
    original_all_in_gpu: bool = False  # v1's predict default for 3d_fullres: softmax aggregated on the host
    candidates: list = field(default_factory=lambda: ["stats_fused", "stats_centred", "stats_fp32"])  # norm candidates


def load_settings(path: str | Path | None, overrides: list[str]) -> CheckSettings:
    """Settings from defaults < YAML file < `key=value` overrides; unknown keys and wrong types raise."""
    values = {**(P.read_yaml(path) if path else {}), **P.parse_set(overrides, schema=False)}
    P.check_fields(CheckSettings, values, "gpu_check setting")
    unknown = [n for n in values.get("sections", []) if n not in ORDER]
    if unknown:
        raise ValueError(f"gpu_check setting 'sections': unknown {unknown} (sections: {', '.join(ORDER)})")
    if "caps" in values:
        values["caps"] = {**CheckSettings().caps, **values["caps"]}
    return CheckSettings(**values)


# ----------------------------------------------------------------------------- bookkeeping
def check_plans(s: CheckSettings) -> dict:
    """The Task03 plan, shrunk by `plan_overrides` for a dry run."""
    plans = plan.task03_plans()
    return plan.apply_overrides(plans, s.plan_overrides) if s.plan_overrides else plans


class Check:
    """The results so far, the clock, the progress log; writes DIR's JSON and Markdown after every section."""

    def __init__(self, out: Path, settings: CheckSettings):
        self.out, self.s, self.t0 = out, settings, time.monotonic()
        self.plans = check_plans(settings)
        self.out.mkdir(parents=True, exist_ok=True)
        (out / FILES["log"]).write_text("")
        self.result: dict = {"settings": asdict(settings), "sections": {}}

    def left(self) -> float:
        """Seconds of the budget left."""
        return self.s.budget_s - (time.monotonic() - self.t0)

    def say(self, msg: str) -> None:
        """Progress line to stdout and gpu_check.log."""
        line = f"[{time.monotonic() - self.t0:6.1f} s | {max(self.left(), 0):5.0f} s left] {msg}"
        print(line, flush=True)
        with open(self.out / FILES["log"], "a") as f:
            f.write(line + "\n")

    def text(self, key: str, body: str) -> None:
        """Write one of DIR's text files atomically."""
        with atomic_path(self.out / FILES[key]) as tmp:
            tmp.write_text(body)

    def save(self) -> None:
        """gpu_check.json and gpu_check.md as they stand."""
        self.result["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        self.result["comparison"] = comparison(self.result["sections"])
        write_json(self.out / FILES["json"], self.result)
        self.text("md", markdown(self.result))

    def section(self, name: str, fn: Section) -> None:
        """Run one section within min(its cap, the budget left); record its figures, or why it was skipped/failed."""
        cap = min(float(self.s.caps.get(name, 60)), self.left())
        rest = [n for n in ORDER[ORDER.index(name) + 1:] if n in self.s.sections]
        self.say(f"== {name}: cap {cap:.0f} s (then: {', '.join(rest) or 'done'})")
        t0, rec = time.monotonic(), {"status": "running"}
        self.result["sections"][name] = rec  # filled as the section goes: figures measured before a failure stay
        self.save()
        if cap < 5:
            rec.update(status="skipped", reason=f"budget spent: {self.left():.0f} s of {self.s.budget_s:.0f} s left")
        else:
            try:
                rec.update({"status": "ok", **(fn(self, time.monotonic() + cap, rec) or {})})
            except Exception as e:  # a failing section must not cost the others
                rec.update(status="error", reason=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-3000:])
            except BaseException:  # SIGTERM (`timeout`) or Ctrl-C: record where it stopped, then stop
                rec.update(status="killed", reason="stopped from outside", seconds=round(time.monotonic() - t0, 2))
                self.save()
                raise
        rec["seconds"] = round(time.monotonic() - t0, 2)
        self.save()
        self.say(f"   {name}: {rec['status']} in {rec['seconds']} s" + (f" ({rec['reason']})" if "reason" in rec else ""))


# ----------------------------------------------------------------------------- report
def _cell(v) -> str:
    """One Markdown table cell: blank for None, one line, pipes escaped, at most 300 characters."""
    return "" if v is None else str(v).replace("\n", " ").replace("|", "\\|")[:300]


def _table(rows: list[dict], cols: list[str]) -> str:
    """A Markdown table of `cols` from `rows` (missing values blank)."""
    lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    lines += ["| " + " | ".join(_cell(r.get(k)) for k in cols) + " |" for r in rows]
    return "\n".join(lines)


def markdown(result: dict) -> str:
    """gpu_check.md: the sections' status, then one table per measurement."""
    sec = result["sections"]
    out = [f"# GPU check: {result.get('device', '?')}", ""]
    vs = result.get("comparison", {})
    if vs:
        rows = [{"measure": "training, samples/s", **{k.replace("samples_per_s", "figure"): v for k, v in
                                                       vs["training"].items()}}] if "training" in vs else []
        rows += [{"measure": "one median case, s", **{k.replace("case_s", "figure"): v for k, v in
                                                       vs["inference"].items()}}] if "inference" in vs else []
        out += ["## Kit vs original (nnU-Net v1.6.4 + the fork's UNet++), same run, same card", "",
                _table(rows, ["measure", "kit_figure", "original_figure", "ratio", "target_ratio", "meets_target",
                              "moonshot_figure", "moonshot_distance"]), "",
                _table([{"side": f"{r['measure']}: {side}", "configuration": r.get(f"{side}_config")}
                        for r in rows for side in ("kit", "original")], ["side", "configuration"]), ""]
    out += [_table([{"section": k, **v} for k, v in sec.items()], ["section", "status", "seconds", "reason"])]
    if "facts" in sec and sec["facts"]["status"] == "ok":
        f = sec["facts"]
        keys = ("device", "gpu_memory_gb", "capability", "torch", "cuda", "cudnn", "python", "cpu_count", "nvidia_smi")
        out += ["", "## Machine", "", _table([{"fact": k, "value": f.get(k)} for k in keys], ["fact", "value"]),
                "", "## Matmul peaks (measured)", "",
                _table([{"precision": k, **v} for k, v in f.get("peaks", {}).items()],
                       ["precision", "n", "measured_tflops", "datasheet_tflops"])]
    rows = [r for k in ("training", "training_compile") for r in sec.get(k, {}).get("configs", [])]
    if rows:
        out += ["", "## Training step (Task03 plan)", "", _table(rows, [
            "precision", "channels_last", "compile", "samples_per_s", "step_s_p10", "step_s_p50", "step_s_p90",
            "peak_memory_gb", "achieved_tflops", "mfu_measured_peak", "mfu_datasheet", "compile_s", "skipped"])]
    inf = sec.get("inference", {})
    if inf.get("probes"):
        out += ["", f"## Inference probe: two tiles, every mirroring ({inf.get('tile_passes')} tile passes a case)", "",
                _table([{"variant": k, **v} for k, v in inf["probes"].items()], [
                    "variant", "per_tile_ms", "tiles_per_s", "first_call_s", "warmup_s", "compile_s", "estimate_s",
                    "peak_memory_gb", "child_wall_s", "skipped"])]
    if "case" in inf:
        keys = ("shape", "compile", "mirrorings", "tile_batch", "tiles", "first_call_s", "network", "sliding_window",
                "export_argmax", "export_write", "predict_total", "tiles_per_s", "peak_memory_gb")
        out += ["", f"## Inference, one median case (s), {inf.get('chosen')}", "",
                _table([{"stage": k, "value": inf["case"].get(k)} for k in keys if k in inf["case"]], ["stage", "value"])]
    for key, title in (("original_training", "Original: v1.6.4 trainer"), ("original_inference", "Original: predict_3D")):
        v1 = {k: v for k, v in sec.get(key, {}).get("v1", {}).items() if k != "output_tail"}
        if v1:
            out += ["", f"## {title}", "", _table([{"measure": k, "value": v} for k, v in v1.items()], ["measure", "value"])]
    dp = sec.get("data_pipeline", {})
    flat = {f"{part} {k}": v for part in ("store", "loader", "fed_training") for k, v in dp.get(part, {}).items()
            if k != "cases"}
    if flat:
        out += ["", "## Data pipeline", "", _table([{"measure": k, "value": v} for k, v in flat.items()], ["measure", "value"])]
    for part in ("train", "inference"):
        ops = sec.get("profile", {}).get(part, {}).get("top_operators", [])[:10]
        if ops:
            out += ["", f"## Profile, {part}: top operators", "", _table(ops, ["name", "calls", "self_ms", "share"])]
    cand = sec.get("candidates", {})
    if cand.get("speed"):
        rows = [{"candidate": k, **v, "network_rounding_x": cand["network_rounding"].get(k, {}).get("max_ratio_to_instance"),
                 "norm_rounding_x_worst": worst_norm_ratio(cand, k)} for k, v in cand["speed"].items()]
        out += ["", f"## Speed-up candidates ({cand['precision']}; rounding as a multiple of PyTorch's kernel's)", "",
                _table(rows, ["candidate", "samples_per_s", "step_speedup", "tile_forward_s", "tile_speedup",
                              "network_rounding_x", "norm_rounding_x_worst", "adoptable", "skipped"])]
    if "summary" in sec.get("pytest_gpu", {}):
        out += ["", "## GPU tests", "", f"`{sec['pytest_gpu']['summary']}` (exit code {sec['pytest_gpu']['exit_code']})"]
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------- command line
def run_check(out: str | Path, settings: CheckSettings) -> dict:
    """Every section in ORDER within the budget; returns (and has written) gpu_check.json's content."""
    c = Check(Path(out), settings)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout`: clean up (scratch, children) on the way out
    c.say(f"GPU check into {c.out}: budget {settings.budget_s:.0f} s, sections {', '.join(settings.sections)}")
    c.save()
    for name in ORDER:
        if name in settings.sections:
            c.section(name, SECTIONS[name])
        else:
            c.result["sections"][name] = {"status": "skipped", "reason": "not in `sections`", "seconds": 0.0}
    c.save()  # the sections skipped after the last one that ran
    c.say(f"done: {c.out / FILES['json']}, {c.out / FILES['md']}")
    return c.result


def train_one(job: dict) -> None:
    """Child of the training_compile section: one compiled configuration, printed as a RESULT line."""
    r = timing.train_throughput(job["plans"], job["device"], None, job["precision"], job["channels_last"], True,
                                   job["warmup"], job["steps"], job["backend"])
    print("RESULT " + json.dumps(r), flush=True)


def infer_probe(job: dict) -> None:
    """Child of the inference section: the compiled probe, printed as a RESULT line."""
    torch.backends.cudnn.benchmark = job["cudnn_benchmark"]  # as in the parent, which probes eager
    print("RESULT " + json.dumps(infer_variant(job["plans"], SimpleNamespace(**job["settings"]), True)), flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    ap = argparse.ArgumentParser(prog="python -m unetpp_lib.gpu_check", description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="folder for the results (at most 7 files)")
    ap.add_argument("--params", help="YAML settings (e.g. params/gpu_check.yaml)")
    # extend, as run_all.py does: `--set a=1 --set b=2` keeps both (a plain nargs option kept only the last)
    ap.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                    help="override settings; may be repeated, the later value wins")
    ap.add_argument("--train-one", help=argparse.SUPPRESS)
    ap.add_argument("--infer-probe", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if not (args.out or args.train_one or args.infer_probe):
        ap.error("--out DIR is required")
    return args


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the check (or one compiled configuration, for the check itself)."""
    args = parse_args(argv)
    if args.train_one or args.infer_probe:
        (train_one if args.train_one else infer_probe)(json.loads(args.train_one or args.infer_probe))
        return 0
    run_check(args.out, load_settings(args.params, args.set))
    return 0


if __name__ == "__main__":
    sys.exit(main())
