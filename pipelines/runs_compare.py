"""``palp runs compare``: finished runs side by side, the local counterpart of the run-compare
view of the KFP and Vertex UIs.

Each ROOT is a local pipeline root (what ``palp pipeline run-local --pipeline-root ROOT``
fills; its newest ``palp-<timestamp>`` run is read), one such run folder, or a scores folder
(``palp score --output``, or a run's ``compare/scores``: ``scores.csv`` and ``table2.csv``).
One Markdown document (``compare.md``, also printed) and one self-contained HTML page
(``compare.html``: images as ``data:`` URIs, no scripts, stylesheets or links) show:

- the parameters that differ between the runs, read off their artifacts: the prepared
  dataset's manifest (``prepare.*``), every training's ``training_config.json`` (``train.*``),
  the sample settings (``sample.*``) and, for every ROOT, what its scores show (``scores.*``).
  A value that differs between one run's trainings is shown per method (``palp: 0.001;
  ti-db: 0.002``), or per training when one method's trainings differ too;
- every run's Table 2 rows (a row per method and run);
- every run's gallery: each method's samples at its last step, as small thumbnails.

It knows kfp.local's folder layout, so it lives in the pipelines layer (above palp, which
never imports it); it imports nothing of kfp, and palp only once the command runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.errors import PipelineError
from pipelines.runs_page import html_page

# kfp.local's layout under a pipeline root: a folder per run, named after the pipeline
# (pipelines.palp_pipeline.PIPELINE_NAME) and its start time, then a folder per task.
RUN_PREFIX = "palp-"
ITERATIONS = "for-loop-*-iteration-*"
PREPARED = ("prepare", "prepared")
TRAINED = ("train", "model")
SAMPLES = ("sample", "samples")
COMPARE_SCORES = ("compare", "scores")
SCORES_CSV, TABLE2_CSV = "scores.csv", "table2.csv"

OUTPUT_MD, OUTPUT_HTML = "compare.md", "compare.html"
SECTIONS = ("prepare", "train", "sample", "scores")
UNSET = "(unset)"  # a key some of a run's trainings (or some runs) do not record
# What tells one training of a run from another (its task, subject and texts, its folders):
# the manifest's tasks already list these, so they are not parameters.
TRAINING_IDENTITY = frozenset({"method", "task_id", "target_prompt", "clean_prompt", "class_words", "elements",
                               "placeholder_tokens", "subjects", "training_images", "output"})


class RunsCompareError(PipelineError):
    """A ROOT that is neither a pipeline root nor a scores folder, or a run without its compare
    step's output; the message says which and what to give instead."""


@dataclass
class Run:
    """What one ROOT contributes: its label (the column name), where its scores are, and its
    parameters (``section.key`` -> the value shown)."""

    label: str
    root: str  # as given
    source: str  # the run folder, or the scores folder, that was read
    scores_dir: str
    scopes: set[str] = field(default_factory=set)  # what it records: sections, and each subject and task
    params: dict[str, str] = field(default_factory=dict)
    scores: object = None  # the scores.csv DataFrame
    table2: object = None  # the table2.csv DataFrame (index: method)


# -- finding what a ROOT is ---------------------------------------------------------------------

def _is_scores_folder(path: str) -> bool:
    from palp.core import storage

    return storage.exists(storage.join(path, SCORES_CSV)) and storage.exists(storage.join(path, TABLE2_CSV))


def _is_run_folder(path: Path) -> bool:
    return path.name.startswith(RUN_PREFIX) and (path / PREPARED[0]).is_dir()


def newest_run(root: Path) -> Path | None:
    """The newest ``palp-<timestamp>`` run under a local pipeline root (the names sort by time),
    finished or not."""
    runs = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(RUN_PREFIX))
    return runs[-1] if runs else None


