"""What a submitted run reads from this machine: its local inputs, uploaded content-addressed
under the pipeline root, and ``inputs_fingerprint``, the digest of what prepare reads that
enters KFP's cache key."""

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from pipelines.experiment import ExperimentError

# palp's built-in base models: names, not paths.
BUILTIN_MODELS = ("tiny", "tiny-sd2", "tiny-sd2-v", "tiny-sdxl", "toyworld")


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
        from palp.core import storage

        folder = storage.join(pipeline_root, "inputs", self.digest)
        return storage.join(folder, self.file) if self.file else folder


def _is_url(value: str) -> bool:
    return "://" in value


def _sd_names(path: Path, what: str) -> list[str]:
    """The files of a local diffusers folder that palp loads (and pins): palp.models.base_model.loaded_files."""
    from palp.core import storage
    from palp.models.base_model import ModelError, check_sd_layout, loaded_files

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
    from palp.core import storage
    from palp.steps.prepare import subject_entries

    found: dict[tuple, LocalInput] = {}
    for i, s in enumerate(params.get("subjects") or []):
        value, what = str(s["images"]), f"subject {s['name']}'s images"
        if _is_url(value):
            continue
        path = Path(value).expanduser()
        if not path.is_dir():
            raise ExperimentError(f"{what}: {value} is not a folder; give a folder of 1-5 photos or a gs:// prefix")
        names = subject_entries(str(path))[0]  # what prepare reads: the folder's files, no links out of it
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
    from palp.core import gcs, storage

    versions = gcs.object_generations(uri)
    if top_level:
        versions = {n: g for n, g in versions.items() if "/" not in n}
    if not versions:
        raise ExperimentError(f"{what}: {uri} holds no files; check the bucket and prefix")
    return "generations:" + storage.versions_digest(versions)


def _fingerprint(params: dict, local: dict[tuple, LocalInput]) -> str:
    """inputs_fingerprint with the local inputs' digests already computed (``local_inputs``)."""
    import hashlib
    import json

    from palp.core import gcs, storage

    entries: dict[str, str] = {}
    for i, s in enumerate(params.get("subjects") or []):
        for key, value in sorted(s.items()):
            if key != "images":
                entries[f"subjects/{i}/{key}"] = json.dumps(value, sort_keys=True)
        item = local.get(("subjects", i, "images"))
        entries[f"subjects/{i}/images"] = ("sha256:" + item.digest) if item else (
            _prefix_version(str(s["images"]), f"subject {s['name']}'s images", top_level=True)
            if gcs.is_gcs(s["images"]) else str(s["images"]))
    entries["prompts"] = json.dumps(list(params.get("prompts") or []))
    prompts_file = str(params.get("prompts_file") or "")
    if prompts_file:  # its text: the same on this machine and once uploaded
        entries["prompts_file"] = "sha256:" + hashlib.sha256(storage.read_bytes(prompts_file)).hexdigest()
    model = str(params.get("pretrained_model") or "")
    item = local.get(("pretrained_model",))
    entries["pretrained_model"] = ("sha256:" + item.digest) if item else (
        _prefix_version(model, "pretrained_model", top_level=False) if gcs.is_gcs(model) else model)
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

    from palp.core import gcs, storage

    try:
        present = gcs.object_generations(folder)
        foreign = sorted(set(present) - set(item.names))
        if foreign:
            raise ExperimentError(f"{folder} should hold only the files of {item.what} ({item.source}) but also holds "
                                  f"{', '.join(foreign)}; remove them, or the whole folder")
        missing = [n for n in item.names if n not in present]
        for name in missing:  # each object appears whole; an interrupted upload is completed next time
            storage.write_bytes(storage.join(folder, name), (item.folder / name).read_bytes())
    except GoogleAPIError as e:  # a missing bucket, no permission
        raise gcs.StorageError(f"cannot upload {item.what} to {folder}: {type(e).__name__}: {e}") from e
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
    from palp.core import gcs, storage

    value = str(params.get("clip_model") or "")
    if value.startswith("local-dir:"):  # open_clip reads such a folder from local disk only
        raise ExperimentError(
            f"clip_model {value} is a folder on this machine, which the cluster cannot read: give an open_clip name "
            f"(ViT-B-32) with clip_weights a checkpoint file (local files are uploaded, gs:// ones used as they are)")
    local = local_inputs(params)
    if local and not (pipeline_root and gcs.is_gcs(pipeline_root)):
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
