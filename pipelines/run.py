"""Running the DAG: locally through ``kfp.local``, or submitted to Vertex AI or Kubeflow.

Experiment configs (``evaluation/experiments/*.yaml``) hold the pipeline's parameter values;
relative paths in them (subject images, a prompts file) are resolved against the working
directory, then the repository.
"""

import contextlib
import inspect
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
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


# -- submitting: local inputs uploaded, content-addressed -----------------------------------

# palp's built-in base models: names, not paths.
BUILTIN_MODELS = ("tiny", "toyworld")


@dataclass
class LocalInput:
    """One input of an experiment that is a file or folder of this machine."""

    what: str  # how messages name it: "subject cat's images", "prompts_file", ...
    source: str  # the parameter's value, as given
    folder: Path  # the folder holding the files
    names: list[str]  # the files (relative to ``folder``) that are hashed and uploaded
    file: Optional[str] = None  # single-file inputs: the parameter names this file in its folder
    digest: str = ""  # storage.folder_digest(folder, names): the same files, the same digest

    def uri(self, pipeline_root: str) -> str:
        """Where the files go: ``<pipeline-root>/inputs/<digest>`` (a file keeps its name in it)."""
        from palp import storage

        folder = storage.join(pipeline_root, "inputs", self.digest)
        return storage.join(folder, self.file) if self.file else folder


def _is_url(value: str) -> bool:
    return "://" in value


def _sd_names(path: Path, what: str) -> list[str]:
    """The files of a local diffusers folder that palp loads (and pins): palp.models.loaded_files."""
    from palp import storage
    from palp.models import ModelError, check_sd_layout, loaded_files

    try:
        check_sd_layout(path, spec=f"{what} {path}")
    except ModelError as e:
        raise ExperimentError(str(e)) from e
    return loaded_files(storage.list_files(path, recursive=True))


def local_inputs(params: dict) -> dict[tuple, LocalInput]:
    """The inputs of ``params`` that are paths of this machine, by where they sit in ``params``
    (("subjects", 0, "images"), ("prompts_file",), ("pretrained_model",), ("clip_weights",)),
    each with the files that travel and their digest. Hub ids, ``tiny``, ``toyworld``, open_clip
    tags and gs:// URIs are not local. A local input that cannot be used is refused here."""
    from palp import storage

    found: dict[tuple, LocalInput] = {}
    for i, s in enumerate(params.get("subjects") or []):
        value, what = str(s["images"]), f"subject {s['name']}'s images"
        if _is_url(value):
            continue
        path = Path(value).expanduser()
        if not path.is_dir():
            raise ExperimentError(f"{what}: {value} is not a folder; give a folder of 1-5 photos or a gs:// prefix")
        names = storage.list_files(path)  # what prepare reads: the folder's files, not its subfolders
        if not names:
            raise ExperimentError(f"{what}: {value} holds no files; put 1-5 photos of the subject there")
        found[("subjects", i, "images")] = LocalInput(what, value, path, names)
    value = str(params.get("prompts_file") or "")
    if value and not _is_url(value):
        path = Path(value).expanduser()
        if not path.is_file():
            raise ExperimentError(f"prompts_file {value} is not a file")
        found[("prompts_file",)] = LocalInput("prompts_file", value, path.parent, [path.name], file=path.name)
    value = str(params.get("pretrained_model") or "")
    if value and value not in BUILTIN_MODELS and not _is_url(value) and Path(value).expanduser().is_dir():
        path = Path(value).expanduser()
        found[("pretrained_model",)] = LocalInput("pretrained_model", value, path, _sd_names(path, "pretrained_model"))
    value = str(params.get("clip_weights") or "")
    looks_like_path = "/" in value or os.sep in value or "." in value  # open_clip tags (openai, laion2b_s34b_b79k) have neither
    if value and looks_like_path and not _is_url(value) and Path(value).expanduser().is_file():
        path = Path(value).expanduser()
        found[("clip_weights",)] = LocalInput("clip_weights", value, path.parent, [path.name], file=path.name)
    for item in found.values():
        item.digest = storage.folder_digest(item.folder, item.names)
    return found


def _prefix_version(uri: str, what: str, *, top_level: bool) -> str:
    """The generations of the objects under a gs:// prefix (``top_level``: only the files
    directly in it, which is what prepare reads of a subject's folder)."""
    from palp import storage

    versions = storage.object_generations(uri)
    if top_level:
        versions = {n: g for n, g in versions.items() if "/" not in n}
    if not versions:
        raise ExperimentError(f"{what}: {uri} holds no files; check the bucket and prefix")
    return "generations:" + storage.versions_digest(versions)


