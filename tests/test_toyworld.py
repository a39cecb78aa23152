"""The toy world: renderer, captions, judge, shipped models, and judge scoring."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import pretrain_script
from palp.core.settings import ConfigError, method_label, split_method
from palp.toyworld import WEIGHTS
from palp.toyworld.judge import JUDGE_COLUMNS, judge_row, reference_identity
from palp.toyworld.render import render_array
from palp.toyworld.scene import PLACES, STYLES, TIMES, Identity, Scene, compose_caption, parse_caption
from palp.toyworld.world import HELD_OUT_PAIRS, PERSONAL_SUBJECTS, TARGET_PROMPTS, random_scene, write_subjects

REPO = Path(__file__).resolve().parents[1]


CAT = Identity("cat", "purple", "dotted", "green", "star")


def test_rendering_is_a_function_of_the_scene():
    a = render_array(Scene(CAT, "watercolour", "beach", "sunset", seed=3))
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, render_array(Scene(CAT, "watercolour", "beach", "sunset", seed=3)))
    assert not np.array_equal(a, render_array(Scene(CAT, "watercolour", "beach", "sunset", seed=4)))
    assert not np.array_equal(a, render_array(Scene(CAT, "watercolour", "beach", "night", seed=3)))


def test_each_attribute_changes_the_pixels():
    base = Scene(CAT, "photo", "grass", "day", seed=1)
    ref = render_array(base)
    for change in (dict(identity=Identity("cat", "blue", "dotted", "green", "star")),
                   dict(identity=Identity("cat", "purple", "striped", "green", "star")),
                   dict(identity=Identity("cat", "purple", "dotted", "red", "star")),
                   dict(identity=Identity("cat", "purple", "dotted", "green", "hat")),
                   dict(identity=Identity("dog", "purple", "dotted", "green", "star"))):
        other = render_array(Scene(**{**base.__dict__, **change}))
        assert np.abs(other.astype(int) - ref).sum() > 0


def test_sketch_is_grey_and_neon_is_dark():
    sketch = render_array(Scene(CAT, "sketch", "grass", "day", seed=2)).astype(int)
    assert np.abs(sketch[..., 0] - sketch[..., 2]).max() <= 12  # grey lines on white paper
    assert np.median(sketch) > 200
    neon = render_array(Scene(CAT, "neon", "grass", "day", seed=2))
    assert np.median(neon) < 60


def test_captions_parse_back_to_their_scene():
    for style in STYLES:
        for place in PLACES:
            for time in (("day",) if place == "plain" else TIMES):
                for say_day in (False, True):
                    text = compose_caption(style, CAT.describe(), place, time, say_day=say_day)
                    assert parse_caption(text) == {"style": style, "place": place, "time": time}, text


def test_caption_describes_the_identity():
    s = Scene(CAT, "watercolour", "beach", "sunset")
    assert s.caption() == "A watercolour of a purple cat with green dots and a star on its head on the beach at sunset"
    assert Identity("robot", "orange").describe() == "an orange robot"


def test_bad_scenes_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="no time of day"):
        Scene(CAT, "photo", "plain", "night")
    with pytest.raises(ValueError, match="choose one of"):
        Scene(CAT, "oil painting")
    with pytest.raises(ValueError, match="unknown color"):
        Identity("cat", "teal")


def test_pretraining_never_shows_the_personal_subjects_pairs():
    rng = random.Random(0)
    pairs = {(s.identity.cls, s.identity.color) for s in (random_scene(rng) for _ in range(5000))}
    assert not pairs & HELD_OUT_PAIRS
    assert len(pairs) == 7 * 8 - len(HELD_OUT_PAIRS)  # every other pair does occur


def test_target_prompts_are_complex_and_parse():
    for p in TARGET_PROMPTS:
        parsed = parse_caption(p.replace("[V]", "a cat"))
        assert parsed["style"] not in (None, "photo") and parsed["place"] != "plain"


def test_write_subjects_renders_photos_and_truth(tmp_path):
    write_subjects(tmp_path, n=3, subjects=PERSONAL_SUBJECTS[:2])
    for s in PERSONAL_SUBJECTS[:2]:
        assert sorted(p.name for p in (tmp_path / s.name).iterdir()) == ["00.png", "01.png", "02.png"]
        truth = json.loads((tmp_path / f"{s.name}.json").read_text())
        assert truth["identity"]["color"] == s.identity.color
    # The shipped example folders are exactly what the renderer makes.
    from PIL import Image

    shipped = np.asarray(Image.open(REPO / "examples/toyworld/purple-cat/00.png"))
    write_subjects(tmp_path / "again", n=1, subjects=PERSONAL_SUBJECTS[:1])
    assert np.array_equal(shipped, np.asarray(Image.open(tmp_path / "again/purple-cat/00.png")))


def test_judge_row_counts_only_what_the_style_shows():
    identity = {"class": "cat", "color": "purple", "pattern": "dotted", "pattern_color": "green", "accessory": "star"}
    reading = {"style": "sketch", "place": "snow", "time": "night", **identity, "color": "blue", "pattern_color": "red"}
    row = judge_row(reading, {"style": "sketch", "place": "snow", "time": "night"}, identity)
    # A sketch shows pattern and accessory only: the wrong colours do not count.
    assert row == {JUDGE_COLUMNS["place"]: 1.0, JUDGE_COLUMNS["time"]: 1.0, JUDGE_COLUMNS["style"]: 1.0,
                   JUDGE_COLUMNS["class"]: 1.0, JUDGE_COLUMNS["identity"]: 1.0}
    row = judge_row(dict(reading, style="watercolour"), {"style": "watercolour", "place": "beach", "time": "night"}, identity)
    assert row[JUDGE_COLUMNS["style"]] == 1.0 and row[JUDGE_COLUMNS["place"]] == 0.0
    # Colour, pattern and accessory count in a watercolour; the pattern's colour never does.
    assert row[JUDGE_COLUMNS["identity"]] == pytest.approx(2 / 3)
    row = judge_row(dict(reading, style="neon", color="purple"), {"style": "neon", "place": "grass", "time": "day"},
                    dict(identity, color="red"))  # a neon drawing does not fill the body with its colour
    assert row[JUDGE_COLUMNS["identity"]] == 1.0
    assert reference_identity([identity, identity, dict(identity, color="red")]) == identity


def test_method_variants():
    assert split_method("palp") == ("palp", "same")
    assert split_method("palp-iid") == ("palp", "iid")
    assert split_method("sds-iid") == ("sds", "iid")
    for bad in ("ti-db-iid", "palp-xyz", "dreambooth"):
        with pytest.raises(ConfigError, match="choose one of"):
            split_method(bad)
    assert method_label("palp", "iid") == "palp-iid" and method_label("palp") == "palp"
    assert method_label("ti-db", "iid") == "ti-db"


# ----------------------------------------------------------------------------- shipped models


def test_shipped_weight_files_are_small():
    files = [p for p in WEIGHTS.rglob("*") if p.is_file()]
    assert {"sd", "clip", "judge"} <= {p.relative_to(WEIGHTS).parts[0] for p in files}
    assert max(p.stat().st_size for p in files) < 20 * 10**6


@pytest.mark.parametrize("held_out_pairs", [False, True])
def test_judge_reads_fresh_renders(held_out_pairs):
    """On renders it never saw, and on the (class, colour) pairs the toy model never saw."""
    from palp.toyworld.accuracy import judge_accuracy
    from palp.toyworld.judge import load_judge

    acc = judge_accuracy(load_judge(), n=300, seed=4242, held_out=held_out_pairs)
    for k in ("style", "place", "time", "class", "accessory"):
        assert acc[k] >= 0.95, acc
    assert acc["pattern"] >= 0.85 and acc["color"] >= 0.72, acc
    # The pattern's colour is the judge's weak head (stripes as wide as the body's own colour,
    # dots a few pixels across): chance is 1/8, and it reads about 0.6.
    assert acc["pattern_color"] >= 0.45, acc


def test_judge_schedule_is_the_resumed_run():
    """The shipped judge ran 1500 steps of a cosine, then was resumed to 3000 steps: the schedule
    must give exactly those rates, so that one run with the defaults reproduces it."""
    import math

    DEFAULTS, judge_lr = (pretrain_script().DEFAULTS, pretrain_script().judge_lr)

    def cosine(step, period):
        return 2e-3 * 0.5 * (1 + math.cos(math.pi * step / period))

    assert DEFAULTS["judge_first_cycle"] == 1500
    for step in (0, 1, 700, 1499):
        assert judge_lr(step, 3000, 1500) == cosine(step, 1500) == judge_lr(step, 1500, 1500)
    for step in (1500, 2000, 2999):
        assert judge_lr(step, 3000, 1500) == cosine(step, 3000)
    assert [judge_lr(s, 40, 0) for s in range(40)] == [cosine(s, 40) for s in range(40)]
    assert [judge_lr(s, 40, 1500) for s in range(40)] == [cosine(s, 40) for s in range(40)]


def test_vae_schedule_restarts_where_the_first_run_ended():
    """The shipped VAE ran 2000 steps of its schedule, then was resumed to 6000 steps: a warm
    restart into the 6000-step cosine, which the defaults (6000 steps, first cycle 2000) give."""
    import math

    DEFAULTS, vae_lr = (pretrain_script().DEFAULTS, pretrain_script().vae_lr)

    def lr(step, period):
        return 1e-3 * min(1.0, (step + 1) / 200) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / period)))

    assert (DEFAULTS["vae_steps"], DEFAULTS["vae_first_cycle"]) == (6000, 2000)
    for step in (0, 150, 1999):
        assert vae_lr(step, 6000, 2000) == lr(step, 2000) == vae_lr(step, 2000, 0)
    assert abs(vae_lr(1999, 6000, 2000) - 1e-4) < 1e-9  # the first run ends at its floor...
    for step in (2000, 4000, 5999):
        assert vae_lr(step, 6000, 2000) == lr(step, 6000)
    assert abs(vae_lr(2000, 6000, 2000) - 1e-3 * (0.1 + 0.9 * 0.75)) < 1e-12  # ...and restarts at 0.775e-3
    assert [vae_lr(s, 50, 2000) for s in range(50)] == [lr(s, 50) for s in range(50)]


def test_shipped_history_ends_at_the_defaults():
    """`pretrain all` trains each stage as far as the shipped weights' history went."""
    DEFAULTS, SHIPPED_HISTORY, STAGES = (pretrain_script().DEFAULTS, pretrain_script().SHIPPED_HISTORY, pretrain_script().STAGES)

    assert [s for s, _ in SHIPPED_HISTORY if s in ("data", "export")] == ["data", "export"]
    assert {s for s, _ in SHIPPED_HISTORY} == set(STAGES)
    last = {}
    for stage, settings in SHIPPED_HISTORY:
        last.setdefault(stage, {}).update(settings)
    for stage, settings in last.items():
        assert all(DEFAULTS[k] == v for k, v in settings.items()), (stage, settings)


