"""Pins of the exact weights: the base model a run was trained on, the CLIP a dataset was prepared with."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import EXAMPLE_CAT, upload_folder
from palp.cli import main
from palp.models.base_model import ModelError, load_base_model, portable_reference, resolve_model, resolve_model_dir

UNET = "unet/diffusion_pytorch_model.safetensors"
PROMPT = "A sketch of [V] in Paris at night"


def _flip_last_byte(path: Path) -> bytes:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # the end of the tensor data, not the safetensors header
    path.write_bytes(bytes(data))
    return bytes(data)


# -- local folders, tiny -----------------------------------------------------------------------

def test_local_pin_follows_the_loaded_files_only(tmp_path, tiny_dir):
    a, b = tmp_path / "a", tmp_path / "elsewhere" / "b"
    shutil.copytree(tiny_dir, a)
    shutil.copytree(tiny_dir, b)
    pin = resolve_model("tiny").pin
    assert pin.startswith("sha256:") and len(pin) == len("sha256:") + 64
    assert resolve_model(str(a)).pin == resolve_model(str(b)).pin == resolve_model(str(tiny_dir)).pin == pin
    # Beside the model, not part of what palp loads: a README, a safety checker, an fp16 variant.
    (b / "README.md").write_text("# a model card\n")
    (b / "safety_checker").mkdir()
    (b / "safety_checker" / "model.safetensors").write_bytes(b"not loaded")
    shutil.copy(b / UNET, b / "unet" / "diffusion_pytorch_model.fp16.safetensors")
    assert resolve_model(str(b)).pin == pin
    # One byte of the UNet's weights.
    _flip_last_byte(b / UNET)
    changed = resolve_model(str(b)).pin
    assert changed != pin and changed.startswith("sha256:")
    assert resolve_model(str(b), pin=changed).path == b
    with pytest.raises(ModelError) as e:
        resolve_model(str(b), pin=pin)
    message = str(e.value)
    assert str(b) in message and pin in message and changed in message
    assert "restore those exact weights" in message and "retrain" in message


def test_load_base_model_carries_the_pin(tiny_dir):
    base = load_base_model("tiny")
    assert base.pin == resolve_model("tiny").pin == resolve_model(str(tiny_dir)).pin
    assert resolve_model_dir("tiny") == base.path == tiny_dir


def test_toyworld_is_pinned():
    r = resolve_model("toyworld")
    assert r.pin.startswith("sha256:") and resolve_model("toyworld", pin=r.pin).path == r.path


def test_portable_reference(tmp_path, tiny_dir, monkeypatch):
    shutil.copytree(tiny_dir, tmp_path / "models" / "mine")
    monkeypatch.chdir(tmp_path)
    assert portable_reference("models/mine") == str(tmp_path / "models" / "mine")
    assert portable_reference("./models/../models/mine") == str(tmp_path / "models" / "mine")
    for spec in ["tiny", "toyworld", "gs://bucket/models/sd", "CompVis/stable-diffusion-v1-4"]:
        assert portable_reference(spec) == spec
    assert resolve_model(portable_reference("models/mine")).pin == resolve_model("tiny").pin


# -- gs:// ---------------------------------------------------------------------------------------

def test_gcs_pin_follows_generations_and_keys_the_cache(gcs_emulator, tiny_dir, tmp_path):
    from palp.core.gcs import gcs_client

    uri, cache = "gs://palp-pins-test/models/tiny-sd", tmp_path / "cache"
    upload_folder(tiny_dir, uri)
    first = resolve_model(uri, cache_dir=cache)
    assert first.pin.startswith("gcs:") and first.path.is_relative_to(cache)
    assert (first.path / UNET).read_bytes() == (tiny_dir / UNET).read_bytes()
    assert resolve_model(uri, cache_dir=cache, pin=first.pin) == first
    # An object palp does not load changes nothing.
    bucket = gcs_client().bucket("palp-pins-test")
    bucket.blob("models/tiny-sd/README.md").upload_from_string(b"# card")
    assert resolve_model(uri, cache_dir=cache).pin == first.pin
    # The UNet's weights replaced under the same name.
    local = tmp_path / "new-unet.safetensors"
    shutil.copy(tiny_dir / UNET, local)
    new_bytes = _flip_last_byte(local)
    bucket.blob(f"models/tiny-sd/{UNET}").upload_from_filename(str(local))
    folders = sorted((cache / "gcs").iterdir())
    with pytest.raises(ModelError) as e:  # refused before anything is downloaded
        resolve_model(uri, cache_dir=cache, pin=first.pin)
    assert first.pin in str(e.value) and uri in str(e.value) and "retrain" in str(e.value)
    assert sorted((cache / "gcs").iterdir()) == folders
    second = resolve_model(uri, cache_dir=cache)
    assert second.pin not in (first.pin, "") and second.path != first.path
    assert (second.path / UNET).read_bytes() == new_bytes  # the new bytes, not the stale cache
    assert (first.path / UNET).read_bytes() == (tiny_dir / UNET).read_bytes()
    assert resolve_model_dir(uri, cache_dir=cache) == second.path


def test_gcs_object_replaced_mid_download_leaves_nothing(gcs_emulator, tiny_dir, tmp_path, monkeypatch):
    import palp.models.base_model as models
    from palp.core.gcs import gcs_client

    uri, cache = "gs://palp-pins-test/models/racy", tmp_path / "cache"
    upload_folder(tiny_dir, uri)
    real, calls = models._download_generation, []

    def download_then_replace(u, generation, dest):
        real(u, generation, dest)
        if not calls:
            gcs_client().bucket("palp-pins-test").blob("models/racy/model_index.json").upload_from_string(b"{}")
        calls.append(u)

    monkeypatch.setattr(models, "_download_generation", download_then_replace)
    with pytest.raises(ModelError, match="changed while it was being downloaded"):
        resolve_model(uri, cache_dir=cache)
    assert not [p for p in (cache / "gcs").iterdir() if not p.name.startswith(".")]


# -- the Hugging Face hub -------------------------------------------------------------------------

def test_pinned_hub_revision_resolves_offline_and_a_missing_one_is_clear(tmp_path, tiny_dir):
    repo = tmp_path / "hf" / "hub" / "models--palp-test--tiny-sd"
    old, new, gone = "1" * 40, "2" * 40, "3" * 40
    shutil.copytree(tiny_dir, repo / "snapshots" / old)
    shutil.copytree(tiny_dir, repo / "snapshots" / new)
    _flip_last_byte(repo / "snapshots" / new / UNET)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(new)
    code = f"""
