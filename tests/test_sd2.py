"""Stable Diffusion 2.x-shaped base models: the family read from the model's configs, PALP's
term for v-prediction (closed-form gradients written from docs/method.md's algebra), the
round trip through the stock diffusers pipeline, and the refusal of other families."""

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
from palp.method import guidance
from palp.method.step_inputs import Draws, encode_fixed_prompts, tokenize
from palp.models.base_model import ModelError, load_base_model, resolve_model_dir
from palp.models.personalize import build_personalized_model
from palp.models.tiny import TINY_SD2_NAME, TINY_SD2_V_NAME, tiny_model_dir
from palp.steps.train import step_losses

TARGET = "A sketch of [V] in Paris at night"
CLEAN = "A sketch of a cat in Paris at night"


@pytest.fixture(scope="module")
def v_dir():
    return tiny_model_dir(TINY_SD2_V_NAME)


# --- the family follows the model's configs -------------------------------------------------


def test_tiny_sd2_models_are_sd2_shaped_and_read_from_their_configs(v_dir):
    """What palp reads (resolution, prediction type, schedule, VAE scale) comes from each
    model's own files, which have SD 2.x's settings."""
    v, eps = load_base_model(TINY_SD2_V_NAME), load_base_model(TINY_SD2_NAME)
    assert (v.resolution, v.prediction_type) == (96, "v_prediction")
    assert (eps.resolution, eps.prediction_type) == (64, "epsilon")
    for base in (v, eps):
        te, unet = base.text_encoder.config, base.unet.config
        assert te.hidden_act == "gelu" and (te.bos_token_id, te.eos_token_id, te.pad_token_id) == (0, 2, 1)
        assert list(unet.attention_head_dim) == [4, 8] and unet.use_linear_projection
        assert base.tokenizer.pad_token == "!" and tokenize(base.tokenizer, ["a cat"])[0, -1] == 0
        assert base.vae.config.scaling_factor == 0.18215 and len(base.tokenizer) == 49408
        sched = base.noise_scheduler.config
        assert (sched.beta_schedule, sched.beta_start, sched.beta_end) == ("scaled_linear", 0.00085, 0.012)
    assert v.unet.config.upcast_attention and not eps.unet.config.upcast_attention
    stock = json.loads((v_dir / "scheduler" / "scheduler_config.json").read_text())
    assert stock["_class_name"] == "DDIMScheduler" and stock["prediction_type"] == "v_prediction"


def test_training_reads_the_prediction_type_from_the_models_scheduler_config(tmp_path, v_dir):
    """The same weights and draws, the scheduler config saying epsilon instead of v_prediction:
    the first step's reconstruction loss differs (it is MSE to v for one, to eps for the other),
    and the run records the model's resolution and prediction type."""
    flipped = tmp_path / "flipped"
    shutil.copytree(v_dir, flipped)
    config = flipped / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "prediction_type": "epsilon"}))
    rec = {}
    for name, model in (("v", TINY_SD2_V_NAME), ("eps", str(flipped))):
        out = tmp_path / name
        assert main(train_args(EXAMPLE_CAT, out, "--pretrained-model", model, "--method", "ti-db", steps=1)) == 0
        rec[name] = float(pd.read_csv(out / "metrics.csv")["rec_loss"][0])
        recorded = json.loads((out / "training_config.json").read_text())
        assert recorded["resolution"] == 96 and recorded["prediction_type"] == {"v": "v_prediction", "eps": "epsilon"}[name]
    assert abs(rec["v"] - rec["eps"]) > 1e-3 * rec["eps"], rec


