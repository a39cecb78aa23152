"""P+ and NeTI runs in a stock diffusers ``StableDiffusionPipeline``: ``install_layered_tokens``.

A stock pipeline encodes the prompt once, with one embedding per token, and calls the UNet
with those states at every step; P+ needs the text encoder's output per cross-attention layer,
NeTI per layer and per timestep. ``install_layered_tokens(pipe, run)`` adds, without changing
the pipeline's code:

- the run's tokens to the tokenizer and the text encoder (diffusers' ``load_textual_inversion``,
  each with a stand-in embedding: the mean of its layers' at the middle of the schedule);
- a hook on the text encoder that remembers the output of every prompt holding a token, with
  that prompt's token ids;
- a hook on the UNet that recognises those prompts' rows among its ``encoder_hidden_states``
  (by their exact values, whatever the pipeline did with them: classifier-free guidance's
  concatenation, repeats per image, the dtype conversion) and replaces every row by packed
  per-layer states (palp.models.layered) computed from its token ids at the call's timestep;
  rows of other prompts are used as they are at every layer;
- palp's ``LayerProcessor`` on every cross-attention layer, which reads its own layer's states.

Only the prompt's ``last_hidden_state`` is recognised: a pipeline called with ``clip_skip`` or
with ``prompt_embeds`` it did not compute itself sees the stand-in embedding instead.
"""

from __future__ import annotations

from pathlib import Path

import torch

from palp.models.layered import (RowEmbedding, conditioning_from_file, cross_attention_order, layered_states,
                                 set_layer_processors)
from palp.models.run_weights import LAYERED_FILE

_ATTR = "_palp_layered_tokens"
REMEMBERED = 64  # prompts the text-encoder hook keeps (the latest)


