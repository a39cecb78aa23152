"""Data parallelism, executed: `palp train` launched as two processes by torchrun (gloo, on the
CPU) trains what one process trains with the same global batch, through a checkpoint and a
`--resume` (also as two processes); only the first process takes the output's lock and writes.
The pipeline's train step, given N accelerators, launches N processes (palp.steps.launch): the
resumed half of that test goes through it, and a SIGTERM sent to it reaches every process once.

Tolerance: the two processes average their gradients with an all-reduce, which adds in another
order than one process's batch mean, so gradients agree to float32 rounding (~1e-7 relative).
AdamW divides each update by the root of its second moment, so where a gradient is near zero
(LoRA's A matrices at the first step, while B is still zero) a last-bit difference can become a
visible share of one update; over 4 steps at lr 1e-3 the LoRA weights are held to 1e-4
(a tenth of one step's size), the [V] embedding and the logged losses to 1e-6."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import EXAMPLE_CAT, REPO, free_port, train_args
from palp.models.run_weights import EMBEDS_FILE, LORA_FILE

ARGS = ("--batch-size", "4", "--lr", "1e-3", "--checkpoint-every", "2")


def _train(out, processes: int, steps: int, *extra) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                "--master_addr", "127.0.0.1", "--master_port", str(free_port())] if processes > 1 else [sys.executable]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([*launcher, "-m", "palp", *train_args(EXAMPLE_CAT, out, *ARGS, *extra, steps=steps)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _rows(out) -> list[list[float]]:
    lines = (out / "metrics.csv").read_text().splitlines()[1:]
    return [[float(v) for v in line.split(",")[1:4]] for line in lines]  # loss, rec_loss, align_loss


@pytest.mark.slow
def test_two_processes_train_what_one_trains_through_a_resume(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert _train(one, 1, 4).returncode == 0
    first = _train(two, 2, 2)
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.count("trained 2 steps") == 1  # one line per run, from its first process
    again = _launched(two, 2, 4, resume=True)  # as the pipeline's train step does it
    assert again.returncode == 0, again.stderr[-3000:]
    config = json.loads((two / "training_config.json").read_text())
    assert config["num_processes"] == 2 and config["micro_batch_size"] * config["gradient_accumulation_steps"] == 2
    for name, atol in ((LORA_FILE, 1e-4), (EMBEDS_FILE, 1e-6)):
        a, b = load_file(one / name), load_file(two / name)
        assert a.keys() == b.keys()
        worst = max(float((a[k] - b[k]).abs().max()) for k in a)
        assert worst <= atol, (name, worst)
    moved = max(float(v.abs().max()) for v in load_file(one / LORA_FILE).values())
    assert moved > 100 * 1e-4  # the weights did move: the tolerance is far below what training changed
    assert torch.allclose(torch.tensor(_rows(one)), torch.tensor(_rows(two)), atol=1e-6)  # the global batch's losses


# The pipeline's train step in a process of its own: palp.steps.launch.train_in_processes on the
# settings `palp train` makes of its flags; exits as the component does (128 + signal when stopped).
LAUNCHED = """
import sys
from palp.cli import build_parser, config_from_args
from palp.core.preemption import Preempted
from palp.steps.launch import train_in_processes
processes, resume, argv = int(sys.argv[1]), sys.argv[2] == "resume", sys.argv[3:]
try:
    train_in_processes(config_from_args(build_parser().parse_args(argv)), processes, resume=resume, progress=False)
except Preempted as e:
    print(e, file=sys.stderr)
    sys.exit(e.exit_code)
"""


def _launched_cmd(out, processes: int, steps: int, *extra, resume: bool = False) -> list[str]:
    return [sys.executable, "-c", LAUNCHED, str(processes), "resume" if resume else "new",
            *train_args(EXAMPLE_CAT, out, *ARGS, *extra, steps=steps)]


def _launched(out, processes: int, steps: int, *extra, resume: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run(_launched_cmd(out, processes, steps, *extra, resume=resume), cwd=REPO,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_sigterm_to_the_launched_train_step_checkpoints_every_process_and_the_retry_finishes(tmp_path):
    out, steps = tmp_path / "run", 40
    cmd = _launched_cmd(out, 2, steps, "--checkpoint-every", "5", resume=False)
    proc = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (out / "checkpoints" / "step-000005" / "state.json").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # to the step's process alone, as a cluster stops a container
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, f"rc {proc.returncode} (0: the run ended before the signal came)\n{err[-3000:]}"
    assert "palp train (2 processes) stopped by SIGTERM" in err
    last = max(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*"))
    assert f"palp train stopped by SIGTERM after step {last} of {steps}: checkpoint step-{last:06d} written" in err
    assert 5 <= last < steps and not (out / "training_config.json").exists()
    again = _launched(out, 2, steps, "--checkpoint-every", "5", resume=True)  # the retried step
    assert again.returncode == 0, again.stderr[-3000:]
    config = json.loads((out / "training_config.json").read_text())
    assert config["completed_steps"] == steps and config["num_processes"] == 2
    assert len((out / "metrics.csv").read_text().splitlines()) == steps + 1  # every step once: none lost, none repeated


def test_the_launcher_refuses_what_it_cannot_split():
    from palp.cli import build_parser, config_from_args
    from palp.core.settings import ConfigError
    from palp.steps.launch import train_in_processes

    cfg = config_from_args(build_parser().parse_args(train_args(EXAMPLE_CAT, "x", "--batch-size", "3")))
    with pytest.raises(ConfigError, match="--batch-size 3 is not divisible by the 2 processes"):
        train_in_processes(cfg, 2)
    with pytest.raises(ConfigError, match="whole number >= 1, not 0"):
        train_in_processes(cfg, 0)
