"""Training-step speed, measured side by side in one process: naive steps against palp's.

    python evaluation/benchmarks/train_step.py [--batch 32] [--variants ...] [--run-steps 500] --out train_step.json
    python evaluation/benchmarks/train_step.py --smoke --out smoke.json     # CPU, tiny model, seconds
    python evaluation/benchmarks/train_step.py --family sdxl --batch 4 --variants naive-db db palp --out sdxl.json  # SDXL, 1024 px
    python evaluation/benchmarks/train_step.py --smoke --family sdxl --out smoke-sdxl.json   # CPU, tiny-sdxl

Default: CUDA, an SD-1.4-shaped model with random weights at 512px (``--family sdxl``: SDXL
base's shapes at 1024px, two text encoders; or --model PATH), bf16
frozen weights under bf16 autocast with the LoRA (r=32) and [V] in fp32, as palp trains.
Variants (``BASE[+OPTION...]``):

- ``naive-db``, ``naive-palp``: the reference anchor's steps: a diffusers-style
  TI+DB LoRA step, and a PALP step with one no-grad 2B call per guidance branch (adapters
  switched off and on between them). The reference every ratio is taken to.
- ``db``, ``palp``: palp's ``train_step`` with method ti-db / palp (what ``palp train`` runs per step:
  forward, one backward, clipping, fused AdamW, the measurements read once).
- options: ``separate`` (the two guidance branches as two calls), ``cl`` (channels-last),
  ``ckpt`` (gradient checkpointing), ``compile=transformers|blocks|unet``, ``mode=<torch.compile mode>``,
  ``sdpa=flash|cudnn|efficient|math`` (the attention kernel), ``cudnn`` (cuDNN picks each
  convolution's fastest algorithm by timing them: torch.backends.cudnn.benchmark).

Each variant: its first call (compilation included) timed alone, then --warmup calls, then
--iters calls timed with CUDA events (median). FLOPs are counted as the anchors do: a forward
of F per image, a forward+backward 3F, so a PALP step (beta != 1) is 3F + 4F per image; the
share of the ceiling is that over the time and the matmul ceiling measured in this process.
``--run-steps N`` also times a whole ``palp train`` run of N steps in a fresh process, from
start to finish (model loading, compilation with an empty compile cache, checkpoints), and with
``--run-warm-steps M`` a second short run that reuses the first one's compile cache.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchlib as bl
import torch
import torch._dynamo
from benchlib import BenchError, log

BASES = ("naive-db", "naive-palp", "db", "palp")
OPTIONS = ("separate", "cl", "ckpt", "compile", "mode", "sdpa", "cudnn")
# In the order that matters: a run cut short still has the comparison. The first compiled
# variant compiles from an empty cache (its first call is the cold compile time); the later
# ones reuse what it compiled; channels-last changes strides, so it compiles again.
DEFAULT_VARIANTS = ["naive-db", "naive-palp", "db", "palp", "palp+separate", "palp+compile=blocks",
                    "db+compile=blocks", "palp+compile=blocks+cudnn", "palp+compile=blocks+sdpa=cudnn",
                    "palp+compile=blocks+cl"]
SMOKE_VARIANTS = ["naive-db", "naive-palp", "db", "palp+separate", "palp", "palp+cl+ckpt"]


def train_config(model_path: str, *, batch: int, method: str, mixed_precision: str, **kw):
    from palp.core.settings import Subject, TrainConfig

    return TrainConfig(subjects=[Subject("[V]", str(bl.EXAMPLE_SUBJECT), "cat")], target_prompt="A sketch of [V] in Paris at night",
                       output="unused", pretrained_model=model_path, method=method, batch_size=batch, lora_rank=32,
                       mixed_precision=mixed_precision, compile="none", min_image_size=64, **kw)


class Bench:
    """One model, one optimizer state, inputs for every variant."""

    def __init__(self, path: Path, device: torch.device, *, batch: int, smoke: bool):
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState, GradientState

        from palp.method.step_inputs import Draws, encode_fixed_prompts, setup_model, tokenize
        from palp.models.base_model import load_base_model
        from palp.steps.train import make_context

        self.device, self.batch = device, batch
        self.mixed = "no" if device.type == "cpu" else "bf16"
        self.dtype = torch.float32 if self.mixed == "no" else torch.bfloat16
        self.cfg = train_config(str(path), batch=batch, method="palp", mixed_precision=self.mixed)
        base = load_base_model(str(path))
        self.resolution = base.resolution
        self.model, _, _ = setup_model(base, self.cfg, device, self.dtype)
        with torch.no_grad():  # LoRA B away from 0: the adapted model differs from the pretrained one
            for n, p in self.model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 1e-3)
        AcceleratorState._reset_state()
        GradientState._reset_state()
        accelerator = Accelerator(mixed_precision=self.mixed)
        g = torch.Generator().manual_seed(0)
        h = base.resolution // 8
        n_images = 4
        ids = tokenize(base.tokenizer, ["A photo of <v>"]).expand(n_images, -1)
        self.ctx = make_context(self.model, accelerator, self.cfg, mean=torch.randn(n_images, 4, h, h, generator=g).to(device),
                                std=torch.full((n_images, 4, h, h), 0.1).to(device), image_ids=ids.to(device),
                                cond=encode_fixed_prompts(self.model, base.tokenizer, self.cfg, device),
                                alphas_cumprod=base.noise_scheduler.alphas_cumprod.to(device), dtype=self.dtype)
        shape = (batch, 4, h, h)
        noise = torch.randn(shape, generator=g)
        self.draws = Draws(index=torch.randint(n_images, (batch,), generator=g), latent_noise=torch.randn(shape, generator=g),
                           t=torch.randint(1000, (batch,), generator=g), noise=noise,
                           t_align=torch.randint(20, 981, (batch,), generator=g), noise_align=noise.clone())
        if device.type == "cuda":
            self.draws = Draws(*(None if x is None else x.pin_memory() for x in dataclasses.astuple(self.draws)))
        self.text_dim = base.unet.config.cross_attention_dim  # SDXL: both encoders' widths
        self.text_rows = 77 if base.family == "sd" else 78  # SDXL: the pooled embedding's row (text_conditioning)
        self.flops_fwd = bl.unet_forward_flops(self.model.unet, resolution=base.resolution, device=device,
                                               dtype=self.dtype, text_dim=self.text_dim)
        self._naive_inputs()

    def _naive_inputs(self):
        """The anchor's random tensors (latents, timesteps, text states) and its own AdamW."""
        B, h, dev, dt = self.batch, self.resolution // 8, self.device, self.dtype
        g = torch.Generator().manual_seed(1)
        self.z0 = torch.randn(B, 4, h, h, generator=g).to(dev, dt)
        self.eps = torch.randn(B, 4, h, h, generator=g).to(dev, dt)
        self.t = torch.randint(0, 1000, (B,), generator=g).to(dev)
        self.yP, self.yc, self.y0 = (torch.randn(B, self.text_rows, self.text_dim, generator=g).to(dev, dt) for _ in range(3))
        self.naive_opt = torch.optim.AdamW([p for p in self.model.unet.parameters() if p.requires_grad], lr=5e-5)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.mixed != "no")

    def naive_db(self):
        unet = self.model.predict  # the UNet on text states (SDXL: with its added conditions)
        with self._autocast():
            pred = unet(self.z0, self.t, self.yP)
            loss = torch.nn.functional.mse_loss(pred.float(), self.eps.float())
        loss.backward()
        self.naive_opt.step()
        self.naive_opt.zero_grad(set_to_none=True)

    def naive_palp(self):
        unet, predict = self.model.unet, self.model.predict  # SDXL: predict passes its added conditions
        with self._autocast():
            pred = predict(self.z0, self.t, self.yP)
            loss_p = torch.nn.functional.mse_loss(pred.float(), self.eps.float())
            with torch.no_grad():
                xt, tt = torch.cat([self.z0, self.z0]), torch.cat([self.t, self.t])
                unet.disable_adapters()
                g_base = predict(xt, tt, torch.cat([self.yc, self.y0]))
                unet.enable_adapters()
                g_lora = predict(xt, tt, torch.cat([self.yP, self.y0]))
                c, u = g_base.chunk(2)
                gb = u + 15.0 * (c - u)
                c, u = g_lora.chunk(2)
                gl = u + 7.5 * (c - u)
                delta = (gb - gl).float()
            loss_a = (delta * pred.float()).mean()
        (loss_p + loss_a).backward()
        self.naive_opt.step()
        self.naive_opt.zero_grad(set_to_none=True)

    def palp_step(self, cfg):
        from palp.steps.train import train_step

        return lambda: train_step(self.ctx, cfg, self.draws, micro=self.batch)

    def flops(self, base: str, cfg) -> float:
        """3F per image for a forward+backward, F per image and guidance row for the no-grad call(s)."""
        F, B = self.flops_fwd, self.batch
        if base in ("naive-db", "db"):
            return 3 * F * B
        if base == "naive-palp":
            return (3 + 4) * F * B
        rows = 2 + (1 if cfg.beta == 1.0 else 2)  # pretrained uncond + clean, personalized (uncond +) y_P
        return (3 + rows) * F * B


