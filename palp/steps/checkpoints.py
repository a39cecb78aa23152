"""Training checkpoints: trainable weights, optimizer, global RNG states and metrics, written atomically.

Layout under ``OUTPUT/checkpoints/``: ``config.json`` (the run's resolved settings) and one
``step-NNNNNN/`` folder per checkpoint, which appears only once complete (temp dir + rename).
Only the trainable parameters are stored (LoRA + placeholder rows), never the base model.

A checkpoint is tensors (safetensors) and JSON only, never a pickle: a ``--resume`` from a
folder someone else can write (a shared bucket) must not be able to run code. The optimizer
state is split into its tensors (``optimizer.safetensors``) and its hyperparameters
(``optimizer.json``); the RNG states likewise (``rng.safetensors``, ``rng.json``).
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from palp.core import gcs, storage
from palp.core.settings import ConfigError
from palp.core.storage import atomic_directory
from palp.core.tracking import LOG_FOLDER
from palp.models.run_weights import (CONFIG_FILE, CUSTOM_DIFFUSION_FILE, EMBEDS_FILE, LAYERED_FILE, LORA_FILE, METRICS_FILE,
                                     REPORT_FILE, atomic_write_json, export_weights, read_metrics_csv, write_metrics_csv)
from palp.steps.validation import FOLDER as VALIDATION_FOLDER

DIR = "checkpoints"
# Settings that may change between a run and its resumption (a run that diverged is resumed
# from its last good checkpoint with a lower --lr, or without mixed precision), and the speed
# options, which change how a step runs but not what it computes.
RESUMABLE_CHANGES = {"steps", "save_steps", "checkpoint_every", "checkpoints_total_limit", "output",
                     "lr", "max_grad_norm", "mixed_precision", "fused_guidance", "compile", "compile_mode",
                     "compile_cache", "channels_last", "attention", "gradient_checkpointing",
                     # another thread count is allowed, though the result is then no longer the
                     # bit-identical continuation (CPU reductions are split by thread)
                     "threads", "num_threads",
                     # what is watched, not what is computed (validation samples draw nothing from training)
                     "report_to", "validation_every", "validation_prompts", "validation_images", "validation_seed",
                     "validation_steps", "validation_guidance",
                     # the micro-batch split: a run that ran out of memory continues with smaller micro-
                     # batches and more accumulation (the same global batch; no longer bit-identical)
                     "micro_batch_size", "gradient_accumulation_steps", "micro_batch_auto",
                     # --prior-preservation's class images as found: made again where the cache was lost
                     # (the settings that make them are checked; palp train warns when the pixels differ)
                     "class_images"}


# What a run checkpointed before a setting existed did: its value then (a run that differs from
# it now, as Custom Diffusion's new defaults do, is still refused, naming the setting). Before
# --personalize a run trained LoRA + [V]; before SDXL support, Stable Diffusion 1.x/2.x.
BEFORE_SETTINGS = {"personalize": "lora-token", "model_family": "sd", "token_init": "class", "hflip": 0.0,
                   "prompt_templates": "none", "scale_augmentation": False}


def _step_dirs(out: Path) -> list[Path]:
    root = out / DIR
    return sorted(p for p in root.glob("step-*") if p.is_dir()) if root.is_dir() else []


def latest_step(out: Path) -> int:
    dirs = _step_dirs(out)
    return int(dirs[-1].name.split("-")[1]) if dirs else 0


def check_output(out: Path, *, resume: bool) -> None:
    """Refuse to overwrite a finished run or to silently restart over a partial one."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output {out} is a file; give a folder")
    if resume:
        return
    if any((out / name).exists() for name in (CONFIG_FILE, LORA_FILE, CUSTOM_DIFFUSION_FILE, LAYERED_FILE)):
        raise ConfigError(f"--output {out} already holds a finished run; choose another folder (or --resume to extend it)")
    if _step_dirs(out):
        raise ConfigError(f"--output {out} holds checkpoints of an unfinished run; pass --resume to continue it")


def recorded_settings(out: Path) -> dict | None:
    """The settings of the run whose checkpoints are in ``out`` (None if there are none);
    ConfigError naming the file if it is not a JSON object."""
    path = out / DIR / "config.json"
    if not path.is_file():
        return None
    try:
        settings = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path} cannot be read ({type(e).__name__}: {e}); delete {out / DIR} to start afresh, "
                          f"or train into a new --output") from e
    if not isinstance(settings, dict):
        raise ConfigError(f"{path} is not a run's settings (a JSON object); delete {out / DIR} to start afresh, "
                          f"or train into a new --output")
    return settings


