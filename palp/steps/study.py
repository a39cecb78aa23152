"""``palp study export``: blinded user-study forms per the paper's protocol (Appendix D).

For each (subject, prompt, method) one sample (from each run's last step) is picked with a
seeded RNG and becomes two questions: **elements** (which of the prompt's elements appear in
the image: 0/1 per element) and **similarity** (the input subject beside the generated image,
rated 1-5). The questions are shuffled, dealt into ``--forms`` forms of balanced size and
shuffled again within each form.

Blinding: question and image ids are random tokens from ``secrets`` (``--seed`` fixes only the
layout: picks, order, dealing, so replaying it cannot recover them); images are decoded,
resized and re-encoded as uncompressed PNG without metadata, so every image file has the same
size and chunks; nothing in a form names a method, run, seed or source file. Only
``key/answer_key.csv``, written apart from ``forms/`` and never referenced by it, maps ids
back.

Layout: ``forms/form-N.xlsx`` (images in their cells, answer columns with data validation,
a participant-id cell), ``forms/form-N.csv`` (opaque image ids, for survey tools),
``forms/images/<id>.png``; ``key/answer_key.csv``.
"""

from __future__ import annotations

import io
import json
import secrets
import shutil
import tempfile
from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from palp.core import gcs, storage
from palp.core.safecsv import to_csv
from palp.core.settings import StudySettings as _S
from palp.steps.prepare import load_manifest
from palp.steps.score import read_samples

KINDS = ("elements", "similarity")
INSTRUCTIONS = {
    "elements": "Which of the listed elements appear in the image? Enter 1 under each element that appears, 0 otherwise.",
    "similarity": "How similar is the main subject of the image to the reference photo? 1 = not at all, 5 = the same.",
}
SHEET = "Form"
HEADER_ROW = 3  # 0-based row of the column names in the XLSX sheet
PARTICIPANT_CELL = "B2"
THUMB_PX = 160


class StudyError(ValueError):
    """Inputs or responses that cannot be used; the message names the file, row and column."""


def blind_png(data: bytes, size: int) -> bytes:
    """Decode, resize to size x size, re-encode as uncompressed PNG with no metadata chunks.

    Uncompressed, every image of one size has the same byte length, so file sizes say nothing.
    """
    im = Image.open(io.BytesIO(data)).convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    clean = Image.new("RGB", im.size)
    clean.paste(im)  # a fresh image: no info dict, no text chunks, no EXIF
    buf = io.BytesIO()
    clean.save(buf, format="PNG", compress_level=0)
    return buf.getvalue()


def _token(used: set[str]) -> str:
    # From the OS's CSPRNG, not the seeded layout RNG: otherwise replaying --seed (or trying
    # small seeds) would recover every id from the forms alone and un-blind the study.
    while True:
        t = secrets.token_hex(6)
        if t not in used:
            used.add(t)
            return t


def pick_samples(samples: pd.DataFrame, rng: np.random.Generator, methods: list[str] | None) -> pd.DataFrame:
    """One sample per (subject, prompt, method), from each run's last step."""
    last = samples.groupby(["method", "run"])["step"].transform("max")
    final = samples[samples["step"] == last]
    if methods:
        missing = sorted(set(methods) - set(final["method"]))
        if missing:
            raise StudyError(f"no samples of method(s) {', '.join(missing)}; methods present: {', '.join(sorted(final['method'].unique()))}")
        final = final[final["method"].isin(methods)]
    picks = [g.iloc[int(rng.integers(len(g)))] for _, g in final.sort_values(["subject", "prompt", "method", "run", "sample"]).groupby(
        ["subject", "prompt", "method"], sort=True)]
    return pd.DataFrame(picks).reset_index(drop=True)


