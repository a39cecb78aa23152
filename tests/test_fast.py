"""The speed options change how a step runs, never what it computes (palp/models/speed.py).

Each is checked against the plain formulation on the tiny model: the per-row LoRA gate against
separate calls with the adapters disabled and enabled (fp64, so batching cannot hide an
error), gradient checkpointing and torch.compile against the eager step's gradients.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from palp.core import settings
from palp.core.prompts import to_token_prompt
from palp.core.settings import Subject, TrainConfig
from palp.method.step_inputs import Draws, encode_fixed_prompts, tokenize
from palp.models import lora_gate
from palp.models import speed as fast
from palp.models.base_model import load_base_model
from palp.models.personalize import build_personalized_model
from palp.steps.train import step_losses


def _model(dtype=torch.float32, targets="attention"):
    torch.manual_seed(0)
    base = load_base_model("tiny")
    model, _, _ = build_personalized_model(base, {"[V]": "cat"}, rank=4, targets=targets)
    with torch.no_grad():  # a LoRA and [V] away from their initial values: adapted != pretrained
        for p in model.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    return base, model.to(dtype)


@pytest.fixture(scope="module", params=["attention", "attention+resnets"])
def tiny64(request):
    return _model(torch.float64, targets=request.param)


def test_gated_call_equals_separate_calls(tiny64):
    """Rows with gate 0 are the pretrained model, rows with 1 the personalized one, in one call."""
    _, model = tiny64
    g = torch.Generator().manual_seed(3)
    B = 3
    x = torch.randn(B, 4, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([7, 420, 981])
    s_pre, s_pers = (torch.randn(B, 77, 32, generator=g, dtype=torch.float64) for _ in range(2))
    with torch.no_grad():
        with model.adapters_disabled():
            pre = model.predict(x, t, s_pre)
        pers = model.predict(x, t, s_pers)
        assert (pre - pers).abs().max() > 1e-2  # the two models differ
        lora = lora_gate.row_flags([(B, 0.0), (B, 1.0)], device="cpu")
        both = model.predict_gated(torch.cat([x, x]), torch.cat([t, t]), torch.cat([s_pre, s_pers]), lora)
        # Interleaved rows too: the gate follows each row, not a split point.
        order = torch.tensor([3, 0, 4, 1, 5, 2])
        mixed = model.predict_gated(torch.cat([x, x])[order], torch.cat([t, t])[order], torch.cat([s_pre, s_pers])[order],
                                    lora[order])
        after = model.predict(x, t, s_pers)  # outside the gate nothing changes
    torch.testing.assert_close(both[:B], pre, rtol=0, atol=1e-12)
    torch.testing.assert_close(both[B:], pers, rtol=0, atol=1e-12)
    torch.testing.assert_close(mixed, torch.cat([pre, pers])[order], rtol=0, atol=1e-12)
    torch.testing.assert_close(after, pers, rtol=0, atol=0)


def test_gate_refuses_flags_that_do_not_match_the_rows(tiny64):
    _, model = tiny64
    x, t, s = torch.zeros(2, 4, 8, 8, dtype=torch.float64), torch.tensor([1, 2]), torch.zeros(2, 77, 32, dtype=torch.float64)
    with torch.no_grad(), pytest.raises(RuntimeError, match="LoRA gate of 3 rows met a LoRA input of 2 rows"):
        model.predict_gated(x, t, s, torch.ones(3))


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(subjects=[Subject("[V]", "unused", "cat")], target_prompt="A sketch of [V] in Paris at night",
                       output="unused", pretrained_model="tiny", lora_rank=4, **kw)


def _step_grads(base, model, cfg: TrainConfig) -> list[torch.Tensor]:
    """The gradient of one palp step (fixed draws) with respect to LoRA and [V]."""
    g = torch.Generator().manual_seed(1)
    B = 2
    noise = torch.randn(B, 4, 8, 8, generator=g)
    draws = Draws(index=torch.zeros(B, dtype=torch.long), latent_noise=torch.zeros_like(noise), t=torch.tensor([150, 640]),
                  noise=noise, t_align=torch.tensor([90, 870]), noise_align=noise)
    z0 = torch.randn(B, 4, 8, 8, generator=g)
    ids = tokenize(base.tokenizer, [to_token_prompt("A photo of [V]")] * B)
    cond = encode_fixed_prompts(model, base.tokenizer, cfg, "cpu")
    loss, _ = step_losses(model, z0=z0, input_ids=ids, draws=draws, cond=cond,
                          alphas_cumprod=base.noise_scheduler.alphas_cumprod, cfg=cfg)
    return list(torch.autograd.grad(loss, model.trainable_parameters()))


@pytest.fixture()
def tiny32():
    return _model(torch.float32)


def _assert_same(actual, expected, rtol=1e-5):
    assert len(actual) == len(expected) and any(float(e.abs().max()) > 0 for e in expected)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=rtol, atol=rtol * max(1e-6, float(e.abs().max())))


@pytest.mark.parametrize("beta", [7.5, 1.0])
def test_fused_and_separate_guidance_give_the_same_gradient(tiny32, beta):
    base, model = tiny32
    fused = _step_grads(base, model, _cfg(beta=beta, fused_guidance=True))
    separate = _step_grads(base, model, _cfg(beta=beta, fused_guidance=False))
    _assert_same(fused, separate)


def test_gradient_checkpointing_gives_the_same_gradient(tiny32):
    base, model = tiny32
    cfg = _cfg()
    plain = _step_grads(base, model, cfg)
    fast.set_gradient_checkpointing(model.unet, True)
    try:
        assert model.unet.is_gradient_checkpointing
        checkpointed = _step_grads(base, model, cfg)
    finally:
        fast.set_gradient_checkpointing(model.unet, False)
    _assert_same(checkpointed, plain)


def test_channels_last_gives_the_same_gradient(tiny32):
    base, model = tiny32
    cfg = _cfg()
    plain = _step_grads(base, model, cfg)
    fast.set_channels_last(model.unet, True)
    assert model.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    # Channels-last convolutions run other oneDNN kernels: fp32 sums in another order. Seen on
    # torch 2.14.1 / diffusers 0.42.1: one of 128 elements 1.6e-5 of the gradient's maximum off.
    _assert_same(_step_grads(base, model, cfg), plain, rtol=1e-4)


def test_compiled_step_gives_the_same_gradient(tiny32):
    """Regional compilation through dynamo + AOTAutograd (the ``aot_eager`` backend: what
    torch.compile traces, without generating kernels, which only a GPU run can time), forward
    and backward, through the LoRA layers and the gate (all of them live in the attention blocks)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    base, model = tiny32
    cfg = _cfg()
    plain = _step_grads(*_model(), cfg)  # a twin, so that this model is compiled before its first call
    before = counters["frames"]["ok"]
    compiled = fast.compile_unet(model.unet, "transformers", backend="aot_eager")
    try:
        assert compiled and {type(m).__name__ for m in compiled} == {"Transformer2DModel"}
        got = _step_grads(base, model, cfg)
        assert counters["frames"]["ok"] > before  # the compiled code ran
        graphs = counters["stats"]["unique_graphs"]
        _step_grads(base, model, cfg)
        assert counters["stats"]["unique_graphs"] == graphs  # a second step reuses every graph: no recompiling
    finally:
        fast.uncompile_unet(model.unet)
        torch._dynamo.reset()
    _assert_same(got, plain)
    # What the other settings select (compiled lazily, at a first call this test does not make).
    blocks = fast.compile_unet(model.unet, "blocks", backend="aot_eager")
    assert {type(m).__name__ for m in blocks} == {"Transformer2DModel", "ResnetBlock2D"}
    assert fast.compile_unet(model.unet, "unet", backend="aot_eager") == [model.unet]
    fast.uncompile_unet(model.unet)


