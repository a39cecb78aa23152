"""The toy world's judge is checked before it is believed: every (subject, prompt) unit of
every committed experiment is one the judge reads on perfect images (palp.toyworld.ceiling),
identity is measured against the subject's ground truth, and an experiment with a unit the
judge cannot read is refused before anything trains."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml

from palp.toyworld.ceiling import THRESHOLDS, check_units, experiment_units, load_vae, unit_ceiling
from palp.toyworld.judge import identity_chance, judged_identity, resolve_judge, truth_identity
from palp.toyworld.world import PERSONAL_SUBJECTS

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (*REPO.glob("evaluation/**/*.yaml"), *REPO.glob("examples/**/*.yaml"))
                 if "judge" in (yaml.safe_load(p.read_text()) or {}))
TRUTH = {s.name: truth_identity(asdict(s.identity)) for s in PERSONAL_SUBJECTS}


@pytest.fixture(scope="module")
def models():
    return resolve_judge("toyworld"), load_vae()


def test_chance_and_the_attributes_counted_per_style():
    # A uniform guess: colour 1 in 8, pattern and accessory 1 in 4 each.
    assert identity_chance("watercolour") == pytest.approx((1 / 8 + 1 / 4 + 1 / 4) / 3)
    assert identity_chance("sketch") == identity_chance("neon") == pytest.approx(1 / 4)
    assert judged_identity("pixel art") == ["color", "pattern", "accessory"] and judged_identity("sketch") == ["pattern", "accessory"]


def test_truth_is_read_from_a_subject_file_or_a_mapping_and_checked():
    purple = json.loads((REPO / "examples/toyworld/purple-cat.json").read_text())
    assert truth_identity(purple) == {"class": "cat", "color": "purple", "pattern": "dotted", "pattern_color": "green",
                                      "accessory": "star"}
    assert truth_identity(truth_identity(purple)) == truth_identity(purple)
    with pytest.raises(ValueError, match="missing accessory"):
        truth_identity({"class": "cat", "color": "purple", "pattern": "dotted", "pattern_color": "green"})
    with pytest.raises(ValueError, match="truth color 'teal' is not one of"):
        truth_identity({**truth_identity(purple), "color": "teal"})


def test_the_ceiling_sees_a_wrong_truth(models):
    """The instrument can see the effect: the same renders scored against a truth with one wrong
    judged attribute lose that attribute's share (1/3 in a watercolour), and a truth of another
    class loses the class."""
    judge, vae = models
    prompt = "A watercolour of [V] on the beach at sunset"
    right = unit_ceiling(judge, vae, "orange-dog", TRUTH["orange-dog"], prompt)
    assert right.identity_clean >= 0.95 and right.class_clean == 1.0 and not right.failures()
    wrong = dict(TRUTH["orange-dog"], accessory="bow")  # renders of the true dog, read against a wrong truth
    from palp.toyworld.ceiling import unit_scenes
    from palp.toyworld.judge import identity_kept, predict
    from palp.toyworld.render import render_array
    from palp.toyworld.scene import Identity

    scenes = unit_scenes(Identity("dog", "orange", "striped", "blue", "hat"), prompt, 8)
    readings = predict(judge, [render_array(s) for s in scenes])
    kept = sum(identity_kept(r, wrong, "watercolour") for r in readings) / len(readings)
    assert kept == pytest.approx(right.identity_clean - 1 / 3, abs=0.1)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_committed_experiment_unit_is_readable(config, models):
    """Every committed experiment that uses the judge gives each subject's truth, and the judge
    clears THRESHOLDS on every one of its (subject, prompt) units."""
    params = yaml.safe_load(config.read_text())
    for s in params["subjects"]:
        assert s.get("truth"), f"{config}: subject {s['name']} has no truth: the judge could not measure its identity"
        if isinstance(s["truth"], str):
            s["truth"] = json.loads((REPO / s["truth"]).read_text())
    units = experiment_units(params)
    assert len(units) == len(params["subjects"]) * len(params["prompts"])
    judge, vae = models
    for c in check_units(units, judge=judge, vae=vae):
        assert not c.failures(), f"{config}: {c.subject} x {c.prompt}: {c.failures()} (thresholds {THRESHOLDS})"
        assert c.chance < 0.3  # far below the ceilings: identity can tell a learned subject from a guess


def test_an_experiment_with_a_unit_the_judge_cannot_read_is_refused(tmp_path, capsys):
    """green-cup in a watercolour: the judge reads its green body as brown even on clean renders
    (ceiling about 0.67): the experiment is refused before anything runs, naming the unit."""
    from pipelines.cli import main

    config = yaml.safe_load((REPO / "evaluation/experiments/demo.yaml").read_text())
    config["subjects"].append({"name": "green-cup", "images": "examples/toyworld/green-cup", "class_word": "cup",
                               "truth": "examples/toyworld/green-cup.json"})
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(config))
    code = main(["pipeline", "run-local", "--config", str(tmp_path / "exp.yaml"), "--pipeline-root", str(tmp_path / "root")])
    err = capsys.readouterr().err
    assert code == 2 and "green-cup x 'A watercolour of [V] on the beach at sunset' (identity_clean 0.6" in err
    assert err.count("\n") == 1 and "remove those subject-prompt pairs" in err
    assert "purple-cat x" not in err and not (tmp_path / "root").exists()
