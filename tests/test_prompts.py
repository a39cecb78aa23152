import pytest

from palp.core.prompts import (PromptError, clean_prompt, parse_keyed, placeholder_token, placeholders_in,
                               to_token_prompt)


@pytest.mark.parametrize(
    "prompt, words, expected",
    [
        ("A sketch of [V]", {"[V]": "cat"}, "A sketch of a cat"),
        ("[V] at night", {"[V]": "owl"}, "An owl at night"),
        ("my [V]", {"[V]": "cat"}, "my cat"),
        ("A sketch of [V] in Paris at night", {"[V]": "cat"}, "A sketch of a cat in Paris at night"),
        ("A watercolour of an [V] on the beach", {"[V]": "dog"}, "A watercolour of a dog on the beach"),
        ("A photo of a [V]", {"[V]": "elephant"}, "A photo of an elephant"),
        ("the [V] in the snow", {"[V]": "owl"}, "the owl in the snow"),
        ("A toy [V] and [V]", {"[V]": "unicorn"}, "A toy a unicorn and a unicorn"),
        ("An oil painting of [V1] inspired by [V2] painting", {"[V1]": "cat", "[V2]": "painting"},
         "An oil painting of a cat inspired by a painting painting"),
        ("A 19th century portrait of [V1] and [V2]", {"[V1]": "cat", "[V2]": "dog"},
         "A 19th century portrait of a cat and a dog"),
        ("Sunset. [V] on a rock", {"[V]": "hourglass"}, "Sunset. An hourglass on a rock"),
        ("A sketch of [V] in Paris", {"[V]": "sunglasses"}, "A sketch of sunglasses in Paris"),
        ("A photo of a [V]", {"[V]": "sneakers"}, "A photo of sneakers"),
        ("[V] on the moon", {"[V]": "red boots"}, "Red boots on the moon"),
        ("my [V] at night", {"[V]": "shoes"}, "my shoes at night"),
        ("A photo of [V]", {"[V]": "bus"}, "A photo of a bus"),
        ("A photo of [V]", {"[V]": "cactus"}, "A photo of a cactus"),
        ("A photo of [V]", {"[V]": "teddy bear"}, "A photo of a teddy bear"),
    ],
)
def test_clean_prompt(prompt, words, expected):
    assert clean_prompt(prompt, words) == expected


def test_placeholders_and_tokens():
    assert placeholders_in("[V2] and [V1] and [V2]") == ["[V2]", "[V1]"]
    assert placeholder_token("[V]") == "<v>"
    assert placeholder_token("[V12]") == "<v12>"
    assert to_token_prompt("A sketch of [V1] with [V2]") == "A sketch of <v1> with <v2>"


@pytest.mark.parametrize(
    "prompt, words, message",
    [
        ("A sketch of a cat", {"[V]": "cat"}, "no subject placeholder"),
        ("A sketch of [v]", {"[V]": "cat"}, "'[v]' is not one"),
        ("A sketch of [V2]", {"[V]": "cat"}, "uses [V2] but no subject has that placeholder"),
        ("A sketch of [V] and [X]", {"[V]": "cat"}, "'[X]', which is not a placeholder"),
        ("A sketch of [V]", {"[V]": ""}, "has no class word"),
    ],
)
def test_bad_prompts(prompt, words, message):
    with pytest.raises(PromptError, match=message.replace("[", r"\[").replace("]", r"\]")):
        clean_prompt(prompt, words)


def test_parse_keyed():
    assert parse_keyed(["cat"], flag="--class-word") == {"[V]": "cat"}
    assert parse_keyed(["[V1]=cat", "[V2]=dog"], flag="--class-word") == {"[V1]": "cat", "[V2]": "dog"}
    assert parse_keyed(["[V]=An oil painting of [V]"], flag="--p") == {"[V]": "An oil painting of [V]"}
    assert parse_keyed(["a=b"], flag="--p") == {"[V]": "a=b"}  # '=' in a value is not a key
    with pytest.raises(PromptError, match="given twice"):
        parse_keyed(["cat", "[V]=dog"], flag="--class-word")


