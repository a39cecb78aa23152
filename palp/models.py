"""Loading the base model: a Hugging Face id, a local diffusers directory, a gs:// prefix, or tiny.

Every source ends as a local directory in the diffusers Stable Diffusion layout and goes
through the same ``from_pretrained`` calls, so the tiny test model and SD v1.4 share one path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from palp import storage, tiny
from palp.toyworld import TOYWORLD_NAME, weights_dir

# What a Stable Diffusion (1.x/2.x) directory must hold, per component.
SD_LAYOUT = {
    "model_index.json": ("model_index.json",),
    "unet config": ("unet/config.json",),
    "unet weights": ("unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.bin"),
    "vae config": ("vae/config.json",),
    "vae weights": ("vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.bin"),
    "text_encoder config": ("text_encoder/config.json",),
    "text_encoder weights": ("text_encoder/model.safetensors", "text_encoder/pytorch_model.bin"),
    "tokenizer": ("tokenizer/tokenizer.json", "tokenizer/vocab.json"),
    "scheduler config": ("scheduler/scheduler_config.json",),
}
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Fetch only what palp loads: no safety checker, no fp16/EMA/.bin/.ckpt duplicates of the weights.
_HUB_PATTERNS = [
    "model_index.json", "scheduler/*", "tokenizer/*", "unet/config.json", "vae/config.json", "text_encoder/config.json",
    "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
]


class ModelError(ValueError):
    """A base model that cannot be found or is not a Stable Diffusion layout."""


@dataclass
class BaseModel:
    """The frozen parts of Stable Diffusion that palp fine-tunes on top of."""

    path: Path
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    noise_scheduler: object  # DDPMScheduler with the model's training schedule

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def resolution(self) -> int:
        """Image side the model was trained at: 512 for SD-1.x, 64 for tiny."""
        return self.unet.config.sample_size * self.vae_scale_factor


def missing_parts(path: Path) -> list[str]:
    return [name for name, options in SD_LAYOUT.items() if not any((path / o).is_file() for o in options)]


def check_sd_layout(path: Path, *, spec: str) -> Path:
    missing = missing_parts(path)
    if missing:
        raise ModelError(
            f"{spec} is not a Stable Diffusion model directory: missing {', '.join(missing)} "
            f"(expected the diffusers layout written by StableDiffusionPipeline.save_pretrained)"
        )
    return path


def resolve_model_dir(spec: str, *, cache_dir: str | Path | None = None) -> Path:
    """Turn ``tiny``, ``toyworld``, a local directory, a ``gs://`` prefix or a hub id into a local directory."""
    spec = str(spec)
    cache = Path(cache_dir) if cache_dir else tiny.cache_root()
    if spec == tiny.TINY_NAME:
        return tiny.tiny_model_dir()
    if spec == TOYWORLD_NAME:
        return check_sd_layout(weights_dir("sd"), spec=spec)
    if storage.is_gcs(spec):
        return check_sd_layout(storage.local_dir(spec, cache=cache), spec=spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        return check_sd_layout(path, spec=spec)
    if path.exists():
        raise ModelError(f"{spec} is a file; --pretrained-model wants a model directory, hub id, gs:// prefix, 'tiny' or 'toyworld'")
    if not _HUB_ID_RE.match(spec) or spec.startswith((".", "/", "~")):
        raise ModelError(f"model {spec!r} not found: no such directory, and it is not a Hugging Face id (ORG/NAME)")
    return check_sd_layout(_hub_snapshot(spec), spec=spec)


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS))
    except RepositoryNotFoundError as e:
        raise ModelError(f"model {repo_id!r}: no such repository on the Hugging Face hub") from e
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        raise ModelError(
            f"model {repo_id!r} is not a local directory and could not be fetched from the Hugging Face "
            f"hub or found in its cache ({type(e).__name__}); download it where the hub is reachable "
            f"and pass the directory, or a gs:// copy"
        ) from e


def load_base_model(spec: str, *, cache_dir: str | Path | None = None) -> BaseModel:
    """Load the frozen base model (fp32; precision is the trainer's choice)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    path = resolve_model_dir(spec, cache_dir=cache_dir)
    return BaseModel(
        path=path,
        unet=UNet2DConditionModel.from_pretrained(path, subfolder="unet"),
        vae=AutoencoderKL.from_pretrained(path, subfolder="vae"),
        text_encoder=CLIPTextModel.from_pretrained(path, subfolder="text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer"),
        noise_scheduler=DDPMScheduler.from_pretrained(path, subfolder="scheduler"),
    )
