"""torch_xla (TPU, or the CPU with PJRT_DEVICE=CPU) through accelerate: what palp does differently there.

accelerate picks the XLA device whenever torch_xla is importable (USE_TORCH_XLA=0 turns that
off). XLA tensors are lazy: ops are recorded and a graph is compiled and run only at a sync
point, and a graph is compiled once per distinct shape and structure. palp cuts a training
step into two graphs, each compiled once: the forward, backward and clipping (its gradients
and measurements as outputs, read in one transfer) and the optimizer update; the sampler cuts
one graph per denoising step. Without these cuts a read of the measurements runs only the
graph that computes them, leaving the gradients pending, so the update's graph computed the
forward and backward a second time. On any other device these functions do nothing.
"""

from __future__ import annotations

import torch


def is_xla(device) -> bool:
    return torch.device(device).type == "xla"


def sync(device) -> None:
    """On an XLA device, compile (once per graph) and run everything recorded so far; elsewhere nothing."""
    if not is_xla(device):
        return
    import torch_xla

    if hasattr(torch_xla, "sync"):
        torch_xla.sync()
    else:  # torch_xla before 2.6
        import torch_xla.core.xla_model as xm

        xm.mark_step()
