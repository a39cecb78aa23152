"""The step image: built from images/Dockerfile on a local Debian base with a local wheelhouse,
then every step run in containers (a mounted folder, then GCS), and the whole DAG under
kfp.local's DockerRunner. Slow (the build installs torch into the image); CI runs it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import EXAMPLE_CAT, REPO, upload_folder
from palp import __version__

pytestmark = pytest.mark.slow
BASE = "palp-base:bookworm"
TAG = f"palp-cpu:{__version__}"
WHEELHOUSE = Path(os.environ.get("PALP_WHEELHOUSE", "/tmp/palp-wheelhouse"))


def _docker_ok() -> bool:
    return shutil.which("docker") is not None and subprocess.run(["docker", "info"], capture_output=True).returncode == 0


@pytest.fixture(scope="session")
def wheelhouse():
    """torch + torchvision (and their dependencies) as a flat folder served on 127.0.0.1,
    so the image build does not download them again."""
    marker = WHEELHOUSE / ".complete"
    if not marker.exists():
        WHEELHOUSE.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "-d", str(WHEELHOUSE),
                        "torch==2.14.1", "torchvision==0.29.1"], check=True)
        marker.touch()
    handler = partial(SimpleHTTPRequestHandler, directory=str(WHEELHOUSE))
    try:  # a fixed port keeps the build argument, and so Docker's layer cache, the same across runs
        server = ThreadingHTTPServer(("127.0.0.1", 18631), handler)
    except OSError:
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


def _base_image() -> str:
    """The local Debian base (images/make-base.sh), made once (again where an older one lacks libpython3.11)."""
    assert _docker_ok(), "docker is needed: install docker.io and start dockerd (see .ci/run)"
    lib = ["docker", "run", "--rm", "--entrypoint", "test", BASE, "-e", "/usr/lib/x86_64-linux-gnu/libpython3.11.so.1.0"]
    if subprocess.run(["docker", "image", "inspect", BASE], capture_output=True).returncode != 0 or \
            subprocess.run(lib, capture_output=True).returncode != 0:
        subprocess.run(["bash", str(REPO / "images" / "make-base.sh"), BASE], check=True)
    return BASE


CA = "/etc/ssl/certs/ca-certificates.crt"


@pytest.fixture(scope="session")
def image(wheelhouse):
    from palp.step_image import build

    return build("cpu", base_image=_base_image(), find_links=[wheelhouse], trusted_hosts=["127.0.0.1"],
                 ca_bundle=CA if os.path.exists(CA) else None, quiet=True)


def docker_run(image: str, data: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = ["docker", "run", "--rm", "--network", "host", "-u", f"{os.getuid()}:{os.getgid()}", "-v", f"{data}:/data",
           "-e", "PALP_CACHE=/data/.palp-cache", "-e", "HF_HUB_OFFLINE=1"]
    for k, v in (env or {}).items():
        cmd += ["-e", f"{k}={v}"]
    result = subprocess.run(cmd + [image, *args], capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(args[:1])} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def test_image_is_non_root_with_palp_entrypoint(image):
    info = json.loads(subprocess.run(["docker", "image", "inspect", image], capture_output=True, text=True, check=True).stdout)[0]
    assert info["Config"]["User"] == "palp" and info["Config"]["Entrypoint"] == ["palp"]
    assert info["Config"]["Labels"]["org.opencontainers.image.version"] == __version__
    out = subprocess.run(["docker", "run", "--rm", "--network", "host", image, "--version"], capture_output=True, text=True)
    assert out.stdout.strip() == f"palp {__version__}"
    who = subprocess.run(["docker", "run", "--rm", "--network", "host", "--entrypoint", "id", image, "-u"],
                         capture_output=True, text=True)
    assert who.stdout.strip() != "0"


def test_every_step_runs_in_a_container(image, tmp_path, gcs_emulator):
    data = tmp_path / "data"
    shutil.copytree(EXAMPLE_CAT, data / "cat")
    docker_run(image, data, "prepare", "--subject", "cat=/data/cat", "--class-word", "cat=cat", "--prompt",
               "A sketch of [V] in Paris at night", "--pretrained-model", "tiny", "--output", "/data/prep", "--quiet")
    docker_run(image, data, "train", "--prepared", "/data/prep", "--pretrained-model", "tiny", "--steps", "2",
               "--batch-size", "2", "--lora-rank", "4", "--output", "/data/run", "--quiet")
    docker_run(image, data, "sample", "--model", "/data/run", "--output", "/data/samples", "--num-samples", "2",
               "--steps", "2", "--quiet")
    docker_run(image, data, "score", "--samples", "/data/samples", "--prepared", "/data/prep", "--output", "/data/scores",
               "--clip", "tiny", "--quiet")
    docker_run(image, data, "study", "export", "--samples", "/data/samples", "--prepared", "/data/prep", "--output",
               "/data/study", "--image-size", "32", "--forms", "2")
    assert (data / "run" / "pytorch_lora_weights.safetensors").is_file()
    assert (data / "scores" / "report.html").is_file() and (data / "study" / "key" / "answer_key.csv").is_file()
    # The same subject from the GCS emulator: byte-identical prepared images.
    upload_folder(data / "cat", "gs://palp-image-test/subjects/cat")
    docker_run(image, data, "prepare", "--subject", "cat=gs://palp-image-test/subjects/cat", "--class-word", "cat=cat",
               "--prompt", "A sketch of [V] in Paris at night", "--pretrained-model", "tiny", "--output",
               "gs://palp-image-test/prep", "--quiet", env={"STORAGE_EMULATOR_HOST": gcs_emulator})
    from palp.core import storage

    manifest = json.loads((data / "prep" / "manifest.json").read_text())
    for rel in manifest["subjects"]["cat"]["images"]:
        assert storage.read_bytes(f"gs://palp-image-test/prep/{rel}") == (data / "prep" / rel).read_bytes()


def test_whole_dag_under_docker_runner_with_gcs_inputs(image, tmp_path, gcs_emulator, tiny_dir):
    """Every step in its own container with an empty model cache (as a pod on a cluster), the
    base model and the photos in the GCS emulator: only parameters and artifacts travel."""
    import yaml

    from pipelines.run import run_local

    upload_folder(tiny_dir, "gs://palp-dag-test/models/tiny-sd")
    config = yaml.safe_load((REPO / "evaluation/experiments/tiny.yaml").read_text())
    config["subjects"] = config["subjects"][:1]  # one subject: the fan-out over two is tests/test_pipeline.py's
    for s in config["subjects"]:
        upload_folder(REPO / s["images"], f"gs://palp-dag-test/subjects/{s['name']}")
        s["images"] = f"gs://palp-dag-test/subjects/{s['name']}"
    config["pretrained_model"] = "gs://palp-dag-test/models/tiny-sd"
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    root = run_local(str(tmp_path / "c.yaml"), runner="docker", pipeline_root=str(tmp_path / "root"), image=image)
    run = next(root.glob("palp-*"))
    metrics = json.loads((run / "compare" / "scores" / "metrics.json").read_text())
    assert "palp/target_prompt" in metrics and "ti_db/image_alignment" in metrics
    assert (run / "compare" / "study" / "key" / "answer_key.csv").is_file()
    assert not (root / ".palp-cache").exists() and not (root / ".hf-home").exists() and not (root / "inputs").exists()
    for config_file in run.glob("for-loop-*/train/model/training_config.json"):
        trained = json.loads(config_file.read_text())
        assert trained["pretrained_model"] == "gs://palp-dag-test/models/tiny-sd"
        assert trained["base_model_pin"].startswith("gcs:") and "base_model_path" not in trained


@pytest.mark.parametrize("extra", ["gpu", "tpu"])
def test_gpu_and_tpu_install_steps_resolve(extra, tmp_path):
    """The images we cannot build here: their `pip install palp[<extra>]` resolves for Linux x86-64, Python 3.11."""
    report = tmp_path / "report.json"
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                             "--report", str(report), f"{REPO}[{extra}]"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    installed = {i["metadata"]["name"].lower().replace("_", "-"): i["metadata"]["version"]
                 for i in json.loads(report.read_text())["install"]}
    if extra == "gpu":
        assert installed["torch"] == "2.14.1" and any(n.startswith("nvidia-cudnn") for n in installed)
    else:
        assert installed["torch"] == "2.9.0" and installed["torch-xla"] == "2.9.0" and "libtpu" in installed


@pytest.mark.skipif(os.environ.get("PALP_TPU_IMAGE_TEST") != "1",
                    reason="opt-in (PALP_TPU_IMAGE_TEST=1): builds the tpu image, torch 2.9.0 + torch_xla from PyPI")
def test_tpu_image_trains_on_xla_under_docker_runner(image, tmp_path, monkeypatch):
    """The tpu image built, then the tiny DAG under DockerRunner with its train steps in it, on
    XLA:CPU (PJRT_DEVICE=CPU: no TPU here), the other steps in the cpu image; and in the same
    image, evaluation/benchmarks/xla_train_steps.py's compilations per step. Prints what it measured."""
    import re
    import time

    from palp.step_image import build
    from pipelines.run import run_local

    t0 = time.perf_counter()
    tpu = build("tpu", base_image=_base_image(), ca_bundle=CA if os.path.exists(CA) else None, quiet=True)
    built = time.perf_counter() - t0
    size = int(subprocess.run(["docker", "image", "inspect", "-f", "{{.Size}}", tpu], capture_output=True, text=True,
                              check=True).stdout)
    print(f"\n{tpu}: built in {built:.0f} s, {size / 1e9:.2f} GB")
    versions = subprocess.run(["docker", "run", "--rm", "--network", "host", "--entrypoint", "python", tpu, "-c",
                               "import torch, torch_xla; print(torch.__version__, torch_xla.__version__)"],
                              capture_output=True, text=True, check=True).stdout.split()
    assert versions[0].startswith("2.9.0") and versions[1].startswith("2.9.0"), versions

    # Compilations per training step, in the image (the repository mounted for the script).
    bench = subprocess.run(["docker", "run", "--rm", "--network", "host", "-u", f"{os.getuid()}:{os.getgid()}",
                            "-v", f"{REPO}:/repo:ro", "-e", "PJRT_DEVICE=CPU", "-e", "HF_HUB_OFFLINE=1",
                            "-e", "OMP_NUM_THREADS=2", "--entrypoint", "python", tpu,
                            "/repo/evaluation/benchmarks/xla_train_steps.py", "--steps", "5",
                            "--output", "/tmp/xla-run"], capture_output=True, text=True)
    assert bench.returncode == 0, bench.stdout[-3000:] + bench.stderr[-3000:]
    print(bench.stdout)
    steps = {int(n): int(c) for n, c in re.findall(r"^step (\d+) \(loss [^)]*\): compilations (\d+)", bench.stdout, re.M)}
    assert sorted(steps) == [1, 2, 3, 4, 5] and steps[1] > 0 and steps[3] == steps[4] == steps[5] == 0, steps

    # The DAG: train in the tpu image on XLA:CPU, the other steps in the cpu image.
    monkeypatch.setenv("PJRT_DEVICE", "CPU")
    t0 = time.perf_counter()
    root = run_local(str(REPO / "evaluation/experiments/tiny.yaml"), runner="docker", pipeline_root=str(tmp_path / "root"),
                     image=image, train_image=tpu)
    print(f"tiny DAG, train steps in {tpu}: {time.perf_counter() - t0:.0f} s")
    train_logs = sorted((root / "logs").glob("*/train-*.log"))
    assert len(train_logs) == 4, train_logs  # 2 subjects x (palp, ti-db)
    for log in train_logs:
        text = log.read_text()
        assert f"Found image '{tpu}'" in text and "taken without a probe on xla:0" in text, text[-3000:]
        print(log.name, next(line for line in text.splitlines() if "micro-batch-size auto" in line))
    assert all(f"Found image '{image}'" in log.read_text() for log in (root / "logs").glob("*/sample-*.log"))
    run = next(root.glob("palp-*"))
    for curve in sorted(run.glob("for-loop-*/train/model/metrics.csv")):
        print(curve.parent.parent.parent.name, curve.read_text().splitlines()[-1])  # step, loss, ...
    metrics = json.loads((run / "compare" / "scores" / "metrics.json").read_text())
    assert "palp/target_prompt" in metrics and "ti_db/image_alignment" in metrics
