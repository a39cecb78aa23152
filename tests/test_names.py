"""Names that become paths (subjects, task ids, methods) follow one rule, and writes stay under their output."""

from __future__ import annotations

import json

import pytest
import yaml

from palp.cli import main
from palp.core import gcs, storage

RULE = "it becomes a folder name, so use only letters, digits, '_', '.' and '-' (not '.' or '..')"


def _tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _prepare(subject: str, images, out, *extra: str) -> list[str]:
    return ["prepare", "--subject", f"{subject}={images}", "--class-word", f"{subject}=cat", "--prompt",
            "A sketch of [V] in Paris", "--pretrained-model", "tiny", "--output", str(out), "--quiet", *extra]


@pytest.mark.parametrize("name", ["../x", "a/b", ".."])
def test_subject_name_that_is_not_one_folder_is_refused(tmp_path, capsys, cat_images, name):
    out = tmp_path / "out"
    before = _tree(tmp_path)
    assert main(_prepare(name, cat_images, out)) == 2
    err = capsys.readouterr().err
    assert f"palp prepare: error: subject name {name!r} is not allowed: {RULE}" in err
    assert err.count("error:") == 1 and "Traceback" not in err
    assert _tree(tmp_path) == before  # nothing written: not the output, not beside it


def test_subject_name_in_a_prompts_file_is_refused(tmp_path, capsys, cat_images):
    prompts = tmp_path / "prompts.yaml"
    prompts.write_text(yaml.safe_dump({"prompts": [{"prompt": "A sketch of [V]", "subjects": {"[V]": "../../x"}}]}))
    assert main(_prepare("cat", cat_images, tmp_path / "out", "--prompts-file", str(prompts))) == 2
    assert f"{prompts}: entry 0: subject name '../../x' is not allowed: {RULE}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_placeholder_that_is_not_one_is_refused(tmp_path, capsys, cat_images):
    assert main(_prepare("cat", cat_images, tmp_path / "out", "--placeholder", "cat=../x")) == 2
    assert "--placeholder of subject cat: '../x' is not a placeholder; use [V], [V1], [V2], ..." in capsys.readouterr().err


@pytest.mark.parametrize("field, value, message", [
    ("task_id", "../../evil", f"task id '../../evil' is not allowed: {RULE}, joined by '+'"),
    ("method", "../evil", f"method '../evil' is not allowed: {RULE}"),
])
def test_sample_refuses_a_run_whose_config_names_a_path(tmp_path, capsys, field, value, message):
    """A run's training_config.json may come from a shared bucket: its names are checked before any write."""
    run = tmp_path / "run"
    run.mkdir()
    config = {"class_words": {"[V]": "cat"}, "target_prompt": "A sketch of [V]", "clean_prompt": "A sketch of a cat",
              "method": "palp", "subjects": [{"name": "cat"}], "task_id": "cat-00", "completed_steps": 1}
    (run / "training_config.json").write_text(json.dumps({**config, field: value}))
    out = tmp_path / "samples"
    assert main(["sample", "--model", str(run), "--output", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("error:") == 1 and "Traceback" not in err
    # (a lock file of the output may come and go; nothing else is written, nowhere else)
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p != run / "training_config.json"]
    assert all(p.is_relative_to(out) and p.suffix not in (".png", ".csv", ".json") for p in written)


def test_join_under_refuses_paths_that_leave_the_root(tmp_path):
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "link").symlink_to(tmp_path)
    assert storage.join_under(tmp_path / "root", "subjects", "cat", "000.png") == str(tmp_path / "root/subjects/cat/000.png")
    for parts in [("..", "x"), ("subjects", "../../x"), ("/etc",), ("link", "x")]:
        with pytest.raises(gcs.StorageError, match="would be written outside"):
            storage.join_under(tmp_path / "root", *parts)
    assert storage.join_under("gs://b/root", "subjects", "cat.png") == "gs://b/root/subjects/cat.png"
    with pytest.raises(gcs.StorageError, match=r"subjects/\.\./x would be written outside gs://b/root; refused"):
        storage.join_under("gs://b/root", "subjects", "../x")
