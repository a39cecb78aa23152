"""Custom Diffusion's scale augmentation (``--scale-augmentation``; on by default for
``--personalize custom-diffusion``).

Each training row's photo is rescaled to a random side s (Kumari et al. 2023's recipe, as the
diffusers example ``train_custom_diffusion.py`` draws it): with probability 0.66 s ~ U{R/3..R},
else s ~ U{1.2R..1.4R - 1}, for the model's resolution R.

- s <= R: the rescaled photo is pasted at a random place on a canvas of zeros (mid-grey in the
  VAE's [-1, 1] range), and the loss is taken only over the latent pixels inside it, one latent
  pixel in from each edge (``top // f + 1 : (top + s) // f - 1``, f the VAE's downscaling);
- s > R: a random R x R crop of the rescaled photo, the loss over every latent pixel;
- the row's prompt says so: s < 0.6R prefixes "a far away " or "very small ", s > R prefixes
  "zoomed in " or "close up " (one of the two with equal chance), otherwise it is unchanged.

The photos are rescaled on the host from the R x R pixels palp loaded (bilinear, antialiased
when shrinking) and encoded by the VAE every step, so every row sees a fresh posterior sample
of its rescaled photo. Every choice comes from the step's draws (``rescale_draws``): a resumed
run rescales exactly as an uninterrupted one.

The masked loss of a row is the mean squared error over its masked latent positions (every
channel), and the batch's loss the mean over rows: with a full mask it is Eq. 1's plain mean.
(The diffusers example divides by the masked pixel count without the channels, C = 4 times
this.) A row whose mask is empty (a photo smaller than 2 latent pixels across, possible only at
tiny resolutions) adds 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SMALL_PHRASES = ("a far away ", "very small ")
LARGE_PHRASES = ("zoomed in ", "close up ")
PHRASES = ("",) + SMALL_PHRASES + LARGE_PHRASES  # a row's phrase index into this; 0: none
SMALL_SHARE = 0.66  # the chance of a side in [R/3, R]


def rescale_draws(gen: torch.Generator, batch: int, resolution: int) -> tuple[torch.Tensor, ...]:
    """(side, top, left, phrase) of ``batch`` rows, (B,) each: the rescaled side s, the offset of
    the photo on the canvas (s <= R) or of the crop in the photo (s > R), and the index into
    :data:`PHRASES` of the phrase the row's prompt takes."""
    small = torch.rand(batch, generator=gen) < SMALL_SHARE
    low = torch.randint(resolution // 3, resolution + 1, (batch,), generator=gen)
    high = torch.randint(int(1.2 * resolution), int(1.4 * resolution), (batch,), generator=gen)
    side = torch.where(small, low, high)
    room = (side - resolution).abs() + 1  # offsets 0 .. |s - R|
    top = (torch.rand(batch, generator=gen) * room).long().clamp(max=room - 1)
    left = (torch.rand(batch, generator=gen) * room).long().clamp(max=room - 1)
    which = torch.randint(2, (batch,), generator=gen)
    phrase = torch.where(side < 0.6 * resolution, 1 + which,
                         torch.where(side > resolution, 1 + len(SMALL_PHRASES) + which, torch.zeros_like(which)))
    return side, top, left, phrase


def rescale_photos(pixels: torch.Tensor, side: torch.Tensor, top: torch.Tensor, left: torch.Tensor,
                   factor: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows' rescaled photos (B, 3, R, R) and their loss masks (B, 1, R/f, R/f), from the
    photos ``pixels`` (B, 3, R, R) in [-1, 1] and the draws of :func:`rescale_draws`."""
    b, c, r, _ = pixels.shape
    out = torch.zeros_like(pixels)
    mask = torch.zeros(b, 1, r // factor, r // factor, dtype=pixels.dtype)
    for i in range(b):
        s, y, x = int(side[i]), int(top[i]), int(left[i])
        photo = F.interpolate(pixels[i : i + 1].float(), size=(s, s), mode="bilinear", align_corners=False,
                              antialias=s < r)[0].to(pixels.dtype)
        if s > r:
            out[i] = photo[:, y : y + r, x : x + r]
            mask[i] = 1
        else:
            out[i, :, y : y + s, x : x + s] = photo
            mask[i, :, y // factor + 1 : (y + s) // factor - 1, x // factor + 1 : (x + s) // factor - 1] = 1
    return out, mask


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each row's mean squared error over the positions ``mask`` (B, 1, h, w) keeps, every
    channel; the mean over rows (a row with an empty mask adds 0)."""
    err = (pred.float() - target.float()).square() * mask.float()
    kept = mask.float().sum(dim=(1, 2, 3)) * pred.shape[1]
    return (err.sum(dim=(1, 2, 3)) / kept.clamp(min=1)).mean()