def test_v_algebra_matches_diffusers_schedulers():
    """v_target is DDPMScheduler.get_velocity; x0 and eps come back from (z_t, v); a DDIM step
    from a v model's output equals the step from the eps it implies."""
    from diffusers import DDIMScheduler, DDPMScheduler

    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction")
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 6, 6, generator=g), torch.randn(3, 4, 6, 6, generator=g)
    t = torch.tensor([5, 400, 990])
    ab = sched.alphas_cumprod[t]
    z_t = sched.add_noise(x0, eps, t)
    v = guidance.v_target(x0=x0, noise=eps, alpha_bar=ab)
    torch.testing.assert_close(v, sched.get_velocity(x0, eps, t))
    torch.testing.assert_close(guidance.predict_x0_from_v(z_t=z_t, v=v, alpha_bar=ab), x0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(guidance.eps_from_v(z_t=z_t, v=v, alpha_bar=ab), eps, rtol=1e-5, atol=1e-5)
    kw = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False, set_alpha_to_one=False)
    dv, de = DDIMScheduler(**kw, prediction_type="v_prediction"), DDIMScheduler(**kw, prediction_type="epsilon")
    dv.set_timesteps(10), de.set_timesteps(10)
    step = int(dv.timesteps[3])
    a = dv.alphas_cumprod[torch.tensor([step])]
    x = z_t[:1]
    torch.testing.assert_close(dv.step(v[:1], step, x).prev_sample,
                               de.step(guidance.eps_from_v(z_t=x, v=v[:1], alpha_bar=a), step, x).prev_sample,
                               rtol=1e-5, atol=1e-5)


# --- PALP's term for v-prediction: closed-form gradients ------------------------------------


def make_cfg(**kw) -> TrainConfig:
    return TrainConfig(subjects=[Subject("[V]", "unused", "cat")], target_prompt=TARGET, output="unused",
                       pretrained_model=TINY_SD2_V_NAME, lora_rank=4, **kw)


@pytest.fixture(scope="module")
def v_setup(v_dir):
    torch.manual_seed(0)
    base = load_base_model(TINY_SD2_V_NAME)
    assert base.prediction_type == "v_prediction"
    model, _, _ = build_personalized_model(base, {"[V]": "cat"}, rank=4)
    with torch.no_grad():  # a LoRA and [V] away from their initial values, so both branches differ
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    B = 2
    g = torch.Generator().manual_seed(1)
    z0 = torch.randn(B, 4, 12, 12, generator=g)
    noise = torch.randn(B, 4, 12, 12, generator=g)
    other_noise = torch.randn(B, 4, 12, 12, generator=g)
    ids = tokenize(base.tokenizer, [to_token_prompt("A photo of [V]")] * B)
    return dict(base=base, model=model, params=model.trainable_parameters(), z0=z0, noise=noise,
                other_noise=other_noise, ids=ids, ab=base.noise_scheduler.alphas_cumprod)


def v_palp_grads(s, cfg, draws):
    model = s["model"]
    cond = encode_fixed_prompts(model, s["base"].tokenizer, cfg, "cpu")
    loss, _ = step_losses(model, z0=s["z0"], input_ids=s["ids"], draws=draws, cond=cond, alphas_cumprod=s["ab"], cfg=cfg,
                          prediction_type="v_prediction")
    return torch.autograd.grad(loss, s["params"])


