"""Training at the default thread count is bit-reproducible: two runs, and a run killed with
SIGKILL and resumed (with validation samples on); and a checkpoint is loaded without unpickling anything."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import pytest
import torch

from conftest import REPO, assert_identical_runs, kill_after_checkpoint, train_args
from palp.cli import main
from palp.models.run_weights import CONFIG_FILE

STEPS = 6
ARGS = ("--batch-size", "16", "--lr", "1e-3", "--checkpoint-every", "2", "--save-steps", "6")


def _env() -> dict:
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)  # torch's default: one thread per core
    return env


def _cmd(images, out, *extra) -> list[str]:
    return [sys.executable, "-m", "palp", *train_args(images, out, *ARGS, *extra, steps=STEPS)]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    from conftest import EXAMPLE_CAT

    root = tmp_path_factory.mktemp("repro")
    subprocess.run(_cmd(EXAMPLE_CAT, root / "a"), check=True, cwd=REPO, env=_env())
    return root / "a"


def test_two_runs_at_the_default_thread_count_are_bit_identical(straight, tmp_path):
    from conftest import EXAMPLE_CAT

    subprocess.run(_cmd(EXAMPLE_CAT, tmp_path / "b"), check=True, cwd=REPO, env=_env())
    assert_identical_runs(straight, tmp_path / "b")
    config = json.loads((straight / CONFIG_FILE).read_text())
    default = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"], check=True,
                             env=_env(), capture_output=True, text=True).stdout  # a fresh process's default
    assert config["deterministic"] is True and config["num_threads"] == int(default)


def test_killed_and_resumed_run_is_bit_identical(straight, tmp_path):
    """... with validation samples and TensorBoard on in the killed run and off in the straight
    one: watching a run draws nothing from its random stream."""
    from conftest import EXAMPLE_CAT

    out = tmp_path / "killed"
    watch = ("--validation-every", "2", "--validation-images", "1", "--validation-steps", "2", "--report-to", "tensorboard")
    kill_after_checkpoint(_cmd(EXAMPLE_CAT, out, *watch), out, _env())
    assert not (out / CONFIG_FILE).exists(), "the kill should land mid-run"
    subprocess.run(_cmd(EXAMPLE_CAT, out, *watch, "--resume"), check=True, cwd=REPO, env=_env())
    assert_identical_runs(straight, out)
    assert [e["step"] for e in json.loads((out / "validation" / "index.json").read_text())] == [2, 4, 6]


class _Payload:
    """Unpickling this creates a file: proof that a load ran code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_crafted_pickle_in_a_checkpoint_executes_nothing(cat_images, tmp_path, capsys):
    out, marker = tmp_path / "run", tmp_path / "PWNED"
    assert main(train_args(cat_images, out, "--checkpoint-every", "1", steps=2)) == 0
    ckpt = out / "checkpoints" / "step-000002"
    assert {p.name for p in ckpt.iterdir()} >= {"trainable.safetensors", "optimizer.safetensors", "optimizer.json",
                                                 "rng.safetensors", "rng.json"}
    assert not list(ckpt.glob("*.pt"))  # nothing pickled is written
    for name in ("rng.pt", "optimizer.pt"):  # what older checkpoints held, crafted
        (ckpt / name).write_bytes(pickle.dumps(_Payload(marker)))
    assert main(train_args(cat_images, out, "--checkpoint-every", "1", "--resume", steps=3)) == 0
    assert not marker.exists()
    # An old-style checkpoint (pickles only) is refused with a message, and still runs nothing.
    latest = ckpt.parent / "step-000003"
    for name in ("rng", "optimizer"):
        (latest / f"{name}.json").unlink()
        (latest / f"{name}.pt").write_bytes(pickle.dumps(_Payload(marker)))
    assert main(train_args(cat_images, out, "--checkpoint-every", "1", "--resume", steps=4)) == 2
    assert "written by an older palp" in capsys.readouterr().err
    assert not marker.exists()
