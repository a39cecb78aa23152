"""P+ and NeTI as personalizations (--personalize p-plus|neti, --method p-plus|neti).

The truths: Textual Inversion on a stock tiny model (one embedding row, stock UNet and
processors), a stock UNet whose cross-attention layers are fed per-layer states by plain
forward hooks (the step's gradient, with Eq. 6/7's closed form written as in
tests/test_gradients.py), the training model's own validation samples (stock sampling) and an
uninterrupted run (resume).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.func import functional_call

from conftest import EXAMPLE_CAT, assert_grads_close
from palp.cli import main
from palp.core.prompts import to_token_prompt
from palp.core.settings import ConfigError, Subject, TrainConfig, method_label, split_variant
from palp.method.step_inputs import Draws, encode_fixed_prompts, nested_dropout, tokenize
from palp.models.base_model import load_base_model
from palp.models.layered import build_layered_model, cross_attention_order
from palp.models.run_weights import LAYERED_FILE
from palp.steps.train import step_losses

TARGET = "A sketch of [V] in Paris at night"
CLEAN = "A sketch of a cat in Paris at night"
TINY_NETI = {"hidden": 8, "features": 16}


def make_cfg(**kw) -> TrainConfig:
    return TrainConfig(subjects=[Subject("[V]", "unused", "cat")], target_prompt=TARGET, output="unused",
                       pretrained_model="tiny", **kw)


# ---------------------------------------------------------------- settings and variants


def test_variants_defaults_and_their_sources():
    from palp.core.methods import METHOD_TABLE, PERSONALIZATION_DEFAULTS

    assert split_variant("p-plus") == ("p-plus", "same", "p-plus") and split_variant("neti") == ("neti", "same", "neti")
    assert split_variant("palp+p-plus") == ("palp", "same", "p-plus") and split_variant("palp+neti") == ("palp", "same", "neti")
    for bad in ("p-plus-iid", "neti+p-plus", "ti-db+neti", "p-plus+p-plus"):
        with pytest.raises(ConfigError):
            split_variant(bad)
    assert method_label("palp", "same", "neti") == "palp+neti" and method_label("p-plus", "same", "p-plus") == "p-plus"
    pp = make_cfg(method="p-plus")
    assert (pp.personalize, pp.steps, pp.batch_size, pp.lr, pp.lora_rank, pp.neti_hidden) == ("p-plus", 500, 8, 5e-3, None, None)
    neti = make_cfg(method="neti")
    assert (neti.steps, neti.batch_size, neti.lr, neti.neti_hidden, neti.neti_features, neti.neti_nested_dropout,
            neti.neti_bypass) == (1000, 8, 8e-3, 128, 1024, 0.5, True)
    over = make_cfg(method="palp", personalize="neti", neti_bypass=False)
    assert (over.steps, over.batch_size, over.lr, over.neti_options()) == (500, 32, 8e-3, {"hidden": 128, "features": 1024,
                                                                                           "bypass": False})
    assert (neti.prompt_templates, neti.hflip, over.prompt_templates, over.hflip) == ("textual-inversion", 0.5) * 2
    assert (pp.prompt_templates, pp.hflip) == ("none", 0)
    for name, n in (("p-plus", 3), ("neti", 5)):
        sources = [*METHOD_TABLE[name].defaults.values(), *PERSONALIZATION_DEFAULTS[name].values()]
        assert len(sources) == n and all(d.source for d in sources)


@pytest.mark.parametrize("extra, says", [
    (["--method", "p-plus", "--lora-rank", "4"], "--lora-rank only apply to --personalize lora-token"),
    (["--neti-hidden", "8"], "--neti-hidden only apply to --personalize neti"),
    (["--method", "neti", "--neti-nested-dropout", "1.5"], "--neti-nested-dropout must be in [0, 1]"),
    (["--method", "palp", "--personalize", "p-plus", "--neti-bypass", "off"], "--neti-bypass only apply"),
])
def test_bad_settings_exit_2_with_one_line(cat_images, tmp_path, capsys, extra, says):
    args = ["train", "--images", str(cat_images), "--class-word", "cat", "--prompt", TARGET, "--pretrained-model", "tiny",
            "--steps", "1", "--output", str(tmp_path / "o"), "--quiet", *extra]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0]


def test_nested_dropout_draws_and_truncation():
    """One coin per step; rows keep their first k units; a mapper cut to 0 units is its output bias."""
    from palp.models.neti import NetiMapper

    cuts = [nested_dropout(torch.Generator().manual_seed(s), 64, 8, 0.5) for s in range(20)]
    whole = [bool((c == 8).all()) for c in cuts]
    assert 0 < sum(whole) < 20 and all(c.min() >= 0 and c.max() <= 8 for c in cuts)
    assert all(bool((c < 8).all()) for w, c in zip(whole, cuts) if not w)  # a cut step cuts every row, at 0..7
    assert len({tuple(c.tolist()) for w, c in zip(whole, cuts) if not w}) > 1  # each step its own cuts
    torch.manual_seed(0)
    m = NetiMapper(4, 6, norm=2.0, hidden=8, features=16, bypass=False)
    t, layer = torch.tensor([3, 900, 500]), torch.tensor([0, 3, 1])
    emb, _ = m(t, layer, torch.zeros(3, dtype=torch.long))
    want = torch.nn.functional.normalize(m.output.bias.detach(), dim=-1) * 2.0
    torch.testing.assert_close(emb, want.expand(3, -1))
    assert not torch.allclose(m(t, layer)[0][0], m(t, layer)[0][1])  # whole: it depends on (t, layer)
    torch.testing.assert_close(emb.norm(dim=-1), torch.full((3,), 2.0))  # NeTI's rescaling to the class word's norm


# ---------------------------------------------------------------- equivalence with Textual Inversion


def stock_ti(vector: torch.Tensor):
    """A stock tiny model with '<v>' added as one embedding row ``vector`` (Textual Inversion)."""
    stock = load_base_model("tiny")
    stock.tokenizer.add_tokens(["<v>"])
    stock.text_encoder.resize_token_embeddings(len(stock.tokenizer))
    with torch.no_grad():
        stock.text_encoder.get_input_embeddings().weight[-1] = vector
    return stock


def attention_inputs(unet, run):
    """Run ``run()`` and return what each cross-attention layer's to_k and to_v were given, in forward order."""
    seen, handles = [], []
    for name in cross_attention_order(unet):
        attn = unet.get_submodule(name[: -len(".processor")])
        for proj in (attn.to_k, attn.to_v):
            handles.append(proj.register_forward_hook(lambda m, args, out: seen.append(args[0].detach().clone())))
    try:
        out = run()
    finally:
        for h in handles:
            h.remove()
    return out, seen