def v_reference_grads(s, cfg, draws):
    """From the algebra alone, with separate UNet calls: Eq. 1 is ||v_theta - v||^2 with
    v = sqrt(a) eps - sqrt(1-a) z0 (autograd); the alignment term is w * delta * d x0_hat/d theta
    with x0_hat = sqrt(a) z_t - sqrt(1-a) v_theta taken with grad, delta formed from the guidance
    v predictions turned into eps = sqrt(1-a') x' + sqrt(a') v, and --rescale dividing the term by
    sqrt(1 - a_t) (the factor d x0_hat / d v_theta carries)."""
    unet, te, tok = s["base"].unet, s["base"].text_encoder, s["base"].tokenizer
    a = s["ab"][draws.t].view(-1, 1, 1, 1)
    z_t = a.sqrt() * s["z0"] + (1 - a).sqrt() * draws.noise
    states_p = te(s["ids"])[0]
    v_theta = unet(z_t, draws.t, encoder_hidden_states=states_p).sample
    v = a.sqrt() * draws.noise - (1 - a).sqrt() * s["z0"]
    grads = list(torch.autograd.grad(((v_theta - v) ** 2).mean(), s["params"], retain_graph=True))
    if cfg.method == "ti-db":
        return grads
    x0_hat = a.sqrt() * z_t - (1 - a).sqrt() * v_theta
    with torch.no_grad():
        a2 = s["ab"][draws.t_align].view(-1, 1, 1, 1)
        x2 = a2.sqrt() * x0_hat + (1 - a2).sqrt() * draws.noise_align

        def eps_on(text: str | None, states=None):
            states = states if states is not None else te(tokenize(tok, [text] * len(x2)))[0]
            return (1 - a2).sqrt() * x2 + a2.sqrt() * unet(x2, draws.t_align, encoder_hidden_states=states).sample

        unet.disable_adapters()
        pre_u, pre_c, pre_n = eps_on(""), eps_on(CLEAN), eps_on(cfg.negative_prompt)
        unet.enable_adapters()
        pers_u, pers_c = eps_on(""), eps_on(None, states_p)
        pretrained = pre_u + cfg.alpha * (pre_c - pre_u)
        if cfg.method == "palp":
            delta = pretrained - (pers_u + cfg.beta * (pers_c - pers_u))
        elif cfg.method == "sds":
            delta = pretrained - draws.noise_align
        else:  # nfsd
            d_d = torch.stack([pre_u[i] if draws.t_align[i] < 200 else pre_u[i] - pre_n[i] for i in range(len(x2))])
            delta = cfg.alpha * (pre_c - pre_u) + d_d
        scale = 1 / (1 - a).sqrt() if cfg.rescale else torch.ones_like(a)
    align = torch.autograd.grad(x0_hat, s["params"], grad_outputs=cfg.lam * delta * scale / v_theta.numel())
    return [g + al for g, al in zip(grads, align)]


def v_draws(s, t, t_align, same_noise=True):
    B = len(t)
    return Draws(index=torch.zeros(B, dtype=torch.long), latent_noise=torch.zeros_like(s["noise"]), t=torch.tensor(t),
                 noise=s["noise"], t_align=torch.tensor(t_align), noise_align=s["noise"] if same_noise else s["other_noise"])


@pytest.mark.parametrize(
    "kw, same_noise",
    [
        (dict(method="palp"), True),
        (dict(method="palp", rescale=False), True),
        (dict(method="palp", noise="iid", lam=0.5, beta=1.0), False),
        (dict(method="sds"), True),
        (dict(method="sds", rescale=False), True),
        (dict(method="nfsd"), True),
        (dict(method="nfsd", rescale=False), True),
        (dict(method="ti-db"), True),
    ],
    ids=["palp", "palp-no-rescale", "palp-iid-lambda-beta-1", "sds", "sds-no-rescale", "nfsd", "nfsd-no-rescale", "ti-db"],
)
def test_v_step_gradient_matches_closed_form(v_setup, kw, same_noise):
    cfg = make_cfg(**kw)
    draws = v_draws(v_setup, [150, 640], [90, 870], same_noise=same_noise)  # t' = 90 < 200: both NFSD branches
    actual = v_palp_grads(v_setup, cfg, draws)
    assert_grads_close(actual, v_reference_grads(v_setup, cfg, draws))
    if cfg.method != "ti-db":  # the alignment term is there and matters
        rec_only = v_reference_grads(v_setup, make_cfg(method="ti-db"), draws)
        diff = sum(float((a - r).norm()) for a, r in zip(actual, rec_only))
        assert diff > 1e-3 * sum(float(r.norm()) for r in rec_only)


def test_v_rescale_off_differs_by_sqrt_one_minus_alpha_bar(v_setup):
    """Per element the plain v term is the rescaled one times sqrt(1 - a_t), not the eps
    model's sqrt(1 - a_t)/sqrt(a_t): at t = 640 the two factors are far apart."""
    draws = v_draws(v_setup, [640, 640], [300, 300])
    rec = v_palp_grads(v_setup, make_cfg(method="ti-db"), draws)
    on = v_palp_grads(v_setup, make_cfg(method="palp", rescale=True), draws)
    off = v_palp_grads(v_setup, make_cfg(method="palp", rescale=False), draws)
    a = v_setup["ab"][640]
    factor = float((1 - a).sqrt())
    assert abs(factor - float((1 - a).sqrt() / a.sqrt())) > 1.0
    for r, g_on, g_off in zip(rec, on, off):
        expected = factor * (g_on - r)
        torch.testing.assert_close(g_off - r, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))


