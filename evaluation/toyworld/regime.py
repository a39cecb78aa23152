"""Does the toy world reach the regime PALP is about? TI+DB on personal subjects, read by the judge.

    python evaluation/toyworld/regime.py --out DIR [--subjects purple-cat pink-robot ...]
        [--prompt "A sketch of [V] in the snow at night" ...] [--lr 1e-3 3e-3] [--steps 2000]
        [--save-steps 100,250,500,1000,2000] [--samples 6] [--reach-by 1000]

The two conditions a world must meet before PALP's claim can be tested on it, checked on the
subjects given (examples/toyworld/NAME with its truth NAME.json):

1. **Reached**: TI+DB keeps the subject *in the target styles*: at some snapshot of at most
   ``--reach-by`` steps, identity kept (the judge, against the subject's truth) is >= 0.8 over
   the (subject, prompt) units, at some learning rate.
2. **Overfits, not collapses**: pushed further (more steps or a higher rate), TI+DB loses the
   prompt while keeping the subject: at some (rate, step), prompt elements found (the judge's
   style, place and time) <= 0.7 while identity >= 0.7 and class >= 0.9.

TI+DB trains once per (subject, rate), batch 2, LoRA rank 32, and each snapshot is sampled on
every prompt (DDIM 20, CFG 7.5); ``palp score --judge`` reads the samples. Writes
``DIR/regime.md``: per (rate, step) the means with 95% intervals over the units (cluster
bootstrap), beside each unit's chance level and ceiling (``DIR/scores/judge_units.csv``), and the
two verdicts. A run already finished in ``DIR`` is not trained or sampled again.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

from experiment_tables import ELEMENTS, FOUND, IDENTITY, cluster_bootstrap  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
PROMPTS = ("A sketch of [V] in the snow at night", "A watercolour of [V] on the beach at sunset",
           "A neon drawing of [V] on the grass at sunset")
CLASS = "Judge: class"
REACHED, KEPT_IDENTITY, KEPT_CLASS, LOST_PROMPT = 0.8, 0.7, 0.9, 0.7


def palp(argv: list[str]) -> None:
    from palp.cli import main

    code = main(argv)
    if code:
        raise SystemExit(f"regime.py: palp {argv[0]} failed (exit {code}): {' '.join(argv)}")


def summarise(scores: pd.DataFrame, units: pd.DataFrame | None, reach_by: int) -> str:
    """regime.md's text: the table per (rate, step) and the two verdicts."""
    scores = scores[scores["method"] == "ti-db"].copy()
    scores[FOUND] = scores[ELEMENTS].mean(axis=1)
    rows, points = [], []
    for (lr, step), df in scores.groupby(["lr", "step"], sort=True):
        stats = cluster_bootstrap(df, [IDENTITY, FOUND, CLASS])  # 95% intervals over (subject, prompt) units
        points.append((lr, step, stats))
        rows.append(f"| {lr:g} | {step} | " + " | ".join(f"{m:.3f} [{lo:.3f}, {hi:.3f}]" for m, lo, hi in stats.values())
                    + f" | {df.groupby(['subject', 'prompt']).ngroups} |")
    lines = ["| lr | step | identity kept | prompt elements found | class | units |", "|---|---|---|---|---|---|", *rows, ""]
    if units is not None:
        lines += [f"Units' chance level of identity {units['chance'].min():.3f}-{units['chance'].max():.3f}; ceilings on "
                  f"clean renders {units['ceiling, clean renders'].min():.3f}-{units['ceiling, clean renders'].max():.3f}, "
                  f"through the VAE {units['ceiling, VAE round trips'].min():.3f}-{units['ceiling, VAE round trips'].max():.3f} "
                  f"(per unit: scores/judge_units.csv). A perfect answer scores 1 on every column.", ""]
    reached = [(lr, step, s) for lr, step, s in points if step <= reach_by and s[IDENTITY][0] >= REACHED]
    overfit = [(lr, step, s) for lr, step, s in points
               if s[FOUND][0] <= LOST_PROMPT and s[IDENTITY][0] >= KEPT_IDENTITY and s[CLASS][0] >= KEPT_CLASS]
    first = min(reached, key=lambda p: (p[1], p[0]), default=None)
    lines.append(f"1. Reached (identity >= {REACHED} by step {reach_by}): "
                 + (f"**yes**, first at lr {first[0]:g}, step {first[1]}: identity {first[2][IDENTITY][0]:.3f} "
                    f"[{first[2][IDENTITY][1]:.3f}, {first[2][IDENTITY][2]:.3f}]" if first else
                    f"**no**: the best by step {reach_by} is identity "
                    f"{max((s[IDENTITY][0] for _, st, s in points if st <= reach_by), default=float('nan')):.3f}"))
    lines.append(f"2. Overfits without collapsing (elements found <= {LOST_PROMPT}, identity >= {KEPT_IDENTITY}, class >= "
                 f"{KEPT_CLASS}): " + ("**yes**, at " + "; ".join(
                     f"lr {lr:g} step {step} (elements {s[FOUND][0]:.3f}, identity {s[IDENTITY][0]:.3f}, class {s[CLASS][0]:.3f})"
                     for lr, step, s in overfit) if overfit else "**no** point of the grid"))
    lines.append("These are point readings of the means; each interval above says how far they can be trusted.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--subjects", nargs="+", default=["purple-cat", "pink-robot"], help="names under examples/toyworld")
    ap.add_argument("--prompt", action="append", dest="prompts", help=f"repeatable (default: {'; '.join(PROMPTS)})")
    ap.add_argument("--lr", type=float, nargs="+", default=[1e-3, 3e-3])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--save-steps", default="100,250,500,1000,2000")
    ap.add_argument("--samples", type=int, default=6, help="per snapshot and prompt")
    ap.add_argument("--sample-steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--lora-rank", type=int, default=32)
    ap.add_argument("--reach-by", type=int, default=1000)
    ap.add_argument("--model", default="toyworld", help="the base model (palp's --pretrained-model)")
    ap.add_argument("--clip", default="toyworld")
    ap.add_argument("--judge", default="toyworld")
    ap.add_argument("--examples", type=Path, default=REPO / "examples" / "toyworld")
    args = ap.parse_args(argv)
    prompts = args.prompts or list(PROMPTS)
    missing = [s for s in args.subjects if not (args.examples / s).is_dir() or not (args.examples / f"{s}.json").is_file()]
    if missing:
        ap.error(f"no photos or truth file for {', '.join(missing)} under {args.examples} (NAME/ and NAME.json)")
    out = args.out.resolve()
    prep = out / "prep"
    if not (prep / "manifest.json").is_file():
        argv = ["prepare", "--output", str(prep), "--pretrained-model", args.model, "--clip", args.clip, "--quiet"]
        for s in args.subjects:
            argv += ["--subject", f"{s}={args.examples / s}", "--truth", f"{s}={args.examples / s}.json"]
        for p in prompts:
            argv += ["--prompt", p]
        palp(argv)
    samples = []
    for lr in args.lr:
        for s in args.subjects:
            run, sampled = out / "runs" / f"ti-db~{lr:g}~{s}", out / "samples" / f"ti-db~{lr:g}~{s}"
            samples.append(sampled)
            if (sampled / "samples.csv").is_file():
                continue
            if not (run / "training_config.json").is_file():
                palp(["train", "--prepared", str(prep), "--task", f"{s}-00", "--pretrained-model", args.model, "--method",
                      "ti-db", "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--lr", str(lr),
                      "--lora-rank", str(args.lora_rank), "--save-steps", args.save_steps, "--checkpoint-every", "500",
                      "--output", str(run), "--quiet", *(["--resume"] if run.exists() else [])])
            palp(["sample", "--model", str(run), "--prepared", str(prep), *[a for i in range(len(prompts)) for a in
                  ("--task", f"{s}-{i:02d}")], "--output", str(sampled), "--num-samples", str(args.samples),
                  "--steps", str(args.sample_steps), "--checkpoints", "all", "--quiet"])
    palp(["score", *[a for d in samples for a in ("--samples", str(d))], "--prepared", str(prep), "--output",
          str(out / "scores"), "--clip", args.clip, "--judge", args.judge, "--quiet"])
    from palp.core.safecsv import read_csv

    scores = read_csv((out / "scores" / "scores.csv").read_bytes())
    for c in (*ELEMENTS, IDENTITY, CLASS, "step"):
        scores[c] = pd.to_numeric(scores[c])
    scores["lr"] = scores["run"].str.extract(r"ti-db~([0-9e.+-]+)~")[0].astype(float)
    units_csv = out / "scores" / "judge_units.csv"
    units = read_csv(units_csv.read_bytes()) if units_csv.is_file() else None
    if units is not None:
        for c in ("chance", "ceiling, clean renders", "ceiling, VAE round trips"):
            units[c] = pd.to_numeric(units[c])
    text = summarise(scores.dropna(subset=["lr"]), units, args.reach_by)
    from palp.core.storage import write_text

    write_text(out / "regime.md", f"# TI+DB on {', '.join(args.subjects)} ({args.model})\n\n" + text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