import json
from palp.models.base_model import ModelError, resolve_model
out = {{"main": resolve_model("palp-test/tiny-sd").pin, "old": str(resolve_model("palp-test/tiny-sd", pin="hub:{old}").path)}}
try:
    resolve_model("palp-test/tiny-sd", pin="hub:{gone}")
except ModelError as e:
    out["gone"] = str(e)
print(json.dumps(out))
"""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    out = json.loads(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout)
    assert out["main"] == f"hub:{new}"
    assert Path(out["old"]) == repo / "snapshots" / old
    assert gone in out["gone"] and f"hub:{old}" in out["gone"] and f"hub:{new}" in out["gone"]
    assert "palp-test/tiny-sd" in out["gone"] and "retrain" in out["gone"]


# -- a trained run, and the CLIP of prepare and score ------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A dataset prepared with a pinned tiny CLIP, a 1-step run on it, and 2 samples of the run."""
    root = tmp_path_factory.mktemp("pins")
    assert main(["prepare", "--subject", f"cat={EXAMPLE_CAT}", "--class-word", "cat=cat", "--prompt", PROMPT,
                 "--pretrained-model", "tiny", "--clip", "tiny", "--pin-clip", "--output", str(root / "prep"), "--quiet"]) == 0
    assert main(["train", "--prepared", str(root / "prep"), "--pretrained-model", "tiny", "--steps", "1", "--batch-size", "2",
                 "--lora-rank", "4", "--output", str(root / "run"), "--quiet"]) == 0
    assert main(["sample", "--model", str(root / "run"), "--output", str(root / "samples"), "--num-samples", "2",
                 "--steps", "2", "--quiet"]) == 0
    return root


def test_trained_run_records_a_portable_reference_and_its_pin(trained):
    config = json.loads((trained / "run" / "training_config.json").read_text())
    assert "base_model_path" not in config
    assert config["pretrained_model"] == "tiny"
    assert config["base_model_pin"] == resolve_model("tiny").pin
    assert resolve_model(config["pretrained_model"], pin=config["base_model_pin"]).path == resolve_model_dir("tiny")


def test_clip_pins(tmp_path):
    from palp.models.clip import clip_pin, tiny_clip_dir

    pin = clip_pin("tiny")
    assert pin.startswith("sha256:") and clip_pin("tiny", "openai") == pin  # tiny carries its weights
    copy = tmp_path / "clip"
    shutil.copytree(tiny_clip_dir(), copy)
    (copy / "README.md").write_text("a card")
    assert clip_pin(f"local-dir:{copy}") == pin
    _flip_last_byte(copy / "open_clip_model.safetensors")
    assert clip_pin(f"local-dir:{copy}") != pin
    assert clip_pin("toyworld").startswith("sha256:") and clip_pin("toyworld") != pin
    checkpoint = tmp_path / "weights.safetensors"
    checkpoint.write_bytes(b"any checkpoint bytes")
    assert clip_pin("ViT-B-32", str(checkpoint)) == "sha256:" + hashlib.sha256(b"any checkpoint bytes").hexdigest()


