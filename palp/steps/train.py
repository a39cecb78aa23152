"""PALP training: one step (``step_losses``; its inputs in palp/method/step_inputs.py) and a short loop (``train``).

A step, per docs/method.md: the personalization loss on the subject's images (Eq. 1) and,
for ``palp``/``sds``/``nfsd``, a score-sampling term on the re-noised clean estimate (Eq. 6)
that flows into the parameters through the same graph (Eq. 7): one backward per step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from palp import __version__
from palp.core import methods, tracking, xla
from palp.core.locks import Held, output_lock
from palp.core.memory import is_out_of_memory, release_memory
from palp.core.precision import weight_dtype
from palp.core.preemption import StopRequests
from palp.core.prompts import PROMPT_TEMPLATES, placeholder_token, to_token_prompt
from palp.core.reproducible import reproducible, resolve_threads
from palp.core.settings import ConfigError, TrainConfig, method_label
from palp.core.subject_images import load_subject_images
from palp.method import guidance
from palp.method.step_inputs import (ClassImages, ClassRows, Conditioning, Draws, ScaleAugmentation, draw,
                                     encode_fixed_prompts, encode_latent_posteriors, prompt_variants, row_prompt_ids,
                                     setup_model, step_generator, tokenize)
from palp.models import speed as fast
from palp.models.base_model import load_base_model, portable_reference
from palp.models.lora_gate import row_flags
from palp.models.personalize import PersonalizedModel
from palp.models.run_weights import LORA_FILE, REPORT_FILE
from palp.steps import checkpoints
from palp.steps.checkpoints import RunOutput
from palp.steps.run_page import training_report
from palp.steps.validation import ValidationPlan, Validator

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training stopped; the message says at which step and why."""


