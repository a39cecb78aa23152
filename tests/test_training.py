"""Training end to end on the tiny model: invariants, stock-diffusers round trip, resume, outputs."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, train_args
from palp.cli import main
from palp.core.prompts import to_token_prompt
from palp.core.settings import LORA_TARGET_SETS, LORA_TARGETS
from palp.method.step_inputs import tokenize
from palp.models.base_model import load_base_model
from palp.models.personalize import build_personalized_model
from palp.models.run_weights import EMBEDS_FILE, LORA_FILE


def _train(images, out, *extra, steps=3):
    assert main(train_args(images, out, *extra, steps=steps)) == 0


def test_lora_wraps_only_the_four_projections_and_disabled_equals_base(tiny_dir):
    from peft.tuners.lora import LoraLayer

    base = load_base_model("tiny")
    untouched = load_base_model("tiny").unet
    model, _, _ = build_personalized_model(base, {"[V]": "cat"}, rank=4)
    wrapped = [n for n, m in model.unet.named_modules() if isinstance(m, LoraLayer)]
    assert wrapped and all(n.endswith(LORA_TARGETS) for n in wrapped)
    attn = [n for n, m in untouched.named_modules() if type(m).__name__ == "Attention"]
    assert sorted(wrapped) == sorted(f"{a}.{p}" for a in attn for p in LORA_TARGETS)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".lora_A." in n or ".lora_B." in n or n.endswith("learned") for n in trainable)
    with torch.no_grad():  # make the adapter matter, then switch it off
        for n, p in model.unet.named_parameters():
            if "lora_B" in n:
                p.normal_()
        x, t, states = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 77, 32)
        with model.adapters_disabled():
            off = model.predict(x, t, states)
        on = model.predict(x, t, states)
        torch.testing.assert_close(off, untouched(x, t, encoder_hidden_states=states).sample, rtol=0, atol=0)
        assert not torch.allclose(on, off)


def test_training_leaves_base_weights_and_other_embedding_rows_bit_identical(cat_images, tmp_path, tiny_dir):
    from palp.cli import build_parser, config_from_args
    from palp.steps.train import train

    args = build_parser().parse_args(train_args(cat_images, tmp_path / "run", "--lr", "1e-2", steps=3))
    result = train(config_from_args(args), progress=False)
    reference = load_base_model("tiny")
    ref_unet = reference.unet.state_dict()
    for name, tensor in result.model.unet.state_dict().items():
        if "lora_" in name:
            continue
        key = name.replace(".base_layer", "")
        assert torch.equal(tensor, ref_unet[key]), name
    ref_te = reference.text_encoder.state_dict()
    emb = result.model.placeholder_embedding
    for name, tensor in result.model.text_encoder.state_dict().items():
        if name.endswith("learned"):
            continue
        assert torch.equal(tensor, ref_te[name.replace("token_embedding.base.", "token_embedding.")]), name
    # The placeholder row moved away from its class-word initialisation.
    cat_id = reference.tokenizer("cat", add_special_tokens=False).input_ids
    assert not torch.equal(emb.learned.detach()[0], reference.text_encoder.get_input_embeddings().weight[cat_id].mean(0))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A short palp run with a large lr, so the result differs clearly from the base model."""
    from conftest import EXAMPLE_CAT
    from palp.cli import build_parser, config_from_args
    from palp.steps.train import train

    out = tmp_path_factory.mktemp("trained") / "run"
    args = build_parser().parse_args(train_args(EXAMPLE_CAT, out, "--lr", "1e-2", "--save-steps", "2,4", steps=4))
    return train(config_from_args(args), progress=False)


