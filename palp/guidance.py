"""The math of a PALP step as small pure functions (../shared/PALP.md, Eqs. 1-7).

Shapes: latents and noise predictions are (B, 4, h, w); ``alpha_bar`` is (B,), broadcast.
Nothing here runs a model: the trainer calls the UNet and hands the predictions in.
"""

from __future__ import annotations

import torch

METHODS = ("palp", "ti-db", "sds", "nfsd")
# NFSD's negative prompt for the "denoising" direction at large t (Katzir et al., Sec. 4).
NFSD_NEGATIVE_PROMPT = "unrealistic, blurry, low quality, out of focus, ugly, low contrast, dull, dark, low-resolution, gloomy"
NFSD_SMALL_T = 200


def _b(alpha_bar: torch.Tensor) -> torch.Tensor:
    return alpha_bar.reshape(-1, 1, 1, 1)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """z_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps (the DDPM forward process)."""
    a = _b(alpha_bar)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def predict_x0(z_t: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """Eq. 2: x0_hat = (z_t - sqrt(1 - a_t) eps) / sqrt(a_t)."""
    a = _b(alpha_bar)
    return (z_t - (1 - a).sqrt() * eps) / a.sqrt()


def cfg(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """G^s(x, y) = G(x, 0) + s (G(x, y) - G(x, 0))."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


def palp_delta(
    *, pre_uncond: torch.Tensor, pre_clean: torch.Tensor, pers_uncond: torch.Tensor, pers_cond: torch.Tensor, alpha: float, beta: float
) -> torch.Tensor:
    """Eq. 6: delta = G^alpha(x, y_c; theta) - G^beta(x, y_P; theta_LoRA)."""
    return cfg(pre_uncond, pre_clean, alpha) - cfg(pers_uncond, pers_cond, beta)


def sds_delta(*, pre_uncond: torch.Tensor, pre_clean: torch.Tensor, noise: torch.Tensor, alpha: float) -> torch.Tensor:
    """SDS (Poole et al.): delta = G^alpha(x, y_c; theta) - eps'."""
    return cfg(pre_uncond, pre_clean, alpha) - noise


def nfsd_delta(
    *, pre_uncond: torch.Tensor, pre_clean: torch.Tensor, pre_negative: torch.Tensor, t: torch.Tensor, alpha: float
) -> torch.Tensor:
    """NFSD (Katzir et al.): delta = delta_C + delta_D, with no noise term.

    delta_C = alpha (G(x, y_c) - G(x, 0)); delta_D = G(x, 0) for t < 200, else
    G(x, 0) - G(x, y_neg).
    """
    small = (t < NFSD_SMALL_T).reshape(-1, 1, 1, 1)
    delta_d = torch.where(small, pre_uncond, pre_uncond - pre_negative)
    return alpha * (pre_clean - pre_uncond) + delta_d


def alignment_coefficient(alpha_bar_t: torch.Tensor, *, rescale: bool, weight: float = 1.0) -> torch.Tensor:
    """The factor c with  grad L_align = c * delta * d eps_theta / d theta  (Eq. 7).

    d x0_hat / d theta = -(sqrt(1 - a_t) / sqrt(a_t)) d eps_theta / d theta, so the plain
    term is c = -w sqrt(1 - a_t)/sqrt(a_t); the rescaled term (PALP.md step 5) drops the
    ratio: c = -w.  (B,)
    """
    if rescale:
        return torch.full_like(alpha_bar_t, -weight)
    return -weight * (1 - alpha_bar_t).sqrt() / alpha_bar_t.sqrt()


def alignment_surrogate(eps_pred: torch.Tensor, delta: torch.Tensor, coefficient: torch.Tensor) -> torch.Tensor:
    """A scalar whose gradient is mean over elements of  c * delta * d eps_theta / d theta.

    ``delta`` and ``coefficient`` are constants (stop-gradient), so the alignment term flows
    through the same graph as the reconstruction loss: one backward serves both (Eq. 7).
    Averaged over elements like ``mse_loss``, so lambda weighs the two terms on one scale.
    """
    target = (_b(coefficient) * delta).detach()
    return (target * eps_pred).sum() / eps_pred.numel()
