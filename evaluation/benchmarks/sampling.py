"""Sampling speed, measured side by side in one process: the stock pipeline against palp's sampler.

    python evaluation/benchmarks/sampling.py [--batch 16] [--steps 50] [--variants ...] --out sampling.json
    python evaluation/benchmarks/sampling.py --smoke --out smoke.json     # CPU, tiny model, seconds

Default: CUDA, an SD-1.4-shaped model with random weights at 512px (or --model PATH), fp16
(the stock default on a GPU), DDIM, CFG 7.5, with a random rank-32 LoRA and [V] embedding
loaded through diffusers' loaders, as ``palp sample`` loads a trained run (--no-lora: the
anchor's bare model). Both samplers run on the same pipeline object and the same starting
latents. Variants (``BASE[+OPTION...]``):

- ``stock``: ``StableDiffusionPipeline.__call__`` (output_type="np"), the anchor's reference.
- ``palp``: ``palp.models.denoising.generate``: the same steps, no host syncs inside the loop.
- options (palp only): ``vae=bf16|fp16|fp32`` (decoder dtype), ``cl`` (channels-last UNet),
  ``compile=transformers|blocks|unet``, ``mode=<torch.compile mode>``, ``sdpa=flash|cudnn|efficient|math``,
  ``cudnn`` (torch.backends.cudnn.benchmark: each convolution's fastest algorithm, found by timing).

Per variant: the first call (compilation included, 2 steps) timed alone, a 5-step call (the
warm-up, in which host syncs are counted), then --iters full calls (median); images/s, the share of the ceiling of the UNet work
(steps x 2 rows x F per image), peak memory, host syncs per batch (CUDA sync debug mode, on a
short call), and the largest and mean difference of its uint8 images from the stock
pipeline's (the same latents).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import benchlib as bl
import numpy as np
import torch
import torch._dynamo
from benchlib import BenchError, log

BASES = ("stock", "palp")
OPTIONS = ("vae", "cl", "compile", "mode", "sdpa", "cudnn")
PROMPT = "A sketch of [V] in Paris at night"
DEFAULT_VARIANTS = ["stock", "palp", "palp+vae=bf16", "palp+compile=blocks+vae=bf16",
                    "palp+compile=blocks+vae=bf16+cudnn", "palp+compile=blocks+vae=bf16+sdpa=cudnn",
                    "palp+compile=blocks+cl+vae=bf16"]
SMOKE_VARIANTS = ["stock", "palp", "palp+vae=bf16", "palp+cl"]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def random_lora(path: Path, out: Path, *, rank: int) -> Path:
    """A rank-r LoRA and one [V] embedding with random values, written as ``palp train`` writes them."""
    from palp.models.base_model import load_base_model
    from palp.models.personalize import build_personalized_model
    from palp.models.run_weights import export_weights

    base = load_base_model(str(path))
    torch.manual_seed(0)
    model, _, _ = build_personalized_model(base, {"[V]": "cat"}, rank=rank)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 1e-3)
    export_weights(model, ["<v>"], out)
    return out


class Samplers:
    def __init__(self, path: Path, device: torch.device, *, batch: int, steps: int, lora: bool, smoke: bool):
        from palp.core.prompts import to_token_prompt
        from palp.models.denoising import build_pipeline, initial_latents, sample_seed
        from palp.steps.sample import load_weights

        self.device, self.batch, self.steps = device, batch, steps
        self.dtype = torch.float32 if device.type == "cpu" else torch.float16
        self.pipe = build_pipeline(path, scheduler="ddim", device=device, dtype=self.dtype)
        self.prompt = PROMPT.replace("[V]", "a cat")
        if lora:
            load_weights(self.pipe, random_lora(path, Path(tempfile.mkdtemp(prefix="palp-lora-")), rank=4 if smoke else 32))
            self.prompt = to_token_prompt(PROMPT)
        unet = self.pipe.unet
        self.latent_shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
        self.latents = initial_latents([sample_seed(0, PROMPT, i) for i in range(batch)], self.latent_shape)
        self.resolution = unet.config.sample_size * 8
        self.flops_fwd = bl.unet_forward_flops(unet, resolution=self.resolution, device=device, dtype=self.dtype,
                                               text_dim=self.pipe.unet.config.cross_attention_dim)
        self.vaes = {self.pipe.vae.dtype: self.pipe.vae}  # each decoder dtype cast once from this one
        self.reference = None  # the stock pipeline's images

    def use_vae(self, dtype: torch.dtype) -> None:
        import copy

        if dtype not in self.vaes:
            self.vaes[dtype] = copy.deepcopy(self.vaes[self.dtype]).to(dtype=dtype)
        self.pipe.vae = self.vaes[dtype]

    def run(self, base: str, steps: int) -> np.ndarray:
        from palp.models.denoising import generate

        prompts = [self.prompt] * self.batch
        if base == "stock":
            images = self.pipe(prompts, num_inference_steps=steps, guidance_scale=7.5,
                               latents=self.latents.to(self.device, self.dtype), output_type="np").images
            return (images * 255).round().astype(np.uint8)
        return generate(self.pipe, prompts, self.latents, steps=steps, guidance=7.5)


def count_syncs(fn, device: torch.device) -> int | None:
    """Host-device synchronisations during ``fn()`` (CUDA's sync debug mode warns at each)."""
    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def parse(spec: str) -> tuple[str, dict]:
    base, opts = bl.parse_variant(spec, BASES, OPTIONS)
    if base == "stock" and opts:
        raise BenchError(f"variant {spec!r}: the stock pipeline takes no options")
    if opts.get("vae", "fp32") not in DTYPES:
        raise BenchError(f"variant {spec!r}: vae must be one of {', '.join(DTYPES)}")
    from palp.core.settings import ATTENTION_BACKENDS, COMPILE_CHOICES

    if opts.get("sdpa", "auto") not in ATTENTION_BACKENDS or opts.get("compile", "none") not in COMPILE_CHOICES:
        raise BenchError(f"variant {spec!r}: sdpa must be one of {', '.join(ATTENTION_BACKENDS)}, "
                         f"compile one of {', '.join(COMPILE_CHOICES)}")
    return base, opts


def measure(s: Samplers, spec: str, *, iters: int, backend: str) -> dict:
    from palp.models import speed as fast

    base, opts = parse(spec)
    unet, dev = s.pipe.unet, s.device
    s.use_vae(DTYPES[opts["vae"]] if opts.get("vae") else s.dtype)
    if opts.get("cl"):
        fast.set_channels_last(unet, True)
    if opts.get("compile"):
        if opts.get("sdpa"):  # compiled graphs keep the attention kernel they were traced with: trace afresh
            torch._dynamo.reset()
        fast.compile_unet(unet, opts["compile"], mode=opts.get("mode", "default"), backend=backend)
    attention = fast.attention_backend(opts.get("sdpa", "auto"))
    torch.backends.cudnn.benchmark = bool(opts.get("cudnn"))
    try:
        bl.reset_peak_memory(dev)
        with attention:
            first = bl.first_call_s(lambda: s.run(base, 2), dev)
            syncs = count_syncs(lambda: s.run(base, 5), dev)  # also the warm-up
            times, images = [], None
            for _ in range(iters):
                bl.sync(dev)
                t0 = time.perf_counter()
                images = s.run(base, s.steps)  # ends with the images on the host: a sync
                times.append(time.perf_counter() - t0)
        peak = bl.peak_memory_gib(dev)
    finally:
        fast.uncompile_unet(unet)
        fast.set_channels_last(unet, False)
        if opts.get("sdpa") and opts.get("compile"):
            torch._dynamo.reset()
        s.use_vae(s.dtype)
        torch.backends.cudnn.benchmark = False
    seconds = float(np.median(times))
    if base == "stock" and s.reference is None:
        s.reference = images
    diff = None if s.reference is None else np.abs(images.astype(np.int16) - s.reference.astype(np.int16))
    flops = s.steps * 2 * s.flops_fwd * s.batch
    return {"variant": spec, "batch": s.batch, "steps": s.steps, "seconds": seconds, "images_per_s": s.batch / seconds,
            "first_call_s": first, "tflops": flops / seconds / 1e12, "peak_mem_gib": peak, "host_syncs_5_steps": syncs,
            "max_diff_vs_stock": None if diff is None else int(diff.max()),
            "mean_diff_vs_stock": None if diff is None else float(diff.mean())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    bl.add_common_args(ap)
    ap.add_argument("--batch", type=int, help="images per batch (default 16; 2 with --smoke)")
    ap.add_argument("--steps", type=int, help="denoising steps (default 50; 4 with --smoke)")
    ap.add_argument("--variants", nargs="+", help=f"default: {' '.join(DEFAULT_VARIANTS)}")
    ap.add_argument("--no-lora", action="store_true", help="the bare base model, as the anchor measured")
    args = ap.parse_args(argv)
    args.batch = args.batch or (2 if args.smoke else 16)
    steps = args.steps or (4 if args.smoke else 50)
    iters = args.iters or 1  # a 50-step batch takes seconds on a GPU: one is a stable measurement
    backend = args.compile_backend or ("aot_eager" if args.smoke else "inductor")
    variants = args.variants or (SMOKE_VARIANTS if args.smoke else DEFAULT_VARIANTS)
    for v in variants:
        parse(v)  # bad input fails before anything runs
    if min(args.batch, steps, iters) < 1:
        raise BenchError("--batch, --steps and --iters must be >= 1")
    device = bl.device_of(args)
    if args.smoke:
        torch.set_num_threads(min(2, torch.get_num_threads()))
    path = bl.model_dir(args)
    ceiling = args.ceiling_tflops or bl.matmul_ceiling_tflops(device)
    s = Samplers(path, device, batch=args.batch, steps=steps, lora=not args.no_lora, smoke=args.smoke)
    result = {"benchmark": "sampling", **bl.environment(device),
              "model": bl.model_label(args), "lora": not args.no_lora,
              "resolution": s.resolution, "batch": args.batch, "steps": steps, "guidance": 7.5, "scheduler": "ddim",
              "precision": str(s.dtype).replace("torch.", ""), "compile_backend": backend, "ceiling_tflops": ceiling,
              "unet_fwd_gflop_per_image": s.flops_fwd / 1e9,
              "floor_images_per_s": ceiling * 1e12 / (steps * 2 * s.flops_fwd), "variants": []}
    if "stock" in variants:  # the reference images come first
        variants = ["stock"] + [v for v in variants if v != "stock"]
    from tqdm.auto import tqdm

    for spec in tqdm(variants, desc="sampling variants", disable=args.smoke):
        row = measure(s, spec, iters=iters, backend=backend)
        row["share_of_ceiling"] = row["tflops"] / ceiling
        result["variants"].append(row)
        log(json.dumps(row))
        bl.write_json(args.out, result)
    stock = next((r["images_per_s"] for r in result["variants"] if r["variant"] == "stock"), None)
    for r in result["variants"]:
        r["x_stock"] = r["images_per_s"] / stock if stock else None
    bl.write_json(args.out, result)
    print(f"\n{result['device']}, torch {result['torch']}, batch {args.batch}, {s.resolution}px, {steps} DDIM steps, CFG 7.5, "
          f"{result['precision']}, LoRA {'on' if result['lora'] else 'off'}, ceiling {ceiling:.1f} TFLOP/s, "
          f"floor {result['floor_images_per_s']:.2f} images/s\n")
    print(bl.markdown_table(result["variants"], [
        ("variant", "variant", ""), ("images_per_s", "images/s", ".2f"), ("x_stock", "x stock", ".2f"),
        ("share_of_ceiling", "share of ceiling", ".1%"), ("first_call_s", "first call s", ".1f"),
        ("peak_mem_gib", "peak GiB", ".2f"), ("host_syncs_5_steps", "syncs (5 steps)", "d"),
        ("max_diff_vs_stock", "max diff", "d"), ("mean_diff_vs_stock", "mean diff", ".3f")]))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
