"""Bad input: one clear error each, and nothing in --output that looks like a finished result."""

from __future__ import annotations

import io
import json
import struct
import time
import zlib

import pytest
from PIL import Image

from conftest import free_port, train_args
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


def _huge_png(side: int) -> bytes:
    """A valid all-black 1-bit PNG of side x side pixels, streamed through zlib row by row:
    30000 x 30000 is 109 KB on disk and gigabytes decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row, z = b"\0" * (1 + (side + 7) // 8), zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def _bomb(folder):
    (folder / "bomb.png").write_bytes(_huge_png(30000))


def _huge(folder):
    (folder / "huge.png").write_bytes(_huge_png(13000))


LIMIT = "over the limit of 67,108,864 pixels; use a smaller image (or raise PALP_MAX_IMAGE_PIXELS)"


@pytest.mark.parametrize(
    "make, message",
    [
        (_empty, "is empty; put 1-5 photos of the subject in it"),
        (_non_image, "notes.txt is not a readable image"),
        (_corrupt_png, "broken.png is not a readable image"),
        (_tiny_image, "small.png is 16x16, below the minimum side of 32 px"),
        (_bomb, f"bomb.png is 30000x30000 = 900,000,000 pixels, {LIMIT}"),
        (_huge, f"huge.png is 13000x13000 = 169,000,000 pixels, {LIMIT}"),
    ],
    ids=["empty-folder", "non-image", "corrupt-png", "16x16", "30000x30000-bomb", "13000x13000"],
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
        ({"--token-init": "[V]"}, "--token-init must be class, rare or a word to start each token from, not '[V]'"),
    ],
    ids=["no-placeholder", "unknown-placeholder", "unknown-model", "bad-batch", "bad-token-init"],
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
    from palp.core.subject_images import load_subject_images

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


# -- issue 17, item 9 -------------------------------------------------------------------------

PROMPT = "A sketch of [V] in Paris at night"


def _one_error(capsys, message: str) -> str:
    err = capsys.readouterr().err
    assert message in err, err
    assert err.count("error:") == 1 and "Traceback" not in err
    return err


def test_prepare_rejects_a_bomb_and_keeps_the_good_image(tmp_path, cat_images):
    (cat_images / "bomb.png").write_bytes(_huge_png(30000))
    argv = ["prepare", "--subject", f"cat={cat_images}", "--class-word", "cat=cat", "--prompt", PROMPT,
            "--pretrained-model", "tiny", "--output", str(tmp_path / "prep"), "--quiet"]
    assert main(argv) == 0
    files = json.loads((tmp_path / "prep" / "manifest.json").read_text())["subjects"]["cat"]["files"]
    bomb = next(f for f in files if f["file"] == "bomb.png")
    assert bomb["status"] == "rejected" and bomb["reason"] == "30000x30000 = 900,000,000 pixels, over the limit of 67,108,864 pixels"


def test_pixel_limit_is_set_by_the_environment(tmp_path, capsys, cat_images, monkeypatch):
    monkeypatch.setenv("PALP_MAX_IMAGE_PIXELS", "5000")
    assert main(train_args(cat_images, tmp_path / "out")) == 2
    _one_error(capsys, "pixels, over the limit of 5,000 pixels; use a smaller image (or raise PALP_MAX_IMAGE_PIXELS)")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A prepared dataset, and a short run whose output holds a killed run's temporaries at the start."""
    from conftest import EXAMPLE_CAT

    root = tmp_path_factory.mktemp("bad-input")
    assert main(["prepare", "--subject", f"cat={EXAMPLE_CAT}", "--class-word", "cat=cat", "--prompt", PROMPT,
                 "--pretrained-model", "tiny", "--output", str(root / "prep"), "--quiet"]) == 0
    run = root / "run"
    stale = [run / ".export.k2j4h5g6", run / "checkpoints" / ".step-000002.abcd_123", run / "snapshots" / ".step-000002.x1y2z3w4",
             run / "snapshots" / "step-000001" / ".export.q1w2e3r4"]
    for folder in stale:
        folder.mkdir(parents=True)
        (folder / "trainable.safetensors").write_bytes(b"half written")
    stale.append(run / ".training_config.json.a1b2c3d4")
    stale[-1].write_text("{")
    (run / ".not-palps").write_text("kept")
    assert main(["train", "--prepared", str(root / "prep"), "--pretrained-model", "tiny", "--steps", "2", "--batch-size", "2",
                 "--lora-rank", "4", "--output", str(run), "--quiet"]) == 0
    return root, stale


