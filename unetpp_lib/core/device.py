"""Compute devices: CPU, CUDA and Ascend NPU (torch_npu imported only when asked for), and the CPU's instruction sets."""
from __future__ import annotations

import importlib
import os
import platform
import time
from contextlib import nullcontext
from pathlib import Path

import torch

EMULATED = 3.0  # a bf16 convolution this many times slower than fp32: bf16 is emulated on this CPU


class DeviceError(RuntimeError):
    """The requested device is not usable on this machine."""


def _import_torch_npu() -> None:
    """Import torch_npu, which registers the `npu` device with torch, or explain how to get it."""
    try:
        importlib.import_module("torch_npu")
    except Exception as e:  # ImportError, or CANN libraries missing at load time
        raise DeviceError(
            f"device 'npu' needs torch_npu {torch.__version__.split('+')[0]} and Ascend CANN: "
            f"install CANN, then `pip install -e .[npu]` ({type(e).__name__}: {e})") from e


def resolve_device(name: str = "auto") -> torch.device:
    """Map `auto`/`cpu`/`cuda`/`cuda:N`/`npu`/`npu:N` to a usable torch.device.

    `auto` picks CUDA when present, else the CPU; it never imports torch_npu, because a
    torch_npu installed without CANN breaks `import torch` itself.
    """
    kind = name.split(":")[0]
    if kind == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cpu":
        return torch.device("cpu")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {name!r} asked for but torch sees no CUDA GPU "
                              f"(torch {torch.__version__}); use device: cpu or auto")
        return torch.device(name)
    if kind == "npu":
        _import_torch_npu()
        if not torch.npu.is_available():  # type: ignore[attr-defined]
            raise DeviceError(f"device {name!r}: torch_npu is installed but sees no NPU")
        return torch.device(name)
    raise DeviceError(f"unknown device {name!r}: use auto, cpu, cuda[:N] or npu[:N]")


def autocast(device: torch.device | str, dtype: torch.dtype | None):
    """torch.autocast on `device`'s type in `dtype`, or no context at all for fp32 (`dtype` None)."""
    kind = device if isinstance(device, str) else device.type
    return torch.autocast(kind, dtype=dtype) if dtype else nullcontext()


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """`auto`: fp16 (with a gradient scaler in training) on GPUs and NPUs, as nnU-Net v1, and none (fp32) on
    the CPU; `bf16` or `fp16` where asked. On an H200 the Task03 step and tile forward are 14 % and 25 % faster
    in fp16 than in bf16 (eager; equal when compiled): docs/gpu/."""
    if precision == "fp32" or (precision == "auto" and device.type == "cpu"):
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision in ("fp16", "auto"):
        return torch.float16
    raise ValueError(f"precision {precision!r}: use auto, bf16, fp16 or fp32")


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so timings include it (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "npu":
        torch.npu.synchronize(device)  # type: ignore[attr-defined]


def device_name(device: torch.device) -> str:
    """Human-readable name of the card (or 'cpu') for reports."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "npu":
        return torch.npu.get_device_name(device)  # type: ignore[attr-defined]
    return "cpu"


# ----------------------------------------------------------------------------- the CPU
def cpu_flags() -> tuple[str, set[str]]:
    """(model name, instruction-set flags) of this CPU from /proc/cpuinfo ('' and none elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor(), set()
    model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "")
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith(("flags", "Features"))), [])
    return model or platform.processor(), set(flags)


def bf16_conv_ratio(repeats: int = 5) -> float:
    """How many times slower a bf16 3D convolution is than fp32 on this CPU (measured: ~0.5 native, ~50 emulated)."""
    conv = torch.nn.Conv3d(8, 8, 3, padding=1)
    x = torch.randn(2, 8, 8, 32, 32)
    times = {}
    with torch.no_grad():
        for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
            with autocast("cpu", dtype):
                conv(x)  # warm-up: oneDNN builds its kernel
                t = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    conv(x)
                    t.append(time.perf_counter() - t0)
            times[name] = min(t)  # the least disturbed: other work on the cores only ever adds time
    return times["bf16"] / max(times["fp32"], 1e-9)


def cpu_info(measure: bool = True) -> dict:
    """The CPU's instruction sets (AVX2, AVX-512, AMX), the caps on them (ATen's capability, ONEDNN_MAX_CPU_ISA)
    and whether bf16 is native here: from the flags, and, with `measure`, from a timed convolution (a cap that
    hides AVX-512 BF16 from oneDNN makes bf16 emulated although the flags still list it)."""
    model, flags = cpu_flags()
    has = {name: any(f.startswith(prefix) for f in flags) for name, prefix in
           (("avx2", "avx2"), ("avx512", "avx512f"), ("avx512_bf16", "avx512_bf16"), ("amx", "amx_tile"),
            ("amx_bf16", "amx_bf16"), ("avx512_fp16", "avx512_fp16"))}
    info = {"model": model, "cores": os.cpu_count(), "threads": torch.get_num_threads(), **has,
            "aten_capability": torch.backends.cpu.get_cpu_capability(),
            "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "")}
    flags_bf16 = has["avx512_bf16"] or has["amx_bf16"]
    isa = [n for n, k in (("AVX2", "avx2"), ("AVX-512", "avx512"), ("AMX", "amx")) if has[k]]
    caps = [c for c in (info["onednn_max_cpu_isa"] and f"oneDNN <= {info['onednn_max_cpu_isa']}",
                        f"ATen {info['aten_capability']}") if c]
    info["isa_summary"] = "/".join(isa) + (f", capped: {', '.join(caps)}" if info["onednn_max_cpu_isa"] else "")
    info["bf16_flags"] = flags_bf16
    if measure:
        ratio = bf16_conv_ratio()
        info["bf16_conv_vs_fp32"] = round(ratio, 2)
        info["bf16"] = "native" if ratio < EMULATED else "emulated"
    return info