def locate(root: str) -> tuple[Path | None, str]:
    """(the run folder, or None for a scores folder; the scores folder) of a ROOT."""
    from palp.core import gcs

    if not gcs.is_gcs(root) and not Path(root).is_dir():
        raise RunsCompareError(f"ROOT {root} does not exist or is not a folder")
    if _is_scores_folder(root):
        return None, root
    if gcs.is_gcs(root):
        raise RunsCompareError(f"ROOT {root} holds no {SCORES_CSV} and {TABLE2_CSV}: on gs:// give a scores folder "
                               f"(a run's {'/'.join(COMPARE_SCORES)})")
    path = Path(root).resolve()
    run = path if _is_run_folder(path) else newest_run(path)
    if run is None:
        raise RunsCompareError(
            f"ROOT {root} is neither a local pipeline root (no {RUN_PREFIX}* run folder in it, as `palp pipeline "
            f"run-local --pipeline-root ROOT` leaves) nor a scores folder (no {SCORES_CSV} and {TABLE2_CSV})")
    scores = run.joinpath(*COMPARE_SCORES)
    if not _is_scores_folder(str(scores)):
        done = [p.name for p in sorted(path.glob(RUN_PREFIX + "*")) if _is_scores_folder(str(p.joinpath(*COMPARE_SCORES)))]
        hint = f"; give an older run's folder instead, e.g. {path / done[-1]}" if done and run != path else ""
        raise RunsCompareError(f"run {run} has no compare step output (no {'/'.join(COMPARE_SCORES)}/{SCORES_CSV} and "
                               f"{TABLE2_CSV}): it failed or is still running{hint}")
    return run, str(scores)


def _labels(roots: list[str]) -> list[str]:
    """Short, distinct column names: each ROOT's folder name (above a generic ``scores`` or
    ``compare``), numbered when two are the same."""
    names = []
    for root in roots:
        parts = [p for p in root.rstrip("/").split("/") if p] or [root]
        if "://" not in root:
            parts = list(Path(root).resolve().parts[1:]) or [root]
        while len(parts) > 1 and parts[-1] in ("scores", "compare"):
            parts.pop()
        names.append(parts[-1])
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if names.count(name) == 1 else f"{name}#{seen[name]}")
    return out


# -- parameters -----------------------------------------------------------------------------------

def _show(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def flatten(value, prefix: str) -> dict[str, str]:
    """Nested dicts as ``prefix.key.sub`` -> the value shown (lists and scalars as JSON, text as is)."""
    if isinstance(value, dict) and value:
        out: dict[str, str] = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}"))
        return out
    return {prefix: _show(value)}


def combine(trainings: list[tuple[str, str, dict[str, str]]]) -> dict[str, str]:
    """One run's value of each key over its trainings, ``(method, training name, values)`` each:
    the value they all share; else one per method (``palp: 0.001; ti-db: 0.002``) when each
    method's trainings agree; else one per training (``palp/cat-00: …; palp/cup-00: …``)."""
    keys = dict.fromkeys(k for _, _, values in trainings for k in values)
    out = {}
    for key in keys:
        seen = [(method, name, values.get(key, UNSET)) for method, name, values in trainings]
        if len({v for _, _, v in seen}) == 1:
            out[key] = seen[0][2]
            continue
        by_method: dict[str, set[str]] = {}
        for method, _, v in seen:
            by_method.setdefault(method, set()).add(v)
        if all(len(vs) == 1 for vs in by_method.values()):
            out[key] = "; ".join(f"{m}: {next(iter(vs))}" for m, vs in sorted(by_method.items()))
        else:
            out[key] = "; ".join(f"{name}: {v}" for _, name, v in sorted(seen))
    return out


def manifest_params(manifest: dict) -> tuple[dict[str, str], set[str]]:
    """``prepare.*``: the prepared dataset's settings, its subjects and tasks (the lists, then
    each one's record: a subject's image count, not every file's), not when it was made; and
    the scopes recorded (``prepare``, ``prepare.subjects.<name>``, ``prepare.tasks.<id>``)."""
    rest = {k: v for k, v in manifest.items() if k not in ("created", "subjects", "tasks")}
    subjects = {name: {k: (len(v) if k == "images" else v) for k, v in s.items() if k != "files"}
                for name, s in (manifest.get("subjects") or {}).items()}
    tasks = {t["id"]: {k: v for k, v in t.items() if k != "id"} for t in manifest.get("tasks") or []}
    params = {"prepare.subjects": ", ".join(subjects), "prepare.tasks": ", ".join(tasks), **flatten(rest, "prepare")}
    for group, records in (("subjects", subjects), ("tasks", tasks)):
        for name, record in records.items():
            params.update(flatten(record, f"prepare.{group}.{name}"))
    return params, {"prepare", *(f"prepare.subjects.{n}" for n in subjects), *(f"prepare.tasks.{t}" for t in tasks)}


