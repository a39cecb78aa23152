"""Sampling and scoring throughput on the tiny model and tiny CLIP (CPU by default).

    python evaluation/benchmarks/tiny_sample_score.py [--images 32] [--steps 50] [--batch-size 8]

Trains a 2-step run on the example subject, then times `palp sample` (DDIM, CFG 7.5) and
`palp score` (tiny CLIP) end to end; prints images per second for each.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from palp.cli import main as cli
from palp.steps.prepare import PromptSpec, SubjectSpec, prepare
from palp.steps.sample import sample
from palp.steps.score import score

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "subjects" / "cat"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prepare([SubjectSpec("cat", str(EXAMPLE), "cat")], [PromptSpec("A sketch of [V] in Paris at night")],
                str(tmp / "prep"), pretrained_model="tiny", progress=False)
        cli(["train", "--prepared", str(tmp / "prep"), "--pretrained-model", "tiny", "--steps", "2", "--batch-size", "2",
             "--output", str(tmp / "run"), "--quiet"])
        sample(str(tmp / "run"), str(tmp / "warm"), num_samples=1, steps=2, progress=False)  # load + warm-up
        t0 = time.perf_counter()
        sample(str(tmp / "run"), str(tmp / "s"), num_samples=args.images, steps=args.steps, batch_size=args.batch_size,
               progress=False)
        t_sample = time.perf_counter() - t0
        score([str(tmp / "warm")], str(tmp / "prep"), str(tmp / "warm-scores"), clip_model="tiny", progress=False)
        t0 = time.perf_counter()
        score([str(tmp / "s")], str(tmp / "prep"), str(tmp / "scores"), clip_model="tiny", progress=False)
        t_score = time.perf_counter() - t0
    print("| step | images | seconds | images/s |\n|---|---|---|---|")
    print(f"| sample ({args.steps} DDIM steps, CFG, batch {args.batch_size}) | {args.images} | {t_sample:.2f} | {args.images / t_sample:.2f} |")
    print(f"| score (tiny CLIP, incl. report) | {args.images} | {t_score:.2f} | {args.images / t_score:.2f} |")


if __name__ == "__main__":
    main()
