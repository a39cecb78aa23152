"""Running out of device memory: how it reads on each device, and giving memory back after it.

``palp train --micro-batch-size auto`` and ``palp sample`` back off to smaller batches when an
allocation fails; both recognise the failure here and release what it left behind.
"""

from __future__ import annotations

import sys

import torch

# How an allocation that failed reads: the CPU allocator's (its own words, or posix_memalign's
# ENOMEM), CUDA's, oneDNN's (a convolution whose scratch memory cannot be allocated fails to
# "create a primitive"), C++'s.
OUT_OF_MEMORY = ("can't allocate memory", "Cannot allocate memory", "out of memory", "could not create a primitive",
                 "std::bad_alloc")


def is_out_of_memory(e: BaseException) -> bool:
    """A device allocation that failed: CUDA's OutOfMemoryError, Python's MemoryError, or a
    RuntimeError with one of :data:`OUT_OF_MEMORY`'s messages (the CPU's, under a memory limit)."""
    if isinstance(e, (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))):
        return True
    return isinstance(e, RuntimeError) and any(s in str(e) for s in OUT_OF_MEMORY)


def release_memory(device: torch.device) -> None:
    """Give memory freed by a failed allocation back: to CUDA's pool, or, on the CPU, to the
    OS (glibc keeps freed heap memory, and after a large free serves even large blocks from the
    heap, so a process that just ran out stays near its limit until trimmed)."""
    import ctypes
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc
            pass
