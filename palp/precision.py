"""Precisions by name: training's ``--mixed-precision`` and sampling's ``--precision``."""

from __future__ import annotations

import torch

MIXED_PRECISION = ("no", "fp16", "bf16")
SAMPLE_PRECISIONS = ("auto", "fp64", "fp32", "fp16", "bf16")


def weight_dtype(mixed_precision: str) -> torch.dtype:
    """The dtype of the frozen weights and latents under ``--mixed-precision`` (trainable ones stay fp32)."""
    return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]


def sample_dtype(device: torch.device, precision: str) -> torch.dtype:
    """Sampling's dtype for ``--precision``: ``auto`` is fp16 on CUDA, fp32 elsewhere."""
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"fp64": torch.float64, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
