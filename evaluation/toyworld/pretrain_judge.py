"""The judge's training batches and loss, for ``pretrain.py``'s ``judge`` stage.

Scenes rendered on the fly with every (class, colour) pair, half of each batch seen through the
toy VAE, blurred, noised and colour-jittered; every random draw comes from CPU generators seeded
by the step, whatever the device.
"""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn.functional as F

from palp.toyworld.judge import to_tensor
from palp.toyworld.world import ATTRIBUTES


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


def judge_batch(seed: int, step: int, b: int, vae, dev):
    """Step ``step``'s ``b`` images (rendered, the first half through ``vae``, augmented) and
    their labels. Each step's scenes and noise are a function of ``seed`` and the step: resuming
    repeats nothing."""
    from palp.toyworld.render import render_array
    from palp.toyworld.world import label_vector, random_scene

    rng, g = random.Random(f"judge-{seed}-{step}"), torch.Generator().manual_seed(seed + 4 + 1_000_003 * step)
    scenes = [random_scene(rng, every_pair=True) for _ in range(b)]
    x = to_tensor(np.stack([render_array(s) for s in scenes])).to(dev)
    y = torch.tensor([label_vector(s) for s in scenes], device=dev)
    return judge_augment(through_vae_half(x, vae, g, dev), g), y


def through_vae_half(x: torch.Tensor, vae, g: torch.Generator, dev) -> torch.Tensor:
    """``x`` with its first half replaced by VAE round trips (a posterior sample from ``g``,
    decoded): the judge reads samples that the VAE's decoder drew."""
    h = len(x) // 2
    with torch.no_grad():
        post = vae.encode(x[:h]).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g).to(dev)
        x[:h] = vae.decode(z).sample.clamp(-1, 1)
    return x


def judge_loss(out: dict, y: torch.Tensor):
    """The sum over attributes of the mean cross-entropy; attributes a picture does not show
    (a sketch's colours, a plain body's pattern colour) carry no label."""
    style_idx = ATTRIBUTES["style"].index("sketch")
    loss = 0.0
    for j, (k, logits) in enumerate(out.items()):
        per = F.cross_entropy(logits, y[:, j], reduction="none")
        if k in ("color", "pattern_color"):
            per = per * (y[:, 0] != style_idx)
        if k == "pattern_color":
            per = per * (y[:, list(ATTRIBUTES).index("pattern")] != 0)
        loss = loss + per.mean()
    return loss
