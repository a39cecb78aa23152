"""Experiment trackers through accelerate: ``--report-to none|tensorboard|mlflow|wandb``.

``auto`` (the default) is ``tensorboard`` when the ``tensorboard`` package is installed, else
``none``. TensorBoard writes event files under the run's ``logs/`` folder (``tensorboard
--logdir OUTPUT/logs``); MLflow logs to ``MLFLOW_TRACKING_URI`` (a local ``file:`` store, a
server); Weights & Biases to the account ``wandb login`` set up. Each logs the step's scalars
(loss, its terms, the gradient norm, the learning rate), the run's settings and the
validation grids.
"""

from __future__ import annotations

import importlib.util

import numpy as np

REPORT_TO = ("auto", "none", "tensorboard", "mlflow", "wandb")
# The module each tracker needs and the package that installs it.
NEEDS = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow-skinny"), "wandb": ("wandb", "wandb")}
PROJECT = "palp"
LOG_FOLDER = "logs"


class TrackingError(ValueError):
    """A tracker palp cannot use; the message says what to install."""


def resolve_report_to(value: str) -> str:
    """``auto`` -> tensorboard or none; a named tracker must be installed."""
    if value not in REPORT_TO:
        raise TrackingError(f"--report-to must be one of {', '.join(REPORT_TO)}, not {value!r}")
    if value == "auto":
        return "tensorboard" if importlib.util.find_spec("tensorboard") else "none"
    if value != "none" and not importlib.util.find_spec(NEEDS[value][0]):
        module, package = NEEDS[value]
        raise TrackingError(f"--report-to {value} needs the {module} package: pip install {package} (or --report-to none)")
    return value


def hyperparameters(config: dict) -> dict:
    """The run's settings as trackers take them: scalars kept, everything else as its text."""
    out = {}
    for key, value in config.items():
        out[key] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return out


def log_images(accelerator, name: str, images: np.ndarray, grid: np.ndarray, step: int) -> None:
    """The validation images of one check, (N, H, W, 3) uint8 and as one grid, to every active tracker."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({name: images}, step=step, dataformats="NHWC")
        elif tracker.name == "mlflow":
            import mlflow

            mlflow.log_image(grid, artifact_file=f"{name}/step-{step:06d}.png")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({name: [wandb.Image(im) for im in images]}, step=step)