def build_questions(picks: pd.DataFrame, inputs: dict[str, list[str]], rng: np.random.Generator) -> list[dict]:
    questions = []
    for _, p in picks.iterrows():
        elements = [e["text"] for e in p["elements"]]  # the sample's own: subjects sharing a prompt differ
        subject_inputs = [u for n in p["subject"].split("+") for u in inputs[n]]
        for kind in KINDS:
            questions.append({
                "kind": kind, "subject": p["subject"], "prompt": p["prompt"], "clean_prompt": p["clean_prompt"],
                "method": p["method"], "run": p["run"], "step": int(p["step"]), "sample": int(p["sample"]),
                "seed": int(p["seed"]), "source": p["path"], "elements": elements if kind == "elements" else [],
                "reference_source": subject_inputs[int(rng.integers(len(subject_inputs)))] if kind == "similarity" else "",
            })
    return questions


def deal_forms(n_questions: int, forms: int, rng: np.random.Generator) -> list[list[int]]:
    """Shuffle, deal round-robin (sizes differ by at most one), shuffle each form."""
    order = rng.permutation(n_questions)
    return [list(rng.permutation(order[f::forms])) for f in range(forms)]


def export(samples_dirs: list[str], prepared: str, output: str, *, forms: int = _S.forms, seed: int = _S.seed,
           image_size: int = _S.image_size,
           links: str = "embedded", expiry_hours: int = 168, methods: list[str] | None = None, salt: str = "") -> dict:
    """Write the forms and the answer key; returns a summary.

    The layout (picks, order, dealing) comes from an RNG seeded by ``seed`` and a secret
    ``salt`` (fresh unless given) that only ``key/layout.json`` holds: the seed alone, which
    a participant may guess, does not reveal which position holds which method; the seed and
    the key's salt give the same layout again.
    """
    _check_export_options(output, forms=forms, image_size=image_size, links=links)
    try:
        salt = salt or secrets.token_hex(16)
        rng = np.random.default_rng([seed, int(salt, 16)])
    except ValueError:
        raise StudyError(f"--salt must be the hex string of an earlier export's key/layout.json, not {salt!r}") from None
    samples = read_samples(samples_dirs)
    manifest = load_manifest(prepared)
    inputs = {n: [storage.join(prepared, p) for p in s["images"]] for n, s in manifest["subjects"].items()}
    missing = sorted({n for s in samples["subject"] for n in s.split("+")} - set(inputs))
    if missing:
        raise StudyError(f"subject(s) {', '.join(missing)} of the samples are not in {prepared}")
    questions = build_questions(pick_samples(samples, rng, methods), inputs, rng)
    _assign_ids(questions)
    if forms > len(questions):
        raise StudyError(f"{len(questions)} questions cannot fill {forms} forms; use --forms {len(questions)} or fewer")
    dealt = deal_forms(len(questions), forms, rng)

    staging = Path(tempfile.mkdtemp(prefix="palp-study-"))
    try:
        images = staging / "forms" / "images"
        images.mkdir(parents=True)
        _write_images(questions, images, image_size)
        urls = _signed_urls(questions, output, images, expiry_hours) if links == "signed" else {}
        key_rows = _write_forms(staging / "forms", questions, dealt, images, urls)
        (staging / "key").mkdir()
        (staging / "key" / "layout.json").write_text(json.dumps({"seed": seed, "salt": salt}, indent=2) + "\n")
        (staging / "key" / "answer_key.csv").write_text(to_csv(pd.DataFrame(key_rows), index=False), encoding="utf-8")
        _publish(staging, output, links)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"questions": len(questions), "forms": [len(m) for m in dealt], "methods": sorted({q["method"] for q in questions})}


def _check_export_options(output: str, *, forms: int, image_size: int, links: str) -> None:
    if forms < 1 or image_size < 16:
        raise StudyError("--forms must be >= 1 and --image-size >= 16")
    if links not in ("embedded", "signed"):
        raise StudyError(f"--links must be embedded or signed, not {links!r}")
    if links == "signed" and not gcs.is_gcs(output):
        raise StudyError("--links signed needs a gs:// --output (signed URLs point at objects in a bucket)")
    if not gcs.is_gcs(output):
        existing = next((p for p in (Path(output), *Path(output).parents) if p.exists()), None)
        if existing is not None and not existing.is_dir():
            raise StudyError(f"--output {output}: {existing} is a file, not a folder; choose a new or empty folder")
    if storage.exists(storage.join(output, "key", "answer_key.csv")):
        raise StudyError(f"{output} already holds a study export; choose another --output")


