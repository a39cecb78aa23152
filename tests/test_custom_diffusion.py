"""Custom Diffusion as a personalization (--personalize custom-diffusion, --method custom-diffusion).

Each check has its own truth: the stock base model (invariance, frozen weights), diffusers' own
CustomDiffusionAttnProcessor holding W0 + D (the gradient, with Eq. 6/7's closed form written as
in tests/test_gradients.py), and an uninterrupted run (resume).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO
from palp.cli import main
from palp.core.prompts import to_token_prompt
from palp.core.settings import ConfigError, Subject, TrainConfig, method_label, split_method, split_variant
from palp.method.step_inputs import Draws, encode_fixed_prompts, tokenize
from palp.models.base_model import load_base_model
from palp.models.custom_diffusion import (CUSTOM_DIFFUSION_FILE, CustomDiffusionLinear, cross_attention_layers,
                                          custom_diffusion_processors)
from palp.models.personalize import build_personalized_model
from palp.models.run_weights import EMBEDS_FILE
from palp.steps.train import step_losses

TARGET = "A sketch of [V] in Paris at night"
CLEAN = "A sketch of a cat in Paris at night"


def cd_args(images, out, *extra, steps=2):
    return ["train", "--images", str(images), "--class-word", "cat", "--prompt", TARGET, "--pretrained-model", "tiny",
            "--steps", str(steps), "--batch-size", "2", "--output", str(out), "--quiet", *extra]


def make_cfg(**kw) -> TrainConfig:
    return TrainConfig(subjects=[Subject("[V]", "unused", "cat")], target_prompt=TARGET, output="unused",
                       pretrained_model="tiny", personalize=kw.pop("personalize", "custom-diffusion"), **kw)


# ---------------------------------------------------------------- settings and variants


def test_variants_labels_and_defaults():
    assert split_variant("custom-diffusion") == ("custom-diffusion", "same", "custom-diffusion")
    assert split_variant("palp+custom-diffusion") == ("palp", "same", "custom-diffusion")
    assert split_variant("palp-iid+custom-diffusion") == ("palp", "iid", "custom-diffusion")
    assert split_variant("palp") == ("palp", "same", "lora-token") and split_method("palp-iid") == ("palp", "iid")
    for bad in ("custom-diffusion-iid", "custom-diffusion+custom-diffusion", "palp+lora-token", "palp+unknown", "ti-db+x", "ti-db+custom-diffusion"):
        with pytest.raises(ConfigError):
            split_variant(bad)
    assert method_label("palp", "same", "custom-diffusion") == "palp+custom-diffusion"
    assert method_label("custom-diffusion", "same", "custom-diffusion") == "custom-diffusion"
    assert method_label("palp", "iid", "lora-token") == "palp-iid"
    cd = make_cfg(method="custom-diffusion", personalize=None)
    assert (cd.personalize, cd.steps, cd.lr, cd.batch_size, cd.prior_preservation, cd.num_class_images, cd.prior_weight,
            cd.lora_rank) == ("custom-diffusion", 250, 1e-5, 2, True, 200, 1.0, None)
    over = make_cfg(method="palp")
    assert (over.steps, over.lr, over.batch_size, over.prior_preservation) == (500, 1e-5, 32, False)
    plain = make_cfg(method="palp", personalize=None)
    assert (plain.personalize, plain.lr, plain.lora_rank, plain.steps) == ("lora-token", 5e-5, 32, 500)
    given = make_cfg(method="custom-diffusion", steps=7, lr=3e-5, prior_preservation=False)
    assert (given.steps, given.lr, given.prior_preservation) == (7, 3e-5, False)


def test_fan_out_trains_custom_diffusion_once_per_subject():
    from palp.steps.prepare import fan_out

    tasks = [{"id": f"t{i}", "subjects": {"[V]": "cat"}, "class_words": {"[V]": "cat"},
              "personalization_prompts": {"[V]": "A photo of [V]"}} for i in range(2)]
    runs = fan_out({"tasks": tasks}, ["custom-diffusion", "palp+custom-diffusion"])
    assert [(r["method"], r["tasks"]) for r in runs] == [("custom-diffusion", ["t0", "t1"]),
                                                         ("palp+custom-diffusion", ["t0"]),
                                                         ("palp+custom-diffusion", ["t1"])]


@pytest.mark.parametrize("extra, says", [
    (["--personalize", "unknown"], "invalid choice"),
    (["--method", "custom-diffusion", "--lora-rank", "4"], "--lora-rank only apply to --personalize lora-token"),
    (["--personalize", "custom-diffusion", "--lora-targets", "attention+resnets"], "--lora-targets only apply"),
    (["--method", "custom-diffusion", "--personalize", "lora-token"], "--method custom-diffusion trains custom-diffusion"),
])
def test_bad_custom_diffusion_settings_exit_2_with_one_line(cat_images, tmp_path, capsys, extra, says):
    with pytest.raises(SystemExit) as e:
        code = main(cd_args(cat_images, tmp_path / "run", *extra))
        raise SystemExit(code)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert says in err[-1] and not (tmp_path / "run").exists()


# ---------------------------------------------------------------- the model


@pytest.fixture(scope="module")
def cd_setup(tiny_dir):
    torch.manual_seed(0)
    base = load_base_model("tiny")
    model, _, _ = build_personalized_model(base, {"[V]": "cat"}, personalize="custom-diffusion")
    return base, model


def test_zero_deltas_and_the_class_word_token_are_the_base_model(cd_setup):
    """Untrained, [V] reads like 'cat' and every prediction (plain, adapters off, gated per row)
    is bit-identical to a separately loaded stock model's on 'cat'."""
    base, model = cd_setup
    stock = load_base_model("tiny")
    layers = cross_attention_layers(model.unet)
    assert layers and all(isinstance(getattr(a, p), CustomDiffusionLinear) for a in layers.values() for p in ("to_k", "to_v"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"text_encoder.embeddings.token_embedding.learned"} | {
        f"unet.{name[: -len('.processor')]}.{p}.delta" for name in layers for p in ("to_k", "to_v")}
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([100, 800])
    with torch.no_grad():
        ours_states = model.encode(tokenize(base.tokenizer, [to_token_prompt("A photo of [V]")] * 2))
        stock_states = stock.text_encoder(tokenize(stock.tokenizer, ["A photo of cat"] * 2))[0]
        assert torch.equal(ours_states, stock_states)
        want = stock.unet(x, t, encoder_hidden_states=stock_states).sample
        assert torch.equal(model.predict(x, t, ours_states), want)
        with model.adapters_disabled():
            assert torch.equal(model.predict(x, t, ours_states), want)
        assert torch.equal(model.predict_gated(x, t, ours_states, torch.tensor([0.0, 1.0])), want)


def test_disabled_and_gated_rows_are_the_base_model_with_trained_deltas(cd_setup):
    base, model = cd_setup
    stock = load_base_model("tiny")
    g = torch.Generator().manual_seed(4)
    deltas = [p for n, p in model.named_parameters() if n.endswith(".delta")]
    saved = [d.detach().clone() for d in deltas]
    try:
        with torch.no_grad():
            for d in deltas:
                d.add_(0.1 * torch.randn(d.shape, generator=g))
            x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([300, 600])
            states = stock.text_encoder(tokenize(stock.tokenizer, ["A photo of cat", "a dog"]))[0]
            want = stock.unet(x, t, encoder_hidden_states=states).sample
            with model.adapters_disabled():
                assert torch.equal(model.predict(x, t, states), want)
            on = model.predict(x, t, states)
            assert (on - want).abs().max() > 1e-3  # the deltas matter
            gated = model.predict_gated(x, t, states, torch.tensor([0.0, 1.0]))
            assert torch.equal(gated[0], want[0])
            torch.testing.assert_close(gated[1], on[1], rtol=1e-5, atol=1e-6)
    finally:
        with torch.no_grad():
            for d, s in zip(deltas, saved):
                d.copy_(s)


# ---------------------------------------------------------------- the gradient


@pytest.fixture(scope="module")
def grad_setup(tiny_dir):
    """A CD model with deltas and [V] away from their initial values, and its reference: a stock
    UNet with diffusers' CustomDiffusionAttnProcessor holding W0 + D as trainable weights."""
    torch.manual_seed(0)
    base = load_base_model("tiny")
    model, _, _ = build_personalized_model(base, {"[V]": "cat"}, personalize="custom-diffusion")
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    layers = cross_attention_layers(model.unet)
    ours = [getattr(layers[n], p).delta for n in layers for p in ("to_k", "to_v")] + [model.placeholder_embedding.learned]
    ref_unet = load_base_model("tiny").unet
    state = {f"{n}.{p}_custom_diffusion.weight": getattr(layers[n], p).merged_weight() for n in layers for p in ("to_k", "to_v")}
    procs = custom_diffusion_processors(ref_unet, state)
    ref = [getattr(procs[n], f"{p}_custom_diffusion").weight for n in layers for p in ("to_k", "to_v")]
    ref_unet.set_attn_processor(dict(procs))
    ref_unet.requires_grad_(False)
    for w in ref:
        w.requires_grad_(True)
    ref.append(model.placeholder_embedding.learned)
    stock = load_base_model("tiny").unet
    g = torch.Generator().manual_seed(1)
    B = 2
    return dict(base=base, model=model, ours=ours, ref=ref, ref_unet=ref_unet, stock=stock,
                z0=torch.randn(B, 4, 8, 8, generator=g), noise=torch.randn(B, 4, 8, 8, generator=g),
                ids=tokenize(base.tokenizer, [to_token_prompt("A photo of [V]")] * B),
                ab=base.noise_scheduler.alphas_cumprod)


def reference_grads(s, cfg, draws):
    """Eq. 1 by autograd through diffusers' processors + Eq. 6 in closed form (x0_hat's form)."""
    te, tok, ab = s["model"].text_encoder, s["base"].tokenizer, s["ab"]
    unet, stock = s["ref_unet"], s["stock"]
    a_t = ab[draws.t].view(-1, 1, 1, 1)
    z_t = a_t.sqrt() * s["z0"] + (1 - a_t).sqrt() * draws.noise
    states_p = te(s["ids"])[0]
    eps = unet(z_t, draws.t, encoder_hidden_states=states_p).sample
    grads = list(torch.autograd.grad(((eps - draws.noise) ** 2).mean(), s["ref"], retain_graph=True))
    if not cfg.personalize or cfg.method in ("ti-db", "custom-diffusion"):
        return grads
    x0_hat = (z_t - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    with torch.no_grad():
        a2 = ab[draws.t_align].view(-1, 1, 1, 1)
        x2 = a2.sqrt() * x0_hat + (1 - a2).sqrt() * draws.noise_align

        def on(net, text=None, states=None):
            states = states if states is not None else te(tokenize(tok, [text] * len(x2)))[0]
            return net(x2, draws.t_align, encoder_hidden_states=states).sample

        pre_u, pre_c, pre_n = on(stock, ""), on(stock, CLEAN), on(stock, cfg.negative_prompt)
        pers_u, pers_c = on(unet, ""), on(unet, states=states_p)
        if cfg.method == "palp":
            delta = pre_u + cfg.alpha * (pre_c - pre_u) - (pers_u + cfg.beta * (pers_c - pers_u))
        elif cfg.method == "sds":
            delta = pre_u + cfg.alpha * (pre_c - pre_u) - draws.noise_align
        else:  # nfsd
            d_d = torch.stack([pre_u[i] if draws.t_align[i] < 200 else pre_u[i] - pre_n[i] for i in range(len(x2))])
            delta = cfg.alpha * (pre_c - pre_u) + d_d
        scale = a_t.sqrt() / (1 - a_t).sqrt()
    align = torch.autograd.grad(x0_hat, s["ref"], grad_outputs=cfg.lam * delta * scale / eps.numel())
    return [g + a for g, a in zip(grads, align)]


@pytest.mark.parametrize("method, fused", [("palp", True), ("palp", False), ("sds", True), ("nfsd", True),
                                           ("custom-diffusion", True)])
def test_step_gradient_is_custom_diffusions_plus_the_closed_form(grad_setup, method, fused):
    s = grad_setup
    cfg = make_cfg(method=method, fused_guidance=fused)
    noise = s["noise"]
    draws = Draws(index=torch.zeros(2, dtype=torch.long), latent_noise=torch.zeros_like(noise), t=torch.tensor([150, 640]),
                  noise=noise, t_align=torch.tensor([90, 870]), noise_align=noise)
    cond = encode_fixed_prompts(s["model"], s["base"].tokenizer, cfg, "cpu")
    loss, _ = step_losses(s["model"], z0=s["z0"], input_ids=s["ids"], draws=draws, cond=cond, alphas_cumprod=s["ab"], cfg=cfg)
    actual = torch.autograd.grad(loss, s["ours"])
    expected = reference_grads(s, cfg, draws)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=2e-4, atol=2e-7 * max(1.0, float(e.abs().max())))
    if method != "custom-diffusion":  # the alignment term is there and matters
        rec_only = reference_grads(s, make_cfg(method="custom-diffusion"), draws)
        diff = sum(float((a - r).norm()) for a, r in zip(actual, rec_only))
        assert diff > 1e-3 * sum(float(r.norm()) for r in rec_only)


# ---------------------------------------------------------------- training runs


def test_training_changes_only_the_cross_attention_keys_values_and_the_token(tiny_dir, cat_images, tmp_path):
    from palp.steps.train import train

    cfg = TrainConfig(subjects=[Subject("[V]", str(cat_images), "cat")], target_prompt=TARGET, output=str(tmp_path / "run"),
                      pretrained_model="tiny", method="palp", personalize="custom-diffusion", steps=2, batch_size=2,
                      lr=1e-3, save_steps=[1])
    result = train(cfg, progress=False)
    stock = load_base_model("tiny")
    trained = dict(result.model.unet.named_parameters())
    layers = cross_attention_layers(result.model.unet)
    kv = {f"{n[: -len('.processor')]}.{p}" for n in layers for p in ("to_k", "to_v")}
    for name, w in stock.unet.named_parameters():
        module = name.rsplit(".", 1)[0]
        ours = trained[f"{module}.base.{name.rsplit('.', 1)[1]}"] if module in kv else trained[name]
        assert torch.equal(ours, w), name  # the frozen weights, the pretrained k/v included, bit for bit
    for name, w in stock.text_encoder.named_parameters():
        key = name.replace("token_embedding.weight", "token_embedding.base.weight")
        assert torch.equal(dict(result.model.text_encoder.named_parameters())[key], w), name
    assert all(trained[f"{m}.delta"].abs().max() > 0 for m in kv)
    # the run's files: the diffusers-format Custom Diffusion weights (W0 + D) and [V], safetensors only
    out = tmp_path / "run"
    saved = load_file(out / CUSTOM_DIFFUSION_FILE)
    empty = {k for k, v in saved.items() if v.numel() == 0}  # diffusers' mark of a processor without weights
    assert empty == set(stock.unet.attn_processors) - set(layers) and empty
    saved = {k: v for k, v in saved.items() if k not in empty}
    assert set(saved) == {f"{n}.{p}_custom_diffusion.weight" for n in layers for p in ("to_k", "to_v")}
    stock_w = dict(stock.unet.named_parameters())
    for n in layers:
        for p in ("to_k", "to_v"):
            m = f"{n[: -len('.processor')]}.{p}"
            torch.testing.assert_close(saved[f"{n}.{p}_custom_diffusion.weight"], stock_w[f"{m}.weight"] + trained[f"{m}.delta"].detach())
            assert not torch.equal(saved[f"{n}.{p}_custom_diffusion.weight"], stock_w[f"{m}.weight"])
    assert set(load_file(out / EMBEDS_FILE)) == {"<v>"}
    assert (out / "snapshots" / "step-000001" / CUSTOM_DIFFUSION_FILE).is_file()
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pt")) and not list(out.rglob("*.pkl"))
    assert json.loads((out / "training_config.json").read_text())["personalize"] == "custom-diffusion"


def _weights(out):
    return {**load_file(out / CUSTOM_DIFFUSION_FILE), **load_file(out / EMBEDS_FILE)}


def test_resume_is_bit_identical_with_prior_preservation_and_micro_batches(tiny_dir, cat_images, tmp_path):
    """palp over Custom Diffusion with prior preservation, micro-batches of 1: 2 steps then --resume to 4
    equals 4 straight steps, bit for bit."""
    common = ["--method", "palp", "--personalize", "custom-diffusion", "--prior-preservation", "--num-class-images", "2",
              "--class-image-steps", "2", "--micro-batch-size", "1", "--lr", "1e-3", "--checkpoint-every", "2"]
    assert main(cd_args(cat_images, tmp_path / "straight", *common, steps=4)) == 0
    assert main(cd_args(cat_images, tmp_path / "split", *common, steps=2)) == 0
    assert main(cd_args(cat_images, tmp_path / "split", *common, "--resume", steps=4)) == 0
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "split")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    metrics = (tmp_path / "straight" / "metrics.csv").read_text()
    assert metrics == (tmp_path / "split" / "metrics.csv").read_text() and "prior_loss" in metrics.splitlines()[0]


