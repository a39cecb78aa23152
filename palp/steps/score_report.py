"""Pictures and pages people look at: the alignment-vs-steps plot and a self-contained HTML report.

The report embeds every image as a ``data:`` URI and has no scripts, stylesheets or links to
anything outside itself, so it renders inside a sandboxed iframe (a pipeline UI's HTML view).
"""

from __future__ import annotations

import html
import io

import numpy as np
import pandas as pd

from palp.core.pages import data_uri, thumbnail

# The two alignment columns of Table 2 that the report plots (palp.steps.score writes them).
TARGET = "Target prompt"
IMAGE = "Image alignment"
# The toy world's judge columns (palp.toyworld.judge.JUDGE_COLUMNS), when a run was scored with it.
JUDGE_ELEMENTS = ("Judge: style", "Judge: place", "Judge: time")
JUDGE_IDENTITY = "Judge: identity"
FOUND = "Elements found"



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


def last_steps(scores: pd.DataFrame) -> pd.DataFrame:
    """Each run's samples at its last step (what Table 2, the verdict and the galleries show)."""
    last = scores.groupby(["method", "run"])["step"].transform("max")
    return scores[scores["step"] == last]


def mean_interval(values: pd.Series, units: pd.Series, *, draws: int = 2000, seed: int = 0) -> tuple[float, float, float, np.ndarray]:
    """Mean with a 95% percentile bootstrap interval, resampling samples within each unit
    (subject x prompt), so every draw keeps the run's mix of units; also returns the draws."""
    rng = np.random.default_rng(seed)
    groups = [g.to_numpy(float) for _, g in values.groupby(units.to_numpy())]
    total = sum(len(g) for g in groups)
    boot = np.zeros(draws)
    for g in groups:
        boot += g[rng.integers(0, len(g), size=(draws, len(g)))].sum(axis=1)
    boot /= total
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return float(values.mean()), float(lo), float(hi), boot


def verdict(scores: pd.DataFrame, method: str = "palp", baseline: str = "ti-db") -> str | None:
    """One plain sentence: does ``method`` beat ``baseline`` in this run (each run's last step)?

    Measures: with the toy world's judge, prompt elements found and identity kept; otherwise
    CLIP text and image alignment. Each mean is given with its 95% bootstrap interval and, when
    the run sampled the base model, the base model's mean. No winner is named on a measure
    where both methods' intervals include the base model's value (neither shows the subject
    learned, or the prompt lost, beyond what the base model does), nor where the difference's
    interval includes zero. None without both methods."""
    final = last_steps(scores)
    methods = set(final["method"])
    if method not in methods or baseline not in methods:
        return None
    if all(c in final.columns for c in (*JUDGE_ELEMENTS, JUDGE_IDENTITY)) and final[JUDGE_IDENTITY].notna().any():
        final = final.assign(**{FOUND: final[list(JUDGE_ELEMENTS)].mean(axis=1)})
        measures = ((FOUND, "prompt elements found (judge)"), (JUDGE_IDENTITY, "identity kept (judge)"))
    elif TARGET in final.columns and IMAGE in final.columns:
        measures = ((TARGET, "CLIP text alignment"), (IMAGE, "CLIP image alignment"))
    else:
        return None
    units = final["subject"].astype(str) + " | " + final["prompt"].astype(str)
    parts, outcome = [], {}
    for col, name in measures:
        parts.append(_compare_on(final, units, col, name, method, baseline, outcome))
    said = f"{method} vs {baseline} in this run (means, 95% intervals): " + ", ".join(parts) + ": "
    ahead = [n for n, (o, _) in outcome.items() if o == "ahead"]
    behind = [n for n, (o, _) in outcome.items() if o == "behind"]
    undecided = [f"{n} {why}" for n, (o, why) in outcome.items() if o in ("base", "none")]
    if len(ahead) == 2:
        return said + f"{method} beats {baseline} on both."
    if ahead and behind:
        return said + f"a trade-off, not a win: {method} is ahead on {ahead[0]} only."
    if ahead:
        return said + f"{method} is ahead on {ahead[0]} only ({'; '.join(undecided)}): not a win on both."
    if behind:
        return said + f"{method} does not beat {baseline}; {baseline} is ahead on " + " and ".join(behind) + (
            f" ({'; '.join(undecided)})." if undecided else ".")
    return said + f"no winner: {'; '.join(undecided)}."


