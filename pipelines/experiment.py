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
    if params.get("prompts_file"):
        params["prompts_file"] = _resolve(params["prompts_file"])
    return params