def step_losses(
    model: PersonalizedModel, *, z0: torch.Tensor, input_ids: torch.Tensor, draws: Draws, cond: Conditioning,
    alphas_cumprod: torch.Tensor, cfg: TrainConfig, pretrained: PersonalizedModel | None = None,
    prediction_type: str = "epsilon", prior: ClassRows | None = None, reconstruction_only: bool = False,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of one micro-batch; its gradient is Eq. 1's plus lambda times Eq. 6/7's.

    ``model`` may be the accelerate-wrapped module (its forward carries the gradient);
    ``pretrained`` is the unwrapped one, used for the no-grad guidance branches.
    ``prediction_type``: the base model's output, ``epsilon`` or ``v_prediction`` (docs/method.md).
    ``prior`` (--prior-preservation): the class-image rows, whose reconstruction loss (the
    same Eq. 1, no alignment term) is added times --prior-weight. ``reconstruction_only``:
    Eq. 1 alone, whatever the method. ``mask`` (--scale-augmentation, (B, 1, h, w)): Eq. 1 over
    each row's rescaled photo only.
    """
    if prior is not None:  # DreamBooth's prior preservation
        loss, m = step_losses(model, z0=z0, input_ids=input_ids, draws=draws, cond=cond, alphas_cumprod=alphas_cumprod,
                              cfg=cfg, pretrained=pretrained, prediction_type=prediction_type, mask=mask)
        prior_rec, _ = step_losses(model, z0=prior.z0, input_ids=prior.input_ids, draws=prior.draws, cond=cond,
                                   alphas_cumprod=alphas_cumprod, cfg=cfg, prediction_type=prediction_type,
                                   reconstruction_only=True)
        return loss + cfg.prior_weight * prior_rec, {**m, "prior_loss": prior_rec.detach()}
    pretrained = pretrained or model
    method = methods.METHOD_TABLE[cfg.method]
    if prediction_type not in guidance.PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {', '.join(guidance.PREDICTION_TYPES)}, not {prediction_type!r}")
    v_model = prediction_type == "v_prediction"
    ab_t = alphas_cumprod[draws.t]  # (B,)
    z_t = guidance.add_noise(x0=z0, noise=draws.noise, alpha_bar=ab_t)  # (B, 4, h, w)
    extra = {} if draws.truncation is None else {"truncation": draws.truncation}  # NeTI's nested dropout
    eps_pred, states = model(z_t, draws.t, input_ids, **extra)  # personalization prediction (v for a v-model), with grad
    target = guidance.v_target(x0=z0, noise=draws.noise, alpha_bar=ab_t) if v_model else draws.noise
    if not method.aligns or reconstruction_only:
        loss, rec = guidance.step_loss(eps_pred=eps_pred, noise=target, mask=mask)
        return loss, {"rec_loss": rec.detach()}

    rows = None
    if draws.align_weight is not None:  # --align-fraction: the term on the drawn rows only, rescaled
        rows = torch.nonzero(draws.align_weight).flatten()  # a host sync, only with the option
        if rows.numel() == 0:  # none of this micro-batch's rows was drawn
            loss, rec = guidance.step_loss(eps_pred=eps_pred, noise=target, mask=mask)
            return loss, {"rec_loss": rec.detach(), "align_loss": torch.zeros((), device=rec.device)}
    delta, coefficient, size = _alignment_term(pretrained, method, cfg, z_t=z_t, eps_pred=eps_pred, states=states,
                                               input_ids=input_ids, draws=draws, cond=cond, alphas_cumprod=alphas_cumprod,
                                               rows=rows, v_model=v_model)
    loss, rec = guidance.step_loss(eps_pred=eps_pred, noise=target, delta=delta, coefficient=coefficient, mask=mask)
    return loss, {"rec_loss": rec.detach(), "align_loss": size}


@torch.no_grad()
def _alignment_term(pretrained: PersonalizedModel, method: methods.Method, cfg: TrainConfig, *, z_t: torch.Tensor,
                    eps_pred: torch.Tensor, states: torch.Tensor, input_ids: torch.Tensor, draws: Draws,
                    cond: Conditioning, alphas_cumprod: torch.Tensor, rows: torch.Tensor | None,
                    v_model: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(delta, coefficient, size) of the alignment term (Eqs. 2-7, docs/method.md) for the step
    whose personalization prediction is ``eps_pred`` at ``z_t``: the score direction of each
    row, the factor its surrogate is weighted by (lambda included) and the score's mean square.

    ``rows`` (--align-fraction): the drawn rows; the others get delta 0 and coefficient 0, the
    drawn ones their weight B/k."""
    full_b = z_t.shape[0]
    sub = (lambda x: x) if rows is None else (lambda x: x[rows])
    B = full_b if rows is None else rows.numel()
    ab_t = alphas_cumprod[draws.t]  # (B,)
    t2, ab_t2 = sub(draws.t_align), alphas_cumprod[sub(draws.t_align)]
    if v_model:
        x0_hat = guidance.predict_x0_from_v(z_t=sub(z_t), v=sub(eps_pred.detach()), alpha_bar=sub(ab_t))  # Eq. 2
    else:
        x0_hat = guidance.predict_x0(z_t=sub(z_t), eps=sub(eps_pred.detach()), alpha_bar=sub(ab_t))  # Eq. 2
    x_t2 = guidance.add_noise(x0=x0_hat, noise=sub(draws.noise_align), alpha_bar=ab_t2)  # step 3
    # Pretrained branch: adapters off, no placeholder. Personalized branch (palp): LoRA on,
    # y_P (the states the grad branch just used).
    names = guidance.needed_predictions(method, beta=cfg.beta)
    # y_P's states at t' (NeTI's depend on the timestep; every other personalization's are those at t)
    pers_cond = (pretrained.states_at(sub(input_ids), t2, sub(states.detach()))
                 if "personalized_cond" in names else None)
    text = {"pretrained_uncond": cond.uncond, "pretrained_clean": cond.clean, "pretrained_negative": cond.negative,
            "personalized_uncond": cond.uncond, "personalized_cond": pers_cond}
    pre_names = [n for n in names if n.startswith("pretrained_")]
    pers_names = [n for n in names if n.startswith("personalized_")]
    preds = guidance_predictions(pretrained, x_t2, t2, [text[n].expand(B, -1, -1) for n in pre_names],
                                 [text[n].expand(B, -1, -1) for n in pers_names], fused=cfg.fused_guidance)
    if v_model:  # Eq. 6's delta is a difference of noise predictions: each v as the eps it implies
        preds = [guidance.eps_from_v(z_t=x_t2.float(), v=p, alpha_bar=ab_t2.float()) for p in preds]
    predictions = guidance.GuidancePredictions(**dict(zip(pre_names + pers_names, preds)))
    delta = guidance.alignment_delta(method, predictions=predictions, noise=sub(draws.noise_align).float(),
                                     t=t2, alpha=cfg.alpha, beta=cfg.beta)
    coefficient = (guidance.v_alignment_coefficient if v_model else guidance.alignment_coefficient)(
        alpha_bar_t=sub(ab_t).float(), lam=cfg.lam, rescale=cfg.rescale)
    size = delta.pow(2).mean()  # the size of the score (of the drawn rows); the surrogate's value is not a loss
    if rows is not None:  # back to the whole micro-batch: 0 on the rows not drawn, B/k on the drawn ones
        coefficient = coefficient * draws.align_weight[rows].to(coefficient)
        delta = torch.zeros((full_b, *delta.shape[1:]), dtype=delta.dtype, device=delta.device).index_copy(0, rows, delta)
        coefficient = torch.zeros(full_b, dtype=coefficient.dtype, device=coefficient.device).index_copy(0, rows, coefficient)
    return delta, coefficient, size


def guidance_predictions(model: PersonalizedModel, x: torch.Tensor, t: torch.Tensor, pretrained_states: list[torch.Tensor],
                         personalized_states: list[torch.Tensor], *, fused: bool) -> list[torch.Tensor]:
    """The no-grad guidance predictions at (x, t), float32, (B, 4, h, w) each: G(x, t, s; theta)
    for each of ``pretrained_states``, then G(x, t, s; theta_LoRA) for each of ``personalized_states``.

    ``fused``: all of them in one UNet call of (k_pre + k_pers) * B rows, the LoRA switched per
    row (lora_gate.LoraGate); otherwise one call with the adapters disabled and one with them on.
    """
    B, k_pre, k_pers = x.shape[0], len(pretrained_states), len(personalized_states)
    if fused:
        k = k_pre + k_pers
        lora = row_flags([(k_pre * B, 0.0), (k_pers * B, 1.0)], device=x.device)
        out = model.predict_gated(x.repeat(k, 1, 1, 1), t.repeat(k), torch.cat(pretrained_states + personalized_states), lora)
        return list(out.float().chunk(k))
    with model.adapters_disabled():
        preds = list(model.predict(x.repeat(k_pre, 1, 1, 1), t.repeat(k_pre), torch.cat(pretrained_states)).float().chunk(k_pre))
    if k_pers:
        preds += model.predict(x.repeat(k_pers, 1, 1, 1), t.repeat(k_pers), torch.cat(personalized_states)).float().chunk(k_pers)
    return preds


@dataclass
class TrainResult:
    output: Path
    model: PersonalizedModel
    tokenizer: object
    metrics: list[dict]


@dataclass
class StepContext:
    """What every step of a run shares (all on the run's device)."""

    model: PersonalizedModel  # the module itself: the no-grad guidance branches call it
    wrapped: torch.nn.Module  # as accelerate prepared it: the grad branch calls it
    optimizer: torch.optim.Optimizer
    accelerator: object
    trainable: list[torch.nn.Parameter]
    # (N, 4, h, w) VAE posterior of each training image, encoded once (2N with --hflip and no
    # --scale-augmentation: the mirrored photos after)
    mean: torch.Tensor
    std: torch.Tensor  # (N, 4, h, w)
    image_ids: torch.Tensor  # (N, 77) y_P's tokens for each training image
    cond: Conditioning  # the prompts without learned tokens, encoded once
    alphas_cumprod: torch.Tensor  # (T,)
    dtype: torch.dtype  # of the frozen weights and the latents
    prediction_type: str = "epsilon"  # the base model's output: epsilon or v_prediction
    classes: ClassImages | None = None  # --prior-preservation's class images
    rescaling: ScaleAugmentation | None = None  # --scale-augmentation's photos and VAE
    variant_ids: torch.Tensor | None = None  # (N, T, P, 77) with --prompt-templates or --scale-augmentation


def make_context(model: PersonalizedModel, accelerator, cfg: TrainConfig, **tensors) -> StepContext:
    """The optimizer (the fused kernel on CUDA: one launch for all parameters, the same update)
    and accelerate's wrapping, around a model from ``setup_model``."""
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  fused=accelerator.device.type == "cuda")
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    return StepContext(model=model, wrapped=wrapped, optimizer=optimizer, accelerator=accelerator,
                       trainable=model.trainable_parameters(), **tensors)


