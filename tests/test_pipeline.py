"""The KFP layer: components, the compiled DAG, a whole local run, and submission up to the network."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO

BACKENDS = ("vertex", "kubeflow", "vertex-tpu")


def test_import_palp_does_not_import_kfp():
    code = ("import sys, palp, palp.cli, palp.steps.train, palp.steps.prepare, palp.steps.sample, palp.steps.score, palp.steps.study, palp.steps.analyze, "
            "palp.steps.score_report, palp.core.storage, palp.models.base_model\n"
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
            "from palp.core import storage\n"
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
    # train: as many accelerators as the run's train_accelerators parameter asks for (one process each)
    assert res["accelerator"]["resourceType"] == "NVIDIA_L4"
    assert res["accelerator"]["resourceCount"] == "{{$.inputs.parameters['pipelinechannel--train_accelerators']}}"
    assert spec["root"]["inputDefinitions"]["parameters"]["train_accelerators"]["defaultValue"] == 1
    train = spec["components"]["comp-for-loop-1"]["dag"]["tasks"]["train"]["inputs"]["parameters"]
    assert train["processes"]["componentInputParameter"] == "pipelinechannel--train_accelerators"
    assert res["cpuLimit"] == 8.0 and res["memoryLimit"] == 64.0
    sample = spec["deploymentSpec"]["executors"]["exec-sample"]["container"]["resources"]
    assert sample["accelerator"]["resourceCount"] == "1"
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


def test_train_step_can_have_an_image_of_its_own(tmp_path, monkeypatch):
    """run-local --runner docker --train-image: the train step in the tpu image, every other step in
    the step image; PJRT_DEVICE reaches the containers (XLA:CPU where there is no TPU)."""
    from kfp import compiler

    from pipelines.experiment import ExperimentError
    from pipelines.palp_pipeline import build_pipeline
    from pipelines.run import docker_runner, run_local

    compiler.Compiler().compile(build_pipeline("kubeflow", image="palp-cpu:t", train_image="palp-tpu:t"),
                                package_path=str(tmp_path / "p.yaml"))
    executors = yaml.safe_load((tmp_path / "p.yaml").read_text())["deploymentSpec"]["executors"]
    assert {k: v["container"]["image"] for k, v in executors.items()} == {
        "exec-prepare": "palp-cpu:t", "exec-train": "palp-tpu:t", "exec-sample": "palp-cpu:t", "exec-score": "palp-cpu:t",
        "exec-compare": "palp-cpu:t"}
    monkeypatch.setenv("PJRT_DEVICE", "CPU")
    assert docker_runner(tmp_path).container_run_args["environment"]["PJRT_DEVICE"] == "CPU"
    with pytest.raises(ExperimentError, match="--train-image needs --runner docker"):
        run_local(str(REPO / "evaluation/experiments/tiny.yaml"), train_image="palp-tpu:t", pipeline_root=str(tmp_path / "r"))
    assert not (tmp_path / "r").exists()


def test_vertex_job_up_to_the_network_boundary(tmp_path, no_network):
    from google.auth.credentials import AnonymousCredentials

    from pipelines.experiment import load_experiment
    from pipelines.palp_pipeline import compile_pipeline
    from pipelines.submit import vertex_job

    params = load_experiment(str(REPO / "evaluation/experiments/paper_table2.yaml"))
    package = compile_pipeline("vertex", str(tmp_path / "p.yaml"), accelerator="NVIDIA_A100_80GB")
    job = vertex_job(package, params, project="my-project", region="us-central1", pipeline_root="gs://bucket/palp",
                     credentials=AnonymousCredentials())
    runtime = job._gca_resource.runtime_config
    assert runtime.gcs_output_directory == "gs://bucket/palp"
    values = {k: v for k, v in runtime.parameter_values.items()}
    assert values["train_steps"] == 0 and values["methods"] == ["palp", "ti-db", "p-plus", "neti", "custom-diffusion"]  # 0: each method's own
    assert values["pretrained_model"] == "CompVis/stable-diffusion-v1-4"
    assert values["prompts_file"].endswith("evaluation/prompts/paper.yaml")
    from google.protobuf import json_format

    spec = json_format.MessageToDict(type(job._gca_resource).pb(job._gca_resource))["pipelineSpec"]
    assert spec["deploymentSpec"]["executors"]["exec-train"]["container"]["resources"]["accelerator"]["resourceType"] == "NVIDIA_A100_80GB"
    assert job.project == "my-project" and job.location == "us-central1"


def test_kubeflow_run_arguments(tmp_path):
    from pipelines.experiment import load_experiment
    from pipelines.submit import kubeflow_run_args

    params = load_experiment(None)
    args = kubeflow_run_args(str(tmp_path / "p.yaml"), params, experiment="palp-demo")
    assert args["arguments"] is params and args["experiment_name"] == "palp-demo" and args["enable_caching"]
    assert set(args) == {"pipeline_file", "arguments", "run_name", "experiment_name", "enable_caching", "pipeline_root"}
    assert args["pipeline_root"] is None  # the cluster's default
    assert kubeflow_run_args("p.yaml", params, pipeline_root="gs://bucket/palp")["pipeline_root"] == "gs://bucket/palp"


# -- submit: nothing of this machine travels ------------------------------------------------

@pytest.fixture()
def emulator_only(gcs_emulator, monkeypatch):
    """Connections to anything but the storage emulator fail the test (Vertex, Kubeflow, the hub)."""
    from urllib.parse import urlparse

    url = urlparse(gcs_emulator)
    allowed = {(url.hostname, url.port), ("localhost", url.port)}
    connect = socket.socket.connect

    def guarded(sock, address):
        if tuple(address[:2]) not in allowed:
            raise AssertionError(f"network call attempted: {address}")
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    return gcs_emulator


def _bucket(name: str):
    """A fresh, empty bucket on the emulator, through the stock client."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage as gcs

    client = gcs.Client(project="palp-test", credentials=AnonymousCredentials())
    bucket = client.lookup_bucket(name) or client.create_bucket(name)
    for blob in client.list_blobs(name):
        blob.delete()
    return bucket


