"""Procedural scenes with known truth: subjects, styles, places, times, and their captions.

Every image is drawn from a :class:`Scene`, and every caption is written from the same
scene, so each pixel has ground-truth attributes: the subject's class and identity (body
colour, pattern, pattern colour, accessory), the style (photo, sketch, watercolour, pixel
art, neon), the place (plain studio, grass, beach, snow, city with a tower) and the time of
day (day, night, sunset).

Scenes are drawn at twice the output size with Pillow and reduced with a box filter, so
edges are anti-aliased. Rendering is deterministic given the scene and its ``seed``.

What a scene is (its vocabulary, :class:`Identity`, :class:`Scene`, captions) is
``palp.toyworld.scene``; how its subject is drawn is ``palp.toyworld.shapes``. This module
draws the background, places the subject and applies the style.
"""

from __future__ import annotations

import random

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from palp.toyworld.scene import Scene
from palp.toyworld.shapes import CANVAS, HORIZON, SIZE, shade, subject_layer


def _sky(draw, time, rng):
    if time == "day":
        top, bottom = (90, 150, 225), (175, 210, 240)
    elif time == "night":
        top, bottom = (8, 10, 35), (25, 30, 70)
    else:
        top, bottom = (120, 60, 140), (250, 150, 60)
    for y in range(HORIZON):
        a = y / HORIZON
        draw.line([(0, y), (CANVAS, y)], fill=tuple(int(t + (b - t) * a) for t, b in zip(top, bottom)))
    if time == "day":
        x, y = rng.randint(14, 40), rng.randint(12, 26)
        draw.ellipse([x - 10, y - 10, x + 10, y + 10], fill=(255, 235, 120))
    elif time == "night":
        for _ in range(28):
            x, y = rng.randrange(CANVAS), rng.randrange(HORIZON - 6)
            r = rng.choice((1, 1, 2))
            draw.ellipse([x - r, y - r, x + r, y + r], fill=(255, 255, 230))
        x, y = rng.randint(90, 116), rng.randint(12, 26)
        draw.ellipse([x - 9, y - 9, x + 9, y + 9], fill=(245, 245, 215))
        draw.ellipse([x - 4, y - 12, x + 12, y + 6], fill=(12, 14, 45))
    else:
        x = rng.randint(20, 108)
        draw.pieslice([x - 16, HORIZON - 16, x + 16, HORIZON + 16], 180, 360, fill=(255, 110, 40))


def _ground_color(place):
    return {
        "grass": (60, 150, 55),
        "beach": (232, 208, 150),
        "snow": (238, 242, 250),
        "city": (105, 105, 112),
    }[place]


def _background(place, time, rng) -> Image.Image:
    if place == "plain":
        img = Image.new("RGB", (CANVAS, CANVAS), (222, 222, 218))
        d = ImageDraw.Draw(img)
        d.rectangle([0, HORIZON + 10, CANVAS, CANVAS], fill=(205, 205, 200))
        return img
    img = Image.new("RGB", (CANVAS, CANVAS))
    d = ImageDraw.Draw(img)
    _sky(d, time, rng)
    dim = {"day": 1.0, "night": 0.42, "sunset": 0.8}[time]
    ground = shade(_ground_color(place), dim)
    if time == "sunset":
        ground = (min(255, int(ground[0] * 1.15)), int(ground[1] * 0.9), int(ground[2] * 0.8))
    d.rectangle([0, HORIZON, CANVAS, CANVAS], fill=ground)
    if place == "grass":
        for _ in range(40):
            x, y = rng.randrange(CANVAS), rng.randint(HORIZON + 2, CANVAS)
            d.line([(x, y), (x + rng.randint(-2, 2), y - 4)], fill=shade(ground, 0.85), width=1)
    elif place == "beach":
        sea = shade((40, 120, 195), dim)
        d.rectangle([0, HORIZON, CANVAS, HORIZON + 12], fill=sea)
        for x in range(0, CANVAS, 12):
            d.arc([x, HORIZON + 9, x + 12, HORIZON + 15], 180, 360, fill=shade((235, 245, 255), dim))
    elif place == "snow":
        for _ in range(40):
            x, y = rng.randrange(CANVAS), rng.randrange(CANVAS)
            d.ellipse([x - 1, y - 1, x + 1, y + 1], fill=(250, 250, 255))
    elif place == "city":
        lit = time == "night"
        x = 0
        while x < CANVAS:
            w, h = rng.randint(12, 22), rng.randint(18, 42)
            body = shade((70, 72, 85), dim if not lit else 0.6)
            d.rectangle([x, HORIZON - h, x + w - 2, HORIZON], fill=body)
            for wy in range(HORIZON - h + 4, HORIZON - 4, 7):
                for wx in range(x + 3, x + w - 5, 5):
                    on = lit and rng.random() < 0.6
                    d.rectangle([wx, wy, wx + 2, wy + 3], fill=(250, 220, 90) if on else shade(body, 1.4))
            x += w
        tx = rng.choice((22, 104))
        tower = shade((60, 55, 60), dim if not lit else 0.9)
        d.polygon([(tx - 9, HORIZON), (tx, HORIZON - 62), (tx + 9, HORIZON)], fill=tower)
        d.line([(tx - 5, HORIZON - 24), (tx + 5, HORIZON - 24)], fill=shade(tower, 1.6), width=2)
        if lit:
            d.ellipse([tx - 2, HORIZON - 66, tx + 2, HORIZON - 62], fill=(255, 80, 80))
    return img


