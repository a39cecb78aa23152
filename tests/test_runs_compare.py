"""``palp runs compare``: two local runs that differ in one parameter, side by side."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from palp import cli
from pipelines.errors import PipelineError
from pipelines.runs_compare import add_runs_parser, combine, compare_runs


def palp(argv: list[str]) -> int:
    """``palp …`` with the runs command registered as pipelines/cli.py registers it."""
    return cli.main(argv, commands=[add_runs_parser], errors=(PipelineError,))


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> tuple[Path, Path]:
    """Two pipeline roots of a shortened tiny experiment (one subject, PALP and the base model's
    reference) that differ only in the learning rate."""
    from pipelines.run import run_local

    tmp = tmp_path_factory.mktemp("runs")
    config = yaml.safe_load((REPO / "evaluation/experiments/tiny.yaml").read_text())
    config.update(subjects=config["subjects"][:1], methods=["palp"], train_steps=2, save_steps="2", checkpoint_every=2,
                  num_samples=1, sample_steps=2, study_forms=1, study_image_size=32)
    roots = []
    for name, lr in (("slow", 0.001), ("fast", 0.002)):
        (tmp / f"{name}.yaml").write_text(yaml.safe_dump(dict(config, lr=lr)))
        roots.append(run_local(str(tmp / f"{name}.yaml"), pipeline_root=str(tmp / name), share_cache=True))
    return roots[0], roots[1]


def test_two_runs_side_by_side(two_runs, tmp_path, capsys):
    slow, fast = two_runs
    scores_folder = next(slow.glob("palp-*")) / "compare" / "scores"
    out = tmp_path / "out"
    assert palp(["runs", "compare", str(slow), str(fast), str(scores_folder), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    md = (out / "compare.md").read_text()
    assert md in printed

    # (a) only the learning rate differs between the runs (paths inside each run, its start
    # time and its run folder's name are not parameters); the scores folder records no training.
    section = md.split("## Parameters that differ")[1].split("## Table 2")[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| parameter")]
    assert [re.split(r"\s*\|\s*", r.strip("| ")) for r in rows] == [["train.lr", "0.001", "0.002", "–"]]

    # (b) both runs' Table 2 rows, a row per method and run
    table = md.split("## Table 2")[1]
    for method in ("base", "palp"):
        for run in ("slow", "fast", scores_folder.parent.parent.name):
            assert re.search(rf"^\| {method}\s+\| {re.escape(run)}\s+\|", table, re.M), (method, run)

    # (c) one self-contained page with every run's final samples
    page = (out / "compare.html").read_text()
    assert "<script" not in page and "<link" not in page and "href=" not in page and "url(" not in page
    sources = re.findall(r"src='([^']*)'", page)
    assert sources and all(s.startswith("data:image/") for s in sources)
    # 1 subject x (palp + base) x 1 sample, for each of the three ROOTs
    assert len(sources) == 2 * 3
    assert "train.lr" in page and "0.002" in page and "A sketch of a cat in Paris at night" in page


def test_a_value_that_differs_between_trainings_is_shown_per_method():
    assert combine([("palp", "palp/cat-00", {"lr": "1"}), ("ti-db", "ti-db/cat-00", {"lr": "1"})]) == {"lr": "1"}
    assert combine([("palp", "palp/cat-00", {"lr": "1", "x": "a"}), ("palp", "palp/cup-00", {"lr": "1", "x": "a"}),
                    ("ti-db", "ti-db/cat-00", {"lr": "2", "x": "a"})]) == {"lr": "palp: 1; ti-db: 2", "x": "a"}
    assert combine([("palp", "palp/cat-00", {"lr": "1"}), ("palp", "palp/cup-00", {"lr": "2"}), ("ti-db", "ti-db/cat-00", {})]) \
        == {"lr": "palp/cat-00: 1; palp/cup-00: 2; ti-db/cat-00: (unset)"}


def test_bad_roots_are_one_line_errors(two_runs, tmp_path, capsys):
    slow, _ = two_runs
    assert palp(["runs", "compare", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert palp(["runs", "compare", str(slow), str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("palp runs compare: error:")
    assert "is neither a local pipeline root" in err and "nor a scores folder" in err

    # the newest run under a root failed (no compare step output): said, and the older finished one offered
    root = tmp_path / "root"
    root.mkdir()
    (root / "palp-2000-01-01-00-00-00-000000").symlink_to(next(slow.glob("palp-*")))
    (root / "palp-2099-01-01-00-00-00-000000" / "prepare").mkdir(parents=True)
    assert palp(["runs", "compare", str(root)]) == 2
    err = capsys.readouterr().err
    assert "palp-2099-01-01-00-00-00-000000 has no compare step output" in err
    assert "palp-2000-01-01-00-00-00-000000" in err
    # ... while that run folder itself compares
    compare_runs([str(root / "palp-2000-01-01-00-00-00-000000")], str(tmp_path / "one"))
    assert "One run: nothing to compare." in (tmp_path / "one" / "compare.md").read_text()
    assert not (tmp_path / "nowhere").exists()
    (tmp_path / "file").write_text("")
    assert palp(["runs", "compare", str(slow), "--output", str(tmp_path / "file")]) == 2
    assert "is a file; give a folder" in capsys.readouterr().err


def test_run_prefix_is_the_pipeline_name():
    from pipelines.palp_pipeline import PIPELINE_NAME
    from pipelines.runs_compare import RUN_PREFIX

    assert RUN_PREFIX == f"{PIPELINE_NAME}-"
