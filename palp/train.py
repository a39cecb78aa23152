"""PALP training: one step (``step_losses``) and a short loop (``train``).

A step, per ../shared/PALP.md: the personalization loss on the subject's images (Eq. 1) and,
for ``palp``/``sds``/``nfsd``, a score-sampling term on the re-noised clean estimate (Eq. 6)
that flows into the parameters through the same graph (Eq. 7): one backward per step.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from palp import __version__, checkpoints, guidance, storage
from palp.config import TrainConfig
from palp.data import load_subject_images
from palp.export import CONFIG_FILE, EMBEDS_FILE, LORA_FILE, METRICS_FILE, atomic_write_json, export_weights, write_metrics_csv
from palp.models import load_base_model
from palp.personalize import PersonalizedModel, build_personalized_model
from palp.prompts import placeholder_token, to_token_prompt

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training stopped; the message says at which step and why."""


@dataclass
class Draws:
    """The randomness of one micro-batch of B elements."""

    index: torch.Tensor  # (B,) which training image
    latent_noise: torch.Tensor  # (B, 4, h, w) sample of the VAE posterior
    t: torch.Tensor  # (B,) personalization timestep, U{0..999}
    noise: torch.Tensor  # (B, 4, h, w) eps
    t_align: torch.Tensor  # (B,) t' of the alignment term
    noise_align: torch.Tensor  # (B, 4, h, w) eps' (== eps for noise "same")


