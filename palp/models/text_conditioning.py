"""What the UNet is conditioned on, per model family, behind one interface.

Stable Diffusion 1.x/2.x: one tokenizer, one text encoder, its last hidden states (B, 77, D) as
the UNet's ``encoder_hidden_states``.

SDXL (as diffusers' StableDiffusionXLPipeline encodes a prompt): two tokenizers and two text
encoders; the penultimate hidden states of each, concatenated (B, 77, D1 + D2), are the
``encoder_hidden_states``; the second encoder's projected pooled output (B, P) is
``added_cond_kwargs["text_embeds"]`` and the micro-conditioning ``time_ids`` are (original
size, crop top-left, target size) = (R, R, 0, 0, R, R) for the model's resolution R. An empty
prompt's states are zeros where the model says ``force_zeros_for_empty_prompt`` (SDXL base does).

Everything downstream (training's fixed and learned text states, the guidance branches,
validation and sampling) handles one tensor per prompt, expanded, concatenated, sliced and
detached as a whole. So an SDXL prompt's states are one tensor too: the 77 rows of hidden states
and one more row holding the pooled embedding in its first P channels (P <= D1 + D2: 1280 <=
2048 for SDXL). :class:`XLConditioning` packs and unpacks that row; nothing else needs to know.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch


class TokenizerPair:
    """SDXL's two tokenizers as one: a prompt's ids are the first tokenizer's 77 and then the
    second's 77, side by side, (B, 154). The two pad differently (SDXL's second pads with ``!``),
    so the ids are not the same twice."""

    def __init__(self, first, second):
        self.first, self.second = first, second

    @property
    def model_max_length(self) -> int:
        return self.first.model_max_length

    def __call__(self, prompts, **kwargs):
        kwargs.pop("max_length", None)
        ids = [tok(prompts, max_length=tok.model_max_length, **kwargs).input_ids for tok in (self.first, self.second)]
        return SimpleNamespace(input_ids=torch.cat(ids, dim=-1))

    def __len__(self) -> int:
        return len(self.first)

    def get_vocab(self) -> dict:
        return self.first.get_vocab()


def time_ids(resolution: int) -> torch.Tensor:
    """SDXL's micro-conditioning for a square image of side ``resolution``, uncropped: (1, 6)."""
    return torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], dtype=torch.float32)


@dataclass(frozen=True)
class XLConditioning:
    """How an SDXL model reads packed text states (see the module's docstring)."""

    resolution: int  # the model's image side: time_ids
    pooled_dim: int  # P, the second encoder's projection width
    zeros_for_empty_prompt: bool  # model_index.json's force_zeros_for_empty_prompt

    def pack(self, hidden: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """(B, 77, D) hidden states and (B, P) pooled embedding -> (B, 78, D)."""
        B, _, D = hidden.shape
        if pooled.shape[-1] > D:
            raise ValueError(f"the pooled embedding ({pooled.shape[-1]}) is wider than the hidden states ({D})")
        row = torch.zeros(B, 1, D, dtype=hidden.dtype, device=hidden.device)
        row[:, 0, : pooled.shape[-1]] = pooled.to(hidden.dtype)
        return torch.cat([hidden, row], dim=1)

    def unet_kwargs(self, states: torch.Tensor) -> dict:
        """The UNet's text arguments for packed ``states`` (B, 78, D)."""
        B = states.shape[0]
        added = {"text_embeds": states[:, -1, : self.pooled_dim],
                 "time_ids": time_ids(self.resolution).to(states.device, states.dtype).expand(B, -1)}
        return {"encoder_hidden_states": states[:, :-1], "added_cond_kwargs": added}


def encode_xl(text_encoder, text_encoder_2, ids: torch.Tensor, ids_2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden (B, 77, D1 + D2), pooled (B, P)): the penultimate hidden states of both encoders
    concatenated, and the second's projected pooled output."""
    first = text_encoder(ids, output_hidden_states=True)
    second = text_encoder_2(ids_2, output_hidden_states=True)
    hidden = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
    return hidden, second.text_embeds
