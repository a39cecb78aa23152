"""``palp study analyze``: Table 3 from filled forms.

Per method: **text alignment** = % of prompt elements marked present over all element
questions; **personalization** = mean similarity rating normalised to 0-100%,
``100 * (rating - 1) / 4``. Each with a 95% bootstrap interval that resamples participants
and questions (independently, with replacement) and recomputes the ratio of sums.
"""

from __future__ import annotations

import glob
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd

from palp.core import gcs, storage
from palp.core.gcs import StorageError
from palp.core.safecsv import read_csv, to_csv
from palp.steps.study import HEADER_ROW, PARTICIPANT_CELL, SHEET, StudyError

KEY_COLUMNS = ("question_id", "kind", "elements", "method", "subject", "prompt", "clean_prompt")
METRICS = {"text_alignment": "Text alignment", "personalization": "Personalization"}


def response_files(pattern: str) -> list[str]:
    if gcs.is_gcs(pattern):
        return [storage.join(pattern, n) for n in storage.list_files(pattern) if n.endswith((".csv", ".xlsx"))]
    files = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else (
        sorted(str(p) for p in Path(pattern).iterdir() if p.suffix in (".csv", ".xlsx")) if Path(pattern).is_dir() else [pattern])
    if not files:
        raise StudyError(f"no response files match {pattern}")
    return files


def read_response(uri: str) -> tuple[pd.DataFrame, list[int]]:
    """A filled form as a table with a participant_id column; and each row's number in the file."""
    data = storage.read_bytes(uri)
    if uri.endswith(".xlsx"):
        import openpyxl

        ws = openpyxl.load_workbook(io.BytesIO(data), read_only=True)[SHEET]
        pid = ws[PARTICIPANT_CELL].value
        table = pd.read_excel(io.BytesIO(data), sheet_name=SHEET, header=HEADER_ROW, dtype=object)
        if pid is None or not str(pid).strip():
            raise StudyError(f"{uri}: row 2, column B: the participant ID is empty")
        table.insert(0, "participant_id", str(pid).strip())
        lines = [HEADER_ROW + 2 + i for i in range(len(table))]  # spreadsheet row numbers
    else:
        table = read_csv(data, dtype=object)
        lines = [2 + i for i in range(len(table))]  # the header is line 1
    return table.replace({np.nan: ""}).astype(str), lines


def _cell(v: str) -> str:
    v = v.strip()
    return v[:-2] if v.endswith(".0") else v  # spreadsheets hand back 1 as 1.0


def collect(files: list[str], key: pd.DataFrame) -> pd.DataFrame:
    """Validated answers: one row per (participant, question). All problems are reported at once."""
    by_id = key.set_index("question_id")
    problems, answers, seen = [], [], {}
    for uri in files:
        try:
            table, lines = read_response(uri)
        except StudyError as e:
            problems.append(str(e))
            continue
        except (ValueError, KeyError, OSError, zipfile.BadZipFile, EOFError) as e:  # truncated, not a zip, no sheet
            problems.append(f"{uri}: not a readable form ({type(e).__name__}: {e}); save the filled form again as .xlsx or .csv")
            continue
        if "question_id" not in table.columns or "participant_id" not in table.columns:
            problems.append(f"{uri}: row 1: columns question_id and participant_id are required")
            continue
        if table.empty or all(not _cell(v) for c in table.columns if c.startswith(("present_", "rating")) for v in table[c]):
            problems.append(f"{uri}: the form is empty (no answers)")
            continue
        for (_, r), line in zip(table.iterrows(), lines):
            where = f"{uri}: row {line}"
            qid, pid = _cell(r["question_id"]), _cell(r["participant_id"])
            if qid not in by_id.index:
                problems.append(f"{where}, column question_id: unknown question id {qid!r}")
                continue
            if not pid:
                problems.append(f"{where}, column participant_id: empty")
                continue
            if (pid, qid) in seen:
                problems.append(f"{where}: participant {pid!r} already answered {qid} ({seen[(pid, qid)]})")
                continue
            seen[(pid, qid)] = where
            q = by_id.loc[qid]
            if q["kind"] == "elements":
                n = len(json.loads(q["elements"]))
                marks = []
                for k in range(1, n + 1):
                    v = _cell(r.get(f"present_{k}", ""))
                    if v not in ("0", "1"):
                        problems.append(f"{where}, column present_{k}: expected 0 or 1, got {v!r}")
                    else:
                        marks.append(int(v))
                if len(marks) == n:
                    answers.append({"participant": pid, "question_id": qid, "kind": "elements", "num": sum(marks), "den": n})
            else:
                v = _cell(r.get("rating", ""))
                if v not in {"1", "2", "3", "4", "5"}:
                    problems.append(f"{where}, column rating: expected a rating from 1 to 5, got {v!r}")
                else:
                    answers.append({"participant": pid, "question_id": qid, "kind": "similarity", "num": (int(v) - 1) / 4, "den": 1})
    if problems:
        raise StudyError(f"{len(problems)} problem(s) in the responses:\n  " + "\n  ".join(problems))
    df = pd.DataFrame(answers)
    return df.merge(key[["question_id", "method", "subject", "prompt", "clean_prompt"]], on="question_id")