def test_v_model_trained_as_eps_model_gives_other_gradients(v_setup):
    """The prediction type matters: the same step read as an eps model's is not the v one."""
    draws = v_draws(v_setup, [150, 640], [90, 870])
    cfg = make_cfg(method="palp")
    model = v_setup["model"]
    cond = encode_fixed_prompts(model, v_setup["base"].tokenizer, cfg, "cpu")
    loss, _ = step_losses(model, z0=v_setup["z0"], input_ids=v_setup["ids"], draws=draws, cond=cond,
                          alphas_cumprod=v_setup["ab"], cfg=cfg)
    as_eps = torch.autograd.grad(loss, v_setup["params"])
    as_v = v_palp_grads(v_setup, cfg, draws)
    assert sum(float((a - b).norm()) for a, b in zip(as_eps, as_v)) > 1e-2 * sum(float(b.norm()) for b in as_v)


def test_eps_sd2_model_takes_the_eps_path(tmp_path):
    """tiny-sd2 (epsilon): its step is Eq. 1 to eps, exactly as SD 1.x's."""
    base = load_base_model(TINY_SD2_NAME)
    torch.manual_seed(0)
    model, _, _ = build_personalized_model(base, {"[V]": "cat"}, rank=4)
    g = torch.Generator().manual_seed(2)
    z0, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    draws = Draws(index=torch.zeros(2, dtype=torch.long), latent_noise=torch.zeros_like(noise), t=torch.tensor([100, 700]),
                  noise=noise, t_align=torch.tensor([100, 700]), noise_align=noise)
    cfg = make_cfg(method="ti-db")
    ids = tokenize(base.tokenizer, [to_token_prompt("A photo of [V]")] * 2)
    ab = base.noise_scheduler.alphas_cumprod
    loss, _ = step_losses(model, z0=z0, input_ids=ids, draws=draws, cond=encode_fixed_prompts(model, base.tokenizer, cfg, "cpu"),
                          alphas_cumprod=ab, cfg=cfg, prediction_type=base.prediction_type)
    a = ab[draws.t].view(-1, 1, 1, 1)
    eps = base.unet(a.sqrt() * z0 + (1 - a).sqrt() * noise, draws.t, encoder_hidden_states=base.text_encoder(ids)[0]).sample
    torch.testing.assert_close(loss, ((eps - noise) ** 2).mean())


def test_unknown_prediction_type_is_refused(v_setup):
    draws = v_draws(v_setup, [150, 640], [90, 870])
    with pytest.raises(ValueError, match="prediction_type must be one of epsilon, v_prediction, not 'sample'"):
        step_losses(v_setup["model"], z0=v_setup["z0"], input_ids=v_setup["ids"], draws=draws, cond=None,
                    alphas_cumprod=v_setup["ab"], cfg=make_cfg(method="ti-db"), prediction_type="sample")


# --- invariance ------------------------------------------------------------------------------


