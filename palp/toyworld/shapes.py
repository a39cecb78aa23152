"""How a toy-world subject is drawn: the canvas, each class's body and details, its pattern,
shading and accessory, as one RGBA layer for ``palp.toyworld.render`` to place on a scene.

Shapes are in a class's own units around the subject's centre; a :class:`_Frame` (the pose:
centre, scale, facing) maps them to canvas pixels.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from palp.toyworld.scene import COLORS, Identity

SIZE = 64
CANVAS = 2 * SIZE  # drawing canvas
HORIZON = int(CANVAS * 0.62)

_DARK = (30, 30, 30)


def shade(rgb, f):
    return tuple(int(max(0, min(255, c * f))) for c in rgb)


def _star(cx, cy, r):
    pts = []
    for i in range(10):
        a = -math.pi / 2 + i * math.pi / 5
        rr = r if i % 2 == 0 else r * 0.45
        pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    return pts


class _Frame:
    """A subject's pose: class units (x to the right when facing right, y down) -> canvas pixels."""

    def __init__(self, cx, cy, k, flip):
        self.cx, self.cy, self.k, self.flip = cx, cy, k, flip

    def X(self, dx):
        return self.cx + (-dx if self.flip else dx) * self.k

    def Y(self, dy):
        return self.cy + dy * self.k

    def box(self, x0, y0, x1, y1):
        xs = sorted((self.X(x0), self.X(x1)))
        return [xs[0], self.Y(y0), xs[1], self.Y(y1)]


# Each class: (body shapes, drawn in the body colour; details, each with its own colour; the head-top anchor).

def _cat(f: _Frame):
    X, Y, box = f.X, f.Y, f.box
    body = [("ellipse", box(-20, -6, 14, 18)), ("ellipse", box(6, -26, 28, -4)),
            ("polygon", [(X(8), Y(-20)), (X(11), Y(-34)), (X(17), Y(-23))]),
            ("polygon", [(X(18), Y(-23)), (X(25), Y(-34)), (X(27), Y(-18))]),
            ("line", [(X(-18), Y(6)), (X(-30), Y(-4)), (X(-28), Y(-18))], 5),
            ("rect", box(-16, 12, -10, 26)), ("rect", box(4, 12, 10, 26))]
    details = [("ellipse", box(11, -19, 15, -15), _DARK), ("ellipse", box(20, -19, 24, -15), _DARK)]
    return body, details, (X(17), Y(-32))


def _dog(f: _Frame):
    X, Y, box = f.X, f.Y, f.box
    body = [("ellipse", box(-22, -8, 16, 16)), ("ellipse", box(6, -28, 30, -4)),
            ("ellipse", box(22, -18, 36, -6)),
            ("line", [(X(-20), Y(0)), (X(-30), Y(-12))], 5),
            ("rect", box(-18, 10, -12, 26)), ("rect", box(6, 10, 12, 26))]
    details = [("ellipse", box(2, -26, 10, -6), shade((90, 60, 40), 1.0)),
               ("ellipse", box(16, -21, 20, -17), _DARK), ("ellipse", box(33, -15, 37, -11), _DARK)]
    return body, details, (X(18), Y(-28))


def _bird(f: _Frame):
    X, Y, box = f.X, f.Y, f.box
    body = [("ellipse", box(-18, -10, 14, 16)), ("ellipse", box(4, -26, 22, -8)),
            ("polygon", [(X(-16), Y(0)), (X(-32), Y(-6)), (X(-30), Y(8))])]
    details = [("polygon", [(X(21), Y(-19)), (X(32), Y(-16)), (X(21), Y(-13))], (245, 160, 20)),
               ("ellipse", box(13, -21, 17, -17), _DARK),
               ("line", [(X(-4), Y(15)), (X(-4), Y(26))], 2, (200, 120, 20)),
               ("line", [(X(4), Y(15)), (X(4), Y(26))], 2, (200, 120, 20))]
    return body, details, (X(13), Y(-26))


