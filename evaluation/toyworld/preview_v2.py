"""World v2's UNet while it trains: does a name already carry its instance into every style?

    python evaluation/toyworld/preview_v2.py --work WORK [--out WORK/preview] [--instances 4]

Reads the unet stage's newest checkpoint in ``WORK`` (its EMA weights, whatever step it is at)
and the VAE, samples "A <style> of <name> <place> <time>" for a few named instances in a few
of the world's (style, place, time) combinations, each also from its whole description (the
control: what a bound name should reach), and writes ``preview-<step>.png`` (a row per
instance and sample, a column per prompt) and ``preview-<step>.json``. Where the judge stage
has finished (``WORK/judge.pt``), each image is read by it: class, style and identity kept
against the instance's own composite, beside the chance level of identity (what a model that
ignores the name keeps) and the judge's ceiling on clean renders (its reading of the truth).
The pretraining itself is not touched (it may go on beside this, on other cores).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pretrain_models import build_tokenizer  # noqa: E402
from pretrain_v2 import build_text_encoder, build_unet  # noqa: E402

from palp.core.storage import write_bytes, write_text  # noqa: E402

FORMS = ("name", "describe")
COMBOS = (("photo", "plain", "day"), ("watercolour", "beach", "sunset"), ("sketch", "city", "night"),
          ("neon", "grass", "day"))


def load_pipeline(work: Path, weights: str = "ema"):
    """(StableDiffusionPipeline with the checkpoint's EMA UNet and text encoder, or with the
    weights the optimiser is at (``weights="trained"``), the step)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline

    from palp.models.tiny import SD_SCHEDULER_CONFIG

    ckpt = work / "unet.ckpt"
    if not ckpt.exists():
        raise SystemExit(f"{work} holds no unet checkpoint yet (unet.ckpt): the unet stage has not saved one")
    state = torch.load(ckpt, weights_only=True, map_location="cpu")  # tensors and numbers only: no code runs
    unet, te = build_unet(), build_text_encoder()
    unet.load_state_dict(state["ema_unet" if weights == "ema" else "unet"])
    te.load_state_dict(state["ema_te" if weights == "ema" else "te"])
    pipe = StableDiffusionPipeline(vae=AutoencoderKL.from_pretrained(work / "vae"), text_encoder=te, tokenizer=build_tokenizer(),
                                   unet=unet, scheduler=DDIMScheduler.from_config({**SD_SCHEDULER_CONFIG, "clip_sample": False,
                                                                                  "set_alpha_to_one": False}), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(torch.float32), int(state["step"])


def prompts_and_truths(instances: int, seed: int = 0):
    """[(instance name, its composite as the judge's attributes, [(combo, form, caption)...])...]:
    instances spread over the 300, each in :data:`COMBOS`, captioned by name as pretraining does
    (form ``name``) and, as the control, by its whole description (form ``describe``: what the
    model draws when the caption spells the identity out, the level a bound name should reach)."""
    from palp.toyworld.judge import truth_identity
    from palp.toyworld.scene import Scene
    from palp.toyworld.v2.world import NamedScene, named_instances

    every = named_instances()
    picked = [every[i * len(every) // instances] for i in range(instances)]
    rng = random.Random(seed)
    out = []
    for inst in picked:
        ident = inst.identity
        truth = truth_identity(dataclasses.asdict(ident))
        captions = [(combo, "name", NamedScene(Scene(ident, *combo, seed=rng.randrange(2**31)), name=inst.name,
                                               form="name").caption()) for combo in COMBOS]
        captions += [(combo, "describe", Scene(ident, *combo, seed=0, caption_color=True, caption_pattern=True,
                                               caption_accessory=True).caption()) for combo in COMBOS]
        out.append((inst.name, truth, ident, captions))
    return out


def grid(images: list[list], labels: list[str], headers: list[str]):
    from PIL import Image, ImageDraw

    size, left, top = 64, 150, 26
    sheet = Image.new("RGB", (left + len(headers) * size, top + len(images) * size), "white")
    draw = ImageDraw.Draw(sheet)
    for j, (style, place, time) in enumerate(headers):
        draw.text((left + j * size + 2, 2), style[:10], fill="black")
        draw.text((left + j * size + 2, 13), f"{place} {time}"[:10], fill="black")
    for i, (row, label) in enumerate(zip(images, labels)):
        draw.text((2, top + i * size + 24), label[:24], fill="black")
        for j, im in enumerate(row):
            sheet.paste(im.resize((size, size)), (left + j * size, top + i * size))
    return sheet


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", required=True, type=Path)
    ap.add_argument("--out", type=Path, default=None, help="folder for preview-<step>.png/.json (default: WORK/preview)")
    ap.add_argument("--instances", type=int, default=4)
    ap.add_argument("--samples", type=int, default=2, help="images per instance and prompt")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--weights", choices=("ema", "trained"), default="ema",
                    help="the checkpoint's EMA weights (what the export ships) or the optimiser's current ones "
                         "(early in training the EMA lags them); the files are named -trained for the latter")
    args = ap.parse_args(argv)
    from palp.toyworld.judge import Judge, identity_chance, identity_kept, predict
    from palp.toyworld.v2.render import render_array

    pipe, step = load_pipeline(args.work, args.weights)
    units = prompts_and_truths(args.instances)
    judge = None
    if (args.work / "judge.pt").exists():
        judge = Judge()
        judge.load_state_dict(torch.load(args.work / "judge.pt", weights_only=True, map_location="cpu"))
        judge.eval()
    rows, labels, records = [], [], []
    for name, truth, ident, captions in units:
        per_sample = {form: [[] for _ in range(args.samples)] for form in FORMS}
        for k, (combo, form, caption) in enumerate(captions):
            gen = torch.Generator().manual_seed(1000 + k % len(COMBOS))  # a name and its description: the same noise
            images = pipe([caption] * args.samples, num_inference_steps=args.steps, guidance_scale=args.guidance,
                          generator=gen, height=64, width=64).images
            for s, im in enumerate(images):
                per_sample[form][s].append(im)
            rec = {"instance": name, "form": form, "prompt": caption, "style": combo[0], "place": combo[1], "time": combo[2]}
            if judge is not None:
                from palp.toyworld.scene import Scene

                readings = predict(judge, images)
                clean = [render_array(Scene(ident, *combo, seed=7 + s)) for s in range(args.samples)]
                rec.update(identity=float(np.mean([identity_kept(r, truth, combo[0]) for r in readings])),
                           cls=float(np.mean([r["class"] == truth["class"] for r in readings])),
                           style_read=float(np.mean([r["style"] == combo[0] for r in readings])),
                           identity_ceiling=float(np.mean([identity_kept(r, truth, combo[0]) for r in predict(judge, clean)])),
                           identity_chance=identity_chance(combo[0]))
            records.append(rec)
        for form in FORMS:
            rows += per_sample[form]
            labels += [f"{name} ({truth['class']}) #{s}" if form == "name" else f"  described #{s}" for s in range(args.samples)]
    out = args.out or args.work / "preview"
    tag = "" if args.weights == "ema" else "-trained"
    sheet = grid(rows, labels, list(COMBOS))
    import io

    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    write_bytes(out / f"preview-{step:06d}{tag}.png", buf.getvalue(), content_type="image/png")
    summary = {"unet_step": step, "records": records}
    if judge is not None:
        keys = ("identity", "cls", "style_read", "identity_ceiling", "identity_chance")
        for form, key in (("name", "means"), ("describe", "means_described")):
            summary[key] = {k: round(float(np.mean([r[k] for r in records if r["form"] == form])), 3) for k in keys}
    write_text(out / f"preview-{step:06d}{tag}.json", json.dumps(summary, indent=2) + "\n")
    print(f"unet step {step}: {out / f'preview-{step:06d}{tag}.png'}")
    if judge is not None:
        m = summary["means"]
        d = summary["means_described"]
        print(f"judge on the samples named: identity kept {m['identity']:.2f} (chance {m['identity_chance']:.2f}, "
              f"ceiling on clean renders {m['identity_ceiling']:.2f}), class {m['cls']:.2f}, style {m['style_read']:.2f}; "
              f"described (the control): identity {d['identity']:.2f}, class {d['cls']:.2f}, style {d['style_read']:.2f}")


if __name__ == "__main__":
    main()
