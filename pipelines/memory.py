"""Will a run's training step fit the accelerator it is sent to? A memory model per step, from
the GPU measurements that exist, so that `palp pipeline submit --dry-run` and `compile` can
say what micro-batch ``--micro-batch-size auto`` will pick on each card, and a run that cannot
fit even at micro-batch 1 is refused before anything is uploaded.

The model: peak = fixed + micro-batch x per-sample. Its numbers come from one measurement of
the training step on an H200 (evaluation/benchmarks/RESULTS.md, 2026-11-26): an SD-1.4-shaped
UNet at 512 px, bf16 weights with an fp32 LoRA of rank 32, batch 32 in one micro-batch, eager
PALP (fused guidance) 45.5 GiB and TI+DB 37.7 GiB at peak. The fixed part is the frozen
weights in bf16 (UNet, text encoder, VAE: 2.1 GiB) and the CUDA context (about 0.5 GiB); the
rest is divided evenly over the batch. Every number derived from it is a **prediction**,
labelled so; other base models or resolutions are not predicted.
"""

from __future__ import annotations

from dataclasses import dataclass

from palp.core.settings import DEFAULT_BATCH_SIZE, method_default, split_variant

GiB = 2**30
# What the H200 measured at batch 32 (GiB), and the fixed part of it.
MEASURED_BATCH = 32
MEASURED_PEAK = {"palp": 45.5, "ti-db": 37.7}
FIXED = 2.6
# Methods whose step runs PALP's guidance forwards (no-grad, two or three per row) are
# predicted like PALP; TI+DB's step is the personalization forward and backward alone.
ALIGNING = ("palp", "palp-iid", "sds", "sds-iid", "nfsd")
# The sampler on the same H200 (fp16, batch 16, 50 DDIM steps, a LoRA loaded): 10.08 GiB at peak.
SAMPLE_MEASURED_BATCH, SAMPLE_MEASURED_PEAK = 16, 10.08
# Memory of each accelerator the pipeline offers (GiB), and the share an allocator can use.
CARDS = {"NVIDIA_L4": 22.5, "NVIDIA_TESLA_T4": 15.0, "NVIDIA_TESLA_A100": 39.4, "NVIDIA_A100_80GB": 79.2,
         "NVIDIA_H100_80GB": 79.6, "NVIDIA_H200_141GB": 139.8}
USABLE = 0.92
# Base models of SD-1.x's shape at 512 px (what was measured).
SD1_512 = ("CompVis/stable-diffusion-v1-4", "runwayml/stable-diffusion-v1-5", "stable-diffusion-v1-5/stable-diffusion-v1-5")


@dataclass(frozen=True)
class Plan:
    method: str
    card: str
    micro: int | None  # None: not even 1 fits
    peak_gib: float  # predicted at ``micro`` (at 1 when nothing fits)
    usable_gib: float


def per_sample(method: str) -> float:
    """Per training row; a variant over another personalization (``palp+custom-diffusion``) is
    predicted as its method over LoRA (Custom Diffusion's trained keys and values were not measured)."""
    measured = MEASURED_PEAK["palp" if method.split("+")[0] in ALIGNING else "ti-db"]
    return (measured - FIXED) / MEASURED_BATCH


def plan(method: str, card: str, batch: int) -> Plan:
    """The micro-batch auto would pick for ``method`` at global ``batch`` on ``card`` (the
    largest divisor of the batch whose predicted peak fits), and that peak."""
    usable = CARDS[card] * USABLE
    for m in sorted((d for d in range(1, batch + 1) if batch % d == 0), reverse=True):
        peak = FIXED + m * per_sample(method)
        if peak <= usable:
            return Plan(method, card, m, peak, usable)
    return Plan(method, card, None, FIXED + per_sample(method), usable)


def predicted(params: dict) -> bool:
    """Whether the memory model covers this run's base model (SD-1.x at 512 px)."""
    return str(params.get("pretrained_model") or SD1_512[0]) in SD1_512


def _batches(params: dict, variant: str) -> tuple[int, int, int]:
    """(global batch, train processes, batch per process) of ``variant``'s trainings: the
    experiment's batch_size, or (0, absent) the method's own default; each of the train step's
    ``train_accelerators`` processes trains its share of the global batch on its own card."""
    method, _, personalize = split_variant(variant)
    batch = int(params.get("batch_size") or method_default(method, personalize, "batch_size", DEFAULT_BATCH_SIZE))
    processes = max(1, int(params.get("train_accelerators") or 1))
    return batch, processes, batch // processes


def _methods(params: dict) -> list[str]:
    return list(params.get("methods") or ["palp", "ti-db"])