def test_toy_sd_loads_through_stock_diffusers():
    import torch
    from diffusers import StableDiffusionPipeline

    from palp.models.base_model import load_base_model, resolve_model_dir

    pipe = StableDiffusionPipeline.from_pretrained(resolve_model_dir("toyworld"), safety_checker=None,
                                                   feature_extractor=None, requires_safety_checker=False)
    assert pipe.tokenizer.vocab_size == 49408
    assert pipe.vae_scale_factor == 4 and pipe.unet.config.sample_size == 16
    base = load_base_model("toyworld")
    assert base.resolution == 64 and base.unet.dtype == torch.float32


def test_toy_clip_knows_the_style_of_a_render():
    from PIL import Image

    from palp.models.clip import load_clip

    clip = load_clip("toyworld")
    rng = random.Random(7)
    hits = 0
    scenes = [random_scene(rng) for _ in range(40)]
    feats = clip.encode_images([Image.fromarray(render_array(s)) for s in scenes])
    for s, f in zip(scenes, feats):
        texts = [compose_caption(st, s.identity.describe(), s.place, s.time) for st in STYLES]
        hits += int(STYLES[int((clip.encode_texts(texts) @ f).argmax())] == s.style)
    assert hits >= 36


# ----------------------------------------------------------------------------- report


