"""The XLA path (docs/training.md, devices): one PALP step on torch_xla's CPU device agrees with the
CPU eager step. Skipped where torch_xla is not installed (the `tpu` extra's environment has it)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.skipif(importlib.util.find_spec("torch_xla") is None, reason="torch_xla is not installed")


@pytest.mark.slow
def test_xla_step_agrees_with_the_cpu_step():
    # Its own process: autograd sizes its device queues at the process's first backward, which
    # other tests may already have run before torch_xla registered its device. (~60 s: XLA
    # compiles the step's graph on the CPU.)
    env = {**os.environ, "PJRT_DEVICE": "CPU"}
    done = subprocess.run([sys.executable, str(REPO / "evaluation" / "benchmarks" / "xla_agreement.py"), "--rtol", "1e-5"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert ": agree" in done.stdout
