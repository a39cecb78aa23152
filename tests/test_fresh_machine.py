"""``palp sample`` and ``palp score`` of a run trained elsewhere, on a machine that shares
nothing with the trainer but the artifacts: a new PALP_CACHE, a new HF_HOME, no network.
The run names its base model as it was given and pins the exact weights."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import EXAMPLE_CAT, upload_folder
from palp.cli import main
from palp.core.safecsv import read_csv
from palp.models.base_model import ModelError
from palp.steps.sample import sample

PROMPT = "A sketch of [V] in Paris at night"
COMMIT = "89abcdef0123456789abcdef0123456789abcdef"
HUB_ID = "palp-test/tiny-sd"


def _hub_cache(home, tiny_dir):
    """A Hugging Face hub cache holding one snapshot of the tiny model, as an image or a pod might."""
    repo = home / "hub" / f"models--{HUB_ID.replace('/', '--')}"
    shutil.copytree(tiny_dir, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)


def _elsewhere(tmp_path, name, code, **env):
    """Run ``code`` in a fresh process with its own empty caches; returns the result."""
    base = {k: v for k, v in os.environ.items() if k not in ("PALP_CACHE", "HF_HOME")}
    base.update(PALP_CACHE=str(tmp_path / f"{name}-palp-cache"), HF_HOME=str(env.pop("hf_home", tmp_path / f"{name}-hf")),
                HF_HUB_OFFLINE="1", **env)
    return subprocess.run([sys.executable, "-c", code], env=base, capture_output=True, text=True, cwd=tmp_path)


def _sample_and_score(runs: dict, prep, out) -> str:
    """Code that samples every run, then scores all of them together."""
    code = "from palp.cli import main\n"
    for kind, run in runs.items():
        code += (f"assert main(['sample', '--model', {str(run)!r}, '--output', {str(out / 'samples')!r}, "
                 f"'--num-samples', '1', '--steps', '2', '--quiet']) == 0, {kind!r}\n")
    return code + (f"assert main(['score', '--samples', {str(out / 'samples')!r}, '--prepared', {str(prep)!r}, "
                   f"'--output', {str(out / 'scores')!r}, '--clip', 'tiny', '--quiet']) == 0\n")


@pytest.fixture(scope="module")
def prep(tmp_path_factory):
    root = tmp_path_factory.mktemp("fresh")
    assert main(["prepare", "--subject", f"cat={EXAMPLE_CAT}", "--class-word", "cat=cat", "--prompt", PROMPT,
                 "--pretrained-model", "tiny", "--clip", "tiny", "--pin-clip", "--output", str(root / "prep"), "--quiet"]) == 0
    return root / "prep"


def _train_args(prep, model, out):
    return ["train", "--prepared", str(prep), "--pretrained-model", model, "--steps", "1", "--batch-size", "1",
            "--lora-rank", "2", "--output", str(out), "--quiet"]


def test_runs_trained_elsewhere_sample_and_score_on_a_fresh_machine(prep, tmp_path, tiny_dir, gcs_emulator):
    """One run per kind of base-model reference (tiny, toyworld, gs://, a hub id), each
    sampled, then all scored, in one new process with empty caches of its own."""
    upload_folder(tiny_dir, "gs://palp-fresh-test/models/tiny-sd")
    models = {"tiny": "tiny", "toyworld": "toyworld", "gs": "gs://palp-fresh-test/models/tiny-sd", "hub": HUB_ID}
    runs = {kind: tmp_path / "runs" / kind for kind in models}
    for home in ("trainer-hf", "sampler-hf"):  # the trainer and the sampler each have the snapshot in their own hub cache
        _hub_cache(tmp_path / home, tiny_dir)
    code = f"from palp.cli import main\nassert main({_train_args(prep, HUB_ID, runs['hub'])!r}) == 0\n"
    trained = _elsewhere(tmp_path, "trainer", code, hf_home=tmp_path / "trainer-hf")
    assert trained.returncode == 0, trained.stderr[-3000:]
    for kind in ("tiny", "toyworld", "gs"):
        assert main(_train_args(prep, models[kind], runs[kind])) == 0
    for kind, model in models.items():
        config = json.loads((runs[kind] / "training_config.json").read_text())
        assert config["pretrained_model"] == model and "base_model_path" not in config
        prefix = {"tiny": "sha256:", "toyworld": "sha256:", "gs": "gcs:", "hub": f"hub:{COMMIT}"}[kind]
        assert config["base_model_pin"].startswith(prefix), kind

    done = _elsewhere(tmp_path, "sampler", _sample_and_score(runs, prep, tmp_path), hf_home=tmp_path / "sampler-hf",
                      STORAGE_EMULATOR_HOST=gcs_emulator)
    assert done.returncode == 0, done.stderr[-3000:]
    scores = read_csv((tmp_path / "scores" / "scores.csv").read_bytes())
    assert sorted(set(scores["run"])) == sorted(str(r) for r in runs.values())
    assert not any((tmp_path / "sampler-palp-cache").glob("runs/*"))  # a local run is read in place, not cached


def test_replaced_weights_under_the_same_gs_prefix_stop_sampling_with_both_pins(prep, tmp_path, tiny_dir, gcs_emulator):
    uri = "gs://palp-fresh-test/models/replaced"
    upload_folder(tiny_dir, uri)
    run = tmp_path / "run"
    assert main(_train_args(prep, uri, run)) == 0
    pin = json.loads((run / "training_config.json").read_text())["base_model_pin"]
    changed = tmp_path / "changed"
    shutil.copytree(tiny_dir, changed)
    weights = changed / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    upload_folder(changed, uri)
    with pytest.raises(ModelError, match="is not the one the run was trained with") as e:
        sample(str(run), str(tmp_path / "samples"), num_samples=1, steps=1, progress=False)
    assert pin in str(e.value) and uri in str(e.value)
    assert not (tmp_path / "samples" / "samples.csv").exists()
