"""The training methods palp offers (``--method``) and what each one's step needs.

A plain table, read by the settings (which values ``--method`` takes), by the step's inputs
(which text states to encode) and by the training step (which guidance branches to run); the
math of each method is ``palp.method.guidance``. docs/method.md describes each method.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    """What a method's step needs beyond Eq. 1 (the personalization loss every method has)."""

    name: str
    aligns: bool  # an alignment term toward the clean prompt y_c (score sampling)
    personalized: bool  # its delta needs the personalized model on y_P (PALP's Eq. 6)
    negative: bool  # its delta needs the pretrained model on a negative prompt (NFSD)

    @property
    def reads_target_prompt(self) -> bool:
        """Whether training depends on the target prompt (through y_c): one TI+DB run serves every prompt."""
        return self.aligns


METHOD_TABLE = {m.name: m for m in (
    Method("palp", aligns=True, personalized=True, negative=False),
    Method("ti-db", aligns=False, personalized=False, negative=False),
    Method("sds", aligns=True, personalized=False, negative=False),
    Method("nfsd", aligns=True, personalized=False, negative=True),
)}
METHODS = tuple(METHOD_TABLE)

# NFSD's negative prompt for the "denoising" direction at large t (Katzir et al., Sec. 4).
NFSD_NEGATIVE_PROMPT = "unrealistic, blurry, low quality, out of focus, ugly, low contrast, dull, dark, low-resolution, gloomy"
