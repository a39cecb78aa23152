"""What a local run prints: one line per task as it starts and one as it ends, each task's
whole output in a log file under the pipeline root, and a failed task's own error.

kfp.local sends everything to the console: its log records (through a root-logger handler
it installs around each task, on ``sys.stdout``), its warnings (``sys.stderr``) and every
line of the task's process or container, which the thread running the task reads and
passes to ``print``. So ``sys.stdout`` and ``sys.stderr`` are the one funnel, and
``kfp.local.task_dispatcher.run_single_task_implementation``, which every orchestrator
calls for each task in the thread that runs it, is where a task starts and ends.
``RunConsole`` replaces the two streams for the run with ones that write to the log of the
task their writing thread runs (``<root>/logs/<start time>/pipeline.log`` outside tasks), wraps that
function to print the one-liners, and, ``verbose``, also streams everything as kfp does.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import logging
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, TextIO

LOGS = "logs"
PIPELINE_LOG = "pipeline.log"
ANSI = re.compile(r"\x1b\[[0-9;]*m")
# How much of a task's own output is kept in memory to show when it fails.
KEPT_LINES = 400
ERROR_LINES = 12


class StepFailed(RuntimeError):
    """A step of a local run failed; the message has its error and the path of its log."""


@dataclass
class TaskRun:
    """One task of the run: what the one-liners say about it and where its output goes."""

    step: str  # prepare, train, sample, score, compare
    label: str  # subject · method · prompt, where the task has them
    log: Path
    file: TextIO
    started: float = field(default_factory=time.monotonic)
    streaming: bool = False  # inside the output of the task's process
    at_line_start: bool = True
    output: collections.deque = field(default_factory=lambda: collections.deque(maxlen=KEPT_LINES))
    partial: str = ""
    error: list[str] = field(default_factory=list)

    def keep(self, text: str) -> None:
        """Keep the process's lines (for the error of a failed task)."""
        lines = (self.partial + ANSI.sub("", text)).split("\n")
        self.partial = lines.pop()
        self.output.extend(lines)


class _Stream(io.TextIOBase):
    """``sys.stdout`` or ``sys.stderr`` during a run: see ``RunConsole.write``."""

    def __init__(self, console: "RunConsole", original: TextIO):
        self._console, self._original = console, original

    def write(self, text: str) -> int:
        self._console.write(text, self._original)
        return len(text)

    def flush(self) -> None:
        self._original.flush()

    def isatty(self) -> bool:
        return False

    @property
    def encoding(self) -> str:
        return getattr(self._original, "encoding", None) or "utf-8"


def error_lines(lines: list[str], limit: int = ERROR_LINES) -> list[str]:
    """What a failed task's output says went wrong: the exception its last traceback ends with
    (the lines after the last frame), else its last lines that are not blank or progress bars."""
    lines = [line.rstrip() for line in lines]
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")]
    if starts:
        tail = lines[starts[-1] + 1:]
        first = next((i for i, line in enumerate(tail) if line and not line[0].isspace()), None)
        if first is not None:
            message = []
            for line in tail[first:]:
                if not line.strip() or line.startswith("[KFP Executor"):
                    break
                message.append(line)
            return message[:limit]
    meaningful = [line for line in lines if line.strip() and "\r" not in line and "it/s]" not in line]
    return meaningful[-limit:]


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def new_logs_folder(root: Path) -> Path:
    """``root/logs/<start time>``, made: each local run into a root keeps its own logs."""
    from datetime import datetime

    stamp = datetime.now().strftime("%Y-%m-%d-%H-%M-%S")
    for n in range(1, 1000):
        folder = root / LOGS / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            folder.mkdir(parents=True)
            return folder
        except FileExistsError:
            continue
    raise RuntimeError(f"cannot make a logs folder under {root / LOGS}")


def newest_logs(root: Path) -> Path | None:
    """The logs folder of the newest local run into ``root`` (folders are named by start time,
    a second run in the same second gets '-2')."""
    import re

    def order(folder: Path):
        m = re.fullmatch(r"(\d{4}(?:-\d\d){5})(?:-(\d+))?", folder.name)
        return (m.group(1), int(m.group(2) or 1)) if m else ("", 0)

    folders = sorted((p for p in (Path(root) / LOGS).glob("*") if p.is_dir() and order(p)[1]), key=order)
    return folders[-1] if folders else None


