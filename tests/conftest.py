"""Shared fixtures: one tiny model per test session, in a private palp cache."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_CAT = REPO / "examples" / "subjects" / "cat"

# Set before palp is imported anywhere: the tiny model and any gs:// downloads go here, and
# subprocesses inherit it. Nothing may reach the network.
_SESSION_CACHE = Path(os.environ.get("PALP_TEST_CACHE", "/tmp/palp-test-cache")) / f"pid-{os.getpid()}"
os.environ["PALP_CACHE"] = str(_SESSION_CACHE)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Test workers share the cores: each one, and every process it starts, gets its share of torch
# threads. Two workers each running torch's default (a thread per core) keep four spinning
# OpenMP pools on two cores, which doubled the CPU time of the same tests. The tests about the
# default thread count clear OMP_NUM_THREADS for the processes they start.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // _WORKERS)))


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    from palp.models.tiny import tiny_model_dir

    return tiny_model_dir()


@pytest.fixture()
def cat_images(tmp_path) -> Path:
    """A private copy of the shipped example subject (three photos of a cat)."""
    dest = tmp_path / "cat"
    shutil.copytree(EXAMPLE_CAT, dest)
    return dest


def train_args(images: Path, output: Path, *extra: str, steps: int = 3) -> list[str]:
    """argv for a fast ``palp train`` on the tiny model."""
    return [
        "train", "--images", str(images), "--class-word", "cat", "--prompt", "A sketch of [V] in Paris at night",
        "--pretrained-model", "tiny", "--steps", str(steps), "--batch-size", "2", "--lora-rank", "4",
        "--output", str(output), "--quiet", *extra,
    ]


def assert_grads_close(actual, expected):
    """Parameter gradients equal a closed form within float32 rounding of the step's sums."""
    import torch

    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-7 * max(1.0, float(e.abs().max())))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_emulator(port: int, *, storage_base: Path | None = None) -> subprocess.Popen:
    """Start gcp-storage-emulator on 127.0.0.1:port (in memory, or on disk under storage_base)."""
    exe = shutil.which("gcp-storage-emulator") or str(Path(sys.executable).parent / "gcp-storage-emulator")
    cmd = [exe, "start", "--host", "127.0.0.1", "--port", str(port), "--quiet"]
    env = dict(os.environ)
    if storage_base is None:
        cmd.append("--in-memory")
    else:
        env["STORAGE_BASE"] = str(storage_base)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError("gcp-storage-emulator did not start")
            time.sleep(0.1)


@pytest.fixture(scope="session")
def gcs_emulator():
    """A real gcp-storage-emulator HTTP server on 127.0.0.1; yields its address."""
    port = free_port()
    proc = start_emulator(port)
    old = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
    try:
        yield os.environ["STORAGE_EMULATOR_HOST"]
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if old is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = old


def upload_folder(local: Path, uri: str) -> None:
    """Put a local folder's files under a gs:// prefix (creating the bucket) with the stock client."""
    from palp.core.gcs import gcs_client, split_gcs

    bucket_name, prefix = split_gcs(uri)
    client = gcs_client()
    bucket = client.lookup_bucket(bucket_name) or client.create_bucket(bucket_name)
    for f in sorted(p for p in local.rglob("*") if p.is_file()):
        bucket.blob(f"{prefix.rstrip('/')}/{f.relative_to(local)}").upload_from_filename(str(f))


class HtmlRefs(HTMLParser):
    """Every tag of a page and every URL it refers to (src, href, ...): a self-contained page's
    references are all data: URIs."""

    def __init__(self):
        super().__init__()
        self.refs, self.tags = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for k, v in attrs:
            if k in ("src", "href", "srcset", "action", "data", "poster") and v:
                self.refs.append(v)


def run_weights(out: Path) -> dict:
    """The trained tensors of a run folder (LoRA + learned embeddings)."""
    from safetensors.torch import load_file

    from palp.models.run_weights import EMBEDS_FILE, LORA_FILE

    return {**load_file(out / LORA_FILE), **load_file(out / EMBEDS_FILE)}


def assert_identical_runs(a: Path, b: Path) -> None:
    """Two runs' weights bit for bit, and their metrics."""
    import torch

    wa, wb = run_weights(a), run_weights(b)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa), max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    assert (a / "metrics.csv").read_text() == (b / "metrics.csv").read_text()


def kill_after_checkpoint(cmd: list[str], out: Path, env: dict, step: int = 2) -> None:
    """Start ``cmd`` (a training into ``out``) and SIGKILL it once its step-``step`` checkpoint exists."""
    import signal

    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "checkpoints" / f"step-{step:06d}" / "state.json").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def pretrain_script():
    """evaluation/toyworld/pretrain.py as a module, with its sibling pretrain_*.py modules
    importable (as when it runs); loaded once."""
    import importlib.util

    if "toy_pretrain" not in sys.modules:
        folder = REPO / "evaluation/toyworld"
        spec = importlib.util.spec_from_file_location("toy_pretrain", folder / "pretrain.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["toy_pretrain"] = module
        sys.path.insert(0, str(folder))
        try:
            spec.loader.exec_module(module)
        finally:
            sys.path.remove(str(folder))
    return sys.modules["toy_pretrain"]
