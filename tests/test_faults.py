"""Faults a cluster or a user produces, each ending in one line that says what failed and what
to do, exit 2, and nothing already written lost: mistyped experiment files, damaged or crafted
checkpoints, a full disk (a real small tmpfs), a read-only pipeline root, a malformed answer
key, a prompt too long for sampling, and a fan-out bounded for a project's GPU quota."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import EXAMPLE_CAT, REPO, train_args
from palp.cli import main as palp

ROOT = os.geteuid() == 0


def _lines(err: str) -> list[str]:
    """What palp said on stderr (its lines start with 'palp '), without what the libraries it
    loads print there (progress bars, warnings). An uncaught exception would not be printed: it
    would fail the test where the command is called in-process."""
    return [line for line in err.splitlines() if line.startswith("palp ")]


def _pipeline(argv) -> int:
    from pipelines.cli import main

    return main(argv)


# -- experiment files ---------------------------------------------------------------------------

BASE = {"subjects": [{"name": "cat", "images": str(EXAMPLE_CAT), "class_word": "cat"}],
        "prompts": ["A sketch of [V] in Paris at night"], "pretrained_model": "tiny", "clip_model": "tiny", "judge": ""}


@pytest.mark.parametrize("text, message", [
    ("train_steps: abc", "train_steps: expected a whole number (e.g. 500), got 'abc'"),
    ("methods: palp", "methods: expected a list (e.g. [palp, ti-db]), got 'palp'"),
    ("batch_size: [1, 2]", "batch_size: expected a whole number (e.g. 500), got [1, 2]"),
    ("lr: .nan", "lr: expected a finite number, got nan"),
    ("lr: abc\nreference: maybe", "lr: expected a number (e.g. 5e-5), got 'abc'; reference: expected true or false, got 'maybe'"),
    ("train_steps: 2.5", "train_steps: expected a whole number (e.g. 500), got 2.5"),
])
def test_mistyped_experiment_settings_are_named_with_their_type(tmp_path, capsys, text, message):
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump(BASE) + text + "\n")
    assert _pipeline(["pipeline", "run-local", "--config", str(config), "--pipeline-root", str(tmp_path / "root")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(_lines(err)) == 1 and "Traceback" not in err
    assert not (tmp_path / "root").exists()


def test_experiment_numbers_in_any_yaml_spelling_are_taken(tmp_path):
    from pipelines.experiment import load_experiment

    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump(BASE) + "lr: 5e-5\nlam: 1\ntrain_steps: 1_000\nbatch_size: 4.0\nsave_steps: 100\n")
    params = load_experiment(str(config))
    assert params["lr"] == 5e-5 and isinstance(params["lr"], float)  # PyYAML reads 5e-5 as a string
    assert params["lam"] == 1.0 and isinstance(params["lam"], float)
    assert params["train_steps"] == 1000 and params["batch_size"] == 4 and isinstance(params["batch_size"], int)
    assert params["save_steps"] == "100"


@pytest.mark.parametrize("text, message", [
    ("- a\n- b\n", "expected a mapping of pipeline settings"),
    ("subjects:\n  - {name: cat, images: 5}\n", "subject 1's images must be text (a string), got 5"),
    ("subjects: [{name: cat, images: x}]\nmethods: [palp, 3]\n", "methods must be a list of strings; 3 is not one"),
])
def test_malformed_experiment_files_get_one_line(tmp_path, capsys, text, message):
    config = tmp_path / "exp.yaml"
    config.write_text(text)
    assert _pipeline(["pipeline", "run-local", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(_lines(err)) == 1


# -- checkpoints ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory):
    """A finished 2-step run with a checkpoint at every step."""
    out = tmp_path_factory.mktemp("ckpt") / "run"
    assert palp(train_args(EXAMPLE_CAT, out, "--checkpoint-every", "1", steps=2)) == 0
    return out


def _header(tensors: dict) -> bytes:
    body = json.dumps(tensors).encode()
    return struct.pack("<Q", len(body)) + body


def _damage(ckpt: Path, how: str) -> None:
    trainable = ckpt / "trainable.safetensors"
    data = trainable.read_bytes()
    if how == "truncated":
        trainable.write_bytes(data[: len(data) // 2])
    elif how == "header too large":
        trainable.write_bytes(struct.pack("<Q", 2**62) + data[8:])
    elif how == "header not UTF-8":
        trainable.write_bytes(struct.pack("<Q", 4) + b"\xff\xfe\xfd\xfc")
    elif how == "offsets past the end":
        trainable.write_bytes(_header({"x": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}))
    elif how == "empty file":
        trainable.write_bytes(b"")
    elif how == "state not JSON":
        (ckpt / "state.json").write_bytes(b"\x00\x01garbage")
    elif how == "state step of another folder":
        (ckpt / "state.json").write_text('{"step": 1}')
    elif how == "state step 10^12":
        (ckpt / "state.json").write_text('{"step": 1000000000000}')
    elif how == "state step a string":
        (ckpt / "state.json").write_text('{"step": "2"}')
    elif how == "optimizer JSON garbage":
        (ckpt / "optimizer.json").write_text("[1, 2, 3]")
    elif how == "rng state of the wrong size":
        (ckpt / "rng.json").write_text('{"python": [3, [1, 2], null], "numpy": ["MT19937", [1], 0, 0, 0.0]}')
    elif how == "metrics not CSV":
        (ckpt / "metrics.csv").write_bytes(b"\xff\xfe" * 50)
    elif how == "trainable file missing":
        trainable.unlink()
    else:
        raise AssertionError(how)


DAMAGE = ["truncated", "header too large", "header not UTF-8", "offsets past the end", "empty file", "state not JSON",
          "state step of another folder", "state step 10^12", "state step a string", "optimizer JSON garbage",
          "rng state of the wrong size", "metrics not CSV", "trainable file missing"]


@pytest.mark.parametrize("how", DAMAGE)
def test_a_damaged_checkpoint_is_refused_with_the_way_back(checkpointed, tmp_path, capsys, how):
    out = tmp_path / "run"
    shutil.copytree(checkpointed, out)
    newest = out / "checkpoints" / "step-000002"
    _damage(newest, how)
    kept = lambda: {p: p.read_bytes() for p in (out / "checkpoints").glob("step-*/*")}  # noqa: E731
    before = kept()
    capsys.readouterr()
    assert palp(train_args(EXAMPLE_CAT, out, "--checkpoint-every", "1", "--resume", steps=3)) == 2
    err = capsys.readouterr().err
    assert len(_lines(err)) == 1 and "Traceback" not in err, err
    assert f"checkpoint {newest}" in err and f"delete {newest} to resume from step-000001" in err, err
    assert kept() == before  # the checkpoints as they were: nothing lost, nothing half written


def test_a_checkpoint_beyond_the_runs_steps_is_not_a_finished_run(checkpointed, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(checkpointed, out)
    (out / "training_config.json").unlink()
    capsys.readouterr()
    assert palp(train_args(EXAMPLE_CAT, out, "--checkpoint-every", "1", "--resume", steps=1)) == 2
    err = capsys.readouterr().err
    assert "is at step 2, beyond this run's --steps 1; give --steps 2 or more" in err
    assert not (out / "training_config.json").exists()


# -- a full disk ----------------------------------------------------------------------------------

def _tmpfs(mnt: Path, options: str):
    """A real tmpfs mounted at ``mnt`` for the block (root only: mounting needs it)."""
    import contextlib

    @contextlib.contextmanager
    def mounted():
        if not ROOT or not shutil.which("mount"):
            pytest.skip("mounting a tmpfs needs root (as root, permission bits do not stop writes either)")
        mnt.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mnt)], capture_output=True).returncode:
            pytest.skip("this machine does not let the tests mount a tmpfs")
        try:
            yield mnt
        finally:
            subprocess.run(["umount", "-l", str(mnt)], check=False)

    return mounted()


@pytest.fixture()
def small_disk(tmp_path):
    """A real 6 MB tmpfs."""
    with _tmpfs(tmp_path / "small", "size=6m") as mnt:
        yield mnt


def _fill(folder: Path, leave: int) -> None:
    """Fill ``folder``'s file system until ``leave`` bytes are free."""
    free = shutil.disk_usage(folder).free
    with open(folder / "ballast", "wb") as f:
        f.write(b"\0" * max(0, free - leave))


