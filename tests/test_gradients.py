"""The training step's parameter gradient equals Eq. 1's autograd plus the closed form of Eq. 6.

The reference below is written from docs/method.md alone, with separate UNet calls per
prompt and the alignment term taken through x0_hat (step 4's form, not palp's rescaled
eps-form of Eq. 7), so an error in either the algebra or the batching shows up.
"""

from __future__ import annotations

import pytest
import torch

from conftest import assert_grads_close
from palp.core.prompts import to_token_prompt
from palp.core.settings import Subject, TrainConfig
from palp.method.step_inputs import Draws, encode_fixed_prompts, tokenize
from palp.models.base_model import load_base_model
from palp.models.personalize import build_personalized_model
from palp.steps.train import step_losses

TARGET = "A sketch of [V] in Paris at night"
CLEAN = "A sketch of a cat in Paris at night"


def make_cfg(**kw) -> TrainConfig:
    return TrainConfig(subjects=[Subject("[V]", "unused", "cat")], target_prompt=TARGET, output="unused",
                       pretrained_model="tiny", lora_rank=4, **kw)


@pytest.fixture(scope="module")
def setup(tiny_dir):
    torch.manual_seed(0)
    base = load_base_model("tiny")
    model, _, _ = build_personalized_model(base, {"[V]": "cat"}, rank=4)
    with torch.no_grad():  # a LoRA and [V] away from their initial values, so both branches differ
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    params = model.trainable_parameters()
    assert params, "no trainable parameters"
    B = 2
    g = torch.Generator().manual_seed(1)
    z0 = torch.randn(B, 4, 8, 8, generator=g)
    noise = torch.randn(B, 4, 8, 8, generator=g)
    other_noise = torch.randn(B, 4, 8, 8, generator=g)
    ids = tokenize(base.tokenizer, [to_token_prompt("A photo of [V]")] * B)
    return dict(base=base, model=model, params=params, z0=z0, noise=noise, other_noise=other_noise, ids=ids,
                ab=base.noise_scheduler.alphas_cumprod)


def palp_grads(s, cfg, draws):
    model = s["model"]
    cond = encode_fixed_prompts(model, s["base"].tokenizer, cfg, "cpu")
    B = len(draws.t)
    loss, _ = step_losses(model, z0=s["z0"][:B], input_ids=s["ids"][:B], draws=draws, cond=cond,
                          alphas_cumprod=s["ab"], cfg=cfg)
    return torch.autograd.grad(loss, s["params"])


def reference_grads(s, cfg, draws):
    """Eq. 1 by autograd + Eq. 6 in closed form: w * delta * d x0_hat / d theta (x rescale)."""
    unet, te, tok = s["base"].unet, s["base"].text_encoder, s["base"].tokenizer
    ab, B = s["ab"], len(draws.t)
    a_t = ab[draws.t].view(-1, 1, 1, 1)
    z_t = a_t.sqrt() * s["z0"][:B] + (1 - a_t).sqrt() * draws.noise
    states_p = te(s["ids"][:B])[0]
    eps = unet(z_t, draws.t, encoder_hidden_states=states_p).sample
    rec = ((eps - draws.noise) ** 2).mean()
    grads = list(torch.autograd.grad(rec, s["params"], retain_graph=True))
    if cfg.method == "ti-db":
        return grads
    x0_hat = (z_t - (1 - a_t).sqrt() * eps) / a_t.sqrt()  # with grad: Eq. 2 as a function of theta
    with torch.no_grad():
        a2 = ab[draws.t_align].view(-1, 1, 1, 1)
        x2 = a2.sqrt() * x0_hat + (1 - a2).sqrt() * draws.noise_align

        def unet_on(text: str | None, states=None):
            states = states if states is not None else te(tokenize(tok, [text] * len(x2)))[0]
            return unet(x2, draws.t_align, encoder_hidden_states=states).sample

        unet.disable_adapters()
        pre_u, pre_c = unet_on(""), unet_on(CLEAN)
        pre_n = unet_on(cfg.negative_prompt)
        unet.enable_adapters()
        pers_u, pers_c = unet_on(""), unet_on(None, states_p)
        pretrained = pre_u + cfg.alpha * (pre_c - pre_u)
        if cfg.method == "palp":
            delta = pretrained - (pers_u + cfg.beta * (pers_c - pers_u))
        elif cfg.method == "sds":
            delta = pretrained - draws.noise_align
        else:  # nfsd
            d_c = cfg.alpha * (pre_c - pre_u)
            d_d = torch.stack([pre_u[i] if draws.t_align[i] < 200 else pre_u[i] - pre_n[i] for i in range(len(x2))])
            delta = d_c + d_d
        scale = a_t.sqrt() / (1 - a_t).sqrt() if cfg.rescale else torch.ones_like(a_t)
    align = torch.autograd.grad(x0_hat, s["params"], grad_outputs=cfg.lam * delta * scale / eps.numel())
    return [g + a for g, a in zip(grads, align)]