def _compare_on(final: pd.DataFrame, units: pd.Series, col: str, name: str, method: str, baseline: str,
                outcome: dict) -> str:
    """The verdict's clause on one measure, its outcome recorded in ``outcome[name]``: both
    methods over the units both were measured on, with independent bootstrap draws for each."""
    measured = final[final[col].notna()]
    shared = set(units[measured.index][measured["method"] == method]) & set(units[measured.index][measured["method"] == baseline])
    if not shared:
        outcome[name] = ("none", "not measured")
        return f"{name} not measured on a unit both ran"
    stats = {}
    for seed, m in enumerate((method, baseline)):
        vals = measured.loc[(measured["method"] == m) & units[measured.index].isin(shared), col]
        stats[m] = mean_interval(vals, units[vals.index], seed=seed)
    base = measured.loc[(measured["method"] == "base") & units[measured.index].isin(shared), col]
    base_mean = float(base.mean()) if len(base) else None
    d_lo, d_hi = np.percentile(stats[method][3] - stats[baseline][3], [2.5, 97.5])
    (a, alo, ahi, _), (b, blo, bhi, _) = stats[method], stats[baseline]
    if base_mean is not None and alo <= base_mean <= ahi and blo <= base_mean <= bhi:
        outcome[name] = ("base", "at the base model's level")
    elif d_lo <= 0 <= d_hi:
        outcome[name] = ("none", "no resolvable difference")
    else:
        outcome[name] = ("ahead" if a > b else "behind", "")
    text = f"{name} {a:.3f} [{alo:.3f}, {ahi:.3f}] vs {b:.3f} [{blo:.3f}, {bhi:.3f}]"
    return text + (f" (base model {base_mean:.3f})" if base_mean is not None else "")


def html_report(scores: pd.DataFrame, t2: pd.DataFrame, subjects: dict[str, list[str]], plot: bytes | None,
                units: pd.DataFrame | None = None) -> str:
    esc = html.escape
    said = verdict(scores)
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
    if units is not None:
        parts += ["<h2>What the judge can read of each unit</h2>",
                  "<p>Identity kept at the last step per method, beside the judge's identity on clean renders of the "
                  "subject's ground truth in the prompt's scene and on their VAE round trips (the most a sample can "
                  "keep), and the chance level (a uniform guess of each attribute).</p>",
                  units.to_html(index=False, float_format=lambda v: f"{v:.3f}", border=0)]
    if plot is not None:
        parts += ["<h2>Alignment vs fine-tuning steps (Fig. 6)</h2>", f"<img alt='alignment vs steps' src='{data_uri(plot, 'image/png')}'>"]
    parts.append("<h2>Input images</h2>")
    for name in sorted({n for s in scores["subject"] for n in s.split("+")}):
        thumbs = "".join(f"<img alt='{esc(name)}' src='{thumbnail(u)}'>" for u in subjects[name])
        parts.append(f"<div class='label'>{esc(name)}</div><div class='row'>{thumbs}</div>")
    parts.append("<h2>Samples (last step of each run)</h2>")
    for (subject, prompt), by_prompt in last_steps(scores).groupby(["subject", "prompt"], sort=True):
        parts.append(f"<h3>{esc(subject)}: {esc(by_prompt['clean_prompt'].iloc[0])}</h3>")
        for method, df in by_prompt.groupby("method"):
            label = f"{method} — text {df[TARGET].mean():.3f}, image {df[IMAGE].mean():.3f}"
            thumbs = "".join(f"<img alt='{esc(method)} sample {int(r['sample'])}' src='{thumbnail(r['path'])}'>"
                             for _, r in df.iterrows())
            parts.append(f"<div class='label'>{esc(label)}</div><div class='row'>{thumbs}</div>")
    parts.append("</body></html>")
    return "\n".join(parts)