def _objects(bucket) -> dict[str, int]:
    return {b.name: b.generation for b in bucket.client.list_blobs(bucket.name)}


SD_FOLDER = {  # what a diffusers SD folder holds; the last three are not uploaded
    "model_index.json": b'{"_class_name": "StableDiffusionPipeline"}', "scheduler/scheduler_config.json": b"{}", "tokenizer/vocab.json": b"{}",
    "tokenizer/merges.txt": b"#", "unet/config.json": b"{}", "unet/diffusion_pytorch_model.safetensors": b"unet",
    "vae/config.json": b"{}", "vae/diffusion_pytorch_model.safetensors": b"vae", "text_encoder/config.json": b"{}",
    "text_encoder/model.safetensors": b"te", "unet/diffusion_pytorch_model.fp16.safetensors": b"half",
    "safety_checker/model.safetensors": b"sc", "feature_extractor/preprocessor_config.json": b"{}",
}


@pytest.fixture()
def local_experiment(tmp_path, monkeypatch):
    """An experiment whose every input is on this machine (two subjects' photos, a prompts file,
    a model folder, a CLIP checkpoint), named by paths relative to the working directory."""
    import shutil

    from conftest import EXAMPLE_CAT

    for name in ("cat", "cup"):
        shutil.copytree(EXAMPLE_CAT.parent / name, tmp_path / "photos" / name)
    (tmp_path / "photos" / "cat" / ".DS_Store").write_bytes(b"hidden")  # hidden: neither read by prepare nor uploaded
    (tmp_path / "prompts.yaml").write_text("prompts:\n  - A sketch of [V] in Paris at night\n")
    for name, data in SD_FOLDER.items():
        (tmp_path / "sd" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "sd" / name).write_bytes(data)
    (tmp_path / "clip.pt").write_bytes(b"clip weights")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    config = work / "experiment.yaml"
    config.write_text(yaml.safe_dump({
        "subjects": [{"name": "cat", "images": "../photos/cat", "class_word": "cat"},
                     {"name": "cup", "images": "../photos/cup", "class_word": "cup"}],
        "prompts_file": "../prompts.yaml", "pretrained_model": "../sd", "clip_weights": "../clip.pt", "train_steps": 3,
    }))
    return config


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


