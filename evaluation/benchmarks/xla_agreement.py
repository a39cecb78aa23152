"""One PALP step on an XLA device against the CPU eager step, on the same inputs (the tiny model).

    PJRT_DEVICE=CPU python evaluation/benchmarks/xla_agreement.py [--method palp] [--batch-size 2] [--rtol 1e-5]

Needs torch_xla (the `tpu` extra's torch / torch_xla pair; on a machine without a TPU,
PJRT_DEVICE=CPU runs XLA on the CPU). The model is built twice from the same seed, its LoRA B
matrices set from one fixed generator (at B = 0 the gradient of every A is 0, and would test
nothing), and everything the step reads that is not the step itself (the VAE posteriors of the
photos, the fixed prompts' text states, the draws) is made once on the CPU and copied to both
devices. Each device then runs ``palp.steps.train.step_losses`` and one backward; the script prints
the loss terms and, per trainable tensor group, the relative L2 error of the gradient, next to
the same numbers for the CPU with 1 thread against 2 (a reordering of float32 sums on the CPU
alone), and exits 1 where XLA and CPU differ by more than --rtol.

The tolerance: relative 1e-5 (about 84 float32 ulps). float32 carries 24 bits (eps 1.2e-7);
XLA's CPU backend fuses elementwise ops (and may contract a*b+c into one rounding), reorders
and tiles reductions (softmax, group norm, the mean of the loss, the weight-gradient sums of
the convolutions and matmuls) and uses its own GEMM/conv kernels (Eigen) rather than PyTorch's,
so each op rounds differently by a few ulps, and the differences add up over the UNet's
forward, the guidance branches and the backward. They are not bounded by a few ulps of the
result, but they stay orders of magnitude below any error of the method.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

import torch

from palp.core import xla
from palp.core.prompts import to_token_prompt
from palp.core.settings import Subject, TrainConfig
from palp.core.subject_images import load_subject_images
from palp.method.step_inputs import (Draws, draw, encode_fixed_prompts, encode_latent_posteriors, setup_model,
                                     step_generator, tokenize)
from palp.models.base_model import load_base_model
from palp.steps.train import step_losses

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "subjects" / "cat"


def config(method: str, batch: int) -> TrainConfig:
    return TrainConfig(subjects=[Subject("[V]", str(EXAMPLE), "cat")], target_prompt="A sketch of [V] in Paris at night",
                       output="unused", pretrained_model="tiny", method=method, batch_size=batch, lora_rank=4)


def inputs(cfg: TrainConfig):
    """What the step reads besides the model, made once on the CPU: (mean, std, image_ids, cond, alphas_cumprod, draws)."""
    base, model = _model(cfg, torch.device("cpu"))
    images = load_subject_images("[V]", EXAMPLE, resolution=base.resolution)
    mean, std = encode_latent_posteriors(base.vae, images.pixels)
    image_ids = tokenize(base.tokenizer, [to_token_prompt(cfg.subjects[0].personalization_prompt)]).expand(len(mean), -1)
    cond = encode_fixed_prompts(model, base.tokenizer, cfg, "cpu")
    ac = base.noise_scheduler.alphas_cumprod.float()
    d = draw(step_generator(cfg.seed, 1, 0), cfg, n_images=len(mean), batch=cfg.batch_size, latent_shape=mean.shape[1:],
             num_timesteps=len(ac))
    return mean, std, image_ids.contiguous(), cond, ac, d


def _model(cfg: TrainConfig, device: torch.device):
    base = load_base_model(cfg.pretrained_model)
    model, _, _ = setup_model(base, cfg, device, torch.float32)
    gen = torch.Generator().manual_seed(1234)  # the same nonzero LoRA B on every device
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_B" in name:
                p.copy_((0.02 * torch.randn(p.shape, generator=gen)).to(device))
    return base, model


def step(cfg: TrainConfig, device: torch.device, shared) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """(loss terms, gradients on the CPU) of one step on ``device``."""
    mean, std, image_ids, cond, ac, d = (x.to(device) if torch.is_tensor(x) else x for x in shared)
    cond = dataclasses.replace(cond, **{f.name: None if getattr(cond, f.name) is None else getattr(cond, f.name).to(device)
                                        for f in dataclasses.fields(cond)})
    d = Draws(*(None if x is None else x.to(device) for x in dataclasses.astuple(d)))
    _, model = _model(cfg, device)
    z0 = mean[d.index] + std[d.index] * d.latent_noise
    loss, m = step_losses(model, z0=z0, input_ids=image_ids[d.index], draws=d, cond=cond, alphas_cumprod=ac, cfg=cfg)
    loss.backward()
    terms = torch.stack([loss.detach(), *m.values()])
    xla.sync(device)
    names = ["loss", *m]
    grads = {n: p.grad.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
    return dict(zip(names, terms.cpu().tolist())), grads


def compare(a: tuple, b: tuple) -> tuple[dict[str, float], dict[str, float]]:
    """Relative errors of ``a`` against ``b``: per loss term |a-b|/|b|; per gradient group ||a-b|| / ||b||."""
    terms = {k: abs(a[0][k] - b[0][k]) / max(abs(b[0][k]), 1e-30) for k in b[0]}
    groups = {"lora_A": [], "lora_B": [], "learned token": []}
    for n in b[1]:
        key = "lora_A" if "lora_A" in n else "lora_B" if "lora_B" in n else "learned token"
        groups[key].append(n)
    grads = {}
    for key, names in groups.items():
        ga = torch.cat([a[1][n].flatten().double() for n in names])
        gb = torch.cat([b[1][n].flatten().double() for n in names])
        grads[key] = ((ga - gb).norm() / gb.norm()).item()
        grads[f"{key} max abs"] = (ga - gb).abs().max().item() / gb.abs().max().item()
    return terms, grads


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="palp")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--rtol", type=float, default=1e-5)
    args = ap.parse_args(argv)
    os.environ.setdefault("PJRT_DEVICE", "CPU")
    import torch_xla
    import torch_xla.debug.metrics as met

    # The XLA device first: autograd sizes its per-device queues at the first backward of the process.
    device = torch_xla.device()
    cfg = config(args.method, args.batch_size)
    shared = inputs(cfg)
    torch.set_num_threads(1)
    cpu1 = step(cfg, torch.device("cpu"), shared)
    torch.set_num_threads(2)
    cpu2 = step(cfg, torch.device("cpu"), shared)
    t0 = time.perf_counter()
    on_xla = step(cfg, device, shared)
    seconds = time.perf_counter() - t0
    compiles = met.metric_data("CompileTime")
    print(f"tiny model, method {args.method}, batch {args.batch_size}, LoRA rank {cfg.lora_rank}, {device} "
          f"(torch {torch.__version__}, torch_xla {torch_xla.__version__}); XLA step {seconds:.1f} s, "
          f"{compiles[0] if compiles else 0} compilations")
    terms, grads = compare(on_xla, cpu2)
    base_terms, base_grads = compare(cpu1, cpu2)
    print("| quantity | CPU eager | XLA | relative error XLA vs CPU | CPU 1 vs 2 threads |\n|---|---|---|---|---|")
    for k in terms:
        print(f"| {k} | {cpu2[0][k]:.9g} | {on_xla[0][k]:.9g} | {terms[k]:.2e} | {base_terms[k]:.2e} |")
    for k in grads:
        what = f"grad {k}" + ("" if "max abs" in k else " (rel. L2)")
        print(f"| {what} | | | {grads[k]:.2e} | {base_grads[k]:.2e} |")
    worst = max(*terms.values(), *(v for k, v in grads.items() if "max abs" not in k))
    ok = worst <= args.rtol
    print(f"worst relative error {worst:.2e} {'<=' if ok else '>'} rtol {args.rtol:g}: {'agree' if ok else 'DISAGREE'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