def test_micro_batches_give_the_whole_batchs_step(tiny_dir, cat_images, tmp_path):
    """custom-diffusion alone: micro-batches of 1 (accumulated) and the whole batch of 2 train the same weights."""
    common = ["--method", "custom-diffusion", "--prior-preservation", "off", "--lr", "1e-3"]
    assert main(cd_args(cat_images, tmp_path / "whole", *common, "--micro-batch-size", "2")) == 0
    assert main(cd_args(cat_images, tmp_path / "micro", *common, "--micro-batch-size", "1")) == 0
    a, b = _weights(tmp_path / "whole"), _weights(tmp_path / "micro")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=2e-5)  # Adam at lr 1e-3 moves each weight by ~1e-3 a step
    stock = dict(load_base_model("tiny").unet.named_parameters())
    name = next(k for k, v in a.items() if v.numel() and k != "<v>")
    assert not torch.equal(a[name], stock[name.replace(".processor.to_k_custom_diffusion", ".to_k")
                                          .replace(".processor.to_v_custom_diffusion", ".to_v")])


# ---------------------------------------------------------------- export, sampling and scoring


@pytest.fixture(scope="module")
def cd_workspace(tiny_dir, tmp_path_factory):
    """A prepared dataset and a short custom-diffusion run with a snapshot (large lr: visibly trained)."""
    from conftest import EXAMPLE_CAT

    root = tmp_path_factory.mktemp("cd-sample")
    assert main(["prepare", "--subject", f"cat={EXAMPLE_CAT}", "--class-word", "cat=cat", "--prompt", TARGET,
                 "--pretrained-model", "tiny", "--output", str(root / "prep"), "--quiet"]) == 0
    assert main(["train", "--prepared", str(root / "prep"), "--pretrained-model", "tiny", "--method", "custom-diffusion",
                 "--steps", "4", "--lr", "1e-2", "--num-class-images", "2", "--class-image-steps", "2",
                 "--save-steps", "2", "--output", str(root / "run"), "--quiet"]) == 0
    return root