def test_a_full_disk_during_a_checkpoint_says_so_and_keeps_the_earlier_ones(small_disk, tmp_path, capsys):
    out = small_disk / "run"
    assert palp(train_args(EXAMPLE_CAT, out, "--checkpoint-every", "1", steps=1)) == 0
    _fill(small_disk, 16 * 1024)
    capsys.readouterr()
    assert palp(train_args(EXAMPLE_CAT, out, "--checkpoint-every", "1", "--resume", steps=3)) == 2
    err = capsys.readouterr().err
    assert "no space left on the device while writing" in err and "MB needed" in err and len(_lines(err)) == 1, err
    assert "(step-000001 newest)" in err
    (small_disk / "ballast").unlink()
    assert palp(train_args(EXAMPLE_CAT, out, "--checkpoint-every", "1", "--resume", steps=3)) == 0
    straight = tmp_path / "straight"
    assert palp(train_args(EXAMPLE_CAT, straight, "--checkpoint-every", "1", steps=3)) == 0
    from conftest import assert_identical_runs

    assert_identical_runs(straight, out)


def test_a_full_disk_during_sampling_says_so_and_a_rerun_finishes(small_disk, tmp_path, capsys):
    run = tmp_path / "run"
    assert palp(train_args(EXAMPLE_CAT, run, steps=1)) == 0
    out = small_disk / "samples"
    _fill(small_disk, 40 * 1024)
    cmd = ["sample", "--model", str(run), "--output", str(out), "--num-samples", "40", "--steps", "2", "--batch-size", "4",
           "--quiet"]
    capsys.readouterr()
    assert palp(cmd) == 2
    err = capsys.readouterr().err
    assert "no space left on the device" in err and "a rerun continues" in err and len(_lines(err)) == 1, err
    kept = {p: p.read_bytes() for p in out.rglob("*.png")}
    (small_disk / "ballast").unlink()
    assert palp(cmd) == 0
    assert len(list(out.rglob("*.png"))) == 40 and all(p.read_bytes() == b for p, b in kept.items())


