"""Preemption as clusters do it: SIGTERM to a running `palp train` at random moments (the step
it was on is finished and checkpointed, the exit code is 143, and the resumed run is bit-identical
to an uninterrupted one), on a gs:// output (the lock object is gone, so the retried run takes the
output at once), and to a running `palp sample` (finished images kept, lock released)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from conftest import EXAMPLE_CAT, REPO, assert_identical_runs, train_args

STEPS = 30
ARGS = ("--checkpoint-every", "10", "--save-steps", str(STEPS), "--lr", "1e-3")


def _cmd(out, *extra) -> list[str]:
    return [sys.executable, "-m", "palp", *train_args(EXAMPLE_CAT, out, *ARGS, *extra, steps=STEPS)]


def _env(**more) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", **more)
    return env


def _term_after(cmd: list[str], started: callable, delay: float, env: dict) -> tuple[int, str]:
    """Run ``cmd``; once ``started()`` holds, wait ``delay`` s and send SIGTERM. (rc, stderr)."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not started() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(delay)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("preempt") / "straight"
    subprocess.run(_cmd(out), check=True, cwd=REPO, env=_env())
    return out


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(3))
def test_sigterm_checkpoints_the_step_it_was_on_and_resumes_bit_identically(straight, tmp_path, trial):
    out = tmp_path / "run"
    # A different moment each trial (the same in every CI run), counted from the first regular
    # checkpoint (step 10): training is under way whatever the machine's speed, and 20 steps remain.
    delay = random.Random(trial).uniform(0.0, 0.3)
    rc, err = _term_after(_cmd(out), lambda: (out / "checkpoints" / "step-000010" / "state.json").exists(), delay, _env())
    assert rc == 143, f"rc {rc} (0: the run ended before the signal came)\n{err}"  # 128 + SIGTERM: retried like any failure
    assert "Traceback" not in err
    steps = sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*"))
    last = steps[-1]
    assert f"palp train stopped by SIGTERM after step {last} of {STEPS}: checkpoint step-{last:06d} written" in err
    assert json.loads((out / "checkpoints" / f"step-{last:06d}" / "state.json").read_text()) == {"step": last}
    assert not (out / "training_config.json").exists() and 10 <= last < STEPS
    subprocess.run(_cmd(out, "--resume"), check=True, cwd=REPO, env=_env())
    assert_identical_runs(straight, out)


@pytest.mark.slow
def test_sigterm_on_a_gcs_output_releases_the_lock_so_the_retry_starts_at_once(tmp_path, gcs_emulator):
    from palp.core import gcs, storage
    from palp.core.locks import LOCK_FILE

    gcs.gcs_client().create_bucket("palp-preempt")
    remote = "gs://palp-preempt/runs/cat"
    env = _env(STORAGE_EMULATOR_HOST=gcs_emulator, PALP_CACHE=str(tmp_path / "cache"), PALP_LOCK_LEASE_S="120")
    rc, err = _term_after(_cmd(remote), lambda: storage.exists(f"{remote}/checkpoints/config.json"), 0.5, env)
    assert rc == 143 and f"pushed to {remote}" in err, err
    assert not storage.exists(f"{remote}/{LOCK_FILE}")  # released on the way out, not left for its lease to expire
    t0 = time.time()
    subprocess.run(_cmd(remote, "--resume"), check=True, cwd=REPO, env=env)
    assert time.time() - t0 < 60  # a stale lease would have made it wait about 120 s
    assert json.loads(storage.read_text(f"{remote}/training_config.json"))["completed_steps"] == STEPS


@pytest.mark.slow
def test_sigterm_to_sampling_keeps_its_images_and_releases_the_lock(straight, tmp_path):
    out = tmp_path / "samples"
    cmd = [sys.executable, "-m", "palp", "sample", "--model", str(straight), "--output", str(out), "--num-samples", "24",
           "--batch-size", "1", "--steps", "4", "--quiet"]
    rc, err = _term_after(cmd, lambda: any(out.rglob("*.png")), 0.3, _env())
    assert rc == 143 and "palp sample stopped by SIGTERM" in err and "Traceback" not in err, err
    kept = {p.relative_to(out): p.read_bytes() for p in out.rglob("*.png")}
    assert 1 <= len(kept) < 24 and f"{len(kept)} of 24 images are written" in err
    subprocess.run(cmd, check=True, cwd=REPO, env=_env())  # the lock is free: the rerun makes the rest
    again = {p.relative_to(out): p.read_bytes() for p in out.rglob("*.png")}
    assert len(again) == 24 and all(again[k] == v for k, v in kept.items())