class NonFiniteError(ArithmeticError):
    """The loss or the gradient norm of a step is not finite; the message says which."""


def train_step(ctx: StepContext, cfg: TrainConfig, full: Draws, *, micro: int) -> dict[str, float]:
    """One optimizer step on the per-process batch drawn in ``full`` (on the CPU), in micro-batches
    of ``micro``: per micro-batch a forward and one backward, then clipping and the update.

    Returns the step's measurements (loss, its terms, grad_norm). Raises NonFiniteError before
    the update if the loss or the gradient norm is not finite. The device is waited for once per
    micro-batch: the measurements are read together, after the backward has been queued.
    """
    acc, accum = ctx.accelerator, len(full.t) // micro
    device = ctx.mean.device
    sums: dict[str, float] = {}
    for i in range(accum):
        with acc.accumulate(ctx.wrapped):
            loss, m = _micro_batch_loss(ctx, cfg, full, i * micro, micro, ctx.wrapped)
            acc.backward(loss)
            norm = acc.clip_grad_norm_(ctx.trainable, cfg.max_grad_norm or math.inf) if acc.sync_gradients else None
            values = torch.stack([loss.detach().float(), *(v.float() for v in m.values())]
                                 + ([norm.float()] if norm is not None else []))
            xla.sync(device)  # XLA: the forward and backward as one graph, gradients and values its outputs
            values = values.tolist()
            if not math.isfinite(values[0]):
                raise NonFiniteError("loss")
            if norm is not None:
                if not math.isfinite(values[-1]):
                    raise NonFiniteError("gradient")
                sums["grad_norm"] = values[-1]
            ctx.optimizer.step()
            ctx.optimizer.zero_grad(set_to_none=True)
            xla.sync(device)  # XLA: the update as a graph of its own
        for key, v in zip(["loss", *m], values):
            sums[key] = sums.get(key, 0.0) + v / accum
    return sums


def _micro_batch_loss(ctx: StepContext, cfg: TrainConfig, full: Draws, start: int, size: int, module):
    """(loss, measurements) of rows [start, start + size) of the per-process draws ``full``,
    the gradient branch run through ``module`` (the wrapped model, or the bare one to probe)."""
    device = ctx.mean.device
    d = Draws(*(None if x is None else x[start : start + size].to(device, non_blocking=True) for x in dataclasses.astuple(full)))
    z0, input_ids, mask = _subject_rows(ctx, full, d, start, size)
    d.noise, d.noise_align = d.noise.to(ctx.dtype), d.noise_align.to(ctx.dtype)
    prior = None
    if ctx.classes is not None:  # --prior-preservation: the class-image rows drawn with these rows
        c, i = ctx.classes, d.class_index
        prior = ClassRows(z0=(c.mean[i] + c.std[i] * d.class_latent_noise).to(ctx.dtype), input_ids=c.ids[i],
                          draws=Draws(i, d.class_latent_noise, d.class_t, d.class_noise.to(ctx.dtype), None, None))
    with ctx.accelerator.autocast():
        return step_losses(module, z0=z0, input_ids=input_ids, draws=d, cond=ctx.cond,
                           alphas_cumprod=ctx.alphas_cumprod, cfg=cfg, pretrained=ctx.model,
                           prediction_type=ctx.prediction_type, prior=prior, mask=mask)


def _subject_rows(ctx: StepContext, full: Draws, d: Draws, start: int, size: int):
    """(z0, input_ids, mask) of the micro-batch's subject rows ``d`` (on the device; ``full``: the
    process's draws on the host): a sample of each photo's posterior (with --scale-augmentation:
    the rescaled photo's, and its loss mask) and its prompt (its template and phrase as drawn)."""
    ids = ctx.image_ids[d.index] if ctx.variant_ids is None else row_prompt_ids(ctx.variant_ids, d)
    if ctx.rescaling is None:  # --hflip: a mirrored photo's posterior is row N + i of mean and std
        i = d.index if d.hflip is None else d.index + len(ctx.image_ids) * d.hflip.long()
        return (ctx.mean[i] + ctx.std[i] * d.latent_noise).to(ctx.dtype), ids, None
    host = [x[start : start + size] for x in (full.index, full.rescale, full.rescale_top, full.rescale_left)]
    flips = None if full.hflip is None else full.hflip[start : start + size]
    z0, mask = ctx.rescaling.rows(*host, latent_noise=d.latent_noise, hflip=flips)
    return z0.to(ctx.dtype), ids, mask


