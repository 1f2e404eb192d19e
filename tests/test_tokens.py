import pytest

import daamlib
from daamlib.tokens import PromptTokens
from pipelines import clip_tokenizer


def tokens(text):
    return PromptTokens.from_text(text, clip_tokenizer())


def test_special_positions_and_words():
    t = tokens("a traffic light in an urban environment")
    assert t.ids[0] == 49406 and t.ids[t.eot_index] == 49407 and t.length == 77
    assert t.eot_index == 8
    assert t.padding_indices == tuple(range(9, 77))
    assert [w.text for w in t.words] == ["a", "traffic", "light", "in", "an", "urban", "environment"]
    assert t.token_indices("light") == (3,)
    assert t.token_indices("traffic light") == (2, 3)
    assert t.token_indices("<sot>") == (0,) and t.token_indices("<eot>") == (8,)
    assert [t.label(i) for i in (0, 3, 8, 9)] == ["<sot>", "light", "<eot>", "<pad>"]


def test_multi_token_words_and_repeats():
    t = tokens("a lamppost and a car, and another car")
    assert t.token_indices("lamppost") == (2, 3, 4)  # BPE: lam pp ost
    assert t.token_indices("car") == (7,)
    assert t.token_indices("car", occurrence=1) == (11,)
    assert t.token_indices("a", occurrence=1) == (6,)
    with pytest.raises(KeyError, match="occurs 2 time"):
        t.token_indices("car", occurrence=2)
    assert t.token_indices("Car") == (7,)  # CLIP lower-cases


def test_word_not_in_prompt_and_empty_word():
    t = tokens("a car in the street")
    with pytest.raises(KeyError, match="open-vocabulary"):
        t.token_indices("bicycle")
    with pytest.raises(ValueError, match="empty"):
        t.token_indices("  ")


def test_long_prompt_is_reported_as_truncated_and_mapping_stays_consistent():
    t = tokens("a red car " * 30 + "zebra")
    assert t.maybe_truncated
    assert t.eot_index == 76
    assert t.token_indices("car", occurrence=24) == (75,)
    with pytest.raises(KeyError, match="cut at the text encoder's length"):
        t.token_indices("zebra")


def test_trace_warns_about_truncated_prompts(pipe):
    import torch

    long_prompt = " ".join(["car"] * 100)
    with pytest.warns(UserWarning, match="truncated"):
        with daamlib.trace(pipe) as tr:
            pipe(prompt=long_prompt, num_inference_steps=1, output_type="np", generator=torch.Generator().manual_seed(0))
    record = tr.records[0]
    assert record.tokens.token_indices("car", occurrence=74) == (75,)
    assert daamlib.daam(record, "car", occurrence=74).shape == (16, 16)


def test_empty_prompt_is_rejected_by_generate_and_encoding(pipe):
    with pytest.raises(ValueError, match="prompt is empty"):
        daamlib.generate(pipe, "  ", seed=0)
    with pytest.raises(ValueError, match="empty"):
        daamlib.TextEncoder(pipe).encode("")
