"""Running the DAG: locally through ``kfp.local``, or submitted to Vertex AI or Kubeflow.

Experiment configs (``evaluation/experiments/*.yaml``) hold the pipeline's parameter values;
relative paths in them (subject images, a prompts file) are resolved against the working
directory, then the repository.
"""

import contextlib
import inspect
import os
import tempfile
from pathlib import Path
from typing import Optional

import yaml

from pipelines.palp_pipeline import PIPELINE_NAME, PipelineError, build_pipeline, compile_pipeline

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "evaluation" / "experiments" / "demo.yaml"


class ExperimentError(PipelineError):
    """An experiment config the pipeline cannot take; the message says what to fix."""


def _resolve(path: str) -> str:
    if "://" in path or os.path.isabs(path):
        return path
    for base in (Path.cwd(), REPO):
        if (base / path).exists():
            return str((base / path).resolve())
    raise ExperimentError(f"{path} not found (relative to {Path.cwd()} or {REPO})")


def load_experiment(path: Optional[str] = None) -> dict:
    """Pipeline parameter values from an experiment YAML, validated against the pipeline."""
    path = Path(path) if path else DEFAULT_CONFIG
    try:
        params = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ExperimentError(f"cannot read experiment config {path}: {e}") from e
    accepted = set(inspect.signature(build_pipeline().pipeline_func).parameters)
    unknown = sorted(set(params) - accepted)
    if unknown:
        raise ExperimentError(f"{path}: unknown setting(s) {', '.join(unknown)}; the pipeline takes {', '.join(sorted(accepted))}")
    if not params.get("subjects"):
        raise ExperimentError(f"{path}: 'subjects' is required (a list of {{name, images, class_word}})")
    for s in params["subjects"]:
        if not isinstance(s, dict) or not {"name", "images"} <= set(s):
            raise ExperimentError(f"{path}: each subject needs 'name' and 'images', got {s!r}")
        s["images"] = _resolve(s["images"])
    if params.get("prompts_file"):
        params["prompts_file"] = _resolve(params["prompts_file"])
    return params


# Environment handed to step containers (DockerRunner): the emulator and project, if set.
PASSED_ENV = ("STORAGE_EMULATOR_HOST", "GOOGLE_CLOUD_PROJECT", "HF_HUB_OFFLINE", "PALP_STORAGE_RETRIES")


def _stage_inputs(params: dict, root: Path) -> dict:
    """Copy local subject folders and prompts file under the pipeline root, the one folder
    DockerRunner mounts into step containers; gs:// inputs stay as they are."""
    import shutil

    params = dict(params, subjects=[dict(s) for s in params["subjects"]])
    for s in params["subjects"]:
        if "://" not in s["images"]:
            dest = root / "inputs" / s["name"]
            shutil.copytree(s["images"], dest, dirs_exist_ok=True)
            s["images"] = str(dest)
    if params.get("prompts_file") and "://" not in params["prompts_file"]:
        dest = root / "inputs" / Path(params["prompts_file"]).name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(params["prompts_file"], dest)
        params["prompts_file"] = str(dest)
    return params


