"""``palp prepare``: photos + target prompts -> a validated, prepared dataset with a manifest.

Output layout (local folder or gs:// prefix)::

    subjects/<name>/000.png ...   centre-cropped, resized to the model's resolution
    manifest.json                 written last: subjects, class words (+ scores), prompts,
                                  clean prompts, elements, tasks, and every input file's fate

A *task* is one (subject(s), target prompt) pair: PALP personalizes for a single prompt, so
training, sampling and scoring run per task.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from palp import __version__
from palp.core import gcs, storage
from palp.core.elements import elements_of
from palp.core.names import check_distinct, check_name
from palp.core.prompts import (DEFAULT_PERSONALIZATION_PROMPT, DEFAULT_PLACEHOLDER, CheckedPrompt, PromptError,
                               placeholder_token, placeholders_in)
from palp.core.settings import DEFAULT_BASE_MODEL, ScoreSettings, Subject, TrainConfig
from palp.core.subject_images import ImageRejected, center_square, decode_rgb

MANIFEST = "manifest.json"


class PrepareError(ValueError):
    """Input that cannot be prepared; the message says what to fix."""


@dataclass
class SubjectSpec:
    name: str  # a short id: "cat", "toy"
    source: str  # folder or gs:// prefix of photos
    class_word: str | None = None  # None: CLIP zero-shot
    placeholder: str = DEFAULT_PLACEHOLDER
    personalization_prompt: str = ""  # default "A photo of <placeholder>"
    # Known ground truth of the subject (the toy world's attributes), recorded in the manifest:
    # `palp score --judge` measures identity against it.
    truth: dict | None = None


@dataclass
class PromptSpec:
    prompt: str
    clean_prompt: str = ""  # default: derived
    elements: dict | None = None  # explicit {"style": ..., "ambiance": [...]}
    subjects: dict[str, str] = field(default_factory=dict)  # explicit {placeholder: subject name}


def load_prompts_file(uri: str) -> list[PromptSpec]:
    """A YAML file with ``prompts:`` entries (a string, or prompt/clean_prompt/elements/subjects)."""
    import yaml

    data = yaml.safe_load(storage.read_text(uri))
    entries = data.get("prompts") if isinstance(data, dict) else data
    if not isinstance(entries, list) or not entries:
        raise PrepareError(f"{uri}: expected a list under 'prompts:'")
    specs = []
    for i, e in enumerate(entries):
        if isinstance(e, str):
            e = {"prompt": e}
        unknown = set(e) - {"prompt", "clean_prompt", "elements", "subjects"}
        if "prompt" not in e or unknown:
            raise PrepareError(f"{uri}: entry {i} needs 'prompt' and may have clean_prompt, elements, subjects (got {sorted(e)})")
        subjects = e.get("subjects") or {}
        for name in subjects.values():
            check_name(str(name), f"{uri}: entry {i}: subject name", PrepareError)
        specs.append(PromptSpec(e["prompt"], e.get("clean_prompt", ""), e.get("elements"), subjects))
    return specs


def dhash(im: Image.Image) -> int:
    """64-bit difference hash: sign of horizontal gradients of a 9x8 grey thumbnail."""
    g = np.asarray(im.convert("L").resize((9, 8), Image.Resampling.LANCZOS), dtype=np.int16)
    bits = (g[:, 1:] > g[:, :-1]).flatten()
    return int("".join("1" if b else "0" for b in bits), 2)


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")  # no metadata, deterministic
    return buf.getvalue()


def subject_entries(source: str) -> tuple[list[str], list[dict]]:
    """The files of a subject's folder to read, and a rejected fate for each entry that is not
    read: a folder inside it (even one named like a photo) and a symbolic link that leads out of
    it (a link to another file of the folder is read). A gs:// prefix has neither."""
    names = storage.list_files(source)
    if gcs.is_gcs(source):
        return names, []
    root = Path(source).resolve()
    keep, refused = [], []
    for entry in sorted(Path(source).iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_symlink():
            try:
                target = entry.resolve()
            except (RuntimeError, OSError):  # a loop of links
                refused.append({"file": entry.name, "status": "rejected", "reason": "a loop of symbolic links"})
                continue
            if not storage.is_under(target, root) or target == root:
                refused.append({"file": entry.name, "status": "rejected",
                                "reason": f"a link to {target}, outside the subject folder; copy the photo into the folder"})
                continue
        if entry.is_dir():
            refused.append({"file": entry.name, "status": "rejected", "reason": "a folder, not a photo (folders are not read)"})
        elif entry.name in names:
            keep.append(entry.name)
        else:
            refused.append({"file": entry.name, "status": "rejected", "reason": "not a regular file (a broken link, a pipe...)"})
    return keep, refused


def prepare_subject_images(spec: SubjectSpec, *, resolution: int, min_size: int, near_duplicate: int,
                           staging: Path, bar) -> tuple[list[dict], list[Image.Image]]:
    """Every file's fate, and the accepted images (original orientation, RGB) for classification."""
    try:
        names, fates = subject_entries(spec.source)
    except gcs.StorageError as e:
        raise PrepareError(f"subject {spec.name}: {e}") from e
    if not names:
        raise PrepareError(f"subject {spec.name}: {spec.source} holds no photos; put 1-5 photos of the subject there")
    bar.total = (bar.total or 0) + len(names)
    accepted, seen_sha, seen_hash = [], {}, []
    for name in names:
        data = storage.read_bytes(storage.join(spec.source, name))
        sha = hashlib.sha256(data).hexdigest()
        fate = {"file": name, "sha256": sha, "bytes": len(data)}
        try:
            if sha in seen_sha:
                raise ImageRejected(name, f"is a duplicate of {seen_sha[sha]}", "")
            im = decode_rgb(data, name=name, min_size=min_size)
            fate["size"] = list(im.size)
            h = dhash(im)
            twin = next(((n, bin(h ^ hh).count("1")) for n, hh in seen_hash if bin(h ^ hh).count("1") <= near_duplicate), None)
            if twin:
                raise ImageRejected(name, f"is a near duplicate of {twin[0]} (hash distance {twin[1]})", "")
        except ImageRejected as e:
            fate.update(status="rejected", reason=e.reason.removeprefix("is "))
        else:
            out = f"subjects/{spec.name}/{len(accepted):03d}.png"
            storage.write_bytes(storage.join_under(staging, "subjects", spec.name, f"{len(accepted):03d}.png"),
                                png_bytes(center_square(im, resolution)))
            fate.update(status="ok", output=out, dhash=f"{h:016x}")
            seen_hash.append((name, h))
            accepted.append(im)
        seen_sha.setdefault(sha, name)
        fates.append(fate)
        bar.update(1)
    if not accepted:
        reasons = "; ".join(f"{f['file']}: {f['reason']}" for f in fates)
        raise PrepareError(f"subject {spec.name}: no usable image in {spec.source} ({reasons})")
    return fates, accepted


def build_tasks(subjects: dict[str, SubjectSpec], prompts: list[PromptSpec], class_words: dict[str, str]) -> list[dict]:
    """One task per (prompt, subject) for [V] prompts; one per prompt for multi-subject ones."""
    tasks = []
    for i, p in enumerate(prompts):
        used = placeholders_in(p.prompt)
        if p.subjects:
            assignments = [dict(p.subjects)]
        elif used == [DEFAULT_PLACEHOLDER]:
            assignments = [{DEFAULT_PLACEHOLDER: s.name} for s in subjects.values() if s.placeholder == DEFAULT_PLACEHOLDER]
        else:
            by_ph = {s.placeholder: s.name for s in subjects.values()}
            assignments = [{ph: by_ph.get(ph) for ph in used}]
        for mapping in assignments:
            missing = [ph for ph in used if not mapping.get(ph)]
            unknown = [n for n in mapping.values() if n and n not in subjects]
            if missing or unknown:
                raise PrepareError(
                    f"prompt {p.prompt!r}: " + (f"no subject for {', '.join(missing)} (give one with "
                    f"--placeholder NAME={missing[0]})" if missing else f"unknown subject {unknown[0]!r}")
                )
            words = {ph: class_words[name] for ph, name in mapping.items()}
            try:
                prompt = CheckedPrompt(p.prompt, words, clean=p.clean_prompt)
                prompt.check_length(clean=True)
                elements = elements_of(prompt, p.elements)
            except PromptError as e:
                raise PrepareError(str(e)) from e
            names = [mapping[ph] for ph in used]
            tasks.append({
                "id": f"{'+'.join(names)}-{i:02d}", "prompt_index": i, "prompt": p.prompt, "clean_prompt": prompt.clean,
                "subjects": {ph: mapping[ph] for ph in used}, "class_words": words,
                "personalization_prompts": {ph: subjects[mapping[ph]].personalization_prompt.replace(subjects[mapping[ph]].placeholder, ph) for ph in used},
                "elements": elements,
            })
    if not tasks:
        raise PrepareError("no task: give at least one --prompt (or --prompts-file) and one --subject")
    return tasks


def model_resolution(pretrained_model: str) -> int:
    """Image side of a base model, from its configs alone (512 for SD-1.x, 64 for tiny)."""
    from palp.models.base_model import resolve_model_dir

    path = resolve_model_dir(pretrained_model)
    unet = json.loads((path / "unet" / "config.json").read_text())
    vae = json.loads((path / "vae" / "config.json").read_text())
    return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)


