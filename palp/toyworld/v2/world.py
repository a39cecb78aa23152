"""World v2's distributions: named instances, held-out composites, pretraining scenes and the
personal subjects.

**Composites.** An identity is a composite of class (7), body colour (8), pattern (4), pattern
colour (7: any colour but the body's) and accessory (4). A plain body shows no pattern colour,
so composites are taken in :func:`canonical` form (a plain body's pattern colour is the first
colour after its body colour): 7 x 8 x (1 + 3 x 7) x 4 = 4,928 distinct composites
(:func:`all_composites`).

**Held out by rule.** :func:`is_held_out` says whether a composite may ever appear in
pretraining: it is held out when it is one of v1's six personal subjects, or when the SHA-256 of
its canonical key falls in the held-out bucket (one in :data:`HELD_OUT_BUCKETS`, about a quarter
of all composites). Pretraining draws only from the rest: no held-out composite is ever named,
described or drawn in the pretraining set, whoever picks it later and however (a subject nobody
has seen yet is held out or not by the same rule). :func:`held_out_composites` draws evaluation
subjects from the held-out ones, seeded.

**Named instances.** :data:`NAMES` (300 invented words) are bound one-to-one to
:data:`INSTANCE_IDENTITIES` (300 composites that are not held out, drawn seeded, balanced over
the classes, every one patterned and with an accessory). :func:`make_names` is the rule that
made NAMES: two or three syllables of 5-9 letters, CLIP's BPE splits each into 2-3 pieces (a
rare word, as real names are), no piece is a word of the world's captions (no "cat", "red",
"hat" inside a name), the names are unique and at least two edits apart.

**Pretraining set.** :func:`pretraining_plan` lists its scenes: every named instance in every
(style, place, time) combination of the world (5 styles x 13 place-times = 65), ``passes``
times, each captioned with its name ("A watercolour of suzuk on the beach at sunset", 60%),
its name and class ("... of suzuk the cat ...", 25%) or v1's descriptive caption without the
name (15%); and one in four scenes a random non-held-out composite with v1's descriptive
caption (so the words for colours, patterns and accessories stay bound to what they draw).

**Personal subjects** are held-out composites, photographed as users do
(:func:`subject_training_scenes`: photo style, plain studio, day, a few poses): v1's six
(:data:`PERSONAL_SUBJECTS`, held out by the rule) and any number more
(:func:`held_out_subjects`).
"""

from __future__ import annotations

import hashlib
import itertools
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from palp.toyworld.scene import (ACCESSORIES, ACCESSORY_PHRASES, CLASSES, COLORS, PATTERN_NOUNS, PATTERNS,
                                 PLACE_PHRASES, PLACES, STYLE_PHRASES, STYLES, TIME_PHRASES, TIMES, Identity, Scene,
                                 compose_caption)
from palp.toyworld.world import ATTRIBUTES, PERSONAL_SUBJECTS, PersonalSubject

WORLD = "v2"
HELD_OUT_BUCKETS = 4  # one composite in four is held out
HELD_OUT_SALT = "palp-toyworld-v2-held-out"
N_INSTANCES = 300
INSTANCE_SEED = 2
NAME_SEED = 7
# Caption forms of a named instance's scene, with their shares.
NAME_FORMS = (("name", 0.60), ("name_class", 0.25), ("describe", 0.15))
DESCRIBED_SHARE = 0.25  # of the pretraining scenes: random (not held-out) composites, described

# (place, time) of the world: the plain studio only by day.
PLACE_TIMES = tuple(("plain", "day") if p == "plain" else (p, t) for p in PLACES for t in TIMES
                    if p != "plain" or t == "day")
COMBOS = tuple((s, p, t) for s in STYLES for p, t in PLACE_TIMES)  # 65


# ----------------------------------------------------------------------------- composites


def canonical(identity: Identity) -> Identity:
    """The composite as drawn: a plain body's pattern colour is fixed (it shows nowhere)."""
    if identity.pattern != "plain":
        return identity
    colors = tuple(COLORS)
    pc = colors[(colors.index(identity.color) + 1) % len(colors)]
    return Identity(identity.cls, identity.color, "plain", pc, identity.accessory)


def composite_key(identity: Identity) -> str:
    """'cat/purple/dotted/green/star' (of the canonical form)."""
    c = canonical(identity)
    return "/".join((c.cls, c.color, c.pattern, c.pattern_color, c.accessory))