def test_stale_temporaries_are_removed_at_start(trained):
    root, stale = trained
    assert [p for p in stale if p.exists()] == []
    assert (root / "run" / ".not-palps").read_text() == "kept"
    assert (root / "run" / "training_config.json").is_file()


def test_truncated_sample_in_score(trained, tmp_path, capsys):
    root, _ = trained
    sample = ["sample", "--model", str(root / "run"), "--output", str(tmp_path / "samples"), "--num-samples", "1",
              "--steps", "2", "--quiet"]
    score = ["score", "--samples", str(tmp_path / "samples"), "--prepared", str(root / "prep"), "--output",
             str(tmp_path / "scores"), "--clip", "tiny", "--quiet"]
    assert main(sample) == 0
    png = next((tmp_path / "samples").rglob("*.png"))
    data = png.read_bytes()
    png.write_bytes(data[: len(data) // 2])
    capsys.readouterr()
    assert main(score) == 2
    err = _one_error(capsys, f"palp score: error: {png} is not a readable image (OSError: image file is truncated")
    assert err.rstrip().endswith("; delete it and rerun the palp step that wrote it (a sample: `palp sample` into the same --output)")
    assert not (tmp_path / "scores").exists()
    png.unlink()  # what the error says to do
    assert main(sample) == 0 and main(score) == 0


@pytest.mark.parametrize("argv", [
    ["prepare", "--subject", "cat=photos", "--class-word", "cat=cat", "--prompt", PROMPT, "--pretrained-model", "tiny"],
    ["sample", "--model", "run"],
    ["score", "--samples", "samples", "--prepared", "prep", "--clip", "tiny"],
], ids=["prepare", "sample", "score"])
def test_output_that_is_a_file(tmp_path, capsys, argv):
    out = tmp_path / "out.txt"
    out.write_text("not a folder")
    assert main([*argv, "--output", str(out), "--quiet"]) == 2
    _one_error(capsys, f"palp {argv[0]}: error: --output {out} is a file; give a folder (new or existing)")
    assert out.read_text() == "not a folder"


@pytest.mark.parametrize("inside", [False, True], ids=["equal", "inside"])
def test_output_in_the_image_folder(tmp_path, capsys, cat_images, inside):
    before = sorted(p.name for p in cat_images.iterdir())
    out = cat_images / "out" if inside else cat_images
    prepare = ["prepare", "--subject", f"cat={cat_images}", "--class-word", "cat=cat", "--prompt", PROMPT,
               "--pretrained-model", "tiny", "--output", str(out), "--quiet"]
    assert main(prepare) == 2
    _one_error(capsys, f"--output {out} is (inside) the photo folder of subject cat ({cat_images}); choose an output outside it")
    assert main(train_args(cat_images, out)) == 2
    _one_error(capsys, f"--output {out} is (inside) the image folder {cat_images} of [V]; choose an output outside it")
    assert sorted(p.name for p in cat_images.iterdir()) == before


def _float_flags(parser) -> dict[str, object]:
    """{'train --lr': type, ...} for every option of every subcommand that takes one value."""
    import argparse

    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.update({f"{name} {k}": v for k, v in _float_flags(sub).items()})
        elif action.option_strings and action.type is not None:
            found[action.option_strings[0]] = action.type
    return found


@pytest.mark.parametrize("argv", [
    ["sample", "--model", "run", "--output", "o", "--guidance", "nan"],
    ["train", "--images", "cat", "--class-word", "cat", "--prompt", PROMPT, "--output", "o", "--lr", "inf"],
    ["train", "--images", "cat", "--class-word", "cat", "--prompt", PROMPT, "--output", "o", "--lambda", "nan"],
    ["train", "--images", "cat", "--class-word", "cat", "--prompt", PROMPT, "--output", "o", "--alpha=-inf"],
    ["prepare", "--subject", "cat=x", "--prompt", PROMPT, "--output", "o", "--min-confidence", "NaN"],
], ids=["guidance-nan", "lr-inf", "lambda-nan", "alpha-minus-inf", "min-confidence-nan"])
def test_non_finite_float_flags_are_refused_at_parsing(tmp_path, capsys, monkeypatch, argv):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    flag, value = argv[-1].split("=") if "=" in argv[-1] else argv[-2:]
    assert f"argument {flag}: {value!r} is not a finite number" in err
    assert list(tmp_path.iterdir()) == []


def test_every_float_flag_is_finite_float():
    from palp.cli import build_parser, finite_float

    types = _float_flags(build_parser())
    assert "train --lr" in types and "sample --guidance" in types
    assert [flag for flag, t in types.items() if t is float] == []
    assert sum(t is finite_float for t in types.values()) >= 9


def _clip_token_count(tiny_dir, prompt: str) -> int:
    """What the model's own tokenizer (with the placeholder token added) makes of the prompt."""
    from transformers import CLIPTokenizer

    from palp.core.prompts import to_token_prompt

    tokenizer = CLIPTokenizer.from_pretrained(tiny_dir, subfolder="tokenizer")
    tokenizer.add_tokens(["<v>"])
    return len(tokenizer(to_token_prompt(prompt), verbose=False).input_ids)


def test_prompt_over_the_text_encoders_limit(tmp_path, capsys, cat_images, tiny_dir):
    long = "A sketch of [V] " + " ".join(f"in Paris at night number {i}," for i in range(14))
    n = _clip_token_count(tiny_dir, long)
    assert n > 77
    message = (f"the target prompt {long[:57] + '...'!r} is {n} tokens long, over the text encoder's limit of 77 "
               f"(start and end included); shorten it")
    argv = train_args(cat_images, tmp_path / "run")
    argv[argv.index("--prompt") + 1] = long
    assert main(argv) == 2
    _one_error(capsys, f"palp train: error: {message}")
    assert main(["prepare", "--subject", f"cat={cat_images}", "--class-word", "cat=cat", "--prompt", long,
                 "--pretrained-model", "tiny", "--output", str(tmp_path / "prep"), "--quiet"]) == 2
    _one_error(capsys, f"palp prepare: error: {message}")
    assert not (tmp_path / "run").exists() and not (tmp_path / "prep").exists()
    exactly = "A sketch of [V] " + "x " * (77 - _clip_token_count(tiny_dir, "A sketch of [V]"))
    assert _clip_token_count(tiny_dir, exactly) == 77
    from palp.core.prompts import check_token_length

    check_token_length(exactly)  # 77 is allowed


def test_storage_outage_is_one_storage_error(tmp_path, capsys, monkeypatch):
    """A closed port: the client's retries end within PALP_STORAGE_DEADLINE, then one error naming the call."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("PALP_STORAGE_RETRIES", "2")
    monkeypatch.setenv("PALP_STORAGE_DEADLINE", "1")
    start = time.monotonic()
    assert main(["score", "--samples", "gs://palp-outage/samples", "--prepared", "gs://palp-outage/prep",
                 "--output", str(tmp_path / "scores"), "--clip", "tiny", "--quiet"]) == 2
    assert time.monotonic() - start < 30
    _one_error(capsys, "palp score: error: exists gs://palp-outage/samples/samples.csv: storage unreachable")
    assert not (tmp_path / "scores").exists()


def test_gs_without_credentials_is_one_clear_error(tmp_path):
    """No emulator and no Google Cloud credentials anywhere: one line that says how to give them,
    not the auth library's traceback. The auth library's probe for a metadata server is pointed
    at a closed loopback port (it reads the address when first imported: a fresh process), so
    nothing leaves the machine."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items()
           if k not in ("STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_CLOUD_PROJECT")}
    env.update(HOME=str(tmp_path / "home"), CLOUDSDK_CONFIG=str(tmp_path / "gcloud"), GCE_METADATA_TIMEOUT="1",
               GCE_METADATA_HOST=f"127.0.0.1:{free_port()}", GCE_METADATA_IP=f"127.0.0.1:{free_port()}")
    out = subprocess.run([sys.executable, "-m", "palp", "prepare", "--subject", "cat=gs://palp-no-credentials/cat",
                          "--class-word", "cat=cat", "--prompt", PROMPT, "--output", str(tmp_path / "prep"),
                          "--pretrained-model", "tiny"], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    lines = [line for line in out.stderr.splitlines() if "error" in line.lower()]
    assert lines == ["palp prepare: error: subject cat: gs:// needs Google Cloud credentials and none were found: run `gcloud auth "
                     "application-default login`, or set GOOGLE_APPLICATION_CREDENTIALS to a service account's key file "
                     "(on GKE and Vertex the node's service account is used)"], out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "prep").exists()


def test_bucket_keeps_as_many_checkpoints_as_the_local_folder(gcs_emulator, cat_images):
    from palp.core import gcs, storage

    gcs.gcs_client().create_bucket("palp-prune")
    argv = train_args(cat_images, "gs://palp-prune/run", "--checkpoints-total-limit", "1", "--checkpoint-every", "1")
    assert main(argv) == 0
    names = storage.list_files("gs://palp-prune/run/checkpoints", recursive=True)
    assert sorted({n.split("/")[0] for n in names}) == ["config.json", "step-000003"]
