"""What a training step is fed: its random draws (a pure function of seed, step and rank),
the text states of the prompts without learned tokens, the VAE posteriors of the subject's
photos, and the personalized model built on the base for training (palp.steps.train takes the steps)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from palp.core import methods
from palp.core.prompts import PROMPT_TEMPLATES, to_token_prompt, training_prompts
from palp.core.settings import TrainConfig
from palp.method import augment
from palp.models import speed as fast
from palp.models.layered import build_layered_model
from palp.models.personalize import PersonalizedModel, build_personalized_model

log = logging.getLogger("palp.steps.train")  # the training's logger (compile warnings)

@dataclass
class Draws:
    """The randomness of one micro-batch of B elements."""

    index: torch.Tensor  # (B,) which training image
    latent_noise: torch.Tensor  # (B, 4, h, w) sample of the VAE posterior
    t: torch.Tensor  # (B,) personalization timestep, U{0..999}
    noise: torch.Tensor  # (B, 4, h, w) eps
    t_align: torch.Tensor  # (B,) t' of the alignment term
    noise_align: torch.Tensor  # (B, 4, h, w) eps' (== eps for noise "same")
    # (B,) with --align-fraction < 1: B/k on the k rows drawn for the alignment term, 0 elsewhere;
    # None: every row (the default, and the draws are then those of a run without the option)
    align_weight: torch.Tensor | None = None
    # --prior-preservation: one class-image row per row, from its subject's class set; None without
    class_index: torch.Tensor | None = None  # (B,) which class image
    class_latent_noise: torch.Tensor | None = None  # (B, 4, h, w) sample of its VAE posterior
    class_t: torch.Tensor | None = None  # (B,) its timestep, U{0..999}
    class_noise: torch.Tensor | None = None  # (B, 4, h, w) its eps
    # --personalize neti: the NeTI mapper's hidden units each row keeps (nested dropout); None without
    truncation: torch.Tensor | None = None  # (B,)
    # --scale-augmentation: each row's rescaling (palp.method.augment.rescale_draws); None without
    rescale: torch.Tensor | None = None  # (B,) the photo's new side, in pixels
    rescale_top: torch.Tensor | None = None  # (B,) its offset (on the canvas, or of the crop)
    rescale_left: torch.Tensor | None = None  # (B,)
    rescale_phrase: torch.Tensor | None = None  # (B,) index into palp.method.augment.PHRASES
    # --prompt-templates: each row's template (index into the run's templates); None without
    template: torch.Tensor | None = None  # (B,)
    # --hflip > 0: whether each row's photo is mirrored left-right; None without
    hflip: torch.Tensor | None = None  # (B,) bool


def draw(gen: torch.Generator, cfg: TrainConfig, *, n_images: int, batch: int, latent_shape, num_timesteps: int,
         class_sets: torch.Tensor | None = None, resolution: int | None = None) -> Draws:
    """One step's draws. ``class_sets`` (with --prior-preservation): the class-image set of each
    training image, (n_images,); set k holds class images [k n, (k + 1) n), n = --num-class-images.
    ``resolution`` (with --scale-augmentation): the photos' side in pixels."""
    shape = (batch, *latent_shape)
    index = torch.randint(n_images, (batch,), generator=gen)
    latent_noise = torch.randn(shape, generator=gen)
    t = torch.randint(num_timesteps, (batch,), generator=gen)
    noise = torch.randn(shape, generator=gen)
    if cfg.align_timestep == "resample":
        t_align = torch.randint(cfg.align_t_min, cfg.align_t_max + 1, (batch,), generator=gen)
    else:
        t_align = t.clone()
    noise_align = noise.clone() if cfg.noise == "same" else torch.randn(shape, generator=gen)
    align_weight = None
    if cfg.align_fraction < 1:  # drawn last: every other draw is the same as without the option
        k = max(1, math.ceil(cfg.align_fraction * batch))
        align_weight = torch.zeros(batch)
        align_weight[torch.randperm(batch, generator=gen)[:k]] = batch / k
    prior = ()
    if cfg.prior_preservation:  # drawn after everything else: the subject rows' draws are those of a run without
        n = cfg.num_class_images
        class_index = class_sets[index] * n + torch.randint(n, (batch,), generator=gen)
        prior = (class_index, torch.randn(shape, generator=gen), torch.randint(num_timesteps, (batch,), generator=gen),
                 torch.randn(shape, generator=gen))
    draws = Draws(index, latent_noise, t, noise, t_align, noise_align, align_weight, *prior)
    if cfg.personalize == "neti" and cfg.neti_nested_dropout > 0:  # drawn last: the other draws are unchanged
        draws.truncation = nested_dropout(gen, batch, cfg.neti_hidden, cfg.neti_nested_dropout)
    if cfg.scale_augmentation:  # drawn last: the other draws are unchanged
        draws.rescale, draws.rescale_top, draws.rescale_left, draws.rescale_phrase = augment.rescale_draws(gen, batch, resolution)
    if cfg.prompt_templates != "none":  # drawn last: the other draws are unchanged
        draws.template = torch.randint(len(PROMPT_TEMPLATES[cfg.prompt_templates]), (batch,), generator=gen)
    if cfg.hflip > 0:  # drawn last: the other draws are unchanged
        draws.hflip = torch.rand(batch, generator=gen) < cfg.hflip
    return draws


