"""Training curves and validation samples: in files (validation grids, the run's page), in
TensorBoard's event files (read back with TensorBoard's own reader) and in a real MLflow file
store. That validation sampling leaves the training's random stream alone (a killed and resumed
run with validation on is bit-identical to one without validation or kill) is tested in
tests/test_reproducible.py."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import EXAMPLE_CAT, REPO, HtmlRefs, train_args
from palp.models.run_weights import CONFIG_FILE, REPORT_FILE

STEPS = 6
ARGS = ("--batch-size", "4", "--lr", "1e-3", "--checkpoint-every", "2", "--save-steps", "6")
VALIDATION = ("--validation-every", "2", "--validation-images", "2", "--validation-steps", "3")


def _cmd(out, *extra) -> list[str]:
    return [sys.executable, "-m", "palp", *train_args(EXAMPLE_CAT, out, *ARGS, *extra, steps=STEPS)]


def _env(**extra) -> dict:
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def watched(tmp_path_factory):
    """A run with validation every 2 steps, reporting to TensorBoard."""
    out = tmp_path_factory.mktemp("watched") / "run"
    subprocess.run(_cmd(out, *VALIDATION, "--report-to", "tensorboard"), check=True, cwd=REPO, env=_env())
    return out


def test_validation_grids_are_written_per_check(watched):
    index = json.loads((watched / "validation" / "index.json").read_text())
    assert [e["step"] for e in index] == [2, 4, 6]
    assert all(e["prompts"] == ["A sketch of [V] in Paris at night"] and e["seeds"] == [0, 1] for e in index)
    grids = [Image.open(watched / "validation" / e["file"]) for e in index]
    assert all(g.size == (2 * 64, 64) for g in grids)  # a row per prompt, a column per seed, at the model's 64 px
    pixels = [np.asarray(g.convert("RGB")) for g in grids]
    assert not np.array_equal(pixels[0], pixels[-1])  # the LoRA moved between checks (same noise, other weights)
    config = json.loads((watched / CONFIG_FILE).read_text())
    assert config["report_to"] == "tensorboard" and config["validation_every"] == 2


def test_tensorboard_event_files_hold_the_scalars_and_the_validation_images(watched):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = [p for p in (watched / "logs").rglob("events.out.tfevents.*")]
    assert runs, "no TensorBoard event file under logs/"
    acc = EventAccumulator(str(runs[0].parent), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    for name in ("train/loss", "train/rec_loss", "train/align_loss", "train/grad_norm", "train/lr"):
        assert [e.step for e in acc.Scalars(name)] == list(range(1, STEPS + 1)), name
    csv = (watched / "metrics.csv").read_text().splitlines()
    header, last = csv[0].split(","), csv[-1].split(",")
    assert acc.Scalars("train/loss")[-1].value == pytest.approx(float(last[header.index("loss")]), rel=1e-6)
    image_tags = [t for t in tags["images"] if t.startswith("validation")]
    assert image_tags, tags["images"]
    steps = sorted({e.step for t in image_tags for e in acc.Images(t)})
    assert steps == [2, 4, 6]
    first = acc.Images(image_tags[0])[0]
    assert Image.open(io.BytesIO(first.encoded_image_string)).size == (2 * 64, 64)  # TensorBoard tiles the check's images


def test_the_run_page_is_self_contained_and_shows_curves_and_grids(watched):
    text = (watched / REPORT_FILE).read_text()
    page = HtmlRefs()
    page.feed(text)
    assert "script" not in page.tags and "link" not in page.tags
    assert page.refs and all(s.startswith("data:image/png;base64,") for s in page.refs)
    images = [Image.open(io.BytesIO(base64.b64decode(s.split(",", 1)[1]))) for s in page.refs]
    assert len(images) == 1 + 3  # the curves and one grid per check
    assert images[0].size[0] > 600  # the curves: a panel per measurement
    assert "step 6" in text and "A sketch of [V] in Paris at night" in text


def test_mlflow_file_store_gets_params_metrics_and_validation_images(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    store = tmp_path / "mlruns"
    uri = store.as_uri()
    out = tmp_path / "run"
    subprocess.run(_cmd(out, *VALIDATION, "--report-to", "mlflow", "--steps", "4"), check=True, cwd=REPO,
                   env=_env(MLFLOW_TRACKING_URI=uri, MLFLOW_ALLOW_FILE_STORE="true"))
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"  # MLflow 3 keeps the file store behind this switch
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("palp")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.data.params["method"] == "palp" and run.data.params["lr"] == "0.001"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "validation")]
    assert artifacts == ["validation/step-000002.png", "validation/step-000004.png"]


def test_report_to_a_tracker_that_is_not_installed_is_one_clear_error(tmp_path, capsys):
    import importlib.util

    from palp.cli import main

    if importlib.util.find_spec("wandb"):
        pytest.skip("wandb is installed here")
    assert main(train_args(EXAMPLE_CAT, tmp_path / "o", "--report-to", "wandb")) == 2
    err = capsys.readouterr().err
    assert "--report-to wandb needs the wandb package: pip install wandb" in err
    assert not (tmp_path / "o").exists()


def test_a_gs_output_gets_the_grids_the_logs_and_the_page(gcs_emulator, cat_images):
    """A run into gs:// (a real emulator): each check's grid and the index are pushed as they are
    written, the TensorBoard logs with each checkpoint, the page with the final files."""
    from palp.cli import main
    from palp.core import gcs, storage

    gcs.gcs_client().create_bucket("palp-watch")
    argv = train_args(cat_images, "gs://palp-watch/run", *VALIDATION, "--report-to", "tensorboard", steps=4)
    assert main(argv) == 0
    names = storage.list_files("gs://palp-watch/run", recursive=True)
    assert {"validation/step-000002.png", "validation/step-000004.png", "validation/index.json", REPORT_FILE} <= set(names)
    assert any(n.startswith("logs/palp/events.out.tfevents.") for n in names)
    index = json.loads(storage.read_text("gs://palp-watch/run/validation/index.json"))
    assert [e["step"] for e in index] == [2, 4]
