"""Local paths and ``gs://`` URIs: the one layer every step reads and writes through.

Each function takes a local path or a gs:// URI. Local writes are atomic (temp file +
rename); a GCS object becomes visible only once its upload completed, and a folder upload
writes its marker file (e.g. ``manifest.json``) last, so a reader that waits for the marker
never sees a half-written folder as finished. Transient failures are retried with exponential
backoff. The GCS side (URIs, the client, its credentials, the retry policy, object
generations, signed URLs) is ``palp.core.gcs``, imported from there.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from palp.core import gcs

log = logging.getLogger(__name__)


class DiskFullError(gcs.StorageError):
    """A write ran out of space; the message names where, and what was kept."""


def is_disk_full(e: BaseException) -> bool:
    """An OSError ENOSPC/EDQUOT, or a safetensors error that wraps one (it reports I/O errors
    as text)."""
    import errno

    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return type(e).__name__ == "SafetensorError" and ("No space left" in str(e) or "Disk quota" in str(e))


def disk_full_error(e: BaseException, where: str | os.PathLike, *, needed: int | None = None, kept: str = "") -> DiskFullError:
    """The one-line error for a full disk while writing ``where``."""
    import shutil as _shutil

    try:
        free = _shutil.disk_usage(Path(where).parent if not Path(where).exists() else where).free
        space = f" ({free / 2**20:.1f} MB free"
        space += f", about {needed / 2**20:.1f} MB needed)" if needed else ")"
    except OSError:
        space = f" (about {needed / 2**20:.1f} MB needed)" if needed else ""
    return DiskFullError(f"no space left on the device while writing {getattr(e, 'filename', None) or where}{space}; "
                         f"free some space or choose another output{'; ' + kept if kept else ''}")


def join(base: str | os.PathLike, *parts: str) -> str:
    """Join path parts onto a local path or a gs:// URI."""
    if gcs.is_gcs(base):
        return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(base).joinpath(*parts))


def is_under(path: str | os.PathLike, root: str | os.PathLike) -> bool:
    """Whether ``path`` is ``root`` or inside it (local paths resolved; gs:// by prefix)."""
    if gcs.is_gcs(path) or gcs.is_gcs(root):
        p, r = str(path).rstrip("/"), str(root).rstrip("/")
        return gcs.is_gcs(path) and gcs.is_gcs(root) and (p == r or p.startswith(r + "/"))
    return Path(path).resolve().is_relative_to(Path(root).resolve())


def join_under(root: str | os.PathLike, *parts: str) -> str:
    """``join(root, *parts)``, refused with a StorageError when it would leave ``root``
    (``..``, an absolute part, a link out): names from users must not write elsewhere."""
    path = join(root, *parts)
    if gcs.is_gcs(root):
        escapes = any(seg in ("", ".", "..") for part in parts for seg in part.strip("/").split("/"))
    else:
        escapes = not is_under(path, root)
    if escapes:
        raise gcs.StorageError(f"{'/'.join(parts)} would be written outside {root}; refused")
    return path


def check_folder_output(uri: str | os.PathLike, flag: str = "--output") -> None:
    """Refuse an output that is an existing local file (every write under it would fail late)."""
    if not gcs.is_gcs(uri) and Path(uri).exists() and not Path(uri).is_dir():
        raise gcs.StorageError(f"{flag} {uri} is a file; give a folder (new or existing)")


# -- the API every step uses ----------------------------------------------------------------

@gcs.with_retries
def read_bytes(uri: str | os.PathLike) -> bytes:
    if not gcs.is_gcs(uri):
        try:
            return Path(uri).read_bytes()
        except FileNotFoundError as e:
            raise gcs.not_found(str(uri), e) from e
    from google.api_core.exceptions import NotFound

    try:
        return gcs.blob(str(uri)).download_as_bytes(retry=gcs.retry_policy())
    except NotFound as e:
        raise gcs.not_found(str(uri), e) from e


def read_text(uri: str | os.PathLike) -> str:
    return read_bytes(uri).decode("utf-8")