class RunConsole:
    """Route a local run's output to per-task logs under ``root/logs/<start time>`` and print one line per
    task start and end (``verbose``: also everything kfp.local prints, as it prints it)."""

    def __init__(self, root: Path, *, verbose: bool = False):
        self.logs = new_logs_folder(Path(root))
        self.verbose = verbose
        self.failures: list[TaskRun] = []
        self._local = threading.local()
        self._lock = threading.Lock()
        self._names: set[str] = set()
        self._trainings: list[dict] = []  # prepare's fan-out: {task_id, method, tasks} per loop iteration
        self._tasks: dict[str, dict] = {}  # the prepared manifest's tasks, by id
        self._restore: list = []

    # -- entering and leaving ---------------------------------------------------------------

    def __enter__(self) -> "RunConsole":
        self._pipeline_log = (self.logs / PIPELINE_LOG).open("w", encoding="utf-8")
        self.out = sys.stdout
        self._swap_streams()
        self._patch_kfp()
        self.say(f"running the pipeline locally; each step's output is in {self.logs}/"
                 + ("" if self.verbose else " (--verbose: show it here)"))
        return self

    def __exit__(self, *exc) -> None:
        while self._restore:
            self._restore.pop()()
        self._pipeline_log.close()

    def _swap_streams(self) -> None:
        out, err = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Stream(self, out), _Stream(self, err)
        from kfp.local import logging_utils

        root = logging.getLogger()
        handlers, level = root.handlers[:], root.level
        # kfp.local's own logger setup, once for the whole run (see _logger_context): its records
        # go through sys.stdout, which sends them to the log of the task whose thread wrote them.
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging_utils.MillisecondFormatter(fmt="%(asctime)s - %(levelname)s - %(message)s",
                                                                datefmt="%H:%M:%S.%f"))
        root.handlers[:] = [handler]
        root.setLevel(logging.INFO)

        def restore():
            sys.stdout, sys.stderr = out, err
            root.handlers[:] = handlers
            root.setLevel(level)

        self._restore.append(restore)

    def _patch_kfp(self) -> None:
        from kfp.local import logging_utils, task_dispatcher

        run, indented = task_dispatcher.run_single_task_implementation, logging_utils.indented_print
        context = logging_utils.local_logger_context
        task_dispatcher.run_single_task_implementation = self._wrap(run)
        logging_utils.indented_print = self._streaming  # kfp's swaps builtins.print, which threads share
        # kfp's swaps the root logger's handlers and level per task, which threads share too: a
        # parallel task that ended reset the level under a running one, whose "finished with
        # status" lines were then dropped. The run's logger is set up once (_swap_streams).
        logging_utils.local_logger_context = contextlib.nullcontext

        def restore():
            task_dispatcher.run_single_task_implementation, logging_utils.indented_print = run, indented
            logging_utils.local_logger_context = context

        self._restore.append(restore)

    # -- output -----------------------------------------------------------------------------

    def say(self, line: str) -> None:
        """One line on the console (and in the pipeline's log)."""
        with self._lock:
            self.out.write(line + "\n")
            self.out.flush()
            self._pipeline_log.write(line + "\n")
            self._pipeline_log.flush()

    def write(self, text: str, original: TextIO) -> None:
        """Text written to ``original`` (stdout or stderr) by any thread: into the log of the task
        that thread runs, else the pipeline's log; ``verbose``, also to ``original``, a task's
        process output indented as kfp indents it."""
        task: Optional[TaskRun] = getattr(self._local, "task", None)
        if task is not None:
            task.file.write(ANSI.sub("", text))
            if task.streaming:
                task.keep(text)
        else:
            with self._lock:
                self._pipeline_log.write(ANSI.sub("", text))
        if self.verbose:
            with self._lock:
                original.write(self._indent(task, text) if task is not None and task.streaming else text)

    @staticmethod
    def _indent(task: TaskRun, text: str) -> str:
        out = []
        for piece in text.splitlines(keepends=True):
            out.append(("    " if task.at_line_start else "") + piece)
            task.at_line_start = piece.endswith("\n")
        return "".join(out)

    @contextlib.contextmanager
    def _streaming(self, num_spaces: int = 4):
        """Replaces kfp's ``indented_print`` around a task's process: marks its output as the task's own."""
        task = getattr(self._local, "task", None)
        if task is not None:
            task.streaming = True
        try:
            yield
        finally:
            if task is not None:
                task.streaming = False

    # -- tasks ------------------------------------------------------------------------------

    def _wrap(self, run):
        def run_task(*args, **kwargs):
            from kfp.local import status

            task = self._start(kwargs)
            try:
                outputs, task_status = run(*args, **kwargs)
            except BaseException as e:
                task.error = [f"{type(e).__name__}: {e}"]
                self._end(task, ok=False)
                raise
            self._end(task, ok=task_status == status.Status.SUCCESS)
            if task.step == "prepare" and task_status == status.Status.SUCCESS:
                self._learn(outputs)
            return outputs, task_status

        return run_task

    def _start(self, kwargs: dict) -> TaskRun:
        from kfp.local import executor_input_utils

        step = executor_input_utils.get_local_task_resource_name(kwargs.get("component_name", "comp-task"))
        iteration = re.findall(r"-iteration-(\d+)", kwargs.get("pipeline_resource_name", ""))
        training = self._training(int(iteration[-1])) if iteration else {}
        label = self._label(step, kwargs.get("arguments") or {}, training)
        log = self._log_path(step, training)
        task = TaskRun(step, label, log, log.open("w", encoding="utf-8", buffering=1))
        self._local.task = task
        self.say(f"{time.strftime('%H:%M:%S')} start   {step:<8} {label}".rstrip())
        return task

    def _end(self, task: TaskRun, *, ok: bool) -> None:
        self._local.task = None
        seconds = f"{time.monotonic() - task.started:.1f}s"
        self.say(f"{time.strftime('%H:%M:%S')} {'done   ' if ok else 'FAILED '} {task.step:<8} {task.label}  {seconds}")
        if not ok:
            task.error = task.error or error_lines([*task.output, task.partial])
            with self._lock:
                for line in task.error or ["(it printed nothing)"]:
                    self.out.write(f"    {line}\n")
                self.out.write(f"    its log: {task.log}\n")
            self.failures.append(task)
        task.file.close()

    def _log_path(self, step: str, training: dict) -> Path:
        name = "-".join(filter(None, [step, training.get("task_id"), training.get("method")]))
        with self._lock:
            unique, n = name, 1
            while unique in self._names:
                n += 1
                unique = f"{name}-{n}"
            self._names.add(unique)
        return self.logs / f"{unique}.log"

    def _training(self, index: int) -> dict:
        return self._trainings[index] if index < len(self._trainings) else {}

    def _learn(self, outputs: dict) -> None:
        """prepare's outputs: the trainings the loop fans out to, and the prepared tasks, for the labels."""
        trainings = outputs.get("Output")
        if isinstance(trainings, list) and all(isinstance(t, dict) for t in trainings):
            self._trainings = trainings
        try:
            manifest = json.loads((Path(outputs["prepared"].path) / "manifest.json").read_text())
            self._tasks = {t["id"]: t for t in manifest["tasks"]}
        except (KeyError, AttributeError, TypeError, OSError, ValueError):
            self._tasks = {}

    def _label(self, step: str, arguments: dict, training: dict) -> str:
        """subject · method · prompt for a training's tasks; what prepare and compare cover."""
        if step == "prepare":
            subjects = ", ".join(str(s.get("name")) for s in arguments.get("subjects") or [] if isinstance(s, dict))
            prompts = _plural(len(arguments.get("prompts") or []), "prompt")
            if arguments.get("prompts_file"):
                prompts += f" + {Path(str(arguments['prompts_file'])).name}"
            return " · ".join([subjects, prompts, ", ".join(map(str, arguments.get("methods") or []))])
        if step == "compare":
            return _plural(len(self._trainings), "training") if self._trainings else ""
        task_ids = training.get("tasks") or [training.get("task_id") or arguments.get("task")]
        method = training.get("method") or arguments.get("method") or ""
        tasks = [self._tasks.get(str(t), {"id": t}) for t in task_ids if t]
        if not tasks:
            return method
        subjects = sorted({s for t in tasks for s in (t.get("subjects") or {}).values()}) or [str(tasks[0]["id"])]
        prompt = f'"{tasks[0]["prompt"]}"' if len(tasks) == 1 and tasks[0].get("prompt") else _plural(len(tasks), "prompt")
        return " · ".join([", ".join(subjects), method, prompt])

    def failed(self) -> StepFailed:
        """What a run in which steps failed raises: each failed step, its error and its log."""
        parts = []
        for t in self.failures:
            error = " ".join(line.strip() for line in t.error)
            error = error if len(error) <= 400 else error[:400] + "..."
            parts.append(f"step {t.step} ({t.label}) failed: {error or 'see its log'} (log: {t.log})")
        return StepFailed("; ".join(parts))
