"""Data parallelism, executed: `palp train` launched as two processes by torchrun (gloo, on the
CPU) trains what one process trains with the same global batch, through a checkpoint and a
`--resume` (also as two processes); only the first process takes the output's lock and writes.

Tolerance: the two processes average their gradients with an all-reduce, which adds in another
order than one process's batch mean, so gradients agree to float32 rounding (~1e-7 relative).
AdamW divides each update by the root of its second moment, so where a gradient is near zero
(LoRA's A matrices at the first step, while B is still zero) a last-bit difference can become a
visible share of one update; over 4 steps at lr 1e-3 the LoRA weights are held to 1e-4
(a tenth of one step's size), the [V] embedding and the logged losses to 1e-6."""

from __future__ import annotations

import json
import os
import subprocess
import sys

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
    again = _train(two, 2, 4, "--resume")
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