def draws_for(s, t, t_align, same_noise=True):
    B = len(t)
    noise = s["noise"][:B]
    return Draws(index=torch.zeros(B, dtype=torch.long), latent_noise=torch.zeros_like(noise), t=torch.tensor(t),
                 noise=noise, t_align=torch.tensor(t_align), noise_align=noise if same_noise else s["other_noise"][:B])


@pytest.mark.parametrize(
    "kw, same_noise",
    [
        (dict(method="palp"), True),
        (dict(method="palp", noise="iid", lam=0.5), False),
        (dict(method="palp", rescale=False), True),
        (dict(method="palp", alpha=7.5, beta=1.0), True),  # composition settings: no personalized uncond call
        (dict(method="sds"), True),
        (dict(method="nfsd"), True),
        (dict(method="ti-db"), True),
    ],
    ids=["palp", "palp-iid-lambda", "palp-no-rescale", "palp-beta-1", "sds", "nfsd", "ti-db"],
)
def test_step_gradient_matches_closed_form(setup, kw, same_noise):
    """palp's step (the guidance branches in one UNet call, the LoRA switched per row) equals the
    reference's separate calls; tests/test_fast.py checks the separate-call path against it."""
    cfg = make_cfg(**kw)
    draws = draws_for(setup, [150, 640], [90, 870], same_noise=same_noise)
    actual = palp_grads(setup, cfg, draws)
    expected = reference_grads(setup, cfg, draws)
    assert_grads_close(actual, expected)
    if cfg.method != "ti-db":  # the alignment term must be there and matter
        rec_only = reference_grads(setup, make_cfg(method="ti-db"), draws)
        diff = sum(float((a - r).norm()) for a, r in zip(actual, rec_only))
        assert diff > 1e-3 * sum(float(r.norm()) for r in rec_only)


def test_ti_db_is_reconstruction_only(setup):
    draws = draws_for(setup, [150, 640], [90, 870])
    cfg = make_cfg(method="ti-db")
    unet, te = setup["base"].unet, setup["base"].text_encoder
    a_t = setup["ab"][draws.t].view(-1, 1, 1, 1)
    z_t = a_t.sqrt() * setup["z0"] + (1 - a_t).sqrt() * draws.noise
    eps = unet(z_t, draws.t, encoder_hidden_states=te(setup["ids"])[0]).sample
    expected = torch.autograd.grad(torch.nn.functional.mse_loss(eps, draws.noise), setup["params"])
    assert_grads_close(palp_grads(setup, cfg, draws), expected)


def test_rescale_off_differs_by_exactly_the_factor(setup):
    """Per element, the plain term is the rescaled one times sqrt(1 - a_t) / sqrt(a_t)."""
    draws = draws_for(setup, [640], [300])
    rec = palp_grads(setup, make_cfg(method="ti-db"), draws)
    on = palp_grads(setup, make_cfg(method="palp", rescale=True), draws)
    off = palp_grads(setup, make_cfg(method="palp", rescale=False), draws)
    a = setup["ab"][640]
    factor = float((1 - a).sqrt() / a.sqrt())
    assert factor > 1.5  # t = 640: the two differ visibly
    for r, g_on, g_off in zip(rec, on, off):
        expected = factor * (g_on - r)
        torch.testing.assert_close(g_off - r, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "separate"])
def test_alignment_branch_sees_no_gradient(setup, fused):
    """One backward: the guidance forwards build no graph. Fused, both branches are one UNet call."""
    draws = draws_for(setup, [150, 640], [90, 870])
    calls, shapes = [], []

    def record(module, args, output):
        calls.append(torch.is_grad_enabled())
        shapes.append(output.sample.shape[0])

    handle = setup["base"].unet.register_forward_hook(record)
    try:
        palp_grads(setup, make_cfg(method="palp", fused_guidance=fused), draws)
        n = len(calls)
        palp_grads(setup, make_cfg(method="palp", beta=1.0, fused_guidance=fused), draws)
    finally:
        handle.remove()
    if fused:  # personalization (grad); pretrained uncond + clean and personalized uncond + y_P in one call
        assert calls == [True, False] * 2 and shapes[:n] == [2, 8]
        assert shapes[n:] == [2, 6]  # with beta = 1 the personalized branch needs no unconditional half
    else:  # personalization (grad), pretrained 2B, personalized 2B
        assert calls == [True, False, False] * 2 and shapes[:n] == [2, 4, 4]
        assert shapes[n:] == [2, 4, 2]