class _Installation:
    """What ``install_layered_tokens`` added to one pipeline, and its two hooks."""

    def __init__(self, pipe, conditioning, tokens: list[str], first_id: int, n_layers: int, processors: dict,
                 truncation: int | None = None):
        self.pipe, self.conditioning, self.tokens, self.first_id = pipe, conditioning, tokens, first_id
        self.n_layers, self.truncation = n_layers, truncation
        self.processors = processors  # the attention processors before installing (restored on removal)
        self.known: list[tuple[torch.Tensor, torch.Tensor]] = []  # (a prompt's states (L, D), its ids (L,))
        self.busy = False
        self.handles = [
            pipe.text_encoder.register_forward_hook(torch.compiler.disable(self.remember), with_kwargs=True),
            pipe.unet.register_forward_pre_hook(torch.compiler.disable(self.condition), with_kwargs=True),
        ]

    def remember(self, module, args, kwargs, output):
        if self.busy:
            return
        ids = args[0] if args else kwargs.get("input_ids")
        states = output[0]
        for i in torch.nonzero((ids >= self.first_id).any(-1)).flatten().tolist():
            self.known.append((states[i].detach(), ids[i].detach()))
        del self.known[:-REMEMBERED]

    def condition(self, module, args, kwargs):
        args, kwargs = list(args), dict(kwargs)
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        if len(args) > 2:
            args[2] = self.packed(args[2], t)
        else:
            kwargs["encoder_hidden_states"] = self.packed(kwargs["encoder_hidden_states"], t)
        return tuple(args), kwargs

    def packed(self, states: torch.Tensor, t) -> torch.Tensor:
        """(B, L, D) states -> (B, L, n D) (or 2 n D): known prompts' rows per layer, others repeated."""
        out = states.repeat(1, 1, self.n_layers * (2 if self.conditioning.bypass else 1))
        if not self.known or states.dim() != 3:
            return out
        ref = torch.stack([s for s, _ in self.known]).to(states.device, states.dtype)  # (R, L, D)
        if ref.shape[1:] != states.shape[1:]:
            return out
        match = (states[:, None] == ref[None]).flatten(2).all(-1)  # (B, R)
        rows = torch.nonzero(match.any(-1)).flatten()
        if rows.numel() == 0:
            return out
        ids = torch.stack([self.known[j][1] for j in match[rows].int().argmax(-1).tolist()]).to(states.device)
        t_rows = torch.as_tensor(t, device=states.device).reshape(-1).expand(len(states))[rows]
        out[rows] = self.layered(ids, t_rows).to(out.dtype)
        return out

    @torch.no_grad()
    def layered(self, ids: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        te = self.pipe.text_encoder
        cond = self.conditioning.to(ids.device)
        cut = None if self.truncation is None else torch.full((len(ids),), self.truncation, device=ids.device)
        vectors, bypass = cond(len(ids), t, cut)
        stock = te.get_input_embeddings()
        te.set_input_embeddings(RowEmbedding(stock, self.first_id, vectors[0, 0].float()))
        self.busy = True
        try:
            return layered_states(te, ids, vectors, bypass, getattr(cond, "bypass_scale", 0.0))
        finally:
            self.busy = False
            te.set_input_embeddings(stock)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.pipe.unet.set_attn_processor(dict(self.processors))
        present = [t for t in self.tokens if t in self.pipe.tokenizer.get_vocab()]
        if present:
            self.pipe.unload_textual_inversion(present)


def install_layered_tokens(pipe, run, *, truncation: int | None = None) -> None:
    """Make a stock ``StableDiffusionPipeline`` sample a P+ or NeTI run: ``run`` is the run's folder
    (or a snapshot's) or its ``layered_tokens.safetensors``. Afterwards ``pipe("A sketch of <v> ...")``
    uses the run's per-layer (and, for NeTI, per-timestep) token. Installing again replaces the
    previous run's; ``remove_layered_tokens`` undoes it. ValueError if the file does not fit this
    pipeline's UNet (another base model) or is not a P+/NeTI file; safetensors only.

    ``truncation`` (NeTI only): the mapper keeps only its first ``truncation`` hidden units at every
    step, as NeTI's inference-time truncation of its nested-dropout ordering does (fewer units: a
    coarser, more editable token); None keeps them all."""
    from safetensors import safe_open

    path = Path(run) / LAYERED_FILE if Path(run).is_dir() else Path(run)
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (a safe_open handle is not a dict)
    conditioning, tokens, layers = conditioning_from_file(tensors, meta)
    if truncation is not None:
        hidden = getattr(conditioning, "hidden", None)
        if hidden is None:
            raise ValueError("truncation applies to NeTI runs only; this is a P+ file")
        if not 1 <= truncation <= hidden:
            raise ValueError(f"truncation must be between 1 and the mapper's {hidden} hidden units, not {truncation}")
    remove_layered_tokens(pipe)
    if layers != cross_attention_order(pipe.unet):
        raise ValueError(f"{path} was trained on a UNet with cross-attention layers {layers[:2]}...; this pipeline's differ")
    conditioning.to(pipe.text_encoder.device)
    with torch.no_grad():  # the stand-in embedding: the layers' mean at the schedule's middle
        cut = None if truncation is None else torch.tensor([truncation], device=pipe.text_encoder.device)
        vectors, _ = conditioning(1, torch.tensor([500], device=pipe.text_encoder.device), cut)
    pipe.load_textual_inversion(list(vectors[0].mean(0).to(pipe.text_encoder.dtype)), token=tokens)
    ids = pipe.tokenizer.convert_tokens_to_ids(tokens)
    if ids != list(range(ids[0], ids[0] + len(ids))):
        raise ValueError(f"the tokens {tokens} got ids {ids}; load them into a pipeline without other added tokens")
    processors = dict(pipe.unet.attn_processors)
    set_layer_processors(pipe.unet, layers)
    setattr(pipe, _ATTR, _Installation(pipe, conditioning, tokens, ids[0], len(layers), processors, truncation))


def remove_layered_tokens(pipe) -> None:
    """Undo ``install_layered_tokens`` (nothing if none is installed): the hooks, processors and tokens."""
    installed = getattr(pipe, _ATTR, None)
    if installed is not None:
        installed.remove()
        setattr(pipe, _ATTR, None)
