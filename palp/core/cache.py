"""palp's local cache folder (``PALP_CACHE``): fetched models, prepared data sets, runs and
compile caches downloaded from gs://, and the tiny models built in code."""

from __future__ import annotations

import functools
import os
from pathlib import Path

PROCESS_FIELD = "{process}"


def cache_root() -> Path:
    """``PALP_CACHE`` (default ``~/.cache/palp``).

    A ``{process}`` in it becomes an id of this process: every process then starts from its
    own empty cache, which goes when the process ends, as a pod's disk does on a cluster
    (``palp pipeline run-local`` isolates its steps so; with ``PALP_KEEP_STEP_CACHES`` set the
    folder is renamed ``<id>.ended`` instead, for inspection)."""
    raw = os.environ.get("PALP_CACHE") or str(Path.home() / ".cache" / "palp")
    return _process_cache(raw) if PROCESS_FIELD in raw else Path(raw)


@functools.lru_cache(maxsize=None)
def _process_cache(template: str) -> Path:
    import atexit
    import uuid

    path = Path(template.replace(PROCESS_FIELD, f"{os.getpid()}-{uuid.uuid4().hex[:8]}"))
    atexit.register(_end_process_cache, path)
    return path


def _end_process_cache(path: Path) -> None:
    import shutil

    if os.environ.get("PALP_KEEP_STEP_CACHES"):
        if path.exists():
            path.rename(path.with_name(path.name + ".ended"))
    else:
        shutil.rmtree(path, ignore_errors=True)
