"""Self-contained HTML pages: images embedded as ``data:`` URIs, shown as thumbnails.

Every page palp writes (a run's page, the score report, the study's analysis) embeds its
images this way and has no scripts, stylesheets or links to anything outside itself, so it
renders inside a sandboxed iframe (a pipeline UI's HTML view).
"""

from __future__ import annotations

import base64
import io

from PIL import Image

from palp.core.subject_images import read_image

THUMB = 160


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def thumbnail(uri: str, size: int = THUMB) -> str:
    im = read_image(uri)
    im.thumbnail((size, size))
    factor = size // max(im.size)
    if factor >= 2:  # small images (the toy world's 64 px) are shown enlarged, pixels kept sharp
        im = im.resize((im.width * factor, im.height * factor), Image.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85)
    return data_uri(buf.getvalue(), "image/jpeg")
