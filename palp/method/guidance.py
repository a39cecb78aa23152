"""The math of a PALP step as small pure functions (docs/method.md, Eqs. 1-7).

Shapes: latents and noise predictions are (B, 4, h, w); ``alpha_bar`` is (B,), broadcast.
Nothing here runs a model: the trainer calls the UNet and hands the predictions in, named by
the model and text state each was made with (:class:`GuidancePredictions`); which ones a
method needs, and in which order one UNet call makes them, is :func:`needed_predictions`.
Every function takes its arguments by keyword; the alignment weight lambda enters through
:func:`alignment_coefficient`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from palp.core.methods import Method
from palp.method import augment

# NFSD's "denoising" direction switches at this timestep (Katzir et al., Sec. 4).
NFSD_SMALL_T = 200


def _b(alpha_bar: torch.Tensor) -> torch.Tensor:
    return alpha_bar.reshape(-1, 1, 1, 1)


@dataclass(frozen=True)
class GuidancePredictions:
    """The no-grad guidance predictions at the re-noised clean estimate (x, t), float32,
    (B, 4, h, w) each, named by model (pretrained theta, personalized theta_LoRA) and text state
    (empty prompt, clean prompt y_c, NFSD's negative prompt, personalization prompt y_P)."""

    pretrained_uncond: torch.Tensor  # G(x, t, ""; theta)
    pretrained_clean: torch.Tensor  # G(x, t, y_c; theta)
    pretrained_negative: torch.Tensor | None = None  # G(x, t, y_neg; theta): NFSD
    personalized_uncond: torch.Tensor | None = None  # G(x, t, ""; theta_LoRA): PALP with beta != 1
    personalized_cond: torch.Tensor | None = None  # G(x, t, y_P; theta_LoRA): PALP


PREDICTION_NAMES = tuple(f.name for f in fields(GuidancePredictions))


def needed_predictions(method: Method, *, beta: float) -> tuple[str, ...]:
    """The :class:`GuidancePredictions` a method's delta reads, pretrained ones first, in the
    order the trainer's UNet call computes them. With beta = 1, G^beta(x, y_P) is the
    conditional prediction alone, so PALP needs no personalized unconditional one."""
    names = ["pretrained_uncond", "pretrained_clean"] + (["pretrained_negative"] if method.negative else [])
    if method.personalized:
        names += ([] if beta == 1.0 else ["personalized_uncond"]) + ["personalized_cond"]
    return tuple(names)


def add_noise(*, x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """z_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps (the DDPM forward process)."""
    a = _b(alpha_bar)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def predict_x0(*, z_t: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """Eq. 2: x0_hat = (z_t - sqrt(1 - a_t) eps) / sqrt(a_t)."""
    a = _b(alpha_bar)
    return (z_t - (1 - a).sqrt() * eps) / a.sqrt()


# The two model outputs palp trains on (a scheduler config's ``prediction_type``).
PREDICTION_TYPES = ("epsilon", "v_prediction")


def v_target(*, x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """A v-model's regression target: v = sqrt(a_t) eps - sqrt(1 - a_t) x0 (docs/method.md, v-prediction)."""
    a = _b(alpha_bar)
    return a.sqrt() * noise - (1 - a).sqrt() * x0


def predict_x0_from_v(*, z_t: torch.Tensor, v: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """Eq. 2 for a v-model: x0_hat = sqrt(a_t) z_t - sqrt(1 - a_t) v."""
    a = _b(alpha_bar)
    return a.sqrt() * z_t - (1 - a).sqrt() * v


def eps_from_v(*, z_t: torch.Tensor, v: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """The noise prediction a v-prediction makes: eps = sqrt(1 - a_t) z_t + sqrt(a_t) v."""
    a = _b(alpha_bar)
    return (1 - a).sqrt() * z_t + a.sqrt() * v


def cfg(*, eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """G^s(x, y) = G(x, 0) + s (G(x, y) - G(x, 0))."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


def palp_delta(
    *, pre_uncond: torch.Tensor, pre_clean: torch.Tensor, pers_uncond: torch.Tensor, pers_cond: torch.Tensor, alpha: float, beta: float
) -> torch.Tensor:
    """Eq. 6: delta = G^alpha(x, y_c; theta) - G^beta(x, y_P; theta_LoRA)."""
    return (cfg(eps_uncond=pre_uncond, eps_cond=pre_clean, scale=alpha)
            - cfg(eps_uncond=pers_uncond, eps_cond=pers_cond, scale=beta))


def sds_delta(*, pre_uncond: torch.Tensor, pre_clean: torch.Tensor, noise: torch.Tensor, alpha: float) -> torch.Tensor:
    """SDS (Poole et al.): delta = G^alpha(x, y_c; theta) - eps'."""
    return cfg(eps_uncond=pre_uncond, eps_cond=pre_clean, scale=alpha) - noise


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


def alignment_coefficient(*, alpha_bar_t: torch.Tensor, lam: float, rescale: bool) -> torch.Tensor:
    """The factor c with  lambda grad L_align = c * delta * d eps_theta / d theta  (Eq. 7).

    d x0_hat / d theta = -(sqrt(1 - a_t) / sqrt(a_t)) d eps_theta / d theta, so the plain
    term is c = -lambda sqrt(1 - a_t)/sqrt(a_t); the rescaled term (docs/method.md, step 5)
    drops the ratio: c = -lambda.  (B,)
    """
    if rescale:
        return lam * torch.full_like(alpha_bar_t, -1.0)
    return lam * (-(1 - alpha_bar_t).sqrt() / alpha_bar_t.sqrt())


def v_alignment_coefficient(*, alpha_bar_t: torch.Tensor, lam: float, rescale: bool) -> torch.Tensor:
    """:func:`alignment_coefficient` for a v-model: c with  lambda grad L_align = c * delta * d v_theta / d theta.

    x0_hat = sqrt(a_t) z_t - sqrt(1 - a_t) v_theta, so d x0_hat / d theta = -sqrt(1 - a_t) d v_theta / d theta:
    the plain term is c = -lambda sqrt(1 - a_t); the rescaled term drops that factor: c = -lambda.
    ``delta`` stays in eps space (the guidance predictions are converted with :func:`eps_from_v`).  (B,)
    """
    if rescale:
        return lam * torch.full_like(alpha_bar_t, -1.0)
    return lam * (-(1 - alpha_bar_t).sqrt())


def alignment_surrogate(*, eps_pred: torch.Tensor, delta: torch.Tensor, coefficient: torch.Tensor) -> torch.Tensor:
    """A scalar whose gradient is mean over elements of  c * delta * d eps_theta / d theta.

    ``delta`` and ``coefficient`` are constants (stop-gradient), so the alignment term flows
    through the same graph as the reconstruction loss: one backward serves both (Eq. 7).
    Averaged over elements like ``mse_loss``, so lambda weighs the two terms on one scale.
    """
    target = (_b(coefficient) * delta).detach()
    return (target * eps_pred).sum() / eps_pred.numel()


def alignment_delta(method: Method, *, predictions: GuidancePredictions, noise: torch.Tensor, t: torch.Tensor,
                    alpha: float, beta: float) -> torch.Tensor:
    """The method's delta from the guidance ``predictions`` it needs (:func:`needed_predictions`).
    PALP without a personalized unconditional prediction (beta = 1) uses the conditional one in
    its place: G^1(x, y_P) = G(x, y_P) either way."""
    p = predictions
    if method.personalized:
        pers_uncond = p.personalized_cond if p.personalized_uncond is None else p.personalized_uncond
        return palp_delta(pre_uncond=p.pretrained_uncond, pre_clean=p.pretrained_clean, pers_uncond=pers_uncond,
                          pers_cond=p.personalized_cond, alpha=alpha, beta=beta)
    if method.negative:
        return nfsd_delta(pre_uncond=p.pretrained_uncond, pre_clean=p.pretrained_clean, pre_negative=p.pretrained_negative,
                          t=t, alpha=alpha)
    return sds_delta(pre_uncond=p.pretrained_uncond, pre_clean=p.pretrained_clean, noise=noise, alpha=alpha)


def step_loss(*, eps_pred: torch.Tensor, noise: torch.Tensor, delta: torch.Tensor | None = None,
              coefficient: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, reconstruction) of one step: Eq. 1's ||eps_theta - eps||^2, plus, with a
    ``delta`` and its ``coefficient`` (lambda included), the alignment surrogate whose
    gradient is Eq. 7's. Without ``delta`` (TI+DB) the loss is Eq. 1 alone. ``mask`` (B, 1, h, w)
    (--scale-augmentation): Eq. 1 over each row's masked positions only (``augment.masked_mse``);
    the alignment surrogate keeps every position."""
    rec = F.mse_loss(eps_pred.float(), noise.float()) if mask is None else augment.masked_mse(eps_pred, noise, mask)
    if delta is None:
        return rec, rec
    return rec + alignment_surrogate(eps_pred=eps_pred.float(), delta=delta, coefficient=coefficient), rec