def read_key(uri: str) -> pd.DataFrame:
    """``key/answer_key.csv`` of an export, or a StudyError that says it is not one."""
    fix = "pass the key/answer_key.csv that `palp study export` wrote"
    try:
        key = read_csv(storage.read_bytes(uri), dtype={"question_id": str})
    except (StorageError, OSError, ValueError) as e:  # missing, a folder, not text, not CSV
        raise StudyError(f"--key {uri}: cannot read it as an answer key ({e}); {fix}") from e
    missing = [c for c in KEY_COLUMNS if c not in key.columns]
    if missing:
        raise StudyError(f"--key {uri} is not an answer key (no column {', '.join(missing)}); {fix}")
    for i, row in key.iterrows():
        where = f"--key {uri}, row {i + 2}"  # row 1 is the header
        if not isinstance(row["method"], str) or not row["method"].strip():
            raise StudyError(f"{where}: the method is empty; {fix}")
        if row["kind"] not in ("elements", "similarity"):
            raise StudyError(f"{where}: kind {row['kind']!r} is neither 'elements' nor 'similarity'; {fix}")
        if row["kind"] == "elements":
            try:
                elements = json.loads(row["elements"])
            except (TypeError, ValueError):
                elements = None
            if not isinstance(elements, list) or not elements:
                raise StudyError(f"{where}: column elements is not a JSON list of the prompt's elements "
                                 f"({str(row['elements'])[:60]!r}); {fix}")
    return key


def ratio_with_ci(cells: pd.DataFrame, *, n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """100 * sum(num) / sum(den), and its 95% interval resampling participants and questions."""
    if cells.empty:
        return (float("nan"),) * 3
    p_codes, p_idx = np.unique(cells["participant"], return_inverse=True)
    q_codes, q_idx = np.unique(cells["question_id"], return_inverse=True)
    num, den = cells["num"].to_numpy(float), cells["den"].to_numpy(float)
    point = 100 * num.sum() / den.sum()
    rng = np.random.default_rng(seed)
    wp = rng.multinomial(len(p_codes), np.full(len(p_codes), 1 / len(p_codes)), size=n_boot)  # (B, P)
    wq = rng.multinomial(len(q_codes), np.full(len(q_codes), 1 / len(q_codes)), size=n_boot)  # (B, Q)
    w = wp[:, p_idx] * wq[:, q_idx]  # (B, cells): how often each answer is drawn
    with np.errstate(invalid="ignore", divide="ignore"):
        stats = 100 * (w @ num) / (w @ den)
    stats = stats[np.isfinite(stats)]
    lo, hi = np.percentile(stats, [2.5, 97.5])
    return float(point), float(min(lo, point)), float(max(hi, point))


def table3(answers: pd.DataFrame, by: list[str], *, n_boot: int, seed: int) -> pd.DataFrame:
    rows = []
    for keys, g in answers.groupby(by, sort=True):
        keys = keys if isinstance(keys, tuple) else (keys,)
        row = dict(zip(by, keys))
        for kind, metric in (("elements", "text_alignment"), ("similarity", "personalization")):
            v, lo, hi = ratio_with_ci(g[g["kind"] == kind], n_boot=n_boot, seed=seed)
            row.update({metric: v, f"{metric}_ci_low": lo, f"{metric}_ci_high": hi, f"{metric}_n": int((g["kind"] == kind).sum())})
        row["participants"] = g["participant"].nunique()
        rows.append(row)
    return pd.DataFrame(rows)


def markdown(t3: pd.DataFrame) -> str:
    fmt = lambda r, m: f"{r[m]:.1f}% ({r[m + '_ci_low']:.1f}–{r[m + '_ci_high']:.1f})"  # noqa: E731
    shown = pd.DataFrame({"Method": t3["method"], **{label: [fmt(r, m) for _, r in t3.iterrows()] for m, label in METRICS.items()}})
    return shown.to_markdown(index=False) + "\n\n95% bootstrap intervals over participants and questions.\n"


def bar_chart(t3: pd.DataFrame) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    x = np.arange(len(t3))
    for i, (m, label) in enumerate(METRICS.items()):
        v = t3[m].to_numpy()
        err = np.vstack([v - t3[f"{m}_ci_low"].to_numpy(), t3[f"{m}_ci_high"].to_numpy() - v])
        ax.bar(x + (i - 0.5) * 0.38, v, 0.38, yerr=err, capsize=4, label=label)
    ax.set_xticks(x, t3["method"])
    ax.set_ylim(0, 105)
    ax.set_ylabel("%")
    ax.set_title("User study (95% bootstrap intervals)")
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def analyze(responses: str, key_uri: str, output: str, *, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    from palp.core.pages import data_uri

    key = read_key(key_uri)
    answers = collect(response_files(responses), key)
    t3 = table3(answers, ["method"], n_boot=n_boot, seed=seed)
    by_subject = table3(answers, ["method", "subject"], n_boot=n_boot, seed=seed)
    by_prompt = table3(answers, ["method", "clean_prompt"], n_boot=n_boot, seed=seed)
    chart = bar_chart(t3)
    md = markdown(t3)
    storage.write_text(storage.join(output, "table3.csv"), to_csv(t3, index=False))
    storage.write_text(storage.join(output, "table3.md"), md)
    storage.write_text(storage.join(output, "table3_by_subject.csv"), to_csv(by_subject, index=False))
    storage.write_text(storage.join(output, "table3_by_prompt.csv"), to_csv(by_prompt, index=False))
    storage.write_bytes(storage.join(output, "table3.png"), chart, content_type="image/png")
    page = "\n".join([
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>User study</title></head><body>",
        f"<h1>User study: {answers['participant'].nunique()} participants, {len(answers)} answers</h1>",
        t3.to_html(index=False, float_format=lambda v: f"{v:.1f}", border=1),
        f"<img alt='Table 3 chart' src='{data_uri(chart, 'image/png')}'>",
        "<h2>Per subject</h2>", by_subject.to_html(index=False, float_format=lambda v: f"{v:.1f}", border=1),
        "<h2>Per prompt</h2>", by_prompt.to_html(index=False, float_format=lambda v: f"{v:.1f}", border=1),
        "</body></html>"])
    storage.write_text(storage.join(output, "summary.html"), page)
    return t3
