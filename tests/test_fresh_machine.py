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


def _sample_and_score(run, prep, out) -> str:
    return (
        "from palp.cli import main\n"
        f"assert main(['sample', '--model', {str(run)!r}, '--output', {str(out / 'samples')!r}, '--num-samples', '1', "
        "'--steps', '2', '--quiet']) == 0\n"
        f"assert main(['score', '--samples', {str(out / 'samples')!r}, '--prepared', {str(prep)!r}, '--output', "
        f"{str(out / 'scores')!r}, '--clip', 'tiny', '--quiet']) == 0\n"
    )


@pytest.fixture(scope="module")
def prep(tmp_path_factory):
    root = tmp_path_factory.mktemp("fresh")
    assert main(["prepare", "--subject", f"cat={EXAMPLE_CAT}", "--class-word", "cat=cat", "--prompt", PROMPT,
                 "--pretrained-model", "tiny", "--clip", "tiny", "--pin-clip", "--output", str(root / "prep"), "--quiet"]) == 0
    return root / "prep"


def _train_args(prep, model, out):
    return ["train", "--prepared", str(prep), "--pretrained-model", model, "--steps", "1", "--batch-size", "1",
            "--lora-rank", "2", "--output", str(out), "--quiet"]


@pytest.mark.parametrize("kind", ["tiny", "toyworld", "gs", "hub"])
def test_a_run_trained_elsewhere_samples_and_scores_on_a_fresh_machine(kind, prep, tmp_path, tiny_dir, request):
    run = tmp_path / "run"
    env = {}
    if kind == "gs":
        emulator = request.getfixturevalue("gcs_emulator")
        upload_folder(tiny_dir, "gs://palp-fresh-test/models/tiny-sd")
        model, env = "gs://palp-fresh-test/models/tiny-sd", {"STORAGE_EMULATOR_HOST": emulator}
    else:
        model = {"tiny": "tiny", "toyworld": "toyworld", "hub": HUB_ID}[kind]
    if kind == "hub":  # the trainer and the sampler each have the snapshot in their own hub cache
        for home in ("trainer-hf", "sampler-hf"):
            _hub_cache(tmp_path / home, tiny_dir)
        code = f"from palp.cli import main\nassert main({_train_args(prep, model, run)!r}) == 0\n"
        trained = _elsewhere(tmp_path, "trainer", code, hf_home=tmp_path / "trainer-hf")
        assert trained.returncode == 0, trained.stderr[-3000:]
        env["hf_home"] = tmp_path / "sampler-hf"
    else:
        assert main(_train_args(prep, model, run)) == 0
    config = json.loads((run / "training_config.json").read_text())
    assert config["pretrained_model"] == model and "base_model_path" not in config
    assert config["base_model_pin"].startswith({"tiny": "sha256:", "toyworld": "sha256:", "gs": "gcs:", "hub": "hub:"}[kind])
    if kind == "hub":
        assert config["base_model_pin"] == f"hub:{COMMIT}"

    done = _elsewhere(tmp_path, "sampler", _sample_and_score(run, prep, tmp_path), **env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "scores" / "scores.csv").is_file()
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
    done = _elsewhere(tmp_path, "sampler", _sample_and_score(run, prep, tmp_path), STORAGE_EMULATOR_HOST=gcs_emulator)
    assert done.returncode != 0
    assert "is not the one the run was trained with" in done.stderr and pin in done.stderr and uri in done.stderr
    assert not (tmp_path / "samples" / "samples.csv").exists()
