"""Identity-vs-alignment frontiers of the toy-world methods, with paired headlines.

    python evaluation/toyworld/frontier/frontier.py --root ROOT [ROOT ...] --out DIR

Reads the compare step's scores.csv of each pipeline root (or ``--scores FILE ...``), one point
per (method, learning rate, lambda, snapshot step): the judge's identity kept against the
prompt elements it finds and against the toy CLIP's text alignment, every point with its 95%
cluster-bootstrap interval over (subject, prompt) units, and each method's Pareto frontier (the
points no other point of the method beats on both identity and elements found). The runs'
learning rate and lambda are read from each run's ``training_config.json``.

Headlines, paired (every bootstrap draw resamples the same units for every method, and
rebuilds every frontier from them):

- at matched identity: TI+DB's identity at its ``--match-step`` point (500) is the target;
  each frontier is interpolated linearly to it; elements found of the method minus TI+DB's;
- at matched elements found: the same, with the axes swapped.

Below a frontier's least identity, the frontier's point of least identity counts (it keeps
more than the target and finds more); beyond its greatest identity the difference is
undefined in that draw: the table says in what share of draws it is defined, and never
extrapolates. Besides the headlines, ``steps.md``: each method minus TI+DB at the same
snapshot step (the Fig.-6 comparison), paired over units. TI+DB, trained once per subject,
may be sampled on more prompts than the alignment methods' units: it is read on those units.

Writes ``points.md``, ``headline.md``, ``frontier.png`` (the two planes), ``fig6.png``
(elements found, identity and CLIP text vs steps for every setting), ``summary.json`` and
``scores.csv.gz`` (with the lr and lambda columns: ``--scores`` rebuilds all of it).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the toy world folder: experiment_tables
from experiment_tables import (FOUND, IDENTITY, UNIT, add_sources, keep_scores, load, methods_in,  # noqa: E402
                               read_scores)

from palp.core.storage import read_text, write_bytes, write_text  # noqa: E402

TEXT = "Target prompt"
METRICS = [FOUND, IDENTITY, TEXT]
BASELINE = "ti-db"
POINT = ["method", "lr", "lambda", "step"]
NO_LAMBDA = -1.0  # TI+DB's lambda in a point's key: it has no alignment term


class FrontierError(SystemExit):
    pass


def settings(df: pd.DataFrame) -> pd.DataFrame:
    """Add each run's learning rate and lambda (from its training_config.json), once per run."""
    if {"lr", "lambda"} <= set(df.columns):
        df = df.copy()
        df["lr"], df["lambda"] = pd.to_numeric(df["lr"]), pd.to_numeric(df["lambda"], errors="coerce")
        return df
    found = {}
    for run in df["run"].unique():
        try:
            cfg = json.loads(read_text(f"{str(run).rstrip('/')}/training_config.json"))
        except Exception as e:  # noqa: BLE001 - any unreadable run is the same fix
            raise FrontierError(f"cannot read {run}/training_config.json ({e}); the frontier needs each run's lr and "
                                "lambda: run it where the pipeline root is readable, or pass --scores with lr and lambda columns")
        found[run] = (float(cfg["lr"]), float(cfg.get("lam", 1.0)))
    df = df.copy()
    df["lr"] = df["run"].map(lambda r: found[r][0])
    df["lambda"] = df["run"].map(lambda r: found[r][1])
    df.loc[df["method"] == BASELINE, "lambda"] = np.nan  # TI+DB has no alignment term
    return df


def common_units(df: pd.DataFrame) -> pd.DataFrame:
    """Keep the (subject, prompt) units every method in ``df`` was sampled on (TI+DB may cover more)."""
    units = None
    for _, g in df.groupby("method"):
        u = set(map(tuple, g[UNIT].drop_duplicates().to_numpy()))
        units = u if units is None else units & u
    if not units:
        raise FrontierError("no (subject, prompt) unit is sampled by every method")
    keep = df[UNIT].apply(tuple, axis=1).isin(units)
    return df[keep]


