"""--prompt-templates: each training row's prompt drawn from Textual Inversion's object templates
(NeTI's training prompts). Truths: the templates' own text tokenized by the stock tokenizer,
the draws of a run without the option, and uniform draws."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from palp.cli import main
from palp.core.prompts import PROMPT_TEMPLATES, to_token_prompt
from palp.core.settings import ConfigError, Subject, TrainConfig
from palp.method import augment
from palp.method.step_inputs import Draws, draw, prompt_variants, row_prompt_ids, step_generator, tokenize
from palp.models.base_model import load_base_model
from palp.models.run_weights import LAYERED_FILE, REPORT_FILE

TARGET = "A sketch of [V] in Paris at night"
TEMPLATES = PROMPT_TEMPLATES["textual-inversion"]


def cfg_of(subjects=None, target_prompt=TARGET, **kw) -> TrainConfig:
    return TrainConfig(subjects=subjects or [Subject("[V]", "unused", "cat")], target_prompt=target_prompt, output="unused",
                       pretrained_model="tiny", **kw)


def test_defaults_and_bad_values():
    assert len(TEMPLATES) == 27 and TEMPLATES[0] == "a photo of a {}" and all(t.count("{}") == 1 for t in TEMPLATES)
    assert cfg_of(method="neti").prompt_templates == "textual-inversion"
    assert cfg_of(method="palp", personalize="neti").prompt_templates == "textual-inversion"
    assert cfg_of(method="neti", prompt_templates="none").prompt_templates == "none"
    for method in ("palp", "ti-db", "p-plus", "custom-diffusion"):
        assert cfg_of(method=method).prompt_templates == "none", method
    assert cfg_of(method="ti-db", prompt_templates="textual-inversion").prompt_templates == "textual-inversion"
    with pytest.raises(ConfigError, match="--prompt-templates must be one of none, textual-inversion"):
        cfg_of(method="palp", prompt_templates="imagenet")


def test_each_subject_draws_its_own_templates(tiny_dir):
    tok = load_base_model("tiny").tokenizer
    cfg = cfg_of([Subject("[V1]", "unused", "cat"), Subject("[V2]", "unused", "cup")], target_prompt="[V1] and [V2] in Paris",
                 method="palp", prompt_templates="textual-inversion", scale_augmentation=True)
    variants = prompt_variants(tok, cfg, [2, 3])  # 2 photos of [V1], 3 of [V2]
    assert variants.shape[:4] == (5, 27, len(augment.PHRASES), tok.model_max_length)
    d = Draws(torch.tensor([1, 4, 0]), None, None, None, None, None, template=torch.tensor([22, 9, 0]),
              rescale_phrase=torch.tensor([0, 3, 2]))
    want = tokenize(tok, [to_token_prompt(p) for p in ("a photo of the small [V1]", "zoomed in a close-up photo of a [V2]",
                                                      "very small a photo of a [V1]")])
    assert torch.equal(row_prompt_ids(variants, d), want)
    assert prompt_variants(tok, cfg_of(method="palp"), [3]) is None  # always y_P: no table


def test_templates_are_drawn_last_and_uniformly():
    kw = dict(n_images=3, latent_shape=(4, 8, 8), num_timesteps=1000)
    plain = draw(step_generator(0, 5, 0), cfg_of(method="neti", prompt_templates="none"), batch=4, **kw)
    templated = draw(step_generator(0, 5, 0), cfg_of(method="neti"), batch=4, **kw)
    for name in ("index", "latent_noise", "t", "noise", "t_align", "noise_align", "truncation"):
        assert torch.equal(getattr(plain, name), getattr(templated, name)), name
    assert plain.template is None
    many = draw(step_generator(0, 6, 0), cfg_of(method="ti-db", prompt_templates="textual-inversion"), batch=27000, **kw)
    counts = torch.bincount(many.template, minlength=27)
    assert len(counts) == 27 and (counts - 1000).abs().max() < 150  # each 1/27: 1000 +- 4.8 sigma


def test_a_neti_run_trains_on_the_templates(tiny_dir, cat_images, tmp_path):
    def run(name, *extra):
        out = tmp_path / name
        assert main(["train", "--images", str(cat_images), "--class-word", "cat", "--prompt", TARGET, "--pretrained-model",
                     "tiny", "--method", "neti", "--neti-hidden", "8", "--neti-features", "16", "--steps", "3",
                     "--batch-size", "2", "--lr", "0.05", "--output", str(out), "--quiet", *extra]) == 0
        return out

    templated, plain = run("templated"), run("plain", "--prompt-templates", "none")
    assert json.loads((templated / "training_config.json").read_text())["prompt_templates"] == "textual-inversion"
    assert json.loads((plain / "training_config.json").read_text())["prompt_templates"] == "none"
    a, b = load_file(templated / LAYERED_FILE), load_file(plain / LAYERED_FILE)
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)
    assert "Prompt templates (textual-inversion)" in (templated / REPORT_FILE).read_text()
    assert "Prompt templates" not in (plain / REPORT_FILE).read_text()


def test_two_subjects_with_every_augmentation_resume_into_the_same_folder(tiny_dir, tmp_path):
    """PALP over Custom Diffusion for two subjects with templates, flips and scale augmentation:
    2 steps, then --resume into the same folder to 4, trains what 4 straight steps train, bit for bit."""
    from conftest import REPO

    def run(out, steps, *extra):
        assert main(["train", "--images", f"[V1]={REPO / 'examples/subjects/cat'}", "--class-word", "[V1]=cat",
                     "--images", f"[V2]={REPO / 'examples/subjects/cup'}", "--class-word", "[V2]=cup",
                     "--prompt", "A sketch of [V1] and [V2] in Paris at night", "--pretrained-model", "tiny",
                     "--method", "palp", "--personalize", "custom-diffusion", "--prompt-templates", "textual-inversion",
                     "--hflip", "0.5", "--steps", str(steps), "--batch-size", "4", "--lr", "1e-3", "--checkpoint-every", "2",
                     "--output", str(out), "--quiet", *extra]) == 0

    run(tmp_path / "straight", 4)
    run(tmp_path / "split", 2)
    run(tmp_path / "split", 4, "--resume")
    for name in ("pytorch_custom_diffusion_weights.safetensors", "learned_embeds.safetensors"):
        a, b = load_file(tmp_path / "straight" / name), load_file(tmp_path / "split" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    config = json.loads((tmp_path / "split" / "training_config.json").read_text())
    assert (config["scale_augmentation"], config["hflip"], config["prompt_templates"]) == (True, 0.5, "textual-inversion")
    assert (tmp_path / "straight" / "metrics.csv").read_text() == (tmp_path / "split" / "metrics.csv").read_text()
