"""Pretrain the toy world's models: a small Stable Diffusion, a small CLIP, and the judge.

    python evaluation/toyworld/pretrain.py all --work WORKDIR --out palp/toyworld/weights
    python evaluation/toyworld/pretrain.py replay --work WORKDIR --out palp/toyworld/weights

This is how the shipped weights were made, not part of palp: palp loads the weights, renderer
and judge (``palp.toyworld``) and never imports this script.

Stages run in order and each one resumes from its last checkpoint in ``--work``. ``all`` runs
each stage once to the DEFAULTS; ``replay`` runs ``SHIPPED_HISTORY``, the runs that made the
shipped weights, in their order (a first VAE, UNet and judge; the VAE trained on; the UNet and
the judge trained on with it):

- ``data``: render the pretraining scenes (images, ground-truth labels, captions);
- ``vae``: an AutoencoderKL, 64x64 RGB <-> 16x16x8 latents (SD's layout, 4x down-sampling);
- ``unet``: a UNet2DConditionModel and a CLIPTextModel (real CLIP tokenizer), trained together
  on the latents with SD's noise schedule and epsilon objective, captions dropped 10% of the
  time for classifier-free guidance, with an EMA of the weights;
- ``clip``: a small open_clip model trained contrastively on the same images and captions;
- ``judge``: a classifier that reads every ground-truth attribute from an image (half of its
  training images seen through the VAE);
- ``export``: write the diffusers model, the open_clip folder and the judge to ``--out``.

Everything is seeded. Wall times and sizes go to ``--work``/recipe.json, which ``export``
copies next to the weights. ``--device`` (default: a GPU where there is one) places the models;
every random draw is made on the CPU, from the same generators, whatever the device.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from palp.clip import TINY_CLIP_CONFIG
from palp.toyworld.judge import Judge, to_tensor
from palp.toyworld.world import ATTRIBUTES, render_dataset

RES = 64
LATENT = 16
LATENT_CHANNELS = 8
SEED = 0
STAGES = ("data", "vae", "unet", "judge", "clip", "export")

DEFAULTS = dict(
    n_train=60000,
    vae_steps=6000,
    vae_batch=16,
    vae_first_cycle=2000,
    unet_steps=8000,
    unet_batch=64,
    unet_lr=8e-4,
    clip_steps=1000,
    clip_batch=128,
    judge_steps=3750,
    judge_batch=64,
    judge_first_cycle=1500,
)

# How the shipped weights were made, run by run: each entry is one run of a stage with these
# settings (the rest are DEFAULTS), resuming that stage's checkpoint. A resumed run draws the
# batches of steps 0, 1, ... again (its generator is seeded when it starts), so the resume
# points matter. The VAE was trained on after the first UNet and judge: the UNet and the judge
# then went on from their checkpoints with the new VAE. ``pretrain replay`` runs this list.
SHIPPED_HISTORY = (
    ("data", {}),
    ("vae", {"vae_steps": 2000, "vae_first_cycle": 0}),
    ("unet", {"unet_steps": 3000}),
    ("unet", {"unet_steps": 5500}),
    ("judge", {"judge_steps": 1500}),
    ("judge", {"judge_steps": 3000}),
    ("clip", {}),
    ("vae", {"vae_steps": 6000, "vae_first_cycle": 2000}),
    ("unet", {"unet_steps": 8000}),
    ("judge", {"judge_steps": 3750}),
    ("export", {}),
)


# ----------------------------------------------------------------------------- architectures


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(24, 48, 64),
        layers_per_block=1,
        # 8 latent channels: 16x16x8 keeps the identity patterns that 16x16x4 blurs away.
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=RES,
    )


def build_text_encoder():
    from palp.tiny import clip_text_encoder

    return clip_text_encoder(hidden=64, intermediate=256, layers=4, heads=4)


def build_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=LATENT,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        block_out_channels=(48, 96, 120),  # 4.8M parameters: the weights file stays under 20 MB
        layers_per_block=1,
        # Cross-attention at 8x8 and 4x4: style, place and time are global properties.
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def build_tokenizer():
    import tempfile

    from transformers import CLIPTokenizer

    from palp.tiny import write_clip_tokenizer_files

    with tempfile.TemporaryDirectory() as d:
        write_clip_tokenizer_files(Path(d))
        return CLIPTokenizer.from_pretrained(d, pad_token="<|endoftext|>", model_max_length=77)


CLIP_CONFIG = {
    "model_cfg": {
        "embed_dim": 64,
        "vision_cfg": {"image_size": 64, "layers": 4, "width": 128, "head_width": 32, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 3},
    },
    "preprocess_cfg": TINY_CLIP_CONFIG["preprocess_cfg"],  # CLIP's own normalisation
}


# ----------------------------------------------------------------------------- helpers


def _atomic_save(obj, path: Path):
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _load_data(work: Path):
    d = np.load(work / "data.npz")
    captions = json.loads((work / "captions.json").read_text())
    return d["images"], d["labels"], captions


def _recipe(work: Path, stage: str, **info):
    path = work / "recipe.json"
    recipe = json.loads(path.read_text()) if path.exists() else {}
    recipe.setdefault("stages", {}).setdefault(stage, {}).update(info)
    recipe["hardware"] = f"{os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}" + (
        f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    )
    _write_json(path, recipe)


def _write_json(path: Path, value):
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=2))
    os.replace(tmp, path)


class _Resumable:
    """Holds a stage's modules + optimizer; saves and restores them with the global RNG states
    (not a stage's own batch generator: see ``_loop``)."""

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
        _atomic_save(state, self.path)


def _seed(seed: int):
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _loop(stage, work, cfg, steps, every, run_step, **objects):
    """Run ``run_step(step) -> loss`` until ``steps``, checkpointing every ``every`` steps.

    Each run that trains goes to recipe.json's ``history`` (stage, from which step to which, the
    stage's settings, wall time): a stage's batch generator is seeded when the run starts, not
    checkpointed, so a resumed run draws the batches of steps 0, 1, ... again, and the same
    weights come only from the same runs in the same order (``SHIPPED_HISTORY``)."""
    state = _Resumable(work / f"{stage}.ckpt", **objects)
    start, t0 = state.step, time.perf_counter()
    bar = tqdm(range(start, steps), desc=stage, initial=start, total=steps, mininterval=10)
    avg = None
    for step in bar:
        loss = run_step(step)
        avg = loss if avg is None else 0.98 * avg + 0.02 * loss
        state.step = step + 1
        if state.step % 50 == 0:
            bar.set_postfix(loss=f"{avg:.4f}")
        if state.step % every == 0 or state.step == steps:
            state.save(state.elapsed + time.perf_counter() - t0)
    wall = state.elapsed + time.perf_counter() - t0
    info = {"steps": steps, "wall_s": round(wall, 1)}
    if avg is not None:  # a resumed, already finished stage keeps the loss it recorded
        info["final_loss"] = avg
        _history(work, {"stage": stage, "from_step": start, "to_step": steps, "settings": _settings(stage, cfg),
                        "device": str(cfg["device"]), "wall_s": round(time.perf_counter() - t0, 1)})
    _recipe(work, stage, **info)
    return state


def _settings(stage: str, cfg) -> dict:
    return {k: v for k, v in cfg.items() if k.startswith(stage + "_") or (stage == "data" and k == "n_train")}


def _history(work: Path, entry: dict):
    path = work / "recipe.json"
    recipe = json.loads(path.read_text()) if path.exists() else {}
    recipe.setdefault("history", []).append(entry)
    _write_json(path, recipe)


# ----------------------------------------------------------------------------- stages


def stage_data(work: Path, cfg):
    if (work / "data.npz").exists():
        return
    t0 = time.perf_counter()
    images, labels, captions = render_dataset(cfg["n_train"], seed=SEED)
    np.savez(work / "data.tmp.npz", images=images, labels=labels)
    os.replace(work / "data.tmp.npz", work / "data.npz")
    (work / "captions.json").write_text(json.dumps(captions))
    _recipe(work, "data", n=cfg["n_train"], seed=SEED, wall_s=round(time.perf_counter() - t0, 1))


def vae_lr(step: int, steps: int, first_cycle: int) -> float:
    """The VAE's learning rate: 200 warm-up steps, then a cosine from 1e-3 down to 1e-4 over
    ``steps``; with ``first_cycle`` (0 < first_cycle < steps), the first ``first_cycle`` steps
    are a cosine of their own and the rest continue the cosine over all ``steps`` from where it
    is at ``first_cycle`` (a warm restart: what resuming a finished run with a larger
    ``--vae-steps`` does)."""
    cos = math.cos(math.pi * step / _period(step, steps, first_cycle))
    return 1e-3 * min(1.0, (step + 1) / 200) * (0.1 + 0.9 * 0.5 * (1 + cos))  # the shipped runs' arithmetic


def stage_vae(work: Path, cfg):
    images, _, _ = _load_data(work)
    _seed(SEED + 1)
    dev = cfg["device"]
    vae = build_vae().to(dev)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(SEED + 1)

    def run_step(step):
        lr = vae_lr(step, cfg["vae_steps"], cfg["vae_first_cycle"])
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(len(images), (cfg["vae_batch"],), generator=g)
        x = to_tensor(images[idx.numpy()]).to(dev)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=g)).sample  # diffusers draws from a CPU generator on the CPU
        kl = post.kl().mean() / (LATENT * LATENT * LATENT_CHANNELS)
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        return loss.item()

    state = _loop("vae", work, cfg, cfg["vae_steps"], 250, run_step, vae=vae, opt=opt)
    # Latents of the whole set (posterior mean and std) and SD's latent scaling factor, encoded
    # again whenever the VAE has trained on since they were (latents.json says how far it had).
    # latents.pt without latents.json was written before the record was kept: it is kept.
    marker = work / "latents.json"
    encoded = json.loads(marker.read_text())["vae_steps"] if marker.exists() else None
    if not (work / "latents.pt").exists() or encoded not in (None, state.step):
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
        _atomic_save({"mean": mean, "std": std, "scaling_factor": scaling}, work / "latents.pt")
        _write_json(marker, {"vae_steps": state.step})
        vae.save_pretrained(work / "vae")
        _recipe(work, "vae", scaling_factor=scaling, reconstruction_psnr_db=round(psnr, 2))


