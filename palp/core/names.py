"""Names that become folder or file names: subjects, task ids, method labels.

They reach paths under an output (``subjects/<name>/``, ``<task>/<method>-.../``), so a name
like ``../x`` or ``a/b`` would write outside it. One rule, checked wherever a name is accepted.
"""

from __future__ import annotations

import re

_NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")
ALLOWED = "letters, digits, '_', '.' and '-' (not '.' or '..')"
# A name becomes part of longer folder and file names (a task id is '<subject>-NN', a sample
# file '<task>/<method>-<hash>/...'; a multi-subject task joins its names with '+'), and one
# path component may be 255 bytes: 64 leaves room for every later step.
MAX_LENGTH = 64


def check_name(name: str, what: str, error: type[Exception] = ValueError, *, joined: bool = False) -> str:
    """``name`` if it is safe as one path component; else ``error`` naming it and the rule.

    ``joined``: ``name`` is several names joined by '+' (a multi-subject task id, ``cat+dog-00``),
    each of which must follow the rule.
    """
    parts = str(name).split("+") if joined else [str(name)]
    if not all(_NAME_RE.fullmatch(p) and p not in (".", "..") for p in parts):
        plus = ", joined by '+'" if joined else ""
        raise error(f"{what} {name!r} is not allowed: it becomes a folder name, so use only {ALLOWED}{plus}")
    long = [p for p in parts if len(p) > MAX_LENGTH + (3 if joined else 0)]  # a joined task id ends in '-NN'
    if long:
        raise error(f"{what} {name[:40]!r}... is {len(long[0])} characters long: it becomes part of folder and file "
                    f"names, so use at most {MAX_LENGTH}")
    return name


def check_distinct(names: list[str], what: str, error: type[Exception] = ValueError) -> None:
    """``error`` if two names differ only in case: on a case-insensitive file system (macOS,
    Windows, some mounts) their folders would be one."""
    seen: dict[str, str] = {}
    for n in names:
        if n.lower() in seen and seen[n.lower()] != n:
            raise error(f"{what}s {seen[n.lower()]!r} and {n!r} differ only in case: their folders would be one on a "
                        f"case-insensitive file system; rename one")
        seen.setdefault(n.lower(), n)