def recorded_setting(out: Path, key: str):
    """A setting of the run whose checkpoints are in ``out`` (None if there are none)."""
    return (recorded_settings(out) or {}).get(key)


def _short(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def record_config(out: Path, config: dict, *, resume: bool) -> None:
    """Write the run's settings; on --resume, check they match the checkpoints' run."""
    path = out / DIR / "config.json"
    if resume and path.exists():
        old = recorded_settings(out)
        new = json.loads(json.dumps(config, default=str))
        for key, before in BEFORE_SETTINGS.items():
            old.setdefault(key, before)
        changed = sorted(k for k in set(old) | set(new) if k not in RESUMABLE_CHANGES and old.get(k) != new.get(k))
        if changed:
            shown = ", ".join(f"{k} ({_short(old.get(k))} -> {_short(new.get(k))})" for k in changed)
            raise ConfigError(f"--resume: settings differ from the checkpointed run in {shown}; "
                              f"use the same settings or a new --output")
    atomic_write_json(path, config)


def _named_trainable(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def save(out: Path, step: int, model, optimizer, rows: list[dict], *, keep: int) -> Path:
    final = out / DIR / f"step-{step:06d}"
    try:
        _save(final, step, model, optimizer, rows)
    except Exception as e:
        if not storage.is_disk_full(e):
            raise
        needed = sum(p.numel() * 4 for p in _named_trainable(model).values()) * 3  # weights + Adam's two moments
        earlier = _step_dirs(out)
        kept = (f"the checkpoints before it are intact ({earlier[-1].name} newest): rerun with --resume once there is space"
                if earlier else "no checkpoint was written yet")
        raise storage.disk_full_error(e, final, needed=needed, kept=kept) from e
    for old in _step_dirs(out)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _save(final: Path, step: int, model, optimizer, rows: list[dict]) -> None:
    with atomic_directory(final, replace=True) as tmp:
        save_file({n: p.detach().float().cpu().contiguous() for n, p in _named_trainable(model).items()}, str(tmp / "trainable.safetensors"))
        _save_split(tmp / "optimizer", *_optimizer_parts(optimizer.state_dict()))
        _save_split(tmp / "rng", *_rng_parts())
        write_metrics_csv(tmp / "metrics.csv", rows)
        atomic_write_json(tmp / "state.json", {"step": step})


def load_latest(out: Path, model, optimizer, *, max_step: int | None = None) -> tuple[int, list[dict]]:
    """Restore the newest checkpoint; (0, []) when there is none yet.

    A checkpoint that cannot be read or does not fit this run (damaged or crafted files, a
    step counter that disagrees with its folder or lies beyond ``max_step``, tensors of other
    shapes) is refused with one ConfigError naming the file and how to recover. Nothing in it
    is unpickled."""
    dirs = _step_dirs(out)
    if not dirs:
        return 0, []
    ckpt = dirs[-1]
    earlier = f"delete {ckpt} to resume from {dirs[-2].name}" if len(dirs) > 1 else f"delete {ckpt} to start afresh"
    recover = f"{earlier}, or train into a new --output"
    if not (ckpt / "optimizer.json").is_file() or not (ckpt / "rng.json").is_file():
        raise ConfigError(f"checkpoint {ckpt} was written by an older palp (pickled optimizer/RNG state, which palp no longer "
                          f"loads: a pickle can run code), or is incomplete; resume it with that palp version, or {recover}")
    try:
        step = _read_step(ckpt)
        saved = load_file(str(ckpt / "trainable.safetensors"))
        optimizer_parts, rng_parts = _load_split(ckpt / "optimizer"), _load_split(ckpt / "rng")
        rows = read_metrics_csv(ckpt / "metrics.csv")
        if rows and int(rows[-1]["step"]) != step:
            raise ValueError(f"metrics.csv ends at step {rows[-1]['step']}, the checkpoint is at step {step}")
    except Exception as e:  # noqa: BLE001 (safetensors, JSON, CSV and OS errors alike: the file is unusable)
        raise ConfigError(f"checkpoint {ckpt} cannot be read ({type(e).__name__}: {str(e)[:200]}); {recover}") from e
    if max_step is not None and step > max_step:
        raise ConfigError(f"checkpoint {ckpt} is at step {step}, beyond this run's --steps {max_step}; give --steps {step} "
                          f"or more to extend it, or {recover}")
    params = _named_trainable(model)
    if set(saved) != set(params):
        raise ConfigError(f"checkpoint {ckpt} does not match this model's trainable parameters; use a new --output")
    shapes = [n for n, p in params.items() if saved[n].shape != p.shape or not saved[n].is_floating_point()]
    if shapes:
        raise ConfigError(f"checkpoint {ckpt}: tensor {shapes[0]} has shape {tuple(saved[shapes[0]].shape)}, this run's "
                          f"has {tuple(params[shapes[0]].shape)}; {recover}")
    try:
        state = _optimizer_state(*optimizer_parts)
        _check_optimizer_state(state, optimizer)
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(saved[name])
        optimizer.load_state_dict(state)
        _set_rng_state(*rng_parts)
    except Exception as e:  # noqa: BLE001 (a crafted optimizer or RNG state that torch refuses)
        raise ConfigError(f"checkpoint {ckpt} holds an optimizer or RNG state this run cannot take ({type(e).__name__}: "
                          f"{str(e)[:200]}); {recover}") from e
    return step, rows


def _check_optimizer_state(state: dict, optimizer) -> None:
    """ValueError unless ``state`` has this optimizer's shape: its groups with the same keys and
    value types, and per parameter tensors of the parameter's shape (``step``: one number).
    torch's ``load_state_dict`` checks neither, and a crafted state would fail only at the
    first update, after a whole forward and backward."""
    own = optimizer.state_dict()
    if len(state["param_groups"]) != len(own["param_groups"]):
        raise ValueError(f"{len(state['param_groups'])} parameter groups, this run's optimizer has {len(own['param_groups'])}")
    for theirs, ours in zip(state["param_groups"], own["param_groups"]):
        if set(theirs) != set(ours):
            raise ValueError(f"parameter group keys {sorted(theirs)}, this run's optimizer has {sorted(ours)}")
        for key, value in ours.items():
            kinds = (int, float) if isinstance(value, (int, float)) and not isinstance(value, bool) else type(value)
            got = theirs[key]
            if not isinstance(got, kinds) or (isinstance(value, (tuple, list)) and
                                              (len(got) != len(value) or not all(isinstance(v, (int, float)) for v in got))):
                raise ValueError(f"parameter group setting {key} is {got!r}")
    shapes = {i: p.shape for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    for index, entries in state["state"].items():
        if index not in shapes:
            raise ValueError(f"state for parameter {index}, which this run's optimizer does not have")
        for name, value in entries.items():
            want = () if name == "step" else shapes[index]
            if not isinstance(value, torch.Tensor) or (value.numel() != 1 if name == "step" else value.shape != want):
                raise ValueError(f"optimizer state {name} of parameter {index} has the wrong shape")


def _read_step(ckpt: Path) -> int:
    """The step a checkpoint's state.json records, which must be its folder's."""
    step = json.loads((ckpt / "state.json").read_text())["step"]
    if not isinstance(step, int) or isinstance(step, bool) or step != int(ckpt.name.split("-")[1]):
        raise ValueError(f"state.json says step {step!r}, the folder is {ckpt.name}")
    return step


def _save_split(stem: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(stem.with_suffix(".safetensors")))
    atomic_write_json(stem.with_suffix(".json"), meta)


def _load_split(stem: Path) -> tuple[dict[str, torch.Tensor], dict]:
    return load_file(str(stem.with_suffix(".safetensors"))), json.loads(stem.with_suffix(".json").read_text())


def _optimizer_parts(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """torch's optimizer state dict as tensors (``state.<param>.<name>``) + JSON (the rest)."""
    tensors, scalars = {}, {}
    for param, entries in state_dict["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{param}.{name}"] = value
            else:
                scalars.setdefault(str(param), {})[name] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, param, name = key.split(".", 2)
        state.setdefault(int(param), {})[name] = value
    for param, entries in meta["scalars"].items():
        state.setdefault(int(param), {}).update(entries)
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def _rng_parts() -> tuple[dict[str, torch.Tensor], dict]:
    # The step's own draws come from a generator seeded by (seed, step, rank) and need no
    # saving; the global states cover anything else that draws (dropout, augmentation).
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    meta = {"python": [version, list(internal), gauss],
            "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    return tensors, meta


def _set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    cuda = [tensors[f"cuda.{i}"] for i in range(len(tensors) - 1)]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def local_mirror(remote: str) -> Path:
    from palp.core.cache import cache_root

    return storage.cache_dir(remote, cache=cache_root(), kind="runs")


def pull(remote: str, *, resume: bool) -> Path:
    """The local working folder of a gs:// run; with ``resume``, holding its newest checkpoint.

    A checkpoint counts once its ``state.json`` is in the bucket (``push`` writes it last).
    """
    local = local_mirror(remote)
    if not resume:
        shutil.rmtree(local, ignore_errors=True)  # leftovers of an earlier attempt are not this run
    if storage.exists(storage.join(remote, CONFIG_FILE)) and not resume:
        raise ConfigError(f"--output {remote} already holds a finished run; choose another (or --resume to extend it)")
    names = storage.list_files(storage.join(remote, DIR), recursive=True) if resume else []
    steps = sorted({n.split("/")[0] for n in names if n.endswith("/state.json") and n.startswith("step-")})
    if not resume and storage.exists(storage.join(remote, DIR, "config.json")):
        raise ConfigError(f"--output {remote} holds checkpoints of an unfinished run; pass --resume to continue it")
    if steps and latest_step(local) < int(steps[-1].split("-")[1]):
        shutil.rmtree(local / DIR, ignore_errors=True)
        for name in ["config.json"] + [n for n in names if n.startswith(steps[-1] + "/")]:
            storage.write_bytes(local / DIR / name, storage.read_bytes(storage.join(remote, DIR, name)))
    local.mkdir(parents=True, exist_ok=True)
    return local


def push(checkpoint: Path, remote: str, *, keep: int = 0) -> None:
    """Upload one checkpoint folder (and the run's config.json); its state.json goes last.

    Then the bucket keeps the newest ``keep`` checkpoints, as ``save`` does locally (0: all);
    an old one loses its state.json first, so a half-deleted one never counts as complete.
    """
    storage.write_bytes(storage.join(remote, DIR, "config.json"), (checkpoint.parent / "config.json").read_bytes())
    storage.upload_dir(checkpoint, storage.join(remote, DIR, checkpoint.name), last=["state.json"])
    if keep > 0:
        steps = sorted({n.split("/")[0] for n in storage.list_files(storage.join(remote, DIR), recursive=True)
                        if n.startswith("step-") and "/" in n})
        for old in steps[:-keep]:
            storage.remove_tree(storage.join(remote, DIR, old), first=["state.json"])


@dataclass
class RunOutput:
    """Where a training run writes: ``local``, and for a gs:// ``--output`` the bucket it
    mirrors (``remote``): each snapshot and checkpoint is pushed as it is written, and the
    final files go last, the config last of all (its presence means the run is done)."""

    local: Path
    remote: str | None = None

    @classmethod
    def open(cls, output: str, *, resume: bool, main: bool) -> "RunOutput":
        """The run's output, ready to write: a gs:// run's local mirror pulled (with ``resume``,
        holding the newest checkpoint) and checked, by the ``main`` process only."""
        remote = output if gcs.is_gcs(output) else None
        if not main:
            return cls(local_mirror(remote) if remote else Path(output), remote)
        local = pull(remote, resume=resume) if remote else Path(output)
        check_output(local, resume=resume)
        storage.remove_stale_temporaries(local)  # a killed run's temp folders and files (we hold the output now)
        return cls(local, remote)

    def snapshot(self, step: int, model, tokens: list[str]) -> None:
        folder = self.local / "snapshots" / f"step-{step:06d}"
        export_weights(model, tokens, folder)
        if self.remote:
            storage.upload_dir(folder, storage.join(self.remote, "snapshots", folder.name))

    def checkpoint(self, step: int, model, optimizer, rows: list[dict], *, keep: int) -> None:
        saved = save(self.local, step, model, optimizer, rows, keep=keep)
        if self.remote:
            push(saved, self.remote, keep=keep)

    def publish(self, *paths: Path) -> None:
        """Push files or folders of the run (validation grids, tracker logs), given by their local
        paths, to the same place in the bucket, if there is one; a path that does not exist is skipped."""
        if not self.remote:
            return
        for path in paths:
            target = storage.join(self.remote, *Path(path).relative_to(self.local).parts)
            if Path(path).is_dir():
                storage.upload_dir(path, target)
            elif Path(path).is_file():
                storage.write_bytes(target, Path(path).read_bytes())

    def finish(self, model, tokens: list[str], rows: list[dict], config: dict, *, before_config=None) -> None:
        """The final weights, metrics, the run's page (``before_config()`` writes it) and config
        (``config``: the run's, with completed_steps)."""
        export_weights(model, tokens, self.local)
        write_metrics_csv(self.local / METRICS_FILE, rows)
        if before_config:
            before_config()
        atomic_write_json(self.local / CONFIG_FILE, config)  # written last: the run is done
        if self.remote:
            self.publish(*(self.local / n for n in (LOG_FOLDER, VALIDATION_FOLDER, LORA_FILE, CUSTOM_DIFFUSION_FILE,
                                                     LAYERED_FILE, EMBEDS_FILE, METRICS_FILE, REPORT_FILE)))
            self.publish(self.local / CONFIG_FILE)  # the config last, as locally