def _fingerprint(params: dict, local: dict[tuple, LocalInput]) -> str:
    """inputs_fingerprint with the local inputs' digests already computed (``local_inputs``)."""
    import hashlib
    import json

    from palp import storage

    entries: dict[str, str] = {}
    for i, s in enumerate(params.get("subjects") or []):
        for key, value in sorted(s.items()):
            if key != "images":
                entries[f"subjects/{i}/{key}"] = json.dumps(value, sort_keys=True)
        item = local.get(("subjects", i, "images"))
        entries[f"subjects/{i}/images"] = ("sha256:" + item.digest) if item else (
            _prefix_version(str(s["images"]), f"subject {s['name']}'s images", top_level=True)
            if storage.is_gcs(s["images"]) else str(s["images"]))
    entries["prompts"] = json.dumps(list(params.get("prompts") or []))
    prompts_file = str(params.get("prompts_file") or "")
    if prompts_file:  # its text: the same on this machine and once uploaded
        entries["prompts_file"] = "sha256:" + hashlib.sha256(storage.read_bytes(prompts_file)).hexdigest()
    model = str(params.get("pretrained_model") or "")
    item = local.get(("pretrained_model",))
    entries["pretrained_model"] = ("sha256:" + item.digest) if item else (
        _prefix_version(model, "pretrained_model", top_level=False) if storage.is_gcs(model) else model)
    item = local.get(("clip_weights",))
    entries["clip_weights"] = ("sha256:" + item.digest) if item else str(params.get("clip_weights") or "")
    return storage.versions_digest(entries)


def inputs_fingerprint(params: dict) -> str:
    """A digest of what ``prepare`` reads, for KFP's cache key (the pipeline's
    ``inputs_fingerprint`` parameter): the subjects' names, class words and other settings; the
    photos (a local folder: their names and bytes; a gs:// prefix: its objects' generations);
    the prompts and the prompts file's text; a local base model's or CLIP checkpoint's bytes, a
    gs:// model's generations. The same inputs give the same fingerprint on any machine, and
    photos replaced under the same gs:// prefix change it. Reads gs:// listings, writes nothing."""
    return _fingerprint(params, local_inputs(params))


def _set(params: dict, key: tuple, value: str) -> None:
    target = params
    for k in key[:-1]:
        target = target[k]
    target[key[-1]] = value


def _not_on_this_machine(local: dict[tuple, LocalInput], pipeline_root: Optional[str]) -> ExperimentError:
    items = list(local.values())
    listing = ", ".join(f"{item.what} ({item.source})" for item in items)
    one = len(items) == 1
    why = "no --pipeline-root was given" if not pipeline_root else f"the pipeline root {pipeline_root} is not gs://"
    return ExperimentError(
        f"{listing} {'is a path' if one else 'are paths'} on this machine, which the cluster cannot read, and {why}: "
        f"put {'it' if one else 'them'} on gs:// and name the gs:// {'URI' if one else 'URIs'} in the experiment config, "
        f"or give a gs:// --pipeline-root (submit then uploads local inputs to <pipeline-root>/inputs/<content hash>/)")


def _upload(item: LocalInput, folder: str) -> int:
    """Complete the content-addressed copy of ``item`` under ``folder``; returns how many files were uploaded."""
    from google.api_core.exceptions import GoogleAPIError

    from palp import storage

    try:
        present = storage.object_generations(folder)
        foreign = sorted(set(present) - set(item.names))
        if foreign:
            raise ExperimentError(f"{folder} should hold only the files of {item.what} ({item.source}) but also holds "
                                  f"{', '.join(foreign)}; remove them, or the whole folder")
        missing = [n for n in item.names if n not in present]
        for name in missing:  # each object appears whole; an interrupted upload is completed next time
            storage.write_bytes(storage.join(folder, name), (item.folder / name).read_bytes())
    except GoogleAPIError as e:  # a missing bucket, no permission
        raise storage.StorageError(f"cannot upload {item.what} to {folder}: {type(e).__name__}: {e}") from e
    return len(missing)