def _machine_paths(values, tmp_path) -> list[str]:
    return [s for s in _strings(values)
            if s.startswith(("/", "~", ".")) or str(tmp_path) in s or str(Path.cwd()) in s or str(REPO) in s
            or (not s.startswith("gs://") and Path(s).exists())]


def test_vertex_job_sends_nothing_of_this_machine(local_experiment, emulator_only, tmp_path):
    """Local photos, prompts file, model folder and CLIP checkpoint are uploaded content-addressed;
    the PipelineJob built up to the network boundary names only gs:// copies of them."""
    from google.auth.credentials import AnonymousCredentials
    from google.protobuf import json_format

    from palp.core import storage
    from pipelines.experiment import load_experiment
    from pipelines.inputs import inputs_fingerprint, portable_inputs
    from pipelines.palp_pipeline import compile_pipeline
    from pipelines.submit import vertex_job

    bucket = _bucket("palp-submit")
    root = "gs://palp-submit/palp"
    params = load_experiment(str(local_experiment))
    sent = portable_inputs(params, root)
    assert sent["inputs_fingerprint"] == inputs_fingerprint(params) and len(sent["inputs_fingerprint"]) == 64
    assert sent["train_steps"] == 3 and params["subjects"][0]["images"] == str(tmp_path / "photos" / "cat")  # params untouched

    # content-addressed: <root>/inputs/<digest of the files' names and bytes>/, the bytes read back with the stock client
    local = {"cat": tmp_path / "photos" / "cat", "cup": tmp_path / "photos" / "cup"}
    for s in sent["subjects"]:
        assert s["images"] == f"{root}/inputs/{storage.folder_digest(local[s['name']])}"
        prefix = s["images"].removeprefix("gs://palp-submit/") + "/"
        blobs = {b.name.removeprefix(prefix): b for b in bucket.client.list_blobs("palp-submit", prefix=prefix)}
        assert sorted(blobs) == sorted(p.name for p in local[s["name"]].iterdir() if not p.name.startswith("."))
        for name, blob in blobs.items():
            assert blob.download_as_bytes() == (local[s["name"]] / name).read_bytes()
    assert sent["prompts_file"].startswith(f"{root}/inputs/") and sent["prompts_file"].endswith("/prompts.yaml")
    assert bucket.blob(sent["prompts_file"].removeprefix("gs://palp-submit/")).download_as_bytes() == \
        (tmp_path / "prompts.yaml").read_bytes()
    model_prefix = sent["pretrained_model"].removeprefix("gs://palp-submit/") + "/"
    uploaded = {b.name.removeprefix(model_prefix): b.download_as_bytes()
                for b in bucket.client.list_blobs("palp-submit", prefix=model_prefix)}
    assert uploaded == {k: v for k, v in SD_FOLDER.items()
                        if k not in ("unet/diffusion_pytorch_model.fp16.safetensors", "safety_checker/model.safetensors",
                                     "feature_extractor/preprocessor_config.json")}
    assert sent["clip_weights"].endswith("/clip.pt")
    assert bucket.blob(sent["clip_weights"].removeprefix("gs://palp-submit/")).download_as_bytes() == b"clip weights"

    # the job up to the network boundary: no parameter value is a path of this machine
    package = compile_pipeline("vertex", str(tmp_path / "p.yaml"))
    job = vertex_job(package, sent, project="my-project", region="us-central1", pipeline_root=root,
                     credentials=AnonymousCredentials())
    values = json_format.MessageToDict(type(job._gca_resource).pb(job._gca_resource))["runtimeConfig"]["parameterValues"]
    assert values["inputs_fingerprint"] == sent["inputs_fingerprint"] and values["subjects"] == sent["subjects"]
    assert _machine_paths(values, tmp_path) == []
    assert _machine_paths(params, tmp_path)  # the scan does find the local paths it is meant to find

    # the same photos again (here, or copied to another machine): the same URIs, nothing re-uploaded
    generations = _objects(bucket)
    assert portable_inputs(params, root) == sent
    import shutil

    shutil.copytree(tmp_path / "photos", tmp_path / "elsewhere")
    moved = dict(params, subjects=[dict(s, images=str(tmp_path / "elsewhere" / s["name"])) for s in params["subjects"]])
    assert portable_inputs(moved, root) == sent and _objects(bucket) == generations

    # an interrupted upload is completed: the missing file only
    first = sorted(n for n in generations if n.startswith(sent["subjects"][0]["images"].removeprefix("gs://palp-submit/")))
    bucket.blob(first[0]).delete()
    assert portable_inputs(params, root) == sent
    after = _objects(bucket)
    assert set(after) == set(generations) and [n for n in after if after[n] != generations[n]] == [first[0]]

    # changed photos: a new URI and a new fingerprint (the old copy stays where it was)
    photo = sorted((tmp_path / "photos" / "cat").glob("[!.]*"))[0]
    photo.write_bytes(photo.read_bytes() + b"\0")
    changed = portable_inputs(params, root)
    assert changed["subjects"][0]["images"] != sent["subjects"][0]["images"]
    assert changed["subjects"][1] == sent["subjects"][1] and changed["inputs_fingerprint"] != sent["inputs_fingerprint"]


