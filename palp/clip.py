"""CLIP through open_clip: the scorer (ViT-B-32 with OpenAI weights by default) and a tiny one.

``load_clip("ViT-B-32", "openai")`` is the paper's evaluation model; ``load_clip(NAME, PATH)``
takes any local checkpoint; ``load_clip("tiny")`` is a seeded toy CLIP that palp builds in
code and saves in open_clip's own folder layout (``open_clip_config.json`` +
``open_clip_model.safetensors``, loaded with ``local-dir:``), for tests and offline demos.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from palp.tiny import cache_root
from palp.toyworld import TOYWORLD_NAME, weights_dir

TINY_CLIP = "tiny"
TINY_CLIP_VERSION = "1"
TINY_CLIP_CONFIG = {
    "model_cfg": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 8, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
    },
    "preprocess_cfg": {
        "mean": [0.48145466, 0.4578275, 0.40821073],
        "std": [0.26862954, 0.26130258, 0.27577711],
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    },
}


class ClipError(ValueError):
    """A CLIP model that cannot be loaded; the message says what to pass instead."""


@dataclass
class Clip:
    model: torch.nn.Module
    preprocess: object  # PIL image -> (3, S, S) tensor
    tokenizer: object  # list[str] -> (N, 77) ids
    name: str

    @torch.no_grad()
    def encode_images(self, images, batch_size: int = 64) -> torch.Tensor:
        """L2-normalised image features (N, D)."""
        device = next(self.model.parameters()).device
        feats = []
        for i in range(0, len(images), batch_size):
            x = torch.stack([self.preprocess(im) for im in images[i : i + batch_size]]).to(device)
            feats.append(torch.nn.functional.normalize(self.model.encode_image(x).float(), dim=-1))
        return torch.cat(feats)

    @torch.no_grad()
    def encode_texts(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        """L2-normalised text features (N, D)."""
        device = next(self.model.parameters()).device
        feats = []
        for i in range(0, len(texts), batch_size):
            ids = self.tokenizer(texts[i : i + batch_size]).to(device)
            feats.append(torch.nn.functional.normalize(self.model.encode_text(ids).float(), dim=-1))
        return torch.cat(feats)


def save_tiny_clip(out_dir: str | Path, seed: int = 0) -> Path:
    """Build the seeded tiny CLIP and write it atomically in open_clip's local-dir layout."""
    import open_clip
    from safetensors.torch import save_file

    from palp.storage import atomic_directory

    with atomic_directory(out_dir) as tmp:
        (tmp / "open_clip_config.json").write_text(json.dumps(TINY_CLIP_CONFIG, indent=2))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = open_clip.create_model(f"local-dir:{tmp}", load_weights=False)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "open_clip_model.safetensors"))
    return Path(out_dir)


def tiny_clip_dir() -> Path:
    path = cache_root() / "models" / f"tiny-clip-v{TINY_CLIP_VERSION}"
    if not (path / "open_clip_model.safetensors").exists():
        save_tiny_clip(path)
    return path


def load_clip(name: str = "ViT-B-32", weights: str = "openai", *, device: str | torch.device = "cpu") -> Clip:
    """open_clip model + preprocessing + tokenizer, in eval mode.

    ``name``: an open_clip architecture (``ViT-B-32``), ``local-dir:PATH``/``hf-hub:ORG/NAME``,
    ``tiny`` or ``toyworld``. ``weights``: an open_clip pretrained tag (``openai``) or a checkpoint path.
    """
    import open_clip

    display = name
    if name == TINY_CLIP:
        name, weights = f"local-dir:{tiny_clip_dir()}", None
    elif name == TOYWORLD_NAME:
        name, weights = f"local-dir:{weights_dir('clip')}", None
    elif name.startswith(("local-dir:", "hf-hub:")):
        weights = None
    elif name not in open_clip.list_models():
        raise ClipError(f"unknown CLIP model {name!r}; use an open_clip name such as ViT-B-32, local-dir:PATH, tiny or toyworld")
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=weights, device=device)
    except Exception as e:  # open_clip reports a missing download or file in many ways
        raise ClipError(
            f"could not load CLIP {name} with weights {weights!r} ({type(e).__name__}: {e}); "
            f"pass --clip-weights PATH to a local checkpoint where the weights cannot be downloaded"
        ) from e
    model.eval()
    return Clip(model=model, preprocess=preprocess, tokenizer=open_clip.get_tokenizer(name), name=display)