def portable_inputs(params: dict, pipeline_root: Optional[str], *, upload: bool = True,
                    say: Optional[Callable[[str], None]] = None) -> dict:
    """The parameter values a cluster can use: every local input (a subject's images folder,
    ``prompts_file``, a local ``pretrained_model`` folder, a local ``clip_weights`` file)
    uploaded to ``<pipeline_root>/inputs/<content hash>/`` and replaced by that gs:// URI, and
    ``inputs_fingerprint`` set (from the local files, so a dry run and a real submit agree).

    The same files give the same URI: a second submit uploads nothing, and a partial upload is
    completed. ``upload=False`` (a dry run) computes the URIs and writes nothing. A local input
    with a pipeline root that is not gs:// is refused with one ExperimentError naming it.
    ``say`` hears one line per local input."""
    from palp import storage

    value = str(params.get("clip_model") or "")
    if value.startswith("local-dir:"):  # open_clip reads such a folder from local disk only
        raise ExperimentError(
            f"clip_model {value} is a folder on this machine, which the cluster cannot read: give an open_clip name "
            f"(ViT-B-32) with clip_weights a checkpoint file (local files are uploaded, gs:// ones used as they are)")
    local = local_inputs(params)
    if local and not (pipeline_root and storage.is_gcs(pipeline_root)):
        raise _not_on_this_machine(local, pipeline_root)
    out = dict(params, subjects=[dict(s) for s in params["subjects"]])
    out["inputs_fingerprint"] = _fingerprint(params, local)
    for key, item in local.items():
        uri = item.uri(pipeline_root)
        folder = storage.join(pipeline_root, "inputs", item.digest)
        if upload:
            n = _upload(item, folder)
            if say:
                say(f"{item.what}: {'uploaded %d of %d file(s)' % (n, len(item.names)) if n else 'already uploaded'} -> {uri}")
        elif say:
            say(f"{item.what}: would upload {len(item.names)} file(s) (unless already there) -> {uri}")
        _set(out, key, uri)
    return out


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


def run_local(config: Optional[str] = None, *, runner: str = "subprocess", pipeline_root: Optional[str] = None,
              image: Optional[str] = None, gpus: bool = False, share_cache: bool = False) -> Path:
    """Run the whole DAG with kfp.local; returns the pipeline root holding every artifact.

    ``runner="docker"`` runs every step in the step image (default: the locally built
    ``palp-cpu:<version>``), with ``gpus`` passing the host's GPUs through. Each step starts
    from an empty model cache, as on a cluster, unless ``share_cache``: only parameters and
    artifacts travel between steps."""
    from kfp import local

    from palp.image import default_tag

    params = load_experiment(config)
    params["inputs_fingerprint"] = inputs_fingerprint(params)  # recorded in the manifest, as on a cluster
    root = Path(pipeline_root or tempfile.mkdtemp(prefix="palp-pipeline-")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    if runner == "subprocess":
        chosen = local.SubprocessRunner(use_venv=False)
    elif runner == "docker":
        chosen, params = docker_runner(root, gpus=gpus, share_cache=share_cache), _stage_inputs(params, root)
        image = image or default_tag("gpu" if gpus else "cpu")
    else:
        raise ExperimentError(f"--runner must be subprocess or docker, not {runner!r}")
    local.init(runner=chosen, pipeline_root=str(root), raise_on_error=True)
    with _threads_per_step(runner), _cache_per_step(runner, root, share_cache):
        build_pipeline("kubeflow", image=image, retries=False)(**params)  # resources are ignored locally
    return root


STEP_CACHES = ".step-caches"


@contextlib.contextmanager
def _cache_per_step(runner: str, root: Path, share_cache: bool):
    """Subprocess steps share the machine's disk; each gets its own empty PALP_CACHE (under
    ``root/.step-caches``, removed afterwards) unless ``share_cache``. Docker steps: docker_runner."""
    from palp.tiny import PROCESS_FIELD

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


def kubeflow_run_args(package: str, params: dict, *, experiment: Optional[str] = None,
                      pipeline_root: Optional[str] = None) -> dict:
    """Keyword arguments of kfp.Client.create_run_from_pipeline_package (``pipeline_root``
    None: the cluster's default root)."""
    return {"pipeline_file": package, "arguments": params, "run_name": PIPELINE_NAME,
            "experiment_name": experiment, "enable_caching": True, "pipeline_root": pipeline_root}


def submit_kubeflow(params: dict, *, host: str, experiment: Optional[str] = None, accelerator: Optional[str] = None,
                    pipeline_root: Optional[str] = None):
    import kfp

    package = compile_pipeline("kubeflow", _temp_yaml(), accelerator=accelerator)
    args = kubeflow_run_args(package, params, experiment=experiment, pipeline_root=pipeline_root)
    return kfp.Client(host=host).create_run_from_pipeline_package(**args)
