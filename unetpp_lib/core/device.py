"""Compute devices: CPU, CUDA and Ascend NPU (torch_npu imported only when asked for)."""
from __future__ import annotations

import importlib

import torch


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