def all_composites() -> list[Identity]:
    """Every distinct composite (4,928), in a fixed order."""
    out = []
    for cls, color, pattern, accessory in itertools.product(CLASSES, COLORS, PATTERNS, ACCESSORIES):
        pcs = [c for c in COLORS if c != color] if pattern != "plain" else [None]
        for pc in pcs:
            out.append(canonical(Identity(cls, color, pattern, pc or "yellow", accessory)) if pc is None
                       else Identity(cls, color, pattern, pc, accessory))
    return out


_PERSONAL_KEYS = frozenset(composite_key(s.identity) for s in PERSONAL_SUBJECTS)


def is_held_out(identity: Identity) -> bool:
    """Whether pretraining must never show this composite: v1's personal subjects, and every
    composite whose key hashes into the held-out bucket (the rule in the module docstring)."""
    key = composite_key(identity)
    if key in _PERSONAL_KEYS:
        return True
    digest = hashlib.sha256(f"{HELD_OUT_SALT}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % HELD_OUT_BUCKETS == 0


def rich(identity: Identity) -> bool:
    """A pattern and an accessory: an identity that every style shows something of."""
    return identity.pattern != "plain" and identity.accessory != "none"


def held_out_composites(n: int | None = None, seed: int = 0, *, only_rich: bool = True) -> list[Identity]:
    """Held-out composites (never in pretraining), shuffled by ``seed``; ``n`` of them (all when
    None). ``only_rich``: patterned and with an accessory, as evaluation subjects should be."""
    pool = [c for c in all_composites() if is_held_out(c) and (rich(c) or not only_rich)]
    random.Random(f"held-out-{seed}").shuffle(pool)
    return pool if n is None else pool[:n]


# ----------------------------------------------------------------------------- names

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "kr", "tr",
           "pl", "sk", "sn", "st", "sp", "fl", "gl", "zh", "j", "y", "w")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "i", "o", "u", "ai", "ou", "ee", "oo")
_CODAS = ("", "", "", "n", "r", "l", "s", "k", "x", "m", "v", "nd", "rk")


def caption_words() -> frozenset[str]:
    """Every word the world's captions use besides names (styles, places, times, classes,
    colours, patterns, accessories and the words around them)."""
    texts = [*STYLE_PHRASES.values(), *PLACE_PHRASES.values(), *TIME_PHRASES.values(), *CLASSES, *COLORS,
             *PATTERNS, *PATTERN_NOUNS.values(), *ACCESSORY_PHRASES.values(), *ACCESSORIES, *STYLES,
             "a an the with and its head during day plain studio"]
    return frozenset(w for t in texts for w in t.lower().split())


def bpe_pieces(word: str) -> list[str]:
    """How CLIP's BPE (the tokenizer of SD's text encoder) splits ``word`` (the last piece ends
    with '</w>')."""
    from palp.core.clip_bpe import clip_bpe

    return list(clip_bpe().word(word))


def _edit_distance(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def name_ok(name: str, taken=()) -> bool:
    """The rule every name follows (see the module docstring)."""
    words = caption_words()
    if not 5 <= len(name) <= 9 or name in words:
        return False
    pieces = bpe_pieces(name)
    if not 2 <= len(pieces) <= 3:
        return False
    if any(p.replace("</w>", "") in words for p in pieces):
        return False
    return all(abs(len(name) - len(t)) >= 2 or _edit_distance(name, t) >= 2 for t in taken)


def make_names(n: int = N_INSTANCES, seed: int = NAME_SEED) -> tuple[str, ...]:
    """``n`` names by the rule, seeded: what :data:`NAMES` holds."""
    rng = random.Random(f"names-{seed}")
    names: list[str] = []
    while len(names) < n:
        syllables = rng.choice((2, 2, 3))
        name = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + (rng.choice(_CODAS) if i == syllables - 1 or rng.random() < 0.3 else "")
                       for i in range(syllables))
        if name not in names and name_ok(name, names):
            names.append(name)
    return tuple(names)


# make_names(), written out one a line in names.txt (a test checks the rule still gives these).
NAMES = tuple((Path(__file__).parent / "names.txt").read_text().split())


def make_instance_identities(n: int = N_INSTANCES, seed: int = INSTANCE_SEED) -> tuple[Identity, ...]:
    """``n`` composites that are not held out, rich, distinct, seeded, the classes taken in turn."""
    rng = random.Random(f"instances-{seed}")
    pools = {cls: [c for c in all_composites() if c.cls == cls and rich(c) and not is_held_out(c)] for cls in CLASSES}
    for pool in pools.values():
        rng.shuffle(pool)
    out = []
    for i in range(n):
        out.append(pools[CLASSES[i % len(CLASSES)]].pop())
    rng.shuffle(out)
    return tuple(out)