def test_p_plus_with_equal_layer_tokens_is_textual_inversion(tiny_dir):
    """Every layer's token = v: each cross-attention layer gets exactly TI's keys/values input and the
    prediction is TI's, bit for bit; the layers' gradients sum to TI's gradient of v."""
    torch.manual_seed(0)
    base = load_base_model("tiny")
    model, _, _ = build_layered_model(base, {"[V]": "cat"}, "p-plus")
    v = model.conditioning.tokens.detach()[0, 0] + 0.3 * torch.randn(model.conditioning.tokens.shape[-1])
    with torch.no_grad():
        model.conditioning.tokens.copy_(v.expand_as(model.conditioning.tokens))
    stock = stock_ti(v)
    g = torch.Generator().manual_seed(1)
    x, t, noise = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([70, 830]), torch.randn(2, 4, 8, 8, generator=g)
    ids = tokenize(base.tokenizer, [to_token_prompt("A photo of [V]")] * 2)
    (ours, _), ours_in = attention_inputs(model.unet, lambda: model(x, t, ids))
    row = stock.text_encoder.get_input_embeddings().weight
    row.requires_grad_(True)
    want, want_in = attention_inputs(stock.unet, lambda: stock.unet(x, t, encoder_hidden_states=stock.text_encoder(ids)[0]).sample)
    assert len(ours_in) == 2 * len(model.layers) and all(torch.equal(a, b) for a, b in zip(ours_in, want_in))
    assert torch.equal(ours, want)
    grad = torch.autograd.grad(((ours - noise) ** 2).mean(), model.conditioning.tokens)[0]  # (n, 1, D)
    ti = torch.autograd.grad(((want - noise) ** 2).mean(), row)[0][-1]
    assert grad.abs().amax(-1).min() > 0  # every layer's token has its own gradient
    torch.testing.assert_close(grad.sum(0)[0], ti, rtol=1e-5, atol=1e-8 * float(ti.abs().max()))


