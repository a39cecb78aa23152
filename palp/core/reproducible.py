"""Bit-reproducible training: deterministic kernels and a fixed CPU thread count.

Two runs of one configuration, and a run killed and resumed, give the same bits only if every
reduction is split the same way: CPU kernels split their work by thread (so the thread count is
part of the result and is recorded with the run), and some kernels (atomics on CUDA, cuBLAS's
workspace-dependent reductions) have a deterministic variant that PyTorch uses only when asked.
Where an op has none, PyTorch warns naming it (``warn_only``) instead of stopping the run.
"""

from __future__ import annotations

import contextlib
import os

import torch


def resolve_threads(requested: int, recorded: int | None = None) -> int:
    """The thread count of a run: the requested one; else the run's recorded one (a resumed run
    keeps its own); else torch's default for this machine."""
    return requested or recorded or torch.get_num_threads()


@contextlib.contextmanager
def reproducible(*, deterministic: bool, threads: int):
    """Within: ``threads`` CPU threads and, with ``deterministic``, deterministic algorithms
    (cuDNN without autotuning, cuBLAS with a fixed workspace); the previous settings after."""
    before = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled(), torch.backends.cudnn.deterministic,
              torch.backends.cudnn.benchmark)
    torch.set_num_threads(threads)
    if deterministic:
        # Read by cuBLAS when its first handle is made; a process that already used cuBLAS
        # keeps its workspace (PyTorch then warns that the setting is missing).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        threads0, det, warn, cudnn_det, bench = before
        torch.set_num_threads(threads0)
        torch.use_deterministic_algorithms(det, warn_only=warn)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn_det, bench
