"""Prompt elements: the parts of a target prompt that Table 2 scores and the user study counts.

The rule (explicit elements in a prompts file always win over it):

1. **Style** — the words before ``of [V]`` at the start of the prompt: "A sketch of [V] ..." ->
   "A sketch"; "An oil painting of my [V]" -> "An oil painting". A prompt that does not start
   "<something> of [V]" has no style element.
2. **Class** — one per placeholder: "A photo of" + the class word with its article
   ("A photo of a cat"; "A photo of sunglasses").
3. **Ambiance** — the rest of the prompt after the subject, clean (placeholders replaced by
   their class words), cut at commas, semicolons and " and ", and before each phrase starter —
   a preposition ("in", "at", "on", "under"...) or a verb in -ing ("wearing", "sitting") — once
   the current phrase holds a word that is not a starter: "in Paris at night" -> "in Paris",
   "at night"; "sitting on a rock" stays whole; "warm vintage colours" is one element.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from palp.core.prompts import PLACEHOLDER_RE, CheckedPrompt

PREPOSITIONS = frozenset(
    "in at on under with near by during inside beside behind above over through among against across "
    "around before after beneath below between beyond from into onto outside underneath within without "
    "along amid atop toward towards upon surrounded inspired".split()
)
_DETERMINER_BEFORE_V = re.compile(r"\s+(?:a|an|the|my|your|our|his|her|their)\s*$", re.IGNORECASE)


# Nouns in -ing, which do not start a phrase ("golden hour lighting").
ING_NOUNS = frozenset(
    "painting drawing building evening morning clothing string ceiling thing lighting wedding pudding "
    "sibling dumpling setting clearing opening ending feeling landing railing awning sterling ceiling "
    "king ring spring wing swing sling".split()
)


def _is_starter(word: str) -> bool:
    w = word.lower().strip(".,;:!?")
    return w in PREPOSITIONS or (w.endswith("ing") and w not in ING_NOUNS and len(w) > 4)


def split_phrases(text: str) -> list[str]:
    """Cut an ambiance tail into phrases (rule 3 above)."""
    phrases: list[str] = []
    for clause in re.split(r"[,;]|\s+and\s+", text):
        words, current = clause.split(), []
        for w in words:
            if _is_starter(w) and any(not _is_starter(c) for c in current):
                phrases.append(" ".join(current))
                current = []
            current.append(w)
        if current:
            phrases.append(" ".join(current))
    return [p.strip(" .") for p in phrases if p.strip(" .")]


def style_of(prompt: str) -> str | None:
    """Rule 1: "A sketch of [V] in Paris" -> "A sketch"."""
    m = PLACEHOLDER_RE.search(prompt)
    if m is None:
        return None
    head = _DETERMINER_BEFORE_V.sub("", prompt[: m.start()].rstrip())
    if not head.lower().endswith(" of"):
        return None
    style = head[: -len(" of")].strip()
    return style or None


def derive_elements(prompt: CheckedPrompt) -> dict:
    """{"style": str | None, "ambiance": [str, ...]} of a target prompt, by the rule."""
    first = PLACEHOLDER_RE.search(prompt.text)
    tail = prompt.text[first.end() :]
    if PLACEHOLDER_RE.search(tail):
        tail = prompt.clean_part(tail)
    tail = re.sub(r"^\s*'s\b", "", tail)
    return {"style": style_of(prompt.text), "ambiance": split_phrases(tail)}


def elements_of(prompt: CheckedPrompt, explicit: Mapping | None = None) -> list[dict]:
    """The named elements of a prompt: Style, Class (one per subject), Ambiance 1, 2...

    ``explicit`` (from a prompts file) may give ``style`` and ``ambiance`` and wins over the rule.
    Each element: {"kind": "style"|"class"|"ambiance", "name": "Ambiance 1", "text": "in Paris"}.
    """
    derived = derive_elements(prompt)
    explicit = dict(explicit or {})
    style = explicit.get("style", derived["style"])
    ambiance: Sequence[str] = explicit.get("ambiance", derived["ambiance"])
    if isinstance(ambiance, str):
        ambiance = [ambiance]
    out: list[dict] = []
    if style:
        out.append({"kind": "style", "name": "Style", "text": style})
    placeholders = [p for p in prompt.class_words if p in prompt.placeholders]
    for i, ph in enumerate(placeholders, 1):
        name = "Class" if len(placeholders) == 1 else f"Class {i}"
        out.append({"kind": "class", "name": name, "text": prompt.clean_part(f"A photo of {ph}")})
    for i, text in enumerate(ambiance, 1):
        out.append({"kind": "ambiance", "name": f"Ambiance {i}", "text": text})
    return out


def element_list(prompt: str, class_words: Mapping[str, str], explicit: Mapping | None = None) -> list[dict]:
    """``elements_of`` a prompt text, checked here against ``class_words``."""
    return elements_of(CheckedPrompt(prompt, class_words), explicit)
