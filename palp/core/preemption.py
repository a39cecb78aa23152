"""Stopping when a cluster asks: SIGTERM (a preempted VM, a deleted pod) and SIGINT (Ctrl-C).

Vertex AI and Kubernetes send SIGTERM and wait a grace period (30 s by default on GKE) before
SIGKILL. Python's default for SIGTERM is to die at once, skipping every ``finally``: a training
loses the steps since its last checkpoint and a gs:// output keeps its lock object until the
lease expires. Inside :class:`StopRequests` a signal is recorded instead:

- ``palp train`` finishes the step it is on, writes (and pushes) a checkpoint at that step and
  stops with :class:`Preempted`; its lock is released on the way out.
- ``palp sample`` (``immediate=True``) stops at once with :class:`Preempted`: its finished
  images are complete files (each written atomically) and its lock is released.

A second signal while the first is being honoured stops at once. The command then exits with
``128 + the signal's number`` (143 for SIGTERM, 130 for SIGINT), the shell's convention for a
process ended by a signal; KFP and Vertex retry any non-zero exit, and the retried step resumes.
"""

from __future__ import annotations

import signal
import threading

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(BaseException):
    """The command was asked to stop by a signal; the message says what was kept. A
    BaseException, like KeyboardInterrupt: no ``except Exception`` on the way out (a loader
    that turns any failure into a user error, a retry) may take it for something else."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopRequests:
    """Records SIGTERM/SIGINT while active (in the main thread; elsewhere it records nothing and
    the default handlers stay). ``immediate``: raise :class:`Preempted` from the handler."""

    def __init__(self, what: str, *, immediate: bool = False):
        self.what, self.immediate = what, immediate
        self.signum: int | None = None
        self._old: dict = {}

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)
        self._old.clear()

    def _handle(self, signum, frame) -> None:
        first = self.signum is None
        self.signum = signum
        if self.immediate or not first:
            raise self.preempted()

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def preempted(self, detail: str = "") -> Preempted:
        """The Preempted to raise: '<what> stopped by SIGTERM<detail>' (SIGTERM where no signal
        came here but another process was asked)."""
        signum = self.signum or signal.SIGTERM
        return Preempted(signum, f"{self.what} stopped by {signal.Signals(signum).name}{detail}")
