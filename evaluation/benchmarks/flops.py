"""FLOP accounting of a PALP step and of sampling, on the meta device: no GPU, no arithmetic.

    python evaluation/benchmarks/flops.py [--batch 32] [--ceiling-tflops 786] [--out flops.json]

Counts, with torch's FLOP counter on shape-only tensors, an SD-1.4-shaped UNet with LoRA r=32:
one forward per image (F), a forward+backward with the base frozen (what a training step
really computes: input gradients and LoRA gradients, no base weight gradients), the LoRA's
share of a forward, and from those each step's FLOPs and its time at the ceiling. The anchors
(and the benchmarks, to stay comparable with them) count a forward+backward as 3F.
"""

from __future__ import annotations

import argparse
import sys

import benchlib as bl
import torch


def count(unet, batch: int, *, grad: bool, text_dim: int = 768) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(batch, 4, 64, 64, device="meta")
    states = torch.randn(batch, 77, text_dim, device="meta")
    t = torch.zeros(batch, dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as counter:
        if grad:
            unet(x, t, encoder_hidden_states=states).sample.sum().backward()
        else:
            with torch.no_grad():
                unet(x, t, encoder_hidden_states=states)
    return float(counter.get_total_flops())


def main(argv=None) -> int:
    from diffusers import UNet2DConditionModel

    from palp.models.personalize import add_lora

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--ceiling-tflops", type=float, default=786.0, help="the H200's measured bf16 matmul rate (anchors)")
    ap.add_argument("--steps", type=int, default=50, help="sampling steps")
    ap.add_argument("--out", help="JSON file")
    args = ap.parse_args(argv)
    if args.batch < 1 or args.ceiling_tflops <= 0 or args.steps < 1:
        raise bl.BenchError("--batch, --ceiling-tflops and --steps must be positive")
    bl.quiet_libraries()
    with torch.device("meta"):
        unet = UNet2DConditionModel(**bl.SD14_UNET)
    unet.requires_grad_(False)
    add_lora(unet, rank=32)
    F = count(unet, 1, grad=False)
    FB = count(unet, 1, grad=True)
    unet.disable_adapters()
    F_base = count(unet, 1, grad=False)
    unet.enable_adapters()
    B, ceiling = args.batch, args.ceiling_tflops * 1e12
    steps = {  # per step, FLOPs: (anchor convention, counted)
        "TI+DB (fwd+bwd of B)": (3 * F * B, FB * B),
        "PALP, beta != 1 (fwd+bwd of B, no-grad 4B)": (7 * F * B, (FB + 4 * F) * B),
        "PALP, beta = 1 (fwd+bwd of B, no-grad 3B)": (6 * F * B, (FB + 3 * F) * B),
    }
    rows = [{"step": k, "tflop_convention": c / 1e12, "tflop_counted": n / 1e12, "floor_ms_convention": c / ceiling * 1e3,
             "floor_ms_counted": n / ceiling * 1e3} for k, (c, n) in steps.items()]
    sample_floor = ceiling / (args.steps * 2 * F)
    result = {"unet_fwd_gflop_per_image": F / 1e9, "fwd_bwd_gflop_per_image": FB / 1e9, "fwd_bwd_over_fwd": FB / F,
              "lora_share_of_fwd": 1 - F_base / F, "batch": B, "ceiling_tflops": args.ceiling_tflops, "steps": rows,
              "sampling_floor_images_per_s": sample_floor}
    bl.write_json(args.out, result)
    print(f"UNet forward F = {F / 1e9:.1f} GFLOP/image; forward+backward with the base frozen = {FB / 1e9:.1f} "
          f"GFLOP/image = {FB / F:.2f} F (the anchors count 3 F); LoRA r=32: {100 * (1 - F_base / F):.1f}% of F\n")
    print(bl.markdown_table(rows, [("step", f"step (batch {B})", ""), ("tflop_convention", "TFLOP (3F convention)", ".1f"),
                                   ("floor_ms_convention", f"floor ms @ {args.ceiling_tflops:.0f}", ".0f"),
                                   ("tflop_counted", "TFLOP (counted)", ".1f"), ("floor_ms_counted", "floor ms, counted", ".0f")]))
    print(f"\nsampling, {args.steps} steps with CFG: floor {sample_floor:.2f} images/s")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except bl.BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
