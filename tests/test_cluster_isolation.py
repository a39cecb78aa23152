"""The DAG as a cluster runs it: every step starts from its own empty model cache, so nothing
but parameters and artifacts travels between steps; TI+DB trains once per subject; the train
step, given two accelerators, trains in two processes that share its machine's cache. It runs
on tiny-sdxl, so the whole DAG (prepare, train, sample, score, the study) is also checked on an
SDXL-shaped model; the SD-1.x-shaped DAG runs in tests/test_pipeline.py."""

from __future__ import annotations

import json

import yaml

from conftest import REPO
from palp.core.safecsv import read_csv
from palp.models.tiny import TINY_SDXL_NAME, TINY_SDXL_VERSION

PROMPTS = ["A sketch of [V] in Paris at night", "A watercolour of [V] on the beach at sunset"]


def test_steps_share_nothing_but_artifacts_and_ti_db_trains_once_per_subject(tmp_path, monkeypatch):
    from pipelines.run import STEP_CACHES, run_local

    config = yaml.safe_load((REPO / "evaluation/experiments/tiny.yaml").read_text())
    config.update(subjects=config["subjects"][:1], prompts=PROMPTS, methods=["ti-db"], train_steps=2, save_steps="2", checkpoint_every=2,
                  num_samples=1, sample_steps=2, study_forms=1, study_image_size=32, train_accelerators=2,
                  pretrained_model=TINY_SDXL_NAME)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.setenv("PALP_KEEP_STEP_CACHES", "1")  # to count them below
    root = run_local(str(tmp_path / "c.yaml"), pipeline_root=str(tmp_path / "root"))
    run = next(root.glob("palp-*"))

    trains = sorted(run.glob("for-loop-*/train"))
    methods = [json.loads((t / "model" / "training_config.json").read_text())["method"] for t in trains]
    assert methods == ["ti-db"]  # 1 subject x 2 prompts: TI+DB once for both (PALP per task: test_per_subject)
    config = json.loads((trains[0] / "model" / "training_config.json").read_text())
    assert config["num_processes"] == 2 and config["micro_batch_size"] * config["gradient_accumulation_steps"] == 1
    assert config["model_family"] == "sdxl" and config["resolution"] == 128

    # Each step built the tiny model in its own cache (gone when the step ended): prepare, every
    # train and every sample.
    caches = [c for c in (root / STEP_CACHES).iterdir()
              if (c / "models" / f"tiny-sdxl-v{TINY_SDXL_VERSION}" / "model_index.json").exists()]
    assert all(c.name.endswith(".ended") for c in caches)
    assert len(caches) == 1 + len(trains) * 2

    scores = read_csv((run / "compare" / "scores" / "scores.csv").read_bytes())
    tasks = json.loads((run / "prepare" / "prepared" / "manifest.json").read_text())["tasks"]
    assert len(tasks) == 2
    for method in ("ti-db", "base"):
        assert sorted(set(scores[scores["method"] == method]["task"])) == sorted(t["id"] for t in tasks), method
    for t in tasks:  # each (subject, prompt) scored on its own texts
        rows = scores[scores["task"] == t["id"]]
        assert set(rows["prompt"]) == {t["prompt"]} and set(rows["clean_prompt"]) == {t["clean_prompt"]}
