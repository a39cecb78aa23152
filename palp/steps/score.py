"""``palp score``: CLIP text and image alignment of sampled images (Table 2, Fig. 6).

Protocol (docs/method.md, "Evaluation"): open_clip ViT-B-32 with OpenAI weights,
L2-normalised features, **raw cosine**. Text alignment of an image against its clean target
prompt and against each prompt element (Style, Class, Ambiance 1, ...); image alignment is
the mean cosine over all (generated image, input image) pairs of its subject(s).
"""

from __future__ import annotations

import json
import math
import re

import pandas as pd
import torch
from tqdm.auto import tqdm

from palp.core import storage
from palp.core.settings import ScoreSettings as _S
from palp.core.subject_images import read_image
from palp.steps.prepare import load_manifest
from palp.steps.sample_jobs import SAMPLES_CSV, read_table
from palp.steps.score_report import IMAGE, TARGET, last_steps

KEYS = ["subject", "prompt", "method", "step"]


class ScoreError(ValueError):
    """Inputs that cannot be scored; the message says what to fix."""


def read_samples(dirs: list[str]) -> pd.DataFrame:
    """Every sample row of ``dirs``' samples.csv, with its ``path`` and its own texts: ``clean_prompt``
    and ``elements`` (a list of {name, kind, text}) travel with each row, never looked up by
    prompt, so subjects that share a prompt keep their own class words."""
    frames = []
    for d in dirs:
        csv_uri = storage.join(d, SAMPLES_CSV)
        if not storage.exists(csv_uri):
            raise ScoreError(f"{d} holds no {SAMPLES_CSV}; run `palp sample` into it first")
        df = read_table(csv_uri)
        df["path"] = [storage.join(d, f) for f in df["file"]]
        frames.append(df)
    samples = pd.concat(frames, ignore_index=True)
    # The base model's reference samples depend only on the task: runs of one task each make
    # the same ones, which count once.
    base = samples["method"] == "base"
    samples = pd.concat([samples[~base], samples[base].drop_duplicates(["task", "subject", "prompt", "sample", "seed", "settings"])],
                        ignore_index=True)
    if samples.empty:
        raise ScoreError("no samples to score")
    samples["elements"] = [json.loads(e) for e in samples["elements"]]
    return samples


def encode_images(clip, uris: list[str], *, batch_size: int, desc: str, progress: bool) -> torch.Tensor:
    """(N, D) unit features, read and encoded in batches."""
    feats = []
    with tqdm(total=len(uris), desc=desc, unit="img", disable=not progress) as bar:
        for i in range(0, len(uris), batch_size):
            chunk = uris[i : i + batch_size]
            feats.append(clip.encode_images([read_image(u) for u in chunk], batch_size=batch_size))
            bar.update(len(chunk))
    return torch.cat(feats)


def score(samples_dirs: list[str], prepared: str, output: str, *, clip_model: str = _S.clip_model,
          clip_weights: str = _S.clip_weights, judge: str = _S.judge, batch_size: int = _S.batch_size,
          progress: bool = True) -> pd.DataFrame:
    """Score every sample; write scores, summaries, Table 2, metrics, a plot and an HTML report.

    ``judge`` (``toyworld`` or a judge.safetensors): also read style, place, time, class and
    identity off every toy-world image and score each against the prompt and the subject.
    """
    from palp.models.clip import load_clip, resolve_clip

    storage.check_folder_output(output)
    samples = read_samples(samples_dirs)
    manifest = load_manifest(prepared)
    subjects = {n: [storage.join(prepared, p) for p in s["images"]] for n, s in manifest["subjects"].items()}
    needed = {n for names in samples["subject"] for n in names.split("+")}
    unknown = sorted(needed - set(subjects))
    if unknown:
        raise ScoreError(f"subject(s) {', '.join(unknown)} of the samples are not in {prepared}; pass the dataset they were trained on")
    resolved = resolve_clip(clip_model, clip_weights)
    check_clip_pin(manifest.get("clip"), resolved, prepared)
    clip = load_clip(clip_model, clip_weights, resolved=resolved)

    gen = encode_images(clip, list(samples["path"]), batch_size=batch_size, desc="palp score: samples", progress=progress)
    inputs = {n: encode_images(clip, subjects[n], batch_size=batch_size, desc=f"palp score: inputs {n}", progress=False)
              for n in sorted(needed)}
    texts = sorted({t for clean, elements in zip(samples["clean_prompt"], samples["elements"])
                    for t in [clean, *(e["text"] for e in elements)]})
    text_feats = dict(zip(texts, clip.encode_texts(texts)))

    element_names = _element_columns(samples["elements"])
    rows = []
    for k, (_, r) in enumerate(samples.iterrows()):
        g = gen[k]
        row = {c: r[c] for c in samples.columns if c != "elements"}
        row[TARGET] = float(g @ text_feats[r["clean_prompt"]])
        for e in r["elements"]:
            row[e["name"]] = float(g @ text_feats[e["text"]])
        ref = torch.cat([inputs[n] for n in r["subject"].split("+")])
        row[IMAGE] = float((ref @ g).mean())  # mean over every (generated, input) pair
        rows.append(row)
    scores = pd.DataFrame(rows)
    metric_cols = [*element_names, TARGET, IMAGE]
    units = None
    if judge:
        judge_cols, units = judge_columns(scores, manifest, judge, progress=progress)
        scores = pd.concat([scores, judge_cols], axis=1)
        metric_cols += list(judge_cols.columns)
    write_outputs(scores, metric_cols, output, manifest, subjects, units)
    return scores