def fit_micro_batch(ctx: StepContext, cfg: TrainConfig, full: Draws, compiled=None) -> tuple[int, list[int]]:
    """The largest divisor m of the per-process batch whose forward and backward (the step's
    whole graph, guidance branches included) fit in the device's memory, tried from the whole
    batch down on the first step's draws; and the sizes that ran out of memory.

    The probe changes nothing a run computes: it draws from the global generators only inside
    ``fork_rng``, its gradients are dropped, and the optimizer does not step. Every process
    probes the same sizes in step, and a size counts as fitting only where it fits on all. With
    --align-fraction every probed row takes the alignment term (the most a micro-batch can
    need); with torch.compile, a compile failure falls back to eager as in training
    (``compiled``: the run's CompiledUNet)."""
    per_process = len(full.t)
    if xla.is_xla(ctx.mean.device):  # lazy tensors: nothing would run, so every size would "fit"
        return per_process, []
    if full.align_weight is not None:
        full = dataclasses.replace(full, align_weight=torch.ones_like(full.align_weight))
    acc = ctx.accelerator
    failed = []
    for m in sorted((d for d in range(1, per_process + 1) if per_process % d == 0), reverse=True):
        oom = False
        try:
            def probe(m=m):
                with torch.random.fork_rng(devices=[ctx.mean.device] if ctx.mean.device.type == "cuda" else []):
                    loss, _ = _micro_batch_loss(ctx, cfg, full, 0, m, ctx.model)  # unwrapped: no gradient all-reduce
                    loss.backward()

            if compiled is not None:
                compiled.call(probe, before_retry=lambda: ctx.optimizer.zero_grad(set_to_none=True), doing="probing")
            else:
                probe()
        except Exception as e:  # noqa: BLE001 (only out-of-memory is caught; anything else is raised again)
            if not is_out_of_memory(e):
                raise
            oom = True
        finally:
            ctx.optimizer.zero_grad(set_to_none=True)
            release_memory(ctx.mean.device)
        if not _any_process(acc, oom):
            return m, failed
        failed.append(m)
    raise TrainingError(f"one training image's step does not fit in the memory of {ctx.mean.device} even at "
                        f"--micro-batch-size 1; use a device with more memory, --mixed-precision bf16, "
                        f"--gradient-checkpointing on, or a smaller model")


def train(cfg: TrainConfig, *, resume: bool = False, progress: bool = True) -> TrainResult:
    """Fine-tune LoRA + [V] tokens with the configured method; write a loadable result."""
    # A gs:// output trains in a local working folder mirrored to the bucket: checkpoints are
    # pushed as they are written and pulled back on --resume (a preempted job on a new machine).
    # One writer per output (locks.py), taken by the main process of a multi-process run, which
    # also prepares the folder while the others wait; a --resume waits out a lost machine's
    # lease on gs://.
    from accelerate import PartialState

    # Without a GPU, processes started by torchrun or `accelerate launch` train on the CPU over
    # gloo: accelerate finds that setting only when asked for the CPU (cpu=True).
    state = PartialState(cpu=not torch.cuda.is_available())
    # SIGTERM/SIGINT (preemption): the step being taken is finished and checkpointed, then
    # Preempted is raised, and the lock is released on the way out (palp/core/preemption.py).
    with StopRequests("palp train") as stops, \
            output_lock(cfg.output, "palp train", wait=resume) if state.is_main_process else contextlib.nullcontext(Held(cfg.output)) as held:
        if state.is_main_process:
            RunOutput.open(cfg.output, resume=resume, main=True)
        state.wait_for_everyone()
        out = RunOutput.open(cfg.output, resume=resume, main=False)
        # The thread count is part of the result (CPU reductions are split by thread): a resumed
        # run keeps the one its checkpoints were made with unless --threads says otherwise.
        threads = resolve_threads(cfg.threads, checkpoints.recorded_setting(out.local, "num_threads") if resume else None)
        with reproducible(deterministic=cfg.deterministic, threads=threads):
            run = _setup(cfg, out.local, resume=resume, threads=threads, progress=progress)
            _loop(run, cfg, out, held, stops, progress=progress)
            for tracker in run.accelerator.trackers:  # the trackers' files closed before they are published
                tracker.finish()
            if run.accelerator.is_main_process:
                held.check()
                out.finish(run.model, run.tokens, run.rows, {**run.config, "completed_steps": cfg.steps},
                           before_config=lambda: _write_report(out, cfg))
            run.accelerator.wait_for_everyone()
            run.accelerator.state.destroy_process_group()  # what accelerate's end_training does last
            return TrainResult(out.local, run.model, run.tokenizer, run.rows)


@dataclass
class _Run:
    """A run set up to take its steps: from ``_setup``."""

    ctx: StepContext
    model: PersonalizedModel
    compiled: fast.CompiledUNet
    accelerator: object
    tokenizer: object
    tokens: list[str]  # the learned tokens' strings
    micro: int  # micro-batch size
    accum: int  # gradient accumulation steps
    config: dict  # what training_config.json records
    start: int  # the last step already taken (resume)
    rows: list[dict]  # metrics of the steps taken
    validator: Validator | None  # --validation-every's sampler