def test_neti_with_a_constant_mapper_and_no_bypass_is_textual_inversion(tiny_dir):
    """A mapper whose output ignores (t, layer) (zero output weights), without the bypass, is TI with
    its (norm-rescaled) output as the row, at any timestep and nested-dropout cut; with the bypass
    the keys' inputs stay TI's and only the values' change."""
    torch.manual_seed(0)
    for bypass in (False, True):
        base = load_base_model("tiny")
        model, _, _ = build_layered_model(base, {"[V]": "cat"}, "neti", {**TINY_NETI, "bypass": bypass})
        mapper = model.conditioning.mappers[0]
        with torch.no_grad():
            mapper.output.weight.zero_()
            mapper.output.bias.normal_()
        width = mapper.width
        v = torch.nn.functional.normalize(mapper.output.bias.detach()[:width], dim=-1) * mapper.norm
        if bypass:  # the whole output (embedding and bypass) is rescaled together, as NeTI's code does
            v = (torch.nn.functional.normalize(mapper.output.bias.detach(), dim=-1) * mapper.norm)[:width]
        stock = stock_ti(v)
        g = torch.Generator().manual_seed(2)
        x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([15, 990])
        ids = tokenize(base.tokenizer, [to_token_prompt("A photo of [V]")] * 2)
        cut = torch.tensor([3, 8])
        with torch.no_grad():
            (ours, _), ours_in = attention_inputs(model.unet, lambda m=model, x=x, t=t, ids=ids, c=cut: m(x, t, ids, truncation=c))
            want, want_in = attention_inputs(stock.unet, lambda s=stock, x=x, t=t, ids=ids: s.unet(
                x, t, encoder_hidden_states=s.text_encoder(ids)[0]).sample)
        keys = [(a, b) for i, (a, b) in enumerate(zip(ours_in, want_in)) if i % 2 == 0]
        values = [(a, b) for i, (a, b) in enumerate(zip(ours_in, want_in)) if i % 2 == 1]
        assert all(torch.equal(a, b) for a, b in keys)
        if not bypass:
            assert all(torch.equal(a, b) for a, b in values) and torch.equal(ours, want)
        else:
            assert all(not torch.allclose(a, b) for a, b in values) and not torch.allclose(ours, want)


# ---------------------------------------------------------------- the step's gradient


