"""DreamBooth's prior preservation (``palp train --prior-preservation``) on the tiny model: the
loss against the hand-computed sum, the class-image cache, the class images against the stock
diffusers pipeline, micro-batches and --resume, and bad input."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import EXAMPLE_CAT, REPO, assert_identical_runs, run_weights, train_args
from palp.cli import main
from palp.core.prompts import to_token_prompt
from palp.core.settings import Subject, TrainConfig
from palp.method.step_inputs import ClassRows, Draws, draw, encode_fixed_prompts, tokenize
from palp.models.base_model import load_base_model
from palp.models.personalize import build_personalized_model
from palp.steps.train import step_losses

EXAMPLE_CUP = REPO / "examples" / "subjects" / "cup"
# Fast class images: two per class word, two DDIM steps each.
PRIOR = ("--prior-preservation", "--num-class-images", "2", "--class-image-steps", "2")


def _cfg(method: str, **kw) -> TrainConfig:
    return TrainConfig(subjects=[Subject("[V]", "unused", "cat")], target_prompt="A sketch of [V] in Paris at night",
                       output="unused", pretrained_model="tiny", lora_rank=4, method=method, **kw)


@pytest.fixture(scope="module")
def fixed(tiny_dir):
    """A LoRA and [V] moved off their initial values, and one fixed batch of subject and class rows."""
    torch.manual_seed(0)
    base = load_base_model("tiny")
    model, _, _ = build_personalized_model(base, {"[V]": "cat"}, rank=4)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    g = torch.Generator().manual_seed(3)
    B, shape = 2, (2, 4, 8, 8)
    subject = Draws(index=torch.zeros(B, dtype=torch.long), latent_noise=torch.zeros(shape), t=torch.tensor([90, 610]),
                    noise=torch.randn(shape, generator=g), t_align=torch.tensor([300, 700]),
                    noise_align=torch.randn(shape, generator=g))
    z0, z0_class, class_noise = torch.randn(shape, generator=g), torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    class_t = torch.tensor([420, 35])
    class_ids = tokenize(base.tokenizer, ["A photo of a cat"] * B)
    rows = ClassRows(z0=z0_class, input_ids=class_ids,
                     draws=Draws(torch.zeros(B, dtype=torch.long), torch.zeros(shape), class_t, class_noise, None, None))
    return dict(base=base, model=model, z0=z0, ids=tokenize(base.tokenizer, [to_token_prompt("A photo of [V]")] * B),
                subject=subject, rows=rows, ab=base.noise_scheduler.alphas_cumprod)


def _unet_eps(s, z0, noise, t, ids):
    """eps_theta(z_t, t, text) written out: the forward process, the text encoder and the UNet
    (LoRA on, the learned [V] in the embedding), called directly."""
    a = s["ab"][t].view(-1, 1, 1, 1)
    z_t = a.sqrt() * z0 + (1 - a).sqrt() * noise
    return s["base"].unet(z_t, t, encoder_hidden_states=s["base"].text_encoder(ids)[0]).sample


@pytest.mark.parametrize("method", ["ti-db", "palp", "sds", "nfsd"])
def test_loss_is_the_subject_loss_plus_the_weighted_class_mse(fixed, method):
    """loss = (the method's loss on the subject rows) + w * ||eps(class rows) - eps_class||^2,
    each MSE computed here from the fixed noise and the UNet's predictions; the gradients too.
    The alignment term touches the subject rows only."""
    s, w = fixed, 0.7
    cfg = _cfg(method, prior_preservation=True, prior_weight=w, num_class_images=2)
    params = s["model"].trainable_parameters()
    cond = encode_fixed_prompts(s["model"], s["base"].tokenizer, cfg, "cpu")
    common = dict(z0=s["z0"], input_ids=s["ids"], draws=s["subject"], cond=cond, alphas_cumprod=s["ab"], cfg=cfg)
    loss, m = step_losses(s["model"], **common, prior=s["rows"])
    without, m0 = step_losses(s["model"], **common)

    c = s["rows"]
    subject_mse = ((_unet_eps(s, s["z0"], s["subject"].noise, s["subject"].t, s["ids"]) - s["subject"].noise) ** 2).mean()
    class_mse = ((_unet_eps(s, c.z0, c.draws.noise, c.draws.t, c.input_ids) - c.draws.noise) ** 2).mean()
    torch.testing.assert_close(m["prior_loss"], class_mse.detach(), rtol=1e-5, atol=0)
    torch.testing.assert_close(m["rec_loss"], subject_mse.detach(), rtol=1e-5, atol=0)
    torch.testing.assert_close(loss, without + w * class_mse, rtol=1e-5, atol=0)
    if method == "ti-db":
        torch.testing.assert_close(loss, subject_mse + w * class_mse, rtol=1e-5, atol=0)
    else:  # the alignment term is the subject rows' alone: the same with and without the class rows
        assert m["align_loss"] > 0
        torch.testing.assert_close(m["align_loss"], m0["align_loss"], rtol=0, atol=0)
    got = torch.autograd.grad(loss, params)
    class_grads = torch.autograd.grad(class_mse, params)
    assert any(g.abs().max() > 0 for g in class_grads)  # the class rows do move the weights
    expected = [a + w * b for a, b in zip(torch.autograd.grad(without, params), class_grads)]
    for g_got, g_exp in zip(got, expected):
        torch.testing.assert_close(g_got, g_exp, rtol=1e-4, atol=1e-8)


def test_each_class_row_comes_from_its_subjects_class_set():
    """Two subjects with other class words: every class row is an image of its row's subject's set;
    the subject rows' draws are those of a run without the option."""
    cfg = TrainConfig(subjects=[Subject("[V1]", "a", "cat"), Subject("[V2]", "b", "cup")],
                      target_prompt="A watercolour of [V1] beside [V2]", output="unused", prior_preservation=True,
                      num_class_images=5)
    plain = TrainConfig(subjects=cfg.subjects, target_prompt=cfg.target_prompt, output="unused")
    sets = torch.tensor([0, 0, 0, 1, 1])  # three photos of the cat, two of the cup
    d = draw(torch.Generator().manual_seed(7), cfg, n_images=5, batch=64, latent_shape=(4, 8, 8), num_timesteps=1000,
             class_sets=sets)
    assert torch.equal(d.class_index // 5, sets[d.index])
    assert set((d.class_index % 5).tolist()) == set(range(5)) and set(sets[d.index].tolist()) == {0, 1}
    assert d.class_noise.shape == d.noise.shape and 0 <= int(d.class_t.min()) and int(d.class_t.max()) < 1000
    p = draw(torch.Generator().manual_seed(7), plain, n_images=5, batch=64, latent_shape=(4, 8, 8), num_timesteps=1000)
    assert p.class_index is None
    assert all(torch.equal(getattr(d, k), getattr(p, k)) for k in ("index", "latent_noise", "t", "noise", "t_align", "noise_align"))


def _set_folders(cache) -> list:
    root = cache / "class-images"
    return sorted(p for p in root.iterdir() if not p.name.startswith(".")) if root.is_dir() else []


def test_class_images_are_cached_reused_and_made_again_when_damaged(tmp_path, monkeypatch, capsys):
    """A private palp cache: the first run makes the set, the second reuses it (same files, untouched);
    another count or another base model is another set; a truncated image or a lost manifest
    makes the set again, whole and the same."""
    from palp.models.tiny import tiny_model_dir

    cache = tmp_path / "cache"
    monkeypatch.setenv("PALP_CACHE", str(cache))

    def run(name, *extra):
        capsys.readouterr()
        assert main(train_args(EXAMPLE_CAT, tmp_path / name, *PRIOR, *extra, steps=1)) == 0
        return capsys.readouterr().err

    assert "generating 2 class images of 'A photo of a cat'" in run("first")
    [folder] = _set_folders(cache)
    files = sorted(folder.glob("class-*.png"))
    assert len(files) == 2 and (folder / "manifest.json").is_file()
    before = {f.name: (f.stat().st_ino, f.stat().st_mtime_ns, f.read_bytes()) for f in files}
    err = run("second")
    assert f"reusing 2 class images of 'A photo of a cat' from {folder}" in err and "generating" not in err
    assert {f.name: (f.stat().st_ino, f.stat().st_mtime_ns, f.read_bytes()) for f in files} == before
    first = json.loads((tmp_path / "first" / "training_config.json").read_text())["class_images"]["cat"]
    assert first == json.loads((tmp_path / "second" / "training_config.json").read_text())["class_images"]["cat"]
    assert first["key"] == folder.name and first["prompt"] == "A photo of a cat" and first["count"] == 2

    assert "generating 3 class images" in run("three", "--num-class-images", "3")
    assert len(_set_folders(cache)) == 2
    # The same weights in another folder are the same model (its pin): the set is reused;
    # one changed weight is another model, and another set.
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir(), copy)
    assert "reusing 2 class images" in run("copied", "--pretrained-model", str(copy))
    from safetensors.torch import load_file, save_file

    [unet_file] = (copy / "unet").glob("*.safetensors")
    weights = load_file(unet_file)
    name = sorted(weights)[0]
    weights[name] = weights[name] + 1e-3
    save_file(weights, str(unet_file), metadata={"format": "pt"})
    assert "generating 2 class images" in run("changed", "--pretrained-model", str(copy))
    assert len(_set_folders(cache)) == 3

    # A truncated image: found damaged, made again whole (the same pixels: the set is seeded).
    files[0].write_bytes(before[files[0].name][2][:100])
    assert "incomplete or damaged; generating it again" in run("truncated")
    assert {f.name: f.read_bytes() for f in files} == {k: v[2] for k, v in before.items()}
    (folder / "manifest.json").unlink()  # a set cut off before its manifest: never used
    assert "incomplete or damaged; generating it again" in run("no-manifest")
    assert (folder / "manifest.json").is_file()


def test_class_images_are_the_base_models_samples_of_the_class_prompt(tmp_path, monkeypatch, capsys):
    """The set equals palp's own sampler (generate) on the base model with the class prompt and
    each image's seed, bit for bit, and the stock diffusers pipeline within one 8-bit level; the
    training loads exactly those pixels."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from palp.models.denoising import build_pipeline, generate, initial_latents, sample_seed
    from palp.models.tiny import tiny_model_dir

    monkeypatch.setenv("PALP_CACHE", str(tmp_path / "cache"))
    assert main(train_args(EXAMPLE_CAT, tmp_path / "run", "--prior-preservation", "--num-class-images", "3",
                           "--class-image-steps", "3", "--method", "ti-db", steps=1)) == 0
    record = json.loads((tmp_path / "run" / "training_config.json").read_text())["class_images"]["cat"]
    folder = tmp_path / "cache" / "class-images" / record["key"]
    ours = np.stack([np.asarray(Image.open(folder / f"class-{i:05d}.png")) for i in range(3)])

    prompt = "A photo of a cat"
    latents = initial_latents([sample_seed(0, prompt, i) for i in range(3)], (4, 8, 8))
    pipe = build_pipeline(tiny_model_dir(), scheduler="ddim", device=torch.device("cpu"), dtype=torch.float32)
    own = generate(pipe, [prompt] * 3, latents, steps=3, guidance=7.5)  # one batch, as the set was made
    assert np.array_equal(ours, own)
    stock = StableDiffusionPipeline.from_pretrained(tiny_model_dir(), safety_checker=None, requires_safety_checker=False)
    stock.scheduler = DDIMScheduler.from_config(stock.scheduler.config)
    stock.set_progress_bar_config(disable=True)
    expected = stock([prompt] * 3, num_inference_steps=3, guidance_scale=7.5, latents=latents, output_type="np").images
    assert np.abs(ours.astype(np.int16) - (expected * 255).round().astype(np.int16)).max() <= 1
    assert not np.array_equal(ours[0], ours[1])  # each image its own seed

    base = load_base_model("tiny")
    base_pixels = torch.from_numpy(own.astype(np.float32) / 127.5 - 1).permute(0, 3, 1, 2)
    from palp.steps.class_images import ClassImageSet, load_class_pixels

    loaded = load_class_pixels(ClassImageSet(folder, {"count": 3}, "", generated=False))
    assert torch.equal(loaded, base_pixels) and loaded.shape[-1] == base.resolution


TWO = ["train", "--images", f"[V1]={EXAMPLE_CAT}", "--class-word", "[V1]=cat", "--images", f"[V2]={EXAMPLE_CUP}",
       "--class-word", "[V2]=cup", "--prompt", "A watercolour of [V1] beside [V2] on a table", "--pretrained-model", "tiny",
       "--lora-rank", "4", "--lr", "1e-3", "--batch-size", "4", "--quiet", *PRIOR]


def _two(out, steps, *extra):
    assert main([*TWO, "--steps", str(steps), "--output", str(out), *extra]) == 0


def test_micro_batches_and_resume_with_prior_preservation(tmp_path, capsys):
    """Two subjects of two class words (two class sets), PALP: a batch of 4 in micro-batches of 2
    trains what one batch of 4 does; a run stopped after step 1 and resumed is bit-identical to
    the uninterrupted one; the prior settings cannot change on --resume."""
    whole, micro = tmp_path / "whole", tmp_path / "micro"
    _two(whole, 2, "--micro-batch-size", "4", "--checkpoint-every", "1")
    _two(micro, 2, "--micro-batch-size", "2")
    a, b = run_weights(whole), run_weights(micro)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=2e-5)
    rows = list(csv.DictReader((whole / "metrics.csv").open()))
    assert [r["step"] for r in rows] == ["1", "2"] and all(float(r["prior_loss"]) > 0 for r in rows)
    micro_rows = list(csv.DictReader((micro / "metrics.csv").open()))
    for r, q in zip(rows, micro_rows):
        assert abs(float(r["prior_loss"]) - float(q["prior_loss"])) < 1e-5
    config = json.loads((whole / "training_config.json").read_text())
    assert config["prior_preservation"] is True and config["prior_weight"] == 1.0 and config["num_class_images"] == 2
    assert [v["prompt"] for v in config["class_images"].values()] == ["A photo of a cat", "A photo of a cup"]
    page = (whole / "report.html").read_text()
    assert "Prior preservation (DreamBooth)" in page and "A photo of a cup" in page

    resumed = tmp_path / "resumed"
    _two(resumed, 1, "--micro-batch-size", "4", "--checkpoint-every", "1")
    capsys.readouterr()
    assert main([*TWO, "--steps", "2", "--output", str(resumed), "--micro-batch-size", "4", "--checkpoint-every", "1",
                 "--resume", "--prior-weight", "0.5"]) == 2
    assert "settings differ from the checkpointed run in prior_weight" in capsys.readouterr().err
    _two(resumed, 2, "--micro-batch-size", "4", "--checkpoint-every", "1", "--resume")
    assert_identical_runs(whole, resumed)


@pytest.mark.parametrize("extra, message", [
    (("--prior-preservation", "--prior-weight", "-1"), "--prior-weight must be > 0, not -1.0"),
    (("--prior-preservation", "--prior-weight", "0"), "--prior-weight must be > 0, not 0.0"),
    (("--prior-preservation", "--num-class-images", "0"), "--num-class-images must be >= 1, not 0"),
    (("--prior-preservation", "--class-image-steps", "0"), "--class-image-steps must be >= 1, not 0"),
    (("--prior-weight", "0.5"), "--prior-weight only apply with --prior-preservation: add --prior-preservation"),
    (("--prior-preservation", "off", "--num-class-images", "10"), "--num-class-images only apply with --prior-preservation"),
], ids=["negative-weight", "zero-weight", "no-class-images", "no-steps", "weight-alone", "count-alone"])
def test_bad_prior_settings_are_one_line_and_exit_2(tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    assert main(train_args(EXAMPLE_CAT, out, *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()


def test_the_flag_alone_turns_it_on_and_the_defaults_are_diffusers():
    from palp.cli import build_parser, config_from_args

    def cfg(*extra):
        return config_from_args(build_parser().parse_args(train_args(EXAMPLE_CAT, "/tmp/x", *extra)))

    on = cfg("--prior-preservation")
    assert (on.prior_preservation, on.prior_weight, on.num_class_images, on.class_image_steps) == (True, 1.0, 100, 50)
    assert cfg("--prior-preservation", "on").to_dict() == on.to_dict()
    off = cfg()
    assert (off.prior_preservation, off.prior_weight, off.num_class_images) == (False, None, None)
    assert TrainConfig.from_dict(on.to_dict()).to_dict() == on.to_dict()  # a recorded config reads back (--resume)


def test_the_pipeline_passes_prior_preservation_to_the_train_step(tmp_path):
    """The compiled pipeline's train task takes the three parameters; the train component trains
    with them (real KFP artifacts on local paths); an experiment that sets a prior setting
    without prior_preservation is refused before anything runs."""
    import yaml
    from kfp.dsl import HTML, Dataset, Metrics, Model

    from components.steps import train as train_component
    from pipelines.errors import PipelineError
    from pipelines.experiment import load_experiment

    for backend in ("kubeflow", "vertex", "vertex-tpu"):
        spec = next(yaml.safe_load_all((REPO / "pipelines" / f"palp-{backend}.yaml").read_text()))
        root = spec["root"]["inputDefinitions"]["parameters"]
        assert root["prior_preservation"]["defaultValue"] is False and root["prior_weight"]["defaultValue"] == 0.0
        assert root["num_class_images"]["defaultValue"] == 0
        text = (REPO / "pipelines" / f"palp-{backend}.yaml").read_text()
        for name in ("prior_preservation", "prior_weight", "num_class_images"):  # handed into the train task
            assert f"componentInputParameter: pipelinechannel--{name}" in text, (backend, name)

    prep = tmp_path / "prep"
    assert main(["prepare", "--subject", f"cat={EXAMPLE_CAT}", "--class-word", "cat=cat", "--prompt", "A sketch of [V]",
                 "--pretrained-model", "tiny", "--output", str(prep), "--quiet"]) == 0
    task = json.loads((prep / "manifest.json").read_text())["tasks"][0]["id"]
    model = Model(uri=str(tmp_path / "model"))
    train_component(prepared=Dataset(uri=str(prep)), task=task, method="ti-db", pretrained_model="tiny", steps=1,
                    batch_size=2, micro_batch_size=0, lr=1e-3, lora_rank=4, save_steps="1", checkpoint_every=1,
                    mixed_precision="no", seed=0, model=model, metrics=Metrics(uri=str(tmp_path / "metrics")),
                    report=HTML(uri=str(tmp_path / "report.html")), prior_preservation=True, num_class_images=2)
    config = json.loads((tmp_path / "model" / "training_config.json").read_text())
    assert config["prior_preservation"] and config["num_class_images"] == 2 and config["prior_weight"] == 1.0
    assert "prior_loss" in (tmp_path / "model" / "metrics.csv").read_text().splitlines()[0]

    experiment = tmp_path / "e.yaml"
    experiment.write_text(yaml.safe_dump({"subjects": [{"name": "cat", "images": str(EXAMPLE_CAT)}], "prior_weight": 0.5}))
    with pytest.raises(PipelineError, match="prior_weight only apply with prior_preservation: true"):
        load_experiment(str(experiment))
    experiment.write_text(yaml.safe_dump({"subjects": [{"name": "cat", "images": str(EXAMPLE_CAT)}],
                                          "prior_preservation": True, "num_class_images": -3}))
    with pytest.raises(PipelineError, match="num_class_images must be > 0"):
        load_experiment(str(experiment))
