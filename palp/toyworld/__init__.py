"""The toy world: procedural scenes with known truth, and models pretrained on them.

``pretrained_model: toyworld`` and ``clip_model: toyworld`` select the small Stable Diffusion
and open_clip models shipped under ``palp/toyworld/weights`` (trained by
``evaluation/toyworld/pretrain.py``); the judge there reads every attribute of a scene back
from its pixels. See evaluation/toyworld/README.md.
"""

from pathlib import Path

TOYWORLD_NAME = "toyworld"
WEIGHTS = Path(__file__).parent / "weights"


class ToyWorldError(FileNotFoundError):
    """The shipped toy-world weights are missing; the message says how to make them."""


def weights_dir(part: str) -> Path:
    """``sd``, ``clip`` or ``judge``: the shipped folder, checked to exist."""
    path = WEIGHTS / part
    if not path.is_dir() or not any(path.iterdir()):
        raise ToyWorldError(
            f"the toy-world {part} weights are missing from {path}; they ship with palp's source tree, "
            f"or can be retrained with `python evaluation/toyworld/pretrain.py all --work DIR`"
        )
    return path
