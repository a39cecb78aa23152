"""scripts/test.sh, the README's test command, where it cannot provide the image tests' Docker
engine and debootstrap: it stops at once, says what is missing and how to run the rest."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from conftest import REPO

SCRIPT = REPO / "scripts" / "test.sh"
WITHOUT_IMAGES = "bash scripts/test.sh --deselect tests/test_images.py"
TOOLS = ("bash", "id", "dirname", "realpath", "seq", "sleep", "tail", "tr")  # what the script runs besides docker & co


@pytest.fixture()
def bare_path(tmp_path) -> str:
    """A PATH with the script's shell tools only: no docker, dockerd, debootstrap or apt-get."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in TOOLS:
        (bin_dir / tool).symlink_to(shutil.which(tool))
    return str(bin_dir)


def _run(args, path: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], env={**os.environ, "PATH": path}, cwd=REPO, capture_output=True,
                          text=True, timeout=120, **kwargs)


def test_no_docker_and_no_apt_stops_at_once_saying_what_is_missing(bare_path):
    result = _run([], bare_path)
    assert result.returncode == 2 and result.stdout == ""  # pytest never started
    assert result.stderr.count("\n") == 1, result.stderr
    message = result.stderr
    assert "tests/test_images.py needs the docker CLI, a Docker engine (dockerd) and debootstrap" in message
    assert "no apt-get to install them" in message and WITHOUT_IMAGES in message


def test_without_the_image_tests_nothing_is_needed(bare_path):
    for args in (["--deselect", "tests/test_images.py"], ["tests/test_names.py"]):
        result = _run([*args, "--version"], bare_path)  # pytest --version: the script got as far as pytest
        assert result.returncode == 0, result.stderr
        assert "no Docker engine needed" in result.stderr and "pytest" in result.stdout + result.stderr
    result = _run(["tests/", "--version"], bare_path)  # a path that holds the image tests needs them
    assert result.returncode == 2 and "needs the docker CLI" in result.stderr


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root to drop to another user")
def test_not_root_says_installing_or_starting_needs_root():
    """As an unprivileged user (the script's copy in a world-readable folder), with the tools of
    this machine: whatever is missing, installing it or starting dockerd needs root."""
    copy = Path(tempfile.mkdtemp(prefix="palp-test-script-"))  # pytest's tmp_path is readable by root only
    try:
        (copy / "scripts").mkdir()
        (copy / "tests").mkdir()
        shutil.copy(SCRIPT, copy / "scripts" / "test.sh")
        (copy / "tests" / "test_images.py").touch()
        for p in [copy, *copy.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
        result = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "bash",
                                 str(copy / "scripts" / "test.sh")], capture_output=True, text=True, timeout=120)
    finally:
        shutil.rmtree(copy)
    if result.returncode == 0:
        pytest.skip("this machine has a Docker engine and debootstrap that an unprivileged user can use")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "needs root" in result.stderr and WITHOUT_IMAGES in result.stderr
