"""One training in N processes on one machine: what the pipeline's train step does when it is
given N accelerators (one process per GPU, or N CPU processes over gloo).

``train_in_processes`` with one process calls :func:`palp.steps.train.train` in this process;
with more it starts ``torch.distributed.run --standalone`` (rendezvous on this machine only)
over this module, each process reading the same settings file and calling ``train``. The
global batch is split across the processes and the first one alone holds the output's lock and
writes (docs/training.md, "Devices"). A SIGTERM or SIGINT sent here is passed on to the
launcher, which passes it to every process: each finishes its step and the run checkpoints, as
a single process does (palp/core/preemption.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from palp.core.cache import cache_root
from palp.core.preemption import SIGNALS, Preempted
from palp.core.settings import ConfigError, TrainConfig

DEFAULT_PROCESSES = 1


class LaunchError(RuntimeError):
    """The processes of a multi-process training did not all finish; the message says how."""


def launch_command(settings_file: str | Path, processes: int, *, resume: bool, progress: bool) -> list[str]:
    """The command that trains the settings in ``settings_file`` in ``processes`` processes."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
            "-m", "palp.steps.launch", str(settings_file), *(["--resume"] if resume else []),
            *(["--progress"] if progress else [])]


def train_in_processes(cfg: TrainConfig, processes: int = DEFAULT_PROCESSES, *, resume: bool = False, progress: bool = True) -> None:
    """Train ``cfg`` in ``processes`` processes on this machine (1: in this process).

    Raises :class:`Preempted` when a signal stopped the run (its checkpoints are kept; exit
    with its ``exit_code``), :class:`LaunchError` when a process failed."""
    if not isinstance(processes, int) or isinstance(processes, bool) or processes < 1:
        raise ConfigError(f"the number of training processes must be a whole number >= 1, not {processes!r}")
    if processes == 1:
        from palp.steps.train import train

        train(cfg, resume=resume, progress=progress)
        return
    if os.environ.get("PJRT_DEVICE"):
        raise ConfigError(f"{processes} training processes on an XLA device (PJRT_DEVICE={os.environ['PJRT_DEVICE']}) "
                          "are not offered: train with 1 process there")
    cfg.accumulation(processes)  # an indivisible batch is refused here, once, not by every process
    with tempfile.TemporaryDirectory(prefix="palp-launch-") as folder:
        settings = Path(folder, "training.json")
        settings.write_text(json.dumps(cfg.to_dict()))
        # In a session of its own: a Ctrl-C in a terminal reaches the processes once, through
        # this process and the launcher, not also directly (a second signal stops a process at once).
        # One cache for the machine's processes, as they share its disk (a PALP_CACHE with a
        # {process} field would otherwise give each its own).
        env = dict(os.environ, PALP_CACHE=str(cache_root()))
        proc = subprocess.Popen(launch_command(settings, processes, resume=resume, progress=progress), env=env,
                                start_new_session=True)
        received: list[int] = []

        def forward(signum, frame):
            received.append(signum)
            proc.send_signal(signum)

        main_thread = threading.current_thread() is threading.main_thread()  # handlers can be set there only
        old = {s: signal.signal(s, forward) for s in SIGNALS} if main_thread else {}
        try:
            code = proc.wait()
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)
    if received:
        name = signal.Signals(received[0]).name
        raise Preempted(received[0], f"palp train ({processes} processes) stopped by {name}: the run keeps its checkpoints")
    if code:
        raise LaunchError(f"palp train in {processes} processes failed (the launcher exited with {code}); "
                          "each process's error is printed above")


def _main(argv: list[str]) -> int:
    from palp.steps.train import train

    settings, flags = argv[0], set(argv[1:])
    cfg = TrainConfig.from_dict(json.loads(Path(settings).read_text()))
    try:
        train(cfg, resume="--resume" in flags, progress="--progress" in flags)
    except Preempted as e:
        print(e, file=sys.stderr, flush=True)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
