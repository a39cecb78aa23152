"""The frontier report (evaluation/toyworld/frontier/frontier.py): Pareto sets, interpolated headlines
against closed forms (the report on a real pipeline root written by `palp pipeline run-local`
is checked on the demo's run in tests/test_pipeline.py::test_whole_dag_runs_locally)."""

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from palp.core import safecsv

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "evaluation" / "toyworld" / "frontier"))
import frontier  # noqa: E402

STEPS = [250, 500, 1000, 2000]


def test_pareto_keeps_the_points_nothing_beats_on_both_axes():
    x = np.array([0.1, 0.2, 0.2, 0.3, 0.15, np.nan])
    y = np.array([0.9, 0.8, 0.7, 0.5, 0.6, 1.0])
    # (0.2, 0.7) is beaten by (0.2, 0.8); (0.15, 0.6) by (0.2, 0.8); NaN is never on it
    assert frontier.pareto(x, y).tolist() == [0, 1, 3]
    assert frontier.along(x, y, 0.25) == pytest.approx(0.65)
    assert np.isnan(frontier.along(x, y, 0.35))  # never extrapolated
    assert frontier.along(x, y, 0.1) == pytest.approx(0.9)
    assert frontier.along(x, y, 0.05) == pytest.approx(0.9)  # (0.1, 0.9) keeps more and finds more: it covers 0.05
    # one snapshot better on both than every other: the frontier is that point, and it covers any target below it
    assert frontier.along(np.array([0.7, 0.6, 0.3]), np.array([1.0, 0.9, 0.7]), 0.62) == pytest.approx(1.0)


def _scores(path: Path, curves: dict, *, noise: float = 0.0, own: float = 0.0, seed: int = 0) -> Path:
    """A scores.csv in the shape `palp score --judge` writes: curves[method] = [(identity, elements)
    per step], 4 subjects x 2 prompts x 3 samples per point; ``noise`` varies the units alike for
    every method, ``own`` each method's identity on its own."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(4):
        for p in range(2):
            shift = noise * rng.standard_normal()
            for method, points in curves.items():
                mine = own * rng.standard_normal()
                for step, (ident, found) in zip(STEPS, points):
                    ident = ident + mine
                    for k in range(3):
                        rows.append({"task": f"s{s}-{p:02d}", "subject": f"s{s}", "prompt": f"prompt {p}", "method": method,
                                     "run": f"/runs/{method}-s{s}", "step": step, "sample": k,
                                     "Judge: style": found + shift, "Judge: place": found + shift, "Judge: time": found + shift,
                                     "Judge: identity": ident, "Judge: class": 1.0, "Target prompt": 0.5 + found / 10,
                                     "lr": 3e-3, "lambda": "" if method == "ti-db" else 0.3})
    path.write_text(safecsv.to_csv(pd.DataFrame(rows), index=False))
    return path


TIDB = [(0.2, 0.95), (0.3, 0.85), (0.4, 0.7), (0.5, 0.5)]
PALP = [(0.2, 1.0), (0.3, 0.9), (0.4, 0.75), (0.5, 0.55)]  # TI+DB's frontier moved up by 0.05


def test_headlines_match_the_closed_form(tmp_path, capsys):
    path = _scores(tmp_path / "scores.csv", {"ti-db": TIDB, "palp": PALP})
    frontier.main(["--scores", str(path), "--out", str(tmp_path / "out"), "--reps", "200"])
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    h = summary["headlines"]["palp"]
    at_identity, at_elements = h["elements at matched identity"], h["identity at matched elements"]
    assert at_identity["target"] == pytest.approx(0.3) and at_identity["estimate"] == pytest.approx(0.05)
    # TI+DB finds 0.85 at step 500; PALP's frontier reaches 0.85 between (0.3, 0.9) and (0.4, 0.75)
    assert at_elements["target"] == pytest.approx(0.85)
    assert at_elements["estimate"] == pytest.approx(0.3 + 0.1 / 3 - 0.3)
    assert at_identity["lo"] == pytest.approx(0.05) and at_identity["hi"] == pytest.approx(0.05)  # every unit alike
    assert at_identity["defined"] == 1.0
    points = {(p["method"], p["step"]): p for p in summary["points"]}
    assert points[("palp", 500)]["Elements found"][0] == pytest.approx(0.9)
    assert points[("ti-db", 500)]["lambda"] is None and points[("palp", 500)]["lambda"] == 0.3
    assert all(p["on_frontier"] for p in summary["points"])
    same = {(p["method"], p["step"]): p for p in summary["same_step"]}
    assert same[("palp", 500)]["Elements found"] == pytest.approx([0.05, 0.05, 0.05])
    assert same[("palp", 2000)]["Judge: identity"] == pytest.approx([0.0, 0.0, 0.0]) and same[("palp", 250)]["units"] == 8
    for name in ("points.md", "headline.md", "steps.md", "frontier.png", "fig6.png", "scores.csv.gz"):
        assert (tmp_path / "out" / name).stat().st_size > 0, name
    assert "+0.050 [+0.050, +0.050]" in (tmp_path / "out" / "headline.md").read_text()
    # the saved scores rebuild the same numbers
    frontier.main(["--scores", str(tmp_path / "out" / "scores.csv.gz"), "--out", str(tmp_path / "again"), "--reps", "200"])
    assert json.loads((tmp_path / "again" / "summary.json").read_text())["headlines"] == summary["headlines"]


def test_intervals_cover_the_estimate_and_undefined_draws_are_counted(tmp_path):
    worse = [(0.05, 0.99), (0.1, 0.97), (0.15, 0.96), (0.25, 0.9)]  # never reaches TI+DB's identity 0.3
    path = _scores(tmp_path / "scores.csv", {"ti-db": TIDB, "palp": PALP, "sds": worse}, noise=0.05)
    frontier.main(["--scores", str(path), "--out", str(tmp_path / "out"), "--reps", "300"])
    h = json.loads((tmp_path / "out" / "summary.json").read_text())["headlines"]
    r = h["palp"]["elements at matched identity"]
    # the unit shifts are shared by both methods: paired, the difference does not move at all
    assert r["estimate"] == pytest.approx(0.05) and r["lo"] == pytest.approx(0.05) and r["hi"] == pytest.approx(0.05)
    assert np.isnan(h["sds"]["elements at matched identity"]["estimate"])
    assert h["sds"]["elements at matched identity"]["defined"] == 0.0


def test_intervals_widen_with_what_the_units_do_differently(tmp_path):
    path = _scores(tmp_path / "scores.csv", {"ti-db": TIDB, "palp": PALP}, noise=0.05, own=0.02, seed=3)
    frontier.main(["--scores", str(path), "--out", str(tmp_path / "out"), "--reps", "500"])
    r = json.loads((tmp_path / "out" / "summary.json").read_text())["headlines"]["palp"]["elements at matched identity"]
    assert r["lo"] < r["estimate"] < r["hi"] and r["hi"] - r["lo"] > 0.005
    assert r["lo"] < 0.05 < r["hi"]  # the true shift is inside


def test_match_step_must_exist(tmp_path):
    path = _scores(tmp_path / "scores.csv", {"ti-db": TIDB, "palp": PALP})
    with pytest.raises(SystemExit, match="no ti-db point at step 300"):
        frontier.main(["--scores", str(path), "--out", str(tmp_path / "out"), "--match-step", "300"])
    assert not (tmp_path / "out").exists()  # nothing half written