INSTANCE_IDENTITIES = make_instance_identities()


@dataclass(frozen=True)
class NamedInstance:
    index: int
    name: str
    identity: Identity


def named_instances() -> tuple[NamedInstance, ...]:
    return tuple(NamedInstance(i, n, c) for i, (n, c) in enumerate(zip(NAMES, INSTANCE_IDENTITIES)))


# ----------------------------------------------------------------------------- scenes


@dataclass(frozen=True)
class NamedScene:
    """A v1 :class:`Scene` and how its caption names the subject: ``form`` 'name' ("A photo of
    suzuk"), 'name_class' ("A photo of suzuk the cat") or 'describe' (the scene's own v1
    caption); ``instance`` is the named instance's index, or -1 for a composite that has no name."""

    scene: Scene
    name: str | None = None
    form: str = "describe"
    instance: int = -1

    def caption(self) -> str:
        if self.form == "describe":
            return self.scene.caption()
        subject = self.name if self.form == "name" else f"{self.name} the {self.scene.identity.cls}"
        s = self.scene
        return compose_caption(s.style, subject, s.place, s.time, say_day=s.caption_day)

    def labels(self) -> dict:
        return self.scene.labels()


def _scene(identity: Identity, combo, rng: random.Random) -> Scene:
    style, place, time = combo
    return Scene(identity, style, place, time, seed=rng.randrange(2**31),
                 caption_color=rng.random() < 0.8, caption_pattern=rng.random() < 0.7,
                 caption_accessory=rng.random() < 0.7, caption_day=rng.random() < 0.5)


def _form(rng: random.Random) -> str:
    u, acc = rng.random(), 0.0
    for form, share in NAME_FORMS:
        acc += share
        if u < acc:
            return form
    return NAME_FORMS[-1][0]


def random_allowed_identity(rng: random.Random) -> Identity:
    """A uniformly random composite that is not held out (what unnamed pretraining scenes show)."""
    while True:
        cls, color, pattern, accessory = (rng.choice(CLASSES), rng.choice(tuple(COLORS)), rng.choice(PATTERNS),
                                          rng.choice(ACCESSORIES))
        pc = rng.choice([c for c in COLORS if c != color])
        identity = canonical(Identity(cls, color, pattern, pc, accessory))
        if not is_held_out(identity):
            return identity


def pretraining_plan(n: int, seed: int = 0, passes: int | None = None) -> list[NamedScene]:
    """The pretraining set's scenes, in order: the first ``n`` of the full plan. The full plan:
    ``passes`` rounds of named scenes, in each of which every named instance appears once in
    every (style, place, time) combination (default: as many rounds as ``n`` holds beside the
    described share), and :data:`DESCRIBED_SHARE` of described scenes of random non-held-out
    composites, all shuffled together. Every instance is in every combination when ``n`` is
    :func:`plan_size` (``passes``)."""
    instances = named_instances()
    if passes is None:
        passes = max(1, round(n * (1 - DESCRIBED_SHARE) / (len(instances) * len(COMBOS))))
    rng = random.Random(f"plan-{seed}")
    named = [(inst, combo) for _ in range(passes) for inst in instances for combo in COMBOS]
    n_described = round(len(named) * DESCRIBED_SHARE / (1 - DESCRIBED_SHARE))
    order = [None] * n_described + named
    rng.shuffle(order)
    out: list[NamedScene] = []
    for item in order[:n]:
        if item is None:
            identity = random_allowed_identity(rng)
            out.append(NamedScene(_scene(identity, rng.choice(COMBOS), rng)))
        else:
            inst, combo = item
            out.append(NamedScene(_scene(inst.identity, combo, rng), inst.name, _form(rng), inst.index))
    return out


def plan_size(passes: int) -> int:
    """The size of a full plan with ``passes`` rounds of named scenes and its described share."""
    named = passes * N_INSTANCES * len(COMBOS)
    return named + round(named * DESCRIBED_SHARE / (1 - DESCRIBED_SHARE))


def label_vector(scene: Scene) -> list[int]:
    labels = scene.labels()
    return [ATTRIBUTES[k].index(labels[k]) for k in ATTRIBUTES]


