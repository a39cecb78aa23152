"""The math of a PALP step as small pure functions (docs/method.md, Eqs. 1-7).

Shapes: latents and noise predictions are (B, 4, h, w); ``alpha_bar`` is (B,), broadcast.
Nothing here runs a model: the trainer calls the UNet and hands the predictions in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Method:
    """What a method's step needs beyond Eq. 1 (the personalization loss every method has)."""

    name: str
    aligns: bool  # an alignment term toward the clean prompt y_c (score sampling)
    personalized: bool  # its delta needs the personalized model on y_P (PALP's Eq. 6)
    negative: bool  # its delta needs the pretrained model on a negative prompt (NFSD)

    @property
    def reads_target_prompt(self) -> bool:
        """Whether training depends on the target prompt (through y_c): one TI+DB run serves every prompt."""
        return self.aligns


METHOD_TABLE = {m.name: m for m in (
    Method("palp", aligns=True, personalized=True, negative=False),
    Method("ti-db", aligns=False, personalized=False, negative=False),
    Method("sds", aligns=True, personalized=False, negative=False),
    Method("nfsd", aligns=True, personalized=False, negative=True),
)}
METHODS = tuple(METHOD_TABLE)
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
    term is c = -w sqrt(1 - a_t)/sqrt(a_t); the rescaled term (docs/method.md, step 5) drops the
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


def alignment_delta(method: Method, *, pre: list[torch.Tensor], pers: list[torch.Tensor], noise: torch.Tensor,
                    t: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """The method's delta from its guidance predictions: ``pre`` = the pretrained model on
    [empty, y_c(, y_neg)], ``pers`` = the personalized model on [empty, y_P] (PALP only)."""
    if method.personalized:
        return palp_delta(pre_uncond=pre[0], pre_clean=pre[1], pers_uncond=pers[0], pers_cond=pers[1], alpha=alpha, beta=beta)
    if method.negative:
        return nfsd_delta(pre_uncond=pre[0], pre_clean=pre[1], pre_negative=pre[2], t=t, alpha=alpha)
    return sds_delta(pre_uncond=pre[0], pre_clean=pre[1], noise=noise, alpha=alpha)


def step_loss(eps_pred: torch.Tensor, noise: torch.Tensor, delta: torch.Tensor | None = None,
              coefficient: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, reconstruction) of one step: Eq. 1's ||eps_theta - eps||^2, plus, with a
    ``delta`` and its ``coefficient`` (lambda included), the alignment surrogate whose
    gradient is Eq. 7's. Without ``delta`` (TI+DB) the loss is Eq. 1 alone."""
    rec = F.mse_loss(eps_pred.float(), noise.float())
    if delta is None:
        return rec, rec
    return rec + alignment_surrogate(eps_pred.float(), delta, coefficient), rec

