"""The export of ``pretrain.py``'s work folder as the shipped weights: ``sd/`` (a diffusers
Stable Diffusion folder), ``clip/`` (open_clip), ``judge/`` and recipe.json.

Each folder appears whole or not at all (``palp.core.storage.atomic_directory``); its files hold no
path of the work folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from pretrain_models import build_tokenizer

from palp.core.storage import atomic_directory, read_bytes, write_bytes, write_text


def stage_export(work: Path, out: Path):
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from safetensors.torch import save
    from transformers import CLIPTextModel

    from palp.models.tiny import SD_SCHEDULER_CONFIG

    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(work / "vae"),
        text_encoder=CLIPTextModel.from_pretrained(work / "text_encoder"),
        tokenizer=build_tokenizer(),
        unet=UNet2DConditionModel.from_pretrained(work / "unet"),
        scheduler=PNDMScheduler(**SD_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    out.mkdir(parents=True, exist_ok=True)
    with atomic_directory(out / "sd", replace=True) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        # As in SD-1.x's own scheduler_config.json: a DDIM scheduler made from this config must
        # not clip the predicted latents to [-1, 1] (the default for pixel-space models).
        sched = tmp / "scheduler" / "scheduler_config.json"
        write_text(sched, json.dumps({**json.loads(sched.read_text()), "clip_sample": False}, indent=2, sort_keys=True) + "\n")
        # The models were read from the work folder: its path is not part of the weights.
        for config in tmp.glob("*/config.json"):
            values = json.loads(config.read_text())
            if values.pop("_name_or_path", None) is not None:
                write_text(config, json.dumps(values, indent=2, sort_keys=True) + "\n")
    with atomic_directory(out / "clip", replace=True) as tmp:
        for f in ("open_clip_config.json", "open_clip_model.safetensors"):
            write_bytes(tmp / f, read_bytes(work / "clip" / f))
    with atomic_directory(out / "judge", replace=True) as tmp:
        state = torch.load(work / "judge.pt")
        write_bytes(tmp / "judge.safetensors", save({k: v.contiguous() for k, v in state.items()}))
    write_bytes(out / "recipe.json", read_bytes(work / "recipe.json"))
    big = [p for p in out.rglob("*") if p.is_file() and p.stat().st_size > 20 * 2**20]
    if big:
        raise SystemExit(f"weight files over 20 MB: {big}")