def _setup(cfg: TrainConfig, out: Path, *, resume: bool, threads: int, progress: bool = False) -> _Run:
    """Load the base model and photos, build the model, optimizer and fixed tensors, record the
    run's config and, with ``resume``, load its newest checkpoint. Everything that can fail on
    bad input fails here, before anything is written."""
    from accelerate import PartialState

    base = load_base_model(cfg.pretrained_model)
    if base.family == "sdxl" and cfg.personalize != "lora-token":
        raise ConfigError(f"{cfg.pretrained_model} is an SDXL model: --personalize {cfg.personalize} trains Stable Diffusion "
                          f"1.x/2.x models only; use --personalize lora-token (and a --method other than {cfg.personalize})")
    images = [load_subject_images(s.placeholder, s.images, resolution=base.resolution, min_size=cfg.min_image_size) for s in cfg.subjects]
    recorded = _recorded_micro_batch(cfg, out, resume=resume)
    micro, accum = cfg.accumulation(PartialState().num_processes, recorded)
    probe = cfg.micro_batch_size is None and recorded is None
    report_to = tracking.resolve_report_to(cfg.report_to)
    accelerator = _accelerator(cfg, out, accum, report_to)
    device, dtype = accelerator.device, weight_dtype(cfg.mixed_precision)
    # --prior-preservation: the base model's class images, made (or found in the cache) before
    # the trained model takes the device's memory
    class_sets = _class_image_sets(cfg, base, accelerator, progress=progress) if cfg.prior_preservation else {}

    model, token_ids, compiled = setup_model(base, cfg, device, dtype)
    base.vae.to(device)  # used once, to encode the images: kept in fp32
    tokens = [placeholder_token(p) for p in token_ids]
    pixels = torch.cat([im.pixels for im in images])
    # --hflip: the mirrored photos' posteriors too, rows N..2N-1 (the VAE is not mirror-symmetric);
    # with --scale-augmentation every row is encoded at its step instead, mirrored there
    mirrored = cfg.hflip > 0 and not cfg.scale_augmentation
    mean, std = encode_latent_posteriors(base.vae, torch.cat([pixels, pixels.flip(-1)]) if mirrored else pixels)
    ids_per_subject = tokenize(base.tokenizer, [to_token_prompt(s.personalization_prompt) for s in cfg.subjects])
    image_ids = torch.cat([ids_per_subject[i].expand(len(im.paths), -1) for i, im in enumerate(images)])  # (N, 77)
    classes = _encode_class_images(cfg, base, class_sets, images, device) if class_sets else None
    rescaling = ScaleAugmentation(pixels, base.vae) if cfg.scale_augmentation else None
    variant_ids = prompt_variants(base.tokenizer, cfg, [len(im.paths) for im in images])
    ctx = make_context(model, accelerator, cfg, mean=mean, std=std, image_ids=image_ids.to(device),
                       cond=encode_fixed_prompts(model, base.tokenizer, cfg, device),
                       alphas_cumprod=base.noise_scheduler.alphas_cumprod.to(device), dtype=dtype,
                       prediction_type=base.prediction_type, classes=classes, rescaling=rescaling,
                       variant_ids=None if variant_ids is None else variant_ids.to(device))
    if probe:
        micro, accum = _probe_micro_batch(ctx, cfg, compiled, accelerator, per_process=micro * accum)
    config = {
        **cfg.to_dict(), "palp_version": __version__, "pretrained_model": portable_reference(cfg.pretrained_model),
        "base_model_pin": base.pin, "resolution": base.resolution, "prediction_type": base.prediction_type,
        "model_family": base.family,
        "placeholder_tokens": dict(zip(token_ids, tokens)), "class_words": cfg.class_words,
        "micro_batch_size": micro, "micro_batch_auto": cfg.micro_batch_size is None,
        "gradient_accumulation_steps": accum, "num_processes": accelerator.num_processes,
        "num_threads": threads, "report_to": report_to,
        "training_images": {im.placeholder: [str(p) for p in im.paths] for im in images},
        **({"class_images": {word: s.record() for word, s in class_sets.items()}} if class_sets else {}),
    }
    start, rows = _record_and_resume(cfg, out, config, ctx, model, accelerator, resume=resume, class_sets=class_sets)
    xla.sync(device)  # XLA: the encoded photos and prompts (and a loaded checkpoint) as data, not in every step's graph
    validator = _validator(cfg, model, base, ctx, accelerator) if cfg.validation_every else None
    if report_to != "none":
        accelerator.init_trackers(tracking.PROJECT, config=tracking.hyperparameters(config),
                                  init_kwargs={"mlflow": {"run_name": Path(cfg.output).name}})
    return _Run(ctx, model, compiled, accelerator, base.tokenizer, tokens, micro, accum, config, start, rows, validator)


def _recorded_micro_batch(cfg: TrainConfig, out: Path, *, resume: bool) -> int | None:
    """--micro-batch-size auto: a resumed run keeps the size its checkpoints were made with (a
    resume stays bit-identical); None for a new run, which probes once its model is on the device."""
    recorded = checkpoints.recorded_setting(out, "micro_batch_size") if resume and cfg.micro_batch_size is None else None
    if recorded is not None and (not isinstance(recorded, int) or isinstance(recorded, bool) or recorded < 1):
        raise ConfigError(f"{out / checkpoints.DIR / 'config.json'} records micro_batch_size {recorded!r}, not a size; "
                          f"give --micro-batch-size N, or train into a new --output")
    return recorded


