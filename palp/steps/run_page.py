"""A trained run's page: its curves and validation grids, self-contained (``report.html``).

The loss terms, the alignment term's size, the gradient norm and the learning rate against
the step (from ``metrics.csv``), then every validation grid (``validation/``) with its step and
prompts. Images are ``data:`` URIs and there is nothing to fetch, so it renders in a pipeline
UI's sandboxed HTML view (the train step publishes it as its ``HTML`` artifact).
"""

from __future__ import annotations

import html
import io
from pathlib import Path

from palp.core.pages import data_uri
from palp.models.run_weights import METRICS_FILE, read_metrics_csv
from palp.steps.validation import FOLDER, read_index

CURVES = (("loss", "loss (total)"), ("rec_loss", "personalization loss (Eq. 1)"),
          ("align_loss", "alignment term size (mean squared score)"),
          ("prior_loss", "prior-preservation loss (class images)"), ("grad_norm", "gradient norm (before clipping)"),
          ("lr", "learning rate"))


def curves_png(rows: list[dict]) -> bytes | None:
    """PNG of each measured column against the step; None without rows."""
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = [(key, title) for key, title in CURVES if key in rows[0]]
    fig, axes = plt.subplots(1, len(present), figsize=(3.2 * len(present), 3), dpi=100, squeeze=False)
    steps = [r["step"] for r in rows]
    for ax, (key, title) in zip(axes[0], present):
        ax.plot(steps, [r[key] for r in rows], linewidth=1)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def final_scalars(rows: list[dict]) -> dict[str, float]:
    """The run's last step's measurements and their mean over the last tenth of the steps."""
    if not rows:
        return {}
    tail = rows[-max(1, len(rows) // 10):]
    out = {"steps": float(rows[-1]["step"])}
    for key, _ in CURVES:
        if key in rows[-1]:
            out[f"final_{key}"] = float(rows[-1][key])
            if key != "lr":
                out[f"mean_last10pct_{key}"] = sum(r[key] for r in tail) / len(tail)
    return out


def training_report(out: str | Path, title: str = "", notes: list[str] = ()) -> str:
    """The page of the run in the local folder ``out``; ``notes``: lines on how it was trained."""
    out = Path(out)
    esc = html.escape
    rows = read_metrics_csv(out / METRICS_FILE)
    parts = ["<!DOCTYPE html>", "<html><head><meta charset='utf-8'><title>palp training</title>",
             "<style>body{font-family:sans-serif;margin:24px;color:#222} img{image-rendering:pixelated;max-width:100%}"
             " .label{font-size:13px;color:#555;margin:12px 0 4px}</style></head><body>",
             f"<h1>palp training{': ' + esc(title) if title else ''}</h1>"]
    parts += [f"<p>{esc(note)}</p>" for note in notes]
    png = curves_png(rows)
    if png is None:
        parts.append("<p>No steps recorded yet.</p>")
    else:
        last = final_scalars(rows)
        parts.append(f"<p>{len(rows)} steps; last: " + ", ".join(f"{k[6:]} {v:.4g}" for k, v in last.items()
                                                                  if k.startswith("final_")) + ".</p>")
        parts.append(f"<img alt='training curves' src='{data_uri(png, 'image/png')}'>")
    checks = read_index(out)
    if checks:
        parts.append("<h2>Validation samples</h2>")
    for check in checks:
        path = out / FOLDER / check["file"]
        if not path.is_file():
            continue
        prompts = "; ".join(check["prompts"])
        parts.append(f"<div class='label'>step {check['step']} ({esc(check['time'])}): {esc(prompts)}; seeds "
                     f"{', '.join(map(str, check['seeds']))}</div>")
        width = 128 * len(check["seeds"])
        parts.append(f"<img alt='validation step {check['step']}' width='{width}' src='{data_uri(path.read_bytes(), 'image/png')}'>")
    parts.append("</body></html>")
    return "\n".join(parts)
