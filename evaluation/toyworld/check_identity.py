"""Does TI+DB keep a personal subject's identity? The judge reads "A photo of [V]" samples.

    python evaluation/toyworld/check_identity.py --out /tmp/toy-identity [--config evaluation/toyworld/experiment.yaml]

For each personal subject in examples/toyworld/, runs ``palp train --method ti-db`` on its
photos with the toy model and the experiment's fine-tuning recipe (steps, batch, lr, LoRA
rank), samples "A photo of [V]", and compares the judge's reading of each sample with the
subject's ground truth (examples/toyworld/NAME.json): class, body colour, pattern, pattern
colour and accessory; and with the judge's own reading of the subject's photos, which is what
`palp score --judge` compares with. Also reads the photos passed through the toy VAE (encoded,
decoded): every sample comes out of that decoder, so this is about the most a sample can keep.
Writes identity.json and a grid per subject.
"""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from palp.cli import main as palp
from palp.core import safecsv
from palp.core.storage import write_bytes, write_text
from palp.core.subject_images import read_image
from palp.toyworld.ceiling import load_vae, vae_round_trip
from palp.toyworld.judge import IDENTITY_ATTRIBUTES, predict, reference_identity, resolve_judge

REPO = Path(__file__).resolve().parents[2]


PROMPT = "A photo of [V]"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--subjects", nargs="*", help="names under examples/toyworld (default: all)")
    ap.add_argument("--config", default=str(REPO / "evaluation" / "toyworld" / "experiment.yaml"),
                    help="the experiment whose fine-tuning recipe is checked (steps, batch, lr, rank)")
    ap.add_argument("--steps", type=int, help="default: the config's train_steps")
    ap.add_argument("--batch-size", type=int, help="default: the config's batch_size")
    ap.add_argument("--lr", type=float, help="default: the config's lr")
    ap.add_argument("--lora-rank", type=int, help="default: the config's lora_rank")
    ap.add_argument("--lora-targets", help="default: the config's lora_targets (attention if it names none)")
    ap.add_argument("--num-samples", type=int, default=8)
    ap.add_argument("--sample-steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=7.5, help="CFG scale of the samples")
    args = ap.parse_args(argv)
    config = yaml.safe_load(Path(args.config).read_text())
    for arg, key in (("steps", "train_steps"), ("batch_size", "batch_size"), ("lr", "lr"), ("lora_rank", "lora_rank")):
        if getattr(args, arg) is None:
            if key not in config:
                ap.error(f"{args.config} has no {key}: give --{arg.replace('_', '-')}")
            setattr(args, arg, config[key])
    args.lora_targets = args.lora_targets or config.get("lora_targets", "attention")

    root = REPO / "examples" / "toyworld"
    names = args.subjects or sorted(p.stem for p in root.glob("*.json"))
    judge = resolve_judge("toyworld")
    vae = load_vae(judge)
    out = Path(args.out)
    results, grids = {}, []
    for name in names:
        truth = json.loads((root / f"{name}.json").read_text())
        truth = {"class": truth["identity"]["cls"], **{k: truth["identity"][k] for k in IDENTITY_ATTRIBUTES}}
        run, samples = out / name / "run", out / name / "samples"
        t0 = time.perf_counter()
        palp(["train", "--images", str(root / name), "--class-word", truth["class"], "--prompt", PROMPT,
              "--method", "ti-db", "--pretrained-model", "toyworld", "--steps", str(args.steps),
              "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--lora-rank", str(args.lora_rank),
              "--lora-targets", args.lora_targets,
              "--save-steps", str(args.steps), "--output", str(run), "--resume", "--quiet"], raise_errors=True)
        train_s = time.perf_counter() - t0
        palp(["sample", "--model", str(run), "--output", str(samples), "--prompts", PROMPT, "--num-samples",
              str(args.num_samples), "--steps", str(args.sample_steps), "--guidance", str(args.guidance),
              "--quiet"], raise_errors=True)
        table = safecsv.read_csv((samples / "samples.csv").read_bytes())
        images = [read_image(str(samples / f)) for f in table["file"]]
        readings = predict(judge, images)
        kept = {k: float(np.mean([r[k] == truth[k] for r in readings])) for k in truth}
        all_kept = float(np.mean([all(r[k] == truth[k] for k in truth) for r in readings]))
        # What `palp score --judge` measures: agreement with the judge's own reading of the
        # subject's photos (the judge misreads some attributes of some subjects even there).
        photos = [read_image(str(f)) for f in sorted((root / name).glob("*.png"))]
        seen = reference_identity(predict(judge, photos))  # class and IDENTITY_ATTRIBUTES, as truth
        kept_seen = {k: float(np.mean([r[k] == seen[k] for r in readings])) for k in seen}
        through_vae = predict(judge, vae_round_trip(vae, photos))
        kept_vae = {k: float(np.mean([r[k] == truth[k] for r in through_vae])) for k in truth}
        results[name] = {"truth": truth, "kept": kept, "mean": float(np.mean(list(kept.values()))),
                         "all_attributes": all_kept, "judge_reads_photos_as": seen, "kept_vs_photos": kept_seen,
                         "mean_vs_photos": float(np.mean(list(kept_seen.values()))),
                         "photos_through_vae_kept": kept_vae, "photos_through_vae_mean": float(np.mean(list(kept_vae.values()))),
                         "train_s": round(train_s, 1)}
        print(name, json.dumps(results[name]["kept"]), f"mean {results[name]['mean']:.3f}",
              f"(vs the judge's reading of the photos: {results[name]['mean_vs_photos']:.3f})")
        row = Image.new("RGB", (64 * (1 + len(images)), 64), "white")
        row.paste(photos[0].convert("RGB"), (0, 0))
        for i, im in enumerate(images):
            row.paste(im.convert("RGB").resize((64, 64)), (64 * (i + 1), 0))
        grids.append(row)
    overall = {k: float(np.mean([r["kept"][k] for r in results.values()])) for k in results[names[0]]["kept"]}
    overall_seen = {k: float(np.mean([r["kept_vs_photos"][k] for r in results.values()])) for k in overall}
    overall_vae = {k: float(np.mean([r["photos_through_vae_kept"][k] for r in results.values()])) for k in overall}
    summary = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "lora_rank": args.lora_rank,
               "lora_targets": args.lora_targets,
               "guidance": args.guidance,
               "per_subject": results, "overall": overall, "overall_mean": float(np.mean(list(overall.values()))),
               "overall_vs_photos": overall_seen, "overall_mean_vs_photos": float(np.mean(list(overall_seen.values()))),
               "overall_photos_through_vae": overall_vae,
               "overall_mean_photos_through_vae": float(np.mean(list(overall_vae.values())))}
    write_text(str(out / "identity.json"), json.dumps(summary, indent=2) + "\n")
    grid = Image.new("RGB", (grids[0].width, 64 * len(grids)), "white")
    for i, g in enumerate(grids):
        grid.paste(g, (0, 64 * i))
    buf = io.BytesIO()
    grid.resize((grid.width * 2, grid.height * 2), Image.NEAREST).save(buf, format="PNG")
    write_bytes(str(out / "identity_grid.png"), buf.getvalue(), content_type="image/png")
    print(json.dumps({k: summary[k] for k in ("overall", "overall_mean", "overall_vs_photos", "overall_mean_vs_photos",
                                              "overall_photos_through_vae", "overall_mean_photos_through_vae")}, indent=2))


if __name__ == "__main__":
    main()
