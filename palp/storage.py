"""Local paths and ``gs://`` URIs.

The seam every step reads and writes through. Google Cloud Storage goes through the real
``google-cloud-storage`` client: credentials come from the environment (Application Default
Credentials, or ``STORAGE_EMULATOR_HOST`` for the emulator) and are never logged.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

GS = "gs://"


class StorageError(RuntimeError):
    """A storage location that cannot be read or written; the message names it."""


def is_gcs(uri: str | os.PathLike) -> bool:
    return str(uri).startswith(GS)


def split_gcs(uri: str) -> tuple[str, str]:
    """``gs://bucket/a/b`` -> ("bucket", "a/b")."""
    if not is_gcs(uri):
        raise StorageError(f"{uri!r} is not a gs:// URI")
    bucket, _, prefix = uri[len(GS) :].partition("/")
    if not bucket:
        raise StorageError(f"{uri!r} names no bucket; write gs://BUCKET/PATH")
    return bucket, prefix


def gcs_client():
    from google.cloud import storage

    if os.environ.get("STORAGE_EMULATOR_HOST"):
        from google.auth.credentials import AnonymousCredentials

        return storage.Client(project=os.environ.get("GOOGLE_CLOUD_PROJECT", "palp"), credentials=AnonymousCredentials())
    return storage.Client()


def download_prefix(uri: str, dest: str | Path) -> Path:
    """Copy every object under ``gs://bucket/prefix/`` into ``dest``, atomically.

    ``dest`` appears only once the whole tree is there, so an interrupted download is never
    mistaken for a complete one; an existing ``dest`` is reused as a cache.
    """
    dest = Path(dest)
    if dest.exists():
        return dest
    bucket_name, prefix = split_gcs(uri)
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    client = gcs_client()
    blobs = [b for b in client.list_blobs(bucket_name, prefix=prefix) if not b.name.endswith("/")]
    if not blobs:
        raise StorageError(f"nothing found under {uri}; check the bucket and prefix")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        for blob in blobs:
            target = tmp / blob.name[len(prefix) :]
            target.parent.mkdir(parents=True, exist_ok=True)
            blob.download_to_filename(str(target))
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
