"""CLIP through open_clip: the scorer (ViT-B-32 with OpenAI weights by default) and a tiny one.

``load_clip("ViT-B-32", "openai")`` is the paper's evaluation model; ``load_clip(NAME, PATH)``
takes any local checkpoint; ``load_clip("tiny")`` is a seeded toy CLIP that palp builds in
code and saves in open_clip's own folder layout (``open_clip_config.json`` +
``open_clip_model.safetensors``, loaded with ``local-dir:``), for tests and offline demos.

``resolve_clip`` also pins the exact weights, so that the CLIP that scores a dataset can be
checked to be the one that prepared it: ``sha256:<digest>`` of the files open_clip loads
(``tiny``, ``toyworld``, ``local-dir:``, a checkpoint file, the file an open_clip tag such as
``openai`` downloads), ``gcs:<generation>`` of a ``gs://`` checkpoint, ``hub:<commit>`` of
an ``hf-hub:`` model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from palp.core import gcs, storage
from palp.core.cache import cache_root
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


@dataclass(frozen=True)
class ResolvedClip:
    """A CLIP as open_clip loads it, and the pin of its exact weights."""

    name: str  # as given: ViT-B-32, tiny, toyworld, local-dir:PATH, hf-hub:ORG/NAME
    weights: str | None  # as given; None where the name carries its weights (tiny, local-dir:, ...)
    model: str  # the name open_clip gets
    pretrained: str | None  # the tag or local checkpoint file open_clip gets
    pin: str

    def record(self) -> dict:
        """What a prepared dataset's manifest keeps of it (``manifest["clip"]``)."""
        return {"model": self.name, "weights": self.weights, "pin": self.pin}


@dataclass
class Clip:
    model: torch.nn.Module
    preprocess: object  # PIL image -> (3, S, S) tensor
    tokenizer: object  # list[str] -> (N, 77) ids
    name: str
    pin: str = ""  # the exact weights (see resolve_clip)

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

    from palp.core.storage import atomic_directory

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


