"""Custom Diffusion's scale augmentation (--scale-augmentation, palp.method.augment).

Truths: the recipe's own numbers (the sides' ranges and shares, the phrases, the mask's
one-latent-pixel inset, hand-counted), PIL's bilinear resize (the reference recipe resizes with
it), Eq. 1's plain mean (a full mask), a hand-computed masked sum, and the VAE posterior of the
unchanged photo (a row rescaled to its own size at offset 0).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from palp.cli import main
from palp.core.prompts import to_token_prompt
from palp.core.settings import Subject, TrainConfig
from palp.method import augment
from palp.method.guidance import step_loss
from palp.method.step_inputs import (Draws, ScaleAugmentation, draw, encode_latent_posteriors, prompt_variants,
                                     row_prompt_ids, step_generator, tokenize)
from palp.models.base_model import load_base_model
from palp.models.run_weights import REPORT_FILE

TARGET = "A sketch of [V] in Paris at night"


def cfg_of(**kw) -> TrainConfig:
    return TrainConfig(subjects=[Subject("[V]", "unused", "cat")], target_prompt=TARGET, output="unused",
                       pretrained_model="tiny", **kw)


def test_defaults_follow_the_personalization():
    assert cfg_of(method="custom-diffusion").scale_augmentation is True
    assert cfg_of(method="palp", personalize="custom-diffusion").scale_augmentation is True
    assert cfg_of(method="palp", personalize="custom-diffusion", scale_augmentation=False).scale_augmentation is False
    for kw in ({"method": "palp"}, {"method": "ti-db"}, {"method": "p-plus"}, {"method": "neti"}):
        assert cfg_of(**kw).scale_augmentation is False, kw
    assert cfg_of(method="ti-db", scale_augmentation=True).scale_augmentation is True


def test_draws_follow_the_recipe():
    r, n = 512, 20000
    side, top, left, phrase = augment.rescale_draws(torch.Generator().manual_seed(0), n, r)
    small = side <= r
    assert abs(small.float().mean().item() - 0.66) < 0.015
    assert side[small].min() == r // 3 and side[small].max() == r  # U{170..512}, both ends reached
    assert side[~small].min() == int(1.2 * r) and side[~small].max() == int(1.4 * r) - 1  # U{614..715}
    room = (side - r).abs()
    assert (top >= 0).all() and (left >= 0).all() and (top <= room).all() and (left <= room).all()
    assert (top == room).any() and (top == 0).any()
    tiny, large = side < 0.6 * r, side > r
    assert set(phrase[tiny].tolist()) == {1, 2} and set(phrase[large].tolist()) == {3, 4}
    assert set(phrase[~tiny & ~large].tolist()) == {0}
    assert abs((phrase[tiny] == 1).float().mean().item() - 0.5) < 0.03
    assert augment.PHRASES[1:3] == ("a far away ", "very small ") and augment.PHRASES[3:] == ("zoomed in ", "close up ")


def test_rescaled_photo_mask_and_canvas():
    r, f = 64, 8
    gen = torch.Generator().manual_seed(1)
    photo = torch.rand(1, 3, r, r, generator=gen) * 2 - 1
    # shrunk: the photo at (5, 17) on a zero canvas; mask rows 5//8+1=1 .. (5+40)//8-1=4, cols 17//8+1=3 .. 57//8-1=6
    out, mask = augment.rescale_photos(photo, torch.tensor([40]), torch.tensor([5]), torch.tensor([17]), f)
    inside = torch.zeros(r, r, dtype=torch.bool)
    inside[5:45, 17:57] = True
    assert (out[0][:, ~inside] == 0).all() and (out[0][:, inside] != 0).any()
    expected = torch.zeros(1, 1, r // f, r // f)
    expected[..., 1:4, 3:6] = 1
    assert torch.equal(mask, expected)
    # the resize is PIL's bilinear (the reference's), to within 8-bit rounding
    pil = Image.fromarray(((photo[0].permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)).resize((40, 40), Image.BILINEAR)
    ref = torch.from_numpy(np.asarray(pil).astype(np.float32) / 127.5 - 1).permute(2, 0, 1)
    assert (out[0][:, 5:45, 17:57] - ref).abs().mean() < 0.02
    # its own size at offset 0: the photo itself, the mask one latent pixel in from each edge
    same, mask = augment.rescale_photos(photo, torch.tensor([r]), torch.tensor([0]), torch.tensor([0]), f)
    assert torch.equal(same, photo) and mask.sum() == (r // f - 2) ** 2
    # enlarged: a crop of the photo rescaled to 80, every latent pixel kept; a flat photo stays flat
    flat = torch.full((1, 3, r, r), 0.25)
    out, mask = augment.rescale_photos(flat, torch.tensor([80]), torch.tensor([16]), torch.tensor([3]), f)
    torch.testing.assert_close(out, flat)
    assert torch.equal(mask, torch.ones(1, 1, r // f, r // f))
    big = F.interpolate(photo, size=(80, 80), mode="bilinear", align_corners=False)
    out, _ = augment.rescale_photos(photo, torch.tensor([80]), torch.tensor([16]), torch.tensor([3]), f)
    assert torch.equal(out, big[:, :, 16:80, 3:67])
    # too small for a latent pixel of inset: an empty mask
    _, mask = augment.rescale_photos(photo, torch.tensor([21]), torch.tensor([0]), torch.tensor([0]), f)
    assert mask.sum() == 0


def test_masked_loss_is_eq1_on_the_photos_region():
    gen = torch.Generator().manual_seed(2)
    pred, noise = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
    full, _ = step_loss(eps_pred=pred, noise=noise, mask=torch.ones(3, 1, 8, 8))
    torch.testing.assert_close(full, F.mse_loss(pred, noise), rtol=1e-6, atol=0)
    mask = torch.zeros(3, 1, 8, 8)
    mask[0, :, 2:5, 1:3] = 1  # 6 positions
    mask[1, :, 0, 0] = 1  # 1 position; row 2 empty: adds 0
    by_hand = ((pred[0, :, 2:5, 1:3] - noise[0, :, 2:5, 1:3]) ** 2).sum() / 24 + ((pred[1, :, 0, 0] - noise[1, :, 0, 0]) ** 2).sum() / 4
    loss, rec = step_loss(eps_pred=pred, noise=noise, mask=mask)
    torch.testing.assert_close(loss, by_hand / 3)
    torch.testing.assert_close(rec, loss)
    # nothing outside the mask reaches the gradient
    p = pred.clone().requires_grad_(True)
    step_loss(eps_pred=p, noise=noise, mask=mask)[0].backward()
    assert (p.grad * (1 - mask) == 0).all() and (p.grad[0, :, 2:5, 1:3] != 0).all()


def test_the_other_draws_are_those_of_a_run_without():
    kw = dict(n_images=3, batch=4, latent_shape=(4, 8, 8), num_timesteps=1000)
    plain = draw(step_generator(0, 7, 0), cfg_of(method="palp"), **kw)
    rescaled = draw(step_generator(0, 7, 0), cfg_of(method="palp", scale_augmentation=True), resolution=64, **kw)
    for name in ("index", "latent_noise", "t", "noise", "t_align", "noise_align"):
        assert torch.equal(getattr(plain, name), getattr(rescaled, name)), name
    assert plain.rescale is None and rescaled.rescale.shape == (4,) and rescaled.rescale_phrase.shape == (4,)


def test_rows_encode_the_rescaled_photo_and_take_the_phrase(tiny_dir, cat_images):
    from palp.core.subject_images import load_subject_images

    base = load_base_model("tiny")
    photos = load_subject_images("[V]", cat_images, resolution=base.resolution).pixels
    aug = ScaleAugmentation(pixels=photos, vae=base.vae)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    r = base.resolution
    index = torch.tensor([2, 0])
    z0, mask = aug.rows(index, torch.tensor([r, 30]), torch.tensor([0, 3]), torch.tensor([0, 9]), latent_noise=noise)
    mean, std = encode_latent_posteriors(base.vae, photos[2:3])
    torch.testing.assert_close(z0[0:1], mean + std * noise[0:1])  # its own size: the photo's own posterior
    assert not torch.allclose(z0[1:2], encode_latent_posteriors(base.vae, photos[0:1])[0], atol=0.05)
    variants = prompt_variants(base.tokenizer, cfg_of(method="custom-diffusion"), [len(photos)])
    assert variants.shape[:3] == (len(photos), 1, len(augment.PHRASES))
    rows = Draws(index, noise, None, None, None, None, rescale_phrase=torch.tensor([0, 2]))
    row_ids = row_prompt_ids(variants, rows)
    assert torch.equal(row_ids[0], tokenize(base.tokenizer, [to_token_prompt("A photo of [V]")])[0])
    assert torch.equal(row_ids[1], tokenize(base.tokenizer, [to_token_prompt("very small A photo of [V]")])[0])
    # its own size: 8 - 2 latent rows and columns; 30 px at (3, 9): rows 3//8+1 .. 33//8-1 = [1, 3), cols [2, 3)
    assert mask[0].sum() == 36 and mask[1].sum() == 2


def test_runs_train_on_rescaled_rows(tiny_dir, cat_images, tmp_path):
    def run(name, *extra):
        out = tmp_path / name
        assert main(["train", "--images", str(cat_images), "--class-word", "cat", "--prompt", TARGET, "--pretrained-model",
                     "tiny", "--steps", "3", "--batch-size", "2", "--lr", "1e-3", "--output", str(out), "--quiet", *extra]) == 0
        return out

    on = run("cd", "--method", "custom-diffusion", "--prior-preservation", "off")
    off = run("cd-off", "--method", "custom-diffusion", "--prior-preservation", "off", "--scale-augmentation", "off")
    assert json.loads((on / "training_config.json").read_text())["scale_augmentation"] is True
    assert json.loads((off / "training_config.json").read_text())["scale_augmentation"] is False
    a, b = load_file(on / "pytorch_custom_diffusion_weights.safetensors"), load_file(off / "pytorch_custom_diffusion_weights.safetensors")
    assert any(v.numel() and not torch.equal(v, b[k]) for k, v in a.items())
    assert "Scale augmentation" in (on / REPORT_FILE).read_text() and "Scale augmentation" not in (off / REPORT_FILE).read_text()
    lora = run("lora", "--method", "palp", "--scale-augmentation")  # any personalization takes it
    assert json.loads((lora / "training_config.json").read_text())["scale_augmentation"] is True


def test_bad_value_is_refused_at_parsing(cat_images, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--images", str(cat_images), "--class-word", "cat", "--prompt", TARGET, "--pretrained-model",
              "tiny", "--output", str(tmp_path / "x"), "--scale-augmentation", "maybe"])
    assert exit_.value.code == 2 and "argument --scale-augmentation: use on or off" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------- horizontal flips (--hflip)


def test_hflip_defaults_and_draws():
    from palp.core.settings import ConfigError

    assert cfg_of(method="neti").hflip == 0.5 and cfg_of(method="palp", personalize="neti").hflip == 0.5
    assert cfg_of(method="palp").hflip == 0 and cfg_of(method="custom-diffusion").hflip == 0
    with pytest.raises(ConfigError, match="--hflip must be a probability between 0 and 1, not 1.5"):
        cfg_of(method="palp", hflip=1.5)
    kw = dict(n_images=3, latent_shape=(4, 8, 8), num_timesteps=1000)
    plain = draw(step_generator(0, 7, 0), cfg_of(method="palp"), batch=4, **kw)
    flipped = draw(step_generator(0, 7, 0), cfg_of(method="palp", hflip=0.3), batch=4, **kw)
    for name in ("index", "latent_noise", "t", "noise", "t_align", "noise_align"):
        assert torch.equal(getattr(plain, name), getattr(flipped, name)), name
    many = draw(step_generator(0, 8, 0), cfg_of(method="palp", hflip=0.3), batch=20000, **kw).hflip
    assert plain.hflip is None and abs(many.float().mean().item() - 0.3) < 0.015


@pytest.mark.parametrize("method", ["ti-db", "custom-diffusion"])
def test_every_row_flipped_trains_as_the_mirrored_photos(tiny_dir, cat_images, tmp_path, method):
    """--hflip 1 on the photos trains what --hflip 0 trains on mirrored copies of them (the flips
    are drawn after every other draw); Custom Diffusion mirrors before its rescaling."""
    import numpy as np
    from PIL import Image

    mirrored = tmp_path / "mirrored"
    mirrored.mkdir()
    for p in sorted(cat_images.iterdir()):
        Image.fromarray(np.asarray(Image.open(p).convert("RGB"))[:, ::-1]).save(mirrored / f"{p.stem}.png")

    def run(name, images, flip):
        out = tmp_path / f"run-{name}"
        assert main(["train", "--images", str(images), "--class-word", "cat", "--prompt", TARGET, "--pretrained-model",
                     "tiny", "--method", method, "--prior-preservation", "off", "--steps", "2", "--batch-size", "2",
                     "--lr", "1e-3", "--hflip", flip, "--output", str(out), "--quiet"]) == 0
        return out

    a, b = run("flipped", cat_images, "1"), run("mirrored", mirrored, "0")
    weights = "pytorch_custom_diffusion_weights.safetensors" if method == "custom-diffusion" else "pytorch_lora_weights.safetensors"
    wa, wb = load_file(a / weights), load_file(b / weights)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-3, atol=2e-5)  # photos encoded in other batch shapes
    assert "Horizontal flips" in (a / REPORT_FILE).read_text() and "Horizontal flips" not in (b / REPORT_FILE).read_text()
    c = load_file(run("unflipped", cat_images, "0") / weights)
    assert any(not torch.allclose(wa[k], c[k], rtol=1e-3, atol=2e-5) for k in wa if wa[k].numel())
