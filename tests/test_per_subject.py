"""TI+DB trained once per subject: its training never reads the target prompt, so one run
stands in for every prompt of its subject. Checked against the thing it replaces: a run
trained for the other prompt gives the same weights and the same images."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from conftest import REPO
from palp.cli import main
from palp.core.safecsv import read_csv
from palp.steps.prepare import fan_out
from palp.steps.sample import sample
from palp.steps.sample_jobs import SampleError

PROMPTS = ["A watercolour of [V] on the beach at sunset", "A sketch of [V] in the snow at night"]
SUBJECTS = {"cat": "cat", "cup": "cup"}


def _train(root, task, method="ti-db"):
    """The run of (task, method), trained once per module."""
    out = root / "runs" / f"{task}-{method}"
    if (out / "training_config.json").exists():
        return out
    assert main(["train", "--prepared", str(root / "prep"), "--task", task, "--method", method, "--pretrained-model", "tiny",
                 "--steps", "2", "--batch-size", "2", "--lora-rank", "4", "--output", str(out), "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("per-subject")
    args = [a for n in SUBJECTS for a in ("--subject", f"{n}={REPO / 'examples' / 'subjects' / n}")]
    args += [a for n, w in SUBJECTS.items() for a in ("--class-word", f"{n}={w}")]
    args += [a for p in PROMPTS for a in ("--prompt", p)]
    assert main(["prepare", *args, "--pretrained-model", "tiny", "--output", str(root / "prep"), "--quiet"]) == 0
    manifest = json.loads((root / "prep" / "manifest.json").read_text())
    tasks = {(next(iter(t["subjects"].values())), t["prompt"]): t["id"] for t in manifest["tasks"]}
    return root, manifest, tasks


def test_fan_out_trains_ti_db_once_per_subject(prepared):
    _, manifest, tasks = prepared
    runs = fan_out(manifest, ["ti-db", "palp", "palp-iid"])
    ti_db = [r for r in runs if r["method"] == "ti-db"]
    assert sorted(sorted(r["tasks"]) for r in ti_db) == sorted(sorted(tasks[(s, p)] for p in PROMPTS) for s in SUBJECTS)
    assert all(r["task_id"] in r["tasks"] for r in ti_db)
    for m in ("palp", "palp-iid"):
        assert sorted(r["task_id"] for r in runs if r["method"] == m) == sorted(tasks.values())
        assert all(r["tasks"] == [r["task_id"]] for r in runs if r["method"] == m)


def test_one_ti_db_run_is_the_run_of_every_prompt_of_its_subject(prepared, tmp_path):
    root, _, tasks = prepared
    first, second = tasks[("cat", PROMPTS[0])], tasks[("cat", PROMPTS[1])]
    run_a, run_b = _train(root, first), _train(root, second)
    for name in ("pytorch_lora_weights.safetensors", "learned_embeds.safetensors"):
        a, b = load_file(run_a / name), load_file(run_b / name)
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), name

    shared, own = tmp_path / "shared", tmp_path / "own"
    base = ["--num-samples", "2", "--steps", "3", "--quiet"]
    assert main(["sample", "--model", str(run_a), "--prepared", str(root / "prep"), "--task", first, "--task", second,
                 "--output", str(shared), *base]) == 0
    assert main(["sample", "--model", str(run_b), "--output", str(own), *base]) == 0
    rows = read_csv((shared / "samples.csv").read_bytes())
    assert sorted(set(rows["task"])) == sorted([first, second]) and len(rows) == 2 * 2
    for _, r in rows.iterrows():
        prompt = PROMPTS[0] if r["task"] == first else PROMPTS[1]
        assert r["prompt"] == prompt and r["clean_prompt"] == prompt.replace("[V]", "a cat")
    mine = read_csv((own / "samples.csv").read_bytes())
    assert set(mine["task"]) == {second}
    for _, r in mine.iterrows():
        other = rows[(rows["task"] == second) & (rows["sample"] == r["sample"])].iloc[0]
        assert other["seed"] == r["seed"]
        assert (np.asarray(Image.open(shared / other["file"])) == np.asarray(Image.open(own / r["file"]))).all()

    assert main(["sample", "--model", str(run_a), "--prepared", str(root / "prep"), "--task", first, "--task", second,
                 "--output", str(shared), "--reference", *base]) == 0
    rows = read_csv((shared / "samples.csv").read_bytes())
    base_rows = rows[rows["method"] == "base"]
    assert sorted(set(base_rows["task"])) == sorted([first, second])


def test_a_run_stands_in_only_where_its_training_is_the_same(prepared, tmp_path):
    root, _, tasks = prepared
    cat0, cat1, cup0 = tasks[("cat", PROMPTS[0])], tasks[("cat", PROMPTS[1])], tasks[("cup", PROMPTS[0])]
    ti_db, palp = _train(root, cat0, "ti-db"), _train(root, cat0, "palp")
    out = str(tmp_path / "s")
    with pytest.raises(SampleError, match=f"cannot stand in for task {cat1}"):
        sample(str(palp), out, tasks=[cat1], prepared=str(root / "prep"), num_samples=1, steps=1, progress=False)
    with pytest.raises(SampleError, match=f"task {cup0} has other subjects than the run"):
        sample(str(ti_db), out, tasks=[cup0], prepared=str(root / "prep"), num_samples=1, steps=1, progress=False)
    with pytest.raises(SampleError, match="no task 'nope'"):
        sample(str(ti_db), out, tasks=["nope"], prepared=str(root / "prep"), num_samples=1, steps=1, progress=False)
    with pytest.raises(SampleError, match="--task needs --prepared"):
        sample(str(ti_db), out, tasks=[cat1], num_samples=1, steps=1, progress=False)
    with pytest.raises(SampleError, match="not both"):
        sample(str(ti_db), out, tasks=[cat1], prompts=[PROMPTS[1]], prepared=str(root / "prep"), num_samples=1, steps=1,
               progress=False)
    assert not (tmp_path / "s").exists()  # nothing written by a refused call
