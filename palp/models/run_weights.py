"""What a trained run hands to the world, in the formats stock diffusers loads.

- ``pytorch_lora_weights.safetensors``: ``StableDiffusionPipeline.load_lora_weights(dir)``
- ``pytorch_custom_diffusion_weights.safetensors`` (``--personalize custom-diffusion``, instead of the
  LoRA file): the trained key and value weights of each cross-attention layer, in diffusers'
  Custom Diffusion format; docs/training.md shows how a stock pipeline loads them
- ``layered_tokens.safetensors`` (``--personalize p-plus`` or ``neti``, instead of both other files): P+'s
  per-layer embeddings or NeTI's mappers; ``palp.models.layered_pipeline.install_layered_tokens``
  puts them into a stock pipeline
- ``learned_embeds.safetensors``: one key per placeholder token (``<v>``: (1, D));
  ``load_textual_inversion(dir)`` for one subject; for several, pass the tensors and tokens:
  ``sd = safetensors.torch.load_file(...); pipe.load_textual_inversion(list(sd.values()), token=list(sd))``.
  An SDXL run's file holds one (K, D) tensor per text encoder under the keys diffusers'
  pivotal-tuning SDXL script uses, ``clip_l`` (text_encoder, D1) and ``clip_g`` (text_encoder_2,
  D2), row k for the k-th placeholder token; the tokens are in the file's metadata (``tokens``,
  a JSON list) and in training_config.json. ``xl_embeds`` reads both back.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from palp.core import storage
from palp.core.methods import LAYERED

LORA_FILE = "pytorch_lora_weights.safetensors"
CUSTOM_DIFFUSION_FILE = "pytorch_custom_diffusion_weights.safetensors"  # = palp.models.custom_diffusion's
EMBEDS_FILE = "learned_embeds.safetensors"
LAYERED_FILE = "layered_tokens.safetensors"  # P+ and NeTI (palp.models.layered), instead of the two files above
CONFIG_FILE = "training_config.json"
METRICS_FILE = "metrics.csv"
REPORT_FILE = "report.html"  # the run's page: curves and validation grids (palp.steps.run_page)


def atomic_write_json(path: Path, obj) -> None:
    storage.write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_metrics_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    cols = list(rows[0])
    lines = [",".join(cols)] + [",".join(_fmt(r[c]) for c in cols) for r in rows]
    storage.write_text(path, "\n".join(lines) + "\n")


def read_metrics_csv(path: Path) -> list[dict]:
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    cols = lines[0].split(",")
    return [{c: (int(v) if c == "step" else float(v)) for c, v in zip(cols, line.split(","))} for line in lines[1:]]


def _fmt(v) -> str:
    return str(v) if isinstance(v, int) else f"{v:.8g}"


def lora_state_dict(unet) -> dict[str, torch.Tensor]:
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    # On the host: safetensors writes CPU and CUDA tensors but not XLA ones (.cpu() of a CPU tensor is itself).
    return {k: v.cpu() for k, v in convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)).items()}


XL_EMBED_KEYS = ("clip_l", "clip_g")  # SDXL: text_encoder's rows, text_encoder_2's rows


def learned_embeds_state_dict(model, tokens: list[str]) -> dict[str, torch.Tensor]:
    learned = model.placeholder_embedding.learned.detach().float().cpu()  # (K, D)
    if getattr(model, "text_encoder_2", None) is not None:
        return {"clip_l": learned.clone(), "clip_g": model.placeholder_embedding_2.learned.detach().float().cpu().clone()}
    return {tok: learned[i : i + 1].clone() for i, tok in enumerate(tokens)}


def xl_embeds(path: str | Path) -> tuple[list[str], torch.Tensor, torch.Tensor] | None:
    """An SDXL run's learned embeddings: (tokens, clip_l (K, D1), clip_g (K, D2)); None for an
    SD 1.x/2.x run's file (one key per token)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata() or {}
    if keys != set(XL_EMBED_KEYS):
        return None
    found = load_file(str(path))
    return json.loads(meta["tokens"]), found["clip_l"], found["clip_g"]


def weights_file(personalize: str) -> str:
    """The UNet weights file of a run that trained ``personalize``."""
    if personalize in LAYERED:
        return LAYERED_FILE
    return CUSTOM_DIFFUSION_FILE if personalize == "custom-diffusion" else LORA_FILE


def export_weights(model, tokens: list[str], out_dir: Path) -> None:
    """Write the LoRA (or the Custom Diffusion weights) and the learned embeddings into
    ``out_dir``, each file atomically."""
    from diffusers import StableDiffusionPipeline

    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".export.", dir=out_dir))
    personalize = getattr(model, "personalize", "lora-token")
    try:
        if personalize in LAYERED:  # one file: the per-layer tokens or the mappers, with their metadata
            from palp.models.layered import layered_file_contents

            tensors, metadata = layered_file_contents(model, tokens)
            save_file(tensors, str(tmp / LAYERED_FILE), metadata=metadata)
            os.replace(tmp / LAYERED_FILE, out_dir / LAYERED_FILE)
            return
        if personalize == "custom-diffusion":
            from palp.models.custom_diffusion import custom_diffusion_state_dict

            save_file(custom_diffusion_state_dict(model.unet), str(tmp / CUSTOM_DIFFUSION_FILE))
        else:
            from diffusers import StableDiffusionXLPipeline

            metadata = model.unet.peft_config["default"].to_dict()
            metadata["target_modules"] = sorted(metadata["target_modules"])
            xl = getattr(model, "text_encoder_2", None) is not None
            (StableDiffusionXLPipeline if xl else StableDiffusionPipeline).save_lora_weights(
                tmp, unet_lora_layers=lora_state_dict(model.unet), safe_serialization=True, unet_lora_adapter_metadata=metadata
            )
        embeds = learned_embeds_state_dict(model, tokens)
        save_file(embeds, str(tmp / EMBEDS_FILE), metadata={"tokens": json.dumps(tokens)} if "clip_g" in embeds else None)
        for name in (weights_file(personalize), EMBEDS_FILE):
            os.replace(tmp / name, out_dir / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
