"""Per-layer token conditioning: P+ (``--personalize p-plus``) and NeTI (``--personalize neti``).

Both keep the UNet and the text encoder frozen and learn what the placeholder token means, not
once for the whole UNet but once per cross-attention layer (P+, Voynov et al. 2023), and per
denoising timestep too (NeTI, Alaluf et al. 2023; its mapper is ``palp.models.neti``). Each
cross-attention layer then attends to the text encoder's output computed with its own
placeholder embedding.

How the per-layer states reach the layers: the UNet is called with ``encoder_hidden_states`` of
shape (B, 77, n D) -- the n layers' states side by side on the feature axis, layer i at
features [i D, (i + 1) D) -- and every cross-attention layer's processor (``LayerProcessor``)
reads its own slice. NeTI's output bypass (added to the text encoder's output at the token,
values only) makes it (B, 77, 2 n D): the keys' states, then the values'. A prompt without a
placeholder means the same at every layer: its states are repeated n (or 2 n) times. Nothing
else in the UNet reads ``encoder_hidden_states``, and the per-layer data travel through the
UNet call itself (no state on the side), so ``torch.compile`` and the fused guidance branches
(``torch.cat`` of rows) work unchanged.

``palp.models.layered_pipeline.install_layered_tokens`` puts the same processors into a stock
diffusers pipeline from a run's exported file.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from palp.core.methods import LAYERED
from palp.models.neti import NetiTokens, keep_fp32_apply
from palp.models.personalize import PersonalizedModel, PlaceholderEmbedding, add_placeholder_tokens

# The order in which a UNet's forward pass meets its cross-attention layers (NeTI's layer index).
_FORWARD_ORDER = ("down_blocks.", "mid_block.", "up_blocks.")


def cross_attention_order(unet) -> list[str]:
    """The attention-processor names of the UNet's cross-attention layers (``attn2``) in the
    order its forward pass calls them: down blocks, middle block, up blocks."""
    from palp.models.custom_diffusion import cross_attention_layers

    names = list(cross_attention_layers(unet))
    ordered = [n for prefix in _FORWARD_ORDER for n in names if n.startswith(prefix)]
    if not names or len(ordered) != len(names):
        raise ValueError(f"the UNet's cross-attention layers {names[:3]}... are not in down/mid/up blocks")
    return ordered


class LayerProcessor:
    """The attention processor of cross-attention layer ``index`` of ``n``: it takes its slice of
    packed per-layer states (module docstring) and hands it to the layer's own processor
    (``inner``); states of the plain width D are used as they are."""

    def __init__(self, index: int, n: int, inner):
        self.index, self.n, self.inner = index, n, inner

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        keys, values = split_layer_states(encoder_hidden_states, self.index, self.n, attn.to_k.in_features)
        if values is keys:
            return self.inner(attn, hidden_states, keys, attention_mask, temb, **kwargs)
        return kv_attention(attn, hidden_states, keys, values, attention_mask)


def split_layer_states(states: torch.Tensor, index: int, n: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys' states, values' states) of layer ``index`` from packed states (B, L, W): W = D is
    plain, n D is one state per layer, 2 n D keys' then values' (the same object when they agree)."""
    total = states.shape[-1]
    if total == width:
        return states, states
    if total == n * width:
        part = states[..., index * width : (index + 1) * width]
        return part, part
    if total == 2 * n * width:
        return states[..., index * width : (index + 1) * width], states[..., (n + index) * width : (n + index + 1) * width]
    raise ValueError(f"cross-attention states of width {total} fit none of {width}, {n} x {width}, 2 x {n} x {width}")


