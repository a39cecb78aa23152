"""The pretraining's work folder: resumable checkpoints, recipe.json, and the training loop.

Every file goes through ``palp.core.storage`` (atomic: a killed run leaves the old file or the new
one, never half of one). A checkpoint holds a stage's modules and optimizer with the global RNG
states; recipe.json holds each stage's settings, sizes and wall times, and the ``history`` of
the runs that trained.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import sys
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from palp.core.storage import write_bytes, write_text


def save_torch(obj, path: Path):
    """``torch.save`` to ``path``, atomically."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes(path, buf.getvalue())


def save_npz(path: Path, **arrays):
    """``np.savez`` to ``path``, atomically."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_bytes(path, buf.getvalue())


def write_json(path: Path, value):
    write_text(path, json.dumps(value, indent=2))


def load_data(work: Path):
    d = np.load(work / "data.npz")
    captions = json.loads((work / "captions.json").read_text())
    return d["images"], d["labels"], captions


def read_recipe(work: Path) -> dict:
    path = work / "recipe.json"
    return json.loads(path.read_text()) if path.exists() else {}


def record(work: Path, stage: str, **info):
    """Add ``info`` to recipe.json's entry for ``stage`` (and say which hardware ran it)."""
    recipe = read_recipe(work)
    recipe.setdefault("stages", {}).setdefault(stage, {}).update(info)
    recipe["hardware"] = f"{os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}" + (
        f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    )
    write_json(work / "recipe.json", recipe)


def _history(work: Path, entry: dict):
    recipe = read_recipe(work)
    recipe.setdefault("history", []).append(entry)
    write_json(work / "recipe.json", recipe)


