"""Speed options of the training step and the sampler; none of them changes what is computed.

- ``compile_unet``: ``torch.compile`` of the whole UNet or of its repeated blocks only
  (regional compilation: each distinct block shape is compiled once, in seconds rather than
  the minutes a whole-UNet graph takes).
- ``load_compile_cache`` / ``save_compile_cache``: torch's portable compile cache as one file
  (local or gs://), so a pipeline step on a fresh machine reuses an earlier step's kernels.
- ``attention_backend``: which scaled-dot-product-attention kernel PyTorch may use (SD's heads
  are 40 wide, a shape the kernels handle with very different efficiency).
- ``set_channels_last``, ``set_gradient_checkpointing``: memory layout and the memory option.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import nn

from palp.core import storage
from palp.core.settings import ATTENTION_BACKENDS, COMPILE_CHOICES, COMPILE_MODES

log = logging.getLogger(__name__)
T = TypeVar("T")

_REGIONS = {
    "transformers": ("Transformer2DModel",),  # norm + proj_in + attention blocks + proj_out
    "blocks": ("Transformer2DModel", "ResnetBlock2D"),  # ~all the UNet's work, in ~20 distinct shapes
}
# A block class is compiled once per distinct input shape (SD's UNet has ~15 resnet shapes,
# each seen with and without grad and at a few batch sizes): dynamo's default of 8 compiled
# versions per function would send the rest back to eager.
RECOMPILE_LIMIT = 128



def _raise_recompile_limits() -> None:
    import torch._dynamo.config as dynamo

    for name in ("recompile_limit", "cache_size_limit"):  # the name changed across torch releases
        if hasattr(dynamo, name):
            setattr(dynamo, name, max(getattr(dynamo, name), RECOMPILE_LIMIT))
    for name in ("accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(dynamo, name):
            setattr(dynamo, name, max(getattr(dynamo, name), 8 * RECOMPILE_LIMIT))


def resolve_compile(how: str, device: torch.device) -> str:
    """``auto``: the repeated blocks on CUDA (compiled in seconds, run faster), nothing elsewhere.
    On an XLA device always nothing: XLA compiles each whole step's graph itself (palp.core.xla),
    and torch.compile's inductor does not generate code for XLA tensors."""
    if torch.device(device).type == "xla":
        if how not in ("auto", "none"):
            log.warning("--compile %s does not apply on XLA (XLA compiles the step's graph itself); not compiling", how)
        return "none"
    if how == "auto":
        return "blocks" if torch.device(device).type == "cuda" else "none"
    return how


def compile_unet(unet: nn.Module, how: str, *, mode: str = "default", backend: str = "inductor") -> list[nn.Module]:
    """``torch.compile`` the UNet in place (``Module.compile``: state-dict names stay the same).

    ``how``: ``none``, ``transformers`` / ``blocks`` (regional: each such block is compiled
    on its own; the small glue between blocks stays eager) or ``unet`` (one graph). Shapes
    are static (``dynamic=False``): each batch size gets kernels specialised to it. Returns
    the compiled modules. Compilation happens at the first call of each shape.
    """
    if how not in COMPILE_CHOICES:
        raise ValueError(f"compile must be one of {', '.join(COMPILE_CHOICES)}, not {how!r}")
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {', '.join(COMPILE_MODES)}, not {mode!r}")
    if how == "none":
        return []
    _raise_recompile_limits()
    targets = [unet] if how == "unet" else [m for m in unet.modules() if type(m).__name__ in _REGIONS[how]]
    if not targets:
        raise ValueError(f"the UNet has none of the blocks --compile {how} compiles ({', '.join(_REGIONS[how])})")
    options = {} if mode == "default" else {"mode": mode}
    for m in targets:
        m.compile(backend=backend, dynamic=False, **options)
    return targets


def is_compile_error(error: BaseException) -> bool:
    """Whether ``error`` is torch.compile failing (tracing or code generation), not the model."""
    import torch._dynamo.exc

    return isinstance(error, torch._dynamo.exc.TorchDynamoException)


def uncompile_unet(unet: nn.Module) -> None:
    """Undo ``compile_unet``: every module runs eagerly again (the compiled code stays cached)."""
    for m in unet.modules():
        m._compiled_call_impl = None


