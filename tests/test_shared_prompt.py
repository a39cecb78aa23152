"""Subjects that share a prompt, sampled into one folder, scored and exported: every sample
keeps its own subject's texts; and a rerun with other settings regenerates its images."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from conftest import REPO
from palp.cli import main
from palp.core.safecsv import read_csv

PROMPT = "A watercolour of [V] on the beach at sunset"
CLASSES = {"cat": "cat", "cup": "cup"}


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    root = tmp_path_factory.mktemp("shared")
    subjects = [a for name in CLASSES for a in ("--subject", f"{name}={REPO / 'examples' / 'subjects' / name}")]
    words = [a for name, word in CLASSES.items() for a in ("--class-word", f"{name}={word}")]
    assert main(["prepare", *subjects, *words, "--prompt", PROMPT, "--pretrained-model", "tiny",
                 "--output", str(root / "prep"), "--quiet"]) == 0
    tasks = {next(iter(t["subjects"].values())): t["id"] for t in json.loads((root / "prep" / "manifest.json").read_text())["tasks"]}
    for name, task in sorted(tasks.items()):
        assert main(["train", "--prepared", str(root / "prep"), "--task", task, "--pretrained-model", "tiny", "--steps", "2",
                     "--batch-size", "2", "--lora-rank", "4", "--output", str(root / "runs" / task), "--quiet"]) == 0
        for extra in ([], ["--reference"]):
            assert main(["sample", "--model", str(root / "runs" / task), "--output", str(root / "samples"), "--num-samples", "2",
                         "--steps", "3", "--quiet", *extra]) == 0
    assert main(["score", "--samples", str(root / "samples"), "--prepared", str(root / "prep"), "--output", str(root / "scores"),
                 "--clip", "tiny", "--quiet"]) == 0
    assert main(["study", "export", "--samples", str(root / "samples"), "--prepared", str(root / "prep"),
                 "--output", str(root / "study"), "--forms", "1", "--image-size", "32"]) == 0
    return root


def test_every_sample_row_carries_its_own_subjects_texts(shared):
    rows = read_csv((shared / "samples" / "samples.csv").read_bytes())
    assert set(rows["subject"]) == set(CLASSES) and len(rows) == 2 * 2 * 2  # subjects x (palp, base) x samples
    assert set(rows["prompt"]) == {PROMPT}
    for _, r in rows.iterrows():
        word = CLASSES[r["subject"]]
        assert r["clean_prompt"] == f"A watercolour of a {word} on the beach at sunset"
        assert f"A photo of a {word}" in [e["text"] for e in json.loads(r["elements"])]


def test_scores_use_each_subjects_own_clean_prompt_and_class(shared):
    """Class and Target-prompt scores equal open_clip's cosine with the sample's own subject's texts."""
    import open_clip

    from palp.models.clip import tiny_clip_dir

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tiny_clip_dir()}")
    model.eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{tiny_clip_dir()}")

    def unit(f):
        return (f / f.norm(dim=-1, keepdim=True))[0]

    with torch.no_grad():
        def text(t):
            return unit(model.encode_text(tokenizer([t])))

        def image(p):
            return unit(model.encode_image(preprocess(Image.open(p).convert("RGB"))[None]))

        scores = read_csv((shared / "scores" / "scores.csv").read_bytes())
        assert set(scores["subject"]) == set(CLASSES)
        for _, r in scores.iterrows():
            word, g = CLASSES[r["subject"]], image(r["path"])
            own, other = text(f"A photo of a {word}"), text(f"A photo of a {'cup' if word == 'cat' else 'cat'}")
            assert r["Class"] == pytest.approx(float(g @ own), abs=1e-5)
            assert abs(float(g @ own) - float(g @ other)) > 1e-4  # the two texts score apart: the check can fail
            assert r["Target prompt"] == pytest.approx(float(g @ text(f"A watercolour of a {word} on the beach at sunset")), abs=1e-5)


def test_study_elements_are_each_subjects_own(shared):
    key = read_csv((shared / "study" / "key" / "answer_key.csv").read_bytes())
    questions = key[key["kind"] == "elements"]
    assert set(questions["subject"]) == set(CLASSES)
    for _, q in questions.iterrows():
        word = CLASSES[q["subject"]]
        assert f"A photo of a {word}" in json.loads(q["elements"])
        assert q["clean_prompt"] == f"A watercolour of a {word} on the beach at sunset"


def test_a_rerun_with_another_seed_regenerates(shared, tmp_path):
    """Same output, another --seed: new images, listed with their seeds; equal to a fresh run's."""
    run = next((shared / "runs").iterdir())
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    args = ["sample", "--model", str(run), "--num-samples", "2", "--steps", "3", "--quiet"]
    assert main([*args, "--output", str(out)]) == 0
    first = read_csv((out / "samples.csv").read_bytes())
    assert main([*args, "--output", str(out), "--seed", "1"]) == 0
    assert main([*args, "--output", str(fresh), "--seed", "1"]) == 0
    second, expected = read_csv((out / "samples.csv").read_bytes()), read_csv((fresh / "samples.csv").read_bytes())
    assert len(second) == 2 and set(second["seed"]).isdisjoint(first["seed"])  # the table lists this call's samples
    assert list(second["seed"]) == list(expected["seed"]) and list(second["file"]) == list(expected["file"])
    for f, old in zip(second["file"], first["file"]):
        assert (out / f).read_bytes() == (fresh / f).read_bytes()
        assert not np.array_equal(np.asarray(Image.open(out / f)), np.asarray(Image.open(out / old)))
    settings = json.loads((out / second["file"][0]).parent.parent.joinpath("settings.json").read_text())
    assert settings["seed"] == 1 and settings["steps"] == 3
    # The other settings' table rows are gone, so scoring the folder sees only this call's images.
    assert len(pd.unique(second["settings"])) == 1


def test_a_run_sampled_again_with_other_prompts_keeps_its_first_rows(shared, tmp_path):
    """Same settings, another prompt into the same output: both calls' rows stay listed."""
    run = next((shared / "runs").iterdir())
    out = tmp_path / "out"
    args = ["sample", "--model", str(run), "--output", str(out), "--num-samples", "1", "--steps", "3", "--quiet"]
    assert main(args) == 0
    assert main([*args, "--prompts", "A sketch of [V] in the snow at night"]) == 0
    rows = read_csv((out / "samples.csv").read_bytes())
    assert sorted(rows["prompt"]) == ["A sketch of [V] in the snow at night", PROMPT]
    assert all((out / f).is_file() for f in rows["file"])