def docker_runner(root: Path, *, gpus: bool = False):
    """kfp.local.DockerRunner on the host network, as the calling user, sharing a model cache
    under the pipeline root. The image's entrypoint (palp) is replaced by the component's command."""
    from kfp import local

    env = {"PALP_CACHE": str(root / ".palp-cache"), "HF_HOME": str(root / ".hf-home"), "MPLCONFIGDIR": "/tmp/matplotlib",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS") or str(_local_threads())}  # containers inherit nothing
    env.update({k: os.environ[k] for k in PASSED_ENV if k in os.environ})
    kwargs = {}
    if gpus:
        import docker

        kwargs["device_requests"] = [docker.types.DeviceRequest(count=-1, capabilities=[["gpu"]])]
    return local.DockerRunner(network_mode="host", user=f"{os.getuid()}:{os.getgid()}", entrypoint=["/usr/bin/env"],
                              environment=env, **kwargs)


def run_local(config: Optional[str] = None, *, runner: str = "subprocess", pipeline_root: Optional[str] = None,
              image: Optional[str] = None, gpus: bool = False) -> Path:
    """Run the whole DAG with kfp.local; returns the pipeline root holding every artifact.

    ``runner="docker"`` runs every step in the step image (default: the locally built
    ``palp-cpu:<version>``), with ``gpus`` passing the host's GPUs through."""
    from kfp import local

    from palp.image import default_tag

    params = load_experiment(config)
    root = Path(pipeline_root or tempfile.mkdtemp(prefix="palp-pipeline-")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    if runner == "subprocess":
        chosen = local.SubprocessRunner(use_venv=False)
    elif runner == "docker":
        chosen, params = docker_runner(root, gpus=gpus), _stage_inputs(params, root)
        image = image or default_tag("gpu" if gpus else "cpu")
    else:
        raise ExperimentError(f"--runner must be subprocess or docker, not {runner!r}")
    local.init(runner=chosen, pipeline_root=str(root), raise_on_error=True)
    with _threads_per_step(runner):
        build_pipeline("kubeflow", image=image, retries=False)(**params)  # resources are ignored locally
    return root


# kfp.local runs up to two ParallelFor iterations at once.
LOCAL_PARALLEL_TASKS = 2


def _local_threads() -> int:
    return max(1, (os.cpu_count() or 1) // LOCAL_PARALLEL_TASKS)


@contextlib.contextmanager
def _threads_per_step(runner: str):
    """Give each locally run step its share of the cores (unless OMP_NUM_THREADS is set).

    Two torch processes that each start a thread per core fight over the cores (OpenMP
    threads spin at their barriers): on 2 cores the demo's train steps ran about 20 times
    slower than one at a time. Subprocess steps inherit this environment."""
    if runner != "subprocess" or "OMP_NUM_THREADS" in os.environ:  # docker: docker_runner's environment
        yield
        return
    os.environ["OMP_NUM_THREADS"] = str(_local_threads())
    try:
        yield
    finally:
        del os.environ["OMP_NUM_THREADS"]


def find_outputs(root: Path) -> dict[str, list[Path]]:
    """Artifacts of the newest run under a local pipeline root, by task folder."""
    runs = sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith(PIPELINE_NAME)), key=lambda p: p.stat().st_mtime)
    if not runs:
        return {}
    out: dict[str, list[Path]] = {}
    for task in sorted(p for p in runs[-1].iterdir() if p.is_dir()):
        out[task.name] = sorted(task.iterdir())
    return out


def _temp_yaml() -> str:
    with tempfile.NamedTemporaryFile(prefix="palp-pipeline-", suffix=".yaml", delete=False) as f:
        return f.name


def vertex_job(package: str, params: dict, *, project: str, region: str, pipeline_root: str, credentials=None,
               enable_caching: bool = True):
    """The Vertex AI PipelineJob for a compiled package (not yet submitted)."""
    from google.cloud import aiplatform

    return aiplatform.PipelineJob(
        display_name=PIPELINE_NAME, template_path=package, pipeline_root=pipeline_root, parameter_values=params,
        project=project, location=region, enable_caching=enable_caching, credentials=credentials,
    )


def submit_vertex(params: dict, *, project: str, region: str, pipeline_root: str, experiment: Optional[str] = None,
                  service_account: Optional[str] = None, accelerator: Optional[str] = None, backend: str = "vertex"):
    package = compile_pipeline(backend, _temp_yaml(), accelerator=accelerator)
    job = vertex_job(package, params, project=project, region=region, pipeline_root=pipeline_root)
    job.submit(service_account=service_account, experiment=experiment)
    return job


def kubeflow_run_args(package: str, params: dict, *, experiment: Optional[str] = None) -> dict:
    """Keyword arguments of kfp.Client.create_run_from_pipeline_package."""
    return {"pipeline_file": package, "arguments": params, "run_name": PIPELINE_NAME,
            "experiment_name": experiment, "enable_caching": True}


def submit_kubeflow(params: dict, *, host: str, experiment: Optional[str] = None, accelerator: Optional[str] = None):
    import kfp

    package = compile_pipeline("kubeflow", _temp_yaml(), accelerator=accelerator)
    return kfp.Client(host=host).create_run_from_pipeline_package(**kubeflow_run_args(package, params, experiment=experiment))
