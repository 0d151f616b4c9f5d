"""The device and precision a benchmark or a one-process command runs on (``--device``, ``--precision``), and the
synchronisation that makes its wall-clock timings mean the device's work."""

from __future__ import annotations

import torch


def resolve_device(name: str, also: tuple[str, ...] = ()) -> torch.device:
    """``auto`` (CUDA when visible, else the CPU), ``cpu``, ``cuda`` or one of ``also`` (e.g. ``meta`` for a dry
    run of shapes); ``cuda`` with no visible GPU is an error naming it."""
    choices = ("auto", "cpu", "cuda", *also)
    if name not in choices:
        raise ValueError(f"--device must be one of {', '.join(choices)}, got {name!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible")
    return torch.device(name)


def half_dtype(precision: str, device: torch.device) -> torch.dtype:
    """``--precision``: bf16, fp32, or auto (bf16 on a GPU, fp32 elsewhere)."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"--precision must be auto, bf16 or fp32, got {precision!r}")
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.bfloat16 if bf16 else torch.float32


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU), before and after a timed region."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    """What a benchmark's JSON calls the device: the GPU's model name, else the device type (cpu, meta)."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