def _assign_ids(questions: list[dict]) -> None:
    """Give every question, image and reference image its random id (``_token``)."""
    used: set[str] = set()
    for q in questions:
        q["question_id"] = "Q" + _token(used)
        q["image_id"] = _token(used)
        q["reference_id"] = _token(used) if q["kind"] == "similarity" else ""


def _write_images(questions: list[dict], images: Path, image_size: int) -> None:
    """Every question's image, and its reference photo, blinded (``blind_png``) under its id."""
    for q in questions:
        (images / f"{q['image_id']}.png").write_bytes(blind_png(storage.read_bytes(q["source"]), image_size))
        if q["reference_id"]:
            (images / f"{q['reference_id']}.png").write_bytes(blind_png(storage.read_bytes(q["reference_source"]), image_size))


def _write_forms(folder: Path, questions: list[dict], dealt: list[list[int]], images: Path,
                 urls: dict[str, str]) -> list[dict]:
    """``form-N.csv`` and ``form-N.xlsx`` for each dealt form; returns the answer key's rows."""
    n_el = max(len(q["elements"]) for q in questions)
    key_rows = []
    for f, members in enumerate(dealt, 1):
        rows = [questions[i] for i in members]
        table = form_table(rows, n_el, urls)
        (folder / f"form-{f}.csv").write_text(to_csv(table, index=False), encoding="utf-8")
        write_xlsx(folder / f"form-{f}.xlsx", table, images, f)
        for pos, q in enumerate(rows, 1):
            key_rows.append({"question_id": q["question_id"], "form": f, "position": pos, "kind": q["kind"],
                             "subject": q["subject"], "prompt": q["prompt"], "clean_prompt": q["clean_prompt"],
                             "method": q["method"], "run": q["run"], "step": q["step"], "sample": q["sample"],
                             "seed": q["seed"], "image_id": q["image_id"], "reference_id": q["reference_id"],
                             "source": q["source"], "reference_source": q["reference_source"],
                             "elements": json.dumps(q["elements"])})
    return key_rows


def _publish(staging: Path, output: str, links: str) -> None:
    """Copy the staged export to ``output``, the key last: its presence marks a finished export."""
    files = sorted(p.relative_to(staging) for p in staging.rglob("*") if p.is_file())
    if links == "signed":
        files = [f for f in files if f.parts[:2] != ("forms", "images")]  # uploaded already, linked by URL
    for rel in sorted(files, key=lambda p: p.parts[0] == "key"):
        storage.write_bytes(storage.join(output, *rel.parts), (staging / rel).read_bytes())


def form_table(rows: list[dict], n_elements: int, urls: dict[str, str]) -> pd.DataFrame:
    """One row per question: ids, instructions, elements, and empty answer columns."""
    out = []
    for q in rows:
        r = {"participant_id": "", "question_id": q["question_id"], "question": INSTRUCTIONS[q["kind"]],
             "image_id": q["image_id"], "image_file": f"images/{q['image_id']}.png",
             "reference_id": q["reference_id"], "reference_file": f"images/{q['reference_id']}.png" if q["reference_id"] else ""}
        if urls:
            r["image_url"] = urls[q["image_id"]]
            r["reference_url"] = urls.get(q["reference_id"], "")
        for k in range(n_elements):
            r[f"element_{k + 1}"] = q["elements"][k] if k < len(q["elements"]) else ""
        for k in range(n_elements):
            r[f"present_{k + 1}"] = ""
        r["rating"] = ""
        out.append(r)
    return pd.DataFrame(out)