def sample_params(samples_dir: Path) -> dict[str, str]:
    """``sample.*`` of one training's samples: its settings folders' ``settings.json`` and,
    from ``samples.csv``, the samples per prompt, the sampled steps and whether the base
    model's reference was sampled."""
    from palp.steps.sample_jobs import SAMPLES_CSV, SETTINGS_FILE, read_table

    table = read_table(str(samples_dir / SAMPLES_CSV))
    trained = table[table["method"] != "base"]
    found: dict[str, list[str]] = {}
    # a sample's file is <task>/<run tag>/<settings>/step-N/<image>: its settings folder is two up
    for folder in dict.fromkeys(str(Path(f).parent.parent) for f in trained["file"]):
        settings = samples_dir / folder / SETTINGS_FILE
        if settings.is_file():
            for k, v in flatten(json.loads(settings.read_text()), "sample").items():
                found.setdefault(k, []).append(v)
    out = {k: " | ".join(dict.fromkeys(vs)) for k, vs in found.items()}
    out["sample.num_samples"] = _show(int(trained["sample"].nunique()))
    out["sample.sampled_steps"] = ",".join(str(s) for s in sorted({int(s) for s in trained["step"]}))
    out["sample.reference"] = _show(bool((table["method"] == "base").any()))
    return out


def training_params(run: Path) -> tuple[dict[str, str], set[str]]:
    """``train.*`` and ``sample.*`` of a run, combined over its trainings (``combine``), and the
    sections found (its scopes). Paths inside the run read ``<run>/…``, so two runs' equal settings match."""
    from palp.models.run_weights import CONFIG_FILE

    here = str(run)
    trains, samples = [], []
    for iteration in sorted(run.glob(ITERATIONS)):
        config_file = iteration.joinpath(*TRAINED, CONFIG_FILE)
        if not config_file.is_file():
            continue
        config = json.loads(config_file.read_text())
        method, name = str(config.get("method")), f"{config.get('method')}/{config.get('task_id')}"
        kept = {k: v for k, v in config.items() if k not in TRAINING_IDENTITY}
        trains.append((method, name, {k: v.replace(here, "<run>") for k, v in flatten(kept, "train").items()}))
        samples_dir = iteration.joinpath(*SAMPLES)
        if samples_dir.is_dir():
            samples.append((method, name, {k: v.replace(here, "<run>") for k, v in sample_params(samples_dir).items()}))
    params = {"train.trainings": ", ".join(sorted(name for _, name, _ in trains)), **combine(trains)} if trains else {}
    params.update(combine(samples))
    return params, {scope for scope, found in (("train", trains), ("sample", samples)) if found}


def scores_params(scores, table2) -> dict[str, str]:
    """``scores.*``: what a scores folder shows of the run that made it."""
    trained = scores[scores["method"] != "base"]
    last = trained.groupby("method")["step"].max()
    return {
        "scores.methods": ", ".join(str(m) for m in table2.index),
        "scores.tasks": ", ".join(sorted(set(scores["task"]))),
        "scores.images": _show(len(scores)),
        "scores.samples_per_prompt": _show(int(scores["sample"].nunique())),
        "scores.last_step": "; ".join(f"{m}: {int(s)}" for m, s in last.items()),
        "scores.columns": ", ".join(table2.columns),
    }


def read_scores(folder: str):
    """(scores.csv, table2.csv indexed by method) of a scores folder."""
    from palp.core import safecsv, storage

    text = ("task", "subject", "method", "prompt", "clean_prompt", "settings", "file", "run", "path")
    scores = safecsv.read_csv(storage.read_bytes(storage.join(folder, SCORES_CSV)), dtype={c: str for c in text})
    table2 = safecsv.read_csv(storage.read_bytes(storage.join(folder, TABLE2_CSV)), index_col=0)
    table2.index = table2.index.astype(str)
    return scores, table2


def load_run(root: str, label: str) -> Run:
    """Everything compared of one ROOT."""
    from palp.steps.prepare import MANIFEST, load_manifest

    run_dir, scores_dir = locate(root)
    out = Run(label=label, root=root, source=str(run_dir or scores_dir), scores_dir=scores_dir)
    out.scores, out.table2 = read_scores(scores_dir)
    if run_dir is not None:
        prepared = run_dir.joinpath(*PREPARED)
        if (prepared / MANIFEST).is_file():
            params, scopes = manifest_params(load_manifest(str(prepared)))
            out.params.update({k: v.replace(str(run_dir), "<run>") for k, v in params.items()})
            out.scopes |= scopes
        params, scopes = training_params(run_dir)
        out.params.update(params)
        out.scopes |= scopes
    out.params.update(scores_params(out.scores, out.table2))
    out.scopes.add("scores")
    return out


def _scope(key: str, scopes: set[str]) -> str:
    """The narrowest scope holding ``key`` (a subject's record, or else its section)."""
    return max((s for s in scopes if key == s or key.startswith(s + ".")), key=len, default=key.split(".")[0])