def kv_attention(attn, hidden_states, keys, values, attention_mask=None):
    """diffusers' scaled-dot-product cross-attention (``AttnProcessor2_0``) with the keys and the
    values projected from different states (NeTI's bypass reaches the values only)."""
    residual, ndim = hidden_states, hidden_states.ndim
    if ndim == 4:
        b, c, h, w = hidden_states.shape
        hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
    if attn.spatial_norm is not None or attn.group_norm is not None or attn.norm_cross:
        raise ValueError("per-layer states with a bypass need a cross-attention layer without extra norms (SD's)")
    batch = keys.shape[0]
    if attention_mask is not None:
        attention_mask = attn.prepare_attention_mask(attention_mask, keys.shape[1], batch)
        attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
    query, key, value = attn.to_q(hidden_states), attn.to_k(keys), attn.to_v(values)
    head = key.shape[-1] // attn.heads
    query, key, value = (x.view(batch, -1, attn.heads, head).transpose(1, 2) for x in (query, key, value))
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)
    out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head).to(query.dtype)
    out = attn.to_out[1](attn.to_out[0](out))
    if ndim == 4:
        out = out.transpose(-1, -2).reshape(b, c, h, w)
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor


def set_layer_processors(unet, layers: list[str]) -> None:
    """Wrap the processor of every cross-attention layer in ``layers`` (forward order) in a
    ``LayerProcessor``; the other attention layers keep theirs."""
    current = unet.attn_processors
    procs = {name: (LayerProcessor(layers.index(name), len(layers), proc) if name in layers else proc)
             for name, proc in current.items()}
    unet.set_attn_processor(procs)


class RowEmbedding(PlaceholderEmbedding):
    """CLIP's token embedding whose placeholder rows can be given per batch row: inside
    ``with emb.rows(v)`` (v: (N, K, D)), placeholder k of row i reads v[i, k]; outside, the
    (frozen) class-word rows of ``PlaceholderEmbedding``."""

    def __init__(self, base: nn.Embedding, first_id: int, init: torch.Tensor):
        super().__init__(base, first_id, init)
        self.learned.requires_grad_(False)
        self._rows: torch.Tensor | None = None

    @contextlib.contextmanager
    def rows(self, vectors: torch.Tensor):
        self._rows = vectors
        try:
            yield
        finally:
            self._rows = None

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = super().forward(input_ids)
        if self._rows is None:
            return out
        k = (input_ids - self.first_id).clamp(min=0, max=self._rows.shape[1] - 1)  # (N, L)
        new = torch.gather(self._rows, 1, k.unsqueeze(-1).expand(-1, -1, self._rows.shape[-1]))  # (N, L, D)
        return torch.where((input_ids >= self.first_id).unsqueeze(-1), new.to(out.dtype), out)


def layered_states(text_encoder, input_ids: torch.Tensor, vectors: torch.Tensor, bypass: torch.Tensor | None = None,
                   bypass_scale: float = 0.0) -> torch.Tensor:
    """Packed per-layer states (B, L, n D), or (B, L, 2 n D) with a bypass: layer l's states are
    the text encoder's output on ``input_ids`` with the placeholders read from ``vectors[:, l]``
    ((B, n, K, D)). One text-encoder call per layer, each of the B rows (a layer's states are
    then bit-identical to a one-token run's). ``bypass`` (B, n, K, D): NeTI's, added at the
    placeholders before the final layer norm, rescaled to the state's norm times ``bypass_scale``,
    for the values only."""
    emb = text_encoder.get_input_embeddings()
    keys, values = [], []
    for layer in range(vectors.shape[1]):
        with emb.rows(vectors[:, layer]):
            if bypass is None:
                keys.append(text_encoder(input_ids)[0])
                continue
            out = text_encoder(input_ids, output_hidden_states=True)
        keys.append(out[0])
        values.append(_with_bypass(text_encoder, input_ids, out.hidden_states[-1], bypass[:, layer], bypass_scale, emb.first_id))
    return torch.cat(keys + values, dim=-1)


def _with_bypass(text_encoder, input_ids, hidden, bypass, scale: float, first_id: int) -> torch.Tensor:
    """The final layer norm of the last hidden state with NeTI's bypass added at each placeholder:
    h + scale |h| b / |b| (NeTI's output bypass, its scale 0.2)."""
    k = (input_ids - first_id).clamp(min=0, max=bypass.shape[1] - 1)
    b = torch.gather(bypass, 1, k.unsqueeze(-1).expand(-1, -1, bypass.shape[-1])).to(hidden.dtype)  # (B, L, D)
    added = scale * F.normalize(b, dim=-1) * hidden.norm(dim=-1, keepdim=True)
    hidden = torch.where((input_ids >= first_id).unsqueeze(-1), hidden + added, hidden)
    return getattr(text_encoder, "text_model", text_encoder).final_layer_norm(hidden)


