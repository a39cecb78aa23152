"""Names that become folder or file names: subjects, task ids, method labels.

They reach paths under an output (``subjects/<name>/``, ``<task>/<method>-.../``), so a name
like ``../x`` or ``a/b`` would write outside it. One rule, checked wherever a name is accepted.
"""

from __future__ import annotations

import re

_NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")
ALLOWED = "letters, digits, '_', '.' and '-' (not '.' or '..')"


def check_name(name: str, what: str, error: type[Exception] = ValueError, *, joined: bool = False) -> str:
    """``name`` if it is safe as one path component; else ``error`` naming it and the rule.

    ``joined``: ``name`` is several names joined by '+' (a multi-subject task id, ``cat+dog-00``),
    each of which must follow the rule.
    """
    parts = str(name).split("+") if joined else [str(name)]
    if not all(_NAME_RE.fullmatch(p) and p not in (".", "..") for p in parts):
        plus = ", joined by '+'" if joined else ""
        raise error(f"{what} {name!r} is not allowed: it becomes a folder name, so use only {ALLOWED}{plus}")
    return name
