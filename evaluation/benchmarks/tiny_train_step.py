"""Seconds per training step on the tiny model, per method, on the CPU.

    python evaluation/benchmarks/tiny_train_step.py [--batch-size 32] [--threads 1] [--steps 30]

Runs `palp.steps.train.train` (what users run) twice per method, for 2 and for 2 + N steps; the
difference over N is the steady-state time of one optimizer step at the global batch.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from palp.core.methods import METHODS
from palp.core.settings import Subject, TrainConfig
from palp.steps.train import train

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "subjects" / "cat"


def run_seconds(method: str, batch: int, steps: int) -> float:
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(subjects=[Subject("[V]", str(EXAMPLE), "cat")], target_prompt="A sketch of [V] in Paris at night",
                          output=out, pretrained_model="tiny", method=method, batch_size=batch, steps=steps,
                          checkpoint_every=10**9, save_steps=[])
        t0 = time.perf_counter()
        train(cfg, progress=False)
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"tiny model, global batch {args.batch_size}, {args.threads} CPU thread(s), {args.steps} timed steps")
    print("| method | s/step |\n|---|---|")
    for method in METHODS:
        warm = run_seconds(method, args.batch_size, 2)
        full = run_seconds(method, args.batch_size, 2 + args.steps)
        print(f"| {method} | {(full - warm) / args.steps:.3f} |")


if __name__ == "__main__":
    main()