# What open_clip reads from a local-dir: folder (its config, checkpoints and tokenizer files).
_LOCAL_DIR_FILES = ("open_clip_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                    "special_tokens_map.json", "spiece.model")
_CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pth")


def _dir_pin(path: Path) -> str:
    names = [p.name for p in sorted(path.iterdir()) if p.is_file() and not p.name.startswith(".")
             and (p.name in _LOCAL_DIR_FILES or p.suffix in _CHECKPOINT_SUFFIXES)]
    return "sha256:" + storage.folder_digest(path, names)


def _load_failed(name: str, weights, e: Exception) -> ClipError:
    return ClipError(
        f"could not load CLIP {name} with weights {weights!r} ({type(e).__name__}: {e}); "
        f"pass --clip-weights PATH to a local checkpoint where the weights cannot be downloaded"
    )


def resolve_clip(name: str = "ViT-B-32", weights: str | None = "openai") -> ResolvedClip:
    """Where a CLIP's weights are, and their pin (a gs:// checkpoint is fetched into the cache).

    ``name``: an open_clip architecture (``ViT-B-32``), ``local-dir:PATH``, ``hf-hub:ORG/NAME``,
    ``tiny`` or ``toyworld``. ``weights`` (architectures only): an open_clip pretrained tag
    (``openai``), a checkpoint file or a ``gs://`` checkpoint.
    """
    import open_clip

    if name in (TINY_CLIP, TOYWORLD_NAME) or name.startswith("local-dir:"):
        folder = tiny_clip_dir() if name == TINY_CLIP else weights_dir("clip") if name == TOYWORLD_NAME else Path(name[len("local-dir:"):])
        if not (folder / "open_clip_config.json").is_file():
            raise ClipError(f"CLIP {name}: {folder} holds no open_clip_config.json (an open_clip local-dir: folder)")
        return ResolvedClip(name, None, f"local-dir:{folder}", None, _dir_pin(folder))
    if name.startswith("hf-hub:"):
        return ResolvedClip(name, None, name, None, _hf_hub_pin(name[len("hf-hub:"):]))
    if name not in open_clip.list_models():
        raise ClipError(f"unknown CLIP model {name!r}; use an open_clip name such as ViT-B-32, local-dir:PATH, tiny or toyworld")
    if not weights:
        raise ClipError(f"CLIP {name} needs weights: an open_clip pretrained tag such as openai, or a checkpoint (--clip-weights)")
    weights = str(weights)
    tag = open_clip.pretrained.get_pretrained_cfg(name.replace("/", "-"), weights)
    if tag:  # open_clip's own order: a known tag first, then a file
        try:
            path = open_clip.pretrained.download_pretrained(tag)
        except Exception as e:  # noqa: BLE001 - open_clip reports a missing download in many ways
            raise _load_failed(name, weights, e) from e
        return ResolvedClip(name, weights, name, weights, "sha256:" + storage.file_digest(path))
    if gcs.is_gcs(weights):
        path, pin = _fetch_gcs_checkpoint(weights)
        return ResolvedClip(name, weights, name, str(path), pin)
    if Path(weights).is_file():
        return ResolvedClip(name, weights, name, weights, "sha256:" + storage.file_digest(weights))
    raise ClipError(f"CLIP {name}: weights {weights!r} are neither an open_clip pretrained tag of {name} nor a checkpoint file "
                    f"(tags: {', '.join(open_clip.list_pretrained_tags_by_model(name)) or 'none'})")


def clip_pin(name: str = "ViT-B-32", weights: str | None = "openai") -> str:
    """The pin of a CLIP's exact weights (see resolve_clip)."""
    return resolve_clip(name, weights).pin


def _hf_hub_pin(repo_id: str) -> str:
    """``hub:<commit>`` of an open_clip model on the Hugging Face hub (its config's snapshot)."""
    from huggingface_hub import hf_hub_download

    try:
        config = Path(hf_hub_download(repo_id, "open_clip_config.json"))
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, ...
        raise _load_failed(f"hf-hub:{repo_id}", None, e) from e
    return "hub:" + config.parent.name


def _fetch_gcs_checkpoint(uri: str) -> tuple[Path, str]:
    """A gs:// checkpoint in the cache, keyed by the URI and its generation: (local file, pin)."""
    generation = _generation(uri)
    pin = f"gcs:{generation}"
    dest = storage.cache_dir(f"{uri}@{pin}", cache=cache_root(), kind="clip") / Path(gcs.split_gcs(uri)[1]).name
    if not dest.is_file():
        data = _read_generation(uri, generation)
        if _generation(uri) != generation:
            raise ClipError(f"{uri} was replaced while it was being downloaded; run again")
        storage.write_bytes(dest, data)  # atomic: a file in the cache is whole
    return dest, pin


@gcs.with_retries
def _generation(uri: str) -> int:
    bucket, name = gcs.split_gcs(uri)
    blob = gcs.gcs_client().bucket(bucket).get_blob(name) if name else None
    if blob is None:
        raise ClipError(f"CLIP weights {uri} do not exist")
    return int(blob.generation)


@gcs.with_retries
def _read_generation(uri: str, generation: int) -> bytes:
    from google.api_core.exceptions import NotFound

    bucket, name = gcs.split_gcs(uri)
    try:
        return gcs.gcs_client().bucket(bucket).blob(name, generation=generation).download_as_bytes()
    except NotFound as e:
        raise ClipError(f"{uri} was replaced while it was being downloaded (generation {generation} is gone); run again") from e


def load_clip(name: str = "ViT-B-32", weights: str | None = "openai", *, device: str | torch.device = "cpu",
              resolved: ResolvedClip | None = None) -> Clip:
    """open_clip model + preprocessing + tokenizer, in eval mode, with the pin of its weights.

    ``name``: an open_clip architecture (``ViT-B-32``), ``local-dir:PATH``/``hf-hub:ORG/NAME``,
    ``tiny`` or ``toyworld``. ``weights``: an open_clip pretrained tag (``openai``), a checkpoint
    path or a ``gs://`` checkpoint. ``resolved``: ``resolve_clip(name, weights)``, when known.
    """
    import open_clip

    r = resolved or resolve_clip(name, weights)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(r.model, pretrained=r.pretrained, device=device)
    except Exception as e:  # open_clip reports a missing download or file in many ways
        raise _load_failed(r.model, r.weights, e) from e
    model.eval()
    return Clip(model=model, preprocess=preprocess, tokenizer=open_clip.get_tokenizer(r.model), name=name, pin=r.pin)