def _edges(img: Image.Image) -> np.ndarray:
    """Edge strength in [0, 1] of an RGB image (max over channels of the Sobel magnitude)."""
    a = np.asarray(img, dtype=np.float32) / 255.0
    gx = np.zeros_like(a)
    gy = np.zeros_like(a)
    gx[:, 1:-1] = a[:, 2:] - a[:, :-2]
    gy[1:-1] = a[2:] - a[:-2]
    return np.clip(np.sqrt(gx**2 + gy**2).max(-1) * 2.5, 0, 1)


def _stylize(flat: Image.Image, shaded: Image.Image, style: str, rng) -> Image.Image:
    if style == "photo":
        arr = np.asarray(shaded, dtype=np.float32)
        arr += np.random.default_rng(rng.randrange(2**31)).normal(0, 4, arr.shape)
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    if style == "sketch":
        e = _edges(flat)
        e = np.asarray(Image.fromarray((e * 255).astype(np.uint8)).filter(ImageFilter.MaxFilter(3)), dtype=np.float32) / 255
        paper = np.array([250, 249, 244], np.float32)
        ink = np.array([70, 70, 78], np.float32)
        arr = paper * (1 - e[..., None]) + ink * e[..., None]
        return Image.fromarray(arr.astype(np.uint8))
    if style == "watercolour":
        soft = flat.filter(ImageFilter.GaussianBlur(1.6))
        arr = np.asarray(soft, dtype=np.float32)
        arr = 0.7 * arr + 0.3 * 250
        g = np.random.default_rng(rng.randrange(2**31))
        blot = np.asarray(Image.fromarray((g.random((12, 12)) * 255).astype(np.uint8)).resize((CANVAS, CANVAS), Image.BICUBIC), dtype=np.float32)
        arr *= (0.93 + 0.14 * blot / 255.0)[..., None]
        e = _edges(soft)[..., None]
        arr = arr * (1 - 0.35 * e)
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    if style == "pixel art":
        small = flat.resize((32, 32), Image.BOX).quantize(colors=12, method=Image.Quantize.MEDIANCUT).convert("RGB")
        return small.resize((CANVAS, CANVAS), Image.NEAREST)
    if style == "neon":
        e = _edges(flat)
        col = np.asarray(flat, dtype=np.float32)
        mx = col.max(-1, keepdims=True).clip(1, None)
        bright = col / mx * 255  # saturate: full brightness, same hue
        line = Image.fromarray((bright * e[..., None]).astype(np.uint8))
        glow = np.asarray(line.filter(ImageFilter.GaussianBlur(3)), dtype=np.float32)
        arr = np.asarray(line, dtype=np.float32) * 1.2 + glow * 1.6 + 6
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    raise ValueError(style)


def render(scene: Scene, size: int = SIZE, *, subject=subject_layer) -> Image.Image:
    """The scene as an RGB image of ``size`` x ``size``; ``subject`` draws the subject's layer
    (``shapes.subject_layer``; the second world's is larger, its pattern coarser)."""
    rng = random.Random(scene.seed)
    bg = _background(scene.place, scene.time, random.Random(rng.randrange(2**31)))
    pose_seed = rng.randrange(2**31)  # both layers share the pose
    flat_layer, shadow = subject(scene.identity, random.Random(pose_seed), shaded=False)
    flat = bg.copy()
    flat.paste(flat_layer, (0, 0), flat_layer)
    if scene.style == "photo":
        shaded_layer, _ = subject(scene.identity, random.Random(pose_seed), shaded=True)
        shaded = bg.copy()
        sd = ImageDraw.Draw(shaded, "RGBA")
        sd.ellipse(shadow, fill=(0, 0, 0, 70))
        shaded.paste(shaded_layer, (0, 0), shaded_layer)
    else:
        shaded = flat
    out = _stylize(flat, shaded, scene.style, rng)
    return out.resize((size, size), Image.BOX)


def render_array(scene: Scene, size: int = SIZE, *, subject=subject_layer) -> np.ndarray:
    return np.asarray(render(scene, size, subject=subject), dtype=np.uint8)
