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

LORA_FILE = "pytorch_lora_weights.safetensors"
CUSTOM_DIFFUSION_FILE = "pytorch_custom_diffusion_weights.safetensors"  # = palp.models.custom_diffusion's
EMBEDS_FILE = "learned_embeds.safetensors"
LAYERED_FILE = "layered_tokens.safetensors"  # P+ and NeTI (= palp.models.layered's), instead of the two files above
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


def learned_embeds_state_dict(model, tokens: list[str]) -> dict[str, torch.Tensor]:
    learned = model.placeholder_embedding.learned.detach().float().cpu()  # (K, D)
    return {tok: learned[i : i + 1].clone() for i, tok in enumerate(tokens)}


def weights_file(personalize: str) -> str:
    """The UNet weights file of a run that trained ``personalize``."""
    if personalize in ("p-plus", "neti"):
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
        if personalize in ("p-plus", "neti"):  # one file: the per-layer tokens or the mappers, with their metadata
            from palp.models.layered import layered_file_contents

            tensors, metadata = layered_file_contents(model, tokens)
            save_file(tensors, str(tmp / LAYERED_FILE), metadata=metadata)
            os.replace(tmp / LAYERED_FILE, out_dir / LAYERED_FILE)
            return
        if personalize == "custom-diffusion":
            from palp.models.custom_diffusion import custom_diffusion_state_dict

            save_file(custom_diffusion_state_dict(model.unet), str(tmp / CUSTOM_DIFFUSION_FILE))
        else:
            metadata = model.unet.peft_config["default"].to_dict()
            metadata["target_modules"] = sorted(metadata["target_modules"])
            StableDiffusionPipeline.save_lora_weights(
                tmp, unet_lora_layers=lora_state_dict(model.unet), safe_serialization=True, unet_lora_adapter_metadata=metadata
            )
        save_file(learned_embeds_state_dict(model, tokens), str(tmp / EMBEDS_FILE))
        for name in (weights_file(personalize), EMBEDS_FILE):
            os.replace(tmp / name, out_dir / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