class Points:
    """Per point and unit, the sums and counts of every metric: the bootstrap's raw material."""

    def __init__(self, df: pd.DataFrame):
        df = df.assign(**{"lambda": df["lambda"].fillna(NO_LAMBDA)})  # NaN keys never match themselves
        self.units = sorted(map(tuple, df[UNIT].drop_duplicates().to_numpy()))
        self.keys = sorted(map(tuple, df[POINT].drop_duplicates().to_numpy()), key=lambda k: (
            methods_in(df).index(k[0]), k[1], k[2], k[3]))
        pos = {u: i for i, u in enumerate(self.units)}
        pk = {k: i for i, k in enumerate(self.keys)}
        shape = (len(self.keys), len(self.units))
        self.sums = {m: np.zeros(shape) for m in METRICS}
        self.counts = {m: np.zeros(shape) for m in METRICS}
        g = df.groupby(POINT + UNIT, dropna=False)[METRICS].agg(["sum", "count"])
        for idx, row in g.iterrows():
            p, u = pk[tuple(idx[:4])], pos[tuple(idx[4:])]
            for m in METRICS:
                self.sums[m][p, u], self.counts[m][p, u] = row[(m, "sum")], row[(m, "count")]

    def means(self, draw: np.ndarray | None = None) -> dict:
        """{metric: (P,) or (P, R)} means over the units (``draw``: (R, U) resampled unit indices)."""
        out = {}
        for m in METRICS:
            s, n = (self.sums[m].sum(1), self.counts[m].sum(1)) if draw is None else \
                (self.sums[m][:, draw].sum(2), self.counts[m][:, draw].sum(2))
            out[m] = np.where(n > 0, s / np.maximum(n, 1), np.nan)
        return out

    def of(self, method: str) -> np.ndarray:
        return np.array([i for i, k in enumerate(self.keys) if k[0] == method])