def _pixels(path):
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(path), dtype=np.int16)


def test_stock_pipeline_loading_the_run_gives_palp_samples_images(cd_workspace, tmp_path):
    """palp sample's images equal a stock StableDiffusionPipeline's with the run's two files, loaded
    through diffusers' Custom Diffusion loader, within one 8-bit level (fp32 CPU kernels differ with
    the batch shape); the base model's (with the token alone) differ. diffusers' load_attn_procs
    without its _pipeline argument is checked too: it either loads the weights or nothing (seen
    by the images equalling the base model's), and palp's own loading never depends on it."""
    import numpy as np
    import pandas as pd
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from palp.models.custom_diffusion import loaded_custom_diffusion
    from palp.models.denoising import initial_latents
    from palp.models.tiny import tiny_model_dir

    run = cd_workspace / "run"
    out = tmp_path / "s"
    assert main(["sample", "--model", str(run), "--output", str(out), "--num-samples", "2", "--steps", "4",
                 "--batch-size", "2", "--checkpoints", "all", "--quiet"]) == 0
    rows = pd.read_csv(out / "samples.csv")
    assert set(rows["method"]) == {"custom-diffusion"} and set(rows["step"]) == {2, 4}
    final = rows[rows["step"] == 4].reset_index(drop=True)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir(), safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    latents = initial_latents(list(final["seed"]), (4, 8, 8))
    prompt = [to_token_prompt(TARGET)] * 2

    def images():
        return (pipe(prompt, num_inference_steps=4, guidance_scale=7.5, latents=latents, output_type="np").images * 255).round()

    pipe.load_textual_inversion(str(run), weight_name=EMBEDS_FILE)
    base = images()
    pipe.unet.load_attn_procs(str(run), weight_name=CUSTOM_DIFFUSION_FILE)  # the call without _pipeline
    plain = images()
    loaded = bool(loaded_custom_diffusion(pipe.unet))
    pipe.unet.load_attn_procs(str(run), weight_name=CUSTOM_DIFFUSION_FILE, _pipeline=pipe)
    assert len(loaded_custom_diffusion(pipe.unet)) == sum(v.numel() > 0 for v in load_file(run / CUSTOM_DIFFUSION_FILE).values())
    stock = images()
    for k, f in enumerate(final["file"]):
        ours = _pixels(out / f)
        assert np.abs(ours - stock[k]).max() <= 1
        assert np.abs(ours - base[k]).mean() > 0.5  # the trained keys and values change the picture
        assert np.abs(plain[k] - (stock[k] if loaded else base[k])).max() <= 1
    snap = rows[rows["step"] == 2]["file"].iloc[0]
    assert np.abs(_pixels(out / snap) - _pixels(out / final["file"][0])).mean() > 0.1  # the snapshot is its own weights


