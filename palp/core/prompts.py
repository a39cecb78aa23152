"""Prompts with subject placeholders: ``[V]``, ``[V1]``, ``[V2]``...

Three prompts take part in a PALP step (docs/method.md, "Notation"):

- the personalization prompt ``y_P`` ("A photo of [V]"), one per subject;
- the target prompt ``y`` ("A sketch of [V] in Paris at night");
- the clean target prompt ``y_c``: ``y`` with each placeholder replaced by its class word and
  a correct article ("A sketch of a cat in Paris at night").

Inside the text encoder each placeholder is one new token (``[V]`` -> ``<v>``), so a prompt
written for palp is also a prompt a stock diffusers pipeline understands after
``load_textual_inversion``.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Iterable, Mapping
from types import MappingProxyType

DEFAULT_PERSONALIZATION_PROMPT = "A photo of [V]"
DEFAULT_PLACEHOLDER = "[V]"

PLACEHOLDER_RE = re.compile(r"\[V(\d*)\]")
# Anything that looks like an attempt at a placeholder: [v], [V_1], [ V ], [X]...
_LOOSE_PLACEHOLDER_RE = re.compile(r"\[\s*[A-Za-z]\w*\s*\]")

# Words after which the class word needs no article of its own ("my [V]" -> "my cat").
_DETERMINERS = frozenset(
    "the this that these those my your his her its our their one each every any some no "
    "another".split()
)
_ARTICLES = frozenset({"a", "an"})
# Vowel letters that sound like consonants, and silent h: the few exceptions that matter
# for class nouns ("a unicorn", "a one-eyed toy", "an hourglass").
_CONSONANT_SOUND_PREFIXES = ("uni", "use", "usu", "uk", "ufo", "euro", "eu", "one", "once", "ewe")
_VOWEL_SOUND_PREFIXES = ("hour", "honest", "honor", "honour", "heir")


class PromptError(ValueError):
    """A prompt that palp cannot use; the message says what to change."""


def is_placeholder(text: str) -> bool:
    return PLACEHOLDER_RE.fullmatch(text) is not None


def placeholders_in(prompt: str) -> list[str]:
    """The placeholders of ``prompt`` in order of first appearance, without repeats."""
    seen: dict[str, None] = {}
    for m in PLACEHOLDER_RE.finditer(prompt):
        seen.setdefault(m.group(0), None)
    return list(seen)


def placeholder_token(placeholder: str) -> str:
    """The tokenizer token of a placeholder: ``[V]`` -> ``<v>``, ``[V2]`` -> ``<v2>``."""
    m = PLACEHOLDER_RE.fullmatch(placeholder)
    if m is None:
        raise PromptError(f"{placeholder!r} is not a placeholder; use [V], [V1], [V2], ...")
    return f"<v{m.group(1)}>"


# Nouns that end in -s but are singular, and plurals that do not end in -s.
_SINGULAR_S = frozenset(
    "bus canvas cactus lens iris glass grass dress chess octopus platypus walrus hippopotamus rhinoceros "
    "news mattress compass harness bass hummus citrus virus torus atlas gas asparagus hibiscus tennis "
    "christmas analysis basis bonus campus census chorus circus corpus fungus genius lotus minibus "
    "nautilus pegasus status surplus apparatus abacus albatross boss cross kiss moss class".split()
)
_PLURAL_NOT_S = frozenset("people children men women geese mice teeth feet sheep deer fish cattle".split())


def is_plural(word: str) -> bool:
    """Whether a class word names several things ("sunglasses", "shoes", "people"), which take no article."""
    last = word.strip().lower().split()[-1] if word.strip() else ""
    if last in _PLURAL_NOT_S:
        return True
    if last in _SINGULAR_S or not last.endswith("s") or last.endswith(("ss", "us", "is")):
        return False
    return True


def indefinite_article(word: str) -> str:
    w = word.strip().lower()
    if w.startswith(_VOWEL_SOUND_PREFIXES):
        return "an"
    if w.startswith(_CONSONANT_SOUND_PREFIXES):
        return "a"
    return "an" if w[:1] in set("aeiou") else "a"


def check_prompt(prompt: str, class_words: Mapping[str, str], *, what: str = "target prompt") -> list[str]:
    """Validate a prompt against the known subjects; return its placeholders.

    Raises PromptError for: no placeholder at all, a placeholder without a class word (an
    unknown subject), or bracketed text that looks like a mistyped placeholder.
    """
    found = placeholders_in(prompt)
    if not found:
        stray = _LOOSE_PLACEHOLDER_RE.findall(prompt)
        hint = f" ({stray[0]!r} is not one: placeholders are [V], [V1], [V2]...)" if stray else ""
        raise PromptError(
            f"the {what} {prompt!r} has no subject placeholder{hint}; write it as e.g. "
            f"'A sketch of [V] in Paris at night'"
        )
    for stray in _LOOSE_PLACEHOLDER_RE.findall(PLACEHOLDER_RE.sub("", prompt)):
        raise PromptError(
            f"the {what} {prompt!r} contains {stray!r}, which is not a placeholder; "
            f"placeholders are [V], [V1], [V2]..."
        )
    unknown = [p for p in found if p not in class_words]
    if unknown:
        known = ", ".join(sorted(class_words)) or "none"
        raise PromptError(
            f"the {what} {prompt!r} uses {', '.join(unknown)} but no subject has that placeholder "
            f"(subjects: {known}); give each placeholder images and a class word"
        )
    missing = [p for p in found if not class_words[p]]
    if missing:
        raise PromptError(f"placeholder {missing[0]} has no class word; pass --class-word {missing[0]}=WORD")
    return found


@dataclasses.dataclass(frozen=True)
class CheckedPrompt:
    """A prompt checked against its subjects' class words (``check_prompt``), with its clean
    prompt: made only by ``CheckedPrompt(text, class_words)``, which validates, so whatever
    receives one uses it without checking again. ``clean``: the clean prompt y_c when given
    (a prompts file's, ``--clean-prompt``), else derived. ``what`` names it in messages.
    The text encoder's limit is ``check_length()``'s, for where the prompt enters a training."""

    text: str
    class_words: Mapping[str, str] = dataclasses.field(hash=False)
    clean: str = ""
    what: str = dataclasses.field(default="target prompt", compare=False, repr=False)
    placeholders: tuple[str, ...] = dataclasses.field(init=False)

    def __post_init__(self):
        words = MappingProxyType(dict(self.class_words))
        found = check_prompt(self.text, words, what=self.what)
        object.__setattr__(self, "class_words", words)
        object.__setattr__(self, "placeholders", tuple(found))
        object.__setattr__(self, "clean", self.clean or _clean(self.text, words))

    @functools.cached_property
    def tokens(self) -> int:
        """Tokens the text encoder sees (``token_count``)."""
        return token_count(self.text)

    def clean_part(self, text: str) -> str:
        """The clean form of ``text`` written with this prompt's placeholders (a part of it, or a
        phrase around one of them), not checked again."""
        return _clean(text, self.class_words)

    def check_length(self, *, clean: bool = False) -> None:
        """PromptError if the text encoder would cut the prompt (with ``clean``: or its clean prompt)."""
        _check_count(self.text, self.tokens, self.what)
        if clean:
            check_token_length(self.clean, what="clean prompt")


def clean_prompt(prompt: str, class_words: Mapping[str, str]) -> str:
    """Replace each placeholder by its class word, with a correct indefinite article.

    "A sketch of [V]" -> "A sketch of a cat"; "[V] at night" (owl) -> "An owl at night";
    "my [V]" -> "my cat"; "a [V]" (owl) -> "an owl"; "A sketch of [V]" (sunglasses) ->
    "A sketch of sunglasses". The prompt is checked first (a CheckedPrompt has it as ``clean``).
    """
    return CheckedPrompt(prompt, class_words).clean


def _clean(prompt: str, class_words: Mapping[str, str]) -> str:
    """``clean_prompt`` of a prompt already checked (a CheckedPrompt's text, or a part of it)."""
    out: list[str] = []
    pos = 0
    for m in PLACEHOLDER_RE.finditer(prompt):
        before = prompt[pos : m.start()]
        word = class_words[m.group(0)]
        prev = re.search(r"([A-Za-z']+)(\s+)$", before)
        if prev and prev.group(1).lower() in _ARTICLES:
            # The user wrote the article: make it agree with the class word (or drop it before
            # a plural), keep its case.
            if is_plural(word):
                before = before[: prev.start(1)]
                replacement = word[:1].upper() + word[1:] if prev.group(1)[0].isupper() and not before.strip() else word
            else:
                art = indefinite_article(word)
                if prev.group(1)[0].isupper():
                    art = art.capitalize()
                before = before[: prev.start(1)] + art + prev.group(2)
                replacement = word
        elif prev and prev.group(1).lower() in _DETERMINERS:
            replacement = word
        elif is_plural(word):
            at_start = not "".join(out + [before]).strip()
            replacement = word[:1].upper() + word[1:] if at_start else word
        else:
            art = indefinite_article(word)
            at_start = not "".join(out + [before]).strip()
            sentence_start = at_start or re.search(r"[.!?]\s*$", before) is not None
            replacement = f"{art.capitalize() if sentence_start else art} {word}"
        out.append(before + replacement)
        pos = m.end()
    out.append(prompt[pos:])
    return "".join(out)


# Textual Inversion's 27 object templates ("imagenet_templates_small"), which NeTI's trainer draws
# one of per training image (--prompt-templates textual-inversion); "{}" is the placeholder.
PROMPT_TEMPLATES = {
    "textual-inversion": (
        "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
        "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
        "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}", "a cropped photo of a {}",
        "a photo of the {}", "a good photo of the {}", "a photo of one {}", "a close-up photo of the {}",
        "a rendition of the {}", "a photo of the clean {}", "a rendition of a {}", "a photo of a nice {}",
        "a good photo of a {}", "a photo of the nice {}", "a photo of the small {}", "a photo of the weird {}",
        "a photo of the large {}", "a photo of a cool {}", "a photo of a small {}",
    ),
}


def training_prompts(personalization_prompt: str, placeholder: str, templates: str) -> list[str]:
    """The prompts a subject's training rows are drawn from: its personalization prompt alone
    (``templates`` "none"), or each template of ``PROMPT_TEMPLATES[templates]`` holding its placeholder."""
    if templates == "none":
        return [personalization_prompt]
    return [t.format(placeholder) for t in PROMPT_TEMPLATES[templates]]


class VocabularyEntry(str):
    """A token of CLIP's vocabulary taken as it is (its one embedding row), not a word for the BPE
    to read: "ktn" is the entry 42170, while the word "ktn" reads as "k" + "tn</w>"."""


# --token-init rare: Custom Diffusion's rarely used tokens, the initial embeddings of its modifier
# tokens: the vocabulary entries its code copies (ids 42170, 47629, 43514 of CLIP's vocabulary;
# the diffusers example's --initializer_token ktn+pll+ucd), one per subject in turn.
RARE_INIT_TOKENS = (VocabularyEntry("ktn"), VocabularyEntry("pll"), VocabularyEntry("ucd</w>"))


def token_init_words(token_init: str, class_words: Mapping[str, str]) -> dict[str, str]:
    """{placeholder: the word (or VocabularyEntry) its token's embedding starts from} for
    ``--token-init``: ``class`` (each subject's class word), ``rare`` (RARE_INIT_TOKENS, one per
    subject in the order given, from the first again after the third) or one word for every subject."""
    if token_init == "class":
        return dict(class_words)
    if token_init == "rare":
        return {p: RARE_INIT_TOKENS[i % len(RARE_INIT_TOKENS)] for i, p in enumerate(class_words)}
    return {p: token_init for p in class_words}


def to_token_prompt(prompt: str) -> str:
    """The text the tokenizer sees: each placeholder becomes its token ("[V]" -> "<v>")."""
    return PLACEHOLDER_RE.sub(lambda m: placeholder_token(m.group(0)), prompt)


# SD's CLIP text encoder reads 77 tokens, start and end of text included; the tokenizer cuts
# anything longer without a word, so the end of a long prompt would silently not be trained on.
MAX_PROMPT_TOKENS = 77


def token_count(prompt: str) -> int:
    """Tokens the text encoder sees for ``prompt``: start and end included, a placeholder one
    token (its learned token), counted offline with CLIP's BPE (palp.core.clip_bpe)."""
    from palp.core.clip_bpe import clip_bpe

    return len(clip_bpe().pieces(PLACEHOLDER_RE.sub(" ", prompt))) + len(PLACEHOLDER_RE.findall(prompt)) + 2


def check_token_length(prompt: str, *, what: str = "target prompt") -> None:
    """Raise PromptError, with the count and the limit, for a prompt the text encoder would cut."""
    _check_count(prompt, token_count(prompt), what)


def _check_count(prompt: str, n: int, what: str) -> None:
    if n > MAX_PROMPT_TOKENS:
        shown = prompt if len(prompt) <= 60 else prompt[:57] + "..."
        raise PromptError(f"the {what} {shown!r} is {n} tokens long, over the text encoder's limit of "
                          f"{MAX_PROMPT_TOKENS} (start and end included); shorten it")


def parse_keyed(values: Iterable[str] | None, *, flag: str, default_key: str = DEFAULT_PLACEHOLDER) -> dict[str, str]:
    """Parse repeated ``--flag VALUE`` / ``--flag [V1]=VALUE`` options into {placeholder: value}.

    ``--class-word cat`` means ``[V]=cat``; ``--class-word "[V2]=dog"`` names a subject.
    """
    out: dict[str, str] = {}
    for raw in values or ():
        key, sep, value = raw.partition("=")
        if sep and is_placeholder(key.strip()):
            key, value = key.strip(), value.strip()
        else:
            key, value = default_key, raw.strip()
        if key in out:
            raise PromptError(f"{flag} is given twice for {key}; give it once per placeholder")
        if not value:
            raise PromptError(f"{flag} for {key} is empty")
        out[key] = value
    return out
