"""Loading the base model: a Hugging Face id, a local diffusers directory, a gs:// prefix, or a tiny model.

Every source ends as a local directory in the diffusers Stable Diffusion layout and goes
through the same ``from_pretrained`` calls, so the tiny test models and SD v1.4 share one path.
The model family follows the model's own configs (``check_family``): Stable Diffusion 1.x and
2.x (``StableDiffusionPipeline``, one text encoder, a 4-channel UNet, ``prediction_type``
``epsilon`` or ``v_prediction``) and Stable Diffusion XL (``StableDiffusionXLPipeline``, a
second text encoder with projection and its tokenizer, a UNet with ``addition_embed_type:
text_time``); anything else is refused with one line naming what was found.

Every resolved model also has a *pin* naming its exact weights, so that a later step on
another machine (``palp sample`` of a trained run) can check it loads the same ones:

- ``tiny`` (and ``tiny-sd2``, ``tiny-sd2-v``, ``tiny-sdxl``), ``toyworld``, a local directory: ``sha256:<digest>`` of the files palp loads
  (``model_index.json`` and the scheduler, tokenizer, unet, vae and text_encoder files);
- a ``gs://`` prefix: ``gcs:<digest>`` of those objects' generations (no bytes are read);
- a Hugging Face id: ``hub:<commit>``, the snapshot's commit.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from palp.core import gcs, storage
from palp.core.cache import cache_root
from palp.models import tiny
from palp.toyworld import TOYWORLD_NAME, weights_dir

# What a Stable Diffusion (1.x/2.x) directory must hold, per component. Weights come whole or
# sharded (save_pretrained's max_shard_size: numbered shards beside an .index.json naming them).
SD_LAYOUT = {
    "model_index.json": ("model_index.json",),
    "unet config": ("unet/config.json",),
    "unet weights": ("unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.bin",
                     "unet/diffusion_pytorch_model.safetensors.index.json"),
    "vae config": ("vae/config.json",),
    "vae weights": ("vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.bin",
                    "vae/diffusion_pytorch_model.safetensors.index.json"),
    "text_encoder config": ("text_encoder/config.json",),
    "text_encoder weights": ("text_encoder/model.safetensors", "text_encoder/pytorch_model.bin",
                             "text_encoder/model.safetensors.index.json"),
    "tokenizer": ("tokenizer/tokenizer.json", "tokenizer/vocab.json"),
    "scheduler config": ("scheduler/scheduler_config.json",),
}
# What an SDXL directory holds beside those: the second text encoder (with projection) and its tokenizer.
SDXL_LAYOUT = {
    "text_encoder_2 config": ("text_encoder_2/config.json",),
    "text_encoder_2 weights": ("text_encoder_2/model.safetensors", "text_encoder_2/pytorch_model.bin",
                               "text_encoder_2/model.safetensors.index.json"),
    "tokenizer_2": ("tokenizer_2/tokenizer.json", "tokenizer_2/vocab.json"),
}
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Fetch only what palp loads: no safety checker, no fp16/EMA/.bin/.ckpt duplicates of the weights.
_HUB_PATTERNS = [
    "model_index.json", "scheduler/*", "tokenizer/*", "unet/config.json", "vae/config.json", "text_encoder/config.json",
    "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
    "tokenizer_2/*", "text_encoder_2/config.json", "text_encoder_2/model.safetensors",  # SDXL's second encoder
    # sharded weights: the index and its numbered shards (not the fp16/EMA variants' shards)
    "unet/diffusion_pytorch_model.safetensors.index.json", "unet/diffusion_pytorch_model-*-of-*.safetensors",
    "vae/diffusion_pytorch_model.safetensors.index.json", "vae/diffusion_pytorch_model-*-of-*.safetensors",
    "text_encoder/model.safetensors.index.json", "text_encoder/model-*-of-*.safetensors",
    "text_encoder_2/model.safetensors.index.json", "text_encoder_2/model-*-of-*.safetensors",
]


# The folders of the layout palp loads (model_index.json beside them); a safety_checker,
# feature_extractor or README in the same folder is not part of the model palp uses.
_LOADED_FOLDERS = ("scheduler", "tokenizer", "unet", "vae", "text_encoder", "tokenizer_2", "text_encoder_2")
# Weight files that from_pretrained never reads for palp: a .bin beside its .safetensors
# (the safetensors win) and variants (fp16, ema, ...), read only when a variant is asked for.
_SAFETENSORS_TWIN = {"diffusion_pytorch_model.bin": "diffusion_pytorch_model.safetensors",
                     "pytorch_model.bin": "model.safetensors"}
_VARIANT_RE = re.compile(r"(diffusion_pytorch_model|pytorch_model|model)\.[\w-]+\.(safetensors|bin)(\.index\.json)?")


class ModelError(ValueError):
    """A base model that cannot be found, is not a Stable Diffusion layout, or is not the pinned one."""


@dataclass(frozen=True)
class ResolvedModel:
    """A base model as a local diffusers folder, and the pin of its exact weights."""

    spec: str  # the reference as given: tiny, toyworld, a directory, gs://..., ORG/NAME
    path: Path
    pin: str  # sha256:<digest> | gcs:<digest> | hub:<commit>


@dataclass
class BaseModel:
    """The frozen parts of Stable Diffusion that palp fine-tunes on top of."""

    path: Path
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    noise_scheduler: object  # DDPMScheduler with the model's training schedule
    pin: str = ""  # the exact weights (see resolve_model)
    # SDXL: the second text encoder (``tokenizer`` is then a text_conditioning.TokenizerPair of both tokenizers)
    text_encoder_2: torch.nn.Module | None = None
    force_zeros_for_empty_prompt: bool = False  # SDXL's model_index.json: the empty prompt's states are zeros

    @property
    def family(self) -> str:
        """``sd`` (Stable Diffusion 1.x/2.x) or ``sdxl``."""
        return "sd" if self.text_encoder_2 is None else "sdxl"

    def xl_conditioning(self):
        """How this SDXL model reads its text states (text_conditioning.XLConditioning); None for SD 1.x/2.x."""
        if self.text_encoder_2 is None:
            return None
        from palp.models.text_conditioning import XLConditioning

        return XLConditioning(resolution=self.resolution, pooled_dim=self.text_encoder_2.config.projection_dim,
                              zeros_for_empty_prompt=self.force_zeros_for_empty_prompt)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def resolution(self) -> int:
        """Image side the model was trained at: 512 for SD-1.x, 768 for SD 2.x's v models, 64 for tiny."""
        return self.unet.config.sample_size * self.vae_scale_factor

    @property
    def prediction_type(self) -> str:
        """What the UNet predicts, from the model's scheduler config: ``epsilon`` or ``v_prediction``."""
        return self.noise_scheduler.config.prediction_type