def check_clip_pin(recorded: dict | None, resolved, prepared: str) -> None:
    """The CLIP that prepared the dataset (its manifest's ``clip`` record), when it is the one
    named now, must still have the same weights: a ScoreError naming both pins otherwise."""
    if not recorded or (recorded.get("model"), recorded.get("weights")) != (resolved.name, resolved.weights):
        return
    if recorded.get("pin") != resolved.pin:
        weights = f" with weights {resolved.weights}" if resolved.weights else ""
        raise ScoreError(
            f"CLIP {resolved.name}{weights} is not the one {prepared} was prepared with: the dataset records pin "
            f"{recorded.get('pin')}, CLIP {resolved.name}{weights} now has pin {resolved.pin}; score with those exact "
            f"CLIP weights (restore them), or prepare the dataset again"
        )


def judge_columns(scores: pd.DataFrame, manifest: dict, spec: str, *, progress: bool) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """The toy-world judge's per-element correctness of every sample (NaN for multi-subject
    samples), and the judged units' ceilings (:func:`unit_table`).

    Identity and class are measured against each subject's ground truth (the manifest's
    ``truth``, from ``palp prepare --truth`` or an experiment's ``truth:``); a subject without
    one gets no identity (NaN, and a line on stderr) and its class is checked against its class
    word."""
    import sys

    from safetensors import SafetensorError

    from palp.toyworld.judge import JUDGE_COLUMNS, judge_row, predict, resolve_judge, truth_identity
    from palp.toyworld.render import SIZE
    from palp.toyworld.scene import parse_caption

    try:
        model = resolve_judge(spec)
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:  # missing, damaged, another model's, an unknown world
        raise ScoreError(f"--judge {spec}: {e}") from e
    identity = {}
    for name, s in manifest["subjects"].items():
        try:
            identity[name] = truth_identity(s["truth"]) if s.get("truth") is not None else None
        except ValueError as e:
            raise ScoreError(f"subject {name}'s truth in the prepared dataset: {e}; prepare it again with a toy-world "
                             f"subject file (--truth {name}=examples/toyworld/NAME.json)") from e
    missing = sorted(n for n in {x for s in scores["subject"] for x in s.split("+")} if identity.get(n) is None)
    if missing:
        print(f"palp score: subject(s) {', '.join(missing)} have no ground truth: the judge's identity is not measured "
              f"for them (give --truth NAME=FILE to palp prepare, or truth: in the experiment)", file=sys.stderr)

    readings = []
    uris = list(scores["path"])
    for i in tqdm(range(0, len(uris), 256), desc="palp score: judge", disable=not progress):
        readings += predict(model, [read_image(u).convert("RGB").resize((SIZE, SIZE)) for u in uris[i : i + 256]])
    rows = []
    for (_, r), reading in zip(scores.iterrows(), readings):
        if "+" in r["subject"]:
            rows.append({c: math.nan for c in JUDGE_COLUMNS.values()})
            continue
        truth = identity[r["subject"]]
        known = truth or {"class": manifest["subjects"][r["subject"]].get("class_word"), "color": None, "pattern": None,
                          "pattern_color": None, "accessory": None}
        row = judge_row(reading, parse_caption(r["clean_prompt"]), known)
        if truth is None:
            row[JUDGE_COLUMNS["identity"]] = math.nan
        rows.append(row)
    columns = pd.DataFrame(rows, index=scores.index, columns=list(JUDGE_COLUMNS.values()))
    return columns, unit_table(pd.concat([scores, columns], axis=1), identity, model)


