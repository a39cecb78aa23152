"""theta_LoRA: LoRA on the UNet's attention projections plus one learned token per placeholder
(``--personalize lora-token``), or Custom Diffusion's cross-attention keys and values plus the
token (``--personalize custom-diffusion``, palp.models.custom_diffusion).

The base weights stay frozen and untouched: LoRA goes through peft (diffusers' ``add_adapter``),
Custom Diffusion adds a delta beside each frozen projection, and the placeholder rows live in
their own small parameter, so every pretrained embedding row is bit-identical after training by
construction.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from palp.core.prompts import VocabularyEntry, placeholder_token
from palp.core.settings import LORA_TARGET_SETS
from palp.models.lora_gate import LoraGate


class PlaceholderEmbedding(nn.Module):
    """CLIP's token embedding with trainable rows for the new placeholder tokens.

    Ids below ``first_id`` read the frozen pretrained table; ids from ``first_id`` on read
    ``learned`` (K, D), which is what ``learned_embeds.safetensors`` stores.
    """

    def __init__(self, base: nn.Embedding, first_id: int, init: torch.Tensor):
        super().__init__()
        self.base = base
        self.first_id = first_id
        self.learned = nn.Parameter(init.detach().clone().float())

    @property
    def weight(self) -> torch.Tensor:  # transformers reads .weight for shape and dtype
        return self.base.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        is_new = (input_ids >= self.first_id).unsqueeze(-1)
        old = F.embedding(input_ids.clamp(max=self.first_id - 1), self.base.weight)
        new = self.learned[(input_ids - self.first_id).clamp(min=0, max=len(self.learned) - 1)]
        return torch.where(is_new, new.to(old.dtype), old)  # (B, L, D)


def _init_ids(tokenizer, word: str) -> list[int]:
    """The token ids a placeholder's embedding starts from: a VocabularyEntry's own, or the BPE's
    reading of a word; ValueError when the tokenizer has no such entry or reads nothing."""
    if isinstance(word, VocabularyEntry):
        found = tokenizer.convert_tokens_to_ids(str(word))
        if found is None or found == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no token {str(word)!r} to start the placeholder from; "
                             f"use --token-init class or a word")
        return [found]
    word_ids = tokenizer(word, add_special_tokens=False).input_ids
    if not word_ids:
        raise ValueError(f"the tokenizer reads no token in {word!r}; start the placeholder token from another word")
    return word_ids


def add_placeholder_tokens(tokenizer, text_encoder, init_words: dict[str, str]) -> dict[str, int]:
    """Add one token per placeholder, its embedding initialised from its word in ``init_words``
    (its class word unless --token-init says otherwise).

    A word of several tokens ("teddy bear") initialises from the mean of its tokens; a
    ``VocabularyEntry`` (--token-init rare) from its own row. Returns {placeholder: token id}.
    """
    tokens = [placeholder_token(p) for p in init_words]
    clash = [t for t in tokens if t in tokenizer.get_vocab()]
    if clash:
        raise ValueError(f"tokens {clash} are already in the tokenizer; load a base model without them")
    init_ids = [_init_ids(tokenizer, word) for word in init_words.values()]  # read before the new tokens exist
    first_id = len(tokenizer)
    tokenizer.add_tokens(tokens)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    if ids != list(range(first_id, first_id + len(tokens))):
        raise RuntimeError(f"placeholder tokens got ids {ids}, expected consecutive ids from {first_id}")
    base = text_encoder.get_input_embeddings()
    init = [base.weight[word_ids].detach().float().mean(0) for word_ids in init_ids]
    emb = PlaceholderEmbedding(base, first_id, torch.stack(init))
    text_encoder.set_input_embeddings(emb)
    return dict(zip(init_words, ids))


def add_lora(unet, *, rank: int, alpha: float | None = None, targets: str = "attention"):
    """LoRA (peft) on the layers that ``targets`` names (LORA_TARGET_SETS: by default to_q, to_k,
    to_v, to_out.0 of every attention block); returns the config."""
    from peft import LoraConfig

    if targets not in LORA_TARGET_SETS:
        raise ValueError(f"LoRA targets must be one of {', '.join(LORA_TARGET_SETS)}, not {targets!r}")
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else rank,
        init_lora_weights="gaussian",  # B = 0: the adapted model starts equal to the base
        target_modules=list(LORA_TARGET_SETS[targets]),
    )
    unet.add_adapter(config)
    return config


class PersonalizedModel(nn.Module):
    """G(x, t, y; theta_LoRA) and, with adapters disabled, the pretrained G(x, t, y; theta).

    ``switch``: Custom Diffusion's DeltaSwitch (its layers already in the UNet); None: LoRA (peft).
    SDXL: ``text_encoder_2`` (its own placeholder rows) and ``xl``, how the UNet reads the packed
    text states (palp.models.text_conditioning); encode and predict hide the difference."""

    def __init__(self, unet, text_encoder, switch=None, *, text_encoder_2=None, xl=None):
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2
        self.xl = xl
        self.personalize = "lora-token" if switch is None else "custom-diffusion"
        # The gate's hooks exist from the start (doing nothing outside predict_gated): torch.compile
        # does not guard on hooks, so a hook added after a graph was traced would be ignored by it.
        self._lora_gate = LoraGate(unet) if switch is None else switch

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    @property
    def placeholder_embedding(self) -> PlaceholderEmbedding:
        return self.text_encoder.get_input_embeddings()

    @property
    def placeholder_embedding_2(self) -> PlaceholderEmbedding | None:
        """SDXL's second encoder's placeholder rows; None for SD 1.x/2.x."""
        return None if self.text_encoder_2 is None else self.text_encoder_2.get_input_embeddings()

    def encode(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The text states of tokenized prompts: (B, 77, D); SDXL: (B, 154) ids -> packed (B, 78, D1 + D2)."""
        if self.xl is None:
            return self.text_encoder(input_ids)[0]  # (B, 77, D)
        from palp.models.text_conditioning import encode_xl

        n = input_ids.shape[1] // 2  # TokenizerPair's ids: the first tokenizer's, then the second's
        return self.xl.pack(*encode_xl(self.text_encoder, self.text_encoder_2, input_ids[:, :n], input_ids[:, n:]))

    def encode_unconditional(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The empty prompt's states (``input_ids``: its tokens): zeros for an SDXL model that
        says ``force_zeros_for_empty_prompt``, as its stock pipeline does; else :meth:`encode`."""
        return self.as_unconditional(self.encode(input_ids))

    def as_unconditional(self, states: torch.Tensor) -> torch.Tensor:
        """The empty prompt's ``states`` as the model reads them (see :meth:`encode_unconditional`)."""
        return torch.zeros_like(states) if self.xl is not None and self.xl.zeros_for_empty_prompt else states

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, input_ids: torch.Tensor):
        """The personalization prediction eps_theta and the text states it was conditioned on."""
        states = self.encode(input_ids)
        return self.predict(z_t, t, states), states

    def states_at(self, input_ids: torch.Tensor, t: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """The text states of ``input_ids`` at timesteps ``t``, given ``states`` (theirs at another
        timestep): the same here; NeTI's depend on the timestep (palp.models.layered)."""
        return states

    def predict(self, z_t: torch.Tensor, t: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        if self.xl is None:
            return self.unet(z_t, t, encoder_hidden_states=states).sample
        return self.unet(z_t, t, **self.xl.unet_kwargs(states)).sample

    def predict_gated(self, z_t: torch.Tensor, t: torch.Tensor, states: torch.Tensor, lora: torch.Tensor) -> torch.Tensor:
        """One UNet call in which row i is G(.; theta_LoRA) where lora[i] = 1 and the pretrained
        G(.; theta) where lora[i] = 0 (lora_gate.LoraGate); lora is (N,) like t."""
        with self._lora_gate(lora):
            return self.predict(z_t, t, states)

    @contextlib.contextmanager
    def adapters_disabled(self):
        """The pretrained model: LoRA's adapters or Custom Diffusion's deltas off."""
        if self.personalize == "custom-diffusion":
            with self._lora_gate.disabled():
                yield
            return
        self.unet.disable_adapters()
        try:
            yield
        finally:
            self.unet.enable_adapters()


def build_personalized_model(base, init_words: dict[str, str], *, rank: int | None = None, alpha: float | None = None,
                             targets: str = "attention", personalize: str = "lora-token"):
    """Freeze the base, add LoRA (or Custom Diffusion's deltas) and placeholder tokens.
    Returns (model, lora_config (None for Custom Diffusion), token ids). P+ and NeTI are
    palp.models.layered.build_layered_model's."""
    if personalize not in ("lora-token", "custom-diffusion"):
        raise ValueError(f"personalize must be lora-token or custom-diffusion here, not {personalize!r} "
                         f"(P+ and NeTI: palp.models.layered.build_layered_model)")
    xl = base.xl_conditioning()
    for module in (base.unet, base.vae, base.text_encoder, base.text_encoder_2):
        if module is not None:
            module.requires_grad_(False)
    if xl is not None and personalize == "custom-diffusion":
        raise ValueError("--personalize custom-diffusion trains Stable Diffusion 1.x/2.x models; "
                         "use lora-token for an SDXL model")
    if xl is None:
        token_ids = add_placeholder_tokens(base.tokenizer, base.text_encoder, init_words)
    else:  # SDXL: the token in both tokenizers and both encoders, each initialised from its word
        token_ids = add_placeholder_tokens(base.tokenizer.first, base.text_encoder, init_words)
        if add_placeholder_tokens(base.tokenizer.second, base.text_encoder_2, init_words) != token_ids:
            raise RuntimeError("the placeholder tokens got other ids in SDXL's second tokenizer")
    if personalize == "custom-diffusion":
        from palp.models.custom_diffusion import add_custom_diffusion

        switch = add_custom_diffusion(base.unet)
        return PersonalizedModel(base.unet, base.text_encoder, switch), None, token_ids
    if rank is None:
        raise ValueError("LoRA needs a rank")
    config = add_lora(base.unet, rank=rank, alpha=alpha, targets=targets)
    return PersonalizedModel(base.unet, base.text_encoder, text_encoder_2=base.text_encoder_2, xl=xl), config, token_ids
