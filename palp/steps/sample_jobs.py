"""The bookkeeping of ``palp sample``: which images one call makes, their seeds and file names,
how they are batched, and the tables that record them (``samples.csv``, ``prompts.json``,
each settings folder's ``settings.json``).

Nothing here touches a model: ``palp.steps.sample`` loads the pipeline and makes the pixels
(the denoising itself is ``palp.models.denoising``).
"""

from __future__ import annotations

import hashlib
import json
import zlib
from dataclasses import dataclass
from pathlib import Path

from palp.core import gcs, storage
from palp.models.denoising import sample_seed

SAMPLES_CSV = "samples.csv"
PROMPTS_JSON = "prompts.json"
CSV_COLUMNS = ["task", "subject", "method", "step", "prompt", "clean_prompt", "elements", "sample", "seed", "settings",
               "file", "run"]
SETTINGS_FILE = "settings.json"
# Read as text whatever they look like (a settings hash of digits, a subject folder named 2024).
TEXT_COLUMNS = ("task", "subject", "method", "prompt", "clean_prompt", "elements", "settings", "file", "run")


class SampleError(ValueError):
    """A run or option that cannot be sampled; the message says what to fix."""


@dataclass
class Weights:
    """One set of LoRA + embeddings to sample: the final ones or a snapshot."""

    step: int
    folder: Path | None  # None: the base model (reference mode)
    personalize: str = "lora-token"  # what the run trained (its training_config.json's personalize)


def prompt_key(prompt: str) -> str:
    return f"{zlib.crc32(prompt.encode()):08x}"


def settings_key(settings: dict) -> str:
    """A short hash of the settings that decide a sample's pixels (its folder's name)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]


def make_jobs(texts: list[dict], weights: list[Weights], *, num_samples: int, seed: int, key: str, run_tag: str,
              subject: str, method: str, model: str) -> list[dict]:
    """Every (weights, text, sample) image: its samples.csv row, plus ``_weights``."""
    jobs = []
    for w in weights:
        for e in texts:
            p = e["prompt"]
            for i in range(num_samples):
                rel = f"{e['folder']}/{run_tag}/{key}/step-{w.step:06d}/{prompt_key(p)}-s{i:02d}.png"
                jobs.append({"task": e["task"], "subject": subject, "method": method, "step": w.step, "prompt": p,
                             "clean_prompt": e["clean_prompt"], "elements": json.dumps(e["elements"]), "sample": i,
                             "seed": sample_seed(seed, p, i), "settings": key, "file": rel, "run": model, "_weights": w})
    return jobs


def unfinished_batches(jobs: list[dict], weights: list[Weights], batch_size: int, done: set[str]) -> list[list[dict]]:
    """The batches with an image not in ``done``, in order.

    Batches are fixed chunks of the full job list: a resumed run recomputes an unfinished
    batch with exactly the same members, so its images are bit-identical to an unbroken run."""
    batches = [b for w in weights for b in _chunks([j for j in jobs if j["_weights"] is w], batch_size)]
    return [b for b in batches if not all(j["file"] in done for j in b)]


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def finished(output: str) -> set[str]:
    """Files already written under ``output`` (writes are atomic, so each is complete)."""
    try:
        return set(storage.list_files(output, recursive=True))
    except gcs.StorageError:  # no output folder yet
        return set()


def write_settings(output: str, texts: list[dict], run_tag: str, key: str, settings: dict) -> None:
    """The ``settings.json`` of this call's settings folder, under each of its tasks."""
    for tag in dict.fromkeys(f"{e['folder']}/{run_tag}" for e in texts):
        storage.write_text(storage.join(output, tag, key, SETTINGS_FILE), json.dumps(settings, indent=2, sort_keys=True) + "\n")


def read_table(csv_uri: str):
    """A samples.csv as a DataFrame, its text columns as text and its cells as palp wrote them."""
    from palp.core import safecsv

    table = safecsv.read_csv(storage.read_bytes(csv_uri), dtype={c: str for c in TEXT_COLUMNS})
    if "elements" not in table.columns or "settings" not in table.columns:
        raise SampleError(f"{csv_uri} was written by an older palp (no per-sample texts); sample into a new --output")
    return table


def texts_by_task(texts: list[dict]) -> dict[str, dict]:
    """``prompts.json``'s entries for ``texts``: task folder -> prompt -> its clean prompt and elements."""
    out: dict[str, dict] = {}
    for e in texts:
        out.setdefault(e["folder"], {})[e["prompt"]] = {"clean_prompt": e["clean_prompt"], "elements": e["elements"]}
    return out


def merge_tables(output: str, rows: list[dict], prompts: dict[str, dict]) -> None:
    """Add this call's rows to samples.csv and its task's texts to prompts.json.

    Other runs' rows are kept (several runs may share a folder), and so are this run's rows of
    other prompts or snapshots made with the same settings; this run's rows made with other
    settings are replaced, so the table never mixes one run's images of two settings.
    """
    import pandas as pd

    from palp.core import safecsv

    csv_uri, json_uri = storage.join(output, SAMPLES_CSV), storage.join(output, PROMPTS_JSON)
    new = pd.DataFrame(rows, columns=CSV_COLUMNS)
    if storage.exists(csv_uri):
        old = read_table(csv_uri)
        keys = ["task", "method", "run"]
        same_run = old.set_index(keys).index.isin(new.set_index(keys).index)
        old = old[~old["file"].isin(set(new["file"])) & ~(same_run & old["settings"].ne(new["settings"].iloc[0]))]
        new = pd.concat([old, new], ignore_index=True)
    new = new.sort_values(["task", "method", "step", "prompt", "sample"], kind="stable")
    storage.write_text(csv_uri, safecsv.to_csv(new, index=False))
    known = json.loads(storage.read_text(json_uri)) if storage.exists(json_uri) else {}
    storage.write_text(json_uri, json.dumps({**known, **prompts}, indent=2) + "\n")
