"""World v2 (palp.toyworld.v2): named instances across styles, held-out composites by rule,
the coarse renderer, the v2 architectures, and its resumable pretraining; v1 left unchanged."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import pretrain_script
from palp.toyworld.scene import CLASSES, STYLES, Identity, Scene, parse_caption
from palp.toyworld.v2 import world as w2
from palp.toyworld.v2.render import render_array as render_v2
from palp.toyworld.world import PERSONAL_SUBJECTS

REPO = Path(__file__).resolve().parents[1]

# sha256 of v1's renders, captions and data set below, computed from the v1 code before world v2
# was added (Pillow 13.0.0, numpy 2.4.6): v2 must leave every v1 pixel as it was.
V1_HASH = "62a9b3bc0b922197aad138e7414bb41a8cf6c8211babd50b30853a177e9ead42"


@pytest.fixture(scope="module")
def plan():
    return w2.pretraining_plan(w2.plan_size(3))


def test_v1_renders_are_bit_identical():
    from palp.toyworld.render import render_array
    from palp.toyworld.world import random_scene, render_dataset, subject_training_scenes

    h = hashlib.sha256()
    rng = random.Random(2024)
    for _ in range(150):
        s = random_scene(rng, every_pair=True)
        h.update(render_array(s).tobytes())
        h.update(s.caption().encode())
    for sub in PERSONAL_SUBJECTS:
        for s in subject_training_scenes(sub, 4):
            h.update(render_array(s).tobytes())
    images, labels, captions = render_dataset(40, seed=0, progress=False)
    h.update(images.tobytes())
    h.update(labels.tobytes())
    h.update("\n".join(captions).encode())
    assert h.hexdigest() == V1_HASH


def test_names_follow_the_rule():
    from open_clip.tokenizer import SimpleTokenizer

    from palp.toyworld.v2.world import NAMES, bpe_pieces, caption_words, make_names

    assert NAMES == make_names()  # the committed list is what the rule makes
    assert len(NAMES) == len(set(NAMES)) == w2.N_INSTANCES
    words, tokenizer = caption_words(), SimpleTokenizer()
    assert {"cat", "red", "stripes", "hat", "watercolour", "sunset", "city"} <= words
    for name in NAMES:
        assert name.isalpha() and name.islower() and name not in words and name not in CLASSES
        pieces = bpe_pieces(name)
        assert pieces == tokenizer.bpe(name).split(" ")  # palp's BPE is open_clip's
        assert 2 <= len(pieces) <= 3, (name, pieces)
        assert not any(p.replace("</w>", "") in words for p in pieces), (name, pieces)


def test_names_tokenize_as_rare_words_with_the_pipelines_tokenizer():
    tok = pretrain_script().build_tokenizer()
    ids = {}
    for name in w2.NAMES:
        ids[name] = tuple(tok(name).input_ids[1:-1])
        assert 2 <= len(ids[name]) <= 3
    assert len(set(ids.values())) == len(ids)
    one = tok("A watercolour of " + w2.NAMES[0] + " the cat on the beach at sunset").input_ids
    assert len(one) == 2 + 11 + len(ids[w2.NAMES[0]]) - 1


def test_held_out_composites_are_a_rule_and_never_named():
    composites = w2.all_composites()
    assert len(composites) == len({w2.composite_key(c) for c in composites}) == 7 * 8 * 22 * 4
    held = [c for c in composites if w2.is_held_out(c)]
    assert 0.2 < len(held) / len(composites) < 0.3
    assert all(w2.is_held_out(s.identity) for s in PERSONAL_SUBJECTS)
    named = {w2.composite_key(c) for c in w2.INSTANCE_IDENTITIES}
    assert len(named) == w2.N_INSTANCES
    assert not any(w2.is_held_out(c) for c in w2.INSTANCE_IDENTITIES)
    assert all(w2.rich(c) for c in w2.INSTANCE_IDENTITIES)
    assert max(Counter(c.cls for c in w2.INSTANCE_IDENTITIES).values()) - min(
        Counter(c.cls for c in w2.INSTANCE_IDENTITIES).values()) <= 1
    # A plain body's pattern colour is invisible: the rule must not depend on it.
    plain = [Identity("dog", "red", "plain", pc, "hat") for pc in ("blue", "green", "pink")]
    assert len({w2.is_held_out(c) for c in plain}) == 1
    subjects = w2.held_out_subjects(12, seed=3)
    assert len({s.name for s in subjects}) == 12 and len({w2.composite_key(s.identity) for s in subjects}) == 12
    v1 = {w2.composite_key(s.identity) for s in PERSONAL_SUBJECTS}
    for s in subjects:
        assert w2.is_held_out(s.identity) and w2.rich(s.identity)
        assert w2.composite_key(s.identity) not in named | v1
    assert [s.name for s in w2.held_out_subjects(12, seed=3)] == [s.name for s in subjects]  # seeded
    assert [s.name for s in w2.held_out_subjects(12, seed=4)] != [s.name for s in subjects]


def test_pretraining_shows_every_instance_everywhere_and_no_held_out_composite(plan):
    assert len(plan) == w2.plan_size(3) == 78000
    assert not any(w2.is_held_out(ns.scene.identity) for ns in plan)
    seen = Counter((ns.instance, ns.scene.style, ns.scene.place, ns.scene.time) for ns in plan if ns.instance >= 0)
    assert len(seen) == w2.N_INSTANCES * len(w2.COMBOS) == 300 * 65
    assert min(seen.values()) == 3
    named_styles = defaultdict(set)
    for ns in plan:
        if ns.form != "describe":
            named_styles[ns.instance].add(ns.scene.style)
    assert all(named_styles[i] == set(STYLES) for i in range(w2.N_INSTANCES))  # each name in every style
    forms = Counter(ns.form for ns in plan if ns.instance >= 0)
    assert abs(forms["name"] / sum(forms.values()) - 0.60) < 0.02
    described = sum(ns.instance < 0 for ns in plan)
    assert described == 78000 // 4
    assert {ns.scene.identity.cls for ns in plan if ns.instance < 0} == set(CLASSES)


def test_captions_agree_with_the_scenes(plan):
    for ns in plan[:3000]:
        s, text = ns.scene, ns.caption()
        parsed = parse_caption(text)
        assert (parsed["style"], parsed["place"], parsed["time"]) == (s.style, s.place, s.time), text
        if ns.instance >= 0:
            assert w2.INSTANCE_IDENTITIES[ns.instance] == s.identity
        if ns.form == "name":
            assert f" {w2.NAMES[ns.instance]}" in text and s.identity.cls not in text.split(), text
        elif ns.form == "name_class":
            assert f" {w2.NAMES[ns.instance]} the {s.identity.cls}" in text, text
        else:
            assert not any(n in text.split() for n in w2.NAMES) and s.identity.cls in text.split(), text
            if s.caption_color:
                assert s.identity.color in text.split(), text


def test_every_named_instance_renders_in_every_style():
    rng = random.Random(0)
    for inst in w2.named_instances():
        for style in STYLES:
            place, time = rng.choice(w2.PLACE_TIMES)
            scene = Scene(inst.identity, style, place, time, seed=rng.randrange(2**31))
            image = render_v2(scene)
            assert image.shape == (64, 64, 3) and image.dtype == np.uint8
            if STYLES.index(style) == inst.index % len(STYLES):
                # The subject's identity is in the pixels: without its accessory they change
                # (in one style per instance, every style over the instances).
                other = Identity(inst.identity.cls, inst.identity.color, inst.identity.pattern,
                                 inst.identity.pattern_color, "none")
                assert np.abs(render_v2(Scene(other, style, place, time, seed=scene.seed)).astype(int) - image).sum() > 500


def test_v2_patterns_are_coarse():
    """A stripe of the torso is about 8 image pixels wide (2 latent pixels): on plain studio
    photos of a striped car, the runs of the stripe colour along rows through the torso."""
    ident = Identity("car", "blue", "striped", "yellow", "none")
    widths = []
    for seed in range(6):
        img = render_v2(Scene(ident, "photo", "plain", "day", seed=seed)).astype(int)
        yellow = (img[..., 0] > 150) & (img[..., 1] > 130) & (img[..., 2] < 90)
        for row in yellow[38:46]:
            run = 0
            for v in list(row) + [False]:
                if v:
                    run += 1
                elif run:
                    widths.append(run)
                    run = 0
    assert widths and np.median(widths) >= 8, widths


def test_v2_subject_photos_are_v2_renders_of_the_held_out_composites(tmp_path):
    """``python -m palp.toyworld.v2.world --out DIR --held-out K``: v1's six and K held-out
    subjects, each photo the v2 renderer's image of its training scene, the truth beside it."""
    from PIL import Image

    from palp.toyworld.v2.render import render_array
    from palp.toyworld.world import PERSONAL_SUBJECTS

    subjects = (PERSONAL_SUBJECTS[0], *w2.held_out_subjects(1))
    w2.write_subjects(tmp_path, 2, subjects)
    for s in subjects:
        assert w2.is_held_out(s.identity)
        scenes = w2.subject_training_scenes(s, 2)
        for i, scene in enumerate(scenes):
            assert np.array_equal(np.asarray(Image.open(tmp_path / s.name / f"{i:02d}.png")), render_array(scene))
        truth = json.loads((tmp_path / f"{s.name}.json").read_text())
        assert truth["identity"]["cls"] == s.identity.cls and truth["class_word"] == s.identity.cls