def stage_unet(work: Path, cfg):
    _, _, captions = _load_data(work)
    lat = torch.load(work / "latents.pt")
    mean, std, scaling = lat["mean"], lat["std"], lat["scaling_factor"]
    from diffusers import DDPMScheduler

    from palp.tiny import SD_SCHEDULER_CONFIG

    sched = DDPMScheduler(**{k: SD_SCHEDULER_CONFIG[k] for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")})
    tok = build_tokenizer()
    ids = tok(captions + [""], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    empty = ids[-1]
    ids = ids[:-1]
    _seed(SEED + 2)
    dev = cfg["device"]
    unet, te = build_unet().to(dev), build_text_encoder().to(dev)
    ema_unet, ema_te = build_unet().to(dev), build_text_encoder().to(dev)
    ema_unet.load_state_dict(unet.state_dict())
    ema_te.load_state_dict(te.state_dict())
    for p in list(ema_unet.parameters()) + list(ema_te.parameters()):
        p.requires_grad_(False)
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=cfg["unet_lr"], weight_decay=0.0)
    ac = sched.alphas_cumprod
    g = torch.Generator().manual_seed(SEED + 2)
    pairs = list(zip(list(unet.parameters()) + list(te.parameters()),
                     list(ema_unet.parameters()) + list(ema_te.parameters())))
    b = cfg["unet_batch"]

    def run_step(step):
        lr = cfg["unet_lr"] * min(1.0, (step + 1) / 300)
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(len(captions), (b,), generator=g)
        z0 = (mean[idx].float() + std[idx].float() * torch.randn(b, LATENT_CHANNELS, LATENT, LATENT, generator=g)) * scaling
        tok_ids = ids[idx].clone()
        drop = torch.rand(b, generator=g) < 0.1
        tok_ids[drop] = empty
        t = torch.randint(0, 1000, (b,), generator=g)
        eps = torch.randn(z0.shape, generator=g)
        a = ac[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
        cond = te(tok_ids.to(dev))[0]
        pred = unet(zt.to(dev), t.to(dev), encoder_hidden_states=cond).sample
        loss = F.mse_loss(pred, eps.to(dev))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for p, e in pairs:
                e.lerp_(p, 1 - decay)
        return loss.item()

    _loop("unet", work, cfg, cfg["unet_steps"], 250, run_step, unet=unet, te=te, ema_unet=ema_unet, ema_te=ema_te, opt=opt)
    ema_unet.save_pretrained(work / "unet")
    ema_te.save_pretrained(work / "text_encoder")


def stage_clip(work: Path, cfg):
    import open_clip

    images, _, captions = _load_data(work)
    clip_dir = work / "clip_init"
    clip_dir.mkdir(exist_ok=True)
    (clip_dir / "open_clip_config.json").write_text(json.dumps(CLIP_CONFIG, indent=2))
    _seed(SEED + 3)
    dev = cfg["device"]
    model = open_clip.create_model(f"local-dir:{clip_dir}", load_weights=False).to(dev)
    tokenizer = open_clip.get_tokenizer(f"local-dir:{clip_dir}")
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.05)
    mean = torch.tensor(CLIP_CONFIG["preprocess_cfg"]["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_CONFIG["preprocess_cfg"]["std"]).view(1, 3, 1, 1)
    g = torch.Generator().manual_seed(SEED + 3)
    b = cfg["clip_batch"]

    def run_step(step):
        lr = 5e-4 * min(1.0, (step + 1) / 200) * 0.5 * (1 + math.cos(math.pi * step / cfg["clip_steps"]))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(len(images), (b,), generator=g).numpy()
        x = (torch.from_numpy(images[idx]).permute(0, 3, 1, 2).float() / 255 - mean) / std
        text = tokenizer([captions[i] for i in idx])
        img_f, txt_f, scale = model(x.to(dev), text.to(dev))[:3]
        logits = scale * img_f @ txt_f.T
        # Captions can repeat within a batch: every identical caption is a positive.
        same = torch.tensor([[captions[i] == captions[j] for j in idx] for i in idx], dtype=torch.float32, device=dev)
        target = same / same.sum(1, keepdim=True)
        loss = 0.5 * (torch.sum(-target * logits.log_softmax(1), 1).mean() + torch.sum(-target * logits.T.log_softmax(1), 1).mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        return loss.item()

    _loop("clip", work, cfg, cfg["clip_steps"], 250, run_step, model=model, opt=opt)
    from safetensors.torch import save_file

    out = work / "clip"
    out.mkdir(exist_ok=True)
    (out / "open_clip_config.json").write_text(json.dumps(CLIP_CONFIG, indent=2))
    save_file({k: v.contiguous().cpu() for k, v in model.state_dict().items()}, str(out / "open_clip_model.safetensors"))


def judge_augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Blur, noise and colour jitter, so the judge also reads imperfect, generated images.
    The draws come from the CPU generator ``g`` on any device."""
    b = x.shape[0]

    def rand(*shape):
        return torch.rand(*shape, generator=g).to(x.device)

    k = torch.tensor([1.0, 2.0, 1.0], device=x.device) / 4
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), (k[:, None] * k[None]).expand(3, 1, 3, 3), groups=3)
    w = rand(b, 1, 1, 1)
    x = w * blurred + (1 - w) * x
    x = x + 0.08 * rand(b, 1, 1, 1) * torch.randn(x.shape, generator=g).to(x.device)
    x = x * (1 + 0.1 * (rand(b, 3, 1, 1) - 0.5)) + 0.1 * (rand(b, 1, 1, 1) - 0.5)
    return x.clamp(-1, 1)


def judge_lr(step: int, steps: int, first_cycle: int) -> float:
    """The judge's learning rate: a cosine from 2e-3 to 0 over the first ``first_cycle`` steps,
    then, from the lr a cosine over all ``steps`` has there, the rest of that cosine to 0 (a warm
    restart). This is what a 1500-step run resumed to 3000 steps did, which is how the shipped
    judge was trained; ``first_cycle`` 0 (or >= ``steps``): one cosine over all steps."""
    return 2e-3 * 0.5 * (1 + math.cos(math.pi * step / _period(step, steps, first_cycle)))


def _period(step: int, steps: int, first_cycle: int) -> int:
    """The cosine period at ``step`` of a schedule over ``steps`` whose first ``first_cycle``
    steps are a cosine of their own (0, or >= ``steps``: one cosine over all steps)."""
    return first_cycle if 0 < first_cycle < steps and step < first_cycle else steps


def stage_judge(work: Path, cfg):
    from diffusers import AutoencoderKL

    from palp.toyworld.world import label_vector, random_scene
    from palp.toyworld.render import render_array

    # The judge must read every subject, the personal ones too, so it learns from scenes
    # rendered on the fly with every (class, colour) pair, the pairs the toy model never saw
    # included: a judge trained on the pretraining set alone reads an orange dog as a blue one.
    # Half of every batch is seen through the toy VAE (a decoded sample of the latent
    # posterior): generated images are drawn by that decoder, and a judge trained on clean
    # renders alone misreads its softer shapes (dogs as cats) far more often.
    dev = cfg["device"]
    vae = AutoencoderKL.from_pretrained(work / "vae").to(dev).eval().requires_grad_(False)
    _seed(SEED + 4)
    judge = Judge().to(dev)
    opt = torch.optim.AdamW(judge.parameters(), lr=2e-3, weight_decay=1e-4)
    b = cfg["judge_batch"]
    style_idx = ATTRIBUTES["style"].index("sketch")

    def run_step(step):
        # Each step's scenes and noise are a function of the step: resuming repeats nothing.
        rng, g = random.Random(f"judge-{SEED}-{step}"), torch.Generator().manual_seed(SEED + 4 + 1_000_003 * step)
        lr = judge_lr(step, cfg["judge_steps"], cfg["judge_first_cycle"])
        for group in opt.param_groups:
            group["lr"] = lr
        judge.train()
        scenes = [random_scene(rng, every_pair=True) for _ in range(b)]
        x = to_tensor(np.stack([render_array(s) for s in scenes])).to(dev)
        y = torch.tensor([label_vector(s) for s in scenes], device=dev)
        h = b // 2
        with torch.no_grad():
            post = vae.encode(x[:h]).latent_dist
            z = post.mean + post.std * torch.randn(post.mean.shape, generator=g).to(dev)
            x[:h] = vae.decode(z).sample.clamp(-1, 1)
        x = judge_augment(x, g)
        out = judge(x)
        loss = 0.0
        for j, (k, logits) in enumerate(out.items()):
            per = F.cross_entropy(logits, y[:, j], reduction="none")
            # Attributes that a picture does not show carry no label.
            if k in ("color", "pattern_color"):
                per = per * (y[:, 0] != style_idx)
            if k == "pattern_color":
                per = per * (y[:, list(ATTRIBUTES).index("pattern")] != 0)
            loss = loss + per.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    _loop("judge", work, cfg, cfg["judge_steps"], 250, run_step, judge=judge, opt=opt)
    from palp.toyworld.judge import judge_accuracy

    judge.cpu().eval()  # judge_accuracy and predict read on the CPU
    acc = judge_accuracy(judge, n=2000, seed=12345)
    acc_pairs = judge_accuracy(judge, n=1000, seed=54321, held_out_pairs=True)
    _atomic_save(judge.state_dict(), work / "judge.pt")
    _recipe(work, "judge", heldout_accuracy=acc, heldout_pairs_accuracy=acc_pairs)
    print("judge accuracy on fresh renders:", json.dumps(acc))
    print("... on the pairs the toy model never saw:", json.dumps(acc_pairs))


def stage_export(work: Path, out: Path):
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextModel

    from palp.storage import atomic_directory
    from palp.tiny import SD_SCHEDULER_CONFIG

    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(work / "vae"),
        text_encoder=CLIPTextModel.from_pretrained(work / "text_encoder"),
        tokenizer=build_tokenizer(),
        unet=UNet2DConditionModel.from_pretrained(work / "unet"),
        scheduler=PNDMScheduler(**SD_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    out.mkdir(parents=True, exist_ok=True)
    with atomic_directory(out / "sd", replace=True) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        # As in SD-1.x's own scheduler_config.json: a DDIM scheduler made from this config must
        # not clip the predicted latents to [-1, 1] (the default for pixel-space models).
        sched = tmp / "scheduler" / "scheduler_config.json"
        sched.write_text(json.dumps({**json.loads(sched.read_text()), "clip_sample": False}, indent=2, sort_keys=True) + "\n")
        # The models were read from the work folder: its path is not part of the weights.
        for config in tmp.glob("*/config.json"):
            values = json.loads(config.read_text())
            if values.pop("_name_or_path", None) is not None:
                config.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")
    with atomic_directory(out / "clip", replace=True) as tmp:
        for f in ("open_clip_config.json", "open_clip_model.safetensors"):
            shutil.copy(work / "clip" / f, tmp / f)
    with atomic_directory(out / "judge", replace=True) as tmp:
        state = torch.load(work / "judge.pt")
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "judge.safetensors"))
    shutil.copy(work / "recipe.json", out / "recipe.json")
    big = [p for p in out.rglob("*") if p.is_file() and p.stat().st_size > 20 * 2**20]
    if big:
        raise SystemExit(f"weight files over 20 MB: {big}")


# The training stages in their order (``export`` takes the output folder instead of a config).
STAGE_RUNNERS = {"data": stage_data, "vae": stage_vae, "unet": stage_unet, "judge": stage_judge, "clip": stage_clip}
assert set(STAGE_RUNNERS) | {"export"} == set(STAGES)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("stage", choices=STAGES + ("all", "replay"),
                    help="one stage; all: every stage once with the settings given; replay: SHIPPED_HISTORY")
    ap.add_argument("--work", required=True, type=Path, help="working folder (data, checkpoints; resumable)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "weights")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="auto", help="auto: cuda where there is a GPU, else cpu; or cpu, cuda, cuda:1...")
    for k, v in DEFAULTS.items():
        ap.add_argument(f"--{k.replace('_', '-')}", type=type(v), default=v)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = {k: getattr(args, k) for k in DEFAULTS}
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    try:
        cfg["device"] = torch.device(device)
        torch.empty(0, device=cfg["device"])
    except (RuntimeError, AssertionError) as e:
        ap.error(f"--device {args.device}: {e}".splitlines()[0])
    args.work.mkdir(parents=True, exist_ok=True)
    if args.stage == "replay":
        runs = [(s, {**cfg, **settings}) for s, settings in SHIPPED_HISTORY]
    else:
        runs = [(s, cfg) for s in (STAGES if args.stage == "all" else (args.stage,))]
    for s, run_cfg in runs:
        # Each stage records the settings it last ran with (a later stage's run leaves them alone).
        settings = _settings(s, run_cfg)
        if settings:
            _recipe(args.work, s, settings=settings, device=str(run_cfg["device"]))
        if s == "export":
            stage_export(args.work, args.out)
        else:
            STAGE_RUNNERS[s](args.work, run_cfg)


if __name__ == "__main__":
    main()