def unit_table(scores: pd.DataFrame, identity: dict, judge) -> pd.DataFrame | None:
    """Per judged (subject, clean prompt) unit: each method's identity at its last step beside
    the judge's ceilings on that unit (palp.toyworld.ceiling: clean renders and VAE round trips
    of the subject's truth in the prompt's scene) and the chance level; None without truth."""
    from palp.toyworld.ceiling import load_vae, unit_ceiling
    from palp.toyworld.judge import JUDGE_COLUMNS

    ident = JUDGE_COLUMNS["identity"]
    final = last_steps(scores)
    final = final[final[ident].notna()]
    if final.empty:
        return None
    try:
        vae = load_vae(judge)
    except (ValueError, OSError) as e:  # another world's judge without its VAE; a damaged VAE folder
        raise ScoreError(f"--judge: {e}") from e
    rows = []
    for (subject, clean), df in final.groupby(["subject", "clean_prompt"], sort=True):
        c = unit_ceiling(judge, vae, subject, identity[subject], clean)
        row = {"subject": subject, "clean prompt": clean}
        row.update({f"identity: {m}": float(d[ident].mean()) for m, d in df.groupby("method")})
        row.update({"ceiling, clean renders": c.identity_clean, "ceiling, VAE round trips": c.identity_vae,
                    "class ceiling": c.class_clean, "chance": c.chance,
                    "unit": "kept" if not c.failures() else "below the thresholds: " + "; ".join(c.failures())})
        rows.append(row)
    return pd.DataFrame(rows)


def _element_columns(element_lists) -> list[str]:
    names = {e["name"] for elements in element_lists for e in elements}
    order = lambda n: ({"Style": 0}.get(n, 1 if n.startswith("Class") else 2), n)  # noqa: E731
    return sorted(names, key=order)


def summary_table(scores: pd.DataFrame, metric_cols: list[str]) -> pd.DataFrame:
    """mean, std and n of every metric per subject x prompt x method x step."""
    grouped = scores.groupby(KEYS, sort=True)[metric_cols]
    out = pd.concat({"mean": grouped.mean(), "std": grouped.std(ddof=0), "n": grouped.count()}, axis=1)
    out.columns = [f"{metric} {stat}" for stat, metric in out.columns]
    return out.reset_index()


def table2(scores: pd.DataFrame, metric_cols: list[str]) -> pd.DataFrame:
    """Rows = methods, at each run's last step; columns as the paper's Table 2."""
    return last_steps(scores).groupby("method")[metric_cols].mean().reindex(columns=metric_cols)


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def write_outputs(scores: pd.DataFrame, metric_cols: list[str], output: str, manifest: dict, subjects: dict,
                  units: pd.DataFrame | None = None) -> None:
    from palp.core.safecsv import to_csv  # prompts and names as text, never as spreadsheet formulas
    from palp.steps.score_report import html_report, steps_plot, verdict

    # With the toy world's judge, its class column replaces the toy CLIP's class cosines, which
    # read near zero for every method and the base model alike (they stay in scores.csv).
    judged = any(c.startswith("Judge: ") for c in metric_cols)
    t2 = table2(scores, [c for c in metric_cols if not (judged and c.startswith("Class"))])
    storage.write_text(storage.join(output, "scores.csv"), to_csv(scores, index=False))
    storage.write_text(storage.join(output, "summary.csv"), to_csv(summary_table(scores, metric_cols), index=False))
    storage.write_text(storage.join(output, "table2.csv"), to_csv(t2))
    unit_md = ""
    if units is not None:
        units_table = units.to_markdown(index=False, floatfmt=".3f") + "\n"
        storage.write_text(storage.join(output, "judge_units.csv"), to_csv(units, index=False))
        storage.write_text(storage.join(output, "judge_units.md"), units_table)
        unit_md = ("\nWhat the judge can read of each unit (identity at the last step; ceilings on clean renders and VAE "
                   "round trips of the subject's truth; chance):\n\n" + units_table)
    said = verdict(scores)
    storage.write_text(storage.join(output, "table2.md"),
                       t2.to_markdown(floatfmt=".3f") + "\n" + (f"\n{said}\n" if said else "") + unit_md)
    metrics = {f"{_slug(m)}/{_slug(c)}": round(float(v), 6) for m, row in t2.iterrows() for c, v in row.items() if not math.isnan(v)}
    metrics["num_images"] = int(len(scores))
    storage.write_text(storage.join(output, "metrics.json"), json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    plot = steps_plot(scores)
    if plot is not None:
        storage.write_bytes(storage.join(output, "alignment_vs_steps.png"), plot, content_type="image/png")
    storage.write_text(storage.join(output, "report.html"), html_report(scores, t2, subjects, plot, units))


def hand_over(output: str, *, log_metric, table: str, report: str) -> None:
    """Hand a finished score folder to a pipeline step's outputs: each of ``metrics.json``'s
    scalars through ``log_metric(name, value)``, Table 2 and the report copied to ``table`` and
    ``report``, and Table 2 printed, so the step's log shows it."""
    for name, value in json.loads(storage.read_text(storage.join(output, "metrics.json"))).items():
        log_metric(name, value)
    storage.write_text(table, storage.read_text(storage.join(output, "table2.md")))
    storage.write_text(report, storage.read_text(storage.join(output, "report.html")))
    print(storage.read_text(table))  # the step's log shows its Table 2