def test_round_trip_through_stock_diffusers(trained, tiny_dir):
    """StableDiffusionPipeline + load_lora_weights + load_textual_inversion == palp's model."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir)
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([50, 700])
    prompt = "A sketch of <v> in Paris at night"

    def stock_eps():
        ids = tokenize(pipe.tokenizer, [prompt] * 2)
        with torch.no_grad():
            return pipe.unet(x, t, encoder_hidden_states=pipe.text_encoder(ids)[0]).sample

    pipe.load_textual_inversion(trained.output)  # the base model has no <v> before this
    base_eps = stock_eps()
    pipe.load_lora_weights(trained.output)
    stock = stock_eps()
    with torch.no_grad():
        ours = trained.model.predict(x, t, trained.model.encode(tokenize(trained.tokenizer, [prompt] * 2)))
    torch.testing.assert_close(stock, ours, rtol=1e-5, atol=1e-6)
    assert (stock - base_eps).abs().max() > 1e-3
    # The embeddings file holds one key per placeholder token, as load_textual_inversion wants.
    assert list(load_file(trained.output / EMBEDS_FILE)) == ["<v>"]


def test_lora_on_resnets_wraps_their_convolutions_and_round_trips_through_stock_diffusers(tmp_path, tiny_dir):
    """--lora-targets attention+resnets: LoRA on the attention projections and on both 3x3
    convolutions of every ResNet block, nothing else; the saved file loads into the stock
    pipeline (load_lora_weights) as the same model."""
    from diffusers import StableDiffusionPipeline
    from diffusers.models.resnet import ResnetBlock2D
    from peft.tuners.lora import LoraLayer

    from conftest import EXAMPLE_CAT
    from palp.cli import build_parser, config_from_args
    from palp.steps.train import train

    args = build_parser().parse_args(train_args(EXAMPLE_CAT, tmp_path / "run", "--lr", "1e-2", "--method", "ti-db",
                                                "--lora-targets", "attention+resnets", steps=2))
    result = train(config_from_args(args), progress=False)
    untouched = load_base_model("tiny").unet
    attn = [n for n, m in untouched.named_modules() if type(m).__name__ == "Attention"]
    resnets = [n for n, m in untouched.named_modules() if isinstance(m, ResnetBlock2D)]
    wrapped = [n for n, m in result.model.unet.named_modules() if isinstance(m, LoraLayer)]
    assert sorted(wrapped) == sorted([f"{a}.{p}" for a in attn for p in LORA_TARGETS]
                                     + [f"{r}.{c}" for r in resnets for c in ("conv1", "conv2")])
    assert set(LORA_TARGET_SETS["attention+resnets"]) == {*LORA_TARGETS, "conv1", "conv2"}

    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir)
    pipe.load_textual_inversion(result.output)
    pipe.load_lora_weights(result.output)
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([50, 700])
    ids = tokenize(pipe.tokenizer, ["A photo of <v>"] * 2)
    with torch.no_grad():
        stock = pipe.unet(x, t, encoder_hidden_states=pipe.text_encoder(ids)[0]).sample
        states = result.model.encode(tokenize(result.tokenizer, ["A photo of <v>"] * 2))
        ours = result.model.predict(x, t, states)
        with result.model.adapters_disabled():
            base = result.model.predict(x, t, states)
    torch.testing.assert_close(stock, ours, rtol=1e-5, atol=1e-6)
    assert (ours - base).abs().max() > 1e-3


def test_outputs_metrics_config_and_snapshots(trained):
    out = trained.output
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert set(rows[0]) == {"step", "loss", "rec_loss", "align_loss", "grad_norm", "lr"}
    assert all(float(r["align_loss"]) > 0 and float(r["lr"]) == 1e-2 for r in rows)
    config = json.loads((out / "training_config.json").read_text())
    assert config["class_words"] == {"[V]": "cat"} and config["placeholder_tokens"] == {"[V]": "<v>"}
    assert config["clean_prompt"] == "A sketch of a cat in Paris at night"
    assert config["method"] == "palp" and config["alpha"] == 15.0 and config["beta"] == 7.5
    assert config["pretrained_model"] == "tiny" and config["completed_steps"] == 4
    for step in (2, 4):
        snap = out / "snapshots" / f"step-{step:06d}"
        assert (snap / LORA_FILE).is_file() and (snap / EMBEDS_FILE).is_file()
    final, snap4 = load_file(out / LORA_FILE), load_file(out / "snapshots/step-000004" / LORA_FILE)
    assert all(torch.equal(final[k], snap4[k]) for k in final)
    snap2 = load_file(out / "snapshots/step-000002" / LORA_FILE)
    assert any(not torch.equal(final[k], snap2[k]) for k in final)


def _weights(out):
    return {**load_file(out / LORA_FILE), **load_file(out / EMBEDS_FILE)}


def test_resume_after_exit_is_identical(cat_images, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _train(cat_images, straight, "--checkpoint-every", "3", "--lr", "1e-3", steps=6)
    # 3 steps in a process that exits, then --resume to 6 in another.
    first = train_args(cat_images, resumed, "--checkpoint-every", "3", "--lr", "1e-3", steps=3)
    subprocess.run([sys.executable, "-m", "palp", *first], check=True, cwd=REPO)
    _train(cat_images, resumed, "--checkpoint-every", "3", "--lr", "1e-3", "--resume", steps=6)
    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (straight / "metrics.csv").read_text() == (resumed / "metrics.csv").read_text()


def test_resume_with_changed_method_is_refused(cat_images, tmp_path, capsys):
    out = tmp_path / "run"
    _train(cat_images, out, "--checkpoint-every", "1", steps=2)
    assert main(train_args(cat_images, out, "--method", "sds", "--resume", steps=4)) == 2
    assert 'settings differ from the checkpointed run in method ("palp" -> "sds")' in capsys.readouterr().err
    assert main(train_args(cat_images, out, steps=4)) == 2  # no silent overwrite either
    assert "already holds a finished run" in capsys.readouterr().err


def test_a_run_checkpointed_before_newer_settings_resumes(cat_images, tmp_path, capsys):
    """Checkpoints whose recorded settings predate --token-init, --hflip, --prompt-templates and
    --scale-augmentation resume under today's defaults, which are what such a run did; PALP over
    Custom Diffusion, whose defaults changed since, is refused, naming the settings, and resumes
    with the old ones given."""
    import json

    from palp.steps.checkpoints import BEFORE_SETTINGS

    cd = ["--personalize", "custom-diffusion"]
    for extra, refused in (([], None), (cd, 'scale_augmentation (false -> true), token_init ("class" -> "rare")')):
        out = tmp_path / ("cd" if extra else "lora")

        def argv(*more, steps):
            args = train_args(cat_images, out, *extra, *more, steps=steps)
            return [a for i, a in enumerate(args) if not (extra and "--lora-rank" in args[i - 1: i + 1])]

        assert main(argv("--checkpoint-every", "1", steps=2)) == 0
        recorded = out / "checkpoints" / "config.json"
        settings = json.loads(recorded.read_text())
        newer = {k: BEFORE_SETTINGS[k] for k in ("token_init", "hflip", "prompt_templates", "scale_augmentation")}
        now = {k: settings.pop(k) for k in newer}
        assert now == (newer if refused is None else {**newer, "token_init": "rare", "scale_augmentation": True})
        recorded.write_text(json.dumps(settings))  # as a run from before these settings recorded itself
        if refused is None:
            assert main(argv("--resume", steps=3)) == 0
            continue
        assert main(argv("--resume", steps=3)) == 2
        assert f"settings differ from the checkpointed run in {refused}" in capsys.readouterr().err
        assert main(argv("--token-init", "class", "--scale-augmentation", "off", "--resume", steps=3)) == 0


def test_non_finite_loss_stops_with_the_step_and_keeps_the_checkpoint(cat_images, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(train_args(cat_images, out, "--lr", "1e30", "--max-grad-norm", "0", "--checkpoint-every", "1", steps=20))
    err = capsys.readouterr().err
    assert code == 2 and "non-finite" in err and "at step" in err
    step = int(err.split("at step ")[1].split(":")[0])
    assert 1 < step <= 20
    assert not (out / LORA_FILE).exists() and not (out / "training_config.json").exists()
    assert f"checkpoint (step {step - 1}) is intact" in err
    ckpt = load_file(out / "checkpoints" / f"step-{step - 1:06d}" / "trainable.safetensors")
    assert all(torch.isfinite(v).all() for v in ckpt.values())


def test_run_stopped_by_a_non_finite_loss_resumes_from_its_checkpoint(cat_images, tmp_path, monkeypatch, capsys):
    """A NaN at step 3 (injected into the loss) leaves checkpoint 2; --resume with a new lr finishes."""
    import palp.steps.train as tr

    real, calls = tr.step_losses, []

    def nan_at_third_call(model, **kw):
        loss, m = real(model, **kw)
        calls.append(1)
        return (loss * float("nan"), m) if len(calls) == 3 else (loss, m)

    out = tmp_path / "run"
    monkeypatch.setattr(tr, "step_losses", nan_at_third_call)
    # an explicit micro-batch: no memory probe, so step_losses' third call is step 3's
    assert main(train_args(cat_images, out, "--checkpoint-every", "1", "--micro-batch-size", "2", steps=5)) == 2
    assert "non-finite loss at step 3" in capsys.readouterr().err
    monkeypatch.setattr(tr, "step_losses", real)
    assert main(train_args(cat_images, out, "--checkpoint-every", "1", "--lr", "1e-4", "--resume", steps=5)) == 0
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5]
    assert [float(r["lr"]) for r in rows] == [5e-5, 5e-5, 1e-4, 1e-4, 1e-4]


def test_multi_subject_uses_each_subjects_personalization_prompt(cat_images, tmp_path, monkeypatch):
    import palp.steps.train as tr

    seen = []
    real = tr.step_losses

    def spy(model, **kw):
        seen.append(kw["input_ids"].clone())
        return real(model, **kw)

    monkeypatch.setattr(tr, "step_losses", spy)
    args = ["train", "--images", f"[V1]={cat_images}", "--images", f"[V2]={cat_images}",
            "--class-word", "[V1]=cat", "--class-word", "[V2]=dog",
            "--personalization-prompt", "[V2]=An oil painting of [V2]",
            "--prompt", "An oil painting of [V1] inspired by [V2] painting", "--pretrained-model", "tiny",
            "--steps", "2", "--batch-size", "8", "--lora-rank", "4", "--output", str(tmp_path / "run"), "--quiet"]
    assert main(args) == 0
    config = json.loads((tmp_path / "run" / "training_config.json").read_text())
    assert config["clean_prompt"] == "An oil painting of a cat inspired by a dog painting"
    assert config["placeholder_tokens"] == {"[V1]": "<v1>", "[V2]": "<v2>"}
    base = load_base_model("tiny")
    base.tokenizer.add_tokens(["<v1>", "<v2>"])
    expected = {tuple(tokenize(base.tokenizer, [to_token_prompt(p)])[0].tolist())
                for p in ("A photo of [V1]", "An oil painting of [V2]")}
    rows = {tuple(r.tolist()) for ids in seen for r in ids}
    assert rows == expected  # both subjects' y_P appear, nothing else
    assert list(load_file(tmp_path / "run" / EMBEDS_FILE)) == ["<v1>", "<v2>"]


def test_gradient_accumulation_matches_one_big_batch(cat_images, tmp_path, monkeypatch):
    """Global batch 4 as 1 x 4 accumulation takes the step of 4 at once.

    Trained with plain SGD in AdamW's place: Adam divides each coordinate by its own gradient's
    size, so it would hide a wrongly scaled accumulated gradient, and it turns fp32 summation
    noise on near-zero coordinates into whole steps. With SGD each run's weights move by lr
    times its gradients, and the two runs agree to summation order, far below that movement."""
    sgd = lambda params, lr, weight_decay, fused=False: torch.optim.SGD(params, lr=lr)  # noqa: E731
    monkeypatch.setattr(torch.optim, "AdamW", sgd)
    _train(cat_images, tmp_path / "big", "--batch-size", "4", "--lr", "1", steps=2)
    _train(cat_images, tmp_path / "acc", "--batch-size", "4", "--micro-batch-size", "1", "--lr", "1", steps=2)
    a, b = _weights(tmp_path / "big"), _weights(tmp_path / "acc")
    moved = [v for k, v in a.items() if "lora.up" in k or "lora_B" in k]  # zero at the start: all of it movement
    assert moved and max(v.abs().max() for v in moved) > 1e-4
    for k in a:
        scale = a[k].abs().max() if ("lora.up" in k or "lora_B" in k) else 1.0
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-4 * scale + 1e-6)


def test_bf16_keeps_trainable_parameters_fp32(cat_images, tmp_path):
    from palp.cli import build_parser, config_from_args
    from palp.steps.train import train

    args = build_parser().parse_args(train_args(cat_images, tmp_path / "run", "--mixed-precision", "bf16", steps=2))
    result = train(config_from_args(args), progress=False)
    assert {p.dtype for p in result.model.trainable_parameters()} == {torch.float32}
    frozen = {p.dtype for p in result.model.parameters() if not p.requires_grad}
    assert frozen == {torch.bfloat16}
    assert all(torch.isfinite(v).all() and v.dtype == torch.float32 for v in _weights(tmp_path / "run").values())


def test_gcs_output_checkpoints_and_resume_on_a_new_machine(cat_images, tmp_path, gcs_emulator):
    """Train into gs://, lose the local working folder, --resume from the bucket: identical weights."""
    import shutil

    from palp.core import gcs, storage
    from palp.steps.checkpoints import local_mirror

    gcs.gcs_client().create_bucket("palp-train-test")
    remote = "gs://palp-train-test/runs/cat"
    _train(cat_images, tmp_path / "straight", "--checkpoint-every", "3", "--lr", "1e-3", steps=6)
    _train(cat_images, remote, "--checkpoint-every", "3", "--lr", "1e-3", "--save-steps", "3", steps=3)
    names = storage.list_files(remote, recursive=True)
    assert "checkpoints/step-000003/state.json" in names and "snapshots/step-000003/pytorch_lora_weights.safetensors" in names
    shutil.rmtree(local_mirror(remote))  # a preempted job restarts on another machine
    _train(cat_images, remote, "--checkpoint-every", "3", "--lr", "1e-3", "--save-steps", "3", "--resume", steps=6)
    for name in (LORA_FILE, EMBEDS_FILE):
        a = load_file(tmp_path / "straight" / name)
        storage.write_bytes(tmp_path / "from-gcs" / name, storage.read_bytes(f"{remote}/{name}"))
        b = load_file(tmp_path / "from-gcs" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert storage.read_text(f"{remote}/metrics.csv") == (tmp_path / "straight" / "metrics.csv").read_text()
    assert json.loads(storage.read_text(f"{remote}/training_config.json"))["completed_steps"] == 6


def test_sub_sampled_alignment_trains_across_micro_batches(tiny_dir, cat_images, tmp_path, capsys):
    """--align-fraction 0.25 with a batch of 4 in micro-batches of 2: one micro-batch of each step
    has no drawn row and takes Eq. 1 alone; the run finishes and records the option; a bad value
    is one clear error."""
    out = tmp_path / "run"
    assert main(train_args(cat_images, out, "--align-fraction", "0.25", "--batch-size", "4", "--micro-batch-size", "2", steps=2)) == 0
    cfg = json.loads((out / "training_config.json").read_text())
    assert cfg["align_fraction"] == 0.25 and cfg["completed_steps"] == 2
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert len(rows) == 2 and all(float(r["align_loss"]) > 0 for r in rows)
    capsys.readouterr()
    assert main(train_args(cat_images, tmp_path / "bad", "--align-fraction", "0", steps=1)) != 0
    assert "--align-fraction must be in (0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