def parse(spec: str) -> tuple[str, dict]:
    from palp.core.settings import ATTENTION_BACKENDS, COMPILE_CHOICES, COMPILE_MODES

    base, opts = bl.parse_variant(spec, BASES, OPTIONS)
    if base.startswith("naive") and opts:
        raise BenchError(f"variant {spec!r}: the naive steps take no options")
    if opts.get("compile", "none") not in COMPILE_CHOICES or opts.get("mode", "default") not in COMPILE_MODES:
        raise BenchError(f"variant {spec!r}: compile must be one of {', '.join(COMPILE_CHOICES)}, "
                         f"mode one of {', '.join(COMPILE_MODES)}")
    if opts.get("sdpa", "auto") not in ATTENTION_BACKENDS:
        raise BenchError(f"variant {spec!r}: sdpa must be one of {', '.join(ATTENTION_BACKENDS)}")
    return base, opts


def measure(bench: Bench, spec: str, *, iters: int, warmup: int, backend: str) -> dict:
    from palp.models import speed as fast

    base, opts = parse(spec)
    cfg = dataclasses.replace(bench.cfg, method="ti-db" if base == "db" else "palp", fused_guidance="separate" not in opts)
    step = {"naive-db": bench.naive_db, "naive-palp": bench.naive_palp}.get(base) or bench.palp_step(cfg)

    def fn():
        with fast.attention_backend(opts.get("sdpa", "auto")):
            step()

    torch.backends.cudnn.benchmark = bool(opts.get("cudnn"))
    unet, dev = bench.model.unet, bench.device
    if opts.get("cl"):
        fast.set_channels_last(unet, True)
    if opts.get("ckpt"):
        fast.set_gradient_checkpointing(unet, True)
    if opts.get("compile"):
        if opts.get("sdpa"):  # compiled graphs keep the attention kernel they were traced with: trace afresh
            torch._dynamo.reset()
        fast.compile_unet(unet, opts["compile"], mode=opts.get("mode", "default"), backend=backend)
    try:
        bl.reset_peak_memory(dev)
        first = bl.first_call_s(fn, dev)
        ms = bl.time_ms(fn, dev, iters=iters, warmup=warmup)
        peak = bl.peak_memory_gib(dev)
    finally:
        fast.uncompile_unet(unet)
        fast.set_gradient_checkpointing(unet, False)
        fast.set_channels_last(unet, False)
        torch.backends.cudnn.benchmark = False
        if opts.get("sdpa") and opts.get("compile"):
            torch._dynamo.reset()
    flops = bench.flops(base, cfg)
    return {"variant": spec, "batch": bench.batch, "ms": ms, "first_call_s": first, "tflops": flops / (ms / 1e3) / 1e12,
            "flops": flops, "peak_mem_gib": peak}


