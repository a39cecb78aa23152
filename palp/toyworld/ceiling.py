"""What the judge can read of each (subject, target prompt) unit, before any training.

A unit's **ceiling** is the judge's identity (and class) on images a perfect model would
draw: clean renders of the subject, from its ground truth, in the prompt's style, place and
time; and the same renders passed through the toy VAE (encoded as training encodes, decoded as
sampling decodes), since every sample comes out of that decoder. Its **chance** level is what
a model that never saw the subject keeps (:func:`palp.toyworld.judge.identity_chance`).

A unit whose ceilings fall below :data:`THRESHOLDS` cannot show whether a method kept the
subject, so it is excluded by rule before anything trains: ``palp pipeline`` refuses an
experiment with such a unit (its error names each one), and the test suite checks every
committed experiment config.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

import numpy as np
import torch

from palp.toyworld.judge import identity_chance, identity_kept, predict, to_tensor
from palp.toyworld.scene import Identity, Scene, parse_caption
from palp.toyworld.worlds import judge_world, renderer, world_of

# Clean renders: identity and class; VAE round trips: identity.
THRESHOLDS = {"identity_clean": 0.95, "identity_vae": 0.90, "class_clean": 0.95}
RENDERS = 32  # per unit: poses and backgrounds drawn from the unit's own seed


@dataclass(frozen=True)
class UnitCeiling:
    subject: str
    prompt: str
    identity_clean: float
    identity_vae: float
    class_clean: float
    class_vae: float
    chance: float
    renders: int

    def failures(self) -> list[str]:
        """Each threshold this unit misses, as 'identity_clean 0.812 < 0.95'."""
        return [f"{k} {getattr(self, k):.3f} < {v}" for k, v in THRESHOLDS.items() if getattr(self, k) < v]


def unit_scenes(identity: Identity, prompt: str, n: int = RENDERS, seed: int = 0) -> list[Scene]:
    """``n`` scenes of ``identity`` in the style, place and time ``prompt`` names ('[V]' or a
    subject phrase in it), each pose and background from a seed derived from the identity and
    the scene (so a prompt with '[V]' and its clean form give the same renders)."""
    parsed = parse_caption(prompt.replace("[V]", "a subject"))
    style, place, time = parsed["style"] or "photo", parsed["place"], parsed["time"]
    rng = random.Random(f"{identity}-{style}-{place}-{time}-{seed}")  # the scene's, not the prompt's wording
    return [Scene(identity, style, place, time, seed=rng.randrange(2**31)) for _ in range(n)]


@torch.no_grad()
def vae_round_trip(vae, images: list) -> list[np.ndarray]:
    """Each (H, W, 3) uint8 image encoded to its latent posterior's mean, as training encodes
    the photos, and decoded to 8-bit RGB, as ``palp sample`` decodes."""
    out = []
    for i in range(0, len(images), 32):
        x = to_tensor(np.stack([np.asarray(im.convert("RGB") if hasattr(im, "convert") else im, np.uint8)
                                for im in images[i : i + 32]]))
        latents = vae.encode(x.to(vae.device, vae.dtype)).latent_dist.mean
        y = vae.decode(latents).sample.float()
        y = ((y * 0.5 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        out += list(y.permute(0, 2, 3, 1).cpu().numpy())
    return out


def load_vae(judge=None):
    """The toy world's VAE (the decoder every toy sample is drawn with): the one in ``judge``'s
    weights folder (its ``sd/vae``) when it has one, else the shipped model's. ValueError when
    the judge is another world's than the shipped model and has no VAE beside it (its pictures
    would go through the wrong decoder)."""
    from diffusers import AutoencoderKL

    from palp.toyworld import WEIGHTS, weights_dir

    root = getattr(judge, "root", None)
    if root is not None and (root / "sd" / "vae").is_dir():
        folder = root / "sd" / "vae"
    else:
        if judge is not None and judge_world(judge) != world_of(WEIGHTS):
            raise ValueError(f"the judge was trained in toy world {judge_world(judge)} but the shipped model in "
                             f"{world_of(WEIGHTS)}, and no VAE lies beside the judge ({root or 'a judge file alone'} has "
                             f"no sd/vae): keep the judge in its export folder (sd/, judge/, recipe.json)")
        folder = weights_dir("sd") / "vae"
    return AutoencoderKL.from_pretrained(str(folder)).eval()


def unit_ceiling(judge, vae, subject: str, truth: dict, prompt: str, *, n: int = RENDERS, seed: int = 0,
                 render=None) -> UnitCeiling:
    """The judge's identity and class on ``n`` clean renders of the unit and on their VAE round
    trips, against ``truth`` (:func:`palp.toyworld.judge.truth_identity`'s form). ``render``: a
    scene's (H, W, 3) image (default: the renderer of the judge's world,
    :func:`palp.toyworld.worlds.renderer`)."""
    if render is None:
        render = renderer(judge_world(judge))

    identity = Identity(truth["class"], truth["color"], truth["pattern"], truth["pattern_color"], truth["accessory"])
    scenes = unit_scenes(identity, prompt, n, seed)
    clean = [render(s) for s in scenes]
    style = scenes[0].style
    means = {}
    for name, images in (("clean", clean), ("vae", vae_round_trip(vae, clean))):
        readings = predict(judge, images)
        means[f"identity_{name}"] = float(np.mean([identity_kept(r, truth, style) for r in readings]))
        means[f"class_{name}"] = float(np.mean([r["class"] == truth["class"] for r in readings]))
    return UnitCeiling(subject, prompt, **{k: round(v, 4) for k, v in means.items()},
                       chance=round(identity_chance(style), 4), renders=n)


def experiment_units(params: dict, prompts: list[tuple[str, list[str]]] | None = None) -> list[tuple[str, dict, str]]:
    """(subject, truth, prompt) for every single-subject unit of an experiment's settings whose
    subject carries a ``truth``. ``prompts``: (text, the subjects it names, [] for every
    subject) of each prompt, a prompts file's included; default: the inline ``prompts``."""
    from palp.toyworld.judge import truth_identity

    prompts = prompts if prompts is not None else [(p, []) for p in params.get("prompts") or []]
    units = []
    for s in params.get("subjects") or []:
        if s.get("truth") is None:
            continue
        truth = truth_identity(s["truth"])
        units += [(s["name"], truth, text) for text, names in prompts if not names or names == [s["name"]]]
    return units


