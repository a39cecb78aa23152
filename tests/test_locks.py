"""One writer per output: a second train or sample into a held output gets one clear error,
locally (flock) and on gs:// (a lease object with generation preconditions)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from conftest import REPO, train_args
from palp.cli import main
from palp.core.locks import LOCK_FILE, LockError, output_lock


def test_a_concurrent_second_train_is_refused(cat_images, tmp_path, capsys):
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "palp", *train_args(cat_images, out, "--checkpoint-every", "1", steps=500)],
                             cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (out / "checkpoints" / "config.json").exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, "the first run should still be training"
        for extra in ((), ("--resume",)):
            assert main(train_args(cat_images, out, *extra, steps=500)) == 2
            err = capsys.readouterr().err
            assert f"is being written by palp train (pid {first.pid} on " in err and err.count("error:") == 1
        assert first.poll() is None  # the first run is untouched
    finally:
        first.kill()
        first.wait()
    # The OS released the killed holder's lock: the run can be resumed.
    with output_lock(out, "test"):
        pass


def test_a_second_sampler_into_a_held_output_is_refused(cat_images, tmp_path, capsys):
    assert main(train_args(cat_images, tmp_path / "run", steps=1)) == 0
    out = tmp_path / "samples"
    args = ["sample", "--model", str(tmp_path / "run"), "--output", str(out), "--num-samples", "1", "--steps", "2", "--quiet"]
    with output_lock(out, "palp sample"):
        assert main(args) == 2
        assert f"is being written by palp sample (pid {os.getpid()}" in capsys.readouterr().err
        assert not (out / "samples.csv").exists()
    assert main(args) == 0  # released on exit


def test_a_failed_train_leaves_no_output_folder(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(train_args(empty, tmp_path / "out")) == 2
    assert not (tmp_path / "out").exists()


def test_gcs_lock_is_exclusive_renewed_and_taken_over_when_expired(gcs_emulator, monkeypatch):
    from palp.core.gcs import gcs_client

    monkeypatch.setenv("PALP_LOCK_LEASE_S", "1.5")
    client = gcs_client()
    bucket = client.lookup_bucket("locks") or client.create_bucket("locks")
    out = "gs://locks/run"
    with output_lock(out, "palp train"):
        held = json.loads(bucket.blob(f"run/{LOCK_FILE}").download_as_bytes())
        assert held["what"] == "palp train" and held["pid"] == os.getpid()
        with pytest.raises(LockError, match="is being written by palp train"):
            with output_lock(out, "palp train"):
                pass
        start = time.time()
        with pytest.raises(LockError, match="renewed while waiting"):  # a live holder renews its lease
            with output_lock(out, "palp train", wait=True):
                pass
        assert time.time() - start >= 1.0
    assert bucket.blob(f"run/{LOCK_FILE}").exists() is False  # released
    # A holder that vanished (preempted) leaves its lease; once expired, it is taken over.
    stale = {"what": "palp train", "host": "gone", "pid": 1, "token": "x", "expires": time.time() - 1}
    bucket.blob(f"run/{LOCK_FILE}").upload_from_string(json.dumps(stale))
    with output_lock(out, "palp train"):
        assert json.loads(bucket.blob(f"run/{LOCK_FILE}").download_as_bytes())["pid"] == os.getpid()
    assert not bucket.blob(f"run/{LOCK_FILE}").exists()


def test_a_holder_whose_gcs_lease_was_taken_over_stops_before_writing(gcs_emulator, monkeypatch):
    """A holder that could not renew in time (a network stall) and was taken over learns it at its
    next renewal, and ``check()`` stops it before it writes over the new holder's run."""
    from palp.core.gcs import gcs_client

    monkeypatch.setenv("PALP_LOCK_LEASE_S", "0.9")
    bucket = gcs_client().lookup_bucket("locks") or gcs_client().create_bucket("locks")
    with output_lock("gs://locks/stalled", "palp train") as held:
        held.check()
        taker = {"what": "palp train", "host": "other", "pid": 7, "token": "theirs", "expires": time.time() + 60}
        bucket.blob(f"stalled/{LOCK_FILE}").upload_from_string(json.dumps(taker))
        deadline = time.time() + 10
        while not held.lost.is_set() and time.time() < deadline:
            time.sleep(0.05)
        with pytest.raises(LockError, match=r"lost the lock of gs://locks/stalled to palp train \(pid 7 on other\)"):
            held.check()
    assert json.loads(bucket.blob(f"stalled/{LOCK_FILE}").download_as_bytes())["token"] == "theirs"  # theirs is kept


def test_releasing_a_gcs_lock_in_an_outage_does_not_wait_out_the_retries(monkeypatch):
    """The storage goes down while the lock is held (the failed push that is ending the run):
    leaving the block tries the release once, briefly, and returns; the lease expires by itself."""
    from conftest import free_port, start_emulator
    from palp.core import gcs
    from palp.core.locks import RELEASE_TIMEOUT_S

    port = free_port()
    proc = start_emulator(port)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
    try:
        gcs.gcs_client().create_bucket("palp-outage-lock")
        with output_lock("gs://palp-outage-lock/run", "palp train"):
            proc.kill()
            proc.wait()
            start = time.monotonic()
        took = time.monotonic() - start
    finally:
        if proc.poll() is None:
            proc.kill()
    assert took < 6 * RELEASE_TIMEOUT_S  # the client's default retries would take about 120 s
