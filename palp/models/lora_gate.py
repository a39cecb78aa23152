"""A per-sample switch of the LoRA layers, so that one UNet call evaluates the pretrained model
on some rows and the personalized one on the others.

PALP's two no-grad guidance branches (Eq. 6) become one call of 4B rows instead of two calls of
2B (``--fused-guidance``). A row with gate 0 has its rank-r LoRA activation zeroed, so LoRA
adds exactly 0 there: that row is the base layer's output, the same as with the adapters
disabled. (peft's own mixed-batch ``adapter_names`` gathers and scatters sub-batches per layer;
a multiplicative gate keeps every shape static, which is what ``torch.compile`` wants.)
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


class RowGate:
    """What every per-row switch of a UNet's trained layers shares: ``with gate(flags): unet(x)``
    hands the switched layers ``flags`` (N,), one per row of the call, and takes them back after."""

    what = "row gate"  # its name in the error message

    def __init__(self):
        # An instance attribute from the start: torch.compile guards on where ``flags`` is found,
        # so a class attribute shadowed by the first ``with`` would recompile the next step.
        self.flags: torch.Tensor | None = None

    @contextlib.contextmanager
    def __call__(self, flags: torch.Tensor):
        if flags.dim() != 1:
            raise ValueError(f"{self.what} flags must be (N,), got {tuple(flags.shape)}")
        self.flags = flags
        try:
            yield
        finally:
            self.flags = None


class LoraGate(RowGate):
    """A per-row LoRA switch for one UNet: ``with gate(flags): unet(x)`` with ``flags`` (N,) in {0, 1}.

    Hooks sit on every LoRA ``lora_A`` projection and multiply its (N, ..., r) output by the
    row's flag; outside a ``with`` block they change nothing. The batch dimension of every LoRA
    input in diffusers' attention is the UNet's batch dimension, which the hook checks.
    """

    what = "LoRA gate"

    def __init__(self, unet: nn.Module):
        from peft.tuners.lora import LoraLayer

        super().__init__()
        self._handles = [
            a.register_forward_hook(self._hook)
            for layer in unet.modules() if isinstance(layer, LoraLayer)
            for a in layer.lora_A.values()
        ]
        if not self._handles:
            raise ValueError("the UNet has no LoRA layers to gate")

    def _hook(self, module, args, output: torch.Tensor):
        if self.flags is None:
            return None
        if output.shape[0] != self.flags.shape[0]:
            raise RuntimeError(f"LoRA gate of {self.flags.shape[0]} rows met a LoRA input of {output.shape[0]} rows")
        return output * self.flags.view(-1, *(1,) * (output.dim() - 1)).to(output.dtype)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def row_flags(counts: list[tuple[int, float]], *, device) -> torch.Tensor:
    """(N,) gate flags for consecutive groups of rows: [(B, 0.0), (B, 1.0)] -> B zeros then B ones.

    Made on the device with fills (no host-to-device copy, so nothing waits for the GPU)."""
    return torch.cat([torch.full((n, ), value, device=device) for n, value in counts])
