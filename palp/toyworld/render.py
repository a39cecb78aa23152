"""Procedural scenes with known truth: subjects, styles, places, times, and their captions.

Every image is drawn from a :class:`Scene`, and every caption is written from the same
scene, so each pixel has ground-truth attributes: the subject's class and identity (body
colour, pattern, pattern colour, accessory), the style (photo, sketch, watercolour, pixel
art, neon), the place (plain studio, grass, beach, snow, city with a tower) and the time of
day (day, night, sunset).

Scenes are drawn at twice the output size with Pillow and reduced with a box filter, so
edges are anti-aliased. Rendering is deterministic given the scene and its ``seed``.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SIZE = 64
_S = 2 * SIZE  # drawing canvas
HORIZON = int(_S * 0.62)

CLASSES = ("cat", "dog", "bird", "car", "house", "cup", "robot")
COLORS = {
    "red": (215, 40, 40),
    "orange": (245, 135, 25),
    "yellow": (240, 210, 30),
    "green": (50, 170, 60),
    "blue": (40, 90, 220),
    "purple": (140, 60, 190),
    "pink": (245, 130, 190),
    "brown": (130, 80, 40),
}
PATTERNS = ("plain", "striped", "dotted", "patched")
ACCESSORIES = ("none", "hat", "star", "bow")
STYLES = ("photo", "sketch", "watercolour", "pixel art", "neon")
PLACES = ("plain", "grass", "beach", "snow", "city")
TIMES = ("day", "night", "sunset")

STYLE_PHRASES = {
    "photo": "A photo of",
    "sketch": "A sketch of",
    "watercolour": "A watercolour of",
    "pixel art": "A pixel art image of",
    "neon": "A neon drawing of",
}
PLACE_PHRASES = {"grass": "on the grass", "beach": "on the beach", "snow": "in the snow", "city": "in the city"}
TIME_PHRASES = {"day": "during the day", "night": "at night", "sunset": "at sunset"}
PATTERN_NOUNS = {"striped": "stripes", "dotted": "dots", "patched": "patches"}
ACCESSORY_PHRASES = {"hat": "a hat", "star": "a star on its head", "bow": "a bow"}

# Identity attributes that each style lets one see (a sketch is grey lines: no colours).
VISIBLE_IDENTITY = {
    "photo": ("color", "pattern", "pattern_color", "accessory"),
    "sketch": ("pattern", "accessory"),
    "watercolour": ("color", "pattern", "pattern_color", "accessory"),
    "pixel art": ("color", "pattern", "pattern_color", "accessory"),
    "neon": ("color", "pattern", "accessory"),
}


@dataclass(frozen=True)
class Identity:
    """What makes one subject instance itself."""

    cls: str
    color: str
    pattern: str = "plain"
    pattern_color: str = "yellow"
    accessory: str = "none"

    def __post_init__(self):
        for value, allowed, what in (
            (self.cls, CLASSES, "class"),
            (self.color, COLORS, "color"),
            (self.pattern, PATTERNS, "pattern"),
            (self.pattern_color, COLORS, "pattern colour"),
            (self.accessory, ACCESSORIES, "accessory"),
        ):
            if value not in allowed:
                raise ValueError(f"unknown {what} {value!r}; choose one of {', '.join(allowed)}")

    def describe(self, *, color=True, pattern=True, accessory=True) -> str:
        """'a purple cat with green dots and a star on its head' (parts can be left out)."""
        words = [self.color] if color else []
        words.append(self.cls)
        extras = []
        if pattern and self.pattern != "plain":
            extras.append(f"{self.pattern_color} {PATTERN_NOUNS[self.pattern]}" if color else PATTERN_NOUNS[self.pattern])
        if accessory and self.accessory != "none":
            extras.append(ACCESSORY_PHRASES[self.accessory])
        text = " ".join(words)
        if extras:
            text += " with " + " and ".join(extras)
        article = "an" if text[0] in "aeiou" else "a"
        return f"{article} {text}"


@dataclass(frozen=True)
class Scene:
    identity: Identity
    style: str = "photo"
    place: str = "plain"
    time: str = "day"
    seed: int = 0  # pose, position, texture details
    # How much of the identity the caption spells out.
    caption_color: bool = True
    caption_pattern: bool = True
    caption_accessory: bool = True
    caption_day: bool = False

    def __post_init__(self):
        if self.style not in STYLES:
            raise ValueError(f"unknown style {self.style!r}; choose one of {', '.join(STYLES)}")
        if self.place not in PLACES:
            raise ValueError(f"unknown place {self.place!r}; choose one of {', '.join(PLACES)}")
        if self.time not in TIMES:
            raise ValueError(f"unknown time {self.time!r}; choose one of {', '.join(TIMES)}")
        if self.place == "plain" and self.time != "day":
            raise ValueError("a plain studio background has no time of day; use time='day'")

    def caption(self) -> str:
        return compose_caption(
            self.style,
            self.identity.describe(
                color=self.caption_color, pattern=self.caption_pattern, accessory=self.caption_accessory
            ),
            self.place,
            self.time,
            say_day=self.caption_day,
        )

    def labels(self) -> dict:
        return {
            "style": self.style,
            "place": self.place,
            "time": self.time,
            **{("class" if k == "cls" else k): v for k, v in asdict(self.identity).items()},
        }


def compose_caption(style: str, subject: str, place: str = "plain", time: str = "day", *, say_day=False) -> str:
    """'A watercolour of' + subject + 'on the beach' + 'at sunset'."""
    parts = [STYLE_PHRASES[style], subject]
    if place != "plain":
        parts.append(PLACE_PHRASES[place])
        if time != "day" or say_day:
            parts.append(TIME_PHRASES[time])
    return " ".join(parts)


def parse_caption(text: str) -> dict:
    """Style, place and time named in a caption (the inverse of :func:`compose_caption`)."""
    low = text.lower()
    out = {"style": None, "place": "plain", "time": "day"}
    for style, phrase in STYLE_PHRASES.items():
        if low.startswith(phrase.lower()):
            out["style"] = style
    for place, phrase in PLACE_PHRASES.items():
        if phrase in low:
            out["place"] = place
    for t, phrase in TIME_PHRASES.items():
        if phrase in low:
            out["time"] = t
    return out


# ----------------------------------------------------------------------------- drawing


def _shade(rgb, f):
    return tuple(int(max(0, min(255, c * f))) for c in rgb)


def _sky(draw, time, rng):
    if time == "day":
        top, bottom = (90, 150, 225), (175, 210, 240)
    elif time == "night":
        top, bottom = (8, 10, 35), (25, 30, 70)
    else:
        top, bottom = (120, 60, 140), (250, 150, 60)
    for y in range(HORIZON):
        a = y / HORIZON
        draw.line([(0, y), (_S, y)], fill=tuple(int(t + (b - t) * a) for t, b in zip(top, bottom)))
    if time == "day":
        x, y = rng.randint(14, 40), rng.randint(12, 26)
        draw.ellipse([x - 10, y - 10, x + 10, y + 10], fill=(255, 235, 120))
    elif time == "night":
        for _ in range(28):
            x, y = rng.randrange(_S), rng.randrange(HORIZON - 6)
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
        img = Image.new("RGB", (_S, _S), (222, 222, 218))
        d = ImageDraw.Draw(img)
        d.rectangle([0, HORIZON + 10, _S, _S], fill=(205, 205, 200))
        return img
    img = Image.new("RGB", (_S, _S))
    d = ImageDraw.Draw(img)
    _sky(d, time, rng)
    dim = {"day": 1.0, "night": 0.42, "sunset": 0.8}[time]
    ground = _shade(_ground_color(place), dim)
    if time == "sunset":
        ground = (min(255, int(ground[0] * 1.15)), int(ground[1] * 0.9), int(ground[2] * 0.8))
    d.rectangle([0, HORIZON, _S, _S], fill=ground)
    if place == "grass":
        for _ in range(40):
            x, y = rng.randrange(_S), rng.randint(HORIZON + 2, _S)
            d.line([(x, y), (x + rng.randint(-2, 2), y - 4)], fill=_shade(ground, 0.85), width=1)
    elif place == "beach":
        sea = _shade((40, 120, 195), dim)
        d.rectangle([0, HORIZON, _S, HORIZON + 12], fill=sea)
        for x in range(0, _S, 12):
            d.arc([x, HORIZON + 9, x + 12, HORIZON + 15], 180, 360, fill=_shade((235, 245, 255), dim))
    elif place == "snow":
        for _ in range(40):
            x, y = rng.randrange(_S), rng.randrange(_S)
            d.ellipse([x - 1, y - 1, x + 1, y + 1], fill=(250, 250, 255))
    elif place == "city":
        lit = time == "night"
        x = 0
        while x < _S:
            w, h = rng.randint(12, 22), rng.randint(18, 42)
            body = _shade((70, 72, 85), dim if not lit else 0.6)
            d.rectangle([x, HORIZON - h, x + w - 2, HORIZON], fill=body)
            for wy in range(HORIZON - h + 4, HORIZON - 4, 7):
                for wx in range(x + 3, x + w - 5, 5):
                    on = lit and rng.random() < 0.6
                    d.rectangle([wx, wy, wx + 2, wy + 3], fill=(250, 220, 90) if on else _shade(body, 1.4))
            x += w
        tx = rng.choice((22, 104))
        tower = _shade((60, 55, 60), dim if not lit else 0.9)
        d.polygon([(tx - 9, HORIZON), (tx, HORIZON - 62), (tx + 9, HORIZON)], fill=tower)
        d.line([(tx - 5, HORIZON - 24), (tx + 5, HORIZON - 24)], fill=_shade(tower, 1.6), width=2)
        if lit:
            d.ellipse([tx - 2, HORIZON - 66, tx + 2, HORIZON - 62], fill=(255, 80, 80))
    return img


def _star(cx, cy, r):
    pts = []
    for i in range(10):
        a = -math.pi / 2 + i * math.pi / 5
        rr = r if i % 2 == 0 else r * 0.45
        pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    return pts


def _subject_shapes(cls, cx, cy, k, flip):
    """Body polygons/ellipses (drawn in the body colour), details, and the head-top anchor."""
    def X(dx):
        return cx + (-dx if flip else dx) * k

    def Y(dy):
        return cy + dy * k

    def box(x0, y0, x1, y1):
        xs = sorted((X(x0), X(x1)))
        return [xs[0], Y(y0), xs[1], Y(y1)]

    body, details = [], []
    dark = (30, 30, 30)
    if cls == "cat":
        body += [("ellipse", box(-20, -6, 14, 18)), ("ellipse", box(6, -26, 28, -4)),
                 ("polygon", [(X(8), Y(-20)), (X(11), Y(-34)), (X(17), Y(-23))]),
                 ("polygon", [(X(18), Y(-23)), (X(25), Y(-34)), (X(27), Y(-18))]),
                 ("line", [(X(-18), Y(6)), (X(-30), Y(-4)), (X(-28), Y(-18))], 5),
                 ("rect", box(-16, 12, -10, 26)), ("rect", box(4, 12, 10, 26))]
        details += [("ellipse", box(11, -19, 15, -15), dark), ("ellipse", box(20, -19, 24, -15), dark)]
        top = (X(17), Y(-32))
    elif cls == "dog":
        body += [("ellipse", box(-22, -8, 16, 16)), ("ellipse", box(6, -28, 30, -4)),
                 ("ellipse", box(22, -18, 36, -6)),
                 ("line", [(X(-20), Y(0)), (X(-30), Y(-12))], 5),
                 ("rect", box(-18, 10, -12, 26)), ("rect", box(6, 10, 12, 26))]
        details += [("ellipse", box(2, -26, 10, -6), _shade((90, 60, 40), 1.0)),
                    ("ellipse", box(16, -21, 20, -17), dark), ("ellipse", box(33, -15, 37, -11), dark)]
        top = (X(18), Y(-28))
    elif cls == "bird":
        body += [("ellipse", box(-18, -10, 14, 16)), ("ellipse", box(4, -26, 22, -8)),
                 ("polygon", [(X(-16), Y(0)), (X(-32), Y(-6)), (X(-30), Y(8))])]
        details += [("polygon", [(X(21), Y(-19)), (X(32), Y(-16)), (X(21), Y(-13))], (245, 160, 20)),
                    ("ellipse", box(13, -21, 17, -17), dark),
                    ("line", [(X(-4), Y(15)), (X(-4), Y(26))], 2, (200, 120, 20)),
                    ("line", [(X(4), Y(15)), (X(4), Y(26))], 2, (200, 120, 20))]
        top = (X(13), Y(-26))
    elif cls == "car":
        body += [("rect", box(-32, -6, 32, 12)), ("polygon", [(X(-18), Y(-6)), (X(-10), Y(-22)), (X(14), Y(-22)), (X(22), Y(-6))])]
        details += [("polygon", [(X(-13), Y(-8)), (X(-8), Y(-19)), (X(12), Y(-19)), (X(17), Y(-8))], (190, 225, 245)),
                    ("ellipse", box(-24, 4, -10, 18), dark), ("ellipse", box(10, 4, 24, 18), dark)]
        top = (X(2), Y(-22))
    elif cls == "house":
        body += [("rect", box(-22, -8, 22, 24)), ("polygon", [(X(-28), Y(-8)), (X(0), Y(-32)), (X(28), Y(-8))])]
        details += [("rect", box(-5, 8, 5, 24), (90, 55, 30)), ("rect", box(-17, -2, -8, 7), (190, 225, 245)),
                    ("rect", box(8, -2, 17, 7), (190, 225, 245))]
        top = (X(0), Y(-32))
    elif cls == "cup":
        body += [("polygon", [(X(-18), Y(-18)), (X(18), Y(-18)), (X(13), Y(16)), (X(-13), Y(16))]),
                 ("arc", box(12, -12, 30, 8), 6)]
        details += [("ellipse", box(-26, 14, 26, 22), (235, 235, 235)),
                    ("ellipse", box(-17, -21, 17, -15), (95, 55, 30))]
        top = (X(0), Y(-20))
    elif cls == "robot":
        body += [("rect", box(-14, -6, 14, 18)), ("rect", box(-10, -26, 10, -8)),
                 ("rect", box(-24, -4, -16, 12)), ("rect", box(16, -4, 24, 12)),
                 ("rect", box(-10, 18, -4, 28)), ("rect", box(4, 18, 10, 28))]
        details += [("rect", box(-7, -21, -2, -16), (80, 240, 250)), ("rect", box(2, -21, 7, -16), (80, 240, 250)),
                    ("line", [(X(0), Y(-26)), (X(0), Y(-32))], 2, dark), ("ellipse", box(-2, -35, 2, -31), (250, 60, 60))]
        top = (X(0), Y(-33))
    else:  # pragma: no cover - Identity validates the class
        raise ValueError(cls)
    return body, details, top


def _draw_shape(draw, shape, fill):
    kind = shape[0]
    if kind == "ellipse":
        draw.ellipse(shape[1], fill=fill)
    elif kind == "rect":
        draw.rectangle(shape[1], fill=fill)
    elif kind == "polygon":
        draw.polygon(shape[1], fill=fill)
    elif kind == "line":
        draw.line(shape[1], fill=fill, width=int(shape[2] * 1.0), joint="curve")
    elif kind == "arc":
        draw.arc(shape[1], -90, 90, fill=fill, width=shape[2])


def _subject_layer(identity: Identity, rng, shaded: bool):
    """RGBA layer with the subject, its pattern, details and accessory; and its shadow box."""
    k = rng.uniform(1.0, 1.25)
    cx = _S / 2 + rng.uniform(-8, 8)
    cy = HORIZON + rng.uniform(-4, 6)
    flip = rng.random() < 0.5
    body, details, top = _subject_shapes(identity.cls, cx, cy, k, flip)

    mask = Image.new("L", (_S, _S), 0)
    md = ImageDraw.Draw(mask)
    for s in body:
        _draw_shape(md, s, 255)
    base = Image.new("RGB", (_S, _S), COLORS[identity.color])
    if identity.pattern != "plain":
        pd = ImageDraw.Draw(base)
        pc = COLORS[identity.pattern_color]
        if identity.pattern == "striped":
            off = rng.randrange(14)
            for x in range(-_S, _S, 14):
                pd.line([(x + off, 0), (x + off + _S // 2, _S)], fill=pc, width=6)
        elif identity.pattern == "dotted":
            off = rng.randrange(6)
            for y in range(off, _S, 12):
                for x in range(off + (y // 12 % 2) * 6, _S, 12):
                    pd.ellipse([x - 3.5, y - 3.5, x + 3.5, y + 3.5], fill=pc)
        else:  # patched
            for _ in range(5):
                x, y = rng.uniform(cx - 30 * k, cx + 30 * k), rng.uniform(cy - 30 * k, cy + 20 * k)
                r = rng.uniform(6, 10) * k
                pd.ellipse([x - r, y - r * 0.8, x + r, y + r * 0.8], fill=pc)
    if shaded:  # light from the top left
        yy, xx = np.mgrid[0:_S, 0:_S].astype(np.float32)
        g = 1.15 - 0.35 * ((xx - cx + 30 * k) + (yy - cy + 30 * k)) / (120 * k)
        arr = np.asarray(base, dtype=np.float32) * np.clip(g, 0.7, 1.2)[..., None]
        base = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    layer = Image.new("RGBA", (_S, _S), (0, 0, 0, 0))
    layer.paste(base, (0, 0), mask)
    ld = ImageDraw.Draw(layer)
    for d in details:
        if d[0] == "line":
            ld.line(d[1], fill=d[3] if len(d) > 3 else d[2], width=d[2] if len(d) > 3 else 2)
        else:
            _draw_shape(ld, d[:2], d[2])
    tx, ty = top
    if identity.accessory == "hat":
        ld.rectangle([tx - 10 * k, ty - 2 * k, tx + 10 * k, ty + 1 * k], fill=(25, 25, 30))
        ld.rectangle([tx - 6 * k, ty - 14 * k, tx + 6 * k, ty - 1 * k], fill=(25, 25, 30))
        ld.rectangle([tx - 6 * k, ty - 5 * k, tx + 6 * k, ty - 3 * k], fill=(200, 30, 30))
    elif identity.accessory == "star":
        ld.polygon(_star(tx, ty - 7 * k, 9 * k), fill=(255, 215, 0), outline=(150, 110, 0))
    elif identity.accessory == "bow":
        c = (235, 30, 120)
        ld.polygon([(tx, ty - 3 * k), (tx - 10 * k, ty - 9 * k), (tx - 10 * k, ty + 3 * k)], fill=c)
        ld.polygon([(tx, ty - 3 * k), (tx + 10 * k, ty - 9 * k), (tx + 10 * k, ty + 3 * k)], fill=c)
        ld.ellipse([tx - 3 * k, ty - 6 * k, tx + 3 * k, ty], fill=(160, 10, 80))
    shadow = [cx - 30 * k, cy + 22 * k, cx + 30 * k, cy + 30 * k]
    return layer, shadow


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
        blot = np.asarray(Image.fromarray((g.random((12, 12)) * 255).astype(np.uint8)).resize((_S, _S), Image.BICUBIC), dtype=np.float32)
        arr *= (0.93 + 0.14 * blot / 255.0)[..., None]
        e = _edges(soft)[..., None]
        arr = arr * (1 - 0.35 * e)
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    if style == "pixel art":
        small = flat.resize((32, 32), Image.BOX).quantize(colors=12, method=Image.Quantize.MEDIANCUT).convert("RGB")
        return small.resize((_S, _S), Image.NEAREST)
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


def render(scene: Scene, size: int = SIZE) -> Image.Image:
    """The scene as an RGB image of ``size`` x ``size``."""
    rng = random.Random(scene.seed)
    bg = _background(scene.place, scene.time, random.Random(rng.randrange(2**31)))
    pose_seed = rng.randrange(2**31)  # both layers share the pose
    flat_layer, shadow = _subject_layer(scene.identity, random.Random(pose_seed), shaded=False)
    flat = bg.copy()
    flat.paste(flat_layer, (0, 0), flat_layer)
    if scene.style == "photo":
        shaded_layer, _ = _subject_layer(scene.identity, random.Random(pose_seed), shaded=True)
        shaded = bg.copy()
        sd = ImageDraw.Draw(shaded, "RGBA")
        sd.ellipse(shadow, fill=(0, 0, 0, 70))
        shaded.paste(shaded_layer, (0, 0), shaded_layer)
    else:
        shaded = flat
    out = _stylize(flat, shaded, scene.style, rng)
    return out.resize((size, size), Image.BOX)


def render_array(scene: Scene, size: int = SIZE) -> np.ndarray:
    return np.asarray(render(scene, size), dtype=np.uint8)