def test_photos_replaced_under_the_same_gs_prefix_change_the_fingerprint(emulator_only, cat_images, tmp_path):
    """gs:// inputs stay as they are (so do hub ids and open_clip tags); their generations and
    the prompts' text decide the fingerprint."""
    from palp.core import storage
    from pipelines.inputs import inputs_fingerprint, portable_inputs

    bucket = _bucket("palp-replaced")
    for p in sorted(cat_images.iterdir()):
        bucket.blob(f"subjects/cat/{p.name}").upload_from_filename(str(p))
    bucket.blob("subjects/cat/notes/unread.txt").upload_from_string(b"prepare reads only the folder's own files")
    bucket.blob("prompts.yaml").upload_from_string(b"prompts: [A sketch of [V] in Paris at night]\n")
    params = {"subjects": [{"name": "cat", "images": "gs://palp-replaced/subjects/cat", "class_word": "cat"}],
              "prompts_file": "gs://palp-replaced/prompts.yaml", "prompts": ["A photo of [V]"],
              "pretrained_model": "CompVis/stable-diffusion-v1-4", "clip_model": "ViT-B-32", "clip_weights": "openai"}
    fingerprint = inputs_fingerprint(params)
    assert inputs_fingerprint(params) == fingerprint  # stable
    assert portable_inputs(params, None) == dict(params, inputs_fingerprint=fingerprint)  # nothing local: nothing to upload

    bucket.blob("subjects/cat/notes/unread.txt").upload_from_string(b"changed")
    assert inputs_fingerprint(params) == fingerprint
    first = sorted(cat_images.iterdir())[0]
    bucket.blob(f"subjects/cat/{first.name}").upload_from_filename(str(first))  # the same name, replaced
    replaced = inputs_fingerprint(params)
    assert replaced != fingerprint
    bucket.blob("prompts.yaml").upload_from_string(b"prompts: [A watercolour of [V]]\n")
    assert inputs_fingerprint(params) != replaced
    changes = [dict(params, prompts=["A photo of [V] at night"]),
               dict(params, subjects=[dict(params["subjects"][0], class_word="kitten")])]
    assert len({inputs_fingerprint(p) for p in changes} | {inputs_fingerprint(params)}) == 3
    assert storage.list_files("gs://palp-replaced/palp", recursive=True) == []


