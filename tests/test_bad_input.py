"""Bad input: one clear error each, and nothing in --output that looks like a finished result."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from conftest import train_args
from palp.cli import main


def _png_bytes(size=(96, 96)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def _empty(folder):
    pass


def _non_image(folder):
    (folder / "notes.txt").write_text("these are my cat photos")


def _corrupt_png(folder):
    (folder / "broken.png").write_bytes(_png_bytes()[:200])  # valid header, truncated data


def _tiny_image(folder):
    (folder / "small.png").write_bytes(_png_bytes((16, 16)))


@pytest.mark.parametrize(
    "make, message",
    [
        (_empty, "is empty; put 1-5 photos of the subject in it"),
        (_non_image, "notes.txt is not a readable image"),
        (_corrupt_png, "broken.png is not a readable image"),
        (_tiny_image, "small.png is 16x16, below the minimum side of 32 px"),
    ],
    ids=["empty-folder", "non-image", "corrupt-png", "16x16"],
)
def test_bad_image_folder(tmp_path, capsys, make, message):
    images = tmp_path / "images"
    images.mkdir()
    if make is not _empty:
        (images / "good.png").write_bytes(_png_bytes())  # one good image does not hide a bad one
    make(images)
    out = tmp_path / "out"
    assert main(train_args(images, out)) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("error:") == 1 and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"--prompt": "A sketch of a cat in Paris"}, "has no subject placeholder"),
        ({"--prompt": "A sketch of [V2] in Paris"}, "uses [V2] but no subject has that placeholder"),
        ({"--pretrained-model": "/no/such/model"}, "model '/no/such/model' not found"),
        ({"--batch-size": "3", "--micro-batch-size": "2"}, "not a multiple of --micro-batch-size 2"),
    ],
    ids=["no-placeholder", "unknown-placeholder", "unknown-model", "bad-batch"],
)
def test_bad_arguments(tmp_path, capsys, cat_images, change, message):
    argv = train_args(cat_images, tmp_path / "out")
    for flag, value in change.items():
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_class_word_without_images_and_images_without_class_word(tmp_path, capsys, cat_images):
    argv = train_args(cat_images, tmp_path / "out") + ["--class-word", "[V2]=dog"]
    assert main(argv) == 2
    assert "--class-word names [V2], which has no --images" in capsys.readouterr().err
    argv = train_args(cat_images, tmp_path / "out") + ["--images", f"[V2]={cat_images}"]
    assert main(argv) == 2
    assert "[V2] has images but no class word" in capsys.readouterr().err


def test_images_that_need_converting_are_accepted(tmp_path):
    """EXIF orientation, palette, alpha, CMYK and 16-bit images all become RGB at the model size."""
    from palp.data import load_subject_images

    folder = tmp_path / "mixed"
    folder.mkdir()
    Image.new("P", (80, 60)).save(folder / "palette.png")
    Image.new("RGBA", (80, 80), (0, 0, 255, 0)).save(folder / "alpha.png")
    Image.new("CMYK", (90, 70), (0, 255, 0, 0)).save(folder / "cmyk.jpg")
    Image.new("I;16", (70, 70), 40000).save(folder / "deep.png")
    rotated = Image.new("RGB", (120, 60), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    rotated.save(folder / "exif.jpg", exif=exif)
    subject = load_subject_images("[V]", folder, resolution=64)
    assert subject.pixels.shape == (5, 3, 64, 64)
    assert float(subject.pixels.min()) >= -1 and float(subject.pixels.max()) <= 1
    alpha = subject.pixels[[p.name for p in subject.paths].index("alpha.png")]
    assert float(alpha.min()) == pytest.approx(1.0)  # transparent -> white, not black