def _record_and_resume(cfg: TrainConfig, out: Path, config: dict, ctx: StepContext, model: PersonalizedModel,
                       accelerator, *, resume: bool, class_sets: dict) -> tuple[int, list[dict]]:
    """Record the run's config (the main process) and, with ``resume``, load the newest
    checkpoint: (the last step taken, the metrics rows of the steps taken)."""
    start, rows = 0, []
    if resume and class_sets and accelerator.is_main_process:
        _check_class_images(out, config["class_images"])
    if accelerator.is_main_process:
        checkpoints.record_config(out, config, resume=resume)
    if resume:
        start, rows = checkpoints.load_latest(out, model, ctx.optimizer, max_step=cfg.steps)
        for group in ctx.optimizer.param_groups:  # the optimizer state carries the old lr
            group["lr"] = cfg.lr
    return start, rows


def _class_image_sets(cfg: TrainConfig, base, accelerator, *, progress: bool) -> dict:
    """{class word: its ClassImageSet} (palp.steps.class_images), in the subjects' order: found
    in palp's cache, or made there with the base model on the run's device (by the main
    process while the others wait; a process that still does not find the set makes its own)."""
    from palp.core.precision import sample_dtype
    from palp.steps.class_images import class_image_spec, class_prompt, ensure_class_images

    dtype = sample_dtype(accelerator.device, "auto")  # as palp sample: fp16 on CUDA, fp32 elsewhere
    specs = {word: class_image_spec(model_pin=base.pin, prompt=class_prompt(word), count=cfg.num_class_images,
                                    resolution=base.resolution, steps=cfg.class_image_steps, device=accelerator.device,
                                    dtype=dtype)
             for word in dict.fromkeys(s.class_word for s in cfg.subjects)}
    sets = {}
    for main in (True, False):
        if accelerator.is_main_process == main:
            sets = {word: ensure_class_images(base.path, spec, device=accelerator.device, dtype=dtype,
                                              progress=progress and main, announce=main)
                    for word, spec in specs.items()}
        accelerator.wait_for_everyone()
    return sets


def _encode_class_images(cfg: TrainConfig, base, sets: dict, images: list, device) -> ClassImages:
    """The class images' VAE posteriors and class prompts' tokens, and each training image's set."""
    from palp.steps.class_images import load_class_pixels

    mean, std = encode_latent_posteriors(base.vae, torch.cat([load_class_pixels(s) for s in sets.values()]))
    prompts = tokenize(base.tokenizer, [s.spec["prompt"] for s in sets.values()])  # (K, 77)
    order = {word: k for k, word in enumerate(sets)}
    image_sets = torch.cat([torch.full((len(im.paths),), order[s.class_word]) for s, im in zip(cfg.subjects, images)])
    return ClassImages(mean=mean, std=std, ids=prompts.repeat_interleave(cfg.num_class_images, 0).to(device),
                       sets=image_sets)


def _check_class_images(out: Path, found: dict) -> None:
    """On --resume: say so when the class images are not the checkpointed run's (the cache was
    lost and the set made again on another device kind or with other pixels): the run goes on,
    but is no longer the bit-identical continuation."""
    recorded = checkpoints.recorded_setting(out, "class_images")
    if recorded is None or recorded == found:
        return
    changed = sorted(w for w in set(recorded) | set(found) if (recorded.get(w) or {}).get("digest") != (found.get(w) or {}).get("digest"))
    print(f"palp train: warning: --resume with other class images than the checkpointed run's "
          f"({', '.join(changed) or 'their settings'}): it continues, but not bit-identically", file=sys.stderr)


