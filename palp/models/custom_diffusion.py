"""Custom Diffusion (Kumari et al. 2023) as palp trains it: the key and value projections of every
cross-attention layer (``attn2.to_k``, ``attn2.to_v``) are trained as full weights, with the
rest of the UNet frozen (the learned token is ``personalize.PlaceholderEmbedding``'s).

Each trained projection is written as its frozen pretrained weight W0 plus a delta that starts
at zero, ``W = W0 + D``: the base weights are never touched, the trained model starts equal to
the base, and the delta can be switched off, for the whole UNet (``DeltaSwitch.disabled``: the
"pretrained" branch of the guidance predictions) or per row inside one UNet call
(``DeltaSwitch.__call__(flags)``: a row with flag 0 adds ``0 * D x``, exactly the base
projection's output, as ``lora_gate.LoraGate`` does for LoRA).

As in Custom Diffusion, the gradient that reaches the trained keys and values through the
first text position (the start token, the same for every prompt) is dropped; the forward
values are those of ``x (W0 + D)^T``.

A run hands Custom Diffusion's diffusers file over, ``pytorch_custom_diffusion_weights.safetensors``:
per trained layer ``<its attention processor's name>.to_k_custom_diffusion.weight`` and
``.to_v_custom_diffusion.weight``, the merged W0 + D, and, as diffusers' own saver marks them, an
empty tensor under the name of every other attention processor (the self-attention layers, which
keep their stock projections): diffusers' loader gives each key a processor, and sets them all
only when there is one for every attention layer. ``set_custom_diffusion_processors`` puts them
into a stock UNet with diffusers' own ``CustomDiffusionAttnProcessor``.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from palp.models.lora_gate import RowGate

CUSTOM_DIFFUSION_FILE = "pytorch_custom_diffusion_weights.safetensors"
PROJECTIONS = ("to_k", "to_v")


class DeltaSwitch(RowGate):
    """The on/off switch shared by a UNet's ``CustomDiffusionLinear`` layers; ``with switch(flags)``
    gates the deltas per row (N,), as ``LoraGate`` gates LoRA."""

    what = "Custom Diffusion gate"

    def __init__(self):
        super().__init__()
        self.enabled = True

    @contextlib.contextmanager
    def disabled(self):
        self.enabled = False
        try:
            yield
        finally:
            self.enabled = True


class CustomDiffusionLinear(nn.Module):
    """``x W0^T + b + x D^T`` with W0 (``base``) frozen and D (``delta``, fp32) trained."""

    def __init__(self, base: nn.Linear, switch: DeltaSwitch):
        super().__init__()
        self.base = base
        self.delta = nn.Parameter(torch.zeros(base.weight.shape, dtype=torch.float32, device=base.weight.device))
        self._switch = switch

    @property
    def weight(self) -> torch.Tensor:  # diffusers reads .weight of a projection (dtype, fused projections)
        return self.base.weight

    @property
    def bias(self):
        return self.base.bias

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        switch = self._switch
        if not switch.enabled:
            return out
        d = F.linear(x, self.delta.to(x.dtype))  # (N, L, out)
        if d.dim() == 3 and d.shape[1] > 1:  # the start token's position passes no gradient to D (Custom Diffusion's)
            d = torch.cat([d[:, :1].detach(), d[:, 1:]], dim=1)
        if switch.flags is not None:
            if d.shape[0] != switch.flags.shape[0]:
                raise RuntimeError(f"Custom Diffusion gate of {switch.flags.shape[0]} rows met an input of {d.shape[0]} rows")
            d = d * switch.flags.view(-1, *(1,) * (d.dim() - 1)).to(d.dtype)
        return out + d.to(out.dtype)

    def merged_weight(self) -> torch.Tensor:
        """W0 + D in fp32."""
        return self.base.weight.detach().float() + self.delta.detach().float()


def cross_attention_layers(unet) -> dict[str, nn.Module]:
    """{attention processor name: the attention module} of every cross-attention layer (``attn2``)."""
    from diffusers.models.attention_processor import Attention

    return {f"{name}.processor": m for name, m in unet.named_modules()
            if isinstance(m, Attention) and name.split(".")[-1] == "attn2" and m.is_cross_attention}


def add_custom_diffusion(unet) -> DeltaSwitch:
    """Wrap to_k and to_v of every cross-attention layer; returns the layers' shared switch."""
    layers = cross_attention_layers(unet)
    if not layers:
        raise ValueError("the UNet has no cross-attention (attn2) layers for Custom Diffusion")
    switch = DeltaSwitch()
    for attn in layers.values():
        for proj in PROJECTIONS:
            setattr(attn, proj, CustomDiffusionLinear(getattr(attn, proj), switch))
    return switch


