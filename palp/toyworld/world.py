"""The toy world's distributions: pretraining scenes, personal subjects and target prompts.

The personal subjects are instances the pretraining never shows: their (class, body colour)
pairs are removed from the pretraining distribution altogether, so the base model knows
purple things and cats but has never drawn a purple cat.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

from palp.toyworld.render import render_array
from palp.toyworld.scene import ACCESSORIES, CLASSES, COLORS, PATTERNS, PLACES, STYLES, TIMES, Identity, Scene

# Attribute name -> its values, in label-index order.
ATTRIBUTES = {
    "style": STYLES,
    "place": PLACES,
    "time": TIMES,
    "class": CLASSES,
    "color": tuple(COLORS),
    "pattern": PATTERNS,
    "pattern_color": tuple(COLORS),
    "accessory": ACCESSORIES,
}


@dataclass(frozen=True)
class PersonalSubject:
    name: str
    identity: Identity


PERSONAL_SUBJECTS = (
    PersonalSubject("purple-cat", Identity("cat", "purple", "dotted", "green", "star")),
    PersonalSubject("orange-dog", Identity("dog", "orange", "striped", "blue", "hat")),
    PersonalSubject("pink-robot", Identity("robot", "pink", "patched", "yellow", "bow")),
    PersonalSubject("green-cup", Identity("cup", "green", "striped", "red", "star")),
    PersonalSubject("yellow-bird", Identity("bird", "yellow", "dotted", "purple", "hat")),
    PersonalSubject("blue-car", Identity("car", "blue", "patched", "orange", "bow")),
)
HELD_OUT_PAIRS = frozenset((s.identity.cls, s.identity.color) for s in PERSONAL_SUBJECTS)

# Complex target prompts: a style other than photo, a place and a time.
TARGET_PROMPTS = (
    "A sketch of [V] in the snow at night",
    "A watercolour of [V] on the beach at sunset",
    "A pixel art image of [V] in the city at night",
    "A neon drawing of [V] on the grass at sunset",
    "A watercolour of [V] in the city at night",
)


def random_identity(rng: random.Random, *, every_pair: bool = False) -> Identity:
    """A random subject; the pretraining's subjects (the default) are never a held-out
    (class, colour) pair. The judge, which must read the personal subjects too, sees every pair."""
    while True:
        cls, color = rng.choice(CLASSES), rng.choice(tuple(COLORS))
        if every_pair or (cls, color) not in HELD_OUT_PAIRS:
            break
    pattern = rng.choice(PATTERNS)
    pattern_color = rng.choice([c for c in COLORS if c != color])
    return Identity(cls, color, pattern, pattern_color, rng.choice(ACCESSORIES))


def random_scene(rng: random.Random, identity: Identity | None = None, *, every_pair: bool = False) -> Scene:
    place = rng.choice(PLACES)
    time = "day" if place == "plain" else rng.choice(TIMES)
    return Scene(
        identity or random_identity(rng, every_pair=every_pair),
        style=rng.choice(STYLES),
        place=place,
        time=time,
        seed=rng.randrange(2**31),
        caption_color=rng.random() < 0.8,
        caption_pattern=rng.random() < 0.7,
        caption_accessory=rng.random() < 0.7,
        caption_day=rng.random() < 0.5,
    )


def label_vector(scene: Scene) -> list[int]:
    labels = scene.labels()
    return [ATTRIBUTES[k].index(labels[k]) for k in ATTRIBUTES]


def render_dataset(n: int, seed: int, *, progress: bool = True):
    """``n`` random scenes: images (n, 64, 64, 3) uint8, labels (n, 8) int64, captions."""
    from tqdm import tqdm

    rng = random.Random(seed)
    images = np.empty((n, 64, 64, 3), np.uint8)
    labels = np.empty((n, len(ATTRIBUTES)), np.int64)
    captions = []
    for i in tqdm(range(n), desc=f"rendering {n} scenes", disable=not progress, mininterval=5):
        scene = random_scene(rng)
        images[i] = render_array(scene)
        labels[i] = label_vector(scene)
        captions.append(scene.caption())
    return images, labels, captions


def subject_training_scenes(subject: PersonalSubject, n: int = 4, seed: int = 0) -> list[Scene]:
    """The user's photos of a personal subject: photo style, plain background, varied pose."""
    rng = random.Random(f"{subject.name}-{seed}")
    return [Scene(subject.identity, "photo", "plain", "day", seed=rng.randrange(2**31)) for _ in range(n)]


def write_subjects(out_dir, n: int = 4, subjects=PERSONAL_SUBJECTS, *, scenes=None, render=None) -> list:
    """Render each personal subject's training photos to ``out_dir/NAME/NN.png``, atomically,
    with its ground truth in ``out_dir/NAME.json`` (beside the folder: a subject folder holds
    only images). ``scenes(subject, n)`` and ``render(scene)``: the world's (default: this one's,
    :func:`subject_training_scenes` and ``palp.toyworld.render.render_array``)."""
    scenes = scenes or subject_training_scenes
    render = render or render_array
    import json
    from dataclasses import asdict
    from pathlib import Path

    from PIL import Image

    from palp.core.storage import atomic_directory

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for subject in subjects:
        with atomic_directory(out_dir / subject.name, replace=True) as tmp:
            for i, scene in enumerate(scenes(subject, n)):
                Image.fromarray(render(scene)).save(tmp / f"{i:02d}.png")
        truth = {"name": subject.name, "identity": asdict(subject.identity), "class_word": subject.identity.cls}
        (out_dir / f"{subject.name}.json").write_text(json.dumps(truth, indent=2) + "\n")
        written.append(out_dir / subject.name)
    return written


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Render the personal toy-world subjects' training photos.")
    ap.add_argument("--out", default="examples/toyworld")
    ap.add_argument("-n", type=int, default=4, help="photos per subject")
    args = ap.parse_args()
    for path in write_subjects(args.out, args.n):
        print(path)