def _car(f: _Frame):
    X, Y, box = f.X, f.Y, f.box
    body = [("rect", box(-32, -6, 32, 12)), ("polygon", [(X(-18), Y(-6)), (X(-10), Y(-22)), (X(14), Y(-22)), (X(22), Y(-6))])]
    details = [("polygon", [(X(-13), Y(-8)), (X(-8), Y(-19)), (X(12), Y(-19)), (X(17), Y(-8))], (190, 225, 245)),
               ("ellipse", box(-24, 4, -10, 18), _DARK), ("ellipse", box(10, 4, 24, 18), _DARK)]
    return body, details, (X(2), Y(-22))


def _house(f: _Frame):
    X, Y, box = f.X, f.Y, f.box
    body = [("rect", box(-22, -8, 22, 24)), ("polygon", [(X(-28), Y(-8)), (X(0), Y(-32)), (X(28), Y(-8))])]
    details = [("rect", box(-5, 8, 5, 24), (90, 55, 30)), ("rect", box(-17, -2, -8, 7), (190, 225, 245)),
               ("rect", box(8, -2, 17, 7), (190, 225, 245))]
    return body, details, (X(0), Y(-32))


def _cup(f: _Frame):
    X, Y, box = f.X, f.Y, f.box
    body = [("polygon", [(X(-18), Y(-18)), (X(18), Y(-18)), (X(13), Y(16)), (X(-13), Y(16))]),
            ("arc", box(12, -12, 30, 8), 6)]
    details = [("ellipse", box(-26, 14, 26, 22), (235, 235, 235)),
               ("ellipse", box(-17, -21, 17, -15), (95, 55, 30))]
    return body, details, (X(0), Y(-20))


def _robot(f: _Frame):
    X, Y, box = f.X, f.Y, f.box
    body = [("rect", box(-14, -6, 14, 18)), ("rect", box(-10, -26, 10, -8)),
            ("rect", box(-24, -4, -16, 12)), ("rect", box(16, -4, 24, 12)),
            ("rect", box(-10, 18, -4, 28)), ("rect", box(4, 18, 10, 28))]
    details = [("rect", box(-7, -21, -2, -16), (80, 240, 250)), ("rect", box(2, -21, 7, -16), (80, 240, 250)),
               ("line", [(X(0), Y(-26)), (X(0), Y(-32))], 2, _DARK), ("ellipse", box(-2, -35, 2, -31), (250, 60, 60))]
    return body, details, (X(0), Y(-33))


_CLASS_SHAPES = {"cat": _cat, "dog": _dog, "bird": _bird, "car": _car, "house": _house, "cup": _cup, "robot": _robot}


def subject_shapes(cls, cx, cy, k, flip):
    """Body polygons/ellipses (drawn in the body colour), details, and the head-top anchor."""
    if cls not in _CLASS_SHAPES:  # pragma: no cover - Identity validates the class
        raise ValueError(cls)
    return _CLASS_SHAPES[cls](_Frame(cx, cy, k, flip))


def draw_shape(draw, shape, fill):
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


def subject_layer(identity: Identity, rng, shaded: bool):
    """RGBA layer with the subject, its pattern, details and accessory; and its shadow box."""
    k = rng.uniform(1.0, 1.25)
    cx = CANVAS / 2 + rng.uniform(-8, 8)
    cy = HORIZON + rng.uniform(-4, 6)
    flip = rng.random() < 0.5
    return compose_subject(identity, rng, shaded, cx=cx, cy=cy, k=k, flip=flip, paint_pattern=paint_whole_body)


def paint_whole_body(base: Image.Image, identity: Identity, rng, body, cx, cy, k) -> None:
    """v1's pattern: stripes, dots or patches over the whole body-colour canvas."""
    _draw_pattern(ImageDraw.Draw(base), identity, rng, cx, cy, k)