class CompiledUNet:
    """A UNet under ``torch.compile`` with its kernel cache and the eager fallback: what train
    and sample both do around their compiled calls.

    Built with ``how`` (``resolve_compile``'s answer) and a cache folder: loads the cache file
    for this torch and device, then compiles. ``call(fn)`` runs ``fn``; when torch.compile
    fails there (at the first call of some shape, before any result), the UNet is made eager,
    ``before_retry`` undoes what the failed call began, and ``fn`` runs again. ``save_once``
    writes the cache after the first call that compiled everything.
    """

    def __init__(self, unet: nn.Module, how: str, *, device: torch.device, cache_folder: str = "", mode: str = "default",
                 logger: logging.Logger | None = None):
        self.unet, self.how, self.log = unet, how, logger or log
        self.cache = compile_cache_file(cache_folder, how, device) if cache_folder and how != "none" else ""
        if self.cache:
            load_compile_cache(self.cache)
        compile_unet(unet, how, mode=mode)
        self._saved = False

    @property
    def active(self) -> bool:
        """Whether the UNet is (still) compiled."""
        return self.how != "none"

    def call(self, fn: Callable[[], T], *, before_retry: Callable[[], None] | None = None, doing: str = "running") -> T:
        try:
            return fn()
        except Exception as e:
            if not self.active or not is_compile_error(e):
                raise
            first = str(e).splitlines()[0] if str(e) else ""
            self.log.warning("torch.compile failed (%s: %s); %s without compiling", type(e).__name__, first, doing)
            uncompile_unet(self.unet)
            self.how, self.cache = "none", ""
            if before_retry:
                before_retry()
            return fn()

    def save_once(self, *, writer: bool = True) -> None:
        """Write the cache (first call only; ``writer``: this process is the one that writes)."""
        if self.cache and not self._saved and writer:
            save_compile_cache(self.cache)
        self._saved = True


def attention_backend(name: str):
    """A context in which attention runs on the SDPA kernel ``name`` wherever that kernel takes the
    inputs (``auto``: PyTorch's own choice everywhere).

    Where it cannot run, PyTorch's next kernel in order (flash, memory-efficient, math) does: the
    VAE's attention has one head 512 wide, which the flash and cuDNN kernels refuse on the GPU, so
    a strict choice would stop every sampling run at its decode with "No available kernel"."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend must be one of {', '.join(ATTENTION_BACKENDS)}, not {name!r}")
    if name == "auto":
        return contextlib.nullcontext()
    backend = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[name]
    if backend == SDPBackend.MATH:
        return sdpa_kernel([backend])
    fallbacks = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return sdpa_kernel([backend] + [b for b in fallbacks if b != backend], set_priority=True)


def set_channels_last(module: nn.Module, on: bool) -> None:
    """NHWC weights for the convolutions (activations follow them); no effect on results."""
    module.to(memory_format=torch.channels_last if on else torch.contiguous_format)


def set_gradient_checkpointing(unet: nn.Module, on: bool) -> None:
    """Recompute block activations in the backward pass: less memory, about one more forward."""
    if on:
        unet.enable_gradient_checkpointing()
    else:
        unet.disable_gradient_checkpointing()


def compile_cache_file(folder: str, how: str, device: torch.device) -> str:
    """The cache file for this torch, device and compile setting inside ``folder`` (local or gs://).

    Compiled kernels are only valid for the torch build and the device they were made for."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    tag = re.sub(r"[^A-Za-z0-9._-]+", "-", f"torch-{torch.__version__}-{name}-{how}")
    return storage.join(folder, f"{tag}.bin")


def load_compile_cache(uri: str) -> bool:
    """Fill torch's local compile caches from ``uri`` if it exists; True if it did."""
    if not uri or not storage.exists(uri):
        return False
    try:
        torch.compiler.load_cache_artifacts(storage.read_bytes(uri))
    except Exception as e:  # a cache from another build is useless, not fatal: compile afresh
        log.warning("compile cache %s not loaded (%s: %s); compiling from scratch", uri, type(e).__name__, e)
        return False
    return True


def save_compile_cache(uri: str) -> bool:
    """Write everything this process compiled (and loaded) to ``uri``, atomically; True if any."""
    if not uri:
        return False
    artifacts = torch.compiler.save_cache_artifacts()
    if not artifacts or not artifacts[0]:
        return False
    storage.write_bytes(uri, artifacts[0])
    return True
