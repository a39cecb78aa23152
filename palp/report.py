"""Pictures and pages people look at: the alignment-vs-steps plot and a self-contained HTML report.

The report embeds every image as a ``data:`` URI and has no scripts, stylesheets or links to
anything outside itself, so it renders inside a sandboxed iframe (a pipeline UI's HTML view).
"""

from __future__ import annotations

import base64
import html
import io

import pandas as pd
from PIL import Image

from palp.data import read_image

THUMB = 160
# The two alignment columns of Table 2 that the report plots (palp.score writes them).
TARGET = "Target prompt"
IMAGE = "Image alignment"
# The toy world's judge columns (palp.toyworld.judge.JUDGE_COLUMNS), when a run was scored with it.
JUDGE_ELEMENTS = ("Judge: style", "Judge: place", "Judge: time")
JUDGE_IDENTITY = "Judge: identity"
FOUND = "Elements found"


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def thumbnail(uri: str, size: int = THUMB) -> str:
    im = read_image(uri)
    im.thumbnail((size, size))
    factor = size // max(im.size)
    if factor >= 2:  # small images (the toy world's 64 px) are shown enlarged, pixels kept sharp
        im = im.resize((im.width * factor, im.height * factor), Image.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85)
    return data_uri(buf.getvalue(), "image/jpeg")


