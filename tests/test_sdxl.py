"""Stable Diffusion XL-shaped base models: the family read from the model's configs, the two
text encoders' conditioning checked against diffusers' own StableDiffusionXLPipeline code,
closed-form step gradients, invariance, and the round trip through the stock pipeline's loaders."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from conftest import EXAMPLE_CAT, assert_grads_close, train_args
from palp.cli import main
from palp.core.prompts import to_token_prompt
from palp.core.settings import Subject, TrainConfig
from palp.method.step_inputs import Draws, encode_fixed_prompts, tokenize
from palp.models.base_model import ModelError, load_base_model, resolve_model_dir
from palp.models.personalize import build_personalized_model
from palp.models.tiny import TINY_SDXL_NAME, tiny_model_dir
from palp.steps.train import step_losses

TARGET = "A sketch of [V] in Paris at night"
CLEAN = "A sketch of a cat in Paris at night"
SIDE = 128  # tiny-sdxl's resolution: latents 16x16


@pytest.fixture(scope="module")
def xl_dir():
    return tiny_model_dir(TINY_SDXL_NAME)


def stock_pipe(model_or_dir, **parts):
    """diffusers' StableDiffusionXLPipeline: from a folder, or over given components."""
    from diffusers import StableDiffusionXLPipeline

    if parts:
        return StableDiffusionXLPipeline(**parts, force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipe = StableDiffusionXLPipeline.from_pretrained(model_or_dir, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def stock_unet_inputs(pipe, prompts: list[str] | None, n: int) -> dict:
    """The UNet's text arguments as diffusers' own code makes them (encode_prompt and
    _get_add_time_ids at the model's resolution); ``prompts`` None: the unconditional rows."""
    cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(prompts or [""] * n, device="cpu", num_images_per_prompt=1,
                                                             do_classifier_free_guidance=True)
    if prompts is None:
        cond, pooled = uncond, uncond_pooled
    ids = pipe._get_add_time_ids((SIDE, SIDE), (0, 0), (SIDE, SIDE), dtype=cond.dtype,
                                 text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    return {"encoder_hidden_states": cond, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": ids.expand(n, -1)}}


# --- the family follows the model's configs -------------------------------------------------


def test_tiny_sdxl_is_sdxl_shaped_and_read_from_its_configs(xl_dir):
    base = load_base_model(TINY_SDXL_NAME)
    assert (base.family, base.resolution, base.prediction_type) == ("sdxl", SIDE, "epsilon")
    assert base.unet.config.addition_embed_type == "text_time" and base.force_zeros_for_empty_prompt
    assert base.unet.config.cross_attention_dim == base.text_encoder.config.hidden_size + base.text_encoder_2.config.hidden_size
    assert base.vae.config.scaling_factor == 0.13025
    assert base.tokenizer.second.pad_token == "!" and base.tokenizer.first.pad_token == "<|endoftext|>"
    ids = tokenize(base.tokenizer, ["a cat"])
    assert ids.shape == (1, 154) and ids[0, 76] == 49407 and ids[0, -1] == 0  # each tokenizer pads its own way
    index = json.loads((xl_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    scheduler = json.loads((xl_dir / "scheduler" / "scheduler_config.json").read_text())  # as SDXL base ships it
    assert scheduler["_class_name"] == "EulerDiscreteScheduler" and scheduler["timestep_spacing"] == "leading"
    assert scheduler["clip_sample"] is False and scheduler["set_alpha_to_one"] is False


def test_tiny_sdxl_is_rebuilt_bit_identical_and_its_pin_covers_the_second_encoder(tmp_path, xl_dir):
    """Built again elsewhere, tiny-sdxl has the same pin (so a run trained on one machine samples
    on another); the pin changes with a byte of the second encoder's weights or its tokenizer."""
    from palp.models.base_model import folder_pin, resolve_model
    from palp.models.tiny import save_tiny_model

    pin = resolve_model(TINY_SDXL_NAME).pin
    assert folder_pin(save_tiny_model(tmp_path / "again", name=TINY_SDXL_NAME)) == pin
    for part in ("text_encoder_2/model.safetensors", "tokenizer_2/tokenizer_config.json"):
        copy = tmp_path / part.split("/")[0]
        shutil.copytree(xl_dir, copy)
        f = copy / part
        f.write_bytes(f.read_bytes()[:-1] + bytes([f.read_bytes()[-1] ^ 1]))
        assert folder_pin(copy) != pin, part


@pytest.mark.parametrize("path, changes, message", [
    ("model_index.json", {"text_encoder_2": ["transformers", "CLIPTextModel"]}, "text_encoder_2 is ['transformers', 'CLIPTextModel']"),
    ("model_index.json", {"text_encoder": [None, None]}, "StableDiffusionXLPipeline model without text_encoder"),
    ("unet/config.json", {"addition_embed_type": None}, "does not take SDXL's added conditions"),
    ("unet/config.json", {"class_embed_type": "timestep"}, "added conditions (class_embed_type: timestep)"),
    ("model_index.json", {"_class_name": "StableDiffusionXLInpaintPipeline"}, "is a StableDiffusionXLInpaintPipeline model"),
], ids=["encoder-2-without-projection", "refiner", "unet-without-text-time", "class-embedding", "inpaint"])
def test_sdxl_variants_palp_does_not_train_are_refused(tmp_path, xl_dir, path, changes, message):
    folder = tmp_path / "m"
    shutil.copytree(xl_dir, folder)
    f = folder / path
    f.write_text(json.dumps({**json.loads(f.read_text()), **changes}))
    with pytest.raises(ModelError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        resolve_model_dir(str(folder))


def test_an_sdxl_folder_without_its_second_encoder_is_refused_exit_2_one_line(tmp_path, xl_dir, capsys):
    folder = tmp_path / "m"
    shutil.copytree(xl_dir, folder)
    shutil.rmtree(folder / "text_encoder_2")
    capsys.readouterr()
    assert main(train_args(EXAMPLE_CAT, tmp_path / "run", "--pretrained-model", str(folder))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing text_encoder_2 config, text_encoder_2 weights" in err[0], err


def test_custom_diffusion_on_sdxl_is_refused_exit_2_one_line(tmp_path, xl_dir, capsys):
    capsys.readouterr()
    argv = train_args(EXAMPLE_CAT, tmp_path / "run", "--pretrained-model", TINY_SDXL_NAME, "--method", "custom-diffusion")
    i = argv.index("--lora-rank")
    assert main(argv[:i] + argv[i + 2 :]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "Loading weights" not in line]  # transformers' bars
    assert len(err) == 1 and "tiny-sdxl is an SDXL model: --personalize custom-diffusion" in err[0], err
    assert not (tmp_path / "run").exists()


# --- the conditioning is the stock pipeline's --------------------------------------------------


@pytest.fixture(scope="module")
def xl_setup(xl_dir):
    torch.manual_seed(0)
    base = load_base_model(TINY_SDXL_NAME)
    model, _, _ = build_personalized_model(base, {"[V]": "cat"}, rank=4)
    with torch.no_grad():  # a LoRA and [V] away from their initial values, so both branches differ
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    z0, noise, other = (torch.randn(2, 4, 16, 16, generator=g) for _ in range(3))
    pipe = stock_pipe(None, vae=base.vae, text_encoder=base.text_encoder, text_encoder_2=base.text_encoder_2,
                      tokenizer=base.tokenizer.first, tokenizer_2=base.tokenizer.second, unet=base.unet,
                      scheduler=__import__("diffusers").DDIMScheduler.from_config(base.noise_scheduler.config))
    ids = tokenize(base.tokenizer, [to_token_prompt("A photo of [V]")] * 2)
    return dict(base=base, model=model, pipe=pipe, params=model.trainable_parameters(), z0=z0, noise=noise, other_noise=other,
                ids=ids, ab=base.noise_scheduler.alphas_cumprod)


def test_personalized_predictions_equal_the_stock_pipelines_conditioning(xl_setup):
    """palp's packed states, read by its UNet call, give what the UNet gives on the stock
    pipeline's encode_prompt (both encoders, penultimate layers, the second's pooled output) and
    time ids; the empty prompt's states are the zeros the stock pipeline uses."""
    s = xl_setup
    model, pipe = s["model"], s["pipe"]
    x, t = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(5)), torch.tensor([20, 900])
    prompt = ["A photo of <v>", "A photo of <v> on a beach"]
    with torch.no_grad():
        ours = model.predict(x, t, model.encode(tokenize(s["base"].tokenizer, prompt)))
        stock = pipe.unet(x, t, **stock_unet_inputs(pipe, prompt, 2)).sample
        ours_u = model.predict(x, t, model.encode_unconditional(tokenize(s["base"].tokenizer, ["", ""])))
        stock_u = pipe.unet(x, t, **stock_unet_inputs(pipe, None, 2)).sample
    torch.testing.assert_close(ours, stock, rtol=0, atol=0)
    torch.testing.assert_close(ours_u, stock_u, rtol=0, atol=0)
    assert (ours - ours_u).abs().max() > 1e-4


# --- closed-form gradients ---------------------------------------------------------------------


def make_cfg(**kw) -> TrainConfig:
    return TrainConfig(subjects=[Subject("[V]", "unused", "cat")], target_prompt=TARGET, output="unused",
                       pretrained_model=TINY_SDXL_NAME, lora_rank=4, **kw)


def reference_grads(s, cfg, draws):
    """From the algebra alone, with separate UNet calls on the stock pipeline's conditioning:
    Eq. 1 is ||eps_theta - eps||^2; the alignment term is lambda * delta * d x0_hat/d theta with
    x0_hat = (z_t - sqrt(1-a) eps_theta) / sqrt(a) taken with grad (Eq. 7), --rescale multiplying
    it by sqrt(a)/sqrt(1-a), delta = G^alpha(y_c; theta) - G^beta(y_P; theta_LoRA) (Eq. 6) with
    the empty prompt as SDXL's zeros."""
    pipe = s["pipe"]
    unet = pipe.unet
    a = s["ab"][draws.t].view(-1, 1, 1, 1)
    z_t = a.sqrt() * s["z0"] + (1 - a).sqrt() * draws.noise
    prompt = ["A photo of <v>"] * 2
    eps_theta = unet(z_t, draws.t, **stock_unet_inputs(pipe, prompt, 2)).sample  # the [V] rows with grad
    grads = list(torch.autograd.grad(((eps_theta - draws.noise) ** 2).mean(), s["params"], retain_graph=True))
    if cfg.method == "ti-db":
        return grads
    x0_hat = (z_t - (1 - a).sqrt() * eps_theta) / a.sqrt()
    with torch.no_grad():
        a2 = s["ab"][draws.t_align].view(-1, 1, 1, 1)
        x2 = a2.sqrt() * x0_hat + (1 - a2).sqrt() * draws.noise_align
        unet.disable_adapters()
        pre_u = unet(x2, draws.t_align, **stock_unet_inputs(pipe, None, 2)).sample
        pre_c = unet(x2, draws.t_align, **stock_unet_inputs(pipe, [CLEAN] * 2, 2)).sample
        unet.enable_adapters()
        pers_u = unet(x2, draws.t_align, **stock_unet_inputs(pipe, None, 2)).sample
        pers_c = unet(x2, draws.t_align, **stock_unet_inputs(pipe, prompt, 2)).sample
        delta = pre_u + cfg.alpha * (pre_c - pre_u) - (pers_u + cfg.beta * (pers_c - pers_u))
        scale = a.sqrt() / (1 - a).sqrt() if cfg.rescale else torch.ones_like(a)
    align = torch.autograd.grad(x0_hat, s["params"], grad_outputs=cfg.lam * delta * scale / eps_theta.numel())
    return [g + al for g, al in zip(grads, align)]


@pytest.mark.parametrize("kw", [dict(method="palp"), dict(method="palp", rescale=False, beta=2.0), dict(method="ti-db")],
                         ids=["palp", "palp-no-rescale-beta-2", "ti-db"])
def test_sdxl_step_gradient_matches_closed_form(xl_setup, kw):
    s = xl_setup
    cfg = make_cfg(**kw)
    draws = Draws(index=torch.zeros(2, dtype=torch.long), latent_noise=torch.zeros_like(s["noise"]), t=torch.tensor([150, 640]),
                  noise=s["noise"], t_align=torch.tensor([90, 870]), noise_align=s["noise"])
    cond = encode_fixed_prompts(s["model"], s["base"].tokenizer, cfg, "cpu")
    loss, _ = step_losses(s["model"], z0=s["z0"], input_ids=s["ids"], draws=draws, cond=cond, alphas_cumprod=s["ab"], cfg=cfg)
    actual = torch.autograd.grad(loss, s["params"])
    assert_grads_close(actual, reference_grads(s, cfg, draws))
    rows_2 = s["model"].placeholder_embedding_2.learned
    assert float(actual[[p is rows_2 for p in s["params"]].index(True)].norm()) > 0  # [V] learns in the second encoder too


# --- invariance --------------------------------------------------------------------------------


def test_zero_lora_and_class_word_token_leave_sdxl_unchanged(tmp_path, xl_dir):
    """Freshly built (LoRA B = 0, [V] initialised from "cat" in both encoders), the personalized
    model on "A photo of <v>" predicts what the untouched model predicts on "A photo of cat".

    SDXL's second encoder config keeps CLIP's legacy eos_token_id 2, with which transformers pools
    at the highest token id, which an added token is: as shipped (and as the stock pipeline
    reads it) the pooled embedding is the <v> position's, which is "cat"'s, not the end token's.
    With the corrected eos id (49407) the whole prediction is unchanged."""
    fixed = tmp_path / "fixed"
    shutil.copytree(xl_dir, fixed)
    cfg_file = fixed / "text_encoder_2" / "config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "eos_token_id": 49407}))
    x, t = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3)), torch.tensor([30, 800])
    for model_dir in (str(fixed), TINY_SDXL_NAME):
        base, untouched = load_base_model(model_dir), load_base_model(model_dir)
        model, _, _ = build_personalized_model(base, {"[V]": "cat"}, rank=4)
        pipe = stock_pipe(None, vae=untouched.vae, text_encoder=untouched.text_encoder,
                          text_encoder_2=untouched.text_encoder_2, tokenizer=untouched.tokenizer.first,
                          tokenizer_2=untouched.tokenizer.second, unet=untouched.unet, scheduler=untouched.noise_scheduler)
        with torch.no_grad():
            states = model.encode(tokenize(base.tokenizer, ["A photo of <v>"] * 2))
            ref = stock_unet_inputs(pipe, ["A photo of cat"] * 2, 2)
            torch.testing.assert_close(states[:, :-1], ref["encoder_hidden_states"], rtol=0, atol=0)
            if model_dir == TINY_SDXL_NAME:
                out = untouched.text_encoder_2(tokenize(untouched.tokenizer.second, ["A photo of cat"] * 2))
                cat_position = untouched.text_encoder_2.text_projection(out.last_hidden_state[:, 4])
                torch.testing.assert_close(states[:, -1, :32], cat_position, rtol=0, atol=0)
                assert (cat_position - ref["added_cond_kwargs"]["text_embeds"]).abs().max() > 1e-4
                continue
            ours = model.predict(x, t, states)
            stock = untouched.unet(x, t, **ref).sample
            other = untouched.unet(x, t, **stock_unet_inputs(pipe, ["A photo of dog"] * 2, 2)).sample
        torch.testing.assert_close(ours, stock, rtol=0, atol=0)
        assert (stock - other).abs().max() > 1e-4  # the text reaches the prediction


# --- the stock round trip ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def xl_run(tmp_path_factory, xl_dir):
    """A short palp run on tiny-sdxl with a large lr (visibly trained), sampled by ``palp sample``."""
    from palp.cli import build_parser, config_from_args
    from palp.steps.train import train

    root = tmp_path_factory.mktemp("sdxl")
    args = build_parser().parse_args(train_args(EXAMPLE_CAT, root / "run", "--pretrained-model", TINY_SDXL_NAME,
                                                "--lr", "1e-2", "--validation-every", "3", "--validation-images", "2",
                                                "--validation-steps", "4", steps=3))
    result = train(config_from_args(args), progress=False)
    assert main(["sample", "--model", str(root / "run"), "--output", str(root / "s"), "--num-samples", "2", "--steps", "4",
                 "--batch-size", "2", "--quiet"]) == 0
    return root, result


def load_stock(pipe, run) -> None:
    """The run's files into a stock SDXL pipeline, exactly as docs/training.md shows."""
    from safetensors.torch import load_file

    pipe.load_lora_weights(run)
    sd = load_file(run / "learned_embeds.safetensors")
    pipe.load_textual_inversion(sd["clip_l"], token="<v>", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(sd["clip_g"], token="<v>", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)


def test_sdxl_run_round_trips_through_the_stock_pipeline(xl_run, xl_dir):
    """StableDiffusionXLPipeline.from_pretrained + DDIM from its scheduler config +
    load_lora_weights + load_textual_inversion of clip_l and clip_g makes ``palp sample``'s
    images, within one 8-bit level: the loops are separate code (palp rounds to uint8 before the
    PNG, the stock floats are rounded here), so a last-bit float32 difference at a rounding
    boundary could move a pixel one level. Without the run's files the images differ."""
    from diffusers import DDIMScheduler

    from palp.models.denoising import initial_latents

    root, _ = xl_run
    rows = pd.read_csv(root / "s" / "samples.csv")
    assert len(rows) == 2
    pipe = stock_pipe(xl_dir)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    latents = initial_latents(list(rows["seed"]), (4, 16, 16))
    prompt = ["A sketch of <v> in Paris at night"] * 2
    load_stock(pipe, root / "run")
    stock = pipe(prompt, num_inference_steps=4, guidance_scale=7.5, latents=latents, output_type="np").images
    pipe.unload_lora_weights()
    base = pipe(prompt, num_inference_steps=4, guidance_scale=7.5, latents=latents, output_type="np").images
    for k, f in enumerate(rows["file"]):
        ours = np.asarray(Image.open(root / "s" / f), dtype=np.int16)
        assert ours.shape == (SIDE, SIDE, 3)
        assert np.abs(ours - (stock[k] * 255).round()).max() <= 1
        assert np.abs(ours - (base[k] * 255).round()).mean() > 0.5  # the LoRA changes the picture


def test_sdxl_run_unet_equals_stock_with_loaded_weights(xl_run, xl_dir):
    """The run's files, loaded by diffusers' loaders into the stock pipeline, predict what palp's
    trained model predicts; the files hold clip_l and clip_g rows of the encoders' widths."""
    from safetensors import safe_open

    root, result = xl_run
    with safe_open(str(root / "run" / "learned_embeds.safetensors"), framework="pt") as f:
        assert {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()} == {"clip_l": (1, 32), "clip_g": (1, 32)}
        assert json.loads(f.metadata()["tokens"]) == ["<v>"]
    pipe = stock_pipe(xl_dir)
    x, t = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([50, 700])
    prompt = ["A sketch of <v> in Paris at night"] * 2
    load_stock(pipe, root / "run")
    with torch.no_grad():
        stock = pipe.unet(x, t, **stock_unet_inputs(pipe, prompt, 2)).sample
        ours = result.model.predict(x, t, result.model.encode(tokenize(result.tokenizer, prompt)))
        pipe.unload_lora_weights()
        before = pipe.unet(x, t, **stock_unet_inputs(pipe, prompt, 2)).sample
    torch.testing.assert_close(stock, ours, rtol=1e-5, atol=1e-6)
    assert (stock - before).abs().max() > 1e-3  # the LoRA was trained and loaded


def test_sdxl_validation_images_are_the_stock_pipelines(xl_run, xl_dir):
    """Training's validation grid (palp's own DDIM loop over the model being trained) equals the
    stock pipeline's images of the final weights from the same seeds' noise, within one 8-bit
    level (separate loops, rounded separately), and the run's page embeds the grid."""
    from diffusers import DDIMScheduler

    from palp.core.settings import SampleSettings
    from palp.models.denoising import initial_latents

    root, _ = xl_run
    (entry,) = json.loads((root / "run" / "validation" / "index.json").read_text())
    assert entry["step"] == 3 and entry["seeds"] == [0, 1] and entry["steps"] == 4
    grid = np.asarray(Image.open(root / "run" / "validation" / entry["file"]), dtype=np.int16)
    assert grid.shape == (SIDE, 2 * SIDE, 3)
    pipe = stock_pipe(xl_dir)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    load_stock(pipe, root / "run")
    stock = pipe(["A sketch of <v> in Paris at night"] * 2, num_inference_steps=4, guidance_scale=SampleSettings.guidance,
                 latents=initial_latents([0, 1], (4, 16, 16)), output_type="np").images
    for k in range(2):
        assert np.abs(grid[:, k * SIDE : (k + 1) * SIDE] - (stock[k] * 255).round()).max() <= 1