def subject_specs(entries: list[dict]) -> list[SubjectSpec]:
    """An experiment's (a pipeline parameter's) subject entries as SubjectSpecs: ``name`` and
    ``images``, and optionally ``class_word``, ``placeholder``, ``personalization_prompt`` and
    ``truth`` (a mapping)."""
    return [SubjectSpec(s["name"], s["images"], s.get("class_word") or None, s.get("placeholder") or DEFAULT_PLACEHOLDER,
                        s.get("personalization_prompt") or "", s.get("truth")) for s in entries]



def check_truth(s: SubjectSpec) -> None:
    """A subject's truth is what the toy world's judge reads: its class and identity attributes."""
    if s.truth is None:
        return
    from palp.toyworld.judge import truth_identity  # the only reader of a truth today: the toy world's judge

    try:
        if len(json.dumps(s.truth)) > 10_000:
            raise ValueError("it is larger than a subject's attributes can be")
        truth_identity(s.truth)
    except (TypeError, ValueError) as e:
        raise PrepareError(f"truth of subject {s.name}: {e} (give a toy-world subject file, examples/toyworld/NAME.json)") from e


def check_subjects(subjects: list[SubjectSpec], output: str) -> dict[str, SubjectSpec]:
    """The subjects by name, each checked before any photo is read (name, placeholder,
    personalization prompt, truth, an output outside its photos); fills in the default
    personalization prompt."""
    by_name = {}
    check_distinct([s.name for s in subjects], "subject name", PrepareError)
    for s in subjects:
        check_name(s.name, "subject name", PrepareError)
        if s.name in by_name:
            raise PrepareError(f"subject {s.name!r} is given twice")
        if storage.is_under(output, s.source):
            raise PrepareError(f"--output {output} is (inside) the photo folder of subject {s.name} ({s.source}); "
                               f"choose an output outside it")
        s.personalization_prompt = s.personalization_prompt or DEFAULT_PERSONALIZATION_PROMPT.replace(DEFAULT_PLACEHOLDER, s.placeholder)
        try:
            placeholder_token(s.placeholder)
        except PromptError as e:
            raise PrepareError(f"--placeholder of subject {s.name}: {e}") from e
        try:
            CheckedPrompt(s.personalization_prompt, {s.placeholder: s.class_word or "thing"},
                          what=f"personalization prompt of {s.name}").check_length()
        except PromptError as e:
            raise PrepareError(str(e)) from e
        check_truth(s)
        by_name[s.name] = s
    return by_name