@pytest.fixture(scope="module", params=["p-plus", "neti"])
def grad_setup(tiny_dir, request):
    torch.manual_seed(0)
    base = load_base_model("tiny")
    model, _, _ = build_layered_model(base, {"[V]": "cat"}, request.param, TINY_NETI)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(0.1 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    return {"personalize": request.param, "base": base, "model": model, "stock": load_base_model("tiny"),
            "z0": torch.randn(2, 4, 8, 8, generator=g), "noise": torch.randn(2, 4, 8, 8, generator=g),
            "ids": tokenize(base.tokenizer, [to_token_prompt("A photo of [V]")] * 2), "ab": base.noise_scheduler.alphas_cumprod}


def reference_states(s, t):
    """Per (row, layer): the stock text encoder's output with [V]'s row replaced (functional_call) by
    the layer's vector, and NeTI's bypass written out: (keys, values) lists over layers of (B, 77, D)."""
    model, stock = s["model"], s["stock"].text_encoder
    table = model.text_encoder.get_input_embeddings()
    cond = model.conditioning
    n = len(model.layers)
    if s["personalize"] == "p-plus":
        vec = [[cond.tokens[layer, 0]] * len(t) for layer in range(n)]
        byp = None
    else:
        out = [cond.mappers[0](t, torch.full_like(t, layer)) for layer in range(n)]
        vec, byp = [o[0] for o in out], [o[1] for o in out]
    keys, values = [], []
    for layer in range(n):
        k_rows, v_rows = [], []
        for i in range(len(t)):
            weight = torch.cat([table.base.weight, vec[layer][i][None]])
            out = functional_call(stock, {"text_model.embeddings.token_embedding.weight": weight} if hasattr(stock, "text_model")
                                  else {"embeddings.token_embedding.weight": weight}, (s["ids"][i : i + 1],),
                                  {"output_hidden_states": True})
            k_rows.append(out[0])
            if byp is not None:
                h = out.hidden_states[-1].clone()
                pos = s["ids"][i] == table.first_id
                b = byp[layer][i]
                h[0, pos] = h[0, pos] + 0.2 * b / b.norm() * h[0, pos].norm(dim=-1, keepdim=True)
                v_rows.append(getattr(stock, "text_model", stock).final_layer_norm(h))
        keys.append(torch.cat(k_rows))
        values.append(torch.cat(v_rows) if v_rows else keys[-1])
    return keys, values


def hooked(unet, keys, values, x, t):
    """The stock UNet with each cross-attention layer's key input set to ``keys[l]`` and value input to ``values[l]``."""
    handles = []
    for layer, name in enumerate(cross_attention_order(unet)):
        attn = unet.get_submodule(name[: -len(".processor")])
        handles.append(attn.to_k.register_forward_pre_hook(lambda m, a, s=keys[layer]: (s,)))
        handles.append(attn.to_v.register_forward_pre_hook(lambda m, a, s=values[layer]: (s,)))
    try:
        return unet(x, t, encoder_hidden_states=torch.zeros(len(x), 77, unet.config.cross_attention_dim)).sample
    finally:
        for h in handles:
            h.remove()


def reference_grads(s, cfg, draws, params):
    stock, ab, tok = s["stock"], s["ab"], s["base"].tokenizer
    a_t = ab[draws.t].view(-1, 1, 1, 1)
    z_t = a_t.sqrt() * s["z0"] + (1 - a_t).sqrt() * draws.noise
    eps = hooked(stock.unet, *reference_states(s, draws.t), z_t, draws.t)
    grads = list(torch.autograd.grad(((eps - draws.noise) ** 2).mean(), params, retain_graph=True))
    if cfg.method != "palp":
        return grads
    x0_hat = (z_t - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    with torch.no_grad():
        a2 = ab[draws.t_align].view(-1, 1, 1, 1)
        x2 = a2.sqrt() * x0_hat + (1 - a2).sqrt() * draws.noise_align

        def plain(text):
            return stock.unet(x2, draws.t_align, encoder_hidden_states=stock.text_encoder(tokenize(tok, [text] * 2))[0]).sample

        pre_u, pre_c = plain(""), plain(CLEAN)
        pers_c = hooked(stock.unet, *reference_states(s, draws.t_align), x2, draws.t_align)  # y_P at t'
        delta = pre_u + cfg.alpha * (pre_c - pre_u) - (pre_u + cfg.beta * (pers_c - pre_u))
        scale = a_t.sqrt() / (1 - a_t).sqrt()
    align = torch.autograd.grad(x0_hat, params, grad_outputs=cfg.lam * delta * scale / eps.numel(), allow_unused=True)
    return [g + (0 if a is None else a) for g, a in zip(grads, align)]


@pytest.mark.parametrize("method, fused", [("palp", True), ("palp", False), ("alone", True)])
def test_step_gradient_is_the_methods_plus_the_closed_form(grad_setup, method, fused):
    s = grad_setup
    method = s["personalize"] if method == "alone" else method
    cfg = make_cfg(method=method, personalize=s["personalize"], fused_guidance=fused,
                   **({"neti_hidden": 8, "neti_features": 16} if s["personalize"] == "neti" else {}))
    noise = s["noise"]
    draws = Draws(index=torch.zeros(2, dtype=torch.long), latent_noise=torch.zeros_like(noise), t=torch.tensor([150, 640]),
                  noise=noise, t_align=torch.tensor([90, 870]), noise_align=noise)
    cond = encode_fixed_prompts(s["model"], s["base"].tokenizer, cfg, "cpu")
    params = s["model"].trainable_parameters()
    loss, _ = step_losses(s["model"], z0=s["z0"], input_ids=s["ids"], draws=draws, cond=cond, alphas_cumprod=s["ab"], cfg=cfg)
    actual = torch.autograd.grad(loss, params)
    expected = reference_grads(s, cfg, draws, params)
    assert_grads_close(actual, expected)
    if method == "palp":  # the alignment term is there and matters
        alone = reference_grads(s, make_cfg(method=s["personalize"], personalize=s["personalize"]), draws, params)
        assert sum(float((a - r).norm()) for a, r in zip(actual, alone)) > 1e-3 * sum(float(r.norm()) for r in alone)


# ---------------------------------------------------------------- training runs


def _args(images, out, *extra, steps=2):
    return ["train", "--images", str(images), "--class-word", "cat", "--prompt", TARGET, "--pretrained-model", "tiny",
            "--steps", str(steps), "--batch-size", "2", "--output", str(out), "--quiet", *extra]


def test_neti_resume_is_bit_identical_with_nested_dropout_and_micro_batches(tiny_dir, cat_images, tmp_path):
    """PALP over NeTI, micro-batches of 1, nested dropout every step: 2 steps then --resume to 3 equals 3 straight steps."""
    from safetensors.torch import load_file

    common = ["--method", "palp", "--personalize", "neti", "--neti-hidden", "8", "--neti-features", "16",
              "--neti-nested-dropout", "1", "--micro-batch-size", "1", "--checkpoint-every", "2"]
    assert main(_args(cat_images, tmp_path / "straight", *common, steps=3)) == 0
    assert main(_args(cat_images, tmp_path / "split", *common, steps=2)) == 0
    assert main(_args(cat_images, tmp_path / "split", *common, "--resume", steps=3)) == 0
    a, b = load_file(tmp_path / "straight" / LAYERED_FILE), load_file(tmp_path / "split" / LAYERED_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "straight" / "metrics.csv").read_text() == (tmp_path / "split" / "metrics.csv").read_text()
    config = json.loads((tmp_path / "straight" / "training_config.json").read_text())
    assert (config["personalize"], config["neti_hidden"], config["neti_nested_dropout"]) == ("neti", 8, 1)
    assert not list(tmp_path.rglob("*.bin")) and not list(tmp_path.rglob("*.pt")) and not list(tmp_path.rglob("*.pkl"))


# ---------------------------------------------------------------- export, sampling and scoring


@pytest.fixture(scope="module")
def workspace(tiny_dir, tmp_path_factory):
    """A prepared dataset and one short, visibly trained run per method, each with a snapshot and a
    validation grid sampled by the training model itself."""
    root = tmp_path_factory.mktemp("layered")
    assert main(["prepare", "--subject", f"cat={EXAMPLE_CAT}", "--class-word", "cat=cat", "--prompt", TARGET,
                 "--pretrained-model", "tiny", "--output", str(root / "prep"), "--quiet"]) == 0
    for method, lr in (("p-plus", "0.5"), ("neti", "0.05")):
        extra = ["--neti-hidden", "8", "--neti-features", "16"] if method == "neti" else []
        assert main(["train", "--prepared", str(root / "prep"), "--pretrained-model", "tiny", "--method", method,
                     "--steps", "3", "--batch-size", "2", "--lr", lr, "--save-steps", "2", "--validation-every", "3",
                     "--validation-images", "2", "--validation-steps", "4", *extra, "--output", str(root / method),
                     "--quiet"]) == 0
    return root


def _pixels(path):
    from PIL import Image

    return np.asarray(Image.open(path), dtype=np.int16)


def stock_pipeline():
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from palp.models.tiny import tiny_model_dir

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir(), safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("method", ["p-plus", "neti"])
def test_stock_pipeline_with_the_installed_processors_gives_palp_samples_images(workspace, tmp_path, method):
    """A stock StableDiffusionPipeline with install_layered_tokens makes palp sample's images and the
    training model's own validation images (within one 8-bit level: fp32 CPU kernels differ with the
    batch shape); the base model's differ; removing the tokens gives the stock pipeline back."""
    import pandas as pd

    from palp.models.denoising import initial_latents
    from palp.models.layered_pipeline import install_layered_tokens, remove_layered_tokens

    run, out = workspace / method, tmp_path / "s"
    assert main(["sample", "--model", str(run), "--output", str(out), "--num-samples", "2", "--steps", "4",
                 "--batch-size", "2", "--checkpoints", "all", "--quiet"]) == 0
    rows = pd.read_csv(out / "samples.csv")
    assert set(rows["method"]) == {method} and set(rows["step"]) == {2, 3}
    final = rows[rows["step"] == 3].reset_index(drop=True)
    pipe = stock_pipeline()

    def images(seeds, prompt=TARGET):
        latents = initial_latents(list(seeds), (4, 8, 8))
        return (pipe([to_token_prompt(prompt)] * len(seeds), num_inference_steps=4, guidance_scale=7.5, latents=latents,
                     output_type="np").images * 255).round()

    install_layered_tokens(pipe, run)
    stock = images(final["seed"])
    for k, f in enumerate(final["file"]):
        assert np.abs(_pixels(out / f) - stock[k]).max() <= 1
    validation = _pixels(run / "validation" / "step-000003.png")  # the training model's samples of seeds 0, 1
    grid = np.concatenate(list(images([0, 1])), axis=1)
    assert np.abs(validation - grid).max() <= 1
    remove_layered_tokens(pipe)
    pipe.load_textual_inversion([torch.zeros(pipe.text_encoder.config.hidden_size)], token=["<v>"])
    base = images(final["seed"])
    assert all(np.abs(stock[k] - base[k]).mean() > 0.5 for k in range(len(final)))
    snap = rows[rows["step"] == 2]["file"].iloc[0]
    assert np.abs(_pixels(out / snap) - _pixels(out / final["file"][0])).mean() > 0.1  # the snapshot is its own weights


def test_neti_truncation_in_palp_sample_and_the_stock_pipeline(workspace, tmp_path, capsys):
    """--neti-truncation K: every unit (K = --neti-hidden) is the untruncated sampling, bit for bit;
    fewer units give other images, which a stock pipeline installed with the same truncation makes
    too; P+ runs, --reference and K outside 1..hidden are refused in one line."""
    import pandas as pd

    from palp.models.denoising import initial_latents
    from palp.models.layered_pipeline import install_layered_tokens

    run = workspace / "neti"

    def sample(out, *extra):
        assert main(["sample", "--model", str(run), "--output", str(out), "--num-samples", "2", "--steps", "4",
                     "--batch-size", "2", "--quiet", *extra]) == 0
        rows = pd.read_csv(out / "samples.csv")
        return rows, np.stack([_pixels(out / f) for f in rows["file"]])

    rows, whole = sample(tmp_path / "all")
    _, every = sample(tmp_path / "k8", "--neti-truncation", "8")
    cut_rows, cut = sample(tmp_path / "k2", "--neti-truncation", "2")
    assert np.array_equal(whole, every) and np.abs(whole - cut).mean() > 0.1
    assert set(cut_rows["settings"]) != set(rows["settings"])  # other pixels, another settings folder
    pipe = stock_pipeline()
    install_layered_tokens(pipe, run, truncation=2)
    latents = initial_latents(list(cut_rows["seed"]), (4, 8, 8))
    stock = (pipe([to_token_prompt(TARGET)] * 2, num_inference_steps=4, guidance_scale=7.5, latents=latents,
                  output_type="np").images * 255).round()
    assert np.abs(cut - stock).max() <= 1
    with pytest.raises(ValueError, match="NeTI runs only"):
        install_layered_tokens(pipe, workspace / "p-plus", truncation=2)
    capsys.readouterr()
    for model, extra, says in ((workspace / "p-plus", ["--neti-truncation", "2"], "applies to NeTI runs only"),
                               (run, ["--neti-truncation", "9"], "between 1 and the run's 8 mapper units"),
                               (run, ["--neti-truncation", "0"], "between 1 and the run's 8"),
                               (run, ["--neti-truncation", "2", "--reference"], "--reference samples the base model")):
        code = main(["sample", "--model", str(model), "--output", str(tmp_path / "refused"), "--quiet", *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and says in err[0], err
    assert not (tmp_path / "refused").exists()


def test_runs_are_scored_and_a_damaged_file_is_refused(workspace, tmp_path, capsys):
    import shutil

    import pandas as pd
    from safetensors.torch import load_file, save_file

    samples = tmp_path / "samples"
    for method in ("p-plus", "neti"):
        assert main(["sample", "--model", str(workspace / method), "--output", str(samples), "--num-samples", "1",
                     "--steps", "2", "--quiet"]) == 0
    assert main(["score", "--samples", str(samples), "--prepared", str(workspace / "prep"), "--output",
                 str(tmp_path / "scores"), "--clip", "tiny", "--quiet"]) == 0
    scores = pd.concat(pd.read_csv(p) for p in (tmp_path / "scores").rglob("*.csv"))
    assert {"p-plus", "neti"} <= set(scores.astype(str).to_numpy().ravel())
    run = tmp_path / "run"
    shutil.copytree(workspace / "neti", run, ignore=shutil.ignore_patterns("checkpoints", "snapshots"))
    w = load_file(run / LAYERED_FILE)
    from safetensors import safe_open

    with safe_open(str(run / LAYERED_FILE), framework="pt") as f:
        meta = f.metadata()
    save_file({k: v for k, v in w.items() if not k.endswith("output.bias")}, str(run / LAYERED_FILE), metadata=meta)
    capsys.readouterr()
    assert main(["sample", "--model", str(run), "--output", str(tmp_path / "s2"), "--num-samples", "1", "--steps", "2",
                 "--quiet"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("palp sample:")]
    assert len(err) == 1 and LAYERED_FILE in err[0] and "output.bias" in err[0], err