def test_v2_architectures_have_the_stated_sizes():
    v2 = sys.modules.get("pretrain_v2") or (pretrain_script() and sys.modules["pretrain_v2"])
    unet, te = v2.build_unet(), v2.build_text_encoder()
    assert sum(p.numel() for p in unet.parameters()) == v2.PARAMS["unet"]
    assert sum(p.numel() for p in te.parameters()) == v2.PARAMS["text_encoder"]
    assert all(hasattr(b, "attentions") for b in unet.down_blocks)  # cross-attention at 16x16, 8x8, 4x4
    assert unet.config.cross_attention_dim == te.config.hidden_size == 96
    assert te.get_input_embeddings().weight.numel() * 4 < 20 * 10**6  # one file under 20 MB


def _script(name: str):
    """evaluation/toyworld/NAME.py as a module (beside the pretraining modules it imports)."""
    import importlib.util

    pretrain_script()
    path = Path(__file__).resolve().parents[1] / "evaluation/toyworld" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"toy_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_v2_pretraining_runs_every_stage_resumes_and_exports(tmp_path, capsys, monkeypatch):
    import torch
    from diffusers import StableDiffusionPipeline

    pretrain = pretrain_script()
    small = ["--world", "v2", "--n-train", "48", "--vae-batch", "4", "--judge-batch", "4", "--judge-eval-n", "8",
             "--clip-batch", "8", "--unet-batch", "4"]
    steps = ["--vae-steps", "2", "--judge-steps", "2", "--clip-steps", "2", "--unet-steps", "2"]
    work, out = tmp_path / "work", tmp_path / "weights"
    pretrain.main(["all", "--work", str(work), "--out", str(out), *small, *steps])
    recipe = json.loads((work / "recipe.json").read_text())
    assert recipe["stages"]["data"]["world"] == "v2" and recipe["stages"]["data"]["n"] == 48
    assert [h["stage"] for h in recipe["history"]] == ["vae", "judge", "clip", "unet"]
    assert set(recipe["stages"]["judge"]["accuracy"]) == {"any", "held_out", "any_vae"}
    assert all("wall_s" in recipe["stages"][s] for s in ("data", "vae", "judge", "clip", "unet"))
    assert json.loads((out / "names.json").read_text()) == list(w2.NAMES)
    assert max(p.stat().st_size for p in out.rglob("*") if p.is_file()) < 20 * 10**6
    pipe = StableDiffusionPipeline.from_pretrained(out / "sd", safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    image = pipe(f"A sketch of {w2.NAMES[0]}", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)
    from palp.models.base_model import load_base_model

    assert load_base_model(str(out / "sd")).unet.config.cross_attention_dim == 96  # palp loads the export as it is
    # The preview of the UNet in training: its checkpoint's EMA weights, read by the judge.
    preview = _script("preview_v2")
    preview.main(["--work", str(work), "--instances", "2", "--samples", "1", "--steps", "2"])
    from PIL import Image

    sheet = Image.open(work / "preview" / "preview-000002.png")
    assert sheet.size == (150 + 4 * 64, 26 + 2 * 2 * 64)  # a column per prompt, a row per instance, form and sample
    shown = json.loads((work / "preview" / "preview-000002.json").read_text())
    assert shown["unet_step"] == 2 and len(shown["records"]) == 2 * 2 * len(preview.COMBOS)
    assert shown["records"][0]["prompt"].startswith(f"A photo of {w2.NAMES[0]}")
    described = [r["prompt"] for r in shown["records"] if r["form"] == "describe"]
    ident = w2.named_instances()[0].identity  # the control spells the identity out, in the same scenes
    assert described[: len(preview.COMBOS)] == [Scene(ident, *c, seed=0).caption() for c in preview.COMBOS]
    assert f"{ident.color} {ident.cls}" in described[0] and w2.NAMES[0] not in described[0]
    for key in ("means", "means_described"):
        assert 0 <= shown[key]["identity"] <= 1 and 0 < shown[key]["identity_chance"] < 1
    preview.main(["--work", str(work), "--instances", "1", "--samples", "1", "--steps", "2", "--weights", "trained"])
    pipe_ema, _ = preview.load_pipeline(work)
    pipe_now, _ = preview.load_pipeline(work, "trained")
    state = torch.load(work / "unet.ckpt", weights_only=True)
    assert all(torch.equal(v, state["unet"][k]) for k, v in pipe_now.unet.state_dict().items())
    assert not all(torch.equal(v, state["unet"][k]) for k, v in pipe_ema.unet.state_dict().items())
    assert json.loads((work / "preview" / "preview-000002-trained.json").read_text())["unet_step"] == 2
    # Every unit's ceiling with the v2 judge and VAE (here barely trained: only the table's shape).
    ceiling = _script("ceiling_v2")
    assert ceiling.main(["--work", str(work), "--held-out", "1", "--renders", "2", "--out", str(tmp_path / "c.md")]) == 0
    rows = [line for line in (tmp_path / "c.md").read_text().splitlines() if line.startswith("| ") and "[V]" in line]
    assert len(rows) == (6 + 1) * len(ceiling.prompts()) == 7 * 15
    assert ceiling.main(["--work", str(tmp_path / "empty")]) == 2
    _judge_knows_its_world(out, work)
    _ships_as_the_toy_world(out, tmp_path, capsys)
    # Each stage resumes from its checkpoint.
    capsys.readouterr()
    for stage in ("vae", "judge", "clip", "unet"):
        pretrain.main([stage, "--work", str(work), *small, f"--{stage}-steps", "3"])
        said = capsys.readouterr()
        assert f"resumed {stage}.ckpt at step 2" in said.out
        assert f"[v2] {stage}: its checkpoint was trained with other settings ({stage}_steps 2 -> 3)" in said.err
    history = json.loads((work / "recipe.json").read_text())["history"]
    assert [(h["stage"], h["from_step"], h["to_step"]) for h in history[-4:]] == [
        ("vae", 2, 3), ("judge", 2, 3), ("clip", 2, 3), ("unet", 2, 3)]


def test_v2_killed_run_resumes_as_if_never_stopped(tmp_path, monkeypatch):
    """A VAE run killed after its step-2 checkpoint and started again ends with the weights of
    a run that was never stopped (each step's batch is a function of the step)."""
    import torch
    from diffusers import AutoencoderKL

    pretrain = pretrain_script()
    v2 = sys.modules["pretrain_v2"]
    monkeypatch.setitem(v2.EVERY, "vae", 2)
    args = ["--world", "v2", "--n-train", "32", "--vae-batch", "2", "--vae-steps", "4"]
    a, b = tmp_path / "a", tmp_path / "b"
    pretrain.main(["data", "--work", str(a), *args])
    b.mkdir()
    for f in ("data.npz", "captions.json", "names.json"):
        (b / f).write_bytes((a / f).read_bytes())
    pretrain.main(["vae", "--work", str(a), *args])

    real_loop = v2.loop

    def killed_at_step_2(stage, work, cfg, steps, every, run_step, **objects):
        def step(i):
            if i == 2:
                raise KeyboardInterrupt  # the process dies after the step-2 checkpoint
            return run_step(i)
        return real_loop(stage, work, cfg, steps, every, step, **objects)

    monkeypatch.setattr(v2, "loop", killed_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        pretrain.main(["vae", "--work", str(b), *args])
    monkeypatch.setattr(v2, "loop", real_loop)
    pretrain.main(["vae", "--work", str(b), *args])
    wa = AutoencoderKL.from_pretrained(a / "vae").state_dict()
    wb = AutoencoderKL.from_pretrained(b / "vae").state_dict()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6)
    history = json.loads((b / "recipe.json").read_text())["history"]
    assert [(h["from_step"], h["to_step"]) for h in history] == [(2, 4)]


def test_v2_checkpoints_by_wall_time_too(tmp_path, monkeypatch, capsys):
    """Steps slower than expected (shared cores) still checkpoint every CHECKPOINT_S seconds."""
    pretrain = pretrain_script()
    v2 = sys.modules["pretrain_v2"]
    monkeypatch.setitem(v2.EVERY, "vae", 1000)
    monkeypatch.setattr(v2, "CHECKPOINT_S", 0.0)
    args = ["--world", "v2", "--n-train", "16", "--vae-batch", "2"]
    pretrain.main(["data", "--work", str(tmp_path), *args])
    saved = []
    resumable = sys.modules["pretrain_state"].Resumable  # the v1 and v2 loops' checkpoints
    real_save = resumable.save
    monkeypatch.setattr(resumable, "save", lambda self, elapsed: (saved.append(self.step), real_save(self, elapsed)))
    pretrain.main(["vae", "--work", str(tmp_path), *args, "--vae-steps", "3"])
    assert saved == [1, 2, 3]


def test_v2_refuses_a_work_folder_without_its_data(tmp_path):
    with pytest.raises(SystemExit, match="no v2 data set"):
        pretrain_script().main(["vae", "--world", "v2", "--work", str(tmp_path / "empty")])


def test_rendering_in_worker_processes_gives_the_same_data():
    """render_dataset and the judge's batches in 2 worker processes equal the in-process ones, in
    order; a step asked out of order (a resumed run) starts the queue again from it."""
    one = w2.render_dataset(1100, seed=3, progress=False)
    two = w2.render_dataset(1100, seed=3, progress=False, workers=2)
    for a, b in zip(one[:3], two[:3]):
        assert np.array_equal(a, b)
    assert one[3] == two[3]
    pretrain_script()
    v2 = sys.modules["pretrain_v2"]
    import functools

    fn = functools.partial(v2.judge_renders, b=4)
    ahead = v2.Prefetched(fn, 10, 2)
    try:
        for step in (1, 2, 3, 7, 8):
            images, labels = ahead(step)
            want_images, want_labels = fn(step)
            assert np.array_equal(images, want_images) and labels == want_labels, step
    finally:
        ahead.close()


def test_the_gpu_hand_off_trains_the_unet_elsewhere_and_exports_here(tmp_path):
    """gpu_unet_v2.sh rehearsed on the CPU at a tiny size: the CPU stages here, the carried VAE
    checkpoint, ``run`` (data rendered again in 2 processes, latents, UNet) into parts under
    15 MiB, ``unpack`` and ``export``: a pipeline that loads, with the run's records in recipe.json."""
    import os
    import subprocess

    from diffusers import StableDiffusionPipeline

    from conftest import REPO

    pretrain = pretrain_script()
    small = ["--world", "v2", "--n-train", "48", "--vae-batch", "4", "--judge-batch", "4", "--judge-eval-n", "8",
             "--clip-batch", "8", "--unet-batch", "4", "--vae-steps", "2", "--judge-steps", "2", "--clip-steps", "2",
             "--unet-steps", "2"]
    work = tmp_path / "work"
    for stage in ("data", "vae", "judge", "clip"):
        pretrain.main([stage, "--work", str(work), *small])
    carry = tmp_path / "carry"
    (carry / "work").mkdir(parents=True)
    for f in ("names.json", "recipe.json", "vae.ckpt"):
        (carry / "work" / f).write_bytes((work / f).read_bytes())
    script = str(REPO / "evaluation/toyworld/gpu_unet_v2.sh")
    env = dict(os.environ, V2_CARRY=str(carry), V2_WORK=str(tmp_path / "gpu"), OUT=str(tmp_path / "out"), V2_DEVICE="cpu",
               V2_WORKERS="2", V2_FLAGS=" ".join(small[2:]), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    subprocess.run(["bash", script, "run"], env=env, check=True, capture_output=True, text=True)
    out = tmp_path / "out"
    parts = sorted(out.glob("weights.tar.part-*"))
    assert parts and all(p.stat().st_size <= 15 * 2**20 for p in parts) and len(list(out.iterdir())) <= 8
    log = (out / "log.txt").read_text()
    assert "[v2] stage unet:" in log and "resumed vae.ckpt at step 2" in log
    subprocess.run(["bash", script, "unpack", str(out), str(work)], env=env, check=True, capture_output=True)
    pretrain.main(["export", "--work", str(work), "--out", str(tmp_path / "weights"), *small])
    recipe = json.loads((work / "recipe.json").read_text())
    assert recipe["stages"]["unet"]["steps"] == 2 and "hardware" in recipe["stages"]["unet"]
    assert [h["stage"] for h in recipe["history"]][-1] == "unet"
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "weights" / "sd", safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    assert pipe.unet.config.cross_attention_dim == 96


def test_v2_kept_checkpoints_resume_on_a_fresh_folder_as_if_never_moved(tmp_path, monkeypatch, capsys):
    """``keep`` (safetensors shards and a JSON skeleton, no pickle) and ``restore`` into an empty
    folder give back each checkpoint value for value and type for type; the data stage renders
    the data again there, and training goes on to the weights of a run that never moved."""
    import torch
    from diffusers import AutoencoderKL

    pretrain = pretrain_script()
    state = sys.modules["pretrain_state"]
    monkeypatch.setattr(state, "KEEP_SHARD_BYTES", 20_000)  # several shards, and tensors bigger than one
    args = ["--world", "v2", "--n-train", "32", "--vae-batch", "2", "--judge-batch", "2", "--judge-eval-n", "4"]
    a, b, kept = tmp_path / "a", tmp_path / "b", tmp_path / "kept"
    for stage in ("data", "vae", "judge"):
        pretrain.main([stage, "--work", str(a), *args, "--vae-steps", "2", "--judge-steps", "2"])
    pretrain.main(["keep", "--work", str(a), "--kept", str(kept), "--world", "v2"])
    files = sorted(p.name for p in kept.iterdir())
    assert {"recipe.json", "names.json", "vae.ckpt.json", "judge.ckpt.json"} <= set(files)
    assert sum(f.startswith("vae.ckpt.") and f.endswith(".safetensors") for f in files) > 1
    assert all(f.endswith((".json", ".safetensors")) for f in files)
    pretrain.main(["restore", "--work", str(b), "--kept", str(kept), "--world", "v2"])
    assert "restored" in capsys.readouterr().out
    for name in ("vae.ckpt", "judge.ckpt"):
        before = torch.load(a / name, weights_only=True)
        after = torch.load(b / name, weights_only=True)

        def same(x, y, where):
            assert type(x) is type(y), where
            if isinstance(x, torch.Tensor):
                assert x.dtype == y.dtype and torch.equal(x, y), where
            elif isinstance(x, dict):
                assert list(x) == list(y), where
                for k in x:
                    same(x[k], y[k], f"{where}/{k}")
                assert getattr(x, "_metadata", None) == getattr(y, "_metadata", None), where
            elif isinstance(x, (list, tuple)):
                assert len(x) == len(y), where
                for i, (u, v) in enumerate(zip(x, y)):
                    same(u, v, f"{where}/{i}")
            else:
                assert x == y or (x != x and y != y), where

        same(before, after, name)
    # A second restore leaves what the folder holds.
    (b / "vae.ckpt").write_bytes((a / "judge.ckpt").read_bytes())
    pretrain.main(["restore", "--work", str(b), "--kept", str(kept), "--world", "v2"])
    assert (b / "vae.ckpt").read_bytes() == (a / "judge.ckpt").read_bytes()
    assert "left as it is" in capsys.readouterr().err
    (b / "vae.ckpt").unlink()
    pretrain.main(["restore", "--work", str(b), "--kept", str(kept), "--world", "v2"])
    # Both folders train on to step 4: the same weights.
    pretrain.main(["data", "--work", str(b), *args])  # the data, rendered again
    assert (b / "data.npz").read_bytes() == (a / "data.npz").read_bytes()
    for work in (a, b):
        pretrain.main(["vae", "--work", str(work), *args, "--vae-steps", "4"])
    wa = AutoencoderKL.from_pretrained(a / "vae").state_dict()
    wb = AutoencoderKL.from_pretrained(b / "vae").state_dict()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0)
    with pytest.raises(SystemExit, match="no kept checkpoint"):
        pretrain.main(["restore", "--work", str(b), "--kept", str(tmp_path / "nothing"), "--world", "v2"])


class _Recording(torch.nn.Module):
    """A judge that remembers every batch of pictures it is shown."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.world, self.root, self.seen = inner, inner.world, inner.root, []

    def forward(self, x):
        self.seen.append(x.clone())
        return self.inner(x)


def _judge_knows_its_world(out: Path, work: Path):
    """A judge loaded from a v2 export is read on v2's pictures through the VAE beside it: its
    units' ceilings, its accuracy, and the VAE the ceilings load."""
    import torch
    from diffusers import AutoencoderKL

    from palp.toyworld import ceiling as ceil
    from palp.toyworld.accuracy import accuracy_scenes, judge_accuracy
    from palp.toyworld.judge import load_judge, to_tensor

    from safetensors import safe_open

    from palp.toyworld.worlds import WORLD_KEY

    judge = load_judge(out / "judge" / "judge.safetensors")
    assert judge.world == "v2" and judge.root == out.resolve()
    with safe_open(str(out / "judge" / "judge.safetensors"), framework="pt") as f:
        assert f.metadata()[WORLD_KEY] == "v2"  # the export names the world in the judge's own file
    vae, work_vae = ceil.load_vae(judge), AutoencoderKL.from_pretrained(work / "vae").eval()
    assert vae.state_dict().keys() == work_vae.state_dict().keys()
    assert all(torch.equal(v, work_vae.state_dict()[k]) for k, v in vae.state_dict().items())
    truth = {"class": "cat", "color": "purple", "pattern": "striped", "pattern_color": "yellow", "accessory": "hat"}
    prompt = "A sketch of [V] on the beach at sunset"
    spy = _Recording(judge)
    ceil.check_units([("s", truth, prompt)], judge=spy, n=3)  # the VAE found from the judge
    identity = Identity(truth["class"], truth["color"], truth["pattern"], truth["pattern_color"], truth["accessory"])
    renders = [render_v2(s) for s in ceil.unit_scenes(identity, prompt, 3)]
    assert torch.equal(spy.seen[0], to_tensor(np.stack(renders)))
    assert torch.equal(spy.seen[1], to_tensor(np.stack(ceil.vae_round_trip(work_vae, renders))))
    # The accuracy of a v2 judge is read on v2 renders of held-out composites (here), through
    # the VAE when given.
    a = _Recording(judge)
    judge_accuracy(a, n=6, seed=3, held_out=True)
    scenes = accuracy_scenes("v2", 6, 3, held_out=True)
    assert len(scenes) == 6 and all(w2.is_held_out(s.identity) for s in scenes)
    assert len(a.seen) == 1 and torch.equal(a.seen[0], to_tensor(np.stack([render_v2(s) for s in scenes])))
    judge_accuracy(a, n=6, seed=3, held_out=True, vae=work_vae)
    assert torch.equal(a.seen[1], to_tensor(np.stack(ceil.vae_round_trip(work_vae, [render_v2(s) for s in scenes]))))


def test_the_judges_world_comes_from_its_file_or_its_weights_folder(tmp_path):
    """v1 for the shipped weights and for a judge file alone; the world a judge file's metadata
    names, else its export folder's recipe (ROOT/judge/judge.safetensors beside ROOT/sd); a
    recipe above an unrelated folder is not the judge's; an unknown world, a disagreement and a
    judge of v2 with no VAE beside it are refused with the reason."""
    from safetensors.torch import load_file, save_file

    from palp.toyworld import WEIGHTS
    from palp.toyworld.ceiling import load_vae
    from palp.toyworld.judge import load_judge
    from palp.toyworld.worlds import WORLD_KEY, world_of

    shipped = load_judge()
    assert world_of(WEIGHTS) == "v1" and shipped.world == "v1" and shipped.root == WEIGHTS.resolve()
    tensors = load_file(WEIGHTS / "judge" / "judge.safetensors")
    root = tmp_path / "export"
    (root / "judge").mkdir(parents=True)
    (root / "sd").mkdir()
    save_file(tensors, root / "judge" / "judge.safetensors")
    (root / "recipe.json").write_text(json.dumps({"stages": {"data": {"world": "v9"}}}))
    with pytest.raises(ValueError, match="names world 'v9'; palp knows v1, v2"):
        load_judge(root / "judge" / "judge.safetensors")
    (root / "recipe.json").write_text(json.dumps({"stages": {"data": {"world": "v2"}}}))
    in_folder = load_judge(root / "judge" / "judge.safetensors")
    assert in_folder.world == "v2" and in_folder.root == root.resolve()
    with pytest.raises(ValueError, match="trained in toy world v2 but the shipped model in v1, and no VAE lies beside"):
        load_vae(in_folder)  # ROOT/sd holds no vae
    (root / "elsewhere").mkdir()  # a judge file in another folder of ROOT: ROOT's recipe is not its own
    save_file(tensors, root / "elsewhere" / "judge.safetensors")
    stray = load_judge(root / "elsewhere" / "judge.safetensors")
    assert stray.world == "v1" and stray.root is None
    save_file(tensors, root / "elsewhere" / "v2.safetensors", metadata={WORLD_KEY: "v2"})  # the world travels with the file
    alone = load_judge(root / "elsewhere" / "v2.safetensors")
    assert alone.world == "v2" and alone.root is None
    with pytest.raises(ValueError, match="no VAE lies beside the judge \\(a judge file alone has no sd/vae\\)"):
        load_vae(alone)
    (root / "recipe.json").write_text(json.dumps({"stages": {"data": {"world": "v1"}}}))
    save_file(tensors, root / "judge" / "judge.safetensors", metadata={WORLD_KEY: "v2"})
    with pytest.raises(ValueError, match="is a world-v2 judge but its weights folder's recipe.json names v1"):
        load_judge(root / "judge" / "judge.safetensors")


def _ships_as_the_toy_world(export: Path, tmp_path: Path, capsys):
    """ship_v2.py: a finished v2 export becomes a weights folder palp reads as world v2, with the
    examples rendered in v2; a v1 folder or an unfinished export is refused and nothing written."""
    from palp.toyworld import WEIGHTS
    from palp.toyworld.judge import load_judge

    ship = _script("ship_v2")
    weights, examples = tmp_path / "shipped" / "weights", tmp_path / "shipped" / "examples"
    assert ship.main(["--export", str(WEIGHTS), "--weights", str(weights), "--examples", str(examples)]) == 2
    assert "lacks names.json" in capsys.readouterr().err and not weights.exists() and not examples.exists()
    v1 = tmp_path / "v1-weights"
    shutil.copytree(WEIGHTS, v1)
    (v1 / "names.json").write_text("[]")
    assert ship.main(["--export", str(v1), "--weights", str(weights), "--examples", str(examples)]) == 2
    assert "recipe.json names world v1, not v2" in capsys.readouterr().err and not weights.exists()
    with pytest.raises(SystemExit):
        ship.main(["--export", str(export), "--held-out", "-1", "--weights", str(weights), "--examples", str(examples)])
    assert "--held-out must be between 0 and" in capsys.readouterr().err and not weights.exists()
    unfinished = tmp_path / "unfinished"
    shutil.copytree(export, unfinished)
    recipe = json.loads((unfinished / "recipe.json").read_text())
    recipe["stages"]["unet"]["settings"]["unet_steps"] = 10
    (unfinished / "recipe.json").write_text(json.dumps(recipe))
    assert ship.main(["--export", str(unfinished), "--weights", str(weights), "--examples", str(examples)]) == 2
    assert "has not finished (2 of 10 steps)" in capsys.readouterr().err and not weights.exists()
    (examples / "v1-leftover").mkdir(parents=True)  # what the examples folder held before goes
    assert ship.main(["--export", str(export), "--held-out", "1", "--weights", str(weights), "--examples", str(examples)]) == 0
    assert not (examples / "v1-leftover").exists() and not list(examples.parent.glob(".*"))  # no staging left behind
    assert load_judge(weights / "judge" / "judge.safetensors").world == "v2"
    assert (weights / "names.json").read_bytes() == (export / "names.json").read_bytes()
    held = w2.held_out_subjects(1)[0]
    assert sorted(p.name for p in examples.glob("*.json")) == sorted(f"{s.name}.json" for s in (*PERSONAL_SUBJECTS, held))
    from PIL import Image

    photo = np.asarray(Image.open(examples / held.name / "00.png"))
    assert np.array_equal(photo, render_v2(w2.subject_training_scenes(held, 4)[0]))
    assert (examples / "single-shot" / "purple-cat" / "00.png").read_bytes() == (examples / "purple-cat" / "00.png").read_bytes()
    assert Image.open(examples / "art" / "watercolour-robot" / "00.png").size == (64, 64)
