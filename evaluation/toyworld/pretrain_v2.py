"""Pretrain world v2's models (``palp.toyworld.v2``): named instances across styles.

    python evaluation/toyworld/pretrain.py all --world v2 --work /work/toyworld-v2-work

(``pretrain.py --world v2`` runs this module's ``main``; v1's stages and defaults are untouched.)

Stages, in this order, each resuming from its last checkpoint in ``--work``:

- ``data``: the pretraining plan (``palp.toyworld.v2.world.pretraining_plan``): every one of the
  300 named instances in every style, place and time, three times, captioned by name, by name
  and class, or described; and a quarter of described random composites (never a held-out one);
- ``vae``: v1's AutoencoderKL architecture (64x64 RGB <-> 16x16x8), trained on v2's renders;
- ``judge``: v1's judge architecture, on v2 scenes rendered on the fly (every composite, held-out
  ones included), half of each batch through the v2 VAE; its accuracy on fresh renders, on
  held-out composites and through the VAE goes to recipe.json. It runs before the UNet (it needs
  only the VAE), so the judge and VAE can be checked while the UNet trains;
- ``clip``: v1's small open_clip, on v2's images and captions;
- ``unet``: the UNet (cross-attention at 16x16, 8x8 and 4x4) and a wider CLIP text encoder,
  trained together as in v1 (SD's schedule, epsilon objective, 10% dropped captions, EMA);
- ``export``: the diffusers folder (weights sharded below 20 MB a file), open_clip folder, judge
  and recipe.json to ``--out`` (default ``WORK/weights``).

``keep`` and ``restore`` carry the checkpoints between machines (``pretrain_state.keep``):
``keep`` writes them to ``--kept`` (default ``evaluation/toyworld/v2-state``), ``restore`` puts
them in a new work folder, where ``all`` renders the data again and goes on.

Unlike v1, every stage draws each step's batch from a generator seeded by the step, so a run
killed and resumed from a checkpoint trains exactly as one that was never stopped; and it
checkpoints every few hundred steps and at least every 10 minutes of wall time (``loop``).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import random
import sys
import time
from pathlib import Path
from types import MappingProxyType

import numpy as np
import torch
import torch.nn.functional as F

from palp.core.storage import write_bytes, write_text
from palp.toyworld.judge import Judge, to_tensor
from pretrain_judge import judge_augment, judge_loss, through_vae_half
from pretrain_models import CLIP_CONFIG, LATENT, LATENT_CHANNELS, build_tokenizer, build_vae
import pretrain_state
from pretrain_state import encode_latents, load_data, record, save_npz, save_torch, seed_all, write_json

SEED = 100
STAGES = ("data", "vae", "judge", "clip", "unet", "export")
# Where ``keep`` puts the checkpoints and records (committed, so that a fresh checkout goes on
# from them: ``restore``, then ``all``).
KEPT = Path(__file__).resolve().parent / "v2-state"
TEXT_HIDDEN = 96


def build_text_encoder():
    """CLIPTextModel, 96 wide, 6 layers, 4 heads: 5,421,792 parameters (4.74 M of them the
    49,408-token embedding). 96, not 128: the embedding alone is then 18.97 MB in fp32, one
    file under palp's 20 MB limit (128 would be 25.3 MB, which no sharding can split)."""
    from palp.models.tiny import clip_text_encoder

    return clip_text_encoder(hidden=TEXT_HIDDEN, intermediate=4 * TEXT_HIDDEN, layers=6, heads=4)


