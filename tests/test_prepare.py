"""palp prepare: image fates, byte-identical local/GCS runs, retries, zero-shot, prompts, train --prepared."""

from __future__ import annotations

import io
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import REPO, free_port, start_emulator, upload_folder
from palp.cli import main
from palp.steps.prepare import PromptSpec, SubjectSpec, prepare

RES = 64  # the tiny model's resolution; --min-image-size defaults to 32


def _pattern(seed: int, size=(96, 96)) -> Image.Image:
    """A distinct picture per seed: random colour blocks, so perceptual hashes differ."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    return Image.fromarray(blocks).resize(size, Image.Resampling.NEAREST)


def make_mixed_folder(folder: Path) -> dict[str, str]:
    """Good and bad files; returns {file: expected fate substring} ("ok" for good ones)."""
    folder.mkdir(parents=True)
    _pattern(1).save(folder / "a_good.jpg", quality=95)
    _pattern(2).save(folder / "b_good.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated by 90 degrees
    _pattern(3, (120, 80)).save(folder / "c_rotated.jpg", exif=exif, quality=95)
    _pattern(4).convert("CMYK").save(folder / "d_cmyk.jpg", quality=95)
    rgba = _pattern(5).convert("RGBA")
    rgba.putalpha(128)
    rgba.save(folder / "e_rgba.png")
    whole = io.BytesIO()
    _pattern(6).save(whole, format="JPEG", quality=95)
    (folder / "f_truncated.jpg").write_bytes(whole.getvalue()[: len(whole.getvalue()) // 2])
    (folder / "g_text.png").write_text("not a picture at all\n")
    _pattern(7, (8, 8)).save(folder / "h_tiny.png")
    (folder / "i_duplicate.png").write_bytes((folder / "b_good.png").read_bytes())
    _pattern(1).resize((90, 90)).save(folder / "j_near_duplicate.jpg", quality=70)
    return {
        "a_good.jpg": "ok", "b_good.png": "ok", "c_rotated.jpg": "ok", "d_cmyk.jpg": "ok", "e_rgba.png": "ok",
        "f_truncated.jpg": "corrupt or truncated", "g_text.png": "not an image file",
        "h_tiny.png": "8x8, below the minimum side of 32 px", "i_duplicate.png": "duplicate of b_good.png",
        "j_near_duplicate.jpg": "near duplicate of a_good.jpg",
    }


def _prepare_cli(source: str, output: str, *extra: str) -> int:
    return main(["prepare", "--subject", f"toy={source}", "--class-word", "toy=toy", "--prompt",
                 "A sketch of [V] in Paris at night", "--pretrained-model", "tiny", "--output", output, "--quiet", *extra])


def test_mixed_folder_fates(tmp_path, capsys):
    expected = make_mixed_folder(tmp_path / "photos")
    assert _prepare_cli(str(tmp_path / "photos"), str(tmp_path / "out")) == 0
    report = capsys.readouterr().out
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    files = {f["file"]: f for f in manifest["subjects"]["toy"]["files"]}
    assert set(files) == set(expected)
    for name, fate in expected.items():
        f = files[name]
        assert name in report
        if fate == "ok":
            assert f["status"] == "ok" and (tmp_path / "out" / f["output"]).is_file()
        else:
            assert f["status"] == "rejected" and fate in f["reason"], (name, f)
        assert len(f["sha256"]) == 64 and f["bytes"] > 0
    assert len(manifest["subjects"]["toy"]["images"]) == 5
    for out in manifest["subjects"]["toy"]["images"]:
        im = Image.open(tmp_path / "out" / out)
        assert im.size == (RES, RES) and im.mode == "RGB" and not im.info.get("exif")
    # EXIF orientation applied: the 120x80 picture became 80x120 before the centre crop.
    assert files["c_rotated.jpg"]["size"] == [80, 120]
    rotated = Image.open(tmp_path / "photos" / "c_rotated.jpg").transpose(Image.Transpose.ROTATE_270).convert("RGB")
    expected_crop = rotated.crop((0, 20, 80, 100)).resize((RES, RES), Image.Resampling.BICUBIC)
    got = np.asarray(Image.open(tmp_path / "out" / files["c_rotated.jpg"]["output"]), dtype=int)
    assert np.abs(got - np.asarray(expected_crop, dtype=int)).max() <= 1
    # Half-transparent RGBA is composited on white, not black.
    src = Image.open(tmp_path / "photos" / "e_rgba.png")
    on_white = Image.alpha_composite(Image.new("RGBA", src.size, (255, 255, 255, 255)), src).convert("RGB")
    expected_rgba = np.asarray(on_white.resize((RES, RES), Image.Resampling.BICUBIC), dtype=int)
    got_rgba = np.asarray(Image.open(tmp_path / "out" / files["e_rgba.png"]["output"]), dtype=int)
    assert np.abs(got_rgba - expected_rgba).max() <= 1 and expected_rgba.min() >= 110


def test_only_bad_files_is_one_clear_error(tmp_path, capsys):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "notes.png").write_text("hello")
    _pattern(1, (8, 8)).save(folder / "small.png")
    assert _prepare_cli(str(folder), str(tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "no usable image" in err and "notes.png" in err and "small.png" in err
    assert not (tmp_path / "out").exists()


def test_prepared_dataset_trains(tmp_path, cat_images):
    assert main(["prepare", "--subject", f"cat={cat_images}", "--class-word", "cat=cat", "--prompt", "A sketch of [V]",
                 "--prompt", "[V] at night", "--pretrained-model", "tiny", "--output", str(tmp_path / "prep"), "--quiet"]) == 0
    base = ["train", "--prepared", str(tmp_path / "prep"), "--pretrained-model", "tiny", "--steps", "2", "--batch-size", "2",
            "--lora-rank", "4", "--quiet"]
    with pytest.raises(SystemExit):  # argparse: nothing to check here but that --output is required
        main(base)
    assert main(base + ["--output", str(tmp_path / "run")]) == 2  # two tasks: which one?
    assert main(base + ["--output", str(tmp_path / "run"), "--task", "cat-01"]) == 0
    config = json.loads((tmp_path / "run" / "training_config.json").read_text())
    assert config["target_prompt"] == "[V] at night" and config["clean_prompt"] == "A cat at night"
    assert config["training_images"]["[V]"] == [str(tmp_path / "prep" / "subjects" / "cat" / f"{i:03d}.png") for i in range(3)]


def test_gcs_input_is_byte_identical_and_gcs_output_lands_complete(gcs_emulator, tmp_path):
    make_mixed_folder(tmp_path / "photos")
    upload_folder(tmp_path / "photos", "gs://palp-prepare-test/photos/toy")
    assert _prepare_cli(str(tmp_path / "photos"), str(tmp_path / "local")) == 0
    assert _prepare_cli("gs://palp-prepare-test/photos/toy", str(tmp_path / "from-gcs")) == 0
    local = json.loads((tmp_path / "local" / "manifest.json").read_text())
    for out in local["subjects"]["toy"]["images"]:
        assert (tmp_path / "local" / out).read_bytes() == (tmp_path / "from-gcs" / out).read_bytes()

    assert _prepare_cli("gs://palp-prepare-test/photos/toy", "gs://palp-prepare-test/prepared/run1") == 0
    from palp.core import storage

    names = storage.list_files("gs://palp-prepare-test/prepared/run1", recursive=True)
    assert names == sorted(["manifest.json", *local["subjects"]["toy"]["images"]])
    for out in local["subjects"]["toy"]["images"]:
        assert storage.read_bytes(f"gs://palp-prepare-test/prepared/run1/{out}") == (tmp_path / "local" / out).read_bytes()
    # The prepared gs:// dataset trains.
    assert main(["train", "--prepared", "gs://palp-prepare-test/prepared/run1", "--pretrained-model", "tiny", "--steps", "1",
                 "--batch-size", "1", "--lora-rank", "4", "--output", str(tmp_path / "run"), "--quiet"]) == 0


def test_transient_storage_failure_is_retried(tmp_path, monkeypatch):
    """The emulator is down when prepare starts and comes back: the run completes."""
    port = free_port()
    data = tmp_path / "gcs-data"
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
    server = start_emulator(port, storage_base=data)
    make_mixed_folder(tmp_path / "photos")
    upload_folder(tmp_path / "photos", "gs://palp-retry-test/photos")
    server.terminate()
    server.wait(timeout=10)  # the server restarts mid-run: prepare's first requests are refused
    result = {}

    def run():
        try:
            result["manifest"] = prepare([SubjectSpec("toy", "gs://palp-retry-test/photos", "toy")],
                                         [PromptSpec("A sketch of [V]")], "gs://palp-retry-test/out",
                                         pretrained_model="tiny", progress=False)
        except Exception as e:  # reported below
            result["error"] = e

    worker = threading.Thread(target=run)
    worker.start()
    time.sleep(1.5)
    server = start_emulator(port, storage_base=data)
    try:
        worker.join(timeout=120)
        assert "error" not in result, result.get("error")
        assert len(result["manifest"]["subjects"]["toy"]["images"]) == 5
        from palp.core import storage

        assert storage.exists("gs://palp-retry-test/out/manifest.json")
    finally:
        server.terminate()
        server.wait(timeout=10)


# -- class words -----------------------------------------------------------------------------

def test_zero_shot_decision_with_known_embeddings():
    from palp.models.zero_shot import zero_shot

    words = ["cat", "dog", "teapot", "vase"]
    classes = torch.eye(4, 8)  # unit class features along the first four axes
    images = torch.nn.functional.normalize(torch.tensor([[0.1, 0.9, 0.0, 0.0, 0.2, 0, 0, 0],
                                                         [0.0, 0.8, 0.3, 0.0, 0.1, 0, 0, 0]]), dim=-1)
    result = zero_shot(images, classes, words, temperature=10.0, top_k=3)
    probs = torch.softmax(10.0 * images @ classes.T, dim=-1).mean(0)
    expected = sorted(zip(words, probs.tolist()), key=lambda x: -x[1])[:3]
    assert [w for w, _ in result.top] == [w for w, _ in expected] == ["dog", "teapot", "cat"]
    assert [p for _, p in result.top] == pytest.approx([p for _, p in expected])
    assert not result.low_confidence
    # An image equally far from every class is a low-confidence call.
    flat = torch.nn.functional.normalize(torch.tensor([[0.5, 0.5, 0.5, 0.5, 0, 0, 0, 0.0]]), dim=-1)
    unsure = zero_shot(flat, classes, words)
    assert unsure.low_confidence and unsure.top[0][1] == pytest.approx(0.25)


def test_class_features_average_templates():
    from palp.models.zero_shot import class_features

    table = {"a photo of a cat.": [1.0, 0, 0], "a sketch of a cat.": [0, 1.0, 0],
             "a photo of an owl.": [0, 0, 2.0], "a sketch of an owl.": [0, 0, 1.0]}
    seen = []

    def encode(texts):
        seen.extend(texts)
        return torch.nn.functional.normalize(torch.tensor([table[t] for t in texts]), dim=-1)

    feats = class_features(encode, ["cat", "owl"], ["a photo of {}.", "a sketch of {}."])
    assert set(seen) == set(table)
    torch.testing.assert_close(feats, torch.tensor([[2 ** -0.5, 2 ** -0.5, 0], [0, 0, 1.0]]))


def test_open_clip_path_end_to_end_with_tiny_clip(tmp_path, cat_images):
    from safetensors.torch import load_file

    from palp.models.clip import load_clip, tiny_clip_dir

    assert main(["prepare", "--subject", f"cat={cat_images}", "--prompt", "A sketch of [V]", "--pretrained-model", "tiny",
                 "--clip", "tiny", "--output", str(tmp_path / "out"), "--quiet"]) == 0
    subject = json.loads((tmp_path / "out" / "manifest.json").read_text())["subjects"]["cat"]
    assert subject["class_word_source"] == "clip:tiny" and len(subject["class_scores"]) == 5
    scores = [s["score"] for s in subject["class_scores"]]
    assert scores == sorted(scores, reverse=True) and sum(scores) <= 1 + 1e-6
    assert subject["class_word"] == subject["class_scores"][0]["word"]
    vocabulary = yaml.safe_load((REPO / "evaluation/classes/vocabulary.yaml").read_text())
    assert subject["class_word"] in {w for k in ("dreambooth", "customconcept101", "common") for w in vocabulary[k]}
    # The tiny CLIP is a real open_clip checkpoint: loaded weights equal the file.
    clip = load_clip("tiny")
    saved = load_file(tiny_clip_dir() / "open_clip_model.safetensors")
    assert all(torch.equal(v, saved[k]) for k, v in clip.model.state_dict().items())


def test_vocabulary_covers_dreambooth_and_is_large():
    from palp.models.zero_shot import load_vocabulary

    words, templates = load_vocabulary()
    assert len(words) >= 300 and len(set(words)) == len(words)
    for w in ["backpack", "cat", "dog", "teapot", "vase", "sneaker", "sunglasses", "candle", "clock", "bowl"]:
        assert w in words
    assert all("{}" in t for t in templates)


# -- prompts ---------------------------------------------------------------------------------

PAPER_CLEAN = [
    "A sketch of a cat in Paris at night",
    "A watercolor painting of a cat on the beach at sunset, warm colors",
    "An anime drawing of a cat in Tokyo under cherry blossoms",
    "An oil painting of a cat in a snowy forest, vintage colors",
    "A pencil drawing of a cat in a cafe in Rome, sepia tones",
    "A cubist painting of a cat on a boat in Venice at dawn",
    "A pixel art image of a cat in a neon city at night",
    "A vintage photograph of a cat in front of the Eiffel Tower in the rain",
    "A 3D render of a cat on the moon, pastel colors",
    "A Van Gogh style painting of a cat in a wheat field under a starry sky",
]


def test_paper_prompts_clean_prompts_and_elements(tmp_path, cat_images):
    entries = yaml.safe_load((REPO / "evaluation/prompts/paper.yaml").read_text())["prompts"]
    assert len(entries) == 10
    manifest = prepare([SubjectSpec("cat", str(cat_images), "cat")], [PromptSpec(e["prompt"], elements=e["elements"]) for e in entries],
                       str(tmp_path / "out"), pretrained_model="tiny", progress=False)
    assert [t["clean_prompt"] for t in manifest["tasks"]] == PAPER_CLEAN
    from palp.core.elements import element_list

    for task, entry in zip(manifest["tasks"], entries):
        elements = task["elements"]
        assert len(elements) >= 4 and [e["name"] for e in elements][:2] == ["Style", "Class"]
        assert elements[0]["text"] == entry["elements"]["style"]
        assert elements[1]["text"] == "A photo of a cat"
        assert [e["text"] for e in elements[2:]] == entry["elements"]["ambiance"]
        assert element_list(entry["prompt"], {"[V]": "cat"}) == elements  # the rule agrees with the file


def test_elements_rule_and_explicit_win():
    from palp.core.elements import element_list

    texts = lambda p, w, x=None: [(e["name"], e["text"]) for e in element_list(p, w, x)]  # noqa: E731
    assert texts("A sketch of my [V] in Paris at night", {"[V]": "owl"}) == [
        ("Style", "A sketch"), ("Class", "A photo of an owl"), ("Ambiance 1", "in Paris"), ("Ambiance 2", "at night")]
    assert texts("[V] sitting on a rock in the snow", {"[V]": "sunglasses"}) == [
        ("Class", "A photo of sunglasses"), ("Ambiance 1", "sitting on a rock"), ("Ambiance 2", "in the snow")]
    assert texts("A photo of [V] with golden hour lighting", {"[V]": "dog"})[-1] == ("Ambiance 1", "with golden hour lighting")
    assert texts("A sketch of [V] in Paris", {"[V]": "cat"}, {"ambiance": ["Parisian streets"]})[-1] == (
        "Ambiance 1", "Parisian streets")


def test_multi_subject_prompts_get_both_class_words(tmp_path, cat_images):
    prompts_file = tmp_path / "art.yaml"
    prompts_file.write_text(yaml.safe_dump({"prompts": [
        "A 19th century portrait of [V1] and [V2]",
        {"prompt": "An oil painting of [V1] inspired by [V2] painting",
         "clean_prompt": "An oil painting of a cat sitting on a rock"},
    ]}))
    assert main(["prepare", "--subject", f"cat={cat_images}", "--subject", f"dog={cat_images}", "--class-word", "cat=cat",
                 "--class-word", "dog=dog", "--placeholder", "cat=[V1]", "--placeholder", "dog=[V2]",
                 "--personalization-prompt", "dog=An oil painting of [V2]", "--prompts-file", str(prompts_file),
                 "--pretrained-model", "tiny", "--output", str(tmp_path / "out"), "--quiet"]) == 0
    tasks = json.loads((tmp_path / "out" / "manifest.json").read_text())["tasks"]
    assert [t["id"] for t in tasks] == ["cat+dog-00", "cat+dog-01"]
    assert tasks[0]["clean_prompt"] == "A 19th century portrait of a cat and a dog"
    assert tasks[1]["clean_prompt"] == "An oil painting of a cat sitting on a rock"
    assert tasks[0]["personalization_prompts"] == {"[V1]": "A photo of [V1]", "[V2]": "An oil painting of [V2]"}
    assert [e["text"] for e in tasks[0]["elements"] if e["kind"] == "class"] == ["A photo of a cat", "A photo of a dog"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--prompt", "A sketch of [V2]"], "no subject for [V2]"),
        (["--prompt", "A sketch of a cat"], "has no subject placeholder"),
        (["--class-word", "nobody=cat", "--prompt", "A sketch of [V]"], "'nobody', which is not a --subject"),
        ([], "give at least one --prompt"),
    ],
)
def test_bad_prepare_arguments(tmp_path, capsys, cat_images, argv, message):
    code = main(["prepare", "--subject", f"cat={cat_images}", "--pretrained-model", "tiny",
                 "--output", str(tmp_path / "out"), "--quiet", *argv])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_existing_prepared_output_is_not_overwritten(tmp_path, cat_images, capsys):
    args = ["prepare", "--subject", f"cat={cat_images}", "--class-word", "cat=cat", "--prompt", "A sketch of [V]",
            "--pretrained-model", "tiny", "--output", str(tmp_path / "out"), "--quiet"]
    assert main(args) == 0
    before = (tmp_path / "out" / "manifest.json").read_bytes()
    assert main(args) == 2 and "already holds a prepared dataset" in capsys.readouterr().err
    assert (tmp_path / "out" / "manifest.json").read_bytes() == before