def render_dataset(n: int, seed: int = 0, *, progress: bool = True, workers: int = 1):
    """The first ``n`` scenes of the pretraining plan: images (n, 64, 64, 3) uint8, labels
    (n, 8) int64 (v1's attributes), the named instance of each (-1 for none), captions.
    ``workers`` > 1 renders in that many processes: the same arrays, in the same order."""
    from tqdm import tqdm

    plan = pretraining_plan(n, seed)
    images = np.empty((len(plan), 64, 64, 3), np.uint8)
    labels = np.empty((len(plan), len(ATTRIBUTES)), np.int64)
    instance = np.array([ns.instance for ns in plan], np.int16)
    captions = [ns.caption() for ns in plan]
    chunk = 500
    parts = [plan[i : i + chunk] for i in range(0, len(plan), chunk)]
    bar = tqdm(total=len(plan), desc=f"rendering {len(plan)} v2 scenes", disable=not progress, mininterval=10)
    with process_pool(workers) as pool:
        for k, (ims, labs) in enumerate((pool.imap if pool else map)(_render_scenes, [[ns.scene for ns in p] for p in parts])):
            images[k * chunk : k * chunk + len(ims)], labels[k * chunk : k * chunk + len(ims)] = ims, labs
            bar.update(len(ims))
    bar.close()
    return images, labels, instance, captions


def _render_scenes(scenes: list[Scene]) -> tuple[np.ndarray, np.ndarray]:
    """(images, label vectors) of ``scenes``, in order (a worker's share of ``render_dataset``)."""
    from palp.toyworld.v2.render import render_array

    return (np.stack([render_array(s) for s in scenes]).astype(np.uint8),
            np.array([label_vector(s) for s in scenes], np.int64).reshape(len(scenes), len(ATTRIBUTES)))


def process_pool(workers: int):
    """A process pool of ``workers`` (fork where the platform has it), or a null context for 1
    (the rendering processes of ``render_dataset`` and of the pretraining's judge batches)."""
    import contextlib
    import multiprocessing

    if workers <= 1:
        return contextlib.nullcontext()
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn").Pool(workers)


# ----------------------------------------------------------------------------- personal subjects and the judge


def subject_name(identity: Identity) -> str:
    """'heldout-purple-cat-3f2a' (a readable, stable name for a held-out composite)."""
    return f"heldout-{identity.color}-{identity.cls}-{hashlib.sha256(composite_key(identity).encode()).hexdigest()[:4]}"


def held_out_subjects(n: int, seed: int = 0) -> list[PersonalSubject]:
    """``n`` evaluation subjects drawn from the held-out composites (never in pretraining),
    v1's six personal subjects left out (they are the development set)."""
    pool = [c for c in held_out_composites(None, seed) if composite_key(c) not in _PERSONAL_KEYS]
    return [PersonalSubject(subject_name(c), c) for c in pool[:n]]


def subject_training_scenes(subject: PersonalSubject, n: int = 4, seed: int = 0) -> list[Scene]:
    """The user's photos of a personal subject: photo style, plain studio, day, varied pose
    (render them with ``palp.toyworld.v2.render``)."""
    rng = random.Random(f"v2-{subject.name}-{seed}")
    return [Scene(subject.identity, "photo", "plain", "day", seed=rng.randrange(2**31)) for _ in range(n)]


def random_judge_scene(rng: random.Random) -> Scene:
    """A scene for the judge: any composite, held-out ones included (the judge must read every
    subject), any style, place and time."""
    from palp.toyworld.world import random_scene

    return random_scene(rng, every_pair=True)


def write_subjects(out_dir, n: int = 4, subjects=PERSONAL_SUBJECTS) -> list:
    """v1's ``write_subjects`` with v2's photos (:func:`subject_training_scenes`, v2's renderer):
    ``out_dir/NAME/NN.png`` and the ground truth ``out_dir/NAME.json``."""
    from palp.toyworld import world as v1
    from palp.toyworld.v2.render import render_array

    return v1.write_subjects(out_dir, n, subjects, scenes=subject_training_scenes, render=render_array)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Render world v2's personal subjects' photos: v1's six (the development "
                                             "set) and --held-out more, drawn from the held-out composites.")
    ap.add_argument("--out", required=True)
    ap.add_argument("-n", type=int, default=4, help="photos per subject")
    ap.add_argument("--held-out", type=int, default=0, help="held-out subjects besides v1's six")
    args = ap.parse_args()
    for path in write_subjects(args.out, args.n, (*PERSONAL_SUBJECTS, *held_out_subjects(args.held_out))):
        print(path)
