"""The HTML page of ``palp runs compare`` (pipelines/runs_compare.py): self-contained, every
image a ``data:`` URI, no scripts, stylesheets or links."""

from __future__ import annotations

import html

GALLERY_THUMB = 80  # px: small, several runs fit side by side
GALLERY_MAX = 8  # thumbnails per (prompt, method, run) cell

_STYLE = """
body { font-family: sans-serif; margin: 24px; color: #222; }
table { border-collapse: collapse; margin: 8px 0 24px; }
td, th { border: 1px solid #ccc; padding: 4px 8px; vertical-align: top; }
th { background: #f3f3f3; text-align: left; }
.cell img { width: 80px; height: 80px; object-fit: cover; border: 1px solid #ddd; margin: 1px; }
.note { font-size: 12px; color: #555; }
"""


def _html_table(df, *, floats: bool = False) -> str:
    return df.to_html(index=False, border=0, escape=True, na_rep="",
                      float_format=(lambda v: f"{v:.3f}") if floats else None)


def _thumbs(rows) -> str:
    from palp.core.gcs import StorageError
    from palp.core.pages import thumbnail
    from palp.core.subject_images import SubjectImageError
    from palp.steps.score_report import IMAGE, TARGET

    esc = html.escape
    imgs = []
    for _, r in rows.head(GALLERY_MAX).iterrows():
        try:
            imgs.append(f"<img alt='{esc(str(r['method']))} sample {int(r['sample'])}' src='{thumbnail(r['path'], GALLERY_THUMB)}'>")
        except (SubjectImageError, StorageError, OSError):
            imgs.append(f"<span class='note'>missing: {esc(str(r['path']))}</span>")
    more = f" (first {GALLERY_MAX} of {len(rows)})" if len(rows) > GALLERY_MAX else ""
    scores = [f"{name} {rows[col].mean():.3f}" for name, col in (("text", TARGET), ("image", IMAGE)) if col in rows]
    return "".join(imgs) + f"<div class='note'>{esc(', '.join(scores) + more)}</div>"


def gallery(runs) -> list[str]:
    """For each (subject, prompt): a row per method, a column per run, the samples of each of
    the method's trainings at its last step."""
    esc = html.escape
    finals = {}
    for r in runs:
        s = r.scores
        finals[r.label] = s[s["step"] == s.groupby(["method", "run"])["step"].transform("max")]
    keys = sorted({k for f in finals.values() for k in zip(f["subject"], f["prompt"])})
    parts = []
    for subject, prompt in keys:
        here = {label: f[(f["subject"] == subject) & (f["prompt"] == prompt)] for label, f in finals.items()}
        clean = next(f["clean_prompt"].iloc[0] for f in here.values() if not f.empty)
        parts.append(f"<h3>{esc(subject)}: {esc(clean)}</h3>")
        head = "".join(f"<th>{esc(label)}</th>" for label in here)
        parts.append(f"<table><tr><th>method</th>{head}</tr>")
        for method in sorted({m for f in here.values() for m in f["method"]}):
            cells = "".join(f"<td class='cell'>{_thumbs(f[f['method'] == method]) if (f['method'] == method).any() else '–'}</td>"
                            for f in here.values())
            parts.append(f"<tr><th>{esc(method)}</th>{cells}</tr>")
        parts.append("</table>")
    return parts


def html_page(runs, diff, t2, *, listing, none: str) -> str:
    """The page: the runs (``listing``), the parameters that differ (or the ``none`` note), Table 2, the galleries."""
    return "\n".join([
        "<!DOCTYPE html>", "<html><head><meta charset='utf-8'><title>palp runs compare</title>",
        f"<style>{_STYLE}</style></head><body>", "<h1>palp runs compare</h1>", _html_table(listing),
        "<h2>Parameters that differ</h2>", f"<p>{html.escape(none)}</p>" if none else _html_table(diff),
        "<h2>Table 2</h2>", _html_table(t2, floats=True),
        "<h2>Galleries (each method's samples at its last step)</h2>", *gallery(runs), "</body></html>"])
