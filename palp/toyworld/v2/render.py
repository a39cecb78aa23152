"""World v2's renderer: v1's scenes (backgrounds, classes, styles: ``palp.toyworld.render``)
with the subject drawn larger and its identity coarse enough to survive every style and the
VAE's 4x down-sampling.

What changes from v1, and why (the toy VAE keeps 16x16 latents of a 64x64 image, so one latent
pixel is 4x4 image pixels; a feature the judge must read in every style is at least 2 latent
pixels, 8 image pixels, across):

- **Subject size**: scale 1.4-1.6 (v1: 1.0-1.25), centred a little higher: a cat's body is
  about 25 image pixels wide (v1: 17-21), so a pattern shows several of its features.
- **Stripes**: diagonal bands 9-10 image pixels wide along a row (8-9 across the band), one
  every 18-21 pixels (v1: 3 px wide, every 7 px).
- **Dots**: discs 8.4-9.6 image pixels across on a staggered grid 13-15 pixels apart, four
  to six on a torso (v1: 3.5 px discs 6 px apart).
- **Patches**: two irregular seven-cornered blobs 6.6-9.6 image pixels in radius (v1: five
  3-5 px blobs), one high on the torso's left half, one low on its right: up to twice a dot's
  radius, angular, and two, not a grid, so patches and dots differ in every style.
- **Where**: the pattern covers the torso (each class's first body shape) only; the head,
  limbs, tail, roof, handle and cabin keep the body colour, so body and pattern colour are
  never ambiguous (stripes cover half of the torso).
- **Accessories**: v1's hat, star and bow, drawn at the subject's scale: 14-16 image pixels
  across.

Everything else (backgrounds, places, times, the five styles, the classes' shapes) is v1's
code, called unchanged, so a v1 scene renders bit-identically whether or not this module is
imported. Rendering is deterministic given the scene and its seed, as in v1.
"""

from __future__ import annotations

import math
import random

import numpy as np
from PIL import Image, ImageDraw

from palp.toyworld import render as v1_render
from palp.toyworld.scene import COLORS, Identity, Scene
from palp.toyworld.shapes import CANVAS, SIZE, compose_subject, draw_shape

# Drawing-canvas units (the canvas is 2x the image): see the module docstring for image pixels.
SCALE = (1.4, 1.6)
CENTRE_Y = 81
STRIPE_WIDTH = 13.0  # x the subject's scale: 18-21 canvas px across a row, 9-10 image px
STRIPE_PERIOD = 26.0
DOT_RADIUS = 6.0  # discs 12 x scale across: 17-19 canvas px, 8.4-9.6 image px
DOT_SPACING = 19.0  # 27-30 canvas px: four to six dots on a torso
PATCH_RADIUS = (9.5, 12.0)  # x scale: 13-19 canvas px, a 6.6-9.6 image px radius (dots: 4.2-4.8)
PATCHES = 2


def subject_layer(identity: Identity, rng: random.Random, shaded: bool):
    """RGBA layer with the subject (v2 size and pattern), its details and accessory; and its
    shadow box. The draws from ``rng`` come in a fixed order (pose, then the pattern)."""
    k = rng.uniform(*SCALE)
    cx = CANVAS / 2 + rng.uniform(-5, 5)
    cy = CENTRE_Y + rng.uniform(-2, 2)
    flip = rng.random() < 0.5
    return compose_subject(identity, rng, shaded, cx=cx, cy=cy, k=k, flip=flip, paint_pattern=paint_torso)


def paint_torso(base: Image.Image, identity: Identity, rng: random.Random, body, cx, cy, k) -> None:
    """The pattern on the torso (each class's first body shape) only: the head, limbs, tail,
    roof, handle or cabin keep the body colour, so the body colour is never ambiguous with the
    pattern's (stripes cover half of what they cover)."""
    patterned = base.copy()
    draw_pattern(ImageDraw.Draw(patterned), identity, rng, cx, cy, k)
    torso = Image.new("L", (CANVAS, CANVAS), 0)
    draw_shape(ImageDraw.Draw(torso), body[0], 255)
    base.paste(patterned, (0, 0), torso)


def draw_pattern(pd: ImageDraw.ImageDraw, identity: Identity, rng: random.Random, cx, cy, k) -> None:
    """Coarse stripes, dots or patches in the pattern colour over the body-colour canvas."""
    pc = COLORS[identity.pattern_color]
    if identity.pattern == "striped":
        period, width = STRIPE_PERIOD * k, STRIPE_WIDTH * k
        off = rng.uniform(0, period)
        x = -CANVAS + off
        while x < CANVAS:
            # A band from the top edge to the bottom edge, leaning right: a parallelogram whose
            # horizontal width is ``width`` (its width across the band is about 0.9 of that).
            pd.polygon([(x, 0), (x + width, 0), (x + width + CANVAS / 2, CANVAS), (x + CANVAS / 2, CANVAS)], fill=pc)
            x += period
    elif identity.pattern == "dotted":
        spacing, r = DOT_SPACING * k, DOT_RADIUS * k
        ox, oy = rng.uniform(0, spacing), rng.uniform(0, spacing)
        row = 0
        y = oy - spacing
        while y < CANVAS + spacing:
            x = ox - spacing + (spacing / 2 if row % 2 else 0)
            while x < CANVAS + spacing:
                pd.ellipse([x - r, y - r, x + r, y + r], fill=pc)
                x += spacing
            y += spacing * 0.87
            row += 1
    else:  # patched: two big blobs, one high on the torso's left half, one low on its right
        for i in range(PATCHES):
            x = cx + (2 * i - 1) * 10 * k + rng.uniform(-3, 3) * k
            y = cy + (8 * i + rng.uniform(-3, 3)) * k
            r = rng.uniform(*PATCH_RADIUS) * k
            # An irregular blob (seven corners at uneven radii), not a disc: a patch's outline
            # differs from a dot's in the sketch and neon styles too.
            turn = rng.uniform(0, 2 * math.pi)
            pd.polygon([(x + r * rng.uniform(0.65, 1.15) * math.cos(turn + j * 2 * math.pi / 7),
                         y + 0.85 * r * rng.uniform(0.65, 1.15) * math.sin(turn + j * 2 * math.pi / 7)) for j in range(7)],
                       fill=pc)


def render(scene: Scene, size: int = SIZE) -> Image.Image:
    """The scene as an RGB image of ``size`` x ``size``, with the v2 subject (v1's background
    and style code, v1's order of random draws)."""
    return v1_render.render(scene, size, subject=subject_layer)


def render_array(scene: Scene, size: int = SIZE) -> np.ndarray:
    return v1_render.render_array(scene, size, subject=subject_layer)
