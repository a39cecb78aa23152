"""The judge's accuracy per attribute on fresh renders of its own world (v1 or v2,
:mod:`palp.toyworld.worlds`): the evidence, recorded by pretraining, that it reads what it is
asked to read."""

from __future__ import annotations

import random

from palp.toyworld.judge import accuracy_per_attribute, predict
from palp.toyworld.scene import Scene
from palp.toyworld.worlds import judge_world, renderer


def accuracy_scenes(world: str, n: int, seed: int, held_out: bool = False) -> list[Scene]:
    """The ``n`` scenes :func:`judge_accuracy` draws in ``world``: any subject in any style,
    place and time; with ``held_out``, only subjects pretraining never showed (v1: the (class,
    colour) pairs of the personal subjects; v2: the held-out composites)."""
    scenes = []
    if world == "v1":
        from palp.toyworld.world import HELD_OUT_PAIRS, random_identity, random_scene

        rng = random.Random(seed)
        while len(scenes) < n:
            identity = random_identity(rng, every_pair=True)
            if held_out and (identity.cls, identity.color) not in HELD_OUT_PAIRS:
                continue
            scenes.append(random_scene(rng, identity))
    elif world == "v2":
        from palp.toyworld.v2.world import is_held_out, random_judge_scene

        rng = random.Random(f"v2-accuracy-{seed}")
        while len(scenes) < n:
            scene = random_judge_scene(rng)
            if held_out and not is_held_out(scene.identity):
                continue
            scenes.append(scene)
    else:
        renderer(world)  # the error naming the worlds palp knows
    return scenes


def judge_accuracy(judge, n: int = 2000, seed: int = 12345, *, held_out: bool = False, vae=None,
                   world: str | None = None) -> dict:
    """Accuracy per attribute on :func:`accuracy_scenes` rendered in ``world`` (default: the
    judge's own, :func:`palp.toyworld.worlds.judge_world`), clean or (``vae``) through the VAE's
    round trip. Colours count only where the style shows them, the pattern colour only where
    there is a pattern (:func:`palp.toyworld.judge.accuracy_per_attribute`)."""
    world = world or judge_world(judge)
    scenes = accuracy_scenes(world, n, seed, held_out)
    render = renderer(world)
    images = [render(s) for s in scenes]
    if vae is not None:
        from palp.toyworld.ceiling import vae_round_trip

        images = vae_round_trip(vae, images)
    return accuracy_per_attribute(scenes, predict(judge, images))
