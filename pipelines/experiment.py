"""Experiment configs: the pipeline's parameter values, from ``evaluation/experiments/*.yaml``.

Relative paths in them (subject images, a prompts file) are resolved against the working
directory, then the repository.
"""

import inspect
import os
from pathlib import Path
from typing import Optional

import yaml

from pipelines.palp_pipeline import PipelineError, build_pipeline

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "evaluation" / "experiments" / "demo.yaml"


class ExperimentError(PipelineError):
    """An experiment config the pipeline cannot take; the message says what to fix."""


def _resolve(path: str) -> str:
    if "://" in path or os.path.isabs(path):
        return path
    for base in (Path.cwd(), REPO):
        if (base / path).exists():
            return str((base / path).resolve())
    raise ExperimentError(f"{path} not found (relative to {Path.cwd()} or {REPO})")


def load_experiment(path: Optional[str] = None) -> dict:
    """Pipeline parameter values from an experiment YAML, validated against the pipeline."""
    path = Path(path) if path else DEFAULT_CONFIG
    try:
        params = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ExperimentError(f"cannot read experiment config {path}: {e}") from e
    accepted = set(inspect.signature(build_pipeline().pipeline_func).parameters)
    unknown = sorted(set(params) - accepted)
    if unknown:
        raise ExperimentError(f"{path}: unknown setting(s) {', '.join(unknown)}; the pipeline takes {', '.join(sorted(accepted))}")
    if not params.get("subjects"):
        raise ExperimentError(f"{path}: 'subjects' is required (a list of {{name, images, class_word}})")
    for s in params["subjects"]:
        if not isinstance(s, dict) or not {"name", "images"} <= set(s):
            raise ExperimentError(f"{path}: each subject needs 'name' and 'images', got {s!r}")
        s["images"] = _resolve(s["images"])
        if isinstance(s.get("truth"), str):
            s["truth"] = _truth_file(s["truth"], s["name"])
    if params.get("prompts_file"):
        params["prompts_file"] = _resolve(params["prompts_file"])
    if params.get("judge"):
        check_judged_units(params, path)
    return params


def _truth_file(value: str, name: str) -> dict:
    """A subject's ``truth:`` given as a JSON file (a toy-world subject file): its object."""
    import json

    path = _resolve(value)
    try:
        truth = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ExperimentError(f"truth of subject {name}: cannot read {value} as JSON ({e})") from e
    if not isinstance(truth, dict):
        raise ExperimentError(f"truth of subject {name}: {value} does not hold a JSON object")
    return truth


def check_judged_units(params: dict, path) -> None:
    """With the toy world's judge, every (subject, prompt) unit whose subject carries its truth
    must be one the judge can read (palp.toyworld.ceiling): a unit below the thresholds is
    excluded by rule before anything trains, so the experiment is refused, naming each."""
    from palp.toyworld.ceiling import THRESHOLDS, check_units, experiment_units
    from palp.toyworld.judge import resolve_judge

    try:
        units = experiment_units(params)
        judge = resolve_judge(str(params["judge"])) if units else None
    except (ValueError, OSError) as e:
        raise ExperimentError(f"{path}: {e}") from e
    failing = [c for c in check_units(units, judge=judge) if c.failures()]
    if failing:
        listed = "; ".join(f"{c.subject} x '{c.prompt}' ({', '.join(c.failures())})" for c in failing)
        raise ExperimentError(f"{path}: the judge cannot read {len(failing)} unit(s) even on clean renders or VAE round "
                              f"trips (thresholds {', '.join(f'{k} {v}' for k, v in THRESHOLDS.items())}): {listed}; "
                              f"remove those subject-prompt pairs (python -m palp.toyworld.ceiling --config FILE lists every unit)")
