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
    """Pipeline parameter values from an experiment YAML, validated against the pipeline: every
    key a parameter, every value of its type (numbers in any YAML spelling, finite), each
    subject a mapping with a name and a folder."""
    path = Path(path) if path else DEFAULT_CONFIG
    try:
        params = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ExperimentError(f"cannot read experiment config {path}: {e}") from e
    params = {} if params is None else params
    if not isinstance(params, dict):
        raise ExperimentError(f"{path}: expected a mapping of pipeline settings (subjects: ..., prompts: ...), "
                              f"got a {type(params).__name__}")
    parameters = inspect.signature(build_pipeline().pipeline_func).parameters
    unknown = sorted(set(map(str, params)) - set(parameters))
    if unknown:
        raise ExperimentError(f"{path}: unknown setting(s) {', '.join(unknown)}; the pipeline takes {', '.join(sorted(parameters))}")
    wrong = []
    for key, value in params.items():
        try:
            params[key] = typed_value(value, parameters[key].annotation)
        except ValueError as e:
            wrong.append(f"{key}: {e}")
    if wrong:
        raise ExperimentError(f"{path}: " + "; ".join(wrong))
    _check_prior_preservation(params, path)
    for key in ("prompts", "methods"):
        bad = [v for v in params.get(key) or [] if not isinstance(v, str)]
        if bad:
            raise ExperimentError(f"{path}: {key} must be a list of strings; {bad[0]!r} is not one")
    if not params.get("subjects"):
        raise ExperimentError(f"{path}: 'subjects' is required (a list of {{name, images, class_word}})")
    for i, s in enumerate(params["subjects"]):
        if not isinstance(s, dict) or not {"name", "images"} <= set(s):
            raise ExperimentError(f"{path}: each subject needs 'name' and 'images', got {s!r}")
        for key in ("name", "images", "class_word", "placeholder", "personalization_prompt"):
            if key in s and not isinstance(s[key], str):
                raise ExperimentError(f"{path}: subject {i + 1}'s {key} must be text (a string), got {s[key]!r}")
        s["images"] = _resolve(s["images"])
        if isinstance(s.get("truth"), str):
            s["truth"] = _truth_file(s["truth"], s["name"])
    if params.get("prompts_file"):
        params["prompts_file"] = _resolve(params["prompts_file"])
    if params.get("judge"):
        check_judged_units(params, path)
    return params


def _check_prior_preservation(params: dict, path) -> None:
    """prior_weight and num_class_images: 0 (the library's default) or positive, and set only
    with prior_preservation or a method that has it by default (the train steps would refuse or
    ignore them otherwise, after prepare ran)."""
    for key in ("prior_weight", "num_class_images"):
        if params.get(key, 0) < 0:
            raise ExperimentError(f"{path}: {key} must be > 0 (or 0: the default), not {params[key]}")
    given = [key for key in ("prior_weight", "num_class_images") if params.get(key)]
    if given and not params.get("prior_preservation") and not _a_method_preserves_the_prior(params):
        raise ExperimentError(f"{path}: {' and '.join(given)} only apply with prior_preservation: true (or a method "
                              f"with prior preservation of its own: custom-diffusion); set it, or drop {' and '.join(given)}")


def _a_method_preserves_the_prior(params: dict) -> bool:
    """Whether a listed method trains with prior preservation by default (custom-diffusion): its
    runs take prior_weight and num_class_images, the other methods' runs leave them aside."""
    from palp.core.methods import METHOD_TABLE
    from palp.core.settings import ConfigError, split_variant

    for m in params.get("methods") or []:
        try:
            own = METHOD_TABLE[split_variant(str(m))[0]].defaults.get("prior_preservation")
        except ConfigError:
            continue  # an unknown method is reported where the methods are checked
        if own is not None and own.value:
            return True
    return False


_TYPE_NAMES = {int: "a whole number", float: "a number", bool: "true or false", str: "text", list: "a list"}


def typed_value(value, kind):
    """``value`` as the pipeline parameter type ``kind`` wants, or ValueError saying what is
    expected. A number may be written in any YAML spelling (``5e-5``, which YAML 1.1 reads as
    text, ``0.00005``, ``1_000``), and must be finite; a whole number may be written ``500.0``."""
    import math

    def refuse():
        example = {list: " (e.g. [palp, ti-db])", float: " (e.g. 5e-5)", int: " (e.g. 500)"}.get(kind, "")
        return ValueError(f"expected {_TYPE_NAMES.get(kind, kind)}{example}, got {value!r}")

    if kind is bool:
        if isinstance(value, bool):
            return value
        raise refuse()
    if kind is list:
        if isinstance(value, list):
            return value
        raise refuse()
    if kind is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):  # save_steps: 100
            return str(value)
        raise refuse()
    if kind in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise refuse()
        if kind is int and isinstance(value, int):
            return value  # exactly: a float would round a seed above 2**53
        try:
            number = float(value.replace("_", "")) if isinstance(value, str) else float(value)
        except (ValueError, OverflowError):
            raise refuse() from None
        if not math.isfinite(number):
            raise ValueError(f"expected a finite number, got {value!r}")
        if kind is float:
            return number
        if number != int(number):
            raise refuse()
        return int(number)
    return value


def _truth_file(value: str, name: str) -> dict:
    """A subject's ``truth:`` given as a JSON file (a toy-world subject file): its object."""
    from palp.toyworld.truth import TruthFileError, read_truth_file

    try:
        return read_truth_file(_resolve(value))
    except TruthFileError as e:
        raise ExperimentError(f"truth of subject {name}: {e}") from e


def check_judged_units(params: dict, path) -> None:
    """With the toy world's judge, every (subject, prompt) unit whose subject carries its truth
    must be one the judge can read (palp.toyworld.ceiling): a unit below the thresholds is
    excluded by rule before anything trains, so the experiment is refused, naming each."""
    from palp.steps.prepare import PrepareError, load_prompts_file
    from palp.toyworld.ceiling import THRESHOLDS, check_units, experiment_units
    from palp.toyworld.judge import resolve_judge

    try:
        prompts = [(p, []) for p in params.get("prompts") or []]
        if params.get("prompts_file") and "://" not in str(params["prompts_file"]):  # a gs:// file is read by prepare
            prompts += [(s.prompt, sorted(set(s.subjects.values()))) for s in load_prompts_file(params["prompts_file"])]
        units = experiment_units(params, prompts)
        if not units:
            return
        failing = [c for c in check_units(units, judge=resolve_judge(str(params["judge"]))) if c.failures()]
    except (ValueError, OSError, PrepareError) as e:  # a bad truth, missing judge or VAE weights, a bad prompts file
        raise ExperimentError(f"{path}: {e}") from e
    if failing:
        listed = "; ".join(f"{c.subject} x '{c.prompt}' ({', '.join(c.failures())})" for c in failing)
        raise ExperimentError(f"{path}: the judge cannot read {len(failing)} unit(s) even on clean renders or VAE round "
                              f"trips (thresholds {', '.join(f'{k} {v}' for k, v in THRESHOLDS.items())}): {listed}; "
                              f"remove those subject-prompt pairs (python -m palp.toyworld.ceiling --config FILE lists every unit)")