def test_custom_diffusion_runs_are_sampled_and_scored(cd_workspace, tmp_path):
    import pandas as pd

    samples = tmp_path / "samples"
    assert main(["sample", "--model", str(cd_workspace / "run"), "--output", str(samples), "--num-samples", "2",
                 "--steps", "2", "--quiet"]) == 0
    assert main(["sample", "--model", str(cd_workspace / "run"), "--output", str(samples), "--num-samples", "2",
                 "--steps", "2", "--reference", "--quiet"]) == 0
    assert main(["score", "--samples", str(samples), "--prepared", str(cd_workspace / "prep"), "--output",
                 str(tmp_path / "scores"), "--clip", "tiny", "--quiet"]) == 0
    scores = pd.read_csv(next((tmp_path / "scores").rglob("*.csv")))
    assert "custom-diffusion" in set(scores.get("method", [])) | set(str(v) for v in scores.iloc[:, 0])


def test_a_damaged_custom_diffusion_file_is_refused_when_sampling(cd_workspace, tmp_path, capsys):
    import shutil

    from safetensors.torch import save_file

    run = tmp_path / "run"
    shutil.copytree(cd_workspace / "run", run)
    w = load_file(run / CUSTOM_DIFFUSION_FILE)
    short = [k for k, v in w.items() if v.numel()][0]
    save_file({k: v for k, v in w.items() if k != short}, str(run / CUSTOM_DIFFUSION_FILE))  # one weight short
    assert main(["sample", "--model", str(run), "--output", str(tmp_path / "s"), "--num-samples", "1", "--steps", "2",
                 "--quiet"]) == 2
    assert CUSTOM_DIFFUSION_FILE in capsys.readouterr().err


