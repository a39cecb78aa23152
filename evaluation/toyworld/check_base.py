"""Does the pretrained toy model follow prompts? The judge reads held-out samples.

    python evaluation/toyworld/check_base.py --out /tmp/toy-base [-n 200]

Draws ``n`` scenes the pretraining never rendered (a seed of their own; any caption that
occurs in the pretraining set is redrawn when ``--work`` points at it), prompts the toy model
with their captions (stock diffusers StableDiffusionPipeline, DDIM, classifier-free
guidance), and reports the fraction of samples in which the judge finds the prompted style,
place, time and class, and each identity attribute the caption names. Writes base.json and a
grid of the first samples (base_grid.png) to --out.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from palp.core.storage import write_bytes, write_text
from palp.toyworld.judge import IDENTITY_ATTRIBUTES, predict, resolve_judge, shown_identity
from palp.toyworld.world import random_scene


def held_out_scenes(n: int, seed: int, seen: set[str]):
    rng = random.Random(seed)
    scenes = []
    while len(scenes) < n:
        s = random_scene(rng)
        if s.caption() not in seen:
            scenes.append(s)
    return scenes


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="toyworld")
    ap.add_argument("--judge", default="toyworld")
    ap.add_argument("--out", required=True)
    ap.add_argument("-n", type=int, default=200)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--seed", type=int, default=777)
    ap.add_argument("--work", help="the pretraining folder: exclude its captions")
    args = ap.parse_args(argv)

    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from palp.models.base_model import resolve_model_dir

    seen = set(json.loads((Path(args.work) / "captions.json").read_text())) if args.work else set()
    scenes = held_out_scenes(args.n, args.seed, seen)
    pipe = StableDiffusionPipeline.from_pretrained(resolve_model_dir(args.model), safety_checker=None,
                                                   feature_extractor=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)  # latents are not in [-1, 1]
    pipe.set_progress_bar_config(disable=True)
    judge = resolve_judge(args.judge)
    t0 = time.perf_counter()
    images = []
    for i in tqdm(range(0, len(scenes), args.batch_size), desc="sampling held-out captions"):
        chunk = scenes[i : i + args.batch_size]
        g = [torch.Generator().manual_seed(args.seed + i + j) for j in range(len(chunk))]
        out = pipe([s.caption() for s in chunk], num_inference_steps=args.steps, guidance_scale=args.guidance,
                   generator=g, output_type="pil")
        images += out.images
    wall = time.perf_counter() - t0
    readings = predict(judge, images)
    hits = {k: [] for k in ("style", "place", "time", "class", *IDENTITY_ATTRIBUTES)}
    for s, r in zip(scenes, readings):
        truth = s.labels()
        for k in ("style", "place", "time", "class"):
            hits[k].append(r[k] == truth[k])
        named = {"color": s.caption_color, "pattern": s.caption_pattern, "accessory": s.caption_accessory,
                 "pattern_color": s.caption_color and s.caption_pattern and truth["pattern"] != "plain"}
        for k in IDENTITY_ATTRIBUTES:
            if named[k] and k in shown_identity(s.style, truth["pattern"]):
                hits[k].append(r[k] == truth[k])
    # Where the class is missed: by prompted style and by prompted class.
    by = {"class_by_style": {}, "class_by_class": {}}
    for s, r in zip(scenes, readings):
        for key, group in (("class_by_style", s.style), ("class_by_class", s.identity.cls)):
            by[key].setdefault(group, []).append(r["class"] == s.identity.cls)
    result = {
        "model": args.model, "n": args.n, "steps": args.steps, "guidance": args.guidance, "seed": args.seed,
        "sampling_wall_s": round(wall, 1),
        "accuracy": {k: round(float(np.mean(v)), 4) for k, v in hits.items()},
        "count": {k: len(v) for k, v in hits.items()},
        **{key: {g: round(float(np.mean(v)), 3) for g, v in sorted(d.items())} for key, d in by.items()},
    }
    out = Path(args.out)
    write_text(str(out / "base.json"), json.dumps(result, indent=2) + "\n")
    # A labelled grid of the first 24 samples.
    cols, n = 6, min(24, len(images))
    grid = Image.new("RGB", (cols * 128, ((n + cols - 1) // cols) * 150), "white")
    d = ImageDraw.Draw(grid)
    for i in range(n):
        x, y = (i % cols) * 128, (i // cols) * 150
        grid.paste(images[i].resize((128, 128), Image.NEAREST), (x, y))
        cap = scenes[i].caption().replace("A ", "", 1)
        d.text((x + 2, y + 129), cap[:24], fill="black")
        d.text((x + 2, y + 139), cap[24:48], fill="black")
    import io

    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    write_bytes(str(out / "base_grid.png"), buf.getvalue(), content_type="image/png")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