def test_a_checked_prompt_is_made_only_by_checking_and_is_used_without_checking_again(monkeypatch):
    import dataclasses

    from palp.core import prompts
    from palp.core.elements import element_list, elements_of
    from palp.core.prompts import CheckedPrompt

    with pytest.raises(PromptError, match="no subject placeholder"):
        CheckedPrompt("A sketch of a cat", {"[V]": "cat"})
    with pytest.raises(PromptError, match=r"the personalization prompt of \[V\] 'A photo of \[X\]' has no"):
        CheckedPrompt("A photo of [X]", {"[V]": "cat"}, what="personalization prompt of [V]")
    words = {"[V2]": "dog", "[V1]": "owl"}
    p = CheckedPrompt("A sketch of [V1] and [V2] in Paris at night", words)
    assert (p.placeholders, p.clean) == (("[V1]", "[V2]"), "A sketch of an owl and a dog in Paris at night")
    assert CheckedPrompt("A sketch of [V]", {"[V]": "cat"}, clean="A sketch of my cat").clean == "A sketch of my cat"
    words["[V1]"] = "cat"  # the prompt keeps the words it was checked with
    assert p.class_words == {"[V2]": "dog", "[V1]": "owl"}
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.text = "A sketch of [V3]"
    with pytest.raises(TypeError):
        p.class_words["[V1]"] = "cat"
    with pytest.raises(PromptError, match="no subject placeholder"):
        dataclasses.replace(p, text="A sketch")  # replace goes through the check too
    assert p.tokens == prompts.token_count(p.text)
    p.check_length(clean=True)
    long = CheckedPrompt("A sketch of [V] " + "in Paris at night, " * 20, {"[V]": "cat"})
    with pytest.raises(PromptError, match=r"the target prompt 'A sketch of \[V\] in Paris.*tokens long"):
        long.check_length()

    def no_second_check(*args, **kwargs):
        raise AssertionError("checked again")

    expected = element_list(p.text, p.class_words)
    monkeypatch.setattr(prompts, "check_prompt", no_second_check)
    assert elements_of(p) == expected
    # Class elements in the order of the class words; the tail's [V2] cleaned without a second check.
    assert [e["text"] for e in expected] == ["A sketch", "A photo of a dog", "A photo of an owl", "a dog", "in Paris", "at night"]


def _corpus() -> list[str]:
    """Prompts people write and strings nobody should: templates, the toy world's captions,
    accents, mojibake, HTML entities, digits, contractions, emoji, CJK, runs of symbols and
    white space, and 300 seeded random strings over all of these."""
    import random

    from palp.core.prompts import PROMPT_TEMPLATES
    from palp.toyworld.v2.world import NAMES, pretraining_plan

    fixed = [t.format("[V]") for t in PROMPT_TEMPLATES["textual-inversion"]] + \
        [s.caption() for s in pretraining_plan(40, seed=3)] + list(NAMES[:50]) + [
        "A sketch of a cat in Paris at night", "Café über naïve coöperation", "cafÃ© mojibake", "Tom &amp; Jerry &lt;3",
        "it's, IT'S, don't, we'll, they've, I'm, she'd", "1984 and 3.14159 and 1,000,000", "🐱 in 東京 at 夜",
        "  tabs\tand\nnewlines  ", "!!!???...;;;", "snake_case-and-kebab", "<|endoftext|> inside", "ÀÉÎÕÜ ß ø Ω",
        "ktn pll ucd sks zwx", "a" * 60, "\u200b zero width \u00ad soft hyphen"]
    rng = random.Random(0)
    pool = "abcdefghijklmnopqrstuvwxyzABCXYZ0123456789 ',.!?-_&;:#@()[]éüßø🐱東夜\t"
    return fixed + ["".join(rng.choice(pool) for _ in range(rng.randint(1, 40))) for _ in range(300)]


def test_palps_clip_bpe_is_clips_tokenizer():
    """palp.core.clip_bpe (read without torch) makes the pieces open_clip's tokenizer makes, on
    every string of the corpus that both clean alike (open_clip also mends mojibake and HTML
    entities, which SD's tokenizer does not: the next test); its vocabulary is open_clip's, in id order."""
    from open_clip.tokenizer import SimpleTokenizer, basic_clean, whitespace_clean

    from palp.core import clip_bpe

    reference = SimpleTokenizer()
    ours = clip_bpe.ClipBpe()
    vocab = clip_bpe.vocabulary()
    assert len(vocab) == 49408 and vocab[:-2] == list(reference.encoder)[:-2]
    compared = 0
    for text in _corpus():
        if "<|endoftext|>" in text or whitespace_clean(basic_clean(text)).lower() != clip_bpe.clean(text).strip():
            continue  # (open_clip names its specials otherwise)
        assert ours.pieces(text) == [reference.decoder[i] for i in reference.encode(text)], text
        compared += 1
    assert compared > 300


def test_token_count_is_what_sds_tokenizer_counts(tiny_dir):
    from palp.core import prompts
    from palp.models.base_model import load_base_model

    tokenizer = load_base_model("tiny").tokenizer
    for text in _corpus():  # (a placeholder counts one token: tests/test_bad_input.py)
        text = text.replace("[V]", "cat")
        assert prompts.token_count(text) == len(tokenizer(text).input_ids), text