def test_local_inputs_need_a_gs_pipeline_root(local_experiment, tmp_path, capsys):
    from pipelines.cli import main
    from pipelines.experiment import ExperimentError, load_experiment
    from pipelines.inputs import portable_inputs

    params = load_experiment(str(local_experiment))
    with pytest.raises(ExperimentError) as e:
        portable_inputs(params, "/data/palp-root")
    message = str(e.value)
    assert "subject cat's images" in message and "prompts_file" in message and "pretrained_model" in message
    assert "the pipeline root /data/palp-root is not gs://" in message and "give a gs:// --pipeline-root" in message
    assert main(["pipeline", "submit", "--backend", "kubeflow", "--host", "http://127.0.0.1:9", "--config",
                 str(local_experiment)]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "no --pipeline-root was given" in err and "put them on gs://" in err
    one = dict(params, subjects=params["subjects"][:1], prompts_file="", pretrained_model="tiny", clip_weights="")
    with pytest.raises(ExperimentError, match=r"^subject cat's images \(.*/photos/cat\) is a path on this machine.*"
                                              r"put it on gs:// and name the gs:// URI"):
        portable_inputs(one, "minio://mlpipeline/v2")
    with pytest.raises(ExperimentError, match=r"^clip_model local-dir:.* is a folder on this machine"):
        portable_inputs(dict(one, clip_model=f"local-dir:{tmp_path}"), "gs://b/r")
    (tmp_path / "sd" / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ExperimentError, match=r"^pretrained_model .*sd is not a Stable Diffusion model directory: missing vae weights \("):
        portable_inputs(params, "gs://b/r")


def test_dry_run_prints_the_parameters_and_uploads_nothing(local_experiment, emulator_only, capsys):
    from pipelines.cli import main
    from pipelines.experiment import load_experiment
    from pipelines.inputs import portable_inputs

    bucket = _bucket("palp-dry-run")
    assert main(["pipeline", "submit", "--backend", "vertex", "--config", str(local_experiment),
                 "--pipeline-root", "gs://palp-dry-run/palp", "--dry-run"]) == 0
    out = capsys.readouterr()
    printed = json.loads(out.out)
    assert "nothing uploaded" in out.err and "would upload 3 file(s)" in out.err
    assert _objects(bucket) == {}
    assert printed["subjects"][0]["images"].startswith("gs://palp-dry-run/palp/inputs/") and printed["train_steps"] == 3
    # the real submit sends exactly that: the same URIs, the same fingerprint once uploaded
    assert portable_inputs(load_experiment(str(local_experiment)), "gs://palp-dry-run/palp") == printed
    assert _objects(bucket)


def test_bad_experiment_and_submit_arguments(tmp_path, capsys):
    from pipelines.cli import main

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


CONSOLE_LINE = re.compile(r"^\d\d:\d\d:\d\d (start|done|FAILED)\s+(\w+)\s+(.*?)(?:\s+(\d+\.\d)s)?$")


def _task_lines(out: str) -> list[tuple[str, str, str, str]]:
    """(status, step, label, seconds) of each start/end line a local run printed."""
    return [m.groups("") for m in map(CONSOLE_LINE.match, out.splitlines()) if m]


def test_whole_dag_runs_locally(tmp_path, capsys):
    """The embedded demo (the toy world, 2 subjects x 1 prompt x 2 methods) under kfp.local's
    SubprocessRunner, shortened to a few steps; the judge's columns reach Table 2 and the metrics.
    The console gets one line per task start and end, then the table and the report's path; each
    task's whole output is in its log under the pipeline root."""
    from pipelines.cli import main
    from pipelines.experiment import DEFAULT_CONFIG

    assert DEFAULT_CONFIG.name == "demo.yaml"
    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    assert config["pretrained_model"] == "toyworld" and config["judge"] == "toyworld"
    config.update(train_steps=2, save_steps="1,2", checkpoint_every=2, num_samples=2, sample_steps=3, lam=0.5)
    (tmp_path / "demo.yaml").write_text(yaml.safe_dump(config))
    assert main(["pipeline", "run-local", "--config", str(tmp_path / "demo.yaml"), "--pipeline-root", str(tmp_path / "root")]) == 0
    out = capsys.readouterr().out
    assert "comparison (Table 2 shape)" in out and "| palp" in out and "| ti-db" in out and "Judge: identity" in out
    run = next((tmp_path / "root").glob("palp-*"))
    compare = run / "compare"
    _check_console(out, tmp_path / "root", run)
    metrics = json.loads((compare / "scores" / "metrics.json").read_text())
    for method in ("palp", "ti_db", "base"):
        for column in ("style", "ambiance_1", "ambiance_2", "target_prompt", "image_alignment",
                       "judge_style", "judge_place", "judge_time", "judge_class"):
            assert f"{method}/{column}" in metrics
        assert f"{method}/class" not in metrics  # the toy CLIP's class cosine measures nothing here: the judge's replaces it
        assert 0.0 <= metrics[f"{method}/judge_style"] <= 1.0
    assert "palp/judge_identity" in metrics and "ti_db/judge_identity" in metrics
    assert "<html>" in (compare / "report").read_text()
    assert "palp vs ti-db in this run (means, 95% intervals): prompt elements found (judge)" in out  # who won, in words
    assert "(base model " in out and "chance" in out and "ceiling, clean renders" in out  # beside the base model and ceilings
    page = (compare / "report").read_text()
    assert "palp vs ti-db in this run" in page and "concludes nothing about PALP" in page  # the corrected reading, plainly
    assert (compare / "table").read_text().startswith("| method")
    key = (compare / "study" / "key" / "answer_key.csv").read_text()
    assert key.count("\n") - 1 == 2 * 2 * 3  # kinds x subjects x (palp, ti-db, base)
    assert sorted(p.name for p in (compare / "study" / "forms").glob("form-*.xlsx")) == ["form-1.xlsx", "form-2.xlsx", "form-3.xlsx"]
    assert len(list(run.glob("for-loop-*"))) == 4
    for train in run.glob("for-loop-*/train"):  # each train node: its page (HTML) and its final scalars (Metrics)
        page = (train / "report").read_text()
        assert "palp training" in page and "src='data:image/png;base64," in page and "http" not in page
        executed = json.loads((train / "executor_output.json").read_text())["artifacts"]["metrics"]["artifacts"][0]
        assert executed["metadata"]["steps"] == 2.0 and "final_rec_loss" in executed["metadata"]
    _check_frontier_report(tmp_path / "root", tmp_path / "frontier", capsys)


def _check_frontier_report(root: Path, out: Path, capsys) -> None:
    """The toy world's frontier report (evaluation/toyworld/frontier/frontier.py) on a pipeline root
    as run-local leaves it: every alignment run records the lambda it was given (0.5 here), and
    each (method, step) point's elements found is the mean of the judge's columns in scores.csv."""
    import pandas as pd

    sys.path.insert(0, str(REPO / "evaluation" / "toyworld" / "frontier"))
    import frontier

    configs = {}
    for f in root.glob("palp-*/for-loop-*/train/model/training_config.json"):
        cfg = json.loads(f.read_text())
        configs[cfg["method"]] = cfg
    assert set(configs) == {"palp", "ti-db"} and configs["palp"]["lam"] == 0.5
    capsys.readouterr()
    frontier.main(["--root", str(root), "--out", str(out), "--match-step", "1", "--reps", "50"])
    summary = json.loads((out / "summary.json").read_text())
    scores = pd.read_csv(next(root.glob("palp-*/compare/scores/scores.csv")))
    scores["found"] = scores[["Judge: style", "Judge: place", "Judge: time"]].mean(axis=1)
    truth = scores[scores["method"] != "base"].groupby(["method", "step"])["found"].mean()  # the base model is no point
    got = {(p["method"], p["step"]): p for p in summary["points"]}
    assert set(got) == set(truth.index) == {(m, s) for m in ("palp", "ti-db") for s in (1, 2)}
    for key, value in truth.items():
        assert got[key]["Elements found"][0] == pytest.approx(value)
    assert got[("palp", 2)]["lambda"] == 0.5 and got[("ti-db", 2)]["lambda"] is None
    assert "palp lr" in (out / "points.md").read_text()


def _check_console(out: str, root: Path, run: Path) -> None:
    """What the demo's run printed: a start and an end line per task, labelled, in a few dozen lines."""
    lines = out.splitlines()
    assert len(lines) < 60, out
    assert "KFP Executor" not in out and "executor_input" not in out and "Loading weights" not in out
    tasks = _task_lines(out)
    prompt = '"A watercolour of [V] on the beach at sunset"'
    trainings = {f"{subject} · {method} · {prompt}" for subject in ("purple-cat", "pink-robot") for method in ("palp", "ti-db")}
    expected = [("prepare", "purple-cat, pink-robot · 1 prompt · palp, ti-db"), ("compare", "4 trainings")]
    expected += [(step, label) for step in ("train", "sample", "score") for label in trainings]
    for status in ("start", "done"):
        assert sorted((step, label) for s, step, label, _ in tasks if s == status) == sorted(expected), status
    assert all(seconds for status, *_, seconds in tasks if status == "done")
    assert not [t for t in tasks if t[0] == "FAILED"]
    from pipelines.console import newest_logs

    logs_dir = newest_logs(root)
    assert logs_dir.parent == root / "logs" and len(list((root / "logs").iterdir())) == 1
    assert lines[0].startswith("running the pipeline locally") and f"{logs_dir}/" in lines[0]
    assert lines[1:1 + len(tasks)] == [line for line in lines if CONSOLE_LINE.match(line)]  # the one-liners first
    table = lines.index("comparison (Table 2 shape):")
    assert lines[table + 1].startswith("| method") and lines[-1] == f"report: {run / 'compare' / 'scores' / 'report.html'}"
    assert (run / "compare" / "scores" / "report.html").is_file()
    logs = sorted(p.name for p in logs_dir.iterdir())
    assert logs == sorted(["pipeline.log", "prepare.log", "compare.log"] + [
        f"{step}-{subject}-00-{method}.log" for step in ("train", "sample", "score")
        for subject in ("purple-cat", "pink-robot") for method in ("palp", "ti-db")])
    for name in logs:  # every task's whole output: kfp's executor, its input, what the step printed
        text = (logs_dir / name).read_text()
        if name != "pipeline.log":
            assert "Got executor_input" in text and "Wrote executor output file" in text and "finished with status SUCCESS" in text, name
    assert "Running pipeline" in (logs_dir / "pipeline.log").read_text()


def test_a_failing_step_prints_its_error_and_its_log(tmp_path, capsys):
    """A step that fails (here prepare, on an unknown method): its FAILED line, its own error and
    the path of its log, which holds the whole traceback; the command exits 1. With --verbose
    the step's output streams to the console as kfp.local prints it."""
    from pipelines.cli import main
    from pipelines.console import StepFailed

    config = yaml.safe_load((REPO / "evaluation/experiments/tiny.yaml").read_text())
    config.update(methods=["palp", "bogus"], subjects=config["subjects"][:1])
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    root = tmp_path / "root"
    assert main(["pipeline", "run-local", "--config", str(tmp_path / "c.yaml"), "--pipeline-root", str(root)]) == 1
    captured = capsys.readouterr()
    error = "palp.core.settings.ConfigError: unknown method 'bogus'; choose one of palp, ti-db"
    from pipelines.console import newest_logs

    log = newest_logs(root) / "prepare.log"
    assert [t[:2] for t in _task_lines(captured.out)] == [("start", "prepare"), ("FAILED", "prepare")]
    after = captured.out.split("FAILED")[1].splitlines()[1:]
    assert after[0].strip().startswith(error) and after[-1].strip() == f"its log: {log}"
    assert len(captured.out.splitlines()) < 10 and "executor_input" not in captured.out
    assert captured.err.count("\n") == 1 and "error: step prepare" in captured.err and str(log) in captured.err
    assert "Traceback (most recent call last)" in log.read_text() and error in log.read_text()
    assert issubclass(StepFailed, RuntimeError)  # what run_local raises

    assert main(["pipeline", "run-local", "--verbose", "--config", str(tmp_path / "c.yaml"), "--pipeline-root", str(root)]) == 1
    out = capsys.readouterr().out
    assert "Got executor_input" in out and "Traceback (most recent call last)" in out and "FAILED  prepare" in out
    assert "Got executor_input" in log.read_text()
