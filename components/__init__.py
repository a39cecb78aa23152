"""palp's KFP v2 components: one lightweight component per pipeline step.

Each runs in the palp image (``base_image``), without installing kfp, and only calls the palp
library. The image reference is derived from the package version, so a compiled pipeline
always names the image built from the same release; ``PALP_IMAGE`` (or ``palp pipeline
compile --image``) overrides it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from kfp import dsl

from components import steps
from palp import __version__

IMAGE_REGISTRY = "us-docker.pkg.dev/palp-project/palp"


def default_image(target: str = "gpu") -> str:
    """``<registry>/palp-<target>:<palp version>``, or ``PALP_IMAGE`` (GPU/CPU) / ``PALP_TPU_IMAGE``."""
    override = os.environ.get("PALP_TPU_IMAGE" if target == "tpu" else "PALP_IMAGE")
    return override or f"{IMAGE_REGISTRY}/palp-{target}:{__version__}"


@dataclass(frozen=True)
class Components:
    prepare: object
    train: object
    sample: object
    score: object
    compare: object


def make_components(image: str | None = None) -> Components:
    """The five components, built on ``image`` (default: the release's palp image)."""
    image = image or default_image()

    def make(func):
        return dsl.component(func=func, base_image=image, install_kfp_package=False)

    return Components(*(make(getattr(steps, name)) for name in ("prepare", "train", "sample", "score", "compare")))