def write_xlsx(path: Path, table: pd.DataFrame, images: Path, form: int) -> None:
    """The form as a workbook: images placed in their cells, validated answer columns."""
    # The sheet shows pictures, so file names and URLs stay in the CSV form.
    sheet_table = table.drop(columns=[c for c in table.columns if c == "participant_id" or c.endswith(("_file", "_url"))])
    order = ["question_id", "image_id", "reference_id", "question"]
    sheet_table = sheet_table[order + [c for c in sheet_table.columns if c not in order]]
    # XlsxWriter would store a text starting with "=" as a live formula (and URLs as links):
    # prompts and elements are user text, so every cell is written as a plain string.
    with pd.ExcelWriter(path, engine="xlsxwriter",
                        engine_kwargs={"options": {"strings_to_formulas": False, "strings_to_urls": False}}) as writer:
        sheet_table.to_excel(writer, sheet_name=SHEET, startrow=HEADER_ROW, index=False)
        book, ws = writer.book, writer.sheets[SHEET]
        book.set_properties({"title": f"User study form {form}", "author": "", "company": ""})
        ws.write(0, 0, f"User study — form {form}", book.add_format({"bold": True, "font_size": 14}))
        ws.write(1, 0, "Participant ID")
        ws.write(1, 1, "", book.add_format({"bg_color": "#FFF2CC", "border": 1}))
        ws.write(2, 0, "Fill in your participant ID above, then answer every row: 1/0 under each element, or a 1-5 rating.")
        cols = list(sheet_table.columns)
        img_col, ref_col = cols.index("image_id"), cols.index("reference_id")
        ws.set_column(img_col, img_col, THUMB_PX / 7)
        ws.set_column(ref_col, ref_col, THUMB_PX / 7)
        wrap = book.add_format({"text_wrap": True, "valign": "top"})
        ws.set_column(cols.index("question"), cols.index("question"), 40, wrap)
        for c, name in enumerate(cols):
            if name.startswith("element_"):
                ws.set_column(c, c, 22, wrap)
        first = HEADER_ROW + 1
        for i, (_, r) in enumerate(sheet_table.iterrows()):
            row = first + i
            ws.set_row(row, THUMB_PX * 0.75 + 4)  # points
            for col, image_id in ((img_col, r["image_id"]), (ref_col, r["reference_id"])):
                if image_id:
                    size = Image.open(images / f"{image_id}.png").size[0]
                    ws.insert_image(row, col, f"{image_id}.png", {
                        "image_data": io.BytesIO((images / f"{image_id}.png").read_bytes()),
                        "x_scale": THUMB_PX / size, "y_scale": THUMB_PX / size, "object_position": 1,
                        "x_offset": 2, "y_offset": 2, "description": f"image {image_id}"})
            n = sum(1 for c in cols if c.startswith("element_") and r[c])
            for k in range(n):
                c = cols.index(f"present_{k + 1}")
                ws.data_validation(row, c, row, c, {"validate": "list", "source": [0, 1],
                                                    "error_message": "Enter 1 if the element appears, 0 if not."})
            if r["reference_id"]:
                c = cols.index("rating")
                ws.data_validation(row, c, row, c, {"validate": "list", "source": [1, 2, 3, 4, 5],
                                                    "error_message": "Rate from 1 (not similar) to 5 (the same)."})
        ws.freeze_panes(first, 0)
        ws.set_column(0, 0, 16)
        ws.set_landscape()
        ws.fit_to_pages(1, 0)  # printed: all columns on one page width
        ws.repeat_rows(HEADER_ROW)


def _signed_urls(questions: list[dict], output: str, images: Path, expiry_hours: int) -> dict[str, str]:
    """Upload every image and return {image id: V4 signed GET URL valid for ``expiry_hours``}."""
    urls = {}
    for id_ in [i for q in questions for i in (q["image_id"], q["reference_id"]) if i]:
        uri = storage.join(output, "forms", "images", f"{id_}.png")
        storage.write_bytes(uri, (images / f"{id_}.png").read_bytes(), content_type="image/png")
        urls[id_] = gcs.signed_url(uri, timedelta(hours=expiry_hours))
    return urls