def compose_subject(identity: Identity, rng, shaded: bool, *, cx, cy, k, flip, paint_pattern):
    """The subject at a pose: its body in the body colour, the pattern that ``paint_pattern``
    paints on it (drawing from ``rng``), the light, details and accessory; and its shadow box."""
    body, details, top = subject_shapes(identity.cls, cx, cy, k, flip)

    mask = Image.new("L", (CANVAS, CANVAS), 0)
    md = ImageDraw.Draw(mask)
    for s in body:
        draw_shape(md, s, 255)
    base = Image.new("RGB", (CANVAS, CANVAS), COLORS[identity.color])
    if identity.pattern != "plain":
        paint_pattern(base, identity, rng, body, cx, cy, k)
    if shaded:
        base = _light(base, cx, cy, k)
    layer = Image.new("RGBA", (CANVAS, CANVAS), (0, 0, 0, 0))
    layer.paste(base, (0, 0), mask)
    ld = ImageDraw.Draw(layer)
    for d in details:
        if d[0] == "line":
            ld.line(d[1], fill=d[3] if len(d) > 3 else d[2], width=d[2] if len(d) > 3 else 2)
        else:
            draw_shape(ld, d[:2], d[2])
    _draw_accessory(ld, identity.accessory, top, k)
    shadow = [cx - 30 * k, cy + 22 * k, cx + 30 * k, cy + 30 * k]
    return layer, shadow


def _draw_pattern(pd, identity: Identity, rng, cx, cy, k) -> None:
    """Stripes, dots or patches in the pattern colour over the whole body-colour canvas."""
    pc = COLORS[identity.pattern_color]
    if identity.pattern == "striped":
        off = rng.randrange(14)
        for x in range(-CANVAS, CANVAS, 14):
            pd.line([(x + off, 0), (x + off + CANVAS // 2, CANVAS)], fill=pc, width=6)
    elif identity.pattern == "dotted":
        off = rng.randrange(6)
        for y in range(off, CANVAS, 12):
            for x in range(off + (y // 12 % 2) * 6, CANVAS, 12):
                pd.ellipse([x - 3.5, y - 3.5, x + 3.5, y + 3.5], fill=pc)
    else:  # patched
        for _ in range(5):
            x, y = rng.uniform(cx - 30 * k, cx + 30 * k), rng.uniform(cy - 30 * k, cy + 20 * k)
            r = rng.uniform(6, 10) * k
            pd.ellipse([x - r, y - r * 0.8, x + r, y + r * 0.8], fill=pc)


def _light(base: Image.Image, cx, cy, k) -> Image.Image:
    """``base`` lit from the top left."""
    yy, xx = np.mgrid[0:CANVAS, 0:CANVAS].astype(np.float32)
    g = 1.15 - 0.35 * ((xx - cx + 30 * k) + (yy - cy + 30 * k)) / (120 * k)
    arr = np.asarray(base, dtype=np.float32) * np.clip(g, 0.7, 1.2)[..., None]
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _draw_accessory(ld, accessory: str, top, k) -> None:
    tx, ty = top
    if accessory == "hat":
        ld.rectangle([tx - 10 * k, ty - 2 * k, tx + 10 * k, ty + 1 * k], fill=(25, 25, 30))
        ld.rectangle([tx - 6 * k, ty - 14 * k, tx + 6 * k, ty - 1 * k], fill=(25, 25, 30))
        ld.rectangle([tx - 6 * k, ty - 5 * k, tx + 6 * k, ty - 3 * k], fill=(200, 30, 30))
    elif accessory == "star":
        ld.polygon(_star(tx, ty - 7 * k, 9 * k), fill=(255, 215, 0), outline=(150, 110, 0))
    elif accessory == "bow":
        c = (235, 30, 120)
        ld.polygon([(tx, ty - 3 * k), (tx - 10 * k, ty - 9 * k), (tx - 10 * k, ty + 3 * k)], fill=c)
        ld.polygon([(tx, ty - 3 * k), (tx + 10 * k, ty - 9 * k), (tx + 10 * k, ty + 3 * k)], fill=c)
        ld.ellipse([tx - 3 * k, ty - 6 * k, tx + 3 * k, ty], fill=(160, 10, 80))
