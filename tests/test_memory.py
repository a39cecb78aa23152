"""--micro-batch-size auto against a real out-of-memory: `palp train` in a subprocess under an
address-space limit (RLIMIT_AS) that holds a small micro-batch but not the whole batch. The
probe backs off to a size that fits, trains, records it, and its weights equal those of a run
given that micro-batch explicitly; a resumed run keeps it without probing again."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import EXAMPLE_CAT, REPO, assert_identical_runs

# Runs palp's CLI under an address-space limit (0: none) and reports the process's peak. Every
# run (limited or not) has oneDNN's convolutions off: under RLIMIT_AS oneDNN reserves address
# space of its own when it builds a kernel ("could not create a primitive"), far from what the
# step holds, so the limit would not measure the step; PyTorch's own kernels allocate through
# its CPU allocator, whose failure is the out-of-memory the probe must see. Libraries loaded late
# (matplotlib and pandas, for the run's page and tables) are loaded first, so that the limit is spent on the work alone.
WRAPPER = """
import json, resource, sys
import torch
torch.backends.mkldnn.enabled = False
import matplotlib.pyplot, pandas  # mapped before the limit: used after the work (the run's page, the tables) by every run alike
limit = int(sys.argv[1])
if limit:
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
from palp.cli import main
code = main(sys.argv[2:])
peak = next(l for l in open("/proc/self/status") if l.startswith("VmPeak")).split()[1]
print("PEAK " + json.dumps({"code": code, "vmpeak": int(peak) * 1024}), file=sys.stderr)
sys.exit(code)
"""
BATCH = 64


def _train(out, *extra, limit: int = 0, steps: int = 1) -> tuple[int, int, str]:
    """A toy-world TI+DB training (``_limited``'s result)."""
    argv = ["train", "--images", str(REPO / "examples/toyworld/purple-cat"), "--class-word", "cat", "--prompt",
            "A sketch of [V] in the snow at night", "--pretrained-model", "toyworld", "--method", "ti-db",
            "--steps", str(steps), "--batch-size", str(BATCH), "--lora-rank", "4", "--output", str(out), "--quiet", *extra]
    return _limited(argv, limit)


def _limited(argv: list[str], limit: int) -> tuple[int, int, str]:
    """(exit code, peak address space in bytes, stderr) of ``palp ARGV`` under ``limit`` bytes."""
    # Fewer threads and arenas, and a fixed mmap threshold: glibc otherwise raises its threshold as
    # large blocks are freed and serves later ones from a heap it does not return, so the peak of
    # the same run differed by 170 MiB between hosts (batch 64 over batch 8: 260 MiB here, 90 there).
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_ARENA_MAX="1", MALLOC_MMAP_THRESHOLD_="131072")
    proc = subprocess.run([sys.executable, "-c", WRAPPER, str(limit), *argv], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    peak = next((json.loads(line[5:])["vmpeak"] for line in proc.stderr.splitlines() if line.startswith("PEAK ")), 0)
    return proc.returncode, peak, proc.stderr


@pytest.fixture(scope="module")
def micro_8(tmp_path_factory) -> tuple:
    """(run folder, peak address space) of one toy-world step at micro-batch 8, no limit: both
    tests' reference (the training's peak, and the run the sampling test samples)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("RLIMIT_AS and /proc/self/status are Linux's")
    run = tmp_path_factory.mktemp("memory") / "m8"
    code, peak, err = _train(run, "--micro-batch-size", "8")
    assert code == 0, err[-2000:]
    return run, peak


@pytest.mark.slow
def test_auto_micro_batch_backs_off_from_a_real_out_of_memory(tmp_path, micro_8):
    _, small = micro_8
    code, whole, _ = _train(tmp_path / "m64", "--micro-batch-size", str(BATCH))
    assert code == 0 and whole > small + 200 * 2**20, (small, whole)  # the whole batch needs visibly more
    limit = small + (whole - small) // 4  # holds 8 (and about 16), not 32 or 64

    code, _, err = _train(tmp_path / "auto", limit=limit, steps=2)
    assert code == 0, err[-2000:]
    config = json.loads((tmp_path / "auto" / "training_config.json").read_text())
    chosen = config["micro_batch_size"]
    assert chosen in (8, 16) and config["micro_batch_auto"] and config["gradient_accumulation_steps"] == BATCH // chosen
    assert f"--micro-batch-size auto: {chosen} of {BATCH} per process fits on cpu" in err
    assert "(64, 32 ran out of memory)" in err  # the limit really holds neither the whole batch nor half of it

    code, _, _ = _train(tmp_path / "explicit", "--micro-batch-size", str(chosen), steps=2)
    assert code == 0
    assert_identical_runs(tmp_path / "explicit", tmp_path / "auto")  # the probe changed nothing the run computes

    code, _, err = _train(tmp_path / "auto", "--resume", steps=3)  # no limit now: the recorded size is kept
    assert code == 0 and "--micro-batch-size auto" not in err
    assert json.loads((tmp_path / "auto" / "training_config.json").read_text())["micro_batch_size"] == chosen


def test_micro_batch_size_flag_takes_auto_or_a_number(capsys):
    from palp.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--micro-batch-size", "0", "--images", str(EXAMPLE_CAT), "--output", "x"])
    assert "use a whole number >= 1 or auto" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--micro-batch-size", "some", "--images", str(EXAMPLE_CAT), "--output", "x"])
    assert "use a whole number or auto, not 'some'" in capsys.readouterr().err


def _sample(run, out, *extra, limit: int = 0) -> tuple[int, int, str]:
    argv = ["sample", "--model", str(run), "--output", str(out), "--num-samples", str(BATCH), "--steps", "2",
            "--batch-size", str(BATCH), "--quiet", *extra]
    return _limited(argv, limit)


@pytest.mark.slow
def test_sampling_backs_off_from_a_real_out_of_memory(tmp_path, micro_8):
    """`palp sample --batch-size 64` under a limit that holds a batch of 8: the batch is made in
    halves until it fits, that size is kept, and every image is that of a run given the final
    size within one 8-bit level (CPU kernels differ by batch size by ~1e-6; a batch made before
    the size settled may have been larger, as tests/test_sample_score.py allows for)."""
    run = micro_8[0]
    code, small, _ = _sample(run, tmp_path / "s8", "--batch-size", "8")
    assert code == 0
    code, whole, _ = _sample(run, tmp_path / "s64")
    assert code == 0 and whole > small + 50 * 2**20, (small, whole)  # about 85 MiB with the fixed threshold
    code, _, err = _sample(run, tmp_path / "auto", limit=small + (whole - small) // 4)
    assert code == 0, err[-2000:]
    said = [line for line in err.splitlines() if "ran out of memory" in line]
    assert said and said[0].startswith("palp sample: a batch of 64 ran out of memory on cpu; batches of 32 from now on")
    fitted = int(said[-1].split("batches of ")[1].split()[0])
    assert fitted < BATCH
    code, _, _ = _sample(run, tmp_path / "explicit", "--batch-size", str(fitted))
    assert code == 0
    import numpy as np
    from PIL import Image

    def pixels(root):
        return {p.relative_to(root): np.asarray(Image.open(p), dtype=np.int16) for p in root.rglob("*.png")}

    auto, explicit = pixels(tmp_path / "auto"), pixels(tmp_path / "explicit")
    assert len(auto) == BATCH and auto.keys() == explicit.keys()
    assert max(int(np.abs(auto[k] - explicit[k]).max()) for k in auto) <= 1