def _batch_words(params: dict) -> str:
    """The global batch in the table's first line: one number, or each method's where they differ."""
    batches = {m: _batches(params, m) for m in _methods(params)}
    (total, processes, batch), *_ = batches.values()
    if len({b[0] for b in batches.values()}) > 1:
        per = ", ".join(f"{m} {b[0]}" for m, b in batches.items())
        return f"global batch by method ({per})" + ("" if processes == 1 else f" over {processes} cards")
    return f"global batch {total}" + ("" if processes == 1 else f" over {processes} cards, {batch} per card")


def table(params: dict, card: str) -> str:
    """The train step's predicted peak and micro-batch per method on ``card`` (markdown), or a
    line saying why there is no prediction."""
    methods = _methods(params)
    if card not in CARDS:
        return f"train step memory on {card}: not predicted (no memory size known for it)\n"
    if not predicted(params):
        return (f"train step memory: not predicted for base model {params.get('pretrained_model')} (the model is "
                f"SD-1.x at 512 px, from one H200 measurement); --micro-batch-size auto finds the size on the card\n")
    micro = int(params.get("micro_batch_size") or 0)
    lines = [f"train step on {card} ({CARDS[card]:g} GiB, {USABLE:.0%} usable), {_batch_words(params)}: PREDICTED from "
             f"one H200 measurement at batch {MEASURED_BATCH}, not measured on this card",
             "| method | micro-batch | accumulation | predicted peak GiB |", "|---|---|---|---|"]
    for method in methods:
        batch = _batches(params, method)[2]
        p = plan(method, card, batch)
        if micro:  # a size the experiment fixes: its own peak
            peak = FIXED + micro * per_sample(method)
            lines.append(f"| {method} | {micro} (given) | {batch // micro} | {peak:.1f}"
                         + (" — does not fit" if peak > p.usable_gib else "") + " |")
        elif p.micro is None:
            lines.append(f"| {method} | none fits | - | {p.peak_gib:.1f} at 1 |")
        else:
            lines.append(f"| {method} | {p.micro} (auto) | {batch // p.micro} | {p.peak_gib:.1f} |")
    if params.get("prior_preservation"):
        lines.append("prior_preservation: each row also takes a class image's forward and backward, which this prediction "
                     "does not include (micro_batch_size 0, auto, measures it on the card)")
    lines.append(sample_line(params, card))
    lines.append("score step: CLIP ViT-B/32 (151M parameters) on batches of 64 images: not measured")
    return "\n".join(lines) + "\n"


def sample_line(params: dict, card: str) -> str:
    """The sample step's predicted peak at the experiment's sample batch, and the batch it keeps
    if it has to halve (``palp sample`` makes a batch that runs out of memory in halves)."""
    batch = int(params.get("sample_batch_size") or 8)
    per = (SAMPLE_MEASURED_PEAK - FIXED) / SAMPLE_MEASURED_BATCH
    usable = CARDS[card] * USABLE
    fits = batch
    while fits > 1 and FIXED + fits * per > usable:
        fits = (fits + 1) // 2
    said = f"sample step: batch {batch}, predicted peak {FIXED + batch * per:.1f} GiB (PREDICTED from the H200's batch-16 sampler)"
    return said + ("" if fits == batch else f"; it would halve to batches of {fits} ({FIXED + fits * per:.1f} GiB)")


def refusal(params: dict, card: str) -> str | None:
    """Why this run cannot fit ``card`` even at micro-batch 1 (or at the size it fixes), or None."""
    for method in _methods(params):
        total, processes, _ = _batches(params, method)
        if total % processes:
            whose = "" if params.get("batch_size") else f"{method}'s default "
            return f"{whose}batch_size {total} is not divisible by train_accelerators {processes}: each card trains an equal share"
    if card not in CARDS or not predicted(params):
        return None
    micro = int(params.get("micro_batch_size") or 0)
    for method in _methods(params):
        p = plan(method, card, _batches(params, method)[2])
        if p.micro is None:
            return (f"{method}'s training step is predicted to need {p.peak_gib:.1f} GiB even at micro-batch 1, more than "
                    f"{card}'s usable {p.usable_gib:.1f} GiB: choose a larger --accelerator")
        if micro and FIXED + micro * per_sample(method) > p.usable_gib:
            return (f"micro_batch_size {micro} is predicted to need {FIXED + micro * per_sample(method):.1f} GiB for "
                    f"{method} on {card} (usable {p.usable_gib:.1f} GiB): use micro_batch_size 0 (auto) or at most {p.micro}")
    return None
