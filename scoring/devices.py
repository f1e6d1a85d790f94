"""Device and dtype, resolved once and printed: one vocabulary for every backend and for the trainer.

`auto` means the same everywhere: CUDA when present, else CPU; bfloat16 on a CUDA device that supports
it, else float32 (CPU bfloat16 is slow and inexact, and float32 is what the float64 tests check against).
"""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)


def resolve_device(requested: str = "auto") -> tuple[torch.device, str]:
    """`auto` picks CUDA when present, else CPU. Returns the device and the reason, for printing once."""
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda"), f"auto: CUDA available ({torch.cuda.get_device_name(0)})"
        return torch.device("cpu"), "auto: no CUDA device"
    if requested != "cpu" and not requested.startswith("cuda"):
        raise ValueError(f"--device {requested!r}: choose auto, cpu or cuda[:i].")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {requested}: CUDA is not available on this machine. Use --device cpu.")
    return torch.device(requested), "requested"


def resolve_dtype(requested: str, device: torch.device, allowed: tuple[str, ...] = tuple(DTYPES)) -> tuple[torch.dtype, str]:
    """The dtype for `requested` (auto | one of `allowed`) on `device`, and the reason, for printing once."""
    if requested == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16, "auto: CUDA with bf16 support"
        return torch.float32, f"auto: {device.type}{' without bf16 support' if device.type == 'cuda' else ''}"
    if requested not in allowed:
        raise ValueError(f"--dtype {requested!r}: choose one of auto, {', '.join(allowed)}.")
    return DTYPES[requested], "requested"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