def test_zero_lora_and_class_word_token_leave_the_v_model_unchanged(v_dir):
    """Freshly built (LoRA B = 0, [V] initialised from "cat"), the personalized SD2-v model on
    "A photo of <v>" predicts what the untouched model predicts on "A photo of cat"."""
    base = load_base_model(TINY_SD2_V_NAME)
    untouched = load_base_model(TINY_SD2_V_NAME)
    model, _, _ = build_personalized_model(base, {"[V]": "cat"}, rank=4)
    x = torch.randn(2, 4, 12, 12, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([30, 800])
    with torch.no_grad():
        ours = model.predict(x, t, model.encode(tokenize(base.tokenizer, ["A photo of <v>"] * 2)))
        ref = untouched.unet(x, t, encoder_hidden_states=untouched.text_encoder(tokenize(untouched.tokenizer, ["A photo of cat"] * 2))[0]).sample
        other = untouched.unet(x, t, encoder_hidden_states=untouched.text_encoder(tokenize(untouched.tokenizer, ["A photo of dog"] * 2))[0]).sample
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    assert (ref - other).abs().max() > 1e-4  # the text reaches the prediction


# --- the stock round trip --------------------------------------------------------------------


@pytest.fixture(scope="module")
def v_run(tmp_path_factory, v_dir):
    """A short palp run on tiny-sd2-v with a large lr (visibly trained), sampled by ``palp sample``."""
    from palp.cli import build_parser, config_from_args
    from palp.steps.train import train

    root = tmp_path_factory.mktemp("sd2v")
    args = build_parser().parse_args(train_args(EXAMPLE_CAT, root / "run", "--pretrained-model", TINY_SD2_V_NAME,
                                                "--lr", "1e-2", steps=3))
    result = train(config_from_args(args), progress=False)
    assert main(["sample", "--model", str(root / "run"), "--output", str(root / "s"), "--num-samples", "2", "--steps", "4",
                 "--batch-size", "2", "--quiet"]) == 0
    return root, result


def test_v_run_round_trips_through_the_stock_pipeline(v_run, v_dir):
    v_run = v_run[0]
    """StableDiffusionPipeline.from_pretrained + DDIM from its scheduler config (v_prediction) +
    load_textual_inversion + load_lora_weights makes ``palp sample``'s images. They are compared
    within one 8-bit level, as for SD 1.x: the two loops are separate code (palp's keeps the
    scheduler's timesteps on the host, the stock one passes tensors; palp rounds to uint8 before
    the PNG, the stock floats are rounded here), so a last-bit float32 difference at a rounding
    boundary would move a pixel one level (on the CPU they agree exactly). Read as an eps model
    (the scheduler told epsilon), the images differ."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from safetensors.torch import load_file

    from palp.models.denoising import initial_latents

    rows = pd.read_csv(v_run / "s" / "samples.csv")
    assert len(rows) == 2
    pipe = StableDiffusionPipeline.from_pretrained(v_dir, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    pipe.set_progress_bar_config(disable=True)
    latents = initial_latents(list(rows["seed"]), (4, 12, 12))
    prompt = ["A sketch of <v> in Paris at night"] * 2
    embeds = load_file(v_run / "run" / "learned_embeds.safetensors")
    pipe.load_textual_inversion(list(embeds.values()), token=list(embeds))
    base = pipe(prompt, num_inference_steps=4, guidance_scale=7.5, latents=latents, output_type="np").images
    pipe.load_lora_weights(v_run / "run")
    stock = pipe(prompt, num_inference_steps=4, guidance_scale=7.5, latents=latents, output_type="np").images
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="epsilon")
    as_eps = pipe(prompt, num_inference_steps=4, guidance_scale=7.5, latents=latents, output_type="np").images
    for k, f in enumerate(rows["file"]):
        ours = np.asarray(Image.open(v_run / "s" / f), dtype=np.int16)
        assert ours.shape == (96, 96, 3)
        assert np.abs(ours - (stock[k] * 255).round()).max() <= 1
        assert np.abs(ours - (base[k] * 255).round()).mean() > 0.5  # the LoRA changes the picture
        assert np.abs(ours - (as_eps[k] * 255).round()).mean() > 0.5  # and the prediction type does


def test_v_run_unet_equals_stock_with_loaded_weights(v_run, v_dir):
    """The run's files, loaded by diffusers' loaders into the stock pipeline, predict what
    palp's trained model predicts."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    from palp.models.run_weights import EMBEDS_FILE

    root, result = v_run
    pipe = StableDiffusionPipeline.from_pretrained(v_dir)
    embeds = load_file(root / "run" / EMBEDS_FILE)
    pipe.load_textual_inversion(list(embeds.values()), token=list(embeds))
    x, t = torch.randn(2, 4, 12, 12, generator=torch.Generator().manual_seed(0)), torch.tensor([50, 700])
    prompt = ["A sketch of <v> in Paris at night"] * 2
    ids = tokenize(pipe.tokenizer, prompt)
    with torch.no_grad():
        before = pipe.unet(x, t, encoder_hidden_states=pipe.text_encoder(ids)[0]).sample
        pipe.load_lora_weights(root / "run")
        stock = pipe.unet(x, t, encoder_hidden_states=pipe.text_encoder(ids)[0]).sample
        ours = result.model.predict(x, t, result.model.encode(tokenize(result.tokenizer, prompt)))
    torch.testing.assert_close(stock, ours, rtol=1e-5, atol=1e-6)
    assert (stock - before).abs().max() > 1e-3  # the LoRA was trained and loaded


# --- refusals --------------------------------------------------------------------------------


def _edited(tmp_path, tiny_dir, name: str, path: str, **changes) -> str:
    folder = tmp_path / name
    shutil.copytree(tiny_dir, folder)
    f = folder / path
    f.write_text(json.dumps({**json.loads(f.read_text()), **changes}))
    return str(folder)


def test_an_unsupported_family_is_refused_with_exit_2_and_one_line(tmp_path, tiny_dir, capsys):
    sd3 = _edited(tmp_path, tiny_dir, "sd3", "model_index.json", _class_name="StableDiffusion3Pipeline",
                  text_encoder_3=["transformers", "T5EncoderModel"])
    capsys.readouterr()
    assert main(train_args(EXAMPLE_CAT, tmp_path / "run", "--pretrained-model", sd3)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("palp train: error:") and "is a StableDiffusion3Pipeline model" in err[0]
    assert "Stable Diffusion 1.x and 2.x (StableDiffusionPipeline) and Stable Diffusion XL" in err[0]
    assert not (tmp_path / "run").exists()
    assert main(["prepare", "--subject", f"cat={EXAMPLE_CAT}", "--class-word", "cat=cat", "--prompt", TARGET,
                 "--pretrained-model", sd3, "--output", str(tmp_path / "prep"), "--quiet"]) == 2
    assert "StableDiffusion3Pipeline" in capsys.readouterr().err


@pytest.mark.parametrize("path, changes, message", [
    ("model_index.json", {"_class_name": "StableDiffusion3Pipeline"}, "is a StableDiffusion3Pipeline model"),
    ("scheduler/scheduler_config.json", {"prediction_type": "sample"}, "prediction_type 'sample'"),
    ("unet/config.json", {"in_channels": 9}, "UNet takes 9 and gives 4 channels"),
    ("unet/config.json", {"addition_embed_type": "text_time"}, "added conditions (addition_embed_type: text_time)"),
], ids=["sd3", "sample-prediction", "inpainting", "sdxl-unet"])
def test_other_families_are_refused_naming_what_was_found(tmp_path, tiny_dir, path, changes, message):
    folder = _edited(tmp_path, tiny_dir, "m", path, **changes)
    with pytest.raises(ModelError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve_model_dir(folder)


def test_a_second_text_encoder_folder_alone_is_refused(tmp_path, tiny_dir):
    folder = tmp_path / "m"
    shutil.copytree(tiny_dir, folder)
    shutil.copytree(folder / "text_encoder", folder / "text_encoder_2")
    with pytest.raises(ModelError, match=r"second text encoder \(text_encoder_2\)"):
        resolve_model_dir(str(folder))


def test_an_sd3_hub_id_is_refused_from_its_model_index_alone(tmp_path, tiny_dir):
    """A hub repository whose model_index.json says SD3 is refused from that file, before its
    weights are fetched: here the cached snapshot holds nothing else, so a check made only after
    the full fetch would name the missing parts instead."""
    import os
    import subprocess
    import sys

    repo = tmp_path / "hf" / "hub" / "models--palp-test--tiny-sd3"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    index = json.loads((tiny_dir / "model_index.json").read_text())
    (snapshot / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusion3Pipeline",
                                                           "text_encoder_3": ["transformers", "T5EncoderModel"]}))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    code = ("from palp.models.base_model import resolve_model_dir, ModelError\n"
            "try:\n    resolve_model_dir('palp-test/tiny-sd3')\nexcept ModelError as e:\n    print(e)")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert "palp-test/tiny-sd3 is a StableDiffusion3Pipeline model; palp personalizes" in out.stdout, out