def nested_dropout(gen: torch.Generator, batch: int, hidden: int, probability: float) -> torch.Tensor:
    """NeTI's nested dropout of one step: with ``probability`` (one draw for the step's batch, as
    NeTI's code draws it per batch), row i keeps its first k_i ~ U{0..hidden-1} hidden units;
    otherwise every row keeps all ``hidden``. (B,)"""
    cut = torch.rand((), generator=gen) < probability
    kept = torch.randint(hidden, (batch,), generator=gen)
    return kept if bool(cut) else torch.full((batch,), hidden)


@dataclass
class ClassImages:
    """--prior-preservation's class images, encoded once per run (on the run's device)."""

    mean: torch.Tensor  # (K n, 4, h, w) VAE posterior of each class image: K sets (class words) of n
    std: torch.Tensor  # (K n, 4, h, w)
    ids: torch.Tensor  # (K n, 77) the tokens of each image's class prompt
    sets: torch.Tensor  # (N,) the class set of each training image (on the CPU: the draws index it)


@dataclass
class ScaleAugmentation:
    """--scale-augmentation's rows (palp.method.augment): the photos (on the host) and the VAE
    (on the run's device, fp32); the phrases' prompts are in the run's ``prompt_variants``."""

    pixels: torch.Tensor  # (N, 3, R, R) on the host, in [-1, 1]
    vae: torch.nn.Module

    @property
    def resolution(self) -> int:
        return self.pixels.shape[-1]

    @torch.no_grad()
    def rows(self, index: torch.Tensor, side: torch.Tensor, top: torch.Tensor, left: torch.Tensor,
             latent_noise: torch.Tensor, hflip: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(z0, mask) of rows drawn with (``index``, side, top, left; ``hflip``: mirrored first) on
        the host and their posterior noise ``latent_noise`` (on the device): the rescaled photos' latents."""
        device = latent_noise.device
        factor = self.resolution // latent_noise.shape[-1]
        pixels = self.pixels[index]
        if hflip is not None:
            pixels = torch.where(hflip.view(-1, 1, 1, 1), pixels.flip(-1), pixels)
        photos, mask = augment.rescale_photos(pixels, side, top, left, factor)
        mean, std = encode_latent_posteriors(self.vae, photos, batch=1)  # a row's latents whatever the micro-batch
        return (mean.to(device) + std.to(device) * latent_noise), mask.to(device)


def prompt_variants(tokenizer, cfg: TrainConfig, counts: list[int]) -> torch.Tensor | None:
    """The tokens of every prompt a training row may take, (N, T, P, L) for the N photos (``counts``
    per subject): T templates (--prompt-templates; 1: the personalization prompt) x P scale
    phrases (--scale-augmentation; 1: none); None when a photo's prompt is always its y_P."""
    if cfg.prompt_templates == "none" and not cfg.scale_augmentation:
        return None
    phrases = augment.PHRASES if cfg.scale_augmentation else ("",)
    out = []
    for s, n in zip(cfg.subjects, counts):
        bases = training_prompts(s.personalization_prompt, s.placeholder, cfg.prompt_templates)
        ids = tokenize(tokenizer, [to_token_prompt(p + b) for b in bases for p in phrases])
        ids = ids.reshape(len(bases), len(phrases), *ids.shape[1:])
        out.append(ids.unsqueeze(0).expand(n, *ids.shape))
    return torch.cat(out)


def row_prompt_ids(variants: torch.Tensor, d: Draws) -> torch.Tensor:
    """The prompt tokens of the rows ``d``: each photo's template and phrase as drawn (0 where none is)."""
    zero = torch.zeros_like(d.index)
    return variants[d.index, zero if d.template is None else d.template, zero if d.rescale_phrase is None else d.rescale_phrase]


@dataclass
class ClassRows:
    """One micro-batch's class-image rows: their clean latents, class prompts' tokens and draws
    (``index``: the class image, ``t``, ``noise``; no alignment draws)."""

    z0: torch.Tensor  # (B, 4, h, w)
    input_ids: torch.Tensor  # (B, 77)
    draws: Draws


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """The generator of one step's draws, a pure function of (seed, step, rank): a resumed run
    draws exactly what the uninterrupted one would have."""
    state = np.random.SeedSequence([seed, step, rank]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed((int(state[0]) << 31) ^ int(state[1]))


@dataclass
class Conditioning:
    """Text states of the prompts that hold no learned token: computed once per run."""

    # (1, 77, D) each; SDXL: (1, 78, D1 + D2), packed (palp.models.text_conditioning)
    uncond: torch.Tensor  # the empty prompt
    clean: torch.Tensor  # y_c
    negative: torch.Tensor | None  # NFSD's negative prompt


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


@torch.no_grad()
def encode_fixed_prompts(model: PersonalizedModel, tokenizer, cfg: TrainConfig, device) -> Conditioning:
    negative = methods.METHOD_TABLE[cfg.method].negative
    prompts = ["", cfg.clean_prompt] + ([cfg.negative_prompt] if negative else [])
    states = model.encode(tokenize(tokenizer, prompts).to(device))
    uncond = model.as_unconditional(states[0:1])  # SDXL: zeros, as its pipeline's
    return Conditioning(uncond, states[1:2], states[2:3] if negative else None)


@torch.no_grad()
def encode_latent_posteriors(vae, pixels: torch.Tensor, batch: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE posterior mean and std of each image, scaled to the UNet's latent space."""
    means, stds = [], []
    sf = vae.config.scaling_factor
    for chunk in pixels.split(batch):
        dist = vae.encode(chunk.to(vae.device, vae.dtype)).latent_dist
        means.append(dist.mean.float() * sf)
        stds.append(dist.std.float() * sf)
    return torch.cat(means), torch.cat(stds)  # (N, 4, h, w) each


def setup_model(base, cfg: TrainConfig, device: torch.device, dtype: torch.dtype) -> tuple[PersonalizedModel, dict, fast.CompiledUNet]:
    """LoRA (or Custom Diffusion's deltas, per cfg.personalize) + placeholder tokens on the base model, on ``device``: frozen weights in ``dtype``,
    trainable ones in fp32, with cfg's speed options applied. Returns (model, token ids, the
    compiled UNet: its cache and eager fallback)."""
    with torch.random.fork_rng(devices=[]):  # LoRA's A matrices are drawn from --seed, not global state
        torch.manual_seed(cfg.seed)
        if cfg.personalize in methods.LAYERED:  # P+ and NeTI: per-layer tokens on the frozen UNet
            model, _, token_ids = build_layered_model(base, cfg.init_words, cfg.personalize, cfg.neti_options())
        else:
            model, _, token_ids = build_personalized_model(base, cfg.init_words, rank=cfg.lora_rank,
                                                           alpha=cfg.lora_alpha, targets=cfg.lora_targets,
                                                           personalize=cfg.personalize)
    model.to(device, dtype)
    for p in model.trainable_parameters():  # trainable parameters stay fp32
        p.data = p.data.float()
    if cfg.channels_last:
        fast.set_channels_last(model.unet, True)
    if cfg.gradient_checkpointing:
        fast.set_gradient_checkpointing(model.unet, True)
    compiled = fast.CompiledUNet(model.unet, fast.resolve_compile(cfg.compile, device), device=device,
                                 cache_folder=cfg.compile_cache, mode=cfg.compile_mode, logger=log)
    return model, token_ids, compiled