def build_unet():
    """UNet2DConditionModel, channels (64, 128, 128), cross-attention in every block (16x16,
    8x8 and 4x4: a name must reach the patterns drawn at 16x16): 6,949,512 parameters."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=LATENT,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        block_out_channels=(64, 128, 128),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * 3,
        up_block_types=("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=8,
        norm_num_groups=8,
    )


PARAMS = {"unet": 6_949_512, "text_encoder": 5_421_792}  # checked by tests/test_toyworld_v2.py


@dataclasses.dataclass(frozen=True)
class PretrainConfigV2:
    """World v2's settings, one ``--flag`` each; recipe.json records a stage's own (``vae_*``...)."""

    n_train: int = 78000  # palp.toyworld.v2.world.plan_size(3)
    vae_steps: int = 5000
    vae_batch: int = 16
    judge_steps: int = 4000
    judge_batch: int = 64
    judge_eval_n: int = 2000
    clip_steps: int = 1000
    clip_batch: int = 128
    unet_steps: int = 10000
    unet_batch: int = 64
    unet_lr: float = 6e-4
    device: torch.device = torch.device("cpu")
    workers: int = 1  # rendering processes (data, judge); the results are the same for any number

    def settings(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("device", "workers")}

    def stage_settings(self, stage: str) -> dict:
        return {k: v for k, v in self.settings().items() if k.startswith(stage + "_") or (stage == "data" and k == "n_train")}


DEFAULTS = MappingProxyType(PretrainConfigV2().settings())
# Checkpoint every this many steps (at the step times measured on 2 cores alone, vae 0.6 s,
# judge 0.8 s, clip about 0.5 s, unet 2.2 s at batch 64: every 2-4 minutes), and whenever
# CHECKPOINT_S have passed since the last checkpoint (the cores may be shared: a run at the
# lowest priority beside other work was measured at 25-70 s a VAE step).
EVERY = {"vae": 250, "judge": 250, "clip": 250, "unet": 100}
CHECKPOINT_S = 600.0


def step_generator(stage_seed: int, step: int) -> torch.Generator:
    """The CPU generator of one step's draws: a function of the stage and the step only, so a
    resumed run draws what an uninterrupted one would."""
    return torch.Generator().manual_seed(stage_seed * 1_000_003 + step)


def cosine(step: int, steps: int, peak: float, warmup: int, floor: float) -> float:
    """Linear warm-up over ``warmup`` steps, then a cosine from ``peak`` to ``floor`` x peak."""
    return peak * min(1.0, (step + 1) / warmup) * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * step / steps)))


def loop(stage, work, cfg, steps, every, run_step, **objects):
    """``pretrain_state.loop`` with a checkpoint also every :data:`CHECKPOINT_S` seconds of wall time."""
    return pretrain_state.loop(stage, work, cfg, steps, every, run_step, checkpoint_s=CHECKPOINT_S, **objects)


# ----------------------------------------------------------------------------- stages


def stage_data(work: Path, cfg: PretrainConfigV2):
    if (work / "data.npz").exists():
        return
    from palp.toyworld.v2.world import NAMES, render_dataset

    t0 = time.perf_counter()
    images, labels, instance, captions = render_dataset(cfg.n_train, seed=SEED, workers=cfg.workers)
    save_npz(work / "data.npz", images=images, labels=labels, instance=instance)
    write_text(work / "captions.json", json.dumps(captions))
    write_json(work / "names.json", list(NAMES))
    record(work, "data", world="v2", n=len(captions), seed=SEED, named=int((instance >= 0).sum()),
           wall_s=round(time.perf_counter() - t0, 1))


def stage_vae(work: Path, cfg: PretrainConfigV2):
    images, _, _ = load_data(work)
    seed_all(SEED + 1)
    dev = cfg.device
    vae = build_vae().to(dev)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)

    def run_step(step):
        lr = cosine(step, cfg.vae_steps, 1e-3, 200, 0.1)
        for group in opt.param_groups:
            group["lr"] = lr
        g = step_generator(SEED + 1, step)
        idx = torch.randint(len(images), (cfg.vae_batch,), generator=g)
        x = to_tensor(images[idx.numpy()]).to(dev)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=g)).sample
        kl = post.kl().mean() / (LATENT * LATENT * LATENT_CHANNELS)
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        return loss.item()

    state = loop("vae", work, cfg, cfg.vae_steps, EVERY["vae"], run_step, vae=vae, opt=opt)
    marker = work / "latents.json"
    encoded = json.loads(marker.read_text())["vae_steps"] if marker.exists() else None
    if not (work / "latents.pt").exists() or encoded != state.step:
        encode_latents(work, vae, images, dev, state.step)


def judge_renders(step: int, b: int) -> tuple[np.ndarray, list]:
    """Step ``step``'s ``b`` v2 renders (any composite) and their label vectors: a function of the
    step (what a rendering worker computes)."""
    from palp.toyworld.v2.render import render_array
    from palp.toyworld.v2.world import label_vector, random_judge_scene

    rng = random.Random(f"v2-judge-{SEED}-{step}")
    scenes = [random_judge_scene(rng) for _ in range(b)]
    return np.stack([render_array(s) for s in scenes]), [label_vector(s) for s in scenes]


def judge_batch(step: int, b: int, vae, dev, renders=None):
    """Step ``step``'s ``b`` v2 renders (the first half through ``vae``, augmented) and their
    labels: a function of the step. ``renders``: the step's ``judge_renders``, if made already."""
    images, labels = renders if renders is not None else judge_renders(step, b)
    g = step_generator(SEED + 4, step)
    x = to_tensor(images).to(dev)
    y = torch.tensor(labels, device=dev)
    return judge_augment(through_vae_half(x, vae, g, dev), g), y


