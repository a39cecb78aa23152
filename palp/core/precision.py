"""Precisions by name: training's ``--mixed-precision`` and sampling's ``--precision``.

The names are read by the settings, which load no torch; torch is imported when a dtype is asked for."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

MIXED_PRECISION = ("no", "fp16", "bf16")
SAMPLE_PRECISIONS = ("auto", "fp64", "fp32", "fp16", "bf16")


def weight_dtype(mixed_precision: str) -> torch.dtype:
    """The dtype of the frozen weights and latents under ``--mixed-precision`` (trainable ones stay fp32)."""
    import torch

    return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]


def sample_dtype(device: torch.device, precision: str) -> torch.dtype:
    """Sampling's dtype for ``--precision``: ``auto`` is fp16 on CUDA, fp32 elsewhere."""
    import torch

    if precision == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"fp64": torch.float64, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
