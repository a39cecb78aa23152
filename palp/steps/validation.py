"""Validation samples during training: the current LoRA + [V] on fixed prompts and seeds.

Every ``--validation-every`` steps ``palp train`` samples its prompts (default: the target
prompt) from the same starting noise each time (one generator per seed, as ``palp sample``)
with DDIM and classifier-free guidance, and writes ``validation/step-NNNNNN.png`` (a row per
prompt, a column per seed) and ``validation/index.json`` (step, time, prompts, seeds, file per
check). Nothing here draws from the training's random stream: the starting noise comes from
per-seed generators, DDIM with eta 0 draws nothing else, and the global RNG states are forked
around the sampling anyway, so a run with validation takes bit-identical steps to one without.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from palp.models.denoising import grid, initial_latents, sample_personalized, write_png
from palp.models.run_weights import atomic_write_json

FOLDER = "validation"
INDEX = "index.json"


@dataclass(frozen=True)
class ValidationPlan:
    """What every check samples."""

    prompts: list[str]  # as written, with the placeholders
    token_prompts: list[str]  # with the learned tokens
    seeds: list[int]
    steps: int  # denoising steps
    guidance: float



def read_index(out: Path) -> list[dict]:
    """The checks a run has written so far, in step order (none: [])."""
    path = Path(out) / FOLDER / INDEX
    if not path.is_file():
        return []
    return sorted(json.loads(path.read_text()), key=lambda e: e["step"])


class Validator:
    """Samples a run's validation plan and writes its grids under ``out/validation``."""

    def __init__(self, plan: ValidationPlan, *, model, vae, scheduler_config, tokenize, latent_shape, autocast):
        self.plan = plan
        self.model, self.vae, self.scheduler_config, self.autocast = model, vae, scheduler_config, autocast
        device = vae.device
        ids = tokenize(plan.token_prompts)  # (P, 77)
        self.input_ids = ids.repeat_interleave(len(plan.seeds), 0).to(device)  # (P*S, 77): a row per prompt
        self.uncond_ids = tokenize([""]).to(device)  # (1, 77)
        self.noise = initial_latents(plan.seeds, tuple(latent_shape)).repeat(len(plan.token_prompts), 1, 1, 1)

    def images(self) -> np.ndarray:
        with torch.random.fork_rng(devices=[self.vae.device] if self.vae.device.type == "cuda" else []):
            return sample_personalized(self.model, self.vae, self.scheduler_config, self.input_ids, self.uncond_ids, self.noise,
                                 steps=self.plan.steps, guidance=self.plan.guidance, autocast=self.autocast)

    def check(self, step: int, out: Path) -> tuple[list[Path], np.ndarray, np.ndarray]:
        """Sample, write ``validation/step-NNNNNN.png`` and its index entry (a rerun of the step
        replaces both). Returns the two files written, the images (P*S, H, W, 3) and their grid."""
        images = self.images()
        pixels = grid(images, len(self.plan.seeds))
        folder = Path(out) / FOLDER
        path = folder / f"step-{step:06d}.png"
        write_png(str(path), pixels)
        entries = [e for e in read_index(out) if e["step"] != step]
        entries.append({"step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "file": path.name,
                        "prompts": self.plan.prompts, "seeds": self.plan.seeds, "steps": self.plan.steps,
                        "guidance": self.plan.guidance})
        atomic_write_json(folder / INDEX, sorted(entries, key=lambda e: e["step"]))
        return [path, folder / INDEX], images, pixels