def custom_diffusion_state_dict(unet) -> dict[str, torch.Tensor]:
    """The diffusers Custom Diffusion state dict: merged W0 + D of each trained projection, fp32, on
    the host, and an empty tensor for each other attention processor."""
    layers = cross_attention_layers(unet)
    out = {name: torch.zeros(0) for name in unet.attn_processors if name not in layers}
    for name, attn in layers.items():
        for proj in PROJECTIONS:
            layer = getattr(attn, proj)
            if not isinstance(layer, CustomDiffusionLinear):
                raise ValueError(f"{name}: {proj} is not a Custom Diffusion layer")
            out[f"{name}.{proj}_custom_diffusion.weight"] = layer.merged_weight().cpu().contiguous()
    return out


def custom_diffusion_processors(unet, state_dict: dict[str, torch.Tensor]) -> dict:
    """diffusers' ``CustomDiffusionAttnProcessor`` for every attention layer of a stock UNet,
    holding the file's weights where it has them (the others compute the stock projections);
    ValueError unless every key of the file names a cross-attention layer of this UNet with its shape."""
    from diffusers.models.attention_processor import CustomDiffusionAttnProcessor

    layers = cross_attention_layers(unet)
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        if value.numel() == 0 and key in unet.attn_processors and key not in layers:
            continue  # an attention layer without trained weights (diffusers' empty entry)
        name, sep, sub = key.rpartition(".to_")
        if not sep or ("to_" + sub) not in (f"{p}_custom_diffusion.weight" for p in PROJECTIONS) or name not in layers:
            raise ValueError(f"{key!r} is not a Custom Diffusion key/value weight of a cross-attention layer of this UNet")
        grouped.setdefault(name, {})["to_" + sub] = value
    missing = [n for n in layers if set(grouped.get(n, {})) != {f"{p}_custom_diffusion.weight" for p in PROJECTIONS}]
    if missing:
        raise ValueError(f"no Custom Diffusion key and value weights for {missing[0]} ({len(missing)} layer(s) lack them)")
    processors = {}
    for name in unet.attn_processors:
        if name not in grouped:
            processors[name] = CustomDiffusionAttnProcessor(train_kv=False, train_q_out=False)
            continue
        attn = layers[name]
        k = grouped[name]["to_k_custom_diffusion.weight"]
        want = (attn.to_k.weight.shape[0], attn.to_k.weight.shape[1])
        if tuple(k.shape) != want or tuple(grouped[name]["to_v_custom_diffusion.weight"].shape) != want:
            raise ValueError(f"{name}: Custom Diffusion weights of shape {tuple(k.shape)}, the layer's are {want}")
        proc = CustomDiffusionAttnProcessor(train_kv=True, train_q_out=False, hidden_size=want[0],
                                            cross_attention_dim=want[1])
        proc.load_state_dict(grouped[name])
        processors[name] = proc
    return processors


def set_custom_diffusion_processors(unet, state_dict: dict[str, torch.Tensor]) -> None:
    """Load a Custom Diffusion state dict into a stock UNet (replacing every attention processor),
    on the UNet's device and dtype; checks that the weights are in place afterwards."""
    processors = custom_diffusion_processors(unet, state_dict)
    unet.set_attn_processor(dict(processors))  # (diffusers empties the dict it is given)
    unet.to(device=unet.device, dtype=unet.dtype)
    loaded = loaded_custom_diffusion(unet)
    if set(loaded) != {k for k, v in state_dict.items() if v.numel()}:
        raise RuntimeError(f"the UNet holds {len(loaded)} Custom Diffusion weights after loading {len(state_dict)}")


def loaded_custom_diffusion(unet) -> dict[str, torch.Tensor]:
    """The Custom Diffusion key/value weights a UNet's attention processors hold now ({} for a stock UNet)."""
    out = {}
    for name, proc in unet.attn_processors.items():
        for proj in PROJECTIONS:
            layer = getattr(proc, f"{proj}_custom_diffusion", None)
            if isinstance(layer, nn.Linear):
                out[f"{name}.{proj}_custom_diffusion.weight"] = layer.weight
    return out