class Resumable:
    """Holds a stage's modules + optimizer; saves and restores them with the global RNG states
    (not a stage's own batch generator: see ``loop``)."""

    def __init__(self, path: Path, **objects):
        self.path, self.objects, self.step = path, objects, 0
        self.elapsed = 0.0
        if path.exists():
            # weights_only: tensors, numbers, strings and lists only; loading cannot run code.
            try:
                state = torch.load(path, weights_only=True, map_location="cpu")
            except pickle.UnpicklingError as e:
                raise SystemExit(f"{path}: not a checkpoint this version can load safely (older ones pickled numpy "
                                 f"state): {str(e).splitlines()[0]}; start the stage in a new --work folder") from None
            for k, obj in objects.items():
                obj.load_state_dict(state[k])
            self.step, self.elapsed = state["step"], state["elapsed"]
            torch.set_rng_state(state["torch_rng"])
            kind, keys, pos, has_gauss, cached = state["np_rng"]
            np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
            version, internal, gauss = state["py_rng"]
            random.setstate((version, tuple(internal), gauss))
            print(f"resumed {path.name} at step {self.step}")

    def save(self, elapsed: float):
        state = {k: obj.state_dict() for k, obj in self.objects.items()}
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        version, internal, gauss = random.getstate()
        state.update(step=self.step, elapsed=elapsed, torch_rng=torch.get_rng_state(),
                     np_rng=[kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
                     py_rng=[version, list(internal), gauss])
        save_torch(state, self.path)


def seed_all(seed: int):
    """Seed the global generators (torch, numpy, random)."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def loop(stage, work, cfg, steps, every, run_step, *, checkpoint_s: float | None = None, **objects):
    """Run ``run_step(step) -> loss`` until ``steps``, checkpointing every ``every`` steps.

    With ``checkpoint_s``, also a checkpoint whenever that many seconds of wall time have passed.
    Each run that trains goes to recipe.json's ``history`` (stage, from which step to which, the
    stage's settings, wall time): a stage's batch generator is seeded when the run starts, not
    checkpointed, so a resumed run draws the batches of steps 0, 1, ... again, and the same
    weights come only from the same runs in the same order (``SHIPPED_HISTORY``)."""
    state = Resumable(work / f"{stage}.ckpt", **objects)
    start = state.step
    t0 = last = time.perf_counter()
    bar = tqdm(range(start, steps), desc=stage, initial=start, total=steps, mininterval=10)
    avg = None
    for step in bar:
        loss = run_step(step)
        avg = loss if avg is None else 0.98 * avg + 0.02 * loss
        state.step = step + 1
        if state.step % 50 == 0:
            bar.set_postfix(loss=f"{avg:.4f}")
        now = time.perf_counter()
        if state.step % every == 0 or state.step == steps or (checkpoint_s is not None and now - last >= checkpoint_s):
            state.save(state.elapsed + now - t0)
            last = now
    wall = state.elapsed + time.perf_counter() - t0
    info = {"steps": steps, "wall_s": round(wall, 1)}
    if avg is not None:  # a resumed, already finished stage keeps the loss it recorded
        info["final_loss"] = avg
        _history(work, {"stage": stage, "from_step": start, "to_step": steps, "settings": cfg.stage_settings(stage),
                        "device": str(cfg.device), "wall_s": round(time.perf_counter() - t0, 1)})
    record(work, stage, **info)
    return state


def encode_latents(work: Path, vae, images, dev, vae_steps: int):
    """Write latents.pt (fp16 posterior means and stds of every image, SD's scaling factor),
    latents.json (the VAE's step), the VAE with that scaling factor, and its reconstruction PSNR."""
    import torch.nn.functional as F

    from palp.toyworld.judge import to_tensor

    vae.eval()
    means, stds = [], []
    with torch.no_grad():
        for i in tqdm(range(0, len(images), 256), desc="encoding latents", mininterval=10):
            post = vae.encode(to_tensor(images[i : i + 256]).to(dev)).latent_dist
            means.append(post.mean.half().cpu())
            stds.append(post.std.half().cpu())
    mean, std = torch.cat(means), torch.cat(stds)
    scaling = float(1.0 / mean.float().std())
    vae.register_to_config(scaling_factor=scaling)
    with torch.no_grad():
        x = to_tensor(images[:512]).to(dev)
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample
        psnr = float(10 * torch.log10(4 / F.mse_loss(rec.clamp(-1, 1), x)))
    save_torch({"mean": mean, "std": std, "scaling_factor": scaling}, work / "latents.pt")
    write_json(work / "latents.json", {"vae_steps": vae_steps})
    vae.save_pretrained(work / "vae")
    record(work, "vae", scaling_factor=scaling, reconstruction_psnr_db=round(psnr, 2))


# ----------------------------------------------------------------------------- a kept work folder
#
# A work folder holds tens of GB of data that the data stage renders again in minutes, and a few
# checkpoints that took hours. ``keep`` copies what cannot be made again (the checkpoints,
# recipe.json, names.json) to a folder that can be committed: every checkpoint as safetensors
# shards below KEEP_SHARD_BYTES with a JSON skeleton of its other values, so no file is a pickle
# and none is too large for a repository. ``restore`` writes them back into a work folder, where
# ``all`` renders the data again and goes on from the checkpoints.

KEEP_SHARD_BYTES = 19 * 10**6
KEPT_FILES = ("recipe.json", "names.json")


def _skeleton(obj, path: str, tensors: dict):
    """``obj`` as JSON, each tensor replaced by its key in ``tensors`` (tuples, lists and dicts
    with keys that are not strings tagged, so that ``_rebuild`` gives back the same types)."""
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().contiguous().clone()
        return {"tensor": path}
    if isinstance(obj, OrderedDict) and all(isinstance(k, str) for k in obj):  # a module's state_dict
        return {"odict": {"items": {k: _skeleton(v, f"{path}/{k}", tensors) for k, v in obj.items()},
                          "metadata": getattr(obj, "_metadata", None)}}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {"dict": {k: _skeleton(v, f"{path}/{k}", tensors) for k, v in obj.items()}}
        if all(isinstance(k, int) and not isinstance(k, bool) for k in obj):
            return {"int_dict": [[k, _skeleton(v, f"{path}/{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {type(obj).__name__: [_skeleton(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return {"value": obj}
    raise TypeError(f"{path}: a {type(obj).__name__} cannot be kept")


def _rebuild(node, tensors: dict):
    (kind, v), = node.items()
    if kind == "tensor":
        return tensors[v]
    if kind == "dict":
        return {k: _rebuild(x, tensors) for k, x in v.items()}
    if kind == "odict":
        out = OrderedDict((k, _rebuild(x, tensors)) for k, x in v["items"].items())
        if v["metadata"] is not None:
            out._metadata = v["metadata"]
        return out
    if kind == "int_dict":
        return {int(k): _rebuild(x, tensors) for k, x in v}
    if kind in ("list", "tuple"):
        items = [_rebuild(x, tensors) for x in v]
        return items if kind == "list" else tuple(items)
    return v


def keep(work: Path, kept: Path) -> list[str]:
    """Copy ``work``'s checkpoints, recipe.json and names.json to ``kept`` (replacing what it
    held, atomically); returns the files written."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save

    from palp.core.storage import atomic_directory

    work, kept = Path(work), Path(kept)
    ckpts = sorted(work.glob("*.ckpt"))
    if not ckpts:
        raise SystemExit(f"{work}: no checkpoint (*.ckpt) to keep")
    kept.parent.mkdir(parents=True, exist_ok=True)
    with atomic_directory(kept, replace=True) as tmp:
        for f in KEPT_FILES:
            if (work / f).exists():
                write_bytes(tmp / f, (work / f).read_bytes())
        for ckpt in ckpts:
            tensors: dict = {}
            skeleton = _skeleton(torch.load(ckpt, weights_only=True, map_location="cpu"), "", tensors)
            split = split_torch_state_dict_into_shards(tensors, filename_pattern=f"{ckpt.name}.shard{{suffix}}.safetensors",
                                                       max_shard_size=KEEP_SHARD_BYTES)  # save_pretrained's split
            for name, keys in split.filename_to_tensors.items():
                write_bytes(tmp / name, save({k: tensors[k] for k in keys}))
            write_text(tmp / f"{ckpt.name}.json", json.dumps({"shards": sorted(split.filename_to_tensors), "state": skeleton}))
    return sorted(p.name for p in kept.iterdir())


def restore(kept: Path, work: Path) -> list[str]:
    """Write the checkpoints, recipe.json and names.json kept in ``kept`` into ``work``; a file
    ``work`` already holds is left as it is (nothing written there is lost). Returns what it wrote."""
    from safetensors.torch import load_file

    kept, work = Path(kept), Path(work)
    skeletons = sorted(kept.glob("*.ckpt.json"))
    if not skeletons:
        raise SystemExit(f"{kept}: no kept checkpoint (*.ckpt.json) to restore")
    work.mkdir(parents=True, exist_ok=True)
    wrote = []
    for f in KEPT_FILES:
        if (kept / f).exists() and not (work / f).exists():
            write_bytes(work / f, (kept / f).read_bytes())
            wrote.append(f)
    for skeleton in skeletons:
        target = work / skeleton.name[: -len(".json")]
        if target.exists():
            print(f"{target} exists: left as it is", file=sys.stderr)
            continue
        spec = json.loads(skeleton.read_text())
        tensors = {}
        for name in spec["shards"]:
            tensors.update(load_file(kept / name))
        save_torch(_rebuild(spec["state"], tensors), target)
        wrote.append(target.name)
    return wrote