def _weighted(draws: Draws, rows: list[int]) -> Draws:
    B = len(draws.t)
    w = torch.zeros(B)
    w[rows] = B / len(rows)
    return Draws(draws.index, draws.latent_noise, draws.t, draws.noise, draws.t_align, draws.noise_align, w)


@pytest.mark.parametrize("method", ["palp", "sds"])
def test_sub_sampled_alignment_term_is_unbiased(setup, method):
    """--align-fraction: the gradient averaged over every k-of-B choice of rows equals the full
    batch's exactly (each row is drawn with probability k/B and weighted B/k); one choice alone
    differs from it; and the choices draw() makes have that law (each row k/B of the time)."""

    from palp.method.step_inputs import draw

    cfg = make_cfg(method=method)
    draws = draws_for(setup, [150, 640], [90, 870])
    full = palp_grads(setup, cfg, draws)
    per_choice = [palp_grads(setup, cfg, _weighted(draws, [r])) for r in range(2)]
    mean = [sum(g[i] for g in per_choice) / len(per_choice) for i in range(len(full))]
    assert_grads_close(mean, full)
    assert sum(float((a - b).norm()) for a, b in zip(per_choice[0], full)) > 1e-3 * sum(float(b.norm()) for b in full)
    assert_grads_close(palp_grads(setup, cfg, _weighted(draws, [0, 1])), full)  # every row drawn: the full step

    B, k = 6, 2
    sub_cfg = make_cfg(method=method, align_fraction=k / B)
    counts = torch.zeros(B)
    n = 3000
    for seed in range(n):
        d = draw(torch.Generator().manual_seed(seed), sub_cfg, n_images=3, batch=B, latent_shape=(4, 8, 8), num_timesteps=1000)
        assert sorted(d.align_weight.tolist()) == [0.0] * (B - k) + [B / k] * k
        counts += d.align_weight > 0
    p = k / B
    se = (p * (1 - p) / n) ** 0.5
    assert ((counts / n - p).abs() < 4 * se).all(), counts / n
    default = draw(torch.Generator().manual_seed(0), make_cfg(method=method), n_images=3, batch=B, latent_shape=(4, 8, 8),
                   num_timesteps=1000)
    sub = draw(torch.Generator().manual_seed(0), sub_cfg, n_images=3, batch=B, latent_shape=(4, 8, 8), num_timesteps=1000)
    assert default.align_weight is None and torch.equal(default.noise_align, sub.noise_align) and torch.equal(default.t, sub.t)


def test_sub_sampled_gradient_mean_over_draws_is_the_full_one(setup):
    """The option as training draws it: the mean over many draw() choices (B = 4, k = 2) of the
    step's gradient is within 4 standard errors of the full batch's, coordinate by coordinate."""
    from palp.method.step_inputs import draw

    cfg, sub_cfg = make_cfg(method="palp"), make_cfg(method="palp", align_fraction=0.5)
    B = 4
    g = torch.Generator().manual_seed(5)
    draws = Draws(index=torch.zeros(B, dtype=torch.long), latent_noise=torch.zeros(B, 4, 8, 8), t=torch.tensor([150, 640, 300, 820]),
                  noise=torch.randn(B, 4, 8, 8, generator=g), t_align=torch.tensor([90, 870, 400, 600]), noise_align=None)
    draws.noise_align = draws.noise
    s = dict(setup, z0=torch.randn(B, 4, 8, 8, generator=g), ids=setup["ids"][:1].repeat(B, 1))
    full = torch.cat([x.flatten() for x in palp_grads(s, cfg, draws)])
    samples, grads = [], {}  # the gradient is a function of the drawn weights: C(4, 2) = 6 of them
    for seed in range(60):
        w = draw(torch.Generator().manual_seed(seed), sub_cfg, n_images=1, batch=B, latent_shape=(4, 8, 8), num_timesteps=1000).align_weight
        key = tuple(w.tolist())
        if key not in grads:
            d = Draws(draws.index, draws.latent_noise, draws.t, draws.noise, draws.t_align, draws.noise_align, w)
            grads[key] = torch.cat([x.flatten() for x in palp_grads(s, sub_cfg, d)])
        samples.append(grads[key])
    assert 1 < len(grads) <= 6
    samples = torch.stack(samples)
    mean, se = samples.mean(0), samples.std(0) / len(samples) ** 0.5
    varied = se > 1e-9
    assert varied.sum() > 100  # the alignment term reaches the parameters
    assert ((mean - full).abs()[varied] <= 4 * se[varied] + 1e-7).float().mean() > 0.99