def test_attention_kernel_choice_gives_the_same_gradient(tiny32):
    base, model = tiny32
    cfg = _cfg()
    plain = _step_grads(base, model, cfg)
    with fast.attention_backend("math"):
        _assert_same(_step_grads(base, model, cfg), plain)


def test_attention_choice_falls_back_where_its_kernel_cannot_run():
    """The VAE's one 512-wide head is refused by the flash and cuDNN kernels on the GPU; on the CPU
    the cuDNN kernel refuses everything. A chosen kernel that cannot run must hand over to the next,
    not stop the run with "No available kernel"."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 1, 16, 512, generator=g) for _ in range(3))
    with sdpa_kernel([SDPBackend.MATH]):
        reference = F.scaled_dot_product_attention(q, k, v)
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]), pytest.raises(RuntimeError):
        F.scaled_dot_product_attention(q, k, v)  # what a strict choice did
    for name in settings.ATTENTION_BACKENDS:
        with fast.attention_backend(name):
            torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v), reference)


def test_speed_settings_are_checked(tiny32):
    _, model = tiny32
    with pytest.raises(ValueError, match="attention backend must be one of"):
        fast.attention_backend("fastest")
    with pytest.raises(Exception, match="--attention must be one of"):
        _cfg(attention="xformers")
    with pytest.raises(ValueError, match="compile must be one of"):
        fast.compile_unet(model.unet, "everything")
    with pytest.raises(ValueError, match="compile mode must be one of"):
        fast.compile_unet(model.unet, "blocks", mode="fastest")
    assert fast.resolve_compile("auto", torch.device("cpu")) == "none"
    assert fast.resolve_compile("auto", torch.device("cuda")) == "blocks"
    with pytest.raises(Exception, match="--compile must be auto or one of"):
        _cfg(compile="all")


def test_compile_cache_round_trip(tmp_path, monkeypatch):
    """Kernels compiled in one place load into an empty cache elsewhere: the second compile hits."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    cache = str(tmp_path / "kept" / "cache.bin")
    assert not fast.load_compile_cache(cache)  # nothing kept yet: compile from scratch
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "first"))
    torch._dynamo.reset()
    x = torch.randn(8, 8)
    expected = torch.compile(lambda v: torch.nn.functional.gelu(v @ v) + 1)(x)
    assert fast.save_compile_cache(cache)
    fresh = tmp_path / "second"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(fresh))
    torch._dynamo.reset()
    counters.clear()
    assert fast.load_compile_cache(cache) and any(fresh.rglob("*"))  # the artifacts landed in the new cache
    got = torch.compile(lambda v: torch.nn.functional.gelu(v @ v) + 1)(x)
    assert counters["inductor"]["fxgraph_cache_hit"] >= 1 and counters["inductor"]["fxgraph_cache_miss"] == 0
    torch.testing.assert_close(got, expected)
    torch._dynamo.reset()


def test_a_failing_compiler_falls_back_to_the_eager_step(cat_images, tmp_path, monkeypatch, caplog):
    """If torch.compile fails on a machine, training goes on eagerly: the same weights as --compile none."""
    import logging

    import torch._dynamo
    from safetensors.torch import load_file

    from conftest import train_args
    from palp.cli import main

    def broken_backend(graph, example_inputs):
        raise RuntimeError("no code generator here")

    real = fast.compile_unet
    monkeypatch.setattr(fast, "compile_unet", lambda unet, how, **kw: real(unet, how, backend=broken_backend))
    torch._dynamo.reset()
    try:
        with caplog.at_level(logging.WARNING, logger="palp.steps.train"):
            assert main(train_args(cat_images, tmp_path / "fallback", "--compile", "transformers", steps=1)) == 0
    finally:
        torch._dynamo.reset()
    assert "torch.compile failed (BackendCompilerFailed" in caplog.text
    assert main(train_args(cat_images, tmp_path / "eager", "--compile", "none", steps=1)) == 0
    for name in ("pytorch_lora_weights.safetensors", "learned_embeds.safetensors"):
        a, b = load_file(tmp_path / "fallback" / name), load_file(tmp_path / "eager" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
