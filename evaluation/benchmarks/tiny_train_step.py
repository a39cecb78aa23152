"""Seconds per training step on the tiny model, per method variant, on the CPU.

    python evaluation/benchmarks/tiny_train_step.py [--batch-size 32] [--threads 1] [--steps 30] [--variants ...]

Runs `palp.steps.train.train` (what users run) twice per variant, for 2 and for 2 + N steps; the
difference over N is the steady-state time of one optimizer step at the global batch (after one
untimed run, which builds and caches the tiny model). Every
variant runs without prior preservation (its class rows would add a forward and backward per
row, the same for every method), so the rows compare the personalization and the alignment term;
``custom-diffusion/no-aug`` is Custom Diffusion with ``--scale-augmentation off`` (the difference
is the per-step rescaling and VAE encoding of its photos).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from palp.core.settings import Subject, TrainConfig, split_variant
from palp.steps.train import train

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "subjects" / "cat"


VARIANTS = ("ti-db", "palp", "sds", "nfsd", "custom-diffusion", "custom-diffusion/no-aug", "palp+custom-diffusion",
            "p-plus", "palp+p-plus", "neti", "palp+neti")


def run_seconds(variant: str, batch: int, steps: int) -> float:
    label, _, option = variant.partition("/")
    method, noise, personalize = split_variant(label)
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(subjects=[Subject("[V]", str(EXAMPLE), "cat")], target_prompt="A sketch of [V] in Paris at night",
                          output=out, pretrained_model="tiny", method=method, noise=noise, personalize=personalize,
                          batch_size=batch, steps=steps, checkpoint_every=10**9, save_steps=[], prior_preservation=False,
                          scale_augmentation=False if option == "no-aug" else None)
        t0 = time.perf_counter()
        train(cfg, progress=False)
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), help="method variants (custom-diffusion/no-aug: "
                                                                           "without its scale augmentation)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"tiny model, global batch {args.batch_size}, {args.threads} CPU thread(s), {args.steps} timed steps")
    run_seconds("ti-db", args.batch_size, 2)  # untimed: the first run also builds and caches the tiny model
    print("| variant | s/step |\n|---|---|", flush=True)
    for variant in args.variants:
        warm = run_seconds(variant, args.batch_size, 2)
        full = run_seconds(variant, args.batch_size, 2 + args.steps)
        print(f"| {variant} | {(full - warm) / args.steps:.3f} |", flush=True)


if __name__ == "__main__":
    main()