def run_child(args) -> None:
    """--run-child CONFIG.json: one ``palp train`` run, timed from inside (for --run-steps)."""
    import palp.steps.train as tr
    from palp.core.settings import TrainConfig
    from palp.models import speed as fast

    spec = json.loads(Path(args.run_child).read_text())
    cfg = TrainConfig.from_dict(spec["config"])
    marks = []
    real = tr.step_losses

    def marked(*a, **kw):  # the time each micro-batch's loss starts: setup ends at the first
        marks.append(time.perf_counter())
        return real(*a, **kw)

    tr.step_losses = marked
    bl.quiet_libraries()
    t0 = time.perf_counter()
    tr.train(cfg, progress=not args.smoke)
    end = time.perf_counter()
    _, accum = cfg.accumulation(1)
    starts = marks[::accum]  # when each step's first micro-batch began
    later = (starts[-1] - starts[1]) / (len(starts) - 2)  # a steady step: from the second to the last
    result = {"steps": cfg.steps, "train_s": end - t0, "setup_s": starts[0] - t0, "first_step_s": starts[1] - starts[0],
              "ms_per_later_step": 1e3 * later, "tail_s": end - starts[-1] - later,
              "compile": fast.resolve_compile(cfg.compile, torch.device("cuda" if torch.cuda.is_available() else "cpu"))}
    Path(spec["result"]).write_text(json.dumps(result))