def check_units(units: list[tuple[str, dict, str]], *, judge=None, vae=None, n: int = RENDERS) -> list[UnitCeiling]:
    """Every unit's ceiling (the shipped judge unless given; the VAE of the judge's weights
    folder unless given, :func:`load_vae`)."""
    from palp.toyworld.judge import resolve_judge

    judge = judge if judge is not None else resolve_judge("toyworld")
    vae = vae if vae is not None else load_vae(judge)
    return [unit_ceiling(judge, vae, name, truth, prompt, n=n) for name, truth, prompt in units]


def accuracy_by_style(judge, vae, n: int = 3000, seed: int = 7) -> str:
    """Markdown: the judge's accuracy on each identity attribute in each style, on ``n`` fresh
    renders of random subjects (every class-colour pair) outside the plain studio, clean and
    through the VAE: the evidence for which attributes identity counts in which style. The
    scenes are drawn in the judge's world (:func:`palp.toyworld.worlds.renderer`)."""
    from collections import defaultdict

    from palp.toyworld.scene import STYLES
    from palp.toyworld.world import random_identity, random_scene

    rng = random.Random(seed)
    scenes = [s for s in (random_scene(rng, random_identity(rng, every_pair=True)) for _ in range(n)) if s.place != "plain"]
    render = renderer(judge_world(judge))
    clean = [render(s) for s in scenes]
    keys = ("class", "color", "pattern", "pattern_color", "accessory")
    lines = ["| style | images | " + " | ".join(f"{k}, clean / VAE" for k in keys) + " |", "|---" * (len(keys) + 2) + "|"]
    hits = {name: defaultdict(list) for name in ("clean", "vae")}
    for name, images in (("clean", clean), ("vae", vae_round_trip(vae, clean))):
        for s, r in zip(scenes, predict(judge, images)):
            truth = s.labels()
            for k in keys:
                if not (k == "pattern_color" and truth["pattern"] == "plain"):
                    hits[name][(s.style, k)].append(r[k] == truth[k])
    for style in STYLES:
        cells = [f"{np.mean(hits['clean'][(style, k)]):.3f} / {np.mean(hits['vae'][(style, k)]):.3f}" for k in keys]
        lines.append(f"| {style} | {len(hits['clean'][(style, 'class')])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def table(ceilings: list[UnitCeiling]) -> str:
    """Markdown: one row per unit, its ceilings, chance level and whether it is kept."""
    lines = ["| subject | prompt | identity, clean | identity, VAE | class, clean | class, VAE | chance | unit |",
             "|---|---|---|---|---|---|---|---|"]
    for c in ceilings:
        verdict = "kept" if not c.failures() else "excluded: " + "; ".join(c.failures())
        lines.append(f"| {c.subject} | {c.prompt} | {c.identity_clean:.3f} | {c.identity_vae:.3f} | {c.class_clean:.3f} "
                     f"| {c.class_vae:.3f} | {c.chance:.3f} | {verdict} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    import argparse
    import sys

    import yaml

    from palp.toyworld.judge import truth_identity
    from palp.toyworld.world import PERSONAL_SUBJECTS, TARGET_PROMPTS

    ap = argparse.ArgumentParser(prog="python -m palp.toyworld.ceiling",
                                 description="The judge's ceiling on each (subject, prompt) unit: clean renders and VAE "
                                             "round trips against the ground truth, beside the chance level.")
    ap.add_argument("--config", help="an experiment YAML whose subjects carry truth: (default: every personal subject "
                                     "x every target prompt of the toy world)")
    ap.add_argument("-n", type=int, default=RENDERS, help="renders per unit")
    ap.add_argument("--by-style", action="store_true",
                    help="instead: the judge's accuracy per identity attribute and style on 3000 fresh random scenes")
    args = ap.parse_args(argv)
    if args.by_style:
        from palp.toyworld.judge import resolve_judge

        judge = resolve_judge("toyworld")
        sys.stdout.write(accuracy_by_style(judge, load_vae(judge)))
        return 0
    if args.config:
        params = yaml.safe_load(open(args.config)) or {}
        from palp.toyworld.truth import read_truth_file

        for s in params.get("subjects") or []:
            if isinstance(s.get("truth"), str):
                s["truth"] = read_truth_file(s["truth"])
        units = experiment_units(params)
    else:
        units = [(s.name, truth_identity(asdict(s.identity)), p) for s in PERSONAL_SUBJECTS for p in TARGET_PROMPTS]
    ceilings = check_units(units, n=args.n)
    sys.stdout.write(table(ceilings))
    kept = sum(not c.failures() for c in ceilings)
    print(f"\n{kept} of {len(ceilings)} units clear every threshold "
          f"({', '.join(f'{k} >= {v}' for k, v in THRESHOLDS.items())})")
    return 0 if kept == len(ceilings) else 1


if __name__ == "__main__":
    raise SystemExit(main())
