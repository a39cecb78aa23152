"""Tables and curves of the toy-world experiment, with bootstrap confidence intervals.

    python evaluation/toyworld/experiment_tables.py --root PIPELINE_ROOT [PIPELINE_ROOT ...] --out evaluation/toyworld/results

Reads the compare step's scores.csv (or ``--scores FILE ...``; several roots or files, e.g.
the experiment run one subject at a time, are concatenated: every score is per image) and
writes, to ``--out``:

- ``table2.md``: per method at its last step, the judge's per-element alignment (style, place,
  time: fraction correct), identity preservation (fraction of the identity attributes the
  prompted style shows that the image keeps), and the toy CLIP's text alignment. Not the toy
  CLIP's image alignment: it was negative for every method and the base model alike
  (-0.13 ... -0.07 in every table), so its image-image cosine does not rank renders of the
  same instance above others and does not measure identity; the judge's identity does;
- ``table3.md``: the user study's shape with the judge as the rater: one random sample per
  (subject, prompt, method), % of prompt elements found and % identity kept;
- ``paired.md``: each method minus TI+DB, paired by (subject, prompt); and each PALP-over-X run
  (``palp+neti``...) minus X alone, where both ran;
- ``curves.png``: the Fig.-6 curves (alignment and identity vs fine-tuning steps), the base
  model prompted with the class word as the reference line;
- ``gallery.png``: final-step samples, a row per subject (each with another prompt), where the
  images are readable;
- ``summary.json``: every number above;
- ``scores.csv.gz``: the scores read (``--scores`` rebuilds everything but the gallery from it).

Intervals are 95% percentile bootstraps over (subject, prompt) pairs, the unit of the design.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd

from palp.core import safecsv
from palp.core.storage import write_bytes, write_text

ELEMENTS = ["Judge: style", "Judge: place", "Judge: time"]
FOUND = "Elements found"
IDENTITY = "Judge: identity"
COLUMNS = [*ELEMENTS, FOUND, IDENTITY, "Judge: class", "Target prompt"]  # no "Image alignment": see above
ORDER = ["base", "ti-db", "palp", "palp-iid", "sds", "sds-iid", "nfsd", "custom-diffusion", "palp+custom-diffusion",
         "p-plus", "palp+p-plus", "neti", "palp+neti"]
UNIT = ["subject", "prompt"]


def find_scores(root: str) -> str:
    hits = sorted(glob.glob(f"{root}/**/compare*/**/scores.csv", recursive=True))
    if not hits:
        raise SystemExit(f"no compare step scores.csv under {root}; pass --scores FILE")
    return hits[-1]


def load(path: str) -> pd.DataFrame:
    data = Path(path).read_bytes()
    df = safecsv.read_csv(gzip.decompress(data) if path.endswith(".gz") else data)  # palp's spreadsheet-safe cells
    missing = [c for c in ELEMENTS + [IDENTITY] if c not in df.columns]
    if missing:
        raise SystemExit(f"{path} has no judge columns ({', '.join(missing)}); score with --judge toyworld")
    for c in COLUMNS:
        if c in df.columns and c != FOUND:
            df[c] = pd.to_numeric(df[c], errors="coerce")
    df[FOUND] = df[ELEMENTS].mean(axis=1)
    return df


def final_step(df: pd.DataFrame) -> pd.DataFrame:
    last = df.groupby(["method", "run"])["step"].transform("max")
    return df[df["step"] == last]


def cluster_bootstrap(df: pd.DataFrame, cols: list[str], *, reps: int = 2000, seed: int = 0) -> dict:
    """{col: (mean, lo, hi)}: the mean over samples, resampling (subject, prompt) units."""
    units = df.groupby(UNIT)[cols].agg(["sum", "count"])
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(units), size=(reps, len(units)))
    out = {}
    for c in cols:
        s, n = units[(c, "sum")].to_numpy(), units[(c, "count")].to_numpy()
        boot = s[idx].sum(1) / np.maximum(n[idx].sum(1), 1)
        out[c] = (float(s.sum() / max(n.sum(), 1)), float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5)))
    return out


def methods_in(df: pd.DataFrame) -> list[str]:
    present = list(df["method"].unique())
    return [m for m in ORDER if m in present] + sorted(m for m in present if m not in ORDER)


def fmt(v, pct=False) -> str:
    m, lo, hi = v
    if pct:
        return f"{100 * m:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"
    return f"{m:.3f} [{lo:.3f}, {hi:.3f}]"


def table2(df: pd.DataFrame) -> tuple[str, dict]:
    final = final_step(df)
    cols = [c for c in COLUMNS if c in df.columns]
    rows, numbers = [], {}
    for m in methods_in(final):
        stats = cluster_bootstrap(final[final["method"] == m], cols)
        numbers[m] = stats
        rows.append({"method": m, "n": int((final["method"] == m).sum()), **{c: fmt(stats[c]) for c in cols}})
    return pd.DataFrame(rows).to_markdown(index=False), numbers


def table3(df: pd.DataFrame, seed: int = 0) -> tuple[str, dict]:
    """One random sample per (subject, prompt, method) at the last step, as the study picks."""
    final = final_step(df)
    picked = final.groupby([*UNIT, "method"]).sample(1, random_state=seed)
    rows, numbers = [], {}
    for m in methods_in(picked):
        stats = cluster_bootstrap(picked[picked["method"] == m], [FOUND, IDENTITY])
        numbers[m] = stats
        rows.append({"method": m, "questions": int((picked["method"] == m).sum()),
                     "prompt elements found (%)": fmt(stats[FOUND], pct=True),
                     "identity kept (%)": fmt(stats[IDENTITY], pct=True)})
    return pd.DataFrame(rows).to_markdown(index=False), numbers


def own_baselines(methods: list[str]) -> dict[str, str]:
    """{PALP over a personalization: that personalization alone}, for the pairs both present
    ("palp+neti": "neti", "palp-iid+neti": "neti"): the paper's claim that the alignment term
    improves any method."""
    pairs = {m: m.split("+", 1) for m in methods if "+" in m}
    return {m: over for m, (head, over) in pairs.items() if head in ("palp", "palp-iid") and over in methods}


def paired(df: pd.DataFrame, baseline: str | None = "ti-db", reps: int = 2000, seed: int = 0) -> tuple[str, dict]:
    """Method minus baseline per (subject, prompt) unit at the last step, bootstrapped; with
    ``baseline`` None, each PALP-over-X run minus X alone (:func:`own_baselines`)."""
    final = final_step(df)
    cols = [FOUND, IDENTITY, "Target prompt"]
    means = final.groupby([*UNIT, "method"])[cols].mean()
    present = methods_in(final)
    if baseline is None:
        pairs = own_baselines(present)
        if not pairs:
            return "(no run of PALP over a personalization beside that personalization alone)", {}
    elif baseline not in present:
        return f"(no {baseline} runs)", {}
    else:
        pairs = {m: baseline for m in present if m not in (baseline, "base")}
    rows, numbers = [], {}
    rng = np.random.default_rng(seed)
    for m, b in pairs.items():
        diff = (means.xs(m, level="method") - means.xs(b, level="method")).dropna()
        if diff.empty:
            continue
        idx = rng.integers(0, len(diff), size=(reps, len(diff)))
        stats = {}
        for c in cols:
            v = diff[c].to_numpy()
            boot = v[idx].mean(1)
            stats[c] = (float(v.mean()), float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5)))
        numbers[m] = stats
        rows.append({"method": f"{m} - {b}", "units": len(diff), **{c: fmt(stats[c]) for c in cols}})
    return pd.DataFrame(rows).to_markdown(index=False), numbers


def curves(df: pd.DataFrame) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(FOUND, "prompt elements found (judge)"), (IDENTITY, "identity kept (judge)"),
              ("Target prompt", "CLIP text alignment")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (col, title) in zip(axes, panels):
        for m in methods_in(df):
            sub = df[df["method"] == m]
            if m == "base":
                ax.axhline(sub[col].mean(), color="grey", ls="--", label="base (class word)")
                continue
            steps = sorted(sub["step"].unique())
            stats = [cluster_bootstrap(sub[sub["step"] == s], [col], reps=500)[col] for s in steps]
            mean = [s[0] for s in stats]
            ax.plot(steps, mean, marker="o", label=m)
            ax.fill_between(steps, [s[1] for s in stats], [s[2] for s in stats], alpha=0.15)
        ax.set_title(title)
        ax.set_xlabel("fine-tuning steps")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def gallery(df: pd.DataFrame, per_cell: int = 3) -> bytes | None:
    """Final-step samples: a row per subject, each with another prompt (the i-th subject with the
    i-th prompt), ``per_cell`` images per method; None where the images are not readable (a
    scores.csv moved away from its pipeline root)."""
    from PIL import Image, ImageDraw

    from palp.core.gcs import StorageError
    from palp.core.subject_images import read_image

    if "path" not in df.columns:
        return None
    last = final_step(df)
    methods = methods_in(last)
    have = set(last.groupby(UNIT).groups)
    subjects, prompts = sorted(last["subject"].unique()), sorted(last["prompt"].unique())
    units = [u for u in ((s, prompts[i % len(prompts)]) for i, s in enumerate(subjects)) if u in have]
    size, label_w, head = 64, 330, 16
    sheet = Image.new("RGB", (label_w + len(methods) * per_cell * size, head + len(units) * size), "white")
    draw = ImageDraw.Draw(sheet)
    for j, m in enumerate(methods):
        draw.text((label_w + j * per_cell * size + 4, 2), m, fill="black")
    for i, (subject, prompt) in enumerate(units):
        draw.text((4, head + i * size + 24), f"{subject}: {prompt}"[:56], fill="black")
        for j, m in enumerate(methods):
            cell = last[(last["subject"] == subject) & (last["prompt"] == prompt) & (last["method"] == m)]
            for k, path in enumerate(cell.sort_values("sample")["path"][:per_cell]):
                try:
                    im = read_image(str(path)).convert("RGB").resize((size, size))
                except (OSError, ValueError, StorageError):
                    return None
                sheet.paste(im, (label_w + (j * per_cell + k) * size, head + i * size))
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    return buf.getvalue()


def add_sources(ap: argparse.ArgumentParser, scores_help: str) -> None:
    """--root / --scores (one of them) and --out: where the scores come from and the tables go."""
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--root", nargs="+", help="pipeline roots (palp pipeline run-local --pipeline-root)")
    src.add_argument("--scores", nargs="+", help=scores_help)
    ap.add_argument("--out", required=True)


def read_scores(args, read=load) -> tuple[list[str], pd.DataFrame]:
    """The scores of every --root or --scores file, each ``read``, concatenated (every score is
    per image); the same image given twice is refused."""
    paths = args.scores or [find_scores(r) for r in args.root]
    df = pd.concat([read(p) for p in paths], ignore_index=True)
    if "task" in df.columns and df.duplicated(["task", "method", "run", "step", "prompt", "sample"]).any():
        raise SystemExit(f"the same images are scored in more than one of {', '.join(paths)}; give each run once")
    return paths, df


def keep_scores(df: pd.DataFrame, paths: list[str], out: str) -> None:
    """Write the scores read to ``out``/scores.csv.gz (they rebuild the tables), unless that is what was read."""
    if [str(Path(p).resolve()) for p in paths] != [str(Path(out, "scores.csv.gz").resolve())]:
        write_bytes(f"{out}/scores.csv.gz", gzip.compress(safecsv.to_csv(df.drop(columns=[FOUND]), index=False).encode(), mtime=0))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_sources(ap, "scores.csv files written by palp score --judge (or .csv.gz)")
    args = ap.parse_args(argv)
    paths, df = read_scores(args)
    path = paths[0] if len(paths) == 1 else paths
    t2, n2 = table2(df)
    t3, n3 = table3(df)
    tp, np_ = paired(df)
    to, no = paired(df, baseline=None)
    out = args.out.rstrip("/")
    write_text(f"{out}/table2.md", t2 + "\n")
    write_text(f"{out}/table3.md", t3 + "\n")
    write_text(f"{out}/paired.md", f"Each method minus TI+DB:\n\n{tp}\n\nPALP over a personalization minus that "
                                   f"personalization alone:\n\n{to}\n")
    write_bytes(f"{out}/curves.png", curves(df), content_type="image/png")
    sheet = gallery(df)
    if sheet is not None:
        write_bytes(f"{out}/gallery.png", sheet, content_type="image/png")
    else:
        print("no gallery: the scored images are not readable from here (a gallery.png already in --out is kept)")
    write_text(f"{out}/summary.json", json.dumps({"scores": path, "table2": n2, "table3": n3, "paired": np_,
                                                       "paired_own": no}, indent=2) + "\n")
    keep_scores(df, paths, out)
    print(f"## Table 2 (last step; mean [95% CI])\n\n{t2}\n\n## Table 3 (judge as rater)\n\n{t3}\n\n## Paired\n\n{tp}\n\n"
          f"## PALP over each personalization, paired with it alone\n\n{to}\n")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
