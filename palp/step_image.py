"""``palp image build``: the step image from images/Dockerfile, tagged with the package version.

The build context is assembled in a temporary folder from exactly what the image needs, so
nothing else of the working tree (runs, caches, credentials) can leak into it. Builds use
the host network (``--network host``): package sources may be a wheelhouse on 127.0.0.1.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from palp import __version__

REPO = Path(__file__).resolve().parents[1]
PALP_LABEL = "org.opencontainers.image.title=palp"  # on every stage of images/Dockerfile
CONTEXT_PARTS = ("pyproject.toml", "README.md", "palp", "components", "pipelines", "evaluation", "images/Dockerfile")


@dataclass(frozen=True)
class Target:
    base_image: str
    extra: str  # the pyproject.toml extra that pins torch for this target


TARGETS = {
    "cpu": Target("python:3.11-slim-bookworm", "cpu"),
    "gpu": Target("python:3.11-slim-bookworm", "gpu"),
    "tpu": Target("python:3.11-slim-bookworm", "tpu"),
}


class ImageError(RuntimeError):
    """An image that cannot be built; the message says why."""


def default_tag(target: str) -> str:
    return f"palp-{target}:{__version__}"


def build_context(dest: Path, *, ca_bundle: str | None = None) -> Path:
    """Copy what the Dockerfile needs into ``dest`` (plus an optional CA bundle for pip)."""
    for part in CONTEXT_PARTS:
        src = REPO / part
        if not src.exists():
            raise ImageError(f"{src} is missing: build from a palp source checkout")
        target = dest / part
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, target)
    (dest / "images" / "ca").mkdir(parents=True, exist_ok=True)
    if ca_bundle:
        shutil.copyfile(ca_bundle, dest / "images" / "ca" / "bundle.crt")
    return dest


def build_command(target: str, context: Path, *, tag: str, base_image: str | None = None, index_url: str | None = None,
                  extra_index_urls: list[str] | None = None, trusted_hosts: list[str] | None = None,
                  find_links: list[str] | None = None) -> list[str]:
    if target not in TARGETS:
        raise ImageError(f"--target must be one of {', '.join(TARGETS)}, not {target!r}")
    spec = TARGETS[target]
    args = {
        "BASE_IMAGE": base_image or spec.base_image, "PALP_EXTRA": spec.extra, "PALP_VERSION": __version__,
        "PIP_INDEX_URL": index_url or "", "PIP_EXTRA_INDEX_URL": " ".join(extra_index_urls or []),
        "PIP_TRUSTED_HOST": " ".join(trusted_hosts or []), "PIP_FIND_LINKS": " ".join(find_links or []),
    }
    cmd = ["docker", "build", "--network", "host", "-f", str(context / "images" / "Dockerfile"), "-t", tag]
    for key, value in args.items():
        cmd += ["--build-arg", f"{key}={value}"]
    return cmd + [str(context)]


def build(target: str = "cpu", *, tag: str | None = None, base_image: str | None = None, index_url: str | None = None,
          extra_index_urls: list[str] | None = None, trusted_hosts: list[str] | None = None,
          find_links: list[str] | None = None, ca_bundle: str | None = None, quiet: bool = False,
          prune: bool = True) -> str:
    """Build the image; returns its tag. ``prune`` removes untagged palp images (earlier builds)."""
    if shutil.which("docker") is None:
        raise ImageError("docker is not installed (or not on PATH)")
    tag = tag or default_tag(target)
    with tempfile.TemporaryDirectory(prefix="palp-image-") as tmp:
        context = build_context(Path(tmp), ca_bundle=ca_bundle)
        cmd = build_command(target, context, tag=tag, base_image=base_image, index_url=index_url,
                            extra_index_urls=extra_index_urls, trusted_hosts=trusted_hosts, find_links=find_links)
        result = subprocess.run(cmd, stdout=subprocess.PIPE if quiet else None, stderr=subprocess.STDOUT if quiet else None, text=True)
        if result.returncode != 0:
            tail = (result.stdout or "")[-4000:] if quiet else ""
            raise ImageError(f"docker build of {tag} failed (exit {result.returncode}){': ' + tail if tail else ''}")
    if prune:  # earlier builds of palp images, now untagged: several GB each
        subprocess.run(["docker", "image", "prune", "--force", "--filter", f"label={PALP_LABEL}"], capture_output=True)
    return tag
