"""One writer per output: an exclusive lock on a run's (or a sampling job's) output folder.

Two ``palp train`` into one ``--output`` would mix their checkpoints and results, and a later
``--resume`` would continue whichever wrote last; two ``palp sample`` would interleave their
tables. So each holds ``OUTPUT/.palp.lock`` while it writes, and a second writer gets one error
that names the holder.

- **Local folders**: ``flock`` on the lock file. The OS releases it when the holder exits, even
  on SIGKILL, so a killed run never leaves a stale lock.
- **gs://**: a lock object created with the precondition ``ifGenerationMatch=0`` (it succeeds
  only if no lock object exists; GCS decides, so two machines cannot both win). Nothing releases
  a lock when its holder's machine disappears (preemption), so the lock is a lease: the holder
  rewrites it every ``lease/3`` seconds (each rewrite conditioned on the generation it last
  wrote) and deletes it on exit. A lease that has expired may be taken over, again with a
  generation precondition. With ``wait``, a writer that finds a live lease waits for it to
  expire once: a holder that renews it meanwhile is alive (error); one that does not is gone.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from palp import storage

LOCK_FILE = ".palp.lock"
log = logging.getLogger(__name__)


class LockError(RuntimeError):
    """The output is being written by another palp process; the message names it."""


def lease_seconds() -> float:
    return float(os.environ.get("PALP_LOCK_LEASE_S", "120"))


def _holder(what: str) -> dict:
    return {"what": what, "host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex}


def _describe(info: dict) -> str:
    return f"{info.get('what', 'palp')} (pid {info.get('pid', '?')} on {info.get('host', '?')})"


@contextlib.contextmanager
def output_lock(output: str | os.PathLike, what: str, *, wait: bool = False):
    """Hold the exclusive lock of ``output`` for the duration of the block."""
    if storage.is_gcs(output):
        with _gcs_lock(str(output), what, wait=wait):
            yield
    else:
        with _local_lock(Path(output), what):
            yield


@contextlib.contextmanager
def _local_lock(folder: Path, what: str):
    import fcntl

    if folder.exists() and not folder.is_dir():
        raise LockError(f"--output {folder} is a file; give a folder")
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            info = _read_local(fd)
            os.close(fd)
            raise LockError(f"{folder} is being written by {_describe(info)}; wait for it to finish, "
                            f"or use another output") from None
        except OSError as e:  # a file system without locks (some FUSE mounts): go on unguarded
            log.warning("%s: cannot lock (%s); not guarded against a concurrent writer", folder, e)
        # The file may have been removed (below) between our open and our lock: lock the new one.
        if path.exists() and os.stat(path).st_ino == os.fstat(fd).st_ino:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_holder(what)).encode(), 0)
        yield
    finally:
        # An output this call created and left empty (bad input stopped it) is removed again.
        if created and [p.name for p in folder.iterdir()] == [LOCK_FILE]:
            path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                folder.rmdir()
        os.close(fd)  # releases the flock


def _read_local(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {}


@contextlib.contextmanager
def _gcs_lock(output: str, what: str, *, wait: bool):
    from google.api_core.exceptions import NotFound, PreconditionFailed

    blob = storage._blob(storage.join(output, LOCK_FILE))
    lease = lease_seconds()
    me = _holder(what)

    def write(generation: int) -> None:  # 0: only if absent; else: only if still that generation
        body = json.dumps({**me, "expires": time.time() + lease})
        blob.upload_from_string(body, content_type="application/json", if_generation_match=generation)

    def current() -> tuple[dict, int] | None:
        try:
            return json.loads(blob.download_as_bytes()), int(blob.generation or 0)
        except NotFound:
            return None

    if current() is not None:  # (servers that ignore preconditions, such as emulators, stop here too)
        _take_over(output, current, write, wait=wait, lease=lease)
    else:
        try:
            write(0)
        except PreconditionFailed:  # another writer created it since
            _take_over(output, current, write, wait=wait, lease=lease)
    held = current()
    if held is None or held[0].get("token") != me["token"]:  # a precondition the server does not enforce
        raise LockError(f"{output} is being written by {_describe(held[0]) if held else 'another palp process'}; "
                        f"wait for it to finish, or use another output")

    stop = threading.Event()

    def renew():
        generation = held[1]
        while not stop.wait(lease / 3):
            try:
                write(generation)
                generation = int(blob.generation or 0)
            except Exception as e:  # the next renewal tries again; the lease covers two misses
                log.warning("%s: could not renew the lock (%s)", output, e)

    thread = threading.Thread(target=renew, name="palp-lock", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        with contextlib.suppress(Exception):  # an expired lease someone took over is theirs now
            now = current()
            if now and now[0].get("token") == me["token"]:
                blob.delete(if_generation_match=now[1] or None)


def _take_over(output: str, current, write, *, wait: bool, lease: float) -> None:
    from google.api_core.exceptions import PreconditionFailed

    found = current()
    if found is None:
        return write(0)
    info, generation = found
    if info.get("expires", 0) > time.time():
        if not wait:
            raise LockError(f"{output} is being written by {_describe(info)}; wait for it to finish, or use another output")
        time.sleep(max(0.0, info["expires"] - time.time()) + min(1.0, lease / 10))
        again = current()
        if again is not None and (again[1], again[0].get("expires")) != (generation, info.get("expires")):
            raise LockError(f"{output} is being written by {_describe(again[0])} (its lock was renewed while waiting); "
                            f"wait for it to finish, or use another output")
    log.warning("%s: taking over the expired lock of %s", output, _describe(info))
    try:
        write(generation)
    except PreconditionFailed:
        raise LockError(f"{output}: another palp process took the expired lock first; use another output") from None