def steps_plot(scores: pd.DataFrame) -> bytes | None:
    """PNG of alignment vs training step, or None with < 2 steps: CLIP text (target prompt) and
    image alignment; with the toy world's judge, its prompt elements found and identity kept vs
    step and, as the frontier the two trade along, identity against elements found (a point per
    snapshot, labelled with its step), beside CLIP text alignment."""
    judged = all(c in scores.columns for c in (*JUDGE_ELEMENTS, JUDGE_IDENTITY))
    if judged:
        scores = scores.assign(**{FOUND: scores[list(JUDGE_ELEMENTS)].mean(axis=1)})
    trained = scores[scores["method"] != "base"]
    if trained.groupby("method")["step"].nunique().max() < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if judged:
        panels = [(FOUND, "Prompt elements found (judge)", "fraction"), (JUDGE_IDENTITY, "Identity kept (judge)", "fraction"),
                  (TARGET, "Text alignment (target prompt)", "CLIP cosine")]
    else:
        panels = [(TARGET, "Text alignment (target prompt)", "CLIP cosine"), (IMAGE, "Image alignment", "CLIP cosine")]
    fig, axes = plt.subplots(1, len(panels) + judged, figsize=(5 * (len(panels) + judged), 4), dpi=100)
    base = scores[scores["method"] == "base"]
    for ax, (metric, title, unit) in zip(axes, panels):
        for method, df in trained.groupby("method"):
            curve = df.groupby("step")[metric].mean()
            ax.plot(curve.index, curve.values, marker="o", label=method)
        if not base.empty:
            ax.axhline(base[metric].mean(), color="gray", linestyle="--", label="base model (class word)")
        ax.set_xlabel("fine-tuning step")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    if judged:  # the trade-off: each method's snapshots in the identity-elements plane
        ax = axes[-1]
        for method, df in trained.groupby("method"):
            pts = df.groupby("step")[[JUDGE_IDENTITY, FOUND]].mean()
            ax.plot(pts[JUDGE_IDENTITY], pts[FOUND], marker="o", label=method)
            for step, row in pts.iterrows():
                ax.annotate(str(step), (row[JUDGE_IDENTITY], row[FOUND]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if not base.empty:
            ax.plot(base[JUDGE_IDENTITY].mean(), base[FOUND].mean(), "s", color="gray", label="base model (class word)")
        ax.set_xlabel("identity kept (judge)")
        ax.set_ylabel("prompt elements found (judge)")
        ax.set_title("Identity vs prompt elements (up and right is better)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


_STYLE = """
body { font-family: sans-serif; margin: 24px; color: #222; }
table { border-collapse: collapse; margin: 8px 0 24px; }
td, th { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th { background: #f3f3f3; }
.row { display: flex; flex-wrap: wrap; gap: 6px; margin-bottom: 12px; }
.row img { width: 128px; height: 128px; object-fit: cover; border: 1px solid #ddd; }
.label { font-size: 13px; color: #555; margin: 4px 0; }
"""


def verdict(t2: pd.DataFrame, method: str = "palp", baseline: str = "ti-db") -> str | None:
    """One plain sentence: does ``method`` beat ``baseline`` in this run's Table 2 (last steps)?
    With the toy world's judge: prompt elements found and identity kept; otherwise CLIP text and
    image alignment. None without both methods."""
    if method not in t2.index or baseline not in t2.index:
        return None
    if all(c in t2.columns for c in (*JUDGE_ELEMENTS, JUDGE_IDENTITY)):
        align = t2.loc[[method, baseline], list(JUDGE_ELEMENTS)].mean(axis=1)
        ident = t2.loc[[method, baseline], JUDGE_IDENTITY]
        names = ("prompt elements found (judge)", "identity kept (judge)")
    elif TARGET in t2.columns and IMAGE in t2.columns:
        align, ident = t2.loc[[method, baseline], TARGET], t2.loc[[method, baseline], IMAGE]
        names = ("CLIP text alignment", "CLIP image alignment")
    else:
        return None
    a, b = (align[method], align[baseline]), (ident[method], ident[baseline])
    said = f"{method} vs {baseline} in this run: {names[0]} {a[0]:.3f} vs {a[1]:.3f}, {names[1]} {b[0]:.3f} vs {b[1]:.3f}: "
    better = (a[0] > a[1], b[0] > b[1])
    worse = (a[0] < a[1], b[0] < b[1])
    if all(better):
        return said + f"{method} beats {baseline} on both."
    if not any(better):
        return said + f"{method} does not beat {baseline}" + (" (a tie)." if not any(worse) else f"; {baseline} is ahead on " + " and ".join(
            n for n, w in zip(names, worse) if w) + ".")
    ahead = names[0] if better[0] else names[1]
    return said + f"a trade-off, not a win: {method} is ahead on {ahead} only."


def html_report(scores: pd.DataFrame, t2: pd.DataFrame, subjects: dict[str, list[str]], plot: bytes | None) -> str:
    esc = html.escape
    said = verdict(t2)
    parts = [
        "<!DOCTYPE html>", "<html><head><meta charset='utf-8'><title>palp report</title>",
        f"<style>{_STYLE}</style></head><body>", "<h1>palp: CLIP alignment report</h1>",
        f"<p>{len(scores)} images, methods: {esc(', '.join(sorted(scores['method'].unique())))}. "
        f"Raw cosine of L2-normalised CLIP features; image alignment over all (generated, input) pairs.</p>",
        "<h2>Table 2</h2>", t2.to_html(float_format=lambda v: f"{v:.3f}", border=0),
    ]
    if said:
        more = (" The toy world's earlier frontier experiment (evaluation/toyworld/RESULTS.md) measured identity at the "
                "base model's level on its held-out subjects, and so concludes nothing about PALP."
                if JUDGE_IDENTITY in t2.columns else "")
        parts.append(f"<p class='verdict'><b>{esc(said)}</b> One run at one setting.{esc(more)}</p>")
    if plot is not None:
        parts += ["<h2>Alignment vs fine-tuning steps (Fig. 6)</h2>", f"<img alt='alignment vs steps' src='{data_uri(plot, 'image/png')}'>"]
    parts.append("<h2>Input images</h2>")
    for name in sorted({n for s in scores["subject"] for n in s.split("+")}):
        thumbs = "".join(f"<img alt='{esc(name)}' src='{thumbnail(u)}'>" for u in subjects[name])
        parts.append(f"<div class='label'>{esc(name)}</div><div class='row'>{thumbs}</div>")
    parts.append("<h2>Samples (last step of each run)</h2>")
    last = scores.groupby(["method", "run"])["step"].transform("max")
    final = scores[scores["step"] == last]
    for (subject, prompt), by_prompt in final.groupby(["subject", "prompt"], sort=True):
        parts.append(f"<h3>{esc(subject)}: {esc(by_prompt['clean_prompt'].iloc[0])}</h3>")
        for method, df in by_prompt.groupby("method"):
            label = f"{method} — text {df[TARGET].mean():.3f}, image {df[IMAGE].mean():.3f}"
            thumbs = "".join(f"<img alt='{esc(method)} sample {int(r['sample'])}' src='{thumbnail(r['path'])}'>"
                             for _, r in df.iterrows())
            parts.append(f"<div class='label'>{esc(label)}</div><div class='row'>{thumbs}</div>")
    parts.append("</body></html>")
    return "\n".join(parts)