# ---------------------------------------------------------------- the pipeline


def test_pipeline_runs_custom_diffusion_and_layered_variants_locally(tmp_path, capsys):
    """The tiny experiment with methods [custom-diffusion, palp+custom-diffusion, palp+neti], one
    subject, under kfp.local: custom-diffusion trains with its own prior preservation, palp over it
    without; every run holds its personalization's file, is sampled and reaches the comparison
    table. (P+ and NeTI alone, and PALP over P+, go through the same train, sample and score
    steps: their files, samples and scores are tests/test_layered_tokens.py's.)"""
    import yaml

    from palp.models.run_weights import LAYERED_FILE
    from pipelines.cli import main as pipeline_main

    methods = ["custom-diffusion", "palp+custom-diffusion", "palp+neti"]
    config = yaml.safe_load((REPO / "evaluation/experiments/tiny.yaml").read_text())
    config.update(subjects=[{"name": "cat", "images": str(REPO / "examples/subjects/cat"), "class_word": "cat"}],
                  methods=methods, train_steps=2, save_steps="2", num_class_images=2, study_forms=1,
                  reference=False, num_samples=1, sample_steps=2)
    (tmp_path / "cd.yaml").write_text(yaml.safe_dump(config))
    # --share-cache: the steps build the tiny model once (step isolation: tests/test_cluster_isolation.py)
    assert pipeline_main(["pipeline", "run-local", "--config", str(tmp_path / "cd.yaml"),
                          "--pipeline-root", str(tmp_path / "root"), "--share-cache"]) == 0
    out = capsys.readouterr().out
    assert all(f"| {m} " in out or f"| {m}|" in out for m in methods), out[-3000:]
    run = next((tmp_path / "root").glob("palp-*"))
    configs = {json.loads(p.read_text())["method"] + "/" + json.loads(p.read_text())["personalize"]:
               json.loads(p.read_text()) for p in run.glob("for-loop-*/train/model/training_config.json")}
    assert set(configs) == {"custom-diffusion/custom-diffusion", "palp/custom-diffusion", "palp/neti"}
    cd, palp_cd = configs["custom-diffusion/custom-diffusion"], configs["palp/custom-diffusion"]
    assert cd["prior_preservation"] and cd["num_class_images"] == 2 and not palp_cd["prior_preservation"]
    assert cd["lr"] == palp_cd["lr"] == 0.001 and cd["lora_rank"] is None  # the experiment's lr; no LoRA rank
    assert configs["palp/neti"]["neti_hidden"] == 128 and not configs["palp/neti"]["prior_preservation"]
    for p in run.glob("for-loop-*/train/model"):
        personalize = json.loads((p / "training_config.json").read_text())["personalize"]
        want = CUSTOM_DIFFUSION_FILE if personalize == "custom-diffusion" else LAYERED_FILE
        assert (p / want).is_file() and not (p / "pytorch_lora_weights.safetensors").exists()