def _layout(path: Path) -> dict[str, tuple[str, ...]]:
    """The parts a model folder must hold: SD_LAYOUT, and SDXL_LAYOUT too where model_index.json says SDXL."""
    try:
        import json

        xl = json.loads((path / "model_index.json").read_text()).get("_class_name") == SDXL_PIPELINE
    except (OSError, ValueError, AttributeError):
        xl = False
    return {**SD_LAYOUT, **SDXL_LAYOUT} if xl else SD_LAYOUT


def missing_parts(path: Path) -> list[str]:
    return [name for name, options in _layout(path).items() if not any((path / o).is_file() for o in options)]


def check_sd_layout(path: Path, *, spec: str) -> Path:
    missing = missing_parts(path)
    if missing:
        raise ModelError(
            f"{spec} is not a Stable Diffusion model directory: missing {', '.join(missing)} "
            f"(expected the diffusers layout written by the pipeline's save_pretrained)"
        )
    check_family(path, spec=spec)
    return path


SUPPORTED_PIPELINE = "StableDiffusionPipeline"
SDXL_PIPELINE = "StableDiffusionXLPipeline"
PREDICTION_TYPES = ("epsilon", "v_prediction")
_SUPPORTED = ("palp personalizes Stable Diffusion 1.x and 2.x (StableDiffusionPipeline) and "
              "Stable Diffusion XL (StableDiffusionXLPipeline) base models only")


