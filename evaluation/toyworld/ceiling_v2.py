"""World v2's units, checked before anything trains: the v2 judge's identity and class on
clean v2 renders of each (subject, prompt) unit and on their round trips through the v2 VAE
(palp.toyworld.ceiling's rule and thresholds), beside each unit's chance level.

    python evaluation/toyworld/ceiling_v2.py --work WORK [--held-out 8] [--renders 16] [--out FILE.md]

Subjects: v1's six personal subjects (the development set) and ``--held-out`` composites drawn
by ``palp.toyworld.v2.world.held_out_subjects`` (never in pretraining); prompts: every style in
three (place, time) settings. Needs the vae and judge stages of ``pretrain.py --world v2``
(``WORK/vae``, ``WORK/judge.pt``); prints the table and writes it to ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch

PLACE_TIMES = (("beach", "sunset"), ("snow", "night"), ("city", "day"))


def prompts() -> list[str]:
    from palp.toyworld.scene import PLACE_PHRASES, STYLE_PHRASES, STYLES, TIME_PHRASES

    return [f"{STYLE_PHRASES[s]} [V] {PLACE_PHRASES[p]} {TIME_PHRASES[t]}" for s in STYLES for p, t in PLACE_TIMES]


def subjects(held_out: int) -> list[tuple[str, dict]]:
    """(name, truth) of the development subjects, then of ``held_out`` held-out composites."""
    from palp.toyworld.judge import truth_identity
    from palp.toyworld.v2.world import held_out_subjects
    from palp.toyworld.world import PERSONAL_SUBJECTS

    return [(s.name, truth_identity(dataclasses.asdict(s.identity))) for s in (*PERSONAL_SUBJECTS, *held_out_subjects(held_out))]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", required=True, type=Path, help="pretrain.py --world v2's working folder")
    ap.add_argument("--held-out", type=int, default=8)
    ap.add_argument("--renders", type=int, default=16, help="renders per unit")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    from diffusers import AutoencoderKL

    from palp.core.storage import write_text
    from palp.toyworld.ceiling import table, unit_ceiling
    from palp.toyworld.judge import Judge
    from palp.toyworld.v2.render import render_array
    from palp.toyworld.world import PERSONAL_SUBJECTS

    if not (args.work / "judge.pt").exists() or not (args.work / "vae").is_dir():
        print(f"{args.work} lacks the v2 vae or judge (vae/, judge.pt): run their stages first", file=sys.stderr)
        return 2
    judge = Judge()
    judge.load_state_dict(torch.load(args.work / "judge.pt", weights_only=True, map_location="cpu"))
    judge.eval()
    vae = AutoencoderKL.from_pretrained(args.work / "vae").eval()
    dev = {s.name for s in PERSONAL_SUBJECTS}
    ceilings = [unit_ceiling(judge, vae, name, truth, prompt, n=args.renders, render=render_array)
                for name, truth in subjects(args.held_out) for prompt in prompts()]
    kept = [c for c in ceilings if not c.failures()]
    lines = [table(ceilings), f"{len(kept)} of {len(ceilings)} units kept by the thresholds "
             f"(identity clean >= 0.95, VAE >= 0.90, class >= 0.95); "
             f"development subjects: {len([c for c in kept if c.subject in dev])} of "
             f"{len([c for c in ceilings if c.subject in dev])}; held-out: "
             f"{len([c for c in kept if c.subject not in dev])} of {len([c for c in ceilings if c.subject not in dev])}.",
             f"Means over the units: identity clean {np.mean([c.identity_clean for c in ceilings]):.3f}, "
             f"VAE {np.mean([c.identity_vae for c in ceilings]):.3f}, class {np.mean([c.class_clean for c in ceilings]):.3f}, "
             f"chance {np.mean([c.chance for c in ceilings]):.3f}."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        write_text(args.out, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