def pareto(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Indices of the points no other point beats on both x and y (ties kept), sorted by x."""
    ok = ~(np.isnan(x) | np.isnan(y))
    keep = [i for i in np.flatnonzero(ok)
            if not np.any(ok & (x >= x[i]) & (y >= y[i]) & ((x > x[i]) | (y > y[i])))]
    return np.array(sorted(keep, key=lambda i: (x[i], -y[i])), dtype=int)


def along(x: np.ndarray, y: np.ndarray, at: float) -> float:
    """The most y the method reaches with x >= ``at``: its Pareto frontier, linearly interpolated
    between the frontier's points, and left of the frontier's smallest x the y of that point (a
    point with more x and more y covers any target below it: free disposal). NaN beyond the
    frontier's largest x: no snapshot keeps that much, and nothing is extrapolated."""
    f = pareto(x, y)
    if len(f) == 0 or at > x[f].max() + 1e-12:
        return float("nan")
    if at <= x[f].min():
        return float(y[f][0])
    return float(np.interp(at, x[f], y[f]))


def headlines(df: pd.DataFrame, match_step: int, baseline_lr: float | None, reps: int, seed: int) -> dict:
    """{method: {"elements at matched identity": ..., "identity at matched elements": ...}}: each a dict
    of the point estimate, the 95% interval, the share of draws where it is defined, the target
    and the number of units. Each method is paired with TI+DB on the units both were sampled on."""
    out = {}
    for method in methods_in(df):
        if method == BASELINE:
            continue
        pts = Points(common_units(df[df["method"].isin([BASELINE, method])]))
        base = [i for i, k in enumerate(pts.keys) if k[0] == BASELINE and k[3] == match_step
                and (baseline_lr is None or np.isclose(k[1], baseline_lr))]
        if not base:
            raise FrontierError(f"no {BASELINE} point at step {match_step}" + (f" and lr {baseline_lr:g}" if baseline_lr else "")
                                + "; give --match-step / --baseline-lr of a point the runs have")
        if len(base) > 1:
            lrs = ", ".join(f"{pts.keys[i][1]:g}" for i in base)
            raise FrontierError(f"{BASELINE} has a step-{match_step} point at several learning rates ({lrs}); choose one with --baseline-lr")
        b = base[0]
        rng = np.random.default_rng(seed)
        draws = rng.integers(0, len(pts.units), size=(reps, len(pts.units)))
        full, boot = pts.means(), pts.means(draws)
        ti, mi = pts.of(BASELINE), pts.of(method)
        res = {}
        for name, xm, ym in (("elements at matched identity", IDENTITY, FOUND), ("identity at matched elements", FOUND, IDENTITY)):
            def diff(x, y):
                return along(x[mi], y[mi], x[b]) - along(x[ti], y[ti], x[b])
            est = diff(full[xm], full[ym])
            d = np.array([diff(boot[xm][:, r], boot[ym][:, r]) for r in range(reps)])
            ok = d[~np.isnan(d)]
            res[name] = {"estimate": est, "lo": float(np.percentile(ok, 2.5)) if len(ok) else float("nan"),
                         "hi": float(np.percentile(ok, 97.5)) if len(ok) else float("nan"),
                         "defined": float(len(ok) / reps), "target": float(full[xm][b]), "units": len(pts.units)}
        out[method] = res
    return out


def same_step(df: pd.DataFrame, baseline_lr: float | None, reps: int, seed: int) -> tuple[str, list]:
    """Each (method, lr, lambda) setting minus TI+DB (at ``baseline_lr``) at the same snapshot
    step, paired over the units both were sampled on: mean [95% CI] of elements found, identity."""
    base = df[df["method"] == BASELINE]
    if baseline_lr is not None:
        base = base[np.isclose(base["lr"], baseline_lr)]
    if base["lr"].nunique() != 1:
        return "(TI+DB ran at several learning rates: give --baseline-lr)", []
    rows, numbers = [], []
    rng = np.random.default_rng(seed)
    cols = [FOUND, IDENTITY, TEXT]
    b = base.groupby(["step", *UNIT])[cols].mean()
    for (method, lr, lam), g in df[df["method"] != BASELINE].groupby(["method", "lr", "lambda"], sort=False):
        m = g.groupby(["step", *UNIT])[cols].mean()
        diff = (m - b).dropna()
        for step, d in diff.groupby(level="step"):
            idx = rng.integers(0, len(d), size=(reps, len(d)))
            row = {"setting": label((method, lr, lam, step)), "step": int(step), "units": len(d)}
            num = {"method": method, "lr": lr, "lambda": lam, "step": int(step), "units": len(d)}
            for c in cols:
                v = d[c].to_numpy()
                lo, hi = np.percentile(v[idx].mean(1), [2.5, 97.5])
                row[f"{c} minus TI+DB"] = f"{v.mean():+.3f} [{lo:+.3f}, {hi:+.3f}]"
                num[c] = (float(v.mean()), float(lo), float(hi))
            rows.append(row)
            numbers.append(num)
    return (pd.DataFrame(rows).to_markdown(index=False) if rows else "(no method besides TI+DB)"), numbers


def label(key) -> str:
    method, lr, lam, step = key
    return f"{method} lr {lr:g}" + ("" if lam == NO_LAMBDA else f" λ {lam:g}")


def point_table(pts: Points, reps: int, seed: int) -> tuple[str, list]:
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(pts.units), size=(reps, len(pts.units)))
    full, boot = pts.means(), pts.means(draws)
    on_frontier = set()
    for method in dict.fromkeys(k[0] for k in pts.keys):
        mi = pts.of(method)
        on_frontier.update(mi[pareto(full[IDENTITY][mi], full[FOUND][mi])].tolist())
    rows, numbers = [], []
    for i, k in enumerate(pts.keys):
        cells, num = {}, {"method": k[0], "lr": k[1], "lambda": None if k[2] == NO_LAMBDA else k[2], "step": int(k[3])}
        for m in METRICS:
            lo, hi = np.nanpercentile(boot[m][i], [2.5, 97.5])
            cells[m] = f"{full[m][i]:.3f} [{lo:.3f}, {hi:.3f}]"
            num[m] = (float(full[m][i]), float(lo), float(hi))
        on = i in on_frontier
        rows.append({"setting": label(k), "step": int(k[3]), "units": int((pts.counts[FOUND][i] > 0).sum()),
                     "images": int(pts.counts[FOUND][i].sum()), **cells,
                     "on frontier": "yes" if on else ""})
        num["on_frontier"] = bool(on)
        numbers.append(num)
    return pd.DataFrame(rows).to_markdown(index=False), numbers


def headline_table(h: dict) -> str:
    rows = []
    for method, res in h.items():
        for name, r in res.items():
            rows.append({"comparison": f"{method} - {BASELINE}", "units": r["units"], "measure": name, "target": f"{r['target']:.3f}",
                         "difference [95% CI]": "undefined: the target is outside the frontier" if np.isnan(r["estimate"])
                         else f"{r['estimate']:+.3f} [{r['lo']:+.3f}, {r['hi']:+.3f}]",
                         "draws where defined": f"{100 * r['defined']:.0f}%"})
    return pd.DataFrame(rows).to_markdown(index=False)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig, plt) -> bytes:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _err(v) -> list:
    m, lo, hi = v
    return [[max(m - lo, 0.0)], [max(hi - m, 0.0)]]


