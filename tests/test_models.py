"""The base-model loader and the tiny model: real layouts, stock loaders, clear errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import upload_folder
from palp.models.base_model import ModelError, load_base_model, resolve_model_dir
from palp.models.tiny import save_tiny_model


def test_tiny_model_loads_with_stock_pipeline(tiny_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir)
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert pipe.vae_scale_factor == 8 and pipe.vae.config.latent_channels == 4
    assert len(pipe.tokenizer) == 49408
    s = pipe.scheduler.config
    assert (s.beta_schedule, s.beta_start, s.beta_end, s.num_train_timesteps) == ("scaled_linear", 0.00085, 0.012, 1000)
    image = pipe("a cat", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 64, 64, 3)


def test_tiny_tokenizer_is_clips_bpe(tiny_dir):
    """SD-1.x's tokenizer is CLIP's BPE: the same ids as open_clip's own tokenizer."""
    import open_clip
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tiny_dir, subfolder="tokenizer")
    for text in ["A sketch of a cat in Paris at night", "an oil painting, 19th-century portrait!", "Zürich café"]:
        ours = tok(text, padding="max_length", max_length=77).input_ids
        ref = open_clip.tokenize([text])[0].tolist()
        ref = [49407 if (i > 0 and x == 0) else x for i, x in enumerate(ref)]  # open_clip pads with 0
        assert ours == ref, text


def test_tiny_model_is_seeded(tmp_path, tiny_dir):
    from safetensors.torch import load_file

    again = save_tiny_model(tmp_path / "again")
    a = load_file(tiny_dir / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(again / "unet" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_load_base_model_from_local_dir(tiny_dir):
    base = load_base_model(str(tiny_dir))
    assert base.resolution == 64 and base.path == tiny_dir
    assert float(base.noise_scheduler.alphas_cumprod[0]) == pytest.approx(1 - 0.00085)


def test_a_sharded_model_folder_loads_with_the_same_weights(tmp_path, tiny_dir):
    """save_pretrained with max_shard_size (numbered shards and an index per component) is a
    Stable Diffusion folder too: palp loads it with the weights of the unsharded one, and pins it."""
    from diffusers import StableDiffusionPipeline

    from palp.models.base_model import loaded_files

    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir, safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    pipe.save_pretrained(tmp_path / "sharded", safe_serialization=True, max_shard_size="100KB")
    sharded = tmp_path / "sharded"
    for part in ("unet/diffusion_pytorch_model", "text_encoder/model"):
        assert not (sharded / f"{part}.safetensors").exists() and (sharded / f"{part}.safetensors.index.json").exists()
        assert len(list(sharded.glob(f"{part}-*-of-*.safetensors"))) > 1
    whole, split = load_base_model(str(tiny_dir)), load_base_model(str(sharded))
    for a, b in ((whole.unet, split.unet), (whole.text_encoder, split.text_encoder), (whole.vae, split.vae)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    files = [p.relative_to(sharded).as_posix() for p in sharded.rglob("*") if p.is_file()]
    pinned = set(loaded_files(files))
    assert "unet/diffusion_pytorch_model.safetensors.index.json" in pinned
    assert {f for f in files if f.startswith("unet/diffusion_pytorch_model-")} <= pinned


def test_not_an_sd_layout_names_what_is_missing(tmp_path, tiny_dir):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    shutil.rmtree(broken / "vae")
    (broken / "text_encoder" / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="missing vae config, vae weights, text_encoder weights"):
        resolve_model_dir(str(broken))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="missing model_index.json, unet config"):
        resolve_model_dir(str(tmp_path / "empty"))


@pytest.mark.parametrize("spec", ["./no/such/model", "/no/such/dir", "not a model"])
def test_unknown_path_is_a_clear_error(spec):
    with pytest.raises(ModelError, match="not found"):
        resolve_model_dir(spec)


def _hub_env(tmp_path) -> dict:
    return {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}


def test_hub_id_resolves_from_the_hub_cache(tmp_path, tiny_dir):
    """The hub branch is huggingface_hub's snapshot_download: a cached snapshot is found offline."""
    repo = tmp_path / "hf" / "hub" / "models--palp-test--tiny-sd"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    code = "from palp.models.base_model import resolve_model_dir; print(resolve_model_dir('palp-test/tiny-sd'))"
    out = subprocess.run([sys.executable, "-c", code], env=_hub_env(tmp_path), capture_output=True, text=True, check=True)
    assert Path(out.stdout.strip()) == repo / "snapshots" / commit


def test_unknown_hub_id_is_a_clear_error(tmp_path):
    code = (
        "from palp.models.base_model import resolve_model_dir, ModelError\n"
        "try:\n    resolve_model_dir('nobody-here/no-such-model')\nexcept ModelError as e:\n    print(e)"
    )
    out = subprocess.run([sys.executable, "-c", code], env=_hub_env(tmp_path), capture_output=True, text=True, check=True)
    assert "'nobody-here/no-such-model' is not a local directory and could not be fetched" in out.stdout


def test_gcs_prefix_is_fetched_and_loaded(gcs_emulator, tiny_dir, tmp_path):
    """gs:// through the real google-cloud-storage client against a real emulator server."""
    upload_folder(tiny_dir, "gs://palp-models-test/models/tiny-sd")
    local = resolve_model_dir("gs://palp-models-test/models/tiny-sd", cache_dir=tmp_path / "cache")
    assert local.is_relative_to(tmp_path / "cache")
    assert json.loads((local / "model_index.json").read_text()) == json.loads((tiny_dir / "model_index.json").read_text())
    assert (local / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == (
        tiny_dir / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    with pytest.raises(Exception, match="nothing found under gs://palp-models-test/models/nope"):
        resolve_model_dir("gs://palp-models-test/models/nope", cache_dir=tmp_path / "cache")