def test_a_read_only_pipeline_root_is_one_line(tmp_path, capsys):
    with _tmpfs(tmp_path / "ro", "size=1m,ro") as mnt:
        config = tmp_path / "exp.yaml"
        config.write_text(yaml.safe_dump(BASE))
        assert _pipeline(["pipeline", "run-local", "--config", str(config), "--pipeline-root", str(mnt)]) == 2
        err = capsys.readouterr().err
        assert f"--pipeline-root {mnt} cannot be written (Read-only file system)" in err and len(_lines(err)) == 1


# -- the study key, sampling prompts, the fan-out -----------------------------------------------

def test_a_malformed_answer_key_is_named(tmp_path, capsys):
    from palp.steps.analyze import read_key
    from palp.steps.study import StudyError

    header = "question_id,kind,elements,method,subject,prompt,clean_prompt\n"
    (tmp_path / "k1.csv").write_text(header + 'q1,elements,not json,palp,cat,p,c\n')
    with pytest.raises(StudyError, match=r"row 2: column elements is not a JSON list of the prompt's elements \('not json'\)"):
        read_key(str(tmp_path / "k1.csv"))
    (tmp_path / "k2.csv").write_text(header + 'q1,similarity,,,cat,p,c\n')
    with pytest.raises(StudyError, match=r"row 2: the method is empty"):
        read_key(str(tmp_path / "k2.csv"))