def test_open_clip_tag_pins_the_file_it_downloads(tmp_path):
    """`openai` is the file open_clip fetches (here from an offline hub cache): its sha256."""
    repo = tmp_path / "hf" / "hub" / "models--timm--vit_base_patch32_clip_224.openai"
    commit = "4" * 40
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "open_clip_model.safetensors").write_bytes(b"stand-in weights")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    code = "from palp.models.clip import clip_pin; print(clip_pin('ViT-B-32', 'openai'))"
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "sha256:" + hashlib.sha256(b"stand-in weights").hexdigest()


def test_gcs_clip_checkpoint_is_cached_by_generation(gcs_emulator, tmp_path, monkeypatch):
    import open_clip

    from palp.core.gcs import gcs_client
    from palp.models.clip import load_clip, resolve_clip

    client = gcs_client()
    bucket = client.lookup_bucket("palp-clip-test") or client.create_bucket("palp-clip-test")
    uri = "gs://palp-clip-test/clip/weights.safetensors"
    bucket.blob("clip/weights.safetensors").upload_from_string(b"first")
    first = resolve_clip("ViT-B-32", uri)
    assert first.pin.startswith("gcs:") and Path(first.pretrained).read_bytes() == b"first"
    assert first.record() == {"model": "ViT-B-32", "weights": uri, "pin": first.pin}
    bucket.blob("clip/weights.safetensors").upload_from_string(b"second")
    second = resolve_clip("ViT-B-32", uri)
    assert second.pin != first.pin and Path(second.pretrained).read_bytes() == b"second"
    assert Path(first.pretrained).read_bytes() == b"first"
    # load_clip hands open_clip the downloaded file.
    seen = {}

    def fake_create(name, pretrained=None, device="cpu"):
        seen.update(name=name, pretrained=pretrained)
        raise RuntimeError("stop here")

    monkeypatch.setattr(open_clip, "create_model_and_transforms", fake_create)
    with pytest.raises(Exception, match="stop here"):
        load_clip("ViT-B-32", uri)
    assert seen["name"] == "ViT-B-32" and Path(seen["pretrained"]).read_bytes() == b"second"


def test_prepare_records_the_clip_and_score_checks_it(trained, tmp_path, capsys):
    from palp.models.clip import clip_pin

    manifest = json.loads((trained / "prep" / "manifest.json").read_text())
    assert manifest["clip"] == {"model": "tiny", "weights": None, "pin": clip_pin("tiny")}
    argv = ["score", "--samples", str(trained / "samples"), "--clip", "tiny", "--quiet"]
    assert main([*argv, "--prepared", str(trained / "prep"), "--output", str(tmp_path / "ok")]) == 0
    # The same dataset, recorded with other tiny-CLIP weights.
    other = tmp_path / "prep"
    shutil.copytree(trained / "prep", other)
    recorded = "sha256:" + "0" * 64
    manifest["clip"]["pin"] = recorded
    (other / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert main([*argv, "--prepared", str(other), "--output", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert recorded in err and clip_pin("tiny") in err and "CLIP tiny" in err and "prepare the dataset again" in err
    assert not (tmp_path / "bad" / "scores.csv").exists()
    # Another CLIP than the recorded one is not compared.
    assert main([*argv[:-3], "--clip", "toyworld", "--quiet", "--prepared", str(other), "--output", str(tmp_path / "toy")]) == 0


def test_prepare_records_the_clip_that_derives_class_words(tmp_path, cat_images):
    from palp.models.clip import clip_pin

    assert main(["prepare", "--subject", f"cat={cat_images}", "--prompt", "A sketch of [V]", "--pretrained-model", "tiny",
                 "--clip", "tiny", "--output", str(tmp_path / "out"), "--quiet"]) == 0
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["clip"]["pin"] == clip_pin("tiny")
    assert main(["prepare", "--subject", f"cat={cat_images}", "--class-word", "cat=cat", "--prompt", "A sketch of [V]",
                 "--pretrained-model", "tiny", "--output", str(tmp_path / "words"), "--quiet"]) == 0
    assert "clip" not in json.loads((tmp_path / "words" / "manifest.json").read_text())
