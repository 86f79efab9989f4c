"""`precision: auto` and `channels_last: auto`, measured where the kit runs: a short probe of the real network.

A default chosen on one machine can be far off on another: bf16 autocast is 2x faster than fp32 on a CPU
with AVX-512 BF16 or AMX, and about 50-85x slower where bf16 is emulated (AVX2 CPUs: most laptops and many
servers). So `auto` is not a guess: `probe` times the plan's network at its patch and batch (training: SGD
steps; inference: tile forwards) in each allowed precision and memory layout and `pick` takes the fastest:

- fp32 is allowed everywhere;
- bf16 on a CPU only when the probe shows it faster (a one-convolution check first: where bf16 is emulated
  the full step is not run, it would take a minute);
- on CUDA and NPU fp16 (with the gradient scaler in training), as nnU-Net v1, unless its numerics check fails
  (non-finite or far-off outputs against fp32) or another precision is clearly faster.

A candidate must beat the default (fp32 channels-first on a CPU, fp16 channels-first on a GPU) by `MARGIN` to
be chosen, so timing noise does not flip the choice. The probe takes a few seconds, is bounded by a time
budget, and is cached per machine, torch version, device, threads and network (`cache_file`), so it runs once.
An explicit setting is kept, with a warning when the probe finds it `SLOW` (3x) or more slower than the best.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..core.device import autocast, cpu_flags, cpu_info, synchronize
from ..core.io import atomic_path
from .losses import head_weights
from .model import ARCHITECTURE, build_model, config_from_plans
from .step import train_step

MARGIN = 0.10  # a candidate replaces the default only when at least 10 % faster
SLOW = 3.0  # an explicit setting this many times slower than the best gets a warning
BUDGET_S = 20.0  # probe time budget per workload (candidates left when it is spent are not timed)
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
CODE = "autotune-1"  # part of the cache key: a change of the probe invalidates cached choices


@dataclass
class Choice:
    """What `auto` resolved to for one workload, and the probe behind it."""

    precision: str  # fp32 | bf16 | fp16
    channels_last: bool
    workload: str  # train | infer
    device: str
    rows: list = field(default_factory=list)  # one per candidate: precision, channels_last, seconds, note
    cpu: dict = field(default_factory=dict)
    probe_s: float = 0.0
    cached: bool = False
    warning: str = ""

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype (None: fp32)."""
        return DTYPES[self.precision]

    def seconds(self, precision: str, channels_last: bool) -> float | None:
        """The probe's seconds per step (or tile batch) of a setting; estimated for an emulated one."""
        row = next((r for r in self.rows if (r["precision"], r["channels_last"]) == (precision, channels_last)), None)
        return None if row is None else row.get("seconds", row.get("estimate_s"))

    def summary(self) -> str:
        """One line for the log: the choice, then each candidate's probe figure."""
        unit = "s/step" if self.workload == "train" else "s per tile batch"
        figures = ", ".join(_row_text(r) for r in self.rows)
        how = "cached probe" if self.cached else f"probe {self.probe_s:.1f} s" + (
            "" if complete(self.rows) else " (cut short by its time budget: not cached, the next run probes again)")
        bf16 = self.cpu.get("bf16") if self.cpu else None
        where = f"{self.device}" + (f" ({self.cpu.get('isa_summary')}, bf16 {bf16})" if self.cpu else "")
        return (f"{self.workload}: {setting_name(self.precision, self.channels_last)} on {where}; {how}, "
                f"{unit}: {figures}")

    def as_dict(self) -> dict:
        """JSON-ready record (training log, benchmark.json)."""
        return {**asdict(self), "summary": self.summary()}


def setting_name(precision: str, channels_last: bool) -> str:
    """`fp32 + channels-first`."""
    return f"{precision} + {'channels-last' if channels_last else 'channels-first'}"


def _row_text(row: dict) -> str:
    """`fp32/CL 0.99` or `bf16/CF ~50 (emulated)` or `fp16/CF not timed (budget)`."""
    name = f"{row['precision']}/{'CL' if row['channels_last'] else 'CF'}"
    if "seconds" in row:
        text = f"{name} {row['seconds']:.3g}"
    elif "estimate_s" in row:
        text = f"{name} ~{row['estimate_s']:.3g}"
    else:
        text = f"{name} not timed"
    return text + (f" ({row['note']})" if row.get("note") else "")


# ----------------------------------------------------------------------------- the machine
def machine_key(device: torch.device) -> dict:
    """What the probe's figures depend on besides the network: CPU, its caps and threads, or the card; torch."""
    model, flags = cpu_flags()
    key = {"torch": torch.__version__, "device": device.type, "threads": torch.get_num_threads(),
           "cpu": model, "flags": hashlib.sha1(" ".join(sorted(flags)).encode()).hexdigest()[:12],
           "aten": torch.backends.cpu.get_cpu_capability(), "onednn": os.environ.get("ONEDNN_MAX_CPU_ISA", "")}
    if device.type == "cuda":
        key["card"] = torch.cuda.get_device_name(device)
    elif device.type == "npu":
        key["card"] = torch.npu.get_device_name(device)  # type: ignore[attr-defined]
    return key