def timed_run(path: Path, args, *, steps: int, cache: str, label: str) -> dict:
    """A whole training run in a fresh process (its imports, model loading and compilation included)."""
    work = Path(tempfile.mkdtemp(prefix="palp-run-"))
    mixed = "no" if args.smoke else "bf16"
    cfg = train_config(str(path), batch=args.batch, method="palp", mixed_precision=mixed, steps=steps)
    cfg = dataclasses.replace(cfg, output=str(work / "run"), compile=args.run_compile, compile_cache=cache,
                              save_steps=[s for s in (100, 200, 300, 400, 500) if s <= steps])
    spec = {"config": cfg.to_dict(), "result": str(work / "result.json")}
    (work / "spec.json").write_text(json.dumps(spec, default=str))
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(work / "inductor"))  # nothing compiled before
    cmd = [sys.executable, __file__, "--run-child", str(work / "spec.json")] + (["--smoke"] if args.smoke else [])
    log(f"{label}: palp train, {steps} steps, compile {args.run_compile} ...")
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, cwd=bl.REPO)
    result = json.loads((work / "result.json").read_text())
    # Start to finish as a user sees it: interpreter start, imports, loading, compiling, training, writing.
    result.update(label=label, total_s=time.perf_counter() - t0, batch=args.batch)
    # A 500-step run of the same kind: this one plus the steps it lacks, at its steady rate.
    result["est_total_s_500_steps"] = result["total_s"] + (500 - steps) * result["ms_per_later_step"] / 1e3
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    bl.add_common_args(ap)
    ap.add_argument("--batch", type=int, help="global batch (default 32; 2 with --smoke)")
    ap.add_argument("--variants", nargs="*", help=f"default: {' '.join(DEFAULT_VARIANTS)} (none: only --run-steps)")
    ap.add_argument("--run-steps", type=int, default=0, help="also time a whole palp train run of this many steps")
    ap.add_argument("--run-warm-steps", type=int, default=0, help="then a short run reusing its compile cache")
    ap.add_argument("--run-compile", default="auto", help="--compile of the timed runs")
    ap.add_argument("--run-child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.run_child:
        run_child(args)
        return 0
    args.batch = args.batch or (2 if args.smoke else 32)
    iters = args.iters or (2 if args.smoke else 6)
    warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 2)
    backend = args.compile_backend or ("aot_eager" if args.smoke else "inductor")
    variants = args.variants if args.variants is not None else (SMOKE_VARIANTS if args.smoke else DEFAULT_VARIANTS)
    for v in variants:
        parse(v)  # bad input fails before anything runs
    if min(args.batch, iters) < 1 or warmup < 0 or args.run_steps < 0 or args.run_warm_steps < 0:
        raise BenchError("--batch and --iters must be >= 1; --warmup, --run-steps, --run-warm-steps >= 0")
    if 0 < args.run_steps < 3 or 0 < args.run_warm_steps < 3:
        raise BenchError("--run-steps and --run-warm-steps need at least 3 steps (setup, first step, steady steps)")
    if args.run_warm_steps and not args.run_steps:
        raise BenchError("--run-warm-steps reuses the compile cache of the --run-steps run; give both")
    device = bl.device_of(args)
    if args.smoke:
        torch.set_num_threads(min(2, torch.get_num_threads()))
    path = bl.model_dir(args)
    result = {"benchmark": "train_step", **bl.environment(device),
              "model": bl.model_label(args), "batch": args.batch,
              "precision": "no" if device.type == "cpu" else "bf16", "compile_backend": backend, "variants": [], "runs": []}
    if variants:
        ceiling = args.ceiling_tflops or bl.matmul_ceiling_tflops(device)
        bench = Bench(path, device, batch=args.batch, smoke=args.smoke)
        result.update(resolution=bench.resolution, ceiling_tflops=ceiling, unet_fwd_gflop_per_image=bench.flops_fwd / 1e9,
                      palp_floor_ms_at_ceiling=7 * bench.flops_fwd * args.batch / (ceiling * 1e12) * 1e3)
        from tqdm.auto import tqdm

        for spec in tqdm(variants, desc="train_step variants", disable=args.smoke):
            row = measure(bench, spec, iters=iters, warmup=warmup, backend=backend)
            row["share_of_ceiling"] = row["tflops"] / ceiling
            naive = next((r["ms"] for r in result["variants"] + [row] if r["variant"] == "naive-db"), None)
            row["ratio_to_naive_db"] = row["ms"] / naive if naive else None
            result["variants"].append(row)
            log(json.dumps(row))
            bl.write_json(args.out, result)  # after every variant: a run cut short still reports
        del bench
    if args.run_steps:
        cache = tempfile.mkdtemp(prefix="palp-compile-cache-")
        result["runs"].append(timed_run(path, args, steps=args.run_steps, cache=cache, label="cold compile cache"))
        bl.write_json(args.out, result)
        if args.run_warm_steps:
            result["runs"].append(timed_run(path, args, steps=args.run_warm_steps, cache=cache, label="warm compile cache"))
    bl.write_json(args.out, result)
    print(f"\n{result['device']}, torch {result['torch']}, batch {args.batch}, {result['precision']}")
    if variants:
        print(f"{result['resolution']}px, ceiling {result['ceiling_tflops']:.1f} TFLOP/s, "
              f"UNet forward {result['unet_fwd_gflop_per_image']:.1f} GFLOP/image\n")
        print(bl.markdown_table(result["variants"], [
            ("variant", "variant", ""), ("ms", "ms/step", ".1f"), ("ratio_to_naive_db", "x naive TI+DB", ".2f"),
            ("share_of_ceiling", "share of ceiling", ".1%"), ("first_call_s", "first call s", ".1f"),
            ("peak_mem_gib", "peak GiB", ".2f")]))
    if result["runs"]:
        print()
        print(bl.markdown_table(result["runs"], [
            ("label", "whole run", ""), ("steps", "steps", "d"), ("total_s", "total s", ".1f"), ("setup_s", "setup s", ".1f"),
            ("first_step_s", "first step s", ".1f"), ("ms_per_later_step", "ms/later step", ".1f"),
            ("est_total_s_500_steps", "500 steps, est. s", ".0f")]))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
