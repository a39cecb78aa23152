"""The KFP layer: components, the compiled DAG, a whole local run, and submission up to the network."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO

BACKENDS = ("vertex", "kubeflow", "vertex-tpu")


def test_import_palp_does_not_import_kfp():
    code = ("import sys, palp, palp.cli, palp.train, palp.prepare, palp.sample, palp.score, palp.study, palp.analyze, "
            "palp.report, palp.storage, palp.models\n"
            "bad = sorted(m for m in sys.modules if m == 'kfp' or m.startswith(('kfp.', 'google_cloud_pipeline')))\n"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
    for path in (REPO / "palp").rglob("*.py"):
        assert "import kfp" not in path.read_text() and "from kfp" not in path.read_text(), path


def test_local_steps_get_their_share_of_the_cores(tmp_path, monkeypatch):
    """kfp.local runs two loop iterations at once: each step gets half the cores, in a subprocess
    (inherited environment) and in a container (the runner's environment), unless the user chose."""
    import os

    from pipelines.run import _threads_per_step, docker_runner

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert docker_runner(tmp_path).container_run_args["environment"]["OMP_NUM_THREADS"] == "4"
    with _threads_per_step("subprocess"):
        assert os.environ["OMP_NUM_THREADS"] == "4"
    assert "OMP_NUM_THREADS" not in os.environ
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert docker_runner(tmp_path).container_run_args["environment"]["OMP_NUM_THREADS"] == "3"
    with _threads_per_step("subprocess"):
        assert os.environ["OMP_NUM_THREADS"] == "3"


def test_local_paths_need_no_cloud_client(tmp_path):
    """An image without google-cloud-storage (a GPU image, say) still reads and writes local paths."""
    code = ("import sys; sys.modules['google.api_core'] = sys.modules['google.cloud'] = None\n"
            "from palp import storage\n"
            f"p = {str(tmp_path / 'out.json')!r}\n"
            "storage.write_text(p, 'ok'); assert storage.exists(p) and storage.read_text(p) == 'ok'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


@pytest.mark.parametrize("backend", BACKENDS)
def test_committed_yaml_is_what_the_code_compiles(backend, tmp_path):
    from pipelines.palp_pipeline import compile_pipeline

    fresh = Path(compile_pipeline(backend, str(tmp_path / "p.yaml"))).read_text()
    committed = (REPO / "pipelines" / f"palp-{backend}.yaml").read_text()
    assert fresh == committed, f"pipelines/palp-{backend}.yaml is stale: run `palp pipeline compile --backend {backend} --output pipelines/palp-{backend}.yaml`"


def _docs(backend: str) -> list[dict]:
    return list(yaml.safe_load_all((REPO / "pipelines" / f"palp-{backend}.yaml").read_text()))


def test_train_requests_the_accelerator_on_each_backend():
    spec = _docs("vertex")[0]
    res = spec["deploymentSpec"]["executors"]["exec-train"]["container"]["resources"]
    assert res["accelerator"]["resourceType"] == "NVIDIA_L4" and res["accelerator"]["resourceCount"] == "1"
    assert res["cpuLimit"] == 8.0 and res["memoryLimit"] == 64.0
    spec = _docs("kubeflow")[0]
    res = spec["deploymentSpec"]["executors"]["exec-train"]["container"]["resources"]
    assert res["accelerator"]["resourceType"] == "nvidia.com/gpu"
    tpu = json.dumps(_docs("vertex-tpu")[0])  # the custom job's worker pool spec, on the train task
    assert "TPU_V5_LITE_PODSLICE" in tpu and "ct5lp-hightpu-4t" in tpu
    for backend in BACKENDS:  # prepare and compare run on CPUs only
        execs = _docs(backend)[0]["deploymentSpec"]["executors"]
        assert "accelerator" not in execs["exec-prepare"]["container"].get("resources", {})


def test_dag_shape_retries_caching_and_no_float_conditions():
    spec = _docs("vertex")[0]
    root = spec["root"]["dag"]["tasks"]
    assert set(root) == {"prepare", "for-loop-1", "compare"}
    loop = spec["components"]["comp-for-loop-1"]["dag"]["tasks"]
    assert set(loop) == {"train", "sample", "score"}
    assert loop["train"]["retryPolicy"]["maxRetryCount"] == 3
    assert all(t["cachingOptions"].get("enableCache") for t in [*root.values(), *loop.values()] if "cachingOptions" in t)
    assert root["compare"]["inputs"]["artifacts"]["samples"]["taskOutputArtifact"]["producerTask"] == "for-loop-1"
    text = (REPO / "pipelines" / "palp-vertex.yaml").read_text()
    assert "triggerPolicy" not in text and "condition:" not in text  # no dsl.If anywhere, let alone on a float
    image = spec["deploymentSpec"]["executors"]["exec-train"]["container"]["image"]
    from palp import __version__

    assert image.endswith(f"/palp-gpu:{__version__}")


def test_image_follows_the_package_version_and_can_be_overridden(monkeypatch):
    from components import default_image, make_components
    from palp import __version__

    assert default_image().endswith(f"palp-gpu:{__version__}") and default_image("tpu").endswith(f"palp-tpu:{__version__}")
    monkeypatch.setenv("PALP_IMAGE", "localhost/palp-cpu:test")
    assert make_components().train.component_spec.implementation.container.image == "localhost/palp-cpu:test"


@pytest.fixture()
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network call attempted: {args[:2]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_vertex_job_up_to_the_network_boundary(tmp_path, no_network):
    from google.auth.credentials import AnonymousCredentials

    from pipelines.palp_pipeline import compile_pipeline
    from pipelines.run import load_experiment, vertex_job

    params = load_experiment(str(REPO / "evaluation/experiments/paper_table2.yaml"))
    package = compile_pipeline("vertex", str(tmp_path / "p.yaml"), accelerator="NVIDIA_A100_80GB")
    job = vertex_job(package, params, project="my-project", region="us-central1", pipeline_root="gs://bucket/palp",
                     credentials=AnonymousCredentials())
    runtime = job._gca_resource.runtime_config
    assert runtime.gcs_output_directory == "gs://bucket/palp"
    values = {k: v for k, v in runtime.parameter_values.items()}
    assert values["train_steps"] == 500 and values["methods"] == ["palp", "ti-db", "sds"]
    assert values["pretrained_model"] == "CompVis/stable-diffusion-v1-4"
    assert values["prompts_file"].endswith("evaluation/prompts/paper.yaml")
    from google.protobuf import json_format

    spec = json_format.MessageToDict(type(job._gca_resource).pb(job._gca_resource))["pipelineSpec"]
    assert spec["deploymentSpec"]["executors"]["exec-train"]["container"]["resources"]["accelerator"]["resourceType"] == "NVIDIA_A100_80GB"
    assert job.project == "my-project" and job.location == "us-central1"


def test_kubeflow_run_arguments(tmp_path):
    from pipelines.run import kubeflow_run_args, load_experiment

    params = load_experiment(None)
    args = kubeflow_run_args(str(tmp_path / "p.yaml"), params, experiment="palp-demo")
    assert args["arguments"] is params and args["experiment_name"] == "palp-demo" and args["enable_caching"]
    assert set(args) == {"pipeline_file", "arguments", "run_name", "experiment_name", "enable_caching"}


def test_bad_experiment_and_submit_arguments(tmp_path, capsys):
    from palp.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("subjects: [{name: cat, images: examples/subjects/cat}]\ntrain_stepz: 3\n")
    assert main(["pipeline", "run-local", "--config", str(bad)]) == 2
    assert "unknown setting(s) train_stepz" in capsys.readouterr().err
    assert main(["pipeline", "submit", "--backend", "kubeflow"]) == 2
    assert "needs --host" in capsys.readouterr().err
    assert main(["pipeline", "submit", "--backend", "vertex", "--project", "p"]) == 2
    assert "needs --region, --pipeline-root" in capsys.readouterr().err
    assert main(["pipeline", "compile", "--backend", "vertex", "--accelerator", "NVIDIA_GTX_1080", "--output", str(tmp_path / "x")]) == 2
    assert "Vertex accelerator 'NVIDIA_GTX_1080' unknown" in capsys.readouterr().err


def test_whole_dag_runs_locally(tmp_path, capsys):
    """The embedded demo (the toy world, 2 subjects x 1 prompt x 2 methods) under kfp.local's
    SubprocessRunner, shortened to a few steps; the judge's columns reach Table 2 and the metrics."""
    from palp.cli import main
    from pipelines.run import DEFAULT_CONFIG

    assert DEFAULT_CONFIG.name == "demo.yaml"
    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    assert config["pretrained_model"] == "toyworld" and config["judge"] == "toyworld"
    config.update(train_steps=2, save_steps="1,2", checkpoint_every=2, num_samples=2, sample_steps=3)
    (tmp_path / "demo.yaml").write_text(yaml.safe_dump(config))
    assert main(["pipeline", "run-local", "--config", str(tmp_path / "demo.yaml"), "--pipeline-root", str(tmp_path / "root")]) == 0
    out = capsys.readouterr().out
    assert "comparison (Table 2 shape)" in out and "| palp" in out and "| ti-db" in out and "Judge: identity" in out
    run = next((tmp_path / "root").glob("palp-*"))
    compare = run / "compare"
    metrics = json.loads((compare / "scores" / "metrics.json").read_text())
    for method in ("palp", "ti_db", "base"):
        for column in ("style", "class", "ambiance_1", "ambiance_2", "target_prompt", "image_alignment",
                       "judge_style", "judge_place", "judge_time", "judge_class"):
            assert f"{method}/{column}" in metrics
        assert 0.0 <= metrics[f"{method}/judge_style"] <= 1.0
    assert "palp/judge_identity" in metrics and "ti_db/judge_identity" in metrics
    assert "<html>" in (compare / "report").read_text()
    assert (compare / "table").read_text().startswith("| method")
    key = (compare / "study" / "key" / "answer_key.csv").read_text()
    assert key.count("\n") - 1 == 2 * 2 * 3  # kinds x subjects x (palp, ti-db, base)
    assert sorted(p.name for p in (compare / "study" / "forms").glob("form-*.xlsx")) == ["form-1.xlsx", "form-2.xlsx", "form-3.xlsx"]
    assert len(list(run.glob("for-loop-*"))) == 4


def test_a_failing_branch_fails_the_run_with_its_error(tmp_path, capfd):
    from pipelines.run import run_local

    config = yaml.safe_load((REPO / "evaluation/experiments/tiny.yaml").read_text())
    config.update(methods=["palp", "bogus"], subjects=config["subjects"][:1])
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(RuntimeError):
        run_local(str(tmp_path / "c.yaml"), pipeline_root=str(tmp_path / "root"))
    captured = capfd.readouterr()
    assert "unknown method 'bogus'; choose one of palp, ti-db" in captured.out + captured.err
