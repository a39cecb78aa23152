"""Running the DAG locally through ``kfp.local``, in subprocesses or in the step image.

Each step starts from an empty model cache of its own, as on a cluster (unless
``share_cache``), gets its share of the cores, and writes its output to a log of its own
under the pipeline root (``pipelines.console``: the console shows one line per step start
and end, or everything with ``verbose``).
"""

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Optional

from pipelines.console import RunConsole
from pipelines.experiment import ExperimentError, load_experiment
from pipelines.inputs import inputs_fingerprint
from pipelines.palp_pipeline import build_pipeline
from pipelines.runs_compare import newest_run

# Environment handed to step containers (DockerRunner): the emulator and project, and XLA's
# device (PJRT_DEVICE=CPU trains on XLA:CPU in the tpu image where there is no TPU), if set.
PASSED_ENV = ("STORAGE_EMULATOR_HOST", "GOOGLE_CLOUD_PROJECT", "HF_HUB_OFFLINE", "PALP_STORAGE_RETRIES", "PJRT_DEVICE")


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


def docker_runner(root: Path, *, gpus: bool = False, share_cache: bool = False):
    """kfp.local.DockerRunner on the host network, as the calling user. The image's entrypoint
    (palp) is replaced by the component's command.

    Every step container starts with an empty model cache in its own filesystem, as a pod
    does on a cluster; ``share_cache`` (a speed option) shares one under the pipeline root."""
    from kfp import local

    cache = {"PALP_CACHE": str(root / ".palp-cache"), "HF_HOME": str(root / ".hf-home")} if share_cache else \
        {"PALP_CACHE": "/tmp/palp-cache", "HF_HOME": "/tmp/hf-home"}  # not mounted: gone with the container
    env = {**cache, "MPLCONFIGDIR": "/tmp/matplotlib",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS") or str(_local_threads())}  # containers inherit nothing
    env.update({k: os.environ[k] for k in PASSED_ENV if k in os.environ})
    kwargs = {}
    if gpus:
        import docker

        kwargs["device_requests"] = [docker.types.DeviceRequest(count=-1, capabilities=[["gpu"]])]
    return local.DockerRunner(network_mode="host", user=f"{os.getuid()}:{os.getgid()}", entrypoint=["/usr/bin/env"],
                              environment=env, **kwargs)


def _runner(runner: str, root: Path, params: dict, *, image: Optional[str], gpus: bool, share_cache: bool):
    """The kfp.local runner, the parameters it gets (docker: inputs staged under the root) and the image."""
    from kfp import local

    from palp.step_image import default_tag

    if runner == "subprocess":
        return local.SubprocessRunner(use_venv=False), params, image
    if runner == "docker":
        chosen = docker_runner(root, gpus=gpus, share_cache=share_cache)
        return chosen, _stage_inputs(params, root), image or default_tag("gpu" if gpus else "cpu")
    raise ExperimentError(f"--runner must be subprocess or docker, not {runner!r}")


def run_local(config: Optional[str] = None, *, runner: str = "subprocess", pipeline_root: Optional[str] = None,
              image: Optional[str] = None, train_image: Optional[str] = None, gpus: bool = False, share_cache: bool = False,
              verbose: bool = False) -> Path:
    """Run the whole DAG with kfp.local; returns the pipeline root holding every artifact.

    ``runner="docker"`` runs every step in the step image (default: the locally built
    ``palp-cpu:<version>``), with ``gpus`` passing the host's GPUs through, and the train step
    in ``train_image`` if given (the tpu image: with ``PJRT_DEVICE=CPU`` in this environment, it
    trains on XLA:CPU where there is no TPU). Each step starts
    from an empty model cache, as on a cluster, unless ``share_cache``: only parameters and
    artifacts travel between steps. The console gets one line per step start and end, each
    step's output goes to ``<root>/logs/<step>[-<task>-<method>].log`` (``verbose``: and to
    the console, as kfp.local prints it); a failed step raises ``console.StepFailed`` with
    its error and the path of its log."""
    from kfp import local

    if train_image and runner != "docker":
        raise ExperimentError("--train-image needs --runner docker (subprocess steps run in this environment)")
    params = load_experiment(config)
    params["inputs_fingerprint"] = inputs_fingerprint(params)  # recorded in the manifest, as on a cluster
    root = writable_root(Path(pipeline_root or tempfile.mkdtemp(prefix="palp-pipeline-")).resolve())
    chosen, params, image = _runner(runner, root, params, image=image, gpus=gpus, share_cache=share_cache)
    local.init(runner=chosen, pipeline_root=str(root), raise_on_error=True)
    with RunConsole(root, verbose=verbose) as console, _threads_per_step(runner), _cache_per_step(runner, root, share_cache):
        try:
            # resources are ignored locally
            build_pipeline("kubeflow", image=image, train_image=train_image, retries=False)(**params)
        except Exception as e:
            if not console.failures:
                raise
            raise console.failed() from e
    return root


def writable_root(root: Path) -> Path:
    """``root``, created, after a write into it: ExperimentError naming it if it cannot be written."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".palp-write-check-"):
            pass
    except OSError as e:
        raise ExperimentError(f"--pipeline-root {root} cannot be written ({e.strerror or e}); choose a folder you can "
                              f"write to") from None
    return root


STEP_CACHES = ".step-caches"


@contextlib.contextmanager
def _cache_per_step(runner: str, root: Path, share_cache: bool):
    """Subprocess steps share the machine's disk; each gets its own empty PALP_CACHE (under
    ``root/.step-caches``, removed afterwards) unless ``share_cache``. Docker steps: docker_runner."""
    from palp.core.cache import PROCESS_FIELD

    if runner != "subprocess" or share_cache:
        yield
        return
    old = os.environ.get("PALP_CACHE")
    os.environ["PALP_CACHE"] = str(root / STEP_CACHES / PROCESS_FIELD)
    try:
        yield
    finally:
        if old is None:
            del os.environ["PALP_CACHE"]
        else:
            os.environ["PALP_CACHE"] = old
        if not os.environ.get("PALP_KEEP_STEP_CACHES"):
            import shutil

            shutil.rmtree(root / STEP_CACHES, ignore_errors=True)


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
    run = newest_run(root)
    if run is None:
        return {}
    return {task.name: sorted(task.iterdir()) for task in sorted(p for p in run.iterdir() if p.is_dir())}
