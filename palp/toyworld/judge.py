"""The judge: reads a toy-world image's style, place, time, class and identity attributes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from palp.toyworld import TOYWORLD_NAME, weights_dir
from palp.toyworld.scene import VISIBLE_IDENTITY
from palp.toyworld.world import ATTRIBUTES

IDENTITY_ATTRIBUTES = ("color", "pattern", "pattern_color", "accessory")
# The identity attributes identity is measured on, in every style: the pattern (stripes, dots,
# patches: coarse shapes) and the accessory; the body colour only in styles that fill the body
# with it (a sketch is grey lines, a neon drawing glowing outlines on black). The pattern's
# colour is never counted: its strokes are a pixel or two wide, below what the toy VAE's
# 16x16 latents keep and the judge reads (0.38-0.76 by style on fresh renders, RESULTS.md).
JUDGED_IDENTITY = ("color", "pattern", "accessory")
COLOUR_STYLES = ("photo", "watercolour", "pixel art")


def shown_identity(style: str, pattern: str) -> list[str]:
    """The identity attributes an image in ``style`` shows (a sketch has no colours), less the
    pattern's colour where there is no pattern: what the judge's accuracy tables count."""
    return [k for k in VISIBLE_IDENTITY[style] if not (k == "pattern_color" and pattern == "plain")]


def judged_identity(style: str) -> list[str]:
    """The attributes identity is measured on in ``style`` (:data:`JUDGED_IDENTITY`)."""
    return [k for k in JUDGED_IDENTITY if k != "color" or style in COLOUR_STYLES]


def identity_chance(style: str) -> float:
    """Identity a uniform guess of each judged attribute keeps on average in ``style``: the
    level of a model that never saw the subject and draws its attributes at random."""
    return float(np.mean([1 / len(ATTRIBUTES[k]) for k in judged_identity(style)]))


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 images -> (N, 3, H, W) float in [-1, 1], as the toy models read them."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1)


class Judge(torch.nn.Module):
    """A small CNN with one head per ground-truth attribute."""

    def __init__(self):
        super().__init__()

        def block(cin, cout):
            return torch.nn.Sequential(
                torch.nn.Conv2d(cin, cout, 3, padding=1), torch.nn.BatchNorm2d(cout), torch.nn.ReLU(),
                torch.nn.Conv2d(cout, cout, 3, padding=1), torch.nn.BatchNorm2d(cout), torch.nn.ReLU(),
                torch.nn.MaxPool2d(2),
            )

        self.features = torch.nn.Sequential(block(3, 32), block(32, 64), block(64, 128), block(128, 128))
        self.heads = torch.nn.ModuleDict({k: torch.nn.Linear(128 * 16, len(v)) for k, v in ATTRIBUTES.items()})

    def forward(self, x):  # x: (B, 3, 64, 64) in [-1, 1]
        h = self.features(x)  # (B, 128, 4, 4)
        h = F.adaptive_avg_pool2d(h, 4).flatten(1)
        return {k: head(h) for k, head in self.heads.items()}


def load_judge(path: str | Path | None = None):
    """The judge from a judge.safetensors (default: the shipped one), with the weights folder it
    belongs to (``judge.root``: the export's layout, else None) and the world it was trained in
    (``judge.world``: its file's metadata, else that folder's recipe, else v1;
    :mod:`palp.toyworld.worlds`)."""
    from safetensors.torch import load_file

    from palp.toyworld.worlds import weights_root_of, world_of_judge_file

    path = Path(path) if path else weights_dir("judge") / "judge.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"no judge weights at {path}; run python evaluation/toyworld/pretrain.py all")
    judge = Judge()
    judge.load_state_dict(load_file(str(path)))
    judge.root = weights_root_of(path)
    judge.world = world_of_judge_file(path, judge.root)
    return judge.eval()


@torch.no_grad()
def predict(judge, images, batch_size: int = 256) -> list[dict]:
    """Per image, the judge's reading of every attribute: [{'style': 'sketch', ...}, ...]."""

    out = []
    for i in range(0, len(images), batch_size):
        arr = np.stack([np.asarray(im.convert("RGB") if hasattr(im, "convert") else im, dtype=np.uint8) for im in images[i : i + batch_size]])
        logits = judge(to_tensor(arr))
        idx = {k: v.argmax(1).tolist() for k, v in logits.items()}
        for j in range(len(arr)):
            out.append({k: ATTRIBUTES[k][idx[k][j]] for k in ATTRIBUTES})
    return out


def accuracy_per_attribute(scenes, preds: list[dict]) -> dict:
    """The share of scenes whose attribute the judge read right, per attribute; an identity
    attribute counts only where the scene's style shows it (colours where the style keeps
    them, pattern colour where there is a pattern)."""
    hits = {k: [] for k in ATTRIBUTES}
    for s, p in zip(scenes, preds):
        truth = s.labels()
        shown = shown_identity(s.style, truth["pattern"])
        for k in ATTRIBUTES:
            if k in IDENTITY_ATTRIBUTES and k not in shown:
                continue
            hits[k].append(p[k] == truth[k])
    return {k: round(float(np.mean(v)), 4) for k, v in hits.items()}


JUDGE_COLUMNS = {
    "style": "Judge: style",
    "place": "Judge: place",
    "time": "Judge: time",
    "class": "Judge: class",
    "identity": "Judge: identity",
}


def resolve_judge(spec: str):
    """``toyworld`` (the shipped judge) or a path to a judge.safetensors."""
    return load_judge(None if spec == TOYWORLD_NAME else spec)


def reference_identity(readings: list[dict]) -> dict:
    """The subject's class and identity as the judge reads them off its input photos (the
    majority over the photos). Only where no ground truth is given (:func:`truth_identity`)."""
    from collections import Counter

    keys = ("class", *IDENTITY_ATTRIBUTES)
    return {k: Counter(r[k] for r in readings).most_common(1)[0][0] for k in keys}


def truth_identity(truth: dict) -> dict:
    """A subject's ground truth as the judge's attribute names: ``{"class", "color", "pattern",
    "pattern_color", "accessory"}``. Takes that mapping, or a toy-world subject file's
    (``examples/toyworld/NAME.json``: its ``identity`` with ``cls``). ValueError naming what is
    wrong otherwise."""
    if not isinstance(truth, dict):
        raise ValueError(f"a subject's truth must be a mapping of its attributes, got {str(truth)[:80]!r}")
    given = truth.get("identity", truth)
    if not isinstance(given, dict):
        raise ValueError(f"a subject's truth 'identity' must be a mapping of its attributes, got {str(given)[:80]!r}")
    given = dict(given)
    if "cls" in given:
        given["class"] = given.pop("cls")
    given.pop("name", None)
    given.pop("class_word", None)
    keys = ("class", *IDENTITY_ATTRIBUTES)
    missing = [k for k in keys if k not in given]
    unknown = sorted(set(given) - set(keys))
    if missing or unknown:
        raise ValueError(f"a subject's truth needs exactly {', '.join(keys)}" + (f"; missing {', '.join(missing)}" if missing else "")
                         + (f"; unknown {', '.join(unknown)}" if unknown else ""))
    for k in keys:
        if not isinstance(given[k], str) or given[k] not in ATTRIBUTES[k]:
            raise ValueError(f"truth {k} {str(given[k])[:40]!r} is not one of {', '.join(ATTRIBUTES[k])}")
    return {k: given[k] for k in keys}


def identity_kept(reading: dict, identity: dict, style: str) -> float:
    """The fraction of the attributes judged in ``style`` that ``reading`` gets right."""
    return float(np.mean([reading[k] == identity[k] for k in judged_identity(style)]))


def judge_row(reading: dict, expected_scene: dict, identity: dict) -> dict:
    """Per-element correctness of one generated image, as :data:`JUDGE_COLUMNS`.

    ``expected_scene``: style/place/time the prompt asks for; ``identity``: the subject's class
    and identity attributes (its ground truth). Identity is the fraction of the attributes
    judged in the prompted style (:func:`judged_identity`) that the image keeps.
    """
    style = expected_scene["style"] or "photo"
    row = {JUDGE_COLUMNS[k]: float(reading[k] == expected_scene[k]) for k in ("place", "time")}
    row[JUDGE_COLUMNS["style"]] = float(reading["style"] == style)
    row[JUDGE_COLUMNS["class"]] = float(reading["class"] == identity["class"])
    row[JUDGE_COLUMNS["identity"]] = identity_kept(reading, identity, style)
    return row
