"""What a toy-world scene is: the vocabulary (classes, colours, patterns, accessories, styles,
places, times), a subject's :class:`Identity`, a :class:`Scene`, and its caption.

Every caption is written from the same scene that ``palp.toyworld.render`` draws, so each
pixel has ground-truth attributes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

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
