"""A subject's ground truth as a user hands it in: a toy-world subject file
(``examples/toyworld/NAME.json``), local or gs://, read by ``palp prepare --truth``, an
experiment's ``truth:`` and ``python -m palp.toyworld.ceiling --config``."""

from __future__ import annotations

import json

from palp.core import gcs, storage


class TruthFileError(ValueError):
    """A truth file palp cannot read; the message names the file."""


def read_truth_file(uri: str) -> dict:
    """The truth file's JSON object; TruthFileError naming the file otherwise."""
    try:
        truth = json.loads(storage.read_text(uri))
    except (OSError, ValueError, gcs.StorageError) as e:
        raise TruthFileError(f"truth file {uri}: not a readable JSON file ({e})") from e
    if not isinstance(truth, dict):
        raise TruthFileError(f"truth file {uri}: expected a JSON object of the subject's attributes")
    return truth
