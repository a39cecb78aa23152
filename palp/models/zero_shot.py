"""Automatic class words: CLIP zero-shot classification of a subject's images.

Each vocabulary word is embedded with every prompt template; its class feature is the mean of
the L2-normalised template features, normalised again (CLIP's prompt ensembling). Each image
gets a softmax over ``temperature * cosine`` (CLIP's logit scale, 100); the subject's scores
are the probabilities averaged over its images. A winner below ``min_confidence`` is flagged.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

# evaluation/ beside the package (a source checkout), or PALP_EVALUATION_DIR (the step image).
EVALUATION_DIR = Path(os.environ.get("PALP_EVALUATION_DIR") or Path(__file__).resolve().parents[2] / "evaluation")
DEFAULT_VOCABULARY = EVALUATION_DIR / "classes" / "vocabulary.yaml"
VOCABULARY_SECTIONS = ("dreambooth", "customconcept101", "common")


@dataclass
class ZeroShot:
    top: list[tuple[str, float]]  # best first
    low_confidence: bool

    @property
    def word(self) -> str:
        return self.top[0][0]


def load_vocabulary(path: str | Path | None = None) -> tuple[list[str], list[str]]:
    """(words, templates) from a vocabulary YAML; words merged across sections, order kept."""
    import yaml

    path = Path(path) if path else DEFAULT_VOCABULARY
    if not path.is_file():
        raise FileNotFoundError(f"class vocabulary {path} not found; pass --class-vocabulary PATH")
    spec = yaml.safe_load(path.read_text())
    words = list(dict.fromkeys(w.strip() for s in VOCABULARY_SECTIONS for w in spec.get(s, []) if w.strip()))
    templates = spec.get("templates") or ["a photo of {}."]
    if not words or any("{}" not in t for t in templates):
        raise ValueError(f"{path}: needs words under {', '.join(VOCABULARY_SECTIONS)} and templates containing {{}}")
    return words, templates


def with_article(word: str) -> str:
    """"cat" -> "a cat", "owl" -> "an owl", "sunglasses" -> "sunglasses" (templates' ``{}``)."""
    from palp.core.prompts import clean_prompt

    phrase = clean_prompt("[V]", {"[V]": word})
    return phrase[:1].lower() + phrase[1:] if phrase[:1].isupper() and phrase != word else phrase


def class_features(encode_texts, words: list[str], templates: list[str]) -> torch.Tensor:
    """(C, D) unit class features: mean over templates of unit text features, renormalised."""
    texts = [t.format(with_article(w)) for w in words for t in templates]
    feats = encode_texts(texts).reshape(len(words), len(templates), -1)
    return torch.nn.functional.normalize(feats.mean(1), dim=-1)


def zero_shot(
    image_features: torch.Tensor, class_feats: torch.Tensor, words: list[str], *,
    temperature: float = 100.0, top_k: int = 5, min_confidence: float = 0.3,
) -> ZeroShot:
    """The decision, given unit image features (N, D) and unit class features (C, D)."""
    probs = torch.softmax(temperature * image_features.float() @ class_feats.float().T, dim=-1).mean(0)  # (C,)
    values, idx = probs.topk(min(top_k, len(words)))
    top = [(words[i], float(v)) for v, i in zip(values, idx.tolist())]
    return ZeroShot(top=top, low_confidence=top[0][1] < min_confidence)


def classify_images(clip, images, words: list[str], templates: list[str], **kw) -> ZeroShot:
    """Zero-shot class of one subject from its PIL images with an open_clip model (palp.models.clip.Clip)."""
    return zero_shot(clip.encode_images(images), class_features(clip.encode_texts, words, templates), words, **kw)