def draw(gen: torch.Generator, cfg: TrainConfig, *, n_images: int, batch: int, latent_shape, num_timesteps: int) -> Draws:
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
    return Draws(index, latent_noise, t, noise, t_align, noise_align)


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """The generator of one step's draws, a pure function of (seed, step, rank): a resumed run
    draws exactly what the uninterrupted one would have."""
    state = np.random.SeedSequence([seed, step, rank]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed((int(state[0]) << 31) ^ int(state[1]))


@dataclass
class Conditioning:
    """Text states of the prompts that hold no learned token: computed once per run."""

    uncond: torch.Tensor  # (1, 77, D) the empty prompt
    clean: torch.Tensor  # (1, 77, D) y_c
    negative: torch.Tensor | None  # (1, 77, D) NFSD's negative prompt


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


@torch.no_grad()
def encode_fixed_prompts(model: PersonalizedModel, tokenizer, cfg: TrainConfig, device) -> Conditioning:
    prompts = ["", cfg.clean_prompt] + ([cfg.negative_prompt] if cfg.method == "nfsd" else [])
    states = model.encode(tokenize(tokenizer, prompts).to(device))
    return Conditioning(states[0:1], states[1:2], states[2:3] if cfg.method == "nfsd" else None)


def step_losses(
    model: PersonalizedModel, *, z0: torch.Tensor, input_ids: torch.Tensor, draws: Draws, cond: Conditioning,
    alphas_cumprod: torch.Tensor, cfg: TrainConfig, pretrained: PersonalizedModel | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of one micro-batch; its gradient is Eq. 1's plus lambda times Eq. 6/7's.

    ``model`` may be the accelerate-wrapped module (its forward carries the gradient);
    ``pretrained`` is the unwrapped one, used for the no-grad guidance branches.
    """
    pretrained = pretrained or model
    ab_t = alphas_cumprod[draws.t]  # (B,)
    z_t = guidance.add_noise(z0, draws.noise, ab_t)  # (B, 4, h, w)
    eps_pred, states = model(z_t, draws.t, input_ids)  # personalization prediction, with grad
    rec = F.mse_loss(eps_pred.float(), draws.noise.float())
    metrics = {"rec_loss": rec.detach()}
    if cfg.method == "ti-db":
        return rec, metrics

    with torch.no_grad():
        B = z0.shape[0]
        x0_hat = guidance.predict_x0(z_t, eps_pred.detach(), ab_t)  # Eq. 2
        x_t2 = guidance.add_noise(x0_hat, draws.noise_align, alphas_cumprod[draws.t_align])  # step 3
        fixed = [cond.uncond, cond.clean] + ([cond.negative] if cfg.method == "nfsd" else [])
        k = len(fixed)
        # Pretrained branch: adapters off, no placeholder; uncond and prompts in one call.
        with pretrained.adapters_disabled():
            pre = pretrained.predict(
                x_t2.repeat(k, 1, 1, 1), draws.t_align.repeat(k), torch.cat([s.expand(B, -1, -1) for s in fixed])
            ).float().chunk(k)
        if cfg.method == "palp":
            # Personalized branch: LoRA on, y_P (the states the grad branch just used). With
            # beta = 1, G^beta is the conditional prediction alone: no unconditional half.
            if cfg.beta == 1.0:
                pers_cond = pretrained.predict(x_t2, draws.t_align, states.detach()).float()
                pers = (pers_cond, pers_cond)
            else:
                pers = pretrained.predict(
                    x_t2.repeat(2, 1, 1, 1), draws.t_align.repeat(2), torch.cat([cond.uncond.expand(B, -1, -1), states.detach()])
                ).float().chunk(2)
            delta = guidance.palp_delta(
                pre_uncond=pre[0], pre_clean=pre[1], pers_uncond=pers[0], pers_cond=pers[1], alpha=cfg.alpha, beta=cfg.beta
            )
        elif cfg.method == "sds":
            delta = guidance.sds_delta(pre_uncond=pre[0], pre_clean=pre[1], noise=draws.noise_align.float(), alpha=cfg.alpha)
        else:  # nfsd
            delta = guidance.nfsd_delta(pre_uncond=pre[0], pre_clean=pre[1], pre_negative=pre[2], t=draws.t_align, alpha=cfg.alpha)
        coefficient = cfg.lam * guidance.alignment_coefficient(ab_t.float(), rescale=cfg.rescale)
    align = guidance.alignment_surrogate(eps_pred.float(), delta, coefficient)
    metrics["align_loss"] = delta.pow(2).mean()  # the size of the score; align's value itself is not a loss
    return rec + align, metrics


@dataclass
class TrainResult:
    output: Path
    model: PersonalizedModel
    tokenizer: object
    metrics: list[dict]


def _weight_dtype(mixed_precision: str) -> torch.dtype:
    return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]


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


def train(cfg: TrainConfig, *, resume: bool = False, progress: bool = True) -> TrainResult:
    """Fine-tune LoRA + [V] tokens with the configured method; write a loadable result."""
    from accelerate import Accelerator, PartialState
    from accelerate.state import AcceleratorState, GradientState

    # A gs:// output trains in a local working folder mirrored to the bucket: checkpoints are
    # pushed as they are written and pulled back on --resume (a preempted job on a new machine).
    remote = cfg.output if storage.is_gcs(cfg.output) else None
    out = checkpoints.pull(remote, resume=resume) if remote else Path(cfg.output)
    checkpoints.check_output(out, resume=resume)
    # Everything that can fail on bad input fails here, before anything is written.
    base = load_base_model(cfg.pretrained_model)
    images = [load_subject_images(s.placeholder, s.images, resolution=base.resolution, min_size=cfg.min_image_size) for s in cfg.subjects]

    micro, accum = cfg.accumulation(PartialState().num_processes)
    # accelerate keeps its settings in process-wide singletons; one process may train several
    # times (a local pipeline, a notebook) with other precisions or accumulation.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=accum)
    device, dtype = accelerator.device, _weight_dtype(cfg.mixed_precision)

    with torch.random.fork_rng(devices=[]):  # LoRA's A matrices are drawn from --seed, not global state
        torch.manual_seed(cfg.seed)
        model, _, token_ids = build_personalized_model(base, cfg.class_words, rank=cfg.lora_rank, alpha=cfg.lora_alpha)
    base.vae.to(device)  # used once, to encode the images: kept in fp32
    model.to(device, dtype)
    for p in model.trainable_parameters():  # trainable parameters stay fp32
        p.data = p.data.float()
    tokens = [placeholder_token(p) for p in token_ids]

    pixels = torch.cat([im.pixels for im in images])
    mean, std = encode_latent_posteriors(base.vae, pixels)
    ids_per_subject = tokenize(base.tokenizer, [to_token_prompt(s.personalization_prompt) for s in cfg.subjects])
    image_ids = torch.cat([ids_per_subject[i].expand(len(im.paths), -1) for i, im in enumerate(images)])  # (N, 77)
    alphas_cumprod = base.noise_scheduler.alphas_cumprod.to(device)
    cond = encode_fixed_prompts(model, base.tokenizer, cfg, device)

    # The fused kernel on CUDA (one launch for all parameters); the same update.
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  fused=accelerator.device.type == "cuda")
    wrapped, optimizer = accelerator.prepare(model, optimizer)

    run_config = {
        **cfg.to_dict(), "palp_version": __version__, "base_model_path": str(base.path), "resolution": base.resolution,
        "placeholder_tokens": dict(zip(token_ids, tokens)), "class_words": cfg.class_words,
        "micro_batch_size": micro, "gradient_accumulation_steps": accum, "num_processes": accelerator.num_processes,
        "training_images": {im.placeholder: [str(p) for p in im.paths] for im in images},
    }
    start, rows = 0, []
    if accelerator.is_main_process:
        checkpoints.record_config(out, run_config, resume=resume)
    if resume:
        start, rows = checkpoints.load_latest(out, model, optimizer)
        for group in optimizer.param_groups:  # the optimizer state carries the old lr
            group["lr"] = cfg.lr

    bar = tqdm(range(start + 1, cfg.steps + 1), initial=start, total=cfg.steps, desc=f"palp train ({cfg.method})",
               disable=not (progress and accelerator.is_local_main_process))
    trainable = model.trainable_parameters()
    for step in bar:
        sums: dict[str, float] = {}
        # One draw for the whole per-process batch: results do not depend on the micro-batch size.
        full = draw(step_generator(cfg.seed, step, accelerator.process_index), cfg, n_images=len(mean),
                    batch=micro * accum, latent_shape=mean.shape[1:], num_timesteps=len(alphas_cumprod))
        for i in range(accum):
            with accelerator.accumulate(wrapped):
                d = Draws(*(x[i * micro : (i + 1) * micro] for x in dataclasses.astuple(full)))
                z0 = (mean[d.index] + std[d.index] * d.latent_noise).to(device, dtype)  # (B, 4, h, w)
                d = Draws(*(x.to(device) for x in dataclasses.astuple(d)))
                d.noise, d.noise_align = d.noise.to(dtype), d.noise_align.to(dtype)
                with accelerator.autocast():
                    loss, m = step_losses(wrapped, z0=z0, input_ids=image_ids[d.index.cpu()].to(device), draws=d,
                                          cond=cond, alphas_cumprod=alphas_cumprod, cfg=cfg, pretrained=model)
                if not torch.isfinite(loss):
                    raise TrainingError(_non_finite(step, "loss", out))
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    norm = accelerator.clip_grad_norm_(trainable, cfg.max_grad_norm or math.inf)
                    if not torch.isfinite(norm):
                        raise TrainingError(_non_finite(step, "gradient", out))
                    sums["grad_norm"] = float(norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach()) / accum
            for key, v in m.items():
                sums[key] = sums.get(key, 0.0) + float(v) / accum
        row = {"step": step, "loss": sums["loss"], "rec_loss": sums["rec_loss"], "align_loss": sums.get("align_loss", 0.0),
               "grad_norm": sums["grad_norm"], "lr": optimizer.param_groups[0]["lr"]}
        rows.append(row)
        bar.set_postfix(rec=f"{row['rec_loss']:.4f}", align=f"{row['align_loss']:.4f}", gn=f"{row['grad_norm']:.3f}")
        if accelerator.is_main_process:
            if step in cfg.save_steps:
                snapshot = out / "snapshots" / f"step-{step:06d}"
                export_weights(model, tokens, snapshot)
                if remote:
                    storage.upload_dir(snapshot, storage.join(remote, "snapshots", snapshot.name))
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                saved = checkpoints.save(out, step, model, optimizer, rows, keep=cfg.checkpoints_total_limit)
                if remote:
                    checkpoints.push(saved, remote)
        accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        export_weights(model, tokens, out)
        write_metrics_csv(out / METRICS_FILE, rows)
        atomic_write_json(out / CONFIG_FILE, {**run_config, "completed_steps": cfg.steps})  # written last: the run is done
        if remote:
            for name in (LORA_FILE, EMBEDS_FILE, METRICS_FILE, CONFIG_FILE):  # the config last, as locally
                storage.write_bytes(storage.join(remote, name), (out / name).read_bytes())
    accelerator.wait_for_everyone()
    return TrainResult(out, model, base.tokenizer, rows)


def _non_finite(step: int, what: str, out: Path) -> str:
    last = checkpoints.latest_step(out)
    keep = f"the last good checkpoint (step {last}) is intact; rerun with --resume" if last else "no checkpoint was written yet"
    return f"non-finite {what} at step {step}: training stopped ({keep}); lower --lr or use --mixed-precision no"


__all__ = ["train", "step_losses", "draw", "Draws", "Conditioning", "TrainResult", "TrainingError", "LORA_FILE"]