def _config(path: Path, name: str, spec: str) -> dict:
    import json

    try:
        found = json.loads((path / name).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ModelError(f"{spec}: {name} cannot be read as JSON ({type(e).__name__}: {e})") from None
    if not isinstance(found, dict):
        raise ModelError(f"{spec}: {name} is not a JSON object")
    return found


def check_pipeline_class(path: Path, *, spec: str) -> str:
    """The part of :func:`check_family` that model_index.json alone decides; returns the family, ``sd`` or ``sdxl``."""
    index = _config(path, "model_index.json", spec)
    cls = index.get("_class_name")
    second = [k for k in ("text_encoder_2", "tokenizer_2") if k in index or (path / k).is_dir()]
    if cls == SUPPORTED_PIPELINE and not second:
        return "sd"
    if cls == SDXL_PIPELINE:
        encoder_2 = index.get("text_encoder_2")
        lacks = [k for k in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2") if not any(index.get(k) or ())]
        if lacks:
            raise ModelError(f"{spec} is a {cls} model without {', '.join(lacks)} in its model_index.json "
                             f"(a refiner or a single-encoder variant); {_SUPPORTED}")
        if list(encoder_2) != ["transformers", "CLIPTextModelWithProjection"]:
            raise ModelError(f"{spec} is a {cls} model whose text_encoder_2 is {encoder_2}, not transformers' "
                             f"CLIPTextModelWithProjection; {_SUPPORTED}")
        return "sdxl"
    what = f"a {cls} model" if cls else "a model whose model_index.json names no pipeline class"
    if second and cls == SUPPORTED_PIPELINE:
        what += f" with a second text encoder ({', '.join(second)})"
    raise ModelError(f"{spec} is {what}; {_SUPPORTED}")


def check_family(path: Path, *, spec: str) -> str:
    """Refuse, in one line naming what was found, a model that is neither Stable Diffusion
    1.x/2.x nor SDXL: another pipeline class, a second text encoder in a StableDiffusionPipeline,
    a UNet that does not denoise 4 latent channels from text alone (inpainting, depth), added
    UNet conditions other than SDXL's ``text_time`` (and those outside SDXL), or a prediction
    type other than epsilon and v_prediction. Returns the family, ``sd`` or ``sdxl``."""
    family = check_pipeline_class(path, spec=spec)
    unet = _config(path, "unet/config.json", spec)
    latent = _config(path, "vae/config.json", spec).get("latent_channels", 4)
    if unet.get("in_channels", 4) != latent or unet.get("out_channels", 4) != latent:
        raise ModelError(f"{spec}'s UNet takes {unet.get('in_channels')} and gives {unet.get('out_channels')} channels, "
                         f"its VAE's latents have {latent} (an inpainting, depth or other conditioned model); {_SUPPORTED}")
    extra = {k: unet[k] for k in ("addition_embed_type", "class_embed_type", "encoder_hid_dim") if unet.get(k)}
    if family == "sdxl" and extra.pop("addition_embed_type", None) != "text_time":
        raise ModelError(f"{spec} is a {SDXL_PIPELINE} model whose UNet does not take SDXL's added conditions "
                         f"(addition_embed_type: {unet.get('addition_embed_type')}, expected text_time); {_SUPPORTED}")
    if extra:
        raise ModelError(f"{spec}'s UNet takes added conditions ({', '.join(f'{k}: {v}' for k, v in extra.items())}); "
                         f"{_SUPPORTED}")
    scheduler = _config(path, "scheduler/scheduler_config.json", spec)
    prediction = scheduler.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise ModelError(f"{spec}'s scheduler config says prediction_type {prediction!r}; palp trains "
                         f"{' and '.join(PREDICTION_TYPES)} models only")
    return family


def loaded_files(names: Iterable[str]) -> list[str]:
    """Of a model folder's relative file names, those palp loads (and so pins), sorted."""
    names = set(names)
    picked = []
    for name in names:
        parts = name.split("/")
        if name == "model_index.json":
            picked.append(name)
        elif len(parts) > 1 and parts[0] in _LOADED_FOLDERS:
            base = parts[-1]
            twin = _SAFETENSORS_TWIN.get(base)
            if twin and "/".join([*parts[:-1], twin]) in names or _VARIANT_RE.fullmatch(base):
                continue
            picked.append(name)
    return sorted(picked)


def folder_pin(path: str | Path) -> str:
    """``sha256:`` + the digest of the files palp loads from a local diffusers folder."""
    names = loaded_files(storage.list_files(path, recursive=True))
    return "sha256:" + storage.folder_digest(path, names)


def resolve_model(spec: str, *, cache_dir: str | Path | None = None, pin: str | None = None) -> ResolvedModel:
    """Turn ``tiny``, ``toyworld``, a local directory, a ``gs://`` prefix or a hub id into a
    local diffusers folder and the pin of its weights.

    With ``pin`` (the one a run was trained with) the weights must be those: a hub id fetches
    that commit; anything else that now holds other weights is a ModelError, raised before a
    gs:// prefix is downloaded.
    """
    return _resolve(str(spec), cache_dir=cache_dir, pin=pin or None, hash_local=True)


def resolve_model_dir(spec: str, *, cache_dir: str | Path | None = None) -> Path:
    """Turn ``tiny``, ``toyworld``, a local directory, a ``gs://`` prefix or a hub id into a local directory."""
    return _resolve(str(spec), cache_dir=cache_dir, pin=None, hash_local=False).path


def portable_reference(spec: str) -> str:
    """The model reference as another machine can resolve it: as given, except that a local
    directory becomes its absolute path (hub ids, gs:// prefixes, tiny and toyworld unchanged)."""
    spec = str(spec)
    if spec in tiny.TINY_MODELS or spec == TOYWORLD_NAME or gcs.is_gcs(spec):
        return spec
    path = Path(spec).expanduser()
    return os.path.abspath(path) if path.is_dir() else spec


def pin_mismatch(spec: str, expected: str, found: str) -> ModelError:
    restore = {**{name: "build it with the palp, torch and diffusers versions the run was trained with" for name in tiny.TINY_MODELS},
               TOYWORLD_NAME: "use the palp version the run was trained with (it ships the toy-world weights)",
               }.get(spec, f"restore those exact weights at {spec}")
    return ModelError(
        f"base model {spec} is not the one the run was trained with: the run was trained with {expected}, "
        f"{spec} now has {found}; {restore}, or retrain the run"
    )


def _resolve(spec: str, *, cache_dir, pin: str | None, hash_local: bool) -> ResolvedModel:
    cache = Path(cache_dir) if cache_dir else cache_root()
    if spec in tiny.TINY_MODELS:
        return _local(spec, check_sd_layout(tiny.tiny_model_dir(spec), spec=spec), pin, hash_local)
    if spec == TOYWORLD_NAME:
        return _local(spec, check_sd_layout(weights_dir("sd"), spec=spec), pin, hash_local)
    if gcs.is_gcs(spec):
        return _gcs(spec, cache, pin)
    path = Path(spec).expanduser()
    if path.is_dir():
        return _local(spec, check_sd_layout(path, spec=spec), pin, hash_local)
    if path.exists():
        raise ModelError(f"{spec} is a file; --pretrained-model wants a model directory, hub id, gs:// prefix, "
                         f"'tiny', 'tiny-sd2', 'tiny-sd2-v', 'tiny-sdxl' or 'toyworld'")
    if not _HUB_ID_RE.match(spec) or spec.startswith((".", "/", "~")):
        raise ModelError(f"model {spec!r} not found: no such directory, and it is not a Hugging Face id (ORG/NAME)")
    if pin is None:
        _hub_index_first(spec)
        snapshot = _hub_snapshot(spec)
    elif not pin.startswith("hub:"):
        raise pin_mismatch(spec, pin, "weights from the Hugging Face hub")
    else:
        snapshot = _hub_pinned_snapshot(spec, pin.removeprefix("hub:"))
    found = "hub:" + snapshot.name
    if pin is not None and pin != found:
        raise pin_mismatch(spec, pin, found)
    return ResolvedModel(spec, check_sd_layout(snapshot, spec=spec), found)


def _local(spec: str, path: Path, pin: str | None, hash_local: bool) -> ResolvedModel:
    found = folder_pin(path) if hash_local or pin is not None else ""
    if pin is not None and pin != found:
        raise pin_mismatch(spec, pin, found)
    return ResolvedModel(spec, path, found)


def _gcs(spec: str, cache: Path, pin: str | None) -> ResolvedModel:
    """Pin a gs:// prefix by its objects' generations; download into a cache folder keyed by
    the prefix and that pin, so a replaced object is fetched again, never served stale."""
    from google.api_core.exceptions import NotFound

    try:
        every = gcs.object_generations(spec)
    except NotFound as e:
        raise ModelError(f"nothing found under {spec}: no such bucket ({type(e).__name__})") from e
    if not every:
        raise ModelError(f"nothing found under {spec}; check the bucket and prefix")
    versions = {n: every[n] for n in loaded_files(every)}
    layout = {**SD_LAYOUT, **SDXL_LAYOUT} if any(n.startswith("text_encoder_2/") for n in versions) else SD_LAYOUT
    missing = [part for part, options in layout.items() if not any(o in versions for o in options)]
    if missing:
        raise ModelError(
            f"{spec} is not a Stable Diffusion model prefix: missing {', '.join(missing)} "
            f"(expected the diffusers layout written by StableDiffusionPipeline.save_pretrained)"
        )
    found = "gcs:" + storage.versions_digest(versions)
    if pin is not None and pin != found:
        raise pin_mismatch(spec, pin, found)
    dest = storage.cache_dir(f"{spec.rstrip('/')}@{found}", cache=cache, kind="gcs")
    if not dest.exists():
        _download_versions(spec, versions, dest)
    return ResolvedModel(spec, check_sd_layout(dest, spec=spec), found)


def _download_versions(uri: str, versions: dict[str, int], dest: Path) -> None:
    """Fetch exactly these generations into ``dest`` (atomically); a listing that changed
    meanwhile (an object replaced mid-download) leaves nothing behind and is a ModelError."""
    with storage.atomic_directory(dest) as tmp:
        for name, generation in versions.items():
            _download_generation(storage.join(uri, name), generation, tmp / name)
        now = gcs.object_generations(uri)
        changed = sorted(n for n in versions if now.get(n) != versions[n])
        if changed:
            raise ModelError(f"{uri} changed while it was being downloaded ({', '.join(changed)} replaced); run again")


@gcs.with_retries
def _download_generation(uri: str, generation: int, dest: Path) -> None:
    from google.api_core.exceptions import NotFound

    bucket, name = gcs.split_gcs(uri)
    dest.parent.mkdir(parents=True, exist_ok=True)
    blob = gcs.gcs_client().bucket(bucket).blob(name, generation=generation)
    try:
        blob.download_to_filename(str(dest))
    except NotFound as e:
        raise ModelError(f"{uri} changed while it was being downloaded (generation {generation} is gone); run again") from e


def _hub_index_first(repo_id: str) -> None:
    """Fetch (or find cached) the repository's model_index.json alone and refuse a family palp
    does not train (SDXL, ...) before gigabytes of its weights are downloaded. Anything that
    goes wrong here is left to the full fetch, which says what it is."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=["model_index.json"]))
    except Exception:  # noqa: BLE001 - reported by _hub_snapshot
        return
    if (folder / "model_index.json").is_file():
        check_pipeline_class(folder, spec=repo_id)


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


def _hub_pinned_snapshot(repo_id: str, commit: str) -> Path:
    """The snapshot of exactly ``commit`` (from the cache, or fetched where the hub is reachable)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=commit, allow_patterns=_HUB_PATTERNS))
    except (RepositoryNotFoundError, LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        raise ModelError(
            f"base model {repo_id}: the run was trained with revision {commit} (pin hub:{commit}), which is not "
            f"in the Hugging Face cache and could not be fetched ({type(e).__name__}); {_hub_available(repo_id)}. "
            f"Fetch that revision where the hub is reachable (hf download {repo_id} --revision {commit}), "
            f"or retrain the run"
        ) from e


def _hub_available(repo_id: str) -> str:
    """Best effort: the revisions of ``repo_id`` there are now (the hub's main, the cached ones)."""
    from huggingface_hub import constants

    said = []
    if not constants.HF_HUB_OFFLINE:
        try:
            from huggingface_hub import HfApi

            said.append(f"the hub's main is at {HfApi().model_info(repo_id).sha}")
        except Exception:  # noqa: BLE001 - only a hint in an error message
            pass
    snapshots = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    cached = sorted(p.name for p in snapshots.iterdir() if p.is_dir()) if snapshots.is_dir() else []
    said.append("the local cache holds " + (", ".join(f"hub:{c}" for c in cached) if cached else "no revision of it"))
    return "; ".join(said)


def load_base_model(spec: str, *, cache_dir: str | Path | None = None, pin: str | None = None) -> BaseModel:
    """Load the frozen base model (fp32; precision is the trainer's choice); ``pin``: see resolve_model."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    resolved = resolve_model(spec, cache_dir=cache_dir, pin=pin)
    path = resolved.path
    family = check_family(path, spec=spec)  # refused before anything is loaded
    tokenizer, xl = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer"), {}
    if family == "sdxl":  # the second encoder and tokenizer, and the empty prompt's rule
        from transformers import CLIPTextModelWithProjection

        from palp.models.text_conditioning import TokenizerPair

        tokenizer = TokenizerPair(tokenizer, CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2"))
        xl = {"text_encoder_2": CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2"),
              "force_zeros_for_empty_prompt": bool(_config(path, "model_index.json", spec).get("force_zeros_for_empty_prompt", True))}
    return BaseModel(
        path=path,
        unet=UNet2DConditionModel.from_pretrained(path, subfolder="unet"),
        vae=AutoencoderKL.from_pretrained(path, subfolder="vae"),
        text_encoder=CLIPTextModel.from_pretrained(path, subfolder="text_encoder"),
        tokenizer=tokenizer,
        noise_scheduler=DDPMScheduler.from_pretrained(path, subfolder="scheduler"),
        pin=resolved.pin,
        **xl,
    )