def test_report_tables_and_intervals(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("toy_report", REPO / "evaluation/toyworld/experiment_tables.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    rows = []
    rng = np.random.default_rng(0)
    for subject in ("a", "b", "c"):
        for prompt in ("p1", "p2"):
            for method, good in (("ti-db", 0.0), ("palp", 1.0)):
                for step in (100, 200):
                    for i in range(4):
                        rows.append({"subject": subject, "prompt": prompt, "method": method, "step": step, "run": f"{subject}{prompt}{method}",
                                     "Judge: style": good, "Judge: place": good, "Judge: time": 1.0, "Judge: class": 1.0,
                                     "Judge: identity": 1.0 - good / 2, "Target prompt": 0.2 + 0.1 * good + float(rng.uniform(0, 0.05)),
                                     "Image alignment": float(rng.uniform(0.5, 0.6))})
    pd.DataFrame(rows).to_csv(tmp_path / "scores.csv", index=False)
    report.main(["--scores", str(tmp_path / "scores.csv"), "--out", str(tmp_path / "out")])
    summary = json.loads((tmp_path / "out/summary.json").read_text())
    # Closed forms: TI+DB finds 1 of 3 elements, PALP all; the paired difference is exact.
    assert summary["table2"]["ti-db"]["Elements found"] == pytest.approx([1 / 3, 1 / 3, 1 / 3])
    assert summary["table2"]["palp"]["Elements found"] == pytest.approx([1.0, 1.0, 1.0])
    assert summary["paired"]["palp"]["Elements found"] == pytest.approx([2 / 3, 2 / 3, 2 / 3])
    assert summary["paired"]["palp"]["Judge: identity"] == pytest.approx([-0.5, -0.5, -0.5])
    lo, hi = summary["table2"]["palp"]["Target prompt"][1:]
    assert lo <= summary["table2"]["palp"]["Target prompt"][0] <= hi
    assert "Image alignment" not in summary["table2"]["palp"] and "Image alignment" not in summary["paired"]["palp"]
    assert "Image alignment" not in (tmp_path / "out/table2.md").read_text()  # the toy CLIP's cosine is no identity measure
    assert summary["table3"]["palp"]["Elements found"][0] == 1.0
    assert (tmp_path / "out/curves.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "out/gallery.png").exists()  # no images to show

    # The experiment run a subject at a time: the parts' scores concatenate to the whole's tables,
    # and the scores written beside them rebuild the same summary.
    whole = pd.DataFrame(rows).assign(task=lambda d: d["subject"] + d["prompt"], sample=lambda d: d.index % 4)
    whole.to_csv(tmp_path / "whole.csv", index=False)
    for part in ("a", "b"):
        whole[(whole["subject"] == "a") == (part == "a")].to_csv(tmp_path / f"part-{part}.csv", index=False)
    report.main(["--scores", str(tmp_path / "whole.csv"), "--out", str(tmp_path / "out-whole")])
    report.main(["--scores", str(tmp_path / "part-a.csv"), str(tmp_path / "part-b.csv"), "--out", str(tmp_path / "out-parts")])
    report.main(["--scores", str(tmp_path / "out-parts/scores.csv.gz"), "--out", str(tmp_path / "out-again")])
    tables = [{k: v for k, v in json.loads((tmp_path / d / "summary.json").read_text()).items() if k != "scores"}
              for d in ("out-whole", "out-parts", "out-again")]
    assert tables[0] == tables[1] == tables[2]
    with pytest.raises(SystemExit, match="the same images are scored in more than one"):
        report.main(["--scores", str(tmp_path / "part-a.csv"), str(tmp_path / "whole.csv"), "--out", str(tmp_path / "x")])

    # With the images at hand: a gallery row per subject (the i-th with the i-th prompt), three
    # final-step samples per method, each image where its method, subject and sample put it.
    from PIL import Image

    table = pd.read_csv(tmp_path / "scores.csv")
    colours = {"ti-db": (200, 0, 0), "palp": (0, 0, 200)}
    paths = []
    for n, r in table.iterrows():
        path = tmp_path / "img" / f"{n}.png"
        path.parent.mkdir(exist_ok=True)
        Image.new("RGB", (32, 32), colours[r["method"]]).save(path)
        paths.append(str(path))
    table["path"], table["sample"] = paths, table.index % 4
    table.to_csv(tmp_path / "scores-img.csv", index=False)
    report.main(["--scores", str(tmp_path / "scores-img.csv"), "--out", str(tmp_path / "out2")])
    sheet = Image.open(tmp_path / "out2/gallery.png").convert("RGB")
    methods = report.methods_in(table)
    assert sheet.size == (330 + len(methods) * 3 * 64, 16 + 3 * 64)
    for j, m in enumerate(methods):
        for k in range(3):
            assert sheet.getpixel((330 + (j * 3 + k) * 64 + 32, 16 + 2 * 64 + 32)) == colours[m]

    # The images gone (scores kept from another machine's run): the tables are rebuilt into the
    # same folder and the gallery already there is kept, not lost.
    before = (tmp_path / "out2/gallery.png").read_bytes()
    table.assign(path=[str(tmp_path / "gone" / f"{n}.png") for n in range(len(table))]).to_csv(tmp_path / "scores-gone.csv", index=False)
    report.main(["--scores", str(tmp_path / "scores-gone.csv"), "--out", str(tmp_path / "out2")])
    assert (tmp_path / "out2/gallery.png").read_bytes() == before
    assert json.loads((tmp_path / "out2/summary.json").read_text())["scores"] == str(tmp_path / "scores-gone.csv")


def test_report_pairs_palp_over_each_personalization_with_it_alone(tmp_path):
    """Every method of the paper's comparison in one table, in the paper's order, and each
    palp+X paired with X alone (closed forms: X finds 1 of 3 elements, palp+X 2 or 3)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("toy_report", REPO / "evaluation/toyworld/experiment_tables.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    found = {"ti-db": 0, "neti": 0, "palp+neti": 2, "p-plus": 1, "palp+p-plus": 3, "custom-diffusion": 0, "palp": 3,
             "sds+neti": 1}
    rows = [{"subject": subject, "prompt": "p1", "method": m, "step": 100, "run": f"{subject}{m}",
             **{e: float(i < k) for i, e in enumerate(report.ELEMENTS)}, "Judge: class": 1.0, "Judge: identity": 0.5,
             "Target prompt": 0.2}
            for subject in ("a", "b", "c") for m, k in found.items() for _ in range(2)]
    pd.DataFrame(rows).to_csv(tmp_path / "scores.csv", index=False)
    report.main(["--scores", str(tmp_path / "scores.csv"), "--out", str(tmp_path / "out")])
    summary = json.loads((tmp_path / "out/summary.json").read_text())
    assert list(summary["table2"]) == ["ti-db", "palp", "custom-diffusion", "p-plus", "palp+p-plus", "neti", "palp+neti",
                                       "sds+neti"]
    assert set(summary["paired_own"]) == {"palp+neti", "palp+p-plus"}  # no palp+custom-diffusion ran; SDS is no PALP
    assert summary["paired_own"]["palp+neti"]["Elements found"] == pytest.approx([2 / 3] * 3)
    assert summary["paired_own"]["palp+p-plus"]["Elements found"] == pytest.approx([2 / 3] * 3)
    assert summary["paired"]["palp+p-plus"]["Elements found"] == pytest.approx([1.0] * 3)  # against TI+DB
    assert "palp+neti - neti" in (tmp_path / "out/paired.md").read_text()


def test_score_with_the_judge_end_to_end(tmp_path, capsys):
    """prepare -> train (toy model, palp-iid) -> sample -> score --judge: judge columns beside CLIP's."""
    from palp.cli import main

    subject = REPO / "examples/toyworld/purple-cat"
    prompt = "A sketch of [V] in the snow at night"
    assert main(["prepare", "--subject", f"purple-cat={subject}", "--class-word", "purple-cat=cat", "--prompt", prompt,
                 "--truth", f"purple-cat={subject}.json",
                 "--pretrained-model", "toyworld", "--clip", "toyworld", "--output", str(tmp_path / "prep"), "--quiet"]) == 0
    truth = json.loads((tmp_path / "prep" / "manifest.json").read_text())["subjects"]["purple-cat"]["truth"]
    assert truth == json.loads(Path(f"{subject}.json").read_text())  # recorded as given
    assert main(["train", "--prepared", str(tmp_path / "prep"), "--pretrained-model", "toyworld", "--method", "palp",
                 "--noise", "iid", "--steps", "2", "--batch-size", "2", "--lora-rank", "4", "--save-steps", "2",
                 "--output", str(tmp_path / "run"), "--quiet"]) == 0
    assert main(["sample", "--model", str(tmp_path / "run"), "--output", str(tmp_path / "samples"), "--num-samples", "3",
                 "--steps", "3", "--quiet"]) == 0
    assert main(["score", "--samples", str(tmp_path / "samples"), "--prepared", str(tmp_path / "prep"), "--output",
                 str(tmp_path / "scores"), "--clip", "toyworld", "--judge", "toyworld", "--quiet"]) == 0
    scores = pd.read_csv(tmp_path / "scores" / "scores.csv")
    assert set(scores["method"]) == {"palp-iid"}  # the run's label carries its noise
    for col in JUDGE_COLUMNS.values():
        assert scores[col].between(0, 1).all(), col
    metrics = json.loads((tmp_path / "scores" / "metrics.json").read_text())
    assert "palp_iid/judge_identity" in metrics and "palp_iid/target_prompt" in metrics
    # The unit's ceilings and chance level beside the identity kept, in a table and the report.
    units = pd.read_csv(tmp_path / "scores" / "judge_units.csv")
    assert units.loc[0, "subject"] == "purple-cat" and units.loc[0, "chance"] == pytest.approx(0.25)  # sketch: pattern, accessory
    assert units.loc[0, "identity: palp-iid"] == pytest.approx(scores["Judge: identity"].mean())
    assert 0.9 <= units.loc[0, "ceiling, clean renders"] <= 1.0 and "What the judge can read" in (tmp_path / "scores" / "report.html").read_text()
    table2 = (tmp_path / "scores" / "table2.md").read_text()
    assert "Judge: class" in table2 and "Class" not in table2.replace("Judge: class", "")  # no toy-CLIP class cosine
    assert main(["score", "--samples", str(tmp_path / "samples"), "--prepared", str(tmp_path / "prep"), "--output",
                 str(tmp_path / "bad"), "--clip", "toyworld", "--judge", str(tmp_path / "nope.safetensors"), "--quiet"]) != 0
    # A judge whose weights folder names a world palp does not know, and a file that is no judge:
    # one line each, exit 2.
    from palp.toyworld import WEIGHTS

    (tmp_path / "w" / "judge").mkdir(parents=True)
    (tmp_path / "w" / "sd").mkdir()
    (tmp_path / "w" / "judge" / "judge.safetensors").write_bytes((WEIGHTS / "judge" / "judge.safetensors").read_bytes())
    (tmp_path / "w" / "recipe.json").write_text('{"stages": {"data": {"world": "v7"}}}')
    (tmp_path / "junk.safetensors").write_bytes(b"not a judge")
    for judge, says in ((tmp_path / "w" / "judge" / "judge.safetensors", "names world 'v7'"), (tmp_path / "junk.safetensors", "junk")):
        capsys.readouterr()
        assert main(["score", "--samples", str(tmp_path / "samples"), "--prepared", str(tmp_path / "prep"), "--output",
                     str(tmp_path / "bad"), "--clip", "toyworld", "--judge", str(judge), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_pretraining_script_runs_every_stage_and_resumes(tmp_path, capsys):
    """`python evaluation/toyworld/pretrain.py all` on a tiny budget: every stage, an export that stock
    diffusers loads, the settings in recipe.json, and a second run that only resumes."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pretrain = pretrain_script()

    small = ["--n-train", "96", "--vae-steps", "2", "--vae-batch", "4", "--unet-steps", "2", "--unet-batch", "4",
             "--clip-steps", "2", "--clip-batch", "8", "--judge-steps", "2", "--judge-batch", "4"]
    work, out = tmp_path / "work", tmp_path / "weights"
    pretrain.main(["all", "--work", str(work), "--out", str(out), *small])
    recipe = json.loads((out / "recipe.json").read_text())["stages"]
    assert recipe["unet"]["steps"] == 2 and recipe["unet"]["settings"]["unet_batch"] == 4
    assert recipe["data"]["settings"] == {"n_train": 96} and "heldout_accuracy" in recipe["judge"]
    assert recipe["unet"]["device"] == ("cuda" if torch.cuda.is_available() else "cpu")  # --device auto
    pipe = StableDiffusionPipeline.from_pretrained(out / "sd", safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    assert not DDIMScheduler.from_config(pipe.scheduler.config).config.clip_sample
    assert not [p for p in (out / "sd").glob("*/config.json") if str(work) in p.read_text()]  # no work paths
    image = pipe("A sketch of a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)
    before = {p: p.stat().st_mtime_ns for p in work.glob("*.ckpt")}
    capsys.readouterr()
    pretrain.main(["unet", "--work", str(work), *small])  # finished: resumes at its last step, trains nothing
    assert "resumed unet.ckpt at step 2" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in work.glob("*.ckpt")} == before


def test_replay_trains_on_with_a_new_vae_and_reencodes_the_latents(tmp_path, monkeypatch):
    """`pretrain replay` on a tiny history shaped like the shipped one (a VAE, a UNet, the VAE
    trained on, the UNet trained on): every run goes to recipe.json's history with its resume
    point, and once the VAE has trained on, the latents the UNet learns from are the new VAE's
    encodings (checked against the saved VAE)."""
    import torch
    from diffusers import AutoencoderKL

    pretrain = pretrain_script()

    history = (("data", {}), ("vae", {"vae_steps": 2, "vae_first_cycle": 0}), ("unet", {"unet_steps": 2}),
               ("vae", {"vae_steps": 4, "vae_first_cycle": 2}), ("unet", {"unet_steps": 3}))
    monkeypatch.setattr(pretrain, "SHIPPED_HISTORY", history)
    small = ["--n-train", "64", "--vae-batch", "4", "--unet-batch", "4"]
    work = tmp_path / "work"
    pretrain.main(["replay", "--work", str(work), *small])
    recipe = json.loads((work / "recipe.json").read_text())
    assert [(h["stage"], h["from_step"], h["to_step"]) for h in recipe["history"]] == [
        ("vae", 0, 2), ("unet", 0, 2), ("vae", 2, 4), ("unet", 2, 3)]
    assert recipe["history"][2]["settings"]["vae_first_cycle"] == 2
    assert json.loads((work / "latents.json").read_text()) == {"vae_steps": 4}
    # Stale latents stand in for the VAE's: kept while the VAE has not moved, replaced once it has.
    stale = torch.load(work / "latents.pt")
    stale["mean"].zero_()
    torch.save(stale, work / "latents.pt")
    pretrain.main(["vae", "--work", str(work), "--vae-steps", "4", "--vae-first-cycle", "2", *small])
    assert not torch.load(work / "latents.pt")["mean"].any()
    pretrain.main(["vae", "--work", str(work), "--vae-steps", "5", "--vae-first-cycle", "2", *small])
    assert json.loads((work / "latents.json").read_text()) == {"vae_steps": 5}
    latents = torch.load(work / "latents.pt")
    vae = AutoencoderKL.from_pretrained(work / "vae").eval()
    images = torch.from_numpy(np.load(work / "data.npz")["images"][:8]).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        mean = vae.encode(images).latent_dist.mean
    assert mean.abs().max() > 0.05
    torch.testing.assert_close(latents["mean"][:8].float(), mean, rtol=2e-3, atol=1e-3)  # stored in fp16
    assert abs(latents["scaling_factor"] - vae.config.scaling_factor) < 1e-6
    assert [(h["stage"], h["from_step"], h["to_step"]) for h in json.loads((work / "recipe.json").read_text())["history"]][-1] == (
        "vae", 4, 5)


def test_pretraining_refuses_a_device_it_cannot_use(tmp_path, capsys):
    pretrain = pretrain_script()

    with pytest.raises(SystemExit) as e:
        pretrain.main(["vae", "--work", str(tmp_path / "work"), "--device", "nosuchdevice"])
    assert e.value.code == 2
    assert "--device nosuchdevice" in capsys.readouterr().err
    assert not (tmp_path / "work" / "vae.ckpt").exists()


def _regime():
    import importlib.util

    spec = importlib.util.spec_from_file_location("toy_regime", REPO / "evaluation/toyworld/regime.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_regime_verdicts_on_readings_with_known_answers():
    """regime.py's two verdicts on made-up judge readings: identity 0.9 at step 500 reaches the
    regime, 0.75 does not; a point that loses the prompt and keeps subject and class overfits,
    one that loses the class too collapses."""
    regime = _regime()

    def scores(points):  # (lr, step, identity, found, class) -> 2 units x 4 samples each, exactly those means
        rows = []
        for lr, step, ident, found, cls in points:
            for subject in ("a", "b"):
                for k in range(4):
                    rows.append({"method": "ti-db", "lr": lr, "step": step, "subject": subject, "prompt": "p",
                                 "Judge: identity": ident, "Judge: class": float(k < 4 * cls), "Judge: style": found,
                                 "Judge: place": found, "Judge: time": found})
        return pd.DataFrame(rows)

    text = regime.summarise(scores([(1e-3, 500, 0.9, 1.0, 1.0), (3e-3, 2000, 0.75, 0.5, 1.0)]), None, 1000)
    assert "1. Reached (identity >= 0.8 by step 1000): **yes**, first at lr 0.001, step 500: identity 0.900" in text
    assert "**yes**, at lr 0.003 step 2000 (elements 0.500, identity 0.750, class 1.000)" in text
    text = regime.summarise(scores([(1e-3, 500, 0.75, 1.0, 1.0), (1e-3, 2000, 0.95, 1.0, 1.0), (3e-3, 2000, 0.75, 0.5, 0.5)]),
                            None, 1000)
    assert "**no**: the best by step 1000 is identity 0.750" in text  # 0.95 came only at step 2000
    assert "2. Overfits without collapsing (elements found <= 0.7, identity >= 0.7, class >= 0.9): **no** point" in text
    assert "| 0.001 | 500 | 0.750 [0.750, 0.750] | 1.000 [1.000, 1.000] | 1.000 [1.000, 1.000] | 2 |" in text


def test_regime_runs_ti_db_samples_and_scores_with_the_judge(tmp_path):
    """regime.py end to end at a tiny size on the shipped toy world; a second call reuses what is done."""
    regime = _regime()
    argv = ["--out", str(tmp_path / "r"), "--subjects", "purple-cat", "--prompt", "A sketch of [V] in the snow at night",
            "--lr", "1e-3", "--steps", "2", "--save-steps", "1,2", "--samples", "1", "--sample-steps", "2", "--lora-rank", "4"]
    assert regime.main(argv) == 0
    text = (tmp_path / "r" / "regime.md").read_text()
    assert "| 0.001 | 1 |" in text and "| 0.001 | 2 |" in text and "chance level of identity 0.250-0.250" in text
    sampled = tmp_path / "r" / "samples" / "ti-db~0.001~purple-cat" / "samples.csv"
    before = sampled.stat().st_mtime_ns
    assert regime.main(argv) == 0 and sampled.stat().st_mtime_ns == before
    with pytest.raises(SystemExit):
        regime.main([*argv[:2], "--subjects", "nobody"])