def prepare(subjects: list[SubjectSpec], prompts: list[PromptSpec], output: str, *,
            pretrained_model: str = DEFAULT_BASE_MODEL, resolution: int | None = None,
            min_size: int | None = None, near_duplicate: int = 4, clip_model: str = ScoreSettings.clip_model,
            clip_weights: str = ScoreSettings.clip_weights, vocabulary: str | None = None, min_confidence: float = 0.3,
            pin_clip: bool = False, inputs_fingerprint: str = "", progress: bool = True) -> dict:
    """Prepare subjects and prompts into ``output``; returns the manifest.

    ``inputs_fingerprint`` is only recorded: a pipeline passes a digest of its inputs (the
    photos' generations or contents, the prompts' text), so that KFP's cache key for this
    step changes exactly when the inputs do."""
    if not subjects:
        raise PrepareError("give at least one --subject NAME=DIR_OR_GS_URI")
    storage.check_folder_output(output)
    by_name = check_subjects(subjects, output)
    if not prompts:
        raise PrepareError("give at least one --prompt or a --prompts-file")
    if storage.exists(storage.join(output, MANIFEST)):
        raise PrepareError(f"{output} already holds a prepared dataset; choose another --output")
    # Fail on prompts before reading any image: class words are not needed to check placeholders.
    build_tasks(by_name, prompts, {n: s.class_word or "thing" for n, s in by_name.items()})
    resolution = resolution or model_resolution(pretrained_model)
    min_size = resolution // 2 if min_size is None else min_size
    # The CLIP that derives class words, or with pin_clip the one the scores will use: its pin is
    # recorded, and `palp score` checks it scores with the same weights.
    from palp.models.clip import resolve_clip

    clip = resolve_clip(clip_model, clip_weights) if pin_clip or any(not s.class_word for s in subjects) else None

    staging = Path(tempfile.mkdtemp(prefix="palp-prepare-"))
    try:
        fates, images = _prepare_images(subjects, resolution=resolution, min_size=min_size, near_duplicate=near_duplicate,
                                        staging=staging, progress=progress)
        class_info = derive_class_words(subjects, images, clip_model=clip_model, clip_weights=clip_weights,
                                        vocabulary=vocabulary, min_confidence=min_confidence, resolved=clip)
        manifest = _manifest(subjects, by_name, prompts, fates, class_info, pretrained_model=pretrained_model,
                             resolution=resolution, min_size=min_size, inputs_fingerprint=inputs_fingerprint, clip=clip)
        storage.write_text(staging / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        _publish(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def _prepare_images(subjects: list[SubjectSpec], *, resolution: int, min_size: int, near_duplicate: int, staging: Path,
                    progress: bool) -> tuple[dict[str, list[dict]], dict[str, list[Image.Image]]]:
    """Every subject's file fates and accepted images (``prepare_subject_images``), with one progress bar."""
    fates, images = {}, {}
    with tqdm(total=0, desc="palp prepare: images", unit="img", disable=not progress) as bar:
        for s in subjects:
            fates[s.name], images[s.name] = prepare_subject_images(
                s, resolution=resolution, min_size=min_size, near_duplicate=near_duplicate, staging=staging, bar=bar)
    return fates, images


def _manifest(subjects: list[SubjectSpec], by_name: dict[str, SubjectSpec], prompts: list[PromptSpec],
              fates: dict[str, list[dict]], class_info: dict[str, dict], *, pretrained_model: str, resolution: int,
              min_size: int, inputs_fingerprint: str, clip) -> dict:
    """The prepared dataset's ``manifest.json``."""
    class_words = {n: info["class_word"] for n, info in class_info.items()}
    manifest = {
        "palp_version": __version__, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "pretrained_model": pretrained_model, "resolution": resolution, "min_image_size": min_size,
        "inputs_fingerprint": inputs_fingerprint,
        "subjects": {
            s.name: {"source": s.source, "placeholder": s.placeholder, "personalization_prompt": s.personalization_prompt,
                     **class_info[s.name], "images": [f["output"] for f in fates[s.name] if f["status"] == "ok"],
                     "files": fates[s.name], **({"truth": s.truth} if s.truth is not None else {})}
            for s in subjects
        },
        "tasks": build_tasks(by_name, prompts, class_words),
    }
    if clip is not None:
        manifest["clip"] = clip.record()  # {model, weights, pin}
    return manifest


def _publish(staging: Path, output: str) -> None:
    """Copy the staged dataset to ``output``, its manifest last."""
    if gcs.is_gcs(output):
        storage.upload_dir(staging, output, last=[MANIFEST])
    else:
        _move_into(staging, Path(output))


def _move_into(staging: Path, out: Path) -> None:
    """Move the staged files into ``out``, manifest last (each move is an atomic rename or copy)."""
    files = sorted(p.relative_to(staging) for p in staging.rglob("*") if p.is_file())
    files.sort(key=lambda p: str(p) == MANIFEST)
    for rel in files:
        storage.write_bytes(storage.join_under(out, str(rel)), (staging / rel).read_bytes())


def derive_class_words(subjects, images, *, clip_model, clip_weights, vocabulary, min_confidence,
                       resolved=None) -> dict[str, dict]:
    """The user's class word wins; otherwise CLIP zero-shot over the vocabulary (top 5 kept)."""
    info = {s.name: {"class_word": s.class_word, "class_word_source": "user"} for s in subjects if s.class_word}
    todo = [s for s in subjects if not s.class_word]
    if todo:
        from palp.models.clip import load_clip
        from palp.models.zero_shot import classify_images, load_vocabulary

        words, templates = load_vocabulary(vocabulary)
        clip = load_clip(clip_model, clip_weights, resolved=resolved)
        for s in todo:
            result = classify_images(clip, images[s.name], words, templates, min_confidence=min_confidence)
            info[s.name] = {
                "class_word": result.word, "class_word_source": f"clip:{clip.name}",
                "class_scores": [{"word": w, "score": round(p, 6)} for w, p in result.top],
                "low_confidence": result.low_confidence,
            }
    return info


def summary_table(manifest: dict) -> str:
    import pandas as pd

    rows = [{"subject": name, "file": f["file"], "fate": f["status"], "reason / output": f.get("reason") or f.get("output", "")}
            for name, s in manifest["subjects"].items() for f in s["files"]]
    words = [{"subject": n, "class word": s["class_word"], "source": s["class_word_source"],
              "flag": "LOW CONFIDENCE" if s.get("low_confidence") else ""} for n, s in manifest["subjects"].items()]
    tasks = [{"task": t["id"], "clean prompt": t["clean_prompt"], "elements": len(t["elements"])} for t in manifest["tasks"]]
    return "\n\n".join(pd.DataFrame(x).to_string(index=False) for x in (rows, words, tasks))


def load_manifest(prepared: str) -> dict:
    path = storage.join(prepared, MANIFEST)
    if not storage.exists(path):
        raise PrepareError(f"{prepared} is not a prepared dataset (no {MANIFEST}); run `palp prepare` first")
    return json.loads(storage.read_text(path))


def subject_key(task: dict) -> str:
    """What a task's prompt-free training depends on: its subjects, placeholders, class words
    and personalization prompts (two tasks with the same key train the same TI+DB run)."""
    return json.dumps([task["subjects"], task["class_words"], task["personalization_prompts"]], sort_keys=True)


def fan_out(manifest: dict, methods: list[str]) -> list[dict]:
    """The trainings of a prepared dataset: ``{task_id, method, tasks}`` per run, where
    ``task_id`` is the task it trains and ``tasks`` the tasks sampled from it.

    A method whose training ignores the target prompt (TI+DB) trains once per subject set and
    samples each of its prompts; the others train once per task."""
    from palp.core.settings import trains_per_subject

    runs = []
    for m in methods:
        if trains_per_subject(m):
            groups: dict[str, list[str]] = {}
            for t in manifest["tasks"]:
                groups.setdefault(subject_key(t), []).append(t["id"])
            runs += [{"task_id": ids[0], "method": m, "tasks": ids} for ids in groups.values()]
        else:
            runs += [{"task_id": t["id"], "method": m, "tasks": [t["id"]]} for t in manifest["tasks"]]
    return runs


def task_config(prepared: str, task_id: str | None = None, **settings):
    """The TrainConfig of one task of a prepared dataset: its subjects (the prepared photos),
    target and clean prompt and elements, with ``settings`` (any other TrainConfig field)."""
    root, task = load_task(prepared, task_id)
    subjects = [Subject(ph, str(root / "subjects" / name), task["class_words"][ph], task["personalization_prompts"][ph], name)
                for ph, name in task["subjects"].items()]
    return TrainConfig(subjects=subjects, target_prompt=task["prompt"], clean_prompt=task["clean_prompt"], task_id=task["id"],
                       elements=task["elements"], **settings)


def load_task(prepared: str, task_id: str | None) -> tuple[Path, dict]:
    """(local folder of the prepared dataset, the task); a gs:// dataset is fetched into the cache."""
    from palp.core.cache import cache_root

    manifest = load_manifest(prepared)
    tasks = {t["id"]: t for t in manifest["tasks"]}
    if task_id is None:
        if len(tasks) != 1:
            raise PrepareError(f"{prepared} holds {len(tasks)} tasks; choose one with --task ({', '.join(tasks)})")
        task_id = next(iter(tasks))
    if task_id not in tasks:
        raise PrepareError(f"no task {task_id!r} in {prepared}; tasks: {', '.join(tasks)}")
    return storage.local_dir(prepared, cache=cache_root()), tasks[task_id]
