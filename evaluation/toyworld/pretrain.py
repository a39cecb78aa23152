"""Pretrain the toy world's models: a small Stable Diffusion, a small CLIP, and the judge.

    python evaluation/toyworld/pretrain.py all --work WORKDIR --out palp/toyworld/weights
    python evaluation/toyworld/pretrain.py replay --work WORKDIR --out palp/toyworld/weights
    python evaluation/toyworld/pretrain.py all --world v2 --work WORKDIR   (world v2: pretrain_v2.py)

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

Beside it (imported as top-level modules: this folder is on ``sys.path`` when the script runs):
``pretrain_models`` (the architectures), ``pretrain_state`` (checkpoints, recipe.json, the
resumable loop), ``pretrain_judge`` (the judge's batches and loss), ``pretrain_export`` (the
``export`` stage).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path
from types import MappingProxyType

import pretrain_v2  # world v2's stages (``--world v2``)
import torch
import torch.nn.functional as F
from pretrain_export import stage_export
from pretrain_judge import judge_batch, judge_loss
from pretrain_models import (CLIP_CONFIG, LATENT, LATENT_CHANNELS, build_text_encoder, build_tokenizer, build_unet,
                             build_vae)
from pretrain_state import encode_latents, load_data, loop, record, save_npz, save_torch, seed_all, write_json

from palp.core.storage import write_bytes, write_text
from palp.toyworld.judge import Judge, to_tensor
from palp.toyworld.world import render_dataset

SEED = 0
STAGES = ("data", "vae", "unet", "judge", "clip", "export")


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """The pretraining's settings, one ``--flag`` each (``n_train``: ``--n-train``), and the device.

    A stage's own settings are the fields named after it (``vae_*``; data's: ``n_train``):
    recipe.json records them under these names. ``device`` is where the models run, not a
    setting (every random draw is made on the CPU whatever it is)."""

    n_train: int = 60000
    vae_steps: int = 6000
    vae_batch: int = 16
    vae_first_cycle: int = 2000
    unet_steps: int = 8000
    unet_batch: int = 64
    unet_lr: float = 8e-4
    clip_steps: int = 1000
    clip_batch: int = 128
    judge_steps: int = 3750
    judge_batch: int = 64
    judge_first_cycle: int = 1500
    device: torch.device = torch.device("cpu")

    def settings(self) -> dict:
        """Every setting by name (all but ``device``), in field order."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "device"}

    def stage_settings(self, stage: str) -> dict:
        """``stage``'s own settings (what recipe.json records for it; export has none)."""
        return {k: v for k, v in self.settings().items() if k.startswith(stage + "_") or (stage == "data" and k == "n_train")}


# The settings' defaults by name (read-only; the flags and their types come from these).
DEFAULTS = MappingProxyType(PretrainConfig().settings())


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


# ----------------------------------------------------------------------------- stages


def stage_data(work: Path, cfg: PretrainConfig):
    if (work / "data.npz").exists():
        return
    t0 = time.perf_counter()
    images, labels, captions = render_dataset(cfg.n_train, seed=SEED)
    save_npz(work / "data.npz", images=images, labels=labels)
    write_text(work / "captions.json", json.dumps(captions))
    record(work, "data", n=cfg.n_train, seed=SEED, wall_s=round(time.perf_counter() - t0, 1))


def vae_lr(step: int, steps: int, first_cycle: int) -> float:
    """The VAE's learning rate: 200 warm-up steps, then a cosine from 1e-3 down to 1e-4 over
    ``steps``; with ``first_cycle`` (0 < first_cycle < steps), the first ``first_cycle`` steps
    are a cosine of their own and the rest continue the cosine over all ``steps`` from where it
    is at ``first_cycle`` (a warm restart: what resuming a finished run with a larger
    ``--vae-steps`` does)."""
    cos = math.cos(math.pi * step / _period(step, steps, first_cycle))
    return 1e-3 * min(1.0, (step + 1) / 200) * (0.1 + 0.9 * 0.5 * (1 + cos))  # the shipped runs' arithmetic


