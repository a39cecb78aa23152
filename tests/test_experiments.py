"""The committed experiment files: each one loads as the pipeline's parameters and its header
gives the command that runs it; the toy-world counterparts of the paper's other settings
(single-shot, multi-subject and art-inspired composition) prepare the tasks those settings
mean, and the composition one runs through the local DAG with its own alpha and beta."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import REPO
from pipelines.experiment import load_experiment

EXPERIMENTS = sorted(p for p in (*REPO.glob("evaluation/experiments/*.yaml"), *REPO.glob("evaluation/toyworld/*.yaml")))
PAPER_SETTINGS = {"paper_single_shot": "single_shot", "paper_multi_subject": "multi_subject",
                  "paper_art_inspired": "art_inspired"}


@pytest.fixture()
def units_checked_elsewhere(monkeypatch):
    """load_experiment without its judge gate (every committed judged config's units are read by
    tests/test_judge_units.py, and the refusal of an unreadable unit is tested there too)."""
    import pipelines.experiment

    monkeypatch.setattr(pipelines.experiment, "check_judged_units", lambda params, path: None)


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_experiment_loads_and_its_header_gives_its_command(path, units_checked_elsewhere):
    params = load_experiment(str(path))
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    own = path.relative_to(REPO).as_posix()
    command = f"--config {own}" if own != "evaluation/experiments/demo.yaml" else "palp pipeline run-local  "  # the default
    assert any(command in line for line in header), "the header's command"
    assert params["subjects"] and params["methods"]


def test_each_paper_setting_has_a_toy_counterpart_with_the_same_shape():
    for paper, toy in PAPER_SETTINGS.items():
        a = yaml.safe_load((REPO / f"evaluation/experiments/{paper}.yaml").read_text())
        b = yaml.safe_load((REPO / f"evaluation/toyworld/{toy}.yaml").read_text())
        assert (a["alpha"], a["beta"]) == (b["alpha"], b["beta"]) == ((15.0, 7.5) if toy == "single_shot" else (7.5, 1.0))
        assert [s.get("placeholder", "[V]") for s in a["subjects"]] == [s.get("placeholder", "[V]") for s in b["subjects"]]
        assert [bool(s.get("personalization_prompt")) for s in a["subjects"]] == [
            bool(s.get("personalization_prompt")) for s in b["subjects"]]


def _prepared_tasks(config: str, tmp_path) -> list[dict]:
    from palp.steps.prepare import PromptSpec, load_prompts_file, prepare, subject_specs

    params = load_experiment(str(REPO / config))
    texts = [PromptSpec(p) for p in params.get("prompts") or []] + (
        load_prompts_file(params["prompts_file"]) if params.get("prompts_file") else [])
    manifest = prepare(subject_specs(params["subjects"]), texts, str(tmp_path / "prep"), pretrained_model=params["pretrained_model"],
                       clip_model=params["clip_model"], clip_weights=params["clip_weights"], progress=False)
    return manifest["tasks"], tmp_path / "prep"


def test_the_toy_single_shot_subjects_have_one_photo_each(tmp_path, units_checked_elsewhere):
    tasks, prep = _prepared_tasks("evaluation/toyworld/single_shot.yaml", tmp_path)
    assert len(tasks) == 4 and {tuple(t["subjects"].values()) for t in tasks} == {("purple-cat",), ("orange-dog",)}
    for name in ("purple-cat", "orange-dog"):
        assert len([p for p in (prep / "subjects" / name).iterdir() if p.suffix == ".png"]) == 1


def test_the_toy_compositions_prepare_two_subject_tasks(tmp_path, units_checked_elsewhere):
    (multi,), _ = _prepared_tasks("evaluation/toyworld/multi_subject.yaml", tmp_path / "m")
    assert multi["subjects"] == {"[V1]": "purple-cat", "[V2]": "orange-dog"}
    assert multi["clean_prompt"] == "A watercolour of a cat and a dog on the beach at sunset"
    assert multi["personalization_prompts"] == {"[V1]": "A photo of [V1]", "[V2]": "A photo of [V2]"}
    (art,), _ = _prepared_tasks("evaluation/toyworld/art_inspired.yaml", tmp_path / "a")
    assert art["subjects"] == {"[V1]": "purple-cat", "[V2]": "robot-art"}
    assert art["clean_prompt"] == "A watercolour of a cat in the snow at night"  # the user's, not derived
    assert art["personalization_prompts"]["[V2]"] == "A watercolour of [V2]"


@pytest.mark.slow
def test_the_toy_multi_subject_run_trains_both_subjects_with_its_alpha_and_beta(tmp_path):
    from pipelines.run import run_local

    config = yaml.safe_load((REPO / "evaluation/toyworld/multi_subject.yaml").read_text())
    config.update(train_steps=2, save_steps="2", checkpoint_every=2, num_samples=2, sample_steps=2, study_forms=1,
                  study_image_size=32, reference=False)
    for s in config["subjects"]:
        s["images"] = str(REPO / s["images"])
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    root = run_local(str(tmp_path / "c.yaml"), pipeline_root=str(tmp_path / "root"))
    run = next(root.glob("palp-*"))
    configs = {c["method"]: c for c in (json.loads(p.read_text()) for p in run.glob("for-loop-*/train/model/training_config.json"))}
    assert set(configs) == {"palp", "ti-db"}
    for c in configs.values():
        assert (c["alpha"], c["beta"]) == (7.5, 1.0)
        assert [s["placeholder"] for s in c["subjects"]] == ["[V1]", "[V2]"]
    samples = list(run.glob("for-loop-*/sample/samples/**/*.png"))
    assert len(samples) >= 2 * 2  # each method's samples of the one prompt
