"""--token-init: the word each placeholder token's embedding starts from (its class word, Custom
Diffusion's rarely used words, or one given word), for every personalization."""

from __future__ import annotations

import pytest
import torch

from palp.core.prompts import RARE_INIT_TOKENS
from palp.core.settings import ConfigError, Subject, TrainConfig
from palp.method.step_inputs import setup_model
from palp.models.base_model import load_base_model

TWO = [Subject("[V1]", "unused", "cat"), Subject("[V2]", "unused", "cup")]


def cfg_of(subjects=None, target_prompt="A sketch of [V] in Paris at night", **kw) -> TrainConfig:
    return TrainConfig(subjects=subjects or [Subject("[V]", "unused", "cat")], target_prompt=target_prompt, output="unused",
                       pretrained_model="tiny", **kw)


def test_defaults_follow_the_personalization_and_bad_words_are_refused():
    assert RARE_INIT_TOKENS == ("ktn", "pll", "ucd</w>")  # the rows Custom Diffusion's code copies
    assert cfg_of(method="custom-diffusion").token_init == "rare"
    assert cfg_of(method="palp", personalize="custom-diffusion").token_init == "rare"
    for method in ("palp", "ti-db", "sds", "nfsd", "p-plus", "neti"):
        assert cfg_of(method=method).token_init == "class", method
    assert cfg_of(method="custom-diffusion", token_init="class").init_words == {"[V]": "cat"}
    assert cfg_of(method="palp", token_init="rare").init_words == {"[V]": "ktn"}
    assert cfg_of(method="palp", token_init="<v>").init_words == {"[V]": "<v>"}  # a word, read by the BPE
    four = [Subject(f"[V{i}]", "unused", "dog") for i in range(1, 5)]
    assert cfg_of(four, "[V1], [V2], [V3] and [V4]", method="custom-diffusion").init_words == {
        "[V1]": "ktn", "[V2]": "pll", "[V3]": "ucd</w>", "[V4]": "ktn"}  # one per subject, in turn
    assert cfg_of(TWO, "[V1] and [V2]", token_init="teddy bear").init_words == {"[V1]": "teddy bear", "[V2]": "teddy bear"}
    for bad in ("", " cat", "[V]", "   "):
        with pytest.raises(ConfigError, match="--token-init must be class, rare or a word"):
            cfg_of(method="palp", token_init=bad)


def _embedding_rows(base, pieces: list[str]) -> torch.Tensor:
    """The mean of the base text encoder's embeddings of these BPE pieces (named by hand)."""
    ids = base.tokenizer.convert_tokens_to_ids(pieces)
    assert base.tokenizer.unk_token_id not in ids, pieces
    return base.text_encoder.get_input_embeddings().weight[ids].detach().float().mean(0)


@pytest.mark.parametrize("personalize", ["custom-diffusion", "lora-token", "p-plus", "neti"])
def test_each_token_starts_from_its_word(tiny_dir, personalize):
    """Two subjects under Custom Diffusion's rare tokens: [V1] starts from CLIP's vocabulary entry 42170
    ("ktn"), [V2] from 47629 ("pll"), the rows its code copies (not the BPE's reading of the words,
    "k" + "tn</w>" and "pll</w>"); with a given word, both from the BPE's pieces of it ("<v>", the
    placeholder tokens' own spelling, included: it is read before they exist). For P+ every
    layer's token starts there, for NeTI the mapper's output norm is that embedding's."""
    want = {"rare": [["ktn"], ["pll"]], "dog": [["dog</w>"], ["dog</w>"]], "class": [["cat</w>"], ["cup</w>"]],
            "<v>": [["<</w>", "v</w>", "></w>"]] * 2}
    for token_init, pieces in want.items():
        base = load_base_model("tiny")
        if token_init == "rare":
            assert base.tokenizer.convert_tokens_to_ids(["ktn", "pll", "ucd</w>"]) == [42170, 47629, 43514]
        expected = torch.stack([_embedding_rows(base, p) for p in pieces])
        cfg = cfg_of(TWO, "A sketch of [V1] and [V2] in Paris", method="palp", personalize=personalize,
                     token_init=token_init)
        model, token_ids, _ = setup_model(base, cfg, torch.device("cpu"), torch.float32)
        assert list(token_ids) == ["[V1]", "[V2]"]
        if personalize == "p-plus":
            tokens = model.conditioning.tokens.detach()  # (layers, K, D)
            assert torch.equal(tokens, expected.unsqueeze(0).expand_as(tokens)), token_init
        elif personalize == "neti":
            norms = torch.stack([m.norm for m in model.conditioning.mappers])
            assert torch.allclose(norms, expected.norm(dim=-1)), token_init
        else:
            assert torch.equal(model.text_encoder.get_input_embeddings().learned.detach(), expected), token_init