def test_sampling_applies_trainings_prompt_limit(tmp_path, capsys):
    run = tmp_path / "run"
    assert palp(train_args(EXAMPLE_CAT, run, steps=1)) == 0
    long = "A sketch of [V] " + "in a very busy street " * 20
    capsys.readouterr()
    assert palp(["sample", "--model", str(run), "--output", str(tmp_path / "s"), "--prompts", long, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--prompts entry" in err and "77" in err and len(_lines(err)) == 1
    assert not (tmp_path / "s").exists() or not any((tmp_path / "s").rglob("*.png"))


def test_the_fan_out_is_bounded_and_the_dry_run_counts_it(tmp_path, capsys):
    from pipelines.experiment import load_experiment
    from pipelines.palp_pipeline import fan_out_size

    assert fan_out_size(load_experiment(str(REPO / "evaluation/experiments/paper_table2.yaml"))) == 42  # 30 PALP + 3 for each of the other four methods
    assert _pipeline(["pipeline", "compile", "--backend", "vertex", "--max-parallel", "2", "--output", str(tmp_path / "p.yaml")]) == 0
    loops = [v for v in _walk(yaml.safe_load_all((tmp_path / "p.yaml").read_text())) if isinstance(v, dict) and "parallelismLimit" in v]
    assert [v["parallelismLimit"] for v in loops] == [2]
    committed = (REPO / "pipelines/palp-vertex.yaml").read_text()
    assert "parallelismLimit: 4" in committed  # the default, recorded in the committed YAML
    assert _pipeline(["pipeline", "compile", "--backend", "vertex", "--max-parallel", "0", "--output", str(tmp_path / "q.yaml")]) == 2
    assert "--max-parallel must be a whole number >= 1" in capsys.readouterr().err


def _walk(value):
    if isinstance(value, dict):
        yield value
        for v in value.values():
            yield from _walk(v)
    elif isinstance(value, (list, tuple)) or hasattr(value, "__next__"):
        for v in value:
            yield from _walk(v)


# -- no silent surprises in a subject folder or its name -----------------------------------------

def _prepare(tmp_path, subjects: dict[str, Path]) -> tuple[int, dict | None]:
    argv = ["prepare", "--prompt", "A sketch of [V] in Paris at night", "--pretrained-model", "tiny",
            "--output", str(tmp_path / "prep"), "--quiet"]
    for name, folder in subjects.items():
        argv += ["--subject", f"{name}={folder}", "--class-word", f"{name}=cat"]
    code = palp(argv)
    manifest = tmp_path / "prep" / "manifest.json"
    return code, json.loads(manifest.read_text()) if manifest.exists() else None


def test_links_and_folders_in_a_subject_folder_each_get_a_line(tmp_path):
    folder = tmp_path / "cat"
    shutil.copytree(EXAMPLE_CAT, folder)
    first = sorted(folder.iterdir())[0]
    outside = tmp_path / "elsewhere.txt"
    outside.write_text("a secret")
    (folder / "link_inside.jpg").symlink_to(first.name)  # another photo of the folder: read
    (folder / "link_outside.jpg").symlink_to(outside)  # leads out of the folder: refused, not read
    (folder / "x.png").mkdir()  # a folder named like a photo
    (folder / "broken.png").symlink_to(folder / "missing.png")
    code, manifest = _prepare(tmp_path, {"cat": folder})
    assert code == 0
    fates = {f["file"]: f for f in manifest["subjects"]["cat"]["files"]}
    assert "a link to" in fates["link_outside.jpg"]["reason"] and "outside the subject folder" in fates["link_outside.jpg"]["reason"]
    assert "sha256" not in fates["link_outside.jpg"]  # never read, so never hashed
    assert fates["x.png"]["reason"].startswith("a folder, not a photo")
    assert fates["broken.png"]["reason"].startswith("not a regular file")
    assert "duplicate" in fates["link_inside.jpg"]["reason"]  # followed inside the folder: read, a duplicate
    from palp.steps.prepare import summary_table

    table = summary_table(manifest)
    assert "link_outside.jpg" in table and "x.png" in table


def test_subject_names_fit_every_later_step_and_differ_by_more_than_case(tmp_path, capsys):
    code, _ = _prepare(tmp_path, {"c" * 65: EXAMPLE_CAT})
    err = capsys.readouterr().err
    assert code == 2 and "is 65 characters long" in err and "at most 64" in err
    code, _ = _prepare(tmp_path, {"Cat": EXAMPLE_CAT, "cat": EXAMPLE_CAT})
    err = capsys.readouterr().err
    assert code == 2 and "'Cat' and 'cat' differ only in case" in err and not (tmp_path / "prep").exists()


def test_the_memory_plan_per_card_is_the_model_and_refuses_what_cannot_fit(tmp_path, capsys):
    """The dry run's memory table follows its stated model (fixed + micro x per-sample, from the
    H200 measurement), and a size that cannot fit the card is refused before submission."""
    from pipelines.memory import CARDS, FIXED, MEASURED_BATCH, MEASURED_PEAK, USABLE, plan, refusal, table

    per = (MEASURED_PEAK["palp"] - FIXED) / MEASURED_BATCH
    usable = CARDS["NVIDIA_L4"] * USABLE
    expected = max(d for d in (1, 2, 4, 8, 16, 32) if FIXED + d * per <= usable)
    assert plan("palp", "NVIDIA_L4", 32).micro == expected == 8  # the default run no longer needs 45 GiB on a 24 GB card
    assert plan("palp", "NVIDIA_A100_80GB", 32).micro == 32
    assert plan("palp", "NVIDIA_H200_141GB", 32).peak_gib == pytest.approx(MEASURED_PEAK["palp"])  # the measurement itself
    sd = {"pretrained_model": "CompVis/stable-diffusion-v1-4", "methods": ["palp", "ti-db"], "batch_size": 32}
    assert refusal(sd, "NVIDIA_L4") is None
    assert "micro_batch_size 32 is predicted to need 45.5 GiB" in refusal(dict(sd, micro_batch_size=32), "NVIDIA_L4")
    assert "PREDICTED from one H200 measurement" in table(sd, "NVIDIA_L4") and "| palp | 8 (auto) | 4 |" in table(sd, "NVIDIA_L4")
    assert "not predicted for base model tiny" in table(dict(sd, pretrained_model="tiny"), "NVIDIA_L4")
    assert "sample step: batch 8, predicted peak 6.3 GiB" in table(sd, "NVIDIA_L4")  # 2.6 + 8 x (10.08 - 2.6) / 16
    four = dict(sd, train_accelerators=4)  # each of 4 cards trains 8 of the 32: the whole share fits an L4 at once
    assert "global batch 32 over 4 cards, 8 per card" in table(four, "NVIDIA_L4") and "| palp | 8 (auto) | 1 |" in table(four, "NVIDIA_L4")
    assert "batch_size 32 is not divisible by train_accelerators 3" in refusal(dict(sd, train_accelerators=3), "NVIDIA_L4")
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump({**BASE, "pretrained_model": "CompVis/stable-diffusion-v1-4", "micro_batch_size": 32}))
    assert _pipeline(["pipeline", "submit", "--backend", "vertex", "--config", str(config), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "is predicted to need 45.5 GiB for palp on NVIDIA_L4" in err and len(_lines(err)) == 1


def test_a_replaced_folder_survives_a_failed_swap(tmp_path, monkeypatch):
    """atomic_directory(replace=True): the old folder is renamed aside, not deleted, until the new
    one is in its place; if that rename fails the old one is put back, and no aside copy remains
    after a swap that succeeds."""
    import pathlib

    from palp.core.storage import atomic_directory

    dest = tmp_path / "weights"
    dest.mkdir()
    (dest / "a.txt").write_text("old")
    real_rename = pathlib.Path.rename

    def failing(self, target):
        if pathlib.Path(target) == dest and self.name != ".weights.old":
            raise OSError("rename failed")
        return real_rename(self, target)

    monkeypatch.setattr(pathlib.Path, "rename", failing)
    with pytest.raises(OSError, match="rename failed"):
        with atomic_directory(dest, replace=True) as tmp:
            (tmp / "a.txt").write_text("new")
    assert (dest / "a.txt").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["weights"]
    monkeypatch.setattr(pathlib.Path, "rename", real_rename)
    with atomic_directory(dest, replace=True) as tmp:
        (tmp / "a.txt").write_text("new")
    assert (dest / "a.txt").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["weights"]