def _accelerator(cfg: TrainConfig, out: Path, accum: int, report_to: str):
    """A fresh ``Accelerator`` for this run: its precision, accumulation and tracker."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import ProjectConfiguration

    # accelerate keeps its settings in process-wide singletons; one process may train several
    # times (a local pipeline, a notebook) with other precisions or accumulation.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    return Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=accum,
                       log_with=None if report_to == "none" else report_to,
                       project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / tracking.LOG_FOLDER)))


def _probe_micro_batch(ctx: StepContext, cfg: TrainConfig, compiled, accelerator, *, per_process: int) -> tuple[int, int]:
    """``--micro-batch-size auto`` for a new run: the largest micro-batch whose first step fits
    on the device, and the accumulation steps that make up the batch; said once, in one line."""
    first = process_draws(cfg, 1, accelerator, per_process=per_process, **draw_shapes(ctx))
    micro, failed = fit_micro_batch(ctx, cfg, first, compiled)
    micro, accum = cfg.accumulation(accelerator.num_processes, micro)
    accelerator.gradient_accumulation_steps = accum
    if accelerator.is_main_process:
        tried = f" ({', '.join(map(str, failed))} ran out of memory)" if failed else ""
        fits = "taken without a probe on" if xla.is_xla(accelerator.device) else "fits on"
        print(f"palp train: --micro-batch-size auto: {micro} of {micro * accum} per process {fits} {accelerator.device}"
              f"{tried}; {accum} accumulation step(s)", file=sys.stderr)
    return micro, accum


def _validator(cfg: TrainConfig, model: PersonalizedModel, base, ctx: StepContext, accelerator) -> Validator:
    prompts = list(cfg.validation_prompts) or [cfg.target_prompt]
    plan = ValidationPlan(prompts=prompts, token_prompts=[to_token_prompt(p) for p in prompts],
                          seeds=list(range(cfg.validation_seed, cfg.validation_seed + cfg.validation_images)),
                          steps=cfg.validation_steps, guidance=cfg.validation_guidance)
    return Validator(plan, model=model, vae=base.vae, scheduler_config=base.noise_scheduler.config,
                     tokenize=lambda texts: tokenize(base.tokenizer, texts), latent_shape=ctx.mean.shape[1:],
                     autocast=accelerator.autocast)


def _loop(run: _Run, cfg: TrainConfig, out: RunOutput, held: Held, stops: StopRequests, *, progress: bool) -> None:
    """Take the run's remaining steps, with its snapshots and checkpoints; appends to run.rows.
    A stop request (SIGTERM/SIGINT) ends it after the step it arrived in, checkpointed."""
    ctx, accelerator = run.ctx, run.accelerator
    device = accelerator.device

    def draws_of(step: int) -> Draws:
        full = process_draws(cfg, step, accelerator, per_process=run.micro * run.accum, **draw_shapes(ctx))
        return Draws(*(None if x is None else x.pin_memory() for x in dataclasses.astuple(full))) if device.type == "cuda" else full

    if _any_process(accelerator, stops.requested):  # asked while the lock was waited for or the model loaded
        kept = f"the checkpoint of step {run.start} is kept" if run.start else "nothing was trained yet"
        raise stops.preempted(f" before its first step ({kept}); rerun with --resume to continue")
    bar = tqdm(range(run.start + 1, cfg.steps + 1), initial=run.start, total=cfg.steps, desc=f"palp train ({method_label(cfg.method, cfg.noise, cfg.personalize)})",
               disable=not (progress and accelerator.is_local_main_process))
    # The next step's draws are made on the CPU while the device runs this step.
    ahead = ThreadPoolExecutor(max_workers=1)
    upcoming = ahead.submit(draws_of, run.start + 1)
    try:
        with fast.attention_backend(cfg.attention):
            for step in bar:
                accelerator_step = accelerator.step
                full = upcoming.result()
                if step < cfg.steps:
                    upcoming = ahead.submit(draws_of, step + 1)

                def restart(first=accelerator_step):
                    # torch.compile failed (at the first call of some shape) before the optimizer
                    # updated anything: the same step again, eagerly, accumulation from its first micro-batch.
                    accelerator.step = first
                    ctx.optimizer.zero_grad(set_to_none=True)

                sums = run.compiled.call(lambda: _step(ctx, cfg, full, run.micro, step, out.local), before_retry=restart,
                                         doing="training")
                if step == run.start + 1:
                    run.compiled.save_once(writer=accelerator.is_main_process)  # every shape has been compiled by now
                row = _record_step(run, step, sums)
                prior = {"prior": f"{row['prior_loss']:.4f}"} if "prior_loss" in row else {}
                bar.set_postfix(rec=f"{row['rec_loss']:.4f}", align=f"{row['align_loss']:.4f}", **prior, gn=f"{row['grad_norm']:.3f}")
                if _keep_step(run, cfg, out, held, stops, step):
                    where = f" and pushed to {out.remote}" if out.remote else ""
                    raise stops.preempted(f" after step {step} of {cfg.steps}: checkpoint step-{step:06d} written to "
                                          f"{out.local / checkpoints.DIR}{where}; rerun with --resume to continue")
    finally:
        ahead.shutdown(cancel_futures=True)


def _record_step(run: _Run, step: int, sums: dict[str, float]) -> dict:
    """The step's row of metrics.csv (averaged over the processes), logged to the trackers."""
    accelerator = run.accelerator
    if accelerator.num_processes > 1:  # the step's measurements over the whole global batch
        means = accelerator.reduce(torch.tensor(list(sums.values()), device=accelerator.device), reduction="mean")
        sums = dict(zip(sums, means.tolist()))
    row = {"step": step, "loss": sums["loss"], "rec_loss": sums["rec_loss"], "align_loss": sums.get("align_loss", 0.0),
           **({"prior_loss": sums["prior_loss"]} if "prior_loss" in sums else {}),
           "grad_norm": sums["grad_norm"], "lr": run.ctx.optimizer.param_groups[0]["lr"]}
    run.rows.append(row)
    accelerator.log({f"train/{k}": v for k, v in row.items() if k != "step"}, step=step)
    return row


def _keep_step(run: _Run, cfg: TrainConfig, out: RunOutput, held: Held, stops: StopRequests, step: int) -> bool:
    """What the main process writes after a step: validation images, the snapshot, and the
    checkpoint (pushed with the logs) at its interval, at the last step, or when a stop was
    requested of any process; every process then waits for it. Returns whether to stop."""
    accelerator = run.accelerator
    if accelerator.is_main_process:
        if run.validator and (step % cfg.validation_every == 0 or step == cfg.steps):
            _validate(run, step, out)
        if step in cfg.save_steps:
            out.snapshot(step, run.model, run.tokens)
    stop = _any_process(accelerator, stops.requested) and step < cfg.steps
    if accelerator.is_main_process and (step % cfg.checkpoint_every == 0 or step == cfg.steps or stop):
        held.check()  # a lost gs:// lease: stop before writing over the new holder's run
        out.checkpoint(step, run.model, run.ctx.optimizer, run.rows, keep=cfg.checkpoints_total_limit)
        out.publish(out.local / tracking.LOG_FOLDER)
    accelerator.wait_for_everyone()
    return stop


def draw_shapes(ctx: StepContext) -> dict:
    """What a run's draws are drawn over (``draw``'s keyword arguments beyond the batch)."""
    return {"n_images": len(ctx.image_ids), "latent_shape": ctx.mean.shape[1:], "num_timesteps": len(ctx.alphas_cumprod),
            "class_sets": None if ctx.classes is None else ctx.classes.sets,
            "resolution": None if ctx.rescaling is None else ctx.rescaling.resolution}