@gcs.with_retries
def write_bytes(uri: str | os.PathLike, data: bytes, *, content_type: str | None = None) -> None:
    """Write a whole file: atomically on disk; as one upload (visible only when complete) on GCS."""
    if gcs.is_gcs(uri):
        # Re-uploading the same bytes is harmless, so uploads are retried like reads.
        gcs.blob(str(uri)).upload_from_string(data, content_type=content_type, retry=gcs.retry_policy())
        return
    path = Path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(uri: str | os.PathLike, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"), content_type="text/plain; charset=utf-8")


@gcs.with_retries
def exists(uri: str | os.PathLike) -> bool:
    if gcs.is_gcs(uri):
        return gcs.blob(str(uri)).exists(retry=gcs.retry_policy())
    return Path(uri).exists()


@gcs.with_retries
def list_files(uri: str | os.PathLike, *, recursive: bool = False) -> list[str]:
    """Names of the files under a folder or prefix, relative to it, sorted. Hidden files are skipped."""
    if gcs.is_gcs(uri):
        bucket, prefix = gcs.split_gcs(str(uri))
        prefix = prefix.rstrip("/") + "/" if prefix else ""
        blobs = gcs.gcs_client().list_blobs(bucket, prefix=prefix, delimiter=None if recursive else "/", retry=gcs.retry_policy())
        names = [b.name[len(prefix) :] for b in blobs if not b.name.endswith("/")]
    else:
        root = Path(uri)
        if not root.is_dir():
            raise gcs.StorageError(f"{uri} does not exist or is not a folder")
        found = root.rglob("*") if recursive else root.iterdir()
        names = [str(p.relative_to(root)) for p in found if p.is_file()]
    return sorted(n for n in names if not any(part.startswith(".") for part in Path(n).parts))


def file_digest(path: str | Path) -> str:
    """The sha256 (hex) of a local file's bytes, read in chunks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def folder_digest(path: str | Path, names: Iterable[str] | None = None) -> str:
    """The sha256 (hex) of a local folder's contents: every file's relative name and bytes
    (``names``: only those files; default: every file, hidden names skipped). The same files
    give the same digest on any machine, whatever their timestamps or the folder's path."""
    import hashlib

    root = Path(path)
    names = sorted(names) if names is not None else list_files(root, recursive=True)
    h = hashlib.sha256()
    for name in names:
        h.update(f"{name}\0{file_digest(root / name)}\n".encode())
    return h.hexdigest()


def versions_digest(versions: dict[str, int | str]) -> str:
    """The sha256 (hex) of a {name: generation or digest} listing."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(versions, sort_keys=True).encode()).hexdigest()


@gcs.with_retries
def remove_tree(uri: str | os.PathLike, *, first: Iterable[str] = ()) -> None:
    """Delete a folder or every object under a prefix; the names in ``first`` (a marker such as
    ``state.json``) go first, so a half-deleted folder never looks complete."""
    if not gcs.is_gcs(uri):
        shutil.rmtree(uri, ignore_errors=True)
        return
    from google.api_core.exceptions import NotFound

    bucket, prefix = gcs.split_gcs(str(uri))
    prefix = prefix.rstrip("/") + "/"
    blobs = list(gcs.gcs_client().list_blobs(bucket, prefix=prefix, retry=gcs.retry_policy()))
    blobs.sort(key=lambda b: b.name[len(prefix) :] not in set(first))
    for b in blobs:
        with contextlib.suppress(NotFound):  # deleted by an earlier attempt
            b.delete(retry=gcs.retry_policy())


# Names of palp's own temporaries: tempfile's ``.<name>.<8 random chars>`` (write_bytes,
# atomic_directory) and export_weights' ``.export.<8 random chars>``.
_TEMP_RE = re.compile(r"\..+\.[a-z0-9_]{8}")


def remove_stale_temporaries(out: str | os.PathLike) -> list[str]:
    """Delete the temporaries a killed run left in a local run folder: in it, its checkpoints/,
    snapshots/ and each snapshot (export_weights writes into those).

    Call only while holding the output (at the start of a run): a live writer's temporaries
    match too. Returns what was removed.
    """
    out, removed = Path(out), []
    snapshots = sorted(p for p in (out / "snapshots").glob("step-*") if p.is_dir())
    for folder in [out, out / "checkpoints", out / "snapshots", *snapshots]:
        for p in folder.iterdir() if folder.is_dir() else []:
            if _TEMP_RE.fullmatch(p.name):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
                removed.append(str(p))
    if removed:
        log.info("removed %d stale temporaries of an interrupted run: %s", len(removed), ", ".join(removed))
    return removed


@contextlib.contextmanager
def atomic_directory(dest: str | Path, *, replace: bool = False):
    """Yield a temporary folder beside ``dest`` that becomes ``dest`` by one rename on success.

    Readers see the whole folder or none of it. With ``replace`` an existing ``dest`` is
    swapped out: renamed aside to ``.<name>.old`` (a stale one from an interrupted swap is
    dropped first), deleted only once the new folder is in its place, and put back if that
    rename fails. Without, a ``dest`` that a concurrent writer completed first is kept.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    old = None
    try:
        yield tmp
        if replace and dest.exists():
            old = dest.with_name(f".{dest.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            dest.rename(old)
        try:
            tmp.rename(dest)
        except OSError:
            if not dest.exists():
                if old is not None:
                    old.rename(dest)
                raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def download_prefix(uri: str, dest: str | Path) -> Path:
    """Copy every object under ``gs://bucket/prefix/`` into ``dest``, atomically.

    ``dest`` appears only once the whole tree is there, so an interrupted download is never
    mistaken for a complete one; an existing ``dest`` is reused as a cache.
    """
    dest = Path(dest)
    if dest.exists():
        return dest
    names = list_files(uri, recursive=True)
    if not names:
        raise gcs.StorageError(f"nothing found under {uri}; check the bucket and prefix")
    with atomic_directory(dest) as tmp:
        for name in names:
            write_bytes(tmp / name, read_bytes(join(uri, name)))
    return dest


def cache_dir(uri: str, *, cache: str | Path, kind: str) -> Path:
    """The local cache folder for a gs:// URI: ``cache/kind/<hash of the URI>``."""
    import hashlib

    return Path(cache) / kind / hashlib.sha256(str(uri).rstrip("/").encode()).hexdigest()[:16]


def local_dir(uri: str | os.PathLike, *, cache: str | Path) -> Path:
    """A local folder with the contents of ``uri``: the folder itself, or a cached download."""
    if not gcs.is_gcs(uri):
        return Path(uri)
    return download_prefix(str(uri), cache_dir(str(uri), cache=cache, kind="gcs"))


def upload_dir(local: str | Path, uri: str, *, last: Iterable[str] = ()) -> None:
    """Copy a local folder to a folder or prefix; the files named in ``last`` go last."""
    local = Path(local)
    names = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())
    last = [n for n in last if n in names]
    for name in [n for n in names if n not in last] + last:
        write_bytes(join(uri, name), (local / name).read_bytes())
