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

from palp.core import gcs, storage

LOCK_FILE = ".palp.lock"
RELEASE_TIMEOUT_S = 5.0  # per request when releasing a gs:// lock on the way out
log = logging.getLogger(__name__)


class LockError(RuntimeError):
    """The output is being written by another palp process; the message names it."""


def lease_seconds() -> float:
    return float(os.environ.get("PALP_LOCK_LEASE_S", "120"))


def _holder(what: str) -> dict:
    return {"what": what, "host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex}


def _describe(info: dict) -> str:
    return f"{info.get('what', 'palp')} (pid {info.get('pid', '?')} on {info.get('host', '?')})"


class Held:
    """What ``output_lock`` yields. ``check()`` raises LockError once the lock is lost (a gs://
    lease that could not be renewed and was taken over): call it before writing results."""

    def __init__(self, output: str, lost: threading.Event | None = None):
        self.output, self.lost, self.taker = output, lost or threading.Event(), ""

    def check(self) -> None:
        if self.lost.is_set():
            raise LockError(f"lost the lock of {self.output} to {self.taker or 'another palp process'} (its lease could "
                            f"not be renewed in time); stopped so that two writers never mix; rerun with --resume")


@contextlib.contextmanager
def output_lock(output: str | os.PathLike, what: str, *, wait: bool = False):
    """Hold the exclusive lock of ``output`` for the duration of the block; yields a ``Held``."""
    if gcs.is_gcs(output):
        with _gcs_lock(str(output), what, wait=wait) as held:
            yield held
    else:
        with _local_lock(Path(output), what):
            yield Held(str(output))


@contextlib.contextmanager
def _local_lock(folder: Path, what: str):
    import fcntl

    storage.check_folder_output(folder)
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


class _Lease:
    """The lock object of one gs:// output: read, written and deleted with generation preconditions."""

    def __init__(self, output: str, what: str):
        bucket, prefix = gcs.split_gcs(storage.join(output, LOCK_FILE))
        self.output, self.bucket, self.name = output, gcs.gcs_client().bucket(bucket), prefix
        self.me, self.lease = _holder(what), lease_seconds()

    def read(self, **quick) -> tuple[dict, int] | None:
        """(holder, generation) as they are now, or None if there is no lock object. ``quick``:
        the client's ``timeout``/``retry`` for each request (default: the client's own)."""
        from google.api_core.exceptions import NotFound

        blob = self.bucket.get_blob(self.name, **quick)  # fresh metadata: a reused Blob would pin an old generation
        if blob is None:
            return None
        try:
            data = blob.download_as_bytes(**quick)
        except NotFound:  # replaced or deleted since
            return None
        try:
            info = json.loads(data)
        except ValueError:  # not palp's: treat as expired
            info = {}
        return (info if isinstance(info, dict) else {}), int(blob.generation or 0)

    def write(self, generation: int) -> int:
        """Write our lease; 0: only if there is none, else only if it is still ``generation``."""
        blob = self.bucket.blob(self.name)
        blob.upload_from_string(json.dumps({**self.me, "expires": time.time() + self.lease}),
                                content_type="application/json", if_generation_match=generation)
        return int(blob.generation or 0)

    def ours(self, found) -> bool:
        return found is not None and found[0].get("token") == self.me["token"]

    def acquire(self, *, wait: bool) -> int:
        from google.api_core.exceptions import PreconditionFailed

        busy = f"{self.output} is being written by {{}}; wait for it to finish, or use another output"
        for _ in range(5):
            found = self.read()
            if found is None:
                try:
                    self.write(0)
                except PreconditionFailed:  # created since: look again
                    continue
            else:
                info, generation = found
                if info.get("expires", 0) > time.time():
                    if not wait:
                        raise LockError(busy.format(_describe(info)))
                    time.sleep(max(0.0, info["expires"] - time.time()) + min(1.0, self.lease / 10))
                    again = self.read()
                    if again is None:  # released meanwhile
                        continue
                    if (again[1], again[0].get("expires")) != (generation, info.get("expires")):
                        raise LockError(busy.format(_describe(again[0])) + " (its lock was renewed while waiting)")
                log.warning("%s: taking over the expired lock of %s", self.output, _describe(info))
                try:
                    self.write(generation)
                except PreconditionFailed:
                    continue
            held = self.read()
            if self.ours(held):  # (also catches servers that ignore preconditions, such as emulators)
                return held[1]
            raise LockError(busy.format(_describe(held[0]) if held else "another palp process"))
        raise LockError(busy.format("another palp process") + " (the lock kept changing hands)")

    def renew(self, stop: threading.Event, held: Held) -> None:
        from google.api_core.exceptions import PreconditionFailed

        def lost(found) -> None:
            held.taker = _describe(found[0]) if found else "nobody (the lock object is gone)"
            held.lost.set()
            log.error("%s: lost the lock to %s", self.output, held.taker)

        while not stop.wait(self.lease / 3):
            try:
                found = self.read()  # (the precondition below decides; this also serves servers that ignore it)
                if not self.ours(found):
                    return lost(found)
                self.write(found[1])
            except PreconditionFailed:  # our own write whose reply was lost, or someone took the lease over
                found = self.read()
                if not self.ours(found):
                    return lost(found)
            except Exception as e:  # the next renewal tries again; the lease covers two misses
                log.warning("%s: could not renew the lock (%s)", self.output, e)

    def release(self) -> None:
        """Delete our lock object, trying once with a short timeout: in a storage outage (often
        why the run is stopping) the lease expires by itself, and a retried step waits for
        that, rather than this exit waiting out the client's two-minute retries first."""
        quick = {"timeout": RELEASE_TIMEOUT_S, "retry": None}
        found = self.read(**quick)
        if self.ours(found):  # an expired lease someone took over is theirs now
            self.bucket.blob(self.name).delete(if_generation_match=found[1] or None, **quick)


@contextlib.contextmanager
def _gcs_lock(output: str, what: str, *, wait: bool):
    from google.api_core.exceptions import GoogleAPIError

    lease = _Lease(output, what)
    try:
        lease.acquire(wait=wait)
    except GoogleAPIError as e:  # 403, an outage that outlasted the client's retries, ...
        raise gcs.StorageError(f"cannot take the lock {storage.join(output, LOCK_FILE)}: {type(e).__name__}: {e}") from e
    held, stop = Held(output), threading.Event()
    thread = threading.Thread(target=lease.renew, args=(stop, held), name="palp-lock", daemon=True)
    thread.start()
    try:
        yield held
    finally:
        stop.set()
        thread.join(RELEASE_TIMEOUT_S)  # a renewal caught in an outage's retries is not waited for
        try:
            lease.release()
        except Exception as e:  # it expires by itself
            log.warning("%s: could not release the lock (%s); it expires in %.0f s", output, e, lease.lease)