def stage_vae(work: Path, cfg: PretrainConfig):
    images, _, _ = load_data(work)
    seed_all(SEED + 1)
    dev = cfg.device
    vae = build_vae().to(dev)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(SEED + 1)

    def run_step(step):
        lr = vae_lr(step, cfg.vae_steps, cfg.vae_first_cycle)
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(len(images), (cfg.vae_batch,), generator=g)
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

    state = loop("vae", work, cfg, cfg.vae_steps, 250, run_step, vae=vae, opt=opt)
    # Latents of the whole set (posterior mean and std) and SD's latent scaling factor, encoded
    # again whenever the VAE has trained on since they were (latents.json says how far it had).
    # latents.pt without latents.json was written before the record was kept: it is kept.
    marker = work / "latents.json"
    encoded = json.loads(marker.read_text())["vae_steps"] if marker.exists() else None
    if not (work / "latents.pt").exists() or encoded not in (None, state.step):
        encode_latents(work, vae, images, dev, state.step)


def stage_unet(work: Path, cfg: PretrainConfig):
    _, _, captions = load_data(work)
    lat = torch.load(work / "latents.pt")
    mean, std, scaling = lat["mean"], lat["std"], lat["scaling_factor"]
    from diffusers import DDPMScheduler

    from palp.models.tiny import SD_SCHEDULER_CONFIG

    sched = DDPMScheduler(**{k: SD_SCHEDULER_CONFIG[k] for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")})
    tok = build_tokenizer()
    ids = tok(captions + [""], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    empty = ids[-1]
    ids = ids[:-1]
    seed_all(SEED + 2)
    dev = cfg.device
    unet, te = build_unet().to(dev), build_text_encoder().to(dev)
    ema_unet, ema_te = build_unet().to(dev), build_text_encoder().to(dev)
    ema_unet.load_state_dict(unet.state_dict())
    ema_te.load_state_dict(te.state_dict())
    for p in list(ema_unet.parameters()) + list(ema_te.parameters()):
        p.requires_grad_(False)
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=0.0)
    ac = sched.alphas_cumprod
    g = torch.Generator().manual_seed(SEED + 2)
    pairs = list(zip(list(unet.parameters()) + list(te.parameters()),
                     list(ema_unet.parameters()) + list(ema_te.parameters())))
    b = cfg.unet_batch

    def run_step(step):
        lr = cfg.unet_lr * min(1.0, (step + 1) / 300)
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

    loop("unet", work, cfg, cfg.unet_steps, 250, run_step, unet=unet, te=te, ema_unet=ema_unet, ema_te=ema_te, opt=opt)
    ema_unet.save_pretrained(work / "unet")
    ema_te.save_pretrained(work / "text_encoder")


def stage_clip(work: Path, cfg: PretrainConfig):
    import open_clip

    images, _, captions = load_data(work)
    clip_dir = work / "clip_init"
    write_json(clip_dir / "open_clip_config.json", CLIP_CONFIG)
    seed_all(SEED + 3)
    dev = cfg.device
    model = open_clip.create_model(f"local-dir:{clip_dir}", load_weights=False).to(dev)
    tokenizer = open_clip.get_tokenizer(f"local-dir:{clip_dir}")
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.05)
    mean = torch.tensor(CLIP_CONFIG["preprocess_cfg"]["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_CONFIG["preprocess_cfg"]["std"]).view(1, 3, 1, 1)
    g = torch.Generator().manual_seed(SEED + 3)
    b = cfg.clip_batch

    def run_step(step):
        lr = 5e-4 * min(1.0, (step + 1) / 200) * 0.5 * (1 + math.cos(math.pi * step / cfg.clip_steps))
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

    loop("clip", work, cfg, cfg.clip_steps, 250, run_step, model=model, opt=opt)
    from safetensors.torch import save

    write_json(work / "clip" / "open_clip_config.json", CLIP_CONFIG)
    write_bytes(work / "clip" / "open_clip_model.safetensors",
                save({k: v.contiguous().cpu() for k, v in model.state_dict().items()}))


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


def stage_judge(work: Path, cfg: PretrainConfig):
    from diffusers import AutoencoderKL

    # The judge must read every subject, the personal ones too, so it learns from scenes
    # rendered on the fly with every (class, colour) pair, the pairs the toy model never saw
    # included: a judge trained on the pretraining set alone reads an orange dog as a blue one.
    # Half of every batch is seen through the toy VAE (a decoded sample of the latent
    # posterior): generated images are drawn by that decoder, and a judge trained on clean
    # renders alone misreads its softer shapes (dogs as cats) far more often.
    dev = cfg.device
    vae = AutoencoderKL.from_pretrained(work / "vae").to(dev).eval().requires_grad_(False)
    seed_all(SEED + 4)
    judge = Judge().to(dev)
    opt = torch.optim.AdamW(judge.parameters(), lr=2e-3, weight_decay=1e-4)

    def run_step(step):
        lr = judge_lr(step, cfg.judge_steps, cfg.judge_first_cycle)
        for group in opt.param_groups:
            group["lr"] = lr
        judge.train()
        x, y = judge_batch(SEED, step, cfg.judge_batch, vae, dev)
        loss = judge_loss(judge(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    loop("judge", work, cfg, cfg.judge_steps, 250, run_step, judge=judge, opt=opt)
    from palp.toyworld.accuracy import judge_accuracy

    judge.cpu().eval()  # judge_accuracy and predict read on the CPU
    acc = judge_accuracy(judge, n=2000, seed=12345)
    acc_pairs = judge_accuracy(judge, n=1000, seed=54321, held_out=True)
    save_torch(judge.state_dict(), work / "judge.pt")
    record(work, "judge", heldout_accuracy=acc, heldout_pairs_accuracy=acc_pairs)
    print("judge accuracy on fresh renders:", json.dumps(acc))
    print("... on the pairs the toy model never saw:", json.dumps(acc_pairs))


# The training stages in their order (``export`` takes the output folder instead of a config).
STAGE_RUNNERS = {"data": stage_data, "vae": stage_vae, "unet": stage_unet, "judge": stage_judge, "clip": stage_clip}
assert set(STAGE_RUNNERS) | {"export"} == set(STAGES)


def main(argv=None):
    # ``--world v2`` hands everything to pretrain_v2 (palp.toyworld.v2: named instances across
    # styles); without it, or with ``--world v1``, this is v1's pretraining, unchanged.
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--world", choices=("v1", "v2"), default="v1")
    known, rest = pre.parse_known_args(argv)
    if known.world == "v2":
        return pretrain_v2.main(rest)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", choices=("v1", "v2"), default="v1",
                    help="v1: the shipped world (default); v2: named instances across styles (pretrain_v2.py, its own flags)")
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
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    try:
        device = torch.device(device)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        ap.error(f"--device {args.device}: {e}".splitlines()[0])
    cfg = PretrainConfig(**{k: getattr(args, k) for k in DEFAULTS}, device=device)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.stage == "replay":
        runs = [(s, dataclasses.replace(cfg, **settings)) for s, settings in SHIPPED_HISTORY]
    else:
        runs = [(s, cfg) for s in (STAGES if args.stage == "all" else (args.stage,))]
    for s, run_cfg in runs:
        # Each stage records the settings it last ran with (a later stage's run leaves them alone).
        settings = run_cfg.stage_settings(s)
        if settings:
            record(args.work, s, settings=settings, device=str(run_cfg.device))
        if s == "export":
            stage_export(args.work, args.out)
        else:
            STAGE_RUNNERS[s](args.work, run_cfg)


if __name__ == "__main__":
    main()
