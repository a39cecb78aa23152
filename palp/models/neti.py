"""NeTI's neural mapper (Alaluf et al. 2023): the placeholder's embedding as a function of the
denoising timestep t and the UNet's cross-attention layer l.

As NeTI's code has it: (t, l) is encoded with random Fourier features (``features`` frequencies
w ~ N(0, diag(sigma_t^2, sigma_l^2)), [sin(w x), cos(w x)] normalised to unit length); a linear
layer initialised with the encodings of 10 time anchors x the layers takes it to
10 n features; two blocks of Linear + LayerNorm + LeakyReLU of ``hidden`` units follow, then a
linear output of D (the embedding) + D (the output bypass) values, the whole output rescaled to
the norm of its initial word's embedding (the class word; --token-init). Nested dropout
(training only): with probability ``nested_dropout``, each row of a step keeps only the first k
of its ``hidden`` units, k drawn uniformly (the step's draws: ``Draws.truncation``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NUM_TIMESTEPS = 1000
TIME_ANCHORS = 10
SIGMA_T, SIGMA_L = 0.03, 2.0
BYPASS_SCALE = 0.2  # NeTI's weight of the bypass vector against the text encoder's output


def keep_fp32_apply(apply, fn, recurse: bool):
    """``Module._apply`` moving a module's tensors to ``fn``'s device but never changing their dtype
    (the learned tokens and mappers stay fp32 when the frozen model is cast to fp16/bf16)."""
    device = fn(torch.zeros(())).device
    return apply(lambda t: t.to(device), recurse)


class NetiMapper(nn.Module):
    """(t, l) -> the embedding (D,) and, with ``bypass``, the bypass vector (D,) for one placeholder."""

    def __init__(self, n_layers: int, width: int, norm: float, *, hidden: int = 128, features: int = 1024,
                 bypass: bool = True):
        super().__init__()
        self.width, self.hidden, self.bypass = width, hidden, bypass
        self.register_buffer("norm", torch.tensor(float(norm)))
        w = torch.randn(features, 2) * torch.tensor([SIGMA_T, SIGMA_L])
        self.register_buffer("frequencies", w)
        anchors = torch.tensor([(t, l) for t in range(0, NUM_TIMESTEPS, NUM_TIMESTEPS // TIME_ANCHORS)
                                for l in range(n_layers)], dtype=torch.float32)
        self.encoding = nn.Linear(2 * features, len(anchors))
        with torch.no_grad():
            self.encoding.weight.copy_(self.encode(anchors))
        self.net = nn.Sequential(nn.Linear(len(anchors), hidden), nn.LayerNorm(hidden), nn.LeakyReLU(),
                                 nn.Linear(hidden, hidden), nn.LayerNorm(hidden), nn.LeakyReLU())
        self.output = nn.Linear(hidden, width * (2 if bypass else 1))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 2) (t, l) pairs -> (N, 2 features) unit-length Fourier features."""
        z = x.float() @ self.frequencies.T
        v = torch.cat([torch.sin(z), torch.cos(z)], dim=-1)
        return v / v.norm(dim=-1, keepdim=True)

    def forward(self, t: torch.Tensor, layer: torch.Tensor, truncation: torch.Tensor | None = None):
        """t, layer: (N,); truncation: (N,) units kept per row (nested dropout) or None.
        Returns (embedding (N, D), bypass (N, D) or None)."""
        h = self.net(self.encoding(self.encode(torch.stack([t.float(), layer.float()], dim=-1))))
        if truncation is not None:
            keep = torch.arange(self.hidden, device=h.device) < truncation.to(h.device).unsqueeze(-1)
            h = h * keep.to(h.dtype)
        out = F.normalize(self.output(h).float(), dim=-1) * self.norm
        return (out[:, : self.width], out[:, self.width :]) if self.bypass else (out, None)


class NetiTokens(nn.Module):
    """One NeTI mapper per placeholder; ``forward`` gives every (row, layer)'s vectors."""

    timed = True  # the embedding depends on the timestep
    bypass_scale = BYPASS_SCALE

    def __init__(self, init: torch.Tensor, n_layers: int, *, hidden: int = 128, features: int = 1024, bypass: bool = True):
        super().__init__()
        self.n_layers, self.bypass, self.hidden = n_layers, bypass, hidden
        self.mappers = nn.ModuleList(NetiMapper(n_layers, init.shape[-1], float(row.float().norm()), hidden=hidden,
                                                features=features, bypass=bypass) for row in init)

    def forward(self, batch: int, t: torch.Tensor, truncation: torch.Tensor | None = None):
        """(vectors (B, n, K, D), bypass (B, n, K, D) or None) at the rows' timesteps t (B,)."""
        n = self.n_layers
        tt = t.reshape(-1).expand(batch).repeat_interleave(n)  # (B n,) row-major: row b, layer l at b n + l
        layer = torch.arange(n, device=tt.device).repeat(batch)
        cut = None if truncation is None else truncation.reshape(-1).repeat_interleave(n)
        outs = [m(tt, layer, cut) for m in self.mappers]
        vectors = torch.stack([o[0] for o in outs], dim=1).view(batch, n, len(outs), -1)
        if not self.bypass:
            return vectors, None
        return vectors, torch.stack([o[1] for o in outs], dim=1).view(batch, n, len(outs), -1)

    def _apply(self, fn, recurse=True):
        return keep_fp32_apply(super()._apply, fn, recurse)
