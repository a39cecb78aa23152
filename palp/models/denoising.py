"""Denoising shared by ``palp sample`` and training's validation images: the starting noise
(one CPU generator per seed), the guided sampling loops, decoding latents to pixels and writing
PNG files.

Two loops: :func:`generate` runs a stock diffusers ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline`` (its scheduler,
text encoder and UNet, LoRA and learned tokens loaded by diffusers' own loaders);
:func:`sample_personalized` runs palp's personalized model as it is being trained, with DDIM.
"""

from __future__ import annotations

import contextlib
import io
import zlib
from pathlib import Path

import numpy as np
import torch

from palp.core import storage, xla

# The schedulers palp samples with (``--scheduler``), each built from the base model's own config.
SCHEDULERS = ("ddim", "dpm++")


def sample_seed(seed: int, prompt: str, index: int) -> int:
    """The seed of sample ``index`` of ``prompt``: independent of batching and of other prompts."""
    return int(np.random.SeedSequence([seed, zlib.crc32(prompt.encode()), index]).generate_state(1)[0])


def initial_latents(seeds: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    """(B, 4, h, w) starting noise, one CPU generator per sample (device-independent)."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])


def build_pipeline(base_path: str | Path, *, scheduler: str, device: torch.device, dtype: torch.dtype,
                   vae_dtype: torch.dtype | None = None):
    """The stock pipeline in ``dtype``, its VAE in ``vae_dtype`` (default: the same), each cast once
    from fp32: StableDiffusionXLPipeline for an SDXL model (no invisible watermark: palp writes the
    decoded pixels), StableDiffusionPipeline otherwise."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    from palp.models.base_model import check_family

    if check_family(Path(base_path), spec=str(base_path)) == "sdxl":
        pipe = StableDiffusionXLPipeline.from_pretrained(base_path, add_watermarker=False)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(base_path, safety_checker=None, feature_extractor=None,
                                                       requires_safety_checker=False)
    if scheduler == "ddim":
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    elif scheduler == "dpm++":
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++")
    else:
        raise ValueError(f"--scheduler must be one of {', '.join(SCHEDULERS)}, not {scheduler!r}")
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    for name in ("unet", "text_encoder", "text_encoder_2", "vae"):
        target = vae_dtype if name == "vae" and vae_dtype is not None else dtype
        if target != torch.float32 and getattr(pipe, name, None) is not None:
            getattr(pipe, name).to(dtype=target)
    return pipe


@torch.no_grad()
def generate(pipe, prompts: list[str], latents: torch.Tensor, *, steps: int, guidance: float) -> np.ndarray:
    """(B, H, W, 3) uint8 images: what ``pipe(prompts, latents=latents, ...)`` makes, step for
    step, without waiting for the device on every step.

    Classifier-free guidance is one UNet call of 2B rows per step. The scheduler's bookkeeping
    stays on the CPU (timesteps as Python ints; the stock loop indexes CPU tables with device
    timesteps, which waits for the device twice a step), so the loop only queues work and the
    host waits once per batch, for the finished uint8 images. The VAE decodes in its own dtype.
    """
    device = pipe.unet.device
    do_cfg = guidance > 1 and pipe.unet.config.time_cond_proj_dim is None
    states, added = text_inputs(pipe, prompts, device, do_cfg)
    scheduler = pipe.scheduler
    scheduler.set_timesteps(steps)  # on the CPU
    timesteps = scheduler.timesteps.tolist()
    on_device = scheduler.timesteps.to(device)  # the UNet's timestep input, copied once
    extra = pipe.prepare_extra_step_kwargs(None, 0.0)
    x = latents.to(device, pipe.unet.dtype) * scheduler.init_noise_sigma  # (B, 4, h, w)
    lazy = xla.is_xla(device)
    for i, t in enumerate(timesteps):
        rows = scheduler.scale_model_input(torch.cat([x, x]) if do_cfg else x, t)
        # XLA: the timestep sent as data (an index into on_device would be a constant of the
        # graph, one compile per step), and a graph cut per step, as the stock pipeline does there.
        t_in = scheduler.timesteps[i].to(device) if lazy else on_device[i]
        eps = pipe.unet(rows, t_in, encoder_hidden_states=states, added_cond_kwargs=added).sample
        if do_cfg:
            eps_uncond, eps_cond = eps.chunk(2)
            eps = eps_uncond + guidance * (eps_cond - eps_uncond)
        x = scheduler.step(eps, t, x, **extra, return_dict=False)[0]
        xla.sync(device)
    return decode_latents(pipe.vae, x)


def is_xl(pipe) -> bool:
    return getattr(pipe, "text_encoder_2", None) is not None


def text_inputs(pipe, prompts: list[str], device, do_cfg: bool) -> tuple[torch.Tensor, dict | None]:
    """The UNet's text arguments for ``prompts`` as the stock pipeline makes them, the
    unconditional rows first with ``do_cfg``: ``encoder_hidden_states`` (B or 2B, 77, D) and,
    for SDXL, ``added_cond_kwargs`` (the pooled embeddings and the time ids of the model's own
    resolution, uncropped; the empty prompt as zeros where the model says so), else None."""
    if not is_xl(pipe):
        cond, uncond = pipe.encode_prompt(prompts, device, 1, do_cfg)
        return (torch.cat([uncond, cond]) if do_cfg else cond), None
    from palp.models.text_conditioning import time_ids

    cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(prompts, device=device, num_images_per_prompt=1,
                                                             do_classifier_free_guidance=do_cfg)
    states = torch.cat([uncond, cond]) if do_cfg else cond
    pooled = torch.cat([uncond_pooled, pooled]) if do_cfg else pooled
    side = pipe.default_sample_size * pipe.vae_scale_factor
    return states, {"text_embeds": pooled, "time_ids": time_ids(side).to(device, states.dtype).expand(len(states), -1)}


@torch.no_grad()
def decode_latents(vae, x: torch.Tensor) -> np.ndarray:
    """(B, H, W, 3) uint8 images of the latents ``x`` (B, 4, h, w), decoded in the VAE's dtype."""
    image = vae.decode(x.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]  # (B, 3, H, W) in [-1, 1]
    image = ((image * 0.5 + 0.5).clamp(0, 1).float() * 255).round().to(torch.uint8)  # as diffusers' postprocess
    return image.permute(0, 2, 3, 1).cpu().numpy()


def write_png(uri: str, pixels: np.ndarray) -> None:
    """(H, W, 3) uint8 pixels as a PNG file, written atomically."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    storage.write_bytes(uri, buf.getvalue(), content_type="image/png")


@torch.no_grad()
def sample_personalized(model, vae, scheduler_config, input_ids: torch.Tensor, uncond_ids: torch.Tensor, noise: torch.Tensor,
                  *, steps: int, guidance: float, autocast=contextlib.nullcontext) -> np.ndarray:
    """(B, H, W, 3) uint8 images of the personalized ``model`` (LoRA on, its learned tokens in
    ``input_ids`` (B, 77)) from ``noise`` (B, 4, h, w), with DDIM (eta 0) and classifier-free
    guidance; ``vae`` decodes in its own dtype."""
    from diffusers import DDIMScheduler

    device = input_ids.device
    scheduler = DDIMScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(steps)
    with autocast():
        ids = torch.cat([uncond_ids.expand(len(input_ids), -1), input_ids])  # (2B, 77)
        if model.personalize == "neti":  # NeTI's states depend on the timestep: states_at moves them along
            states = model.encode(ids, torch.full((len(ids),), int(scheduler.timesteps[0]), device=device))
        else:  # (2B, 77, D); an SDXL model's empty prompt may be zeros (encode_unconditional)
            states = torch.cat([model.encode_unconditional(ids[:len(input_ids)]), model.encode(input_ids)])
        x = noise.to(device) * scheduler.init_noise_sigma
        for t in scheduler.timesteps.tolist():
            rows = torch.cat([x, x]).to(states.dtype)
            t_rows = torch.full((len(rows),), t, device=device)
            eps_uncond, eps_cond = model.predict(rows, t_rows, model.states_at(ids, t_rows, states)).float().chunk(2)
            x = scheduler.step(eps_uncond + guidance * (eps_cond - eps_uncond), t, x.float(), return_dict=False)[0]
            xla.sync(device)  # XLA: a graph per denoising step (one graph for all but the first and last), not the loop unrolled
    return decode_latents(vae, x)


def grid(images: np.ndarray, columns: int) -> np.ndarray:
    """(N, H, W, 3) -> one (rows*H, columns*W, 3) image, row-major."""
    n, h, w, c = images.shape
    rows = -(-n // columns)
    out = np.full((rows * h, columns * w, c), 255, dtype=np.uint8)
    for i, im in enumerate(images):
        r, k = divmod(i, columns)
        out[r * h : (r + 1) * h, k * w : (k + 1) * w] = im
    return out