class PPlusTokens(nn.Module):
    """P+'s token: one embedding per cross-attention layer and placeholder, (n, K, D), each layer's
    initialised from the token's initial word (the class word; --token-init). Kept in fp32 on any
    dtype the model is moved to."""

    timed = False  # the same at every denoising timestep
    bypass = False

    def __init__(self, init: torch.Tensor, n_layers: int):
        super().__init__()
        self.tokens = nn.Parameter(init.detach().float().unsqueeze(0).repeat(n_layers, 1, 1).clone())

    def forward(self, batch: int, t: torch.Tensor | None = None, truncation=None):
        return self.tokens.unsqueeze(0).expand(batch, -1, -1, -1), None

    def _apply(self, fn, recurse=True):
        return keep_fp32_apply(super()._apply, fn, recurse)


class _NoGate:
    """The per-row switch of a model without adapters: every row is the same frozen UNet."""

    @contextlib.contextmanager
    def __call__(self, flags):
        yield


class LayeredModel(PersonalizedModel):
    """The frozen UNet and text encoder, with per-layer (P+) or per-layer-and-timestep (NeTI)
    conditioning of the placeholders. ``encode`` returns packed per-layer states."""

    def __init__(self, unet, text_encoder, conditioning: nn.Module, personalize: str, layers: list[str]):
        nn.Module.__init__(self)
        self.unet, self.text_encoder, self.conditioning = unet, text_encoder, conditioning
        self.personalize, self.layers = personalize, list(layers)
        self.text_encoder_2 = self.xl = None  # SD 1.x/2.x only: build_layered_model refuses an SDXL base
        self._lora_gate = _NoGate()

    @property
    def width_factor(self) -> int:
        return len(self.layers) * (2 if self.conditioning.bypass else 1)

    def encode(self, input_ids: torch.Tensor, t: torch.Tensor | None = None, truncation: torch.Tensor | None = None):
        emb = self.text_encoder.get_input_embeddings()
        if not bool((input_ids >= emb.first_id).any()):  # no placeholder: the same states at every layer
            return self.text_encoder(input_ids)[0].repeat(1, 1, self.width_factor)
        if self.conditioning.timed and t is None:
            raise ValueError("NeTI's conditioning of a prompt with a placeholder needs the timestep")
        vectors, bypass = self.conditioning(len(input_ids), t, truncation)
        return layered_states(self.text_encoder, input_ids, vectors, bypass, getattr(self.conditioning, "bypass_scale", 0.0))

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, input_ids: torch.Tensor, truncation: torch.Tensor | None = None):
        states = self.encode(input_ids, t, truncation)
        return self.unet(z_t, t, encoder_hidden_states=states).sample, states

    def states_at(self, input_ids: torch.Tensor, t: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """The states of ``input_ids`` at timesteps ``t``: NeTI's change with the timestep, P+'s do not."""
        return self.encode(input_ids, t) if self.conditioning.timed else states

    def predict_gated(self, z_t, t, states, lora):
        return self.predict(z_t, t, states)  # no adapters: the rows differ by their states alone

    @contextlib.contextmanager
    def adapters_disabled(self):
        yield  # the frozen UNet is the pretrained one; the pretrained branch's prompts hold no placeholder


def build_layered_model(base, init_words: dict[str, str], personalize: str, neti: dict | None = None):
    """Freeze the base, add the placeholder tokens (read through a ``RowEmbedding``), the per-layer
    processors and P+'s tokens or NeTI's mappers. Returns (model, None, token ids)."""
    if personalize not in LAYERED:
        raise ValueError(f"not a per-layer personalization: {personalize!r}")
    if base.xl_conditioning() is not None:
        raise ValueError(f"--personalize {personalize} trains Stable Diffusion 1.x/2.x models, not SDXL")
    for module in (base.unet, base.vae, base.text_encoder):
        module.requires_grad_(False)
    token_ids = add_placeholder_tokens(base.tokenizer, base.text_encoder, init_words)
    placeholder = base.text_encoder.get_input_embeddings()
    init = placeholder.learned.detach().clone()  # (K, D) the initial words' embeddings
    base.text_encoder.set_input_embeddings(RowEmbedding(placeholder.base, placeholder.first_id, init))
    layers = cross_attention_order(base.unet)
    set_layer_processors(base.unet, layers)
    if personalize == "p-plus":
        conditioning = PPlusTokens(init, len(layers))
    else:
        conditioning = NetiTokens(init, len(layers), **(neti or {}))
    return LayeredModel(base.unet, base.text_encoder, conditioning, personalize, layers), None, token_ids


def layered_file_contents(model: LayeredModel, tokens: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of ``LAYERED_FILE``: P+'s per-layer embeddings ``<v>`` (n, D) or each NeTI
    mapper's weights under ``<v>.``; the metadata (strings, as safetensors keeps them) name the
    personalization, the tokens, the layers in forward order and the mapper's shape."""
    import json

    cond = model.conditioning
    meta = {"personalize": model.personalize, "tokens": json.dumps(tokens), "layers": json.dumps(model.layers)}
    if model.personalize == "p-plus":
        tensors = {tok: cond.tokens[:, k].detach().float().cpu().contiguous() for k, tok in enumerate(tokens)}
        return tensors, meta
    tensors = {f"{tok}.{name}": v.detach().float().cpu().contiguous()
               for tok, m in zip(tokens, cond.mappers) for name, v in m.state_dict().items()}
    first = cond.mappers[0]
    meta.update(hidden=str(first.hidden), features=str(first.frequencies.shape[0]), bypass=str(int(cond.bypass)))
    return tensors, meta


def conditioning_from_file(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> tuple[nn.Module, list[str], list[str]]:
    """(P+'s tokens or NeTI's mappers, tokens, layer names) from ``LAYERED_FILE``'s contents;
    ValueError naming what does not fit."""
    import json

    try:
        personalize, tokens, layers = meta["personalize"], json.loads(meta["tokens"]), json.loads(meta["layers"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"its metadata lack {e} (not a palp P+/NeTI file)") from None
    if personalize == "p-plus":
        if set(tensors) != set(tokens) or any(tensors[t].dim() != 2 or len(tensors[t]) != len(layers) for t in tokens):
            raise ValueError(f"P+ embeddings must be one ({len(layers)}, D) tensor per token of {tokens}")
        cond = PPlusTokens(torch.zeros(len(tokens), tensors[tokens[0]].shape[1]), len(layers))
        with torch.no_grad():
            cond.tokens.copy_(torch.stack([tensors[t] for t in tokens], dim=1))
        return cond, tokens, layers
    if personalize != "neti":
        raise ValueError(f"it holds {personalize!r}, not p-plus or neti")
    return _neti_from_file(tensors, meta, tokens, layers), tokens, layers


def _neti_from_file(tensors, meta, tokens: list[str], layers: list[str]) -> nn.Module:
    try:
        bypass = meta["bypass"] == "1"
        width = tensors[f"{tokens[0]}.output.weight"].shape[0] // (2 if bypass else 1)
        cond = NetiTokens(torch.ones(len(tokens), width), len(layers), hidden=int(meta["hidden"]),
                          features=int(meta["features"]), bypass=bypass)
    except (KeyError, ValueError, RuntimeError) as e:
        raise ValueError(f"NeTI metadata or weights that do not fit: {str(e).splitlines()[0][:200]}") from None
    for tok, mapper in zip(tokens, cond.mappers):
        own = {k[len(tok) + 1 :]: v for k, v in tensors.items() if k.startswith(tok + ".")}
        want = mapper.state_dict()
        wrong = sorted(set(want) ^ set(own)) + sorted(k for k in set(want) & set(own) if own[k].shape != want[k].shape)
        if wrong:
            raise ValueError(f"NeTI mapper of {tok} lacks, has extra or misshapen weight {tok}.{wrong[0]} "
                             f"({len(wrong)} in all)")
        mapper.load_state_dict(own)
    return cond