def differing(runs: list[Run]):
    """The parameters whose values differ between the runs, a row each (section order, then
    name), a column per run. A run that does not record a key's scope (a scores folder has no
    ``train.*``, a run without subject cup no ``prepare.subjects.cup.*``) shows a dash and
    does not count; one that records the scope but not the key counts as ``(unset)``."""
    import pandas as pd

    scopes = {s for r in runs for s in r.scopes}
    keys = sorted({k for r in runs for k in r.params}, key=lambda k: (SECTIONS.index(k.split(".")[0]), k))
    rows = []
    for key in keys:
        scope = _scope(key, scopes)
        values = [r.params.get(key, UNSET) if scope in r.scopes else "–" for r in runs]
        if len({v for r, v in zip(runs, values) if scope in r.scopes}) > 1:
            rows.append([key, *values])
    return pd.DataFrame(rows, columns=["parameter", *(r.label for r in runs)])


def table2_rows(runs: list[Run]):
    """Every run's Table 2 rows, grouped by method (runs in the order given), with a run column."""
    import pandas as pd

    frames = []
    for order, r in enumerate(runs):
        t = r.table2.reset_index().rename(columns={r.table2.index.name or "index": "method"})
        t.insert(1, "run", r.label)
        t["_order"] = order
        frames.append(t)
    t2 = pd.concat(frames, ignore_index=True, sort=False)
    return t2.sort_values(["method", "_order"], kind="stable").drop(columns="_order").reset_index(drop=True)


# -- the outputs --------------------------------------------------------------------------------

def _md_cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _listing(runs: list[Run]):
    import pandas as pd

    return pd.DataFrame([[r.label, r.root, r.source] for r in runs], columns=["run", "ROOT", "read from"])


def _no_differences(runs: list[Run], diff) -> str:
    """What stands in for the parameters table when it has no rows ("" when it has)."""
    if len(runs) < 2:
        return "One run: nothing to compare."
    return "None: the runs' recorded parameters are the same." if diff.empty else ""


def markdown(runs: list[Run], diff, t2) -> str:
    table = diff.map(_md_cell).to_markdown(index=False, disable_numparse=True)
    return "\n".join([
        "# palp runs compare", "", _listing(runs).map(_md_cell).to_markdown(index=False, disable_numparse=True), "",
        "## Parameters that differ", "", _no_differences(runs, diff) or table, "",
        "## Table 2", "", t2.to_markdown(index=False, floatfmt=".3f"), "",
        f"Galleries (each method's samples at its last step): {OUTPUT_HTML}", ""])


def compare_runs(roots: list[str], output: str) -> str:
    """Compare the runs of ``roots``; write ``compare.md`` and ``compare.html`` under ``output``
    (atomically) and return the Markdown."""
    from palp.core import storage

    storage.check_folder_output(output)
    runs = [load_run(root, label) for root, label in zip(roots, _labels(roots))]
    diff, t2 = differing(runs), table2_rows(runs)
    text = markdown(runs, diff, t2)
    storage.write_text(storage.join(output, OUTPUT_MD), text)
    storage.write_bytes(storage.join(output, OUTPUT_HTML), html_page(runs, diff, t2, listing=_listing(runs), none=_no_differences(runs, diff)).encode("utf-8"),
                        content_type="text/html; charset=utf-8")
    return text


# -- the command ---------------------------------------------------------------------------------

def add_runs_parser(sub) -> None:
    """``palp runs compare ROOT [ROOT ...] [--output DIR]``."""
    runs = sub.add_parser("runs", help="finished pipeline runs side by side")
    rsub = runs.add_subparsers(dest="runs_command", required=True)
    c = rsub.add_parser("compare", help="the runs' differing parameters, Table 2 rows and galleries side by side",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    c.add_argument("roots", nargs="+", metavar="ROOT",
                   help="a local pipeline root (its newest palp-* run), a run folder, or a scores folder")
    c.add_argument("--output", default="runs-compare", help=f"folder for {OUTPUT_MD} and {OUTPUT_HTML}")
    c.set_defaults(func=run_runs_compare)


def run_runs_compare(args) -> int:
    """``palp runs compare``: prints the Markdown and where both files went; a ROOT it cannot
    read or an unusable --output is one error line and exit status 2."""
    from palp.core import gcs, storage

    try:
        text = compare_runs(args.roots, args.output)
    except (RunsCompareError, gcs.StorageError) as e:
        print(f"palp runs compare: error: {e}", file=sys.stderr)
        return 2
    print(text)
    print(f"-> {storage.join(args.output, OUTPUT_MD)}, {storage.join(args.output, OUTPUT_HTML)}")
    return 0
