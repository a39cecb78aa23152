"""Subject images: read, check, centre-crop and resize to the model's resolution."""

from __future__ import annotations

import io
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
# The most pixels an image may have (8192 x 8192 by default; PALP_MAX_IMAGE_PIXELS overrides):
# a 109 KB PNG can claim 30000 x 30000 and decode to gigabytes.
DEFAULT_MAX_IMAGE_PIXELS = 8192 * 8192
_OPEN_LOCK = threading.Lock()


class SubjectImageError(ValueError):
    """An image (or a subject image folder) that cannot be used; the message names the file and the fix."""


@dataclass
class SubjectImages:
    placeholder: str
    paths: list[Path]
    pixels: torch.Tensor  # (N, 3, R, R) in [-1, 1]


def list_image_files(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise SubjectImageError(f"subject image folder {folder} does not exist or is not a folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise SubjectImageError(f"subject image folder {folder} is empty; put 1-5 photos of the subject in it")
    return files


class ImageRejected(SubjectImageError):
    """One file that cannot be used; ``reason`` is the short fate shown in reports."""

    def __init__(self, name: str, reason: str, fix: str):
        super().__init__(f"{name} {reason}; {fix}")
        self.reason = reason


def max_image_pixels() -> int:
    return int(os.environ.get("PALP_MAX_IMAGE_PIXELS", DEFAULT_MAX_IMAGE_PIXELS))


def open_image(source: Path | bytes, *, name: str) -> Image.Image:
    """``Image.open`` (it reads only the header), refused over the pixel limit before decoding.

    Raises ImageRejected (over the limit), or Pillow's errors for unreadable files.
    """
    # Pillow's own check warns above 89 Mpx and fails above 179 Mpx without naming the file;
    # it is off while opening (the lock: it is a module setting) and palp's limit applies instead.
    with _OPEN_LOCK:
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            im = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        finally:
            Image.MAX_IMAGE_PIXELS = saved
    (w, h), limit = im.size, max_image_pixels()
    if w * h > limit:
        im.close()
        raise ImageRejected(name, f"is {w}x{h} = {w * h:,} pixels, over the limit of {limit:,} pixels",
                            "use a smaller image (or raise PALP_MAX_IMAGE_PIXELS)")
    return im


def decode_rgb(source: Path | bytes, *, name: str, min_size: int) -> Image.Image:
    """Decode fully, apply the EXIF orientation, convert to RGB (CMYK, palette, alpha, 16-bit).

    Raises ImageRejected for non-images, corrupt or truncated files, too-large and too-small images.
    """
    try:
        with open_image(source, name=name) as im:
            im.load()  # decode everything now: truncated files fail here, not later
            im = ImageOps.exif_transpose(im)
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                im = im.convert("RGBA")
                background = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(background, im)  # transparent -> white
            elif im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float64)
                im = Image.fromarray((255 * arr / max(arr.max(), 1)).astype(np.uint8))
            rgb = im.convert("RGB")
    except ImageRejected:
        raise
    except UnidentifiedImageError as e:
        raise ImageRejected(name, "is not a readable image (not an image file)", "remove or replace it") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageRejected(name, f"is not a readable image (corrupt or truncated: {e})", "remove or replace it") from e
    if min(rgb.size) < min_size:
        raise ImageRejected(
            name, f"is {rgb.size[0]}x{rgb.size[1]}, below the minimum side of {min_size} px",
            "use a larger photo (or lower --min-image-size)",
        )
    return rgb


def open_rgb(path: Path, *, min_size: int) -> Image.Image:
    return decode_rgb(path, name=str(path), min_size=min_size)


def read_image(uri: str) -> Image.Image:
    """An image palp wrote itself (a sample, a prepared image) at a local path or gs:// URI, as
    RGB; one that is unreadable (a truncated write, a replaced file) is an error naming it."""
    from palp.core import storage

    fix = "delete it and rerun the palp step that wrote it (a sample: `palp sample` into the same --output)"
    try:
        with open_image(storage.read_bytes(uri), name=uri) as im:
            return im.convert("RGB")
    except ImageRejected:
        raise  # over the pixel limit: its own fix
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise SubjectImageError(f"{uri} is not a readable image ({type(e).__name__}: {e}); {fix}") from e


def center_square(im: Image.Image, size: int) -> Image.Image:
    side = min(im.size)
    left, top = (im.size[0] - side) // 2, (im.size[1] - side) // 2
    return im.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)


def to_tensor(im: Image.Image) -> torch.Tensor:
    arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0  # (R, R, 3) in [-1, 1]
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def load_subject_images(placeholder: str, folder: str | Path, *, resolution: int, min_size: int | None = None) -> SubjectImages:
    """All images of one subject folder, strictly: any bad file is an error naming it."""
    min_size = resolution // 2 if min_size is None else min_size
    files = list_image_files(folder)
    pixels = [to_tensor(center_square(open_rgb(p, min_size=min_size), resolution)) for p in files]
    return SubjectImages(placeholder, files, torch.stack(pixels))