def frontier_figure(pts: Points, numbers: list, target: float | None) -> bytes:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    full = pts.means()
    colours = {}
    for ax, ym, title in ((axes[0], FOUND, "prompt elements found (judge)"), (axes[1], TEXT, "CLIP text alignment (toy CLIP)")):
        for method in dict.fromkeys(k[0] for k in pts.keys):
            mi = pts.of(method)
            c = colours.setdefault(method, f"C{len(colours)}")
            for i in mi:
                n = numbers[i]
                ax.errorbar(n[IDENTITY][0], n[ym][0], xerr=_err(n[IDENTITY]), yerr=_err(n[ym]), fmt="o", color=c, alpha=0.45, ms=4, lw=0.8)
                ax.annotate(f"{n['step']}", (n[IDENTITY][0], n[ym][0]), fontsize=6, alpha=0.7, xytext=(2, 2), textcoords="offset points")
            f = pareto(full[IDENTITY][mi], full[ym][mi])
            ax.plot(full[IDENTITY][mi][f], full[ym][mi][f], "-o", color=c, lw=2, ms=7, label=f"{method} (frontier)")  # one point is a frontier too
        if target is not None:
            ax.axvline(target, color="grey", ls=":", lw=1, label=f"{BASELINE} identity at the matched step")
        ax.set_xlabel("identity kept (judge)")
        ax.set_ylabel(title)
        ax.set_title(f"identity vs {title}")
    axes[0].legend(fontsize=8)
    return _png(fig, plt)


def fig6(pts: Points, numbers: list) -> bytes:
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.4))
    by_setting = {}
    for i, k in enumerate(pts.keys):
        by_setting.setdefault(label(k), []).append(i)
    for ax, m, title in zip(axes, METRICS, ("prompt elements found (judge)", "identity kept (judge)", "CLIP text alignment")):
        for j, (name, idx) in enumerate(by_setting.items()):
            idx = sorted(idx, key=lambda i: pts.keys[i][3])
            steps = [pts.keys[i][3] for i in idx]
            mean = [numbers[i][m][0] for i in idx]
            ax.plot(steps, mean, marker="o", label=name, color=f"C{j % 10}", ls="-" if j < 10 else "--")
            ax.fill_between(steps, [numbers[i][m][1] for i in idx], [numbers[i][m][2] for i in idx], alpha=0.1, color=f"C{j % 10}")
        ax.set_xscale("log")
        ax.set_xlabel("fine-tuning steps")
        ax.set_title(title)
    axes[0].legend(fontsize=7)
    return _png(fig, plt)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_sources(ap, "scores.csv files written by palp score --judge (or this report's scores.csv.gz)")
    ap.add_argument("--match-step", type=int, default=500, help="TI+DB's snapshot whose identity / elements found the headlines match")
    ap.add_argument("--baseline-lr", type=float, help="TI+DB's learning rate for the matched point, when it ran at several")
    ap.add_argument("--reps", type=int, default=2000, help="bootstrap draws")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    paths, df = read_scores(args, read=lambda p: settings(load(p)))
    df = df[df["method"] != "base"]
    if BASELINE not in set(df["method"]):
        raise FrontierError(f"no {BASELINE} runs in {', '.join(paths)}: the headlines compare against it")
    aligned = df[df["method"] != BASELINE]
    if not aligned.empty:  # TI+DB sampled on more prompts than the units (once per subject): read it on the units
        df = df[df[UNIT].apply(tuple, axis=1).isin(set(map(tuple, aligned[UNIT].to_numpy())))]
    h = headlines(df, args.match_step, args.baseline_lr, args.reps, args.seed)
    pts = Points(df)
    table, numbers = point_table(pts, args.reps, args.seed)
    target = next(iter(next(iter(h.values())).values()))["target"] if h else None
    out = args.out.rstrip("/")
    write_text(f"{out}/points.md", table + "\n")
    head = headline_table(h) if h else "(no method besides TI+DB)"
    write_text(f"{out}/headline.md", head + "\n")
    steps_table, steps_numbers = same_step(df, args.baseline_lr, args.reps, args.seed)
    write_text(f"{out}/steps.md", steps_table + "\n")
    write_bytes(f"{out}/frontier.png", frontier_figure(pts, numbers, target), content_type="image/png")
    write_bytes(f"{out}/fig6.png", fig6(pts, numbers), content_type="image/png")
    write_text(f"{out}/summary.json", json.dumps({"scores": paths, "units": [list(u) for u in pts.units], "match_step": args.match_step,
                                                 "points": numbers, "headlines": h, "same_step": steps_numbers}, indent=2) + "\n")
    keep_scores(df, paths, out)
    print(f"## Points (mean [95% CI], {len(pts.units)} (subject, prompt) units)\n\n{table}\n\n## Headlines\n\n{head}\n\n"
          f"## Same step, minus TI+DB\n\n{steps_table}\n\n-> {out}")


if __name__ == "__main__":
    main()
