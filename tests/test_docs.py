"""The documentation's commands work: every shell block in README.md and docs/ marked runnable
(an HTML comment ``<!-- runnable ... -->`` on the line before its fence) is run as written, on
the tiny model, from a folder that holds the repository's examples and evaluation files; and
every relative link in them points at a file of the repository."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
MARK = re.compile(r"^<!-- runnable\b.*-->\s*$")
FENCE = re.compile(r"^```(\w*)\s*$")


def runnable_blocks(text: str) -> list[tuple[int, str]]:
    """(line number, body) of each fenced block whose fence line follows a runnable mark."""
    lines, blocks, i = text.splitlines(), [], 0
    while i < len(lines):
        if MARK.match(lines[i]) and i + 1 < len(lines) and FENCE.match(lines[i + 1]) and FENCE.match(lines[i + 1])[1] in ("bash", "sh"):
            end = next(j for j in range(i + 2, len(lines)) if lines[j].startswith("```"))
            blocks.append((i + 3, "\n".join(lines[i + 2 : end])))
            i = end
        i += 1
    return blocks


BLOCKS = [(doc, line, body) for doc in DOCS for line, body in runnable_blocks(doc.read_text())]


def test_the_marks_are_found():
    """The reader of marks sees a marked block and passes over an unmarked one; the docs have some."""
    text = "intro\n<!-- runnable: x -->\n```bash\necho hi\n```\n```bash\necho no\n```\n"
    assert runnable_blocks(text) == [(4, "echo hi")]
    assert {doc.name for doc, _, _ in BLOCKS} >= {"evaluation.md", "training.md", "pipeline.md"}


@pytest.mark.parametrize("doc,line,body", BLOCKS, ids=[f"{d.name}:{n}" for d, n, _ in BLOCKS])
def test_runnable_block(doc, line, body, tmp_path):
    for name in ("examples", "evaluation"):
        (tmp_path / name).symlink_to(REPO / name)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PALP_CACHE": str(tmp_path / "cache")}
    out = subprocess.run(["bash", "-euo", "pipefail", "-c", body], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, f"{doc.name}:{line} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"


LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_relative_links_point_into_the_repository():
    broken = []
    for doc in DOCS:
        for target in LINK.findall(doc.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            path = (doc.parent / target).resolve()
            if not path.exists() or REPO.resolve() not in path.parents:
                broken.append(f"{doc.relative_to(REPO)}: {target}")
    assert broken == []