class Prefetched:
    """``fn(step)`` for steps asked in increasing order, computed ahead in ``workers`` processes
    (1: in this process, when asked). A step out of order starts the queue again from it."""

    def __init__(self, fn, last: int, workers: int):
        self.fn, self.last, self.workers = fn, last, workers
        self.pool, self.queue, self.next = None, None, None

    def __call__(self, step: int):
        if self.workers <= 1:
            return self.fn(step)
        if self.pool is None:
            from palp.toyworld.v2.world import process_pool

            self.pool = process_pool(self.workers)
        if step != self.next:
            self.queue, self.next = self.pool.imap(self.fn, range(step, self.last + 1)), step
        self.next += 1
        return next(self.queue)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool = None


def stage_judge(work: Path, cfg: PretrainConfigV2):
    from diffusers import AutoencoderKL

    from palp.toyworld.accuracy import judge_accuracy

    dev = cfg.device
    vae = AutoencoderKL.from_pretrained(work / "vae").to(dev).eval().requires_grad_(False)
    seed_all(SEED + 4)
    judge = Judge().to(dev)
    opt = torch.optim.AdamW(judge.parameters(), lr=2e-3, weight_decay=1e-4)
    renders = Prefetched(functools.partial(judge_renders, b=cfg.judge_batch), cfg.judge_steps, cfg.workers)

    def run_step(step):
        lr = cosine(step, cfg.judge_steps, 2e-3, 100, 0.0)
        for group in opt.param_groups:
            group["lr"] = lr
        judge.train()
        x, y = judge_batch(step, cfg.judge_batch, vae, dev, renders(step))
        loss = judge_loss(judge(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    try:
        loop("judge", work, cfg, cfg.judge_steps, EVERY["judge"], run_step, judge=judge, opt=opt)
    finally:
        renders.close()
    judge.cpu().eval()
    vae_cpu = vae.cpu()
    n = cfg.judge_eval_n
    acc = {"any": judge_accuracy(judge, n=n, seed=12345, world="v2"),
           "held_out": judge_accuracy(judge, n=n // 2, seed=54321, held_out=True, world="v2"),
           "any_vae": judge_accuracy(judge, n=n // 2, seed=777, vae=vae_cpu, world="v2")}
    save_torch(judge.state_dict(), work / "judge.pt")
    record(work, "judge", accuracy=acc)
    for k, v in acc.items():
        print(f"judge accuracy ({k}):", json.dumps(v))


def stage_clip(work: Path, cfg: PretrainConfigV2):
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
    b = cfg.clip_batch

    def run_step(step):
        lr = cosine(step, cfg.clip_steps, 5e-4, 200, 0.0)
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(len(images), (b,), generator=step_generator(SEED + 3, step)).numpy()
        x = (torch.from_numpy(images[idx]).permute(0, 3, 1, 2).float() / 255 - mean) / std
        text = tokenizer([captions[i] for i in idx])
        img_f, txt_f, scale = model(x.to(dev), text.to(dev))[:3]
        logits = scale * img_f @ txt_f.T
        same = torch.tensor([[captions[i] == captions[j] for j in idx] for i in idx], dtype=torch.float32, device=dev)
        target = same / same.sum(1, keepdim=True)
        loss = 0.5 * (torch.sum(-target * logits.log_softmax(1), 1).mean() + torch.sum(-target * logits.T.log_softmax(1), 1).mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        return loss.item()

    loop("clip", work, cfg, cfg.clip_steps, EVERY["clip"], run_step, model=model, opt=opt)
    from safetensors.torch import save

    write_json(work / "clip" / "open_clip_config.json", CLIP_CONFIG)
    write_bytes(work / "clip" / "open_clip_model.safetensors",
                save({k: v.contiguous().cpu() for k, v in model.state_dict().items()}))


def stage_unet(work: Path, cfg: PretrainConfigV2):
    from diffusers import DDPMScheduler

    from palp.models.tiny import SD_SCHEDULER_CONFIG

    _, _, captions = load_data(work)
    lat = torch.load(work / "latents.pt")
    mean, std, scaling = lat["mean"], lat["std"], lat["scaling_factor"]
    sched = DDPMScheduler(**{k: SD_SCHEDULER_CONFIG[k] for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")})
    tok = build_tokenizer()
    ids = tok(captions + [""], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    empty, ids = ids[-1], ids[:-1]
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
    ema = list(ema_unet.parameters()) + list(ema_te.parameters())
    b = cfg.unet_batch

    def run_step(step):
        lr = cosine(step, cfg.unet_steps, cfg.unet_lr, 300, 0.1)
        for group in opt.param_groups:
            group["lr"] = lr
        g = step_generator(SEED + 2, step)
        idx = torch.randint(len(captions), (b,), generator=g)
        z0 = (mean[idx].float() + std[idx].float() * torch.randn(b, LATENT_CHANNELS, LATENT, LATENT, generator=g)) * scaling
        tok_ids = ids[idx].clone()
        tok_ids[torch.rand(b, generator=g) < 0.1] = empty
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
        with torch.no_grad():  # one fused update of every EMA tensor (a launch per tensor would dominate on a GPU)
            torch._foreach_lerp_(ema, params, 1 - decay)
        return loss.item()

    loop("unet", work, cfg, cfg.unet_steps, EVERY["unet"], run_step, unet=unet, te=te, ema_unet=ema_unet, ema_te=ema_te, opt=opt)
    ema_unet.save_pretrained(work / "unet")
    ema_te.save_pretrained(work / "text_encoder")


def stage_export(work: Path, out: Path):
    """v1's export (``pretrain_export``), with every weights file sharded below 20 MB."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from safetensors.torch import save
    from transformers import CLIPTextModel

    from palp.core.storage import atomic_directory, read_bytes
    from palp.models.tiny import SD_SCHEDULER_CONFIG
    from palp.toyworld.worlds import WORLD_KEY

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
        pipe.save_pretrained(tmp, safe_serialization=True, max_shard_size="19MB")
        sched = tmp / "scheduler" / "scheduler_config.json"
        write_text(sched, json.dumps({**json.loads(sched.read_text()), "clip_sample": False}, indent=2, sort_keys=True) + "\n")
        for config in tmp.glob("*/config.json"):
            values = json.loads(config.read_text())
            if values.pop("_name_or_path", None) is not None:
                write_text(config, json.dumps(values, indent=2, sort_keys=True) + "\n")
    with atomic_directory(out / "clip", replace=True) as tmp:
        for f in ("open_clip_config.json", "open_clip_model.safetensors"):
            write_bytes(tmp / f, read_bytes(work / "clip" / f))
    with atomic_directory(out / "judge", replace=True) as tmp:
        state = torch.load(work / "judge.pt")
        write_bytes(tmp / "judge.safetensors", save({k: v.contiguous() for k, v in state.items()}, metadata={WORLD_KEY: "v2"}))
    write_bytes(out / "recipe.json", read_bytes(work / "recipe.json"))
    write_bytes(out / "names.json", read_bytes(work / "names.json"))
    big = [p for p in out.rglob("*") if p.is_file() and p.stat().st_size > 20 * 10**6]
    if big:
        raise SystemExit(f"weight files over 20 MB: {big}")


STAGE_RUNNERS = {"data": stage_data, "vae": stage_vae, "judge": stage_judge, "clip": stage_clip, "unet": stage_unet}
assert set(STAGE_RUNNERS) | {"export"} == set(STAGES)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="pretrain.py --world v2", description=__doc__.split("\n\n")[0])
    ap.add_argument("stage", choices=STAGES + ("all", "keep", "restore"),
                    help="one stage, or all of them in order; keep: copy the work folder's checkpoints and "
                         "records to --kept; restore: write them back into a work folder")
    ap.add_argument("--work", required=True, type=Path, help="working folder (data, checkpoints; resumable)")
    ap.add_argument("--kept", type=Path, default=KEPT,
                    help="keep/restore: the folder that holds the checkpoints between machines (default: %(default)s)")
    ap.add_argument("--out", type=Path, default=None, help="where export writes the weights (default: WORK/weights)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="auto", help="auto: cuda where there is a GPU, else cpu; or cpu, cuda, cuda:1...")
    ap.add_argument("--workers", type=int, default=1, help="rendering processes for the data and judge stages "
                                                           "(the same results for any number; a GPU machine's cores)")
    for k, v in DEFAULTS.items():
        ap.add_argument(f"--{k.replace('_', '-')}", type=type(v), default=v)
    args = ap.parse_args(argv)
    if args.stage == "keep":
        print(f"[v2] kept {len(pretrain_state.keep(args.work, args.kept))} files in {args.kept}")
        return
    if args.stage == "restore":
        wrote = pretrain_state.restore(args.kept, args.work)
        print(f"[v2] restored {', '.join(wrote) or 'nothing'} into {args.work}; the data stage renders the data again")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    try:
        device = torch.device(device)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        ap.error(f"--device {args.device}: {e}".splitlines()[0])
    cfg = PretrainConfigV2(**{k: getattr(args, k) for k in DEFAULTS}, device=device, workers=args.workers)
    args.work.mkdir(parents=True, exist_ok=True)
    out = args.out or args.work / "weights"
    for s in STAGES if args.stage == "all" else (args.stage,):
        if s != "data" and not (args.work / "names.json").exists():
            raise SystemExit(f"{args.work} holds no v2 data set (names.json); run the data stage with --world v2 first")
        settings = cfg.stage_settings(s)
        if settings:
            before = pretrain_state.read_recipe(args.work).get("stages", {}).get(s, {}).get("settings")
            if before and before != settings and (args.work / f"{s}.ckpt").exists():
                changed = ", ".join(f"{k} {before.get(k)} -> {v}" for k, v in settings.items() if before.get(k) != v)
                print(f"[v2] {s}: its checkpoint was trained with other settings ({changed}); it goes on with the new "
                      f"ones, and its learning-rate schedule follows them from here", file=sys.stderr, flush=True)
            record(args.work, s, settings=settings, device=str(cfg.device))
        print(f"[v2] stage {s}", flush=True)
        if s == "export":
            stage_export(args.work, out)
        else:
            STAGE_RUNNERS[s](args.work, cfg)