def process_draws(cfg: TrainConfig, step: int, accelerator, *, per_process: int, n_images: int, latent_shape,
                  num_timesteps: int, class_sets: torch.Tensor | None = None, resolution: int | None = None) -> Draws:
    """This process's rows of step ``step``'s draws. One draw is made for the whole global
    batch, from a generator of (seed, step), and each process takes its slice: results depend
    neither on the micro-batch size nor on how many processes share the batch."""
    n, rank = accelerator.num_processes, accelerator.process_index
    full = draw(step_generator(cfg.seed, step, 0), cfg, n_images=n_images, batch=per_process * n,
                latent_shape=latent_shape, num_timesteps=num_timesteps, class_sets=class_sets, resolution=resolution)
    if n == 1:
        return full
    return Draws(*(None if x is None else x[rank * per_process : (rank + 1) * per_process] for x in dataclasses.astuple(full)))


def _any_process(accelerator, flag: bool) -> bool:
    """Whether ``flag`` holds on any process (every process gets the same answer: a stop
    request, an out-of-memory in the probe)."""
    if accelerator.num_processes == 1:
        return flag
    return bool(accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), reduction="sum").item() > 0)


def _validate(run: _Run, step: int, out: RunOutput) -> None:
    """One validation check: the grid and its index entry written (and pushed), the images to the trackers."""
    written, images, pixels = run.validator.check(step, out.local)
    tracking.log_images(run.accelerator, "validation", images, pixels, step)
    out.publish(*written)  # this check's grid and the index, not the folder's earlier grids again


def _write_report(out: RunOutput, cfg: TrainConfig) -> None:
    """The run's page (curves and validation grids), next to its weights."""
    from palp.core.storage import write_text

    title = f"{method_label(cfg.method, cfg.noise, cfg.personalize)}, {cfg.task_id or cfg.target_prompt}"
    write_text(out.local / REPORT_FILE, training_report(out.local, title, _report_notes(cfg)))


def _report_notes(cfg: TrainConfig) -> list[str]:
    """The run page's lines on options beyond the method (--token-init, --hflip, --prompt-templates,
    --scale-augmentation, --prior-preservation)."""
    notes = []
    if cfg.token_init != "class":
        words = ", ".join(f"{p} from '{w}'" for p, w in cfg.init_words.items())
        notes.append(f"Token initialisation (--token-init {cfg.token_init}): each placeholder's embedding starts "
                     f"from a chosen token, not its class word: {words}.")
    if cfg.hflip > 0:
        notes.append(f"Horizontal flips: each row's photo is mirrored left-right with probability {cfg.hflip:g}.")
    if cfg.prompt_templates != "none":
        notes.append(f"Prompt templates ({cfg.prompt_templates}): each row's prompt is one of "
                     f"{len(PROMPT_TEMPLATES[cfg.prompt_templates])} templates holding its subject's placeholder "
                     f"('{PROMPT_TEMPLATES[cfg.prompt_templates][0]}'...), drawn per row, instead of its personalization prompt.")
    if cfg.scale_augmentation:
        notes.append("Scale augmentation (Custom Diffusion): each row's photo rescaled to a random side (1/3 to 1x on a "
                     "grey canvas, or 1.2 to 1.4x cropped), its prompt prefixed 'a far away'/'very small' or 'zoomed "
                     "in'/'close up' to match, and rec_loss taken over the photo's region only.")
    if not cfg.prior_preservation:
        return notes
    from palp.steps.class_images import class_prompt

    prompts = ", ".join(repr(class_prompt(w)) for w in dict.fromkeys(s.class_word for s in cfg.subjects))
    return notes + [f"Prior preservation (DreamBooth): + {cfg.prior_weight:g} x the reconstruction loss on {cfg.num_class_images} "
            f"class images per class word that the base model made of {prompts} ({cfg.class_image_steps} DDIM steps); "
            f"prior_loss is that loss."]


def _step(ctx: StepContext, cfg: TrainConfig, full: Draws, micro: int, step: int, out: Path) -> dict[str, float]:
    try:
        return train_step(ctx, cfg, full, micro=micro)
    except NonFiniteError as e:
        raise TrainingError(_non_finite(step, str(e), out)) from None
    except Exception as e:
        if not is_out_of_memory(e):
            raise
        last = checkpoints.latest_step(out)
        smaller = max([d for d in range(1, micro) if micro % d == 0] or [1])
        keep = (f"the checkpoint of step {last} is intact: rerun with --resume --micro-batch-size {smaller}" if last else
                f"nothing was checkpointed yet: rerun with --micro-batch-size auto or {smaller}")
        raise TrainingError(f"out of memory at step {step} with micro-batches of {micro} on {ctx.mean.device}; "
                            f"{keep}") from None


def _non_finite(step: int, what: str, out: Path) -> str:
    last = checkpoints.latest_step(out)
    keep = f"the last good checkpoint (step {last}) is intact; rerun with --resume" if last else "no checkpoint was written yet"
    return f"non-finite {what} at step {step}: training stopped ({keep}); lower --lr or use --mixed-precision no"


__all__ = ["train", "train_step", "step_losses", "setup_model", "make_context", "draw", "Draws", "Conditioning",
           "tokenize", "encode_fixed_prompts", "encode_latent_posteriors", "step_generator",
           "StepContext", "TrainResult", "TrainingError", "NonFiniteError", "LORA_FILE"]