def cache_file() -> Path:
    """Where probe results are kept: $XDG_CACHE_HOME (or ~/.cache)/unetpp-liver-kit/autotune.json."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "unetpp-liver-kit" / "autotune.json"


def _load_cache(path: Path) -> dict:
    """The cache's entries ({} when missing or unreadable: it is only a cache)."""
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _store(path: Path, key: str, entry: dict) -> None:
    """Add one entry to the cache (written whole under a temporary name, then renamed)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {**_load_cache(path), key: entry}
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(data, indent=1))
    except OSError:
        pass  # a read-only home: the probe simply runs again next time


# ----------------------------------------------------------------------------- the probe
def candidates(device: torch.device) -> list[tuple[str, bool]]:
    """(precision, channels_last) settings allowed on this device, the default first."""
    if device.type == "cpu":
        precisions = ["fp32", "bf16"]
    else:
        bf16 = device.type != "cuda" or torch.cuda.is_bf16_supported()
        precisions = ["fp16"] + (["bf16"] if bf16 else []) + ["fp32"]
    return [(p, cl) for p in precisions for cl in (False, True)]


def _workload(kind: str, plans: dict, batch: int, device: torch.device, mode: str) -> Callable:
    """A function (precision, channels_last) -> (callable running one step or tile batch, output for numerics)."""
    patch = [int(p) for p in plans["patch_size"]]

    def make(precision: str, channels_last: bool):
        torch.manual_seed(0)
        fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
        net = build_model(plans).to(device).to(memory_format=fmt)
        x = torch.randn(batch, plans["num_input_channels"], *patch, generator=torch.Generator().manual_seed(1))
        x = x.to(device).contiguous(memory_format=fmt)
        dtype = DTYPES[precision]

        def outputs() -> torch.Tensor:
            net.eval()
            with torch.no_grad(), autocast(device, dtype):
                out = net(x, mode=mode) if kind == "infer" else net(x)[-1]
            return torch.softmax(out.float(), 1)

        if kind == "infer":
            net.eval()

            def step() -> None:
                with torch.no_grad(), autocast(device, dtype):
                    net(x, mode=mode)
        else:
            y = torch.randint(0, plans["num_classes"], (batch, *patch), generator=torch.Generator().manual_seed(2))
            y = y.to(device)
            opt = torch.optim.SGD(net.parameters(), lr=1e-4, momentum=0.99, nesterov=True)
            scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
            weights = head_weights(net.cfg.depth)

            def step() -> None:
                net.train()
                train_step(net, opt, scaler, x, y, weights, 12.0, dtype)
        return step, outputs
    return make


def _time(step: Callable, device: torch.device, repeats: int, deadline: float) -> tuple[float, float, int]:
    """(first call's seconds, median seconds of up to `repeats` further calls, calls timed) before `deadline`."""
    times = []
    for _ in range(repeats + 1):
        synchronize(device)
        t0 = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - t0)
        if time.perf_counter() > deadline and len(times) >= 2:
            break
    rest = sorted(times[1:]) or times
    return times[0], rest[len(rest) // 2], len(times) - 1


def probe(kind: str, plans: dict, batch: int, device: torch.device, mode: str = "deepest",
          budget_s: float = BUDGET_S, repeats: int = 3) -> dict:
    """Time every allowed setting on the plan's network (`kind` train: SGD steps of `batch`; infer: forward
    passes of `batch` tiles in head `mode`) within `budget_s`; rows with seconds, numerics and notes."""
    t_start = time.perf_counter()
    deadline = t_start + budget_s
    cpu = cpu_info() if device.type == "cpu" else {}
    make = _workload(kind, plans, batch, device, mode)
    rows, reference = [], None
    for precision, cl in candidates(device):
        row: dict = {"precision": precision, "channels_last": cl}
        rows.append(row)
        if precision == "bf16" and cpu.get("bf16") == "emulated":
            fp32 = next((r.get("seconds") for r in rows if r["precision"] == "fp32" and r["channels_last"] == cl), None)
            row["note"] = f"emulated: a bf16 convolution is {cpu['bf16_conv_vs_fp32']:.0f}x slower than fp32"
            if fp32:
                row["estimate_s"] = round(fp32 * cpu["bf16_conv_vs_fp32"], 4)
            continue
        if rows[:-1] and time.perf_counter() > deadline:
            row["note"] = "budget spent"
            continue
        try:
            step, outputs = make(precision, cl)
            first, seconds, n = _time(step, device, repeats, deadline)
            probs = outputs()
        except RuntimeError as e:  # e.g. a kernel missing for this dtype on this device
            row["note"] = f"failed: {str(e).splitlines()[0][:120]}"
            continue
        if reference is None and precision == "fp32":
            reference = probs
        row.update(seconds=round(seconds, 5), first_s=round(first, 4), timed=n)
        if not torch.isfinite(probs).all():
            row["numerics"], row["note"] = "non-finite", "non-finite outputs"
        elif reference is not None and precision != "fp32":
            row["max_prob_diff_vs_fp32"] = round(float((probs - reference).abs().max()), 4)
        if precision != "fp32" and device.type != "cpu" and reference is None:
            row["numerics_pending"] = True  # fp32 comes last on a GPU: compared below
        row["_probs"] = probs
    for row in rows:  # low precisions timed before fp32 (GPUs) are compared with it now
        probs = row.pop("_probs", None)
        if row.pop("numerics_pending", False) and reference is not None and probs is not None:
            row["max_prob_diff_vs_fp32"] = round(float((probs - reference).abs().max()), 4)
    for row in rows:
        if row.get("max_prob_diff_vs_fp32", 0) > 0.25:  # random weights: a class flip of that size is not rounding
            row["numerics"], row["note"] = "off", "outputs far from fp32's"
    return {"rows": rows, "cpu": cpu, "probe_s": round(time.perf_counter() - t_start, 2)}


def complete(rows: list[dict]) -> bool:
    """Whether every allowed setting was timed, estimated (emulated) or failed, none left for lack of budget."""
    return all("seconds" in r or "estimate_s" in r or r.get("note", "").startswith("failed") for r in rows)


def pick(rows: list[dict], device: torch.device) -> tuple[str, bool]:
    """The default (fp32 on a CPU, fp16 on a GPU, channels-first) unless a timed setting with sound numerics is
    MARGIN faster."""
    default = candidates(device)[0]
    ok = [r for r in rows if "seconds" in r and "numerics" not in r]
    base = next((r for r in ok if (r["precision"], r["channels_last"]) == default), None)
    if base is None:  # the default could not run (or failed its numerics): the fastest that did
        best = min(ok, key=lambda r: r["seconds"], default={"precision": "fp32", "channels_last": False})
        return best["precision"], best["channels_last"]
    best = min(ok, key=lambda r: r["seconds"])
    if best["seconds"] < (1 - MARGIN) * base["seconds"]:
        return best["precision"], best["channels_last"]
    return default


def network_key(kind: str, plans: dict, batch: int, mode: str) -> dict:
    """What the probe's figures depend on in the network: its configuration, patch, batch, workload."""
    cfg = asdict(config_from_plans(plans))
    return {"kind": kind, "network": cfg, "architecture": ARCHITECTURE, "patch": list(plans["patch_size"]), "batch": batch,
            "mode": mode if kind == "infer" else None}


def choose(kind: str, plans: dict, batch: int, device: torch.device, precision: str = "auto",
           channels_last: bool | str = "auto", mode: str = "deepest", cache: Path | None = None,
           budget_s: float = BUDGET_S) -> Choice:
    """Resolve `auto` precision and layout for a workload (cached probe); explicit values are kept, with a
    warning when the probe finds them SLOW times or more slower than the best setting."""
    cache = cache or cache_file()
    key_dict = {"code": CODE, "machine": machine_key(device), **network_key(kind, plans, batch, mode)}
    key = hashlib.sha1(json.dumps(key_dict, sort_keys=True).encode()).hexdigest()[:16]
    entry = _load_cache(cache).get(key)
    cached = entry is not None
    if not cached:  # the caller's random streams are left as they were: a cached choice must not change a run
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            entry = probe(kind, plans, batch, device, mode, budget_s)
        if complete(entry["rows"]):  # a probe cut short (a busy machine) decides this run only: the next probes again
            _store(cache, key, {**entry, "key": key_dict, "when": time.strftime("%Y-%m-%d %H:%M:%S")})
    best_p, best_cl = pick(entry["rows"], device)
    p = best_p if precision == "auto" else precision
    cl = best_cl if channels_last == "auto" else bool(channels_last)
    choice = Choice(p, cl, kind, str(device), entry["rows"], entry["cpu"], entry["probe_s"], cached)
    chosen, best = choice.seconds(p, cl), choice.seconds(best_p, best_cl)
    if (precision, channels_last) != ("auto", "auto") and chosen and best and chosen >= SLOW * best:
        choice.warning = (f"warning: {setting_name(p, cl)} is about {chosen / best:.0f}x slower here than "
                          f"{setting_name(best_p, best_cl)} (the probe: {chosen:.3g} vs {best:.3g} s"
                          f"{'/step' if kind == 'train' else ' per tile batch'}"
                          f"{'; bf16 is emulated on this CPU' if p == 'bf16' and choice.cpu.get('bf16') == 'emulated' else ''}"
                          f"); set precision: auto and channels_last: auto to use the faster one")
    return choice
