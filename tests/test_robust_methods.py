"""Bad and edge inputs of the heatmap methods (daam, token_maps, resize): each fails with a message
that says what was wrong and what to do, or gives the right number (issue 13, "No silent wrong answers").
docs/robustness.md (section 3) lists them."""

import copy

import numpy as np
import pytest
import torch

import daamlib
from daamlib.layout import resize

PROMPT = "a car and a tree in an urban environment"


@pytest.fixture(scope="module")
def record(pipe):
    with daamlib.trace(pipe, per_step=True, per_head=True) as tr:
        pipe(prompt=PROMPT, generator=torch.Generator().manual_seed(0), num_inference_steps=3,
             height=32, width=32, output_type="latent")
    return tr.records[0]


@pytest.fixture(scope="module")
def plain_record(pipe):
    with daamlib.trace(pipe) as tr:
        pipe(prompt=PROMPT, generator=torch.Generator().manual_seed(0), num_inference_steps=2,
             height=32, width=32, output_type="latent")
    return tr.records[0]


# -- daam: layers -----------------------------------------------------------------------------------
def test_daam_empty_layer_list_is_an_error_not_a_crash(record):
    with pytest.raises(ValueError, match=r"layers=\[\] selects no layer; pass None"):
        daamlib.daam(record, "car", layers=[])


def test_daam_layer_name_as_a_bare_string(record):
    name = record.cross_layers[0].name
    with pytest.raises(TypeError, match=r"wrap one layer: layers=\["):
        daamlib.daam(record, "car", layers=name)
    assert torch.allclose(daamlib.daam(record, "car", layers=[name]), daamlib.daam(record, "car", layers=(name,)))


def test_daam_unknown_or_non_string_layers(record):
    with pytest.raises(KeyError, match="are not in this record; recorded"):
        daamlib.daam(record, "car", layers=["up_blocks.9.attn2"])
    with pytest.raises(TypeError, match="layer names are strings"):
        daamlib.daam(record, "car", layers=[0])


# -- daam: steps ------------------------------------------------------------------------------------
def test_daam_empty_step_list_is_an_error_not_a_zero_map(record):
    with pytest.raises(ValueError, match=r"steps=\[\] selects no step"):
        daamlib.daam(record, "car", steps=[])


def test_daam_repeated_steps_are_not_double_counted(record):
    with pytest.raises(ValueError, match=r"steps \[1\] are repeated"):
        daamlib.daam(record, "car", steps=[1, 1])


def test_daam_steps_must_be_a_list_of_ints(record):
    with pytest.raises(TypeError, match=r"wrap one step: steps=\[1\]"):
        daamlib.daam(record, "car", steps=1)
    with pytest.raises(TypeError, match="integer step indices"):
        daamlib.daam(record, "car", steps=[0.5])
    n = record.num_steps
    with pytest.raises(IndexError, match=rf"outside the record's {n} steps \(0..{n - 1}\)"):
        daamlib.daam(record, "car", steps=[n])
    with pytest.raises(IndexError, match=r"steps \[-1\] are negative"):
        daamlib.daam(record, "car", steps=[-1])
    # numpy integers are fine, and all steps equal no filter
    assert torch.allclose(daamlib.daam(record, "car", steps=np.arange(n)), daamlib.daam(record, "car"), rtol=1e-5)


def test_daam_steps_without_per_step_maps(plain_record):
    with pytest.raises(KeyError, match="per_step=True"):
        daamlib.daam(plain_record, "car", steps=[0])


# -- daam: words, token indices, occurrence ----------------------------------------------------------
@pytest.mark.parametrize("word", [None, True, 1.5, ["car"], b"car"])
def test_daam_word_of_a_wrong_type(record, word):
    with pytest.raises(TypeError, match="word is a word of the prompt"):
        daamlib.daam(record, word)


def test_daam_numpy_integer_is_a_token_index(record):
    assert torch.equal(daamlib.daam(record, np.int64(2)), daamlib.daam(record, 2))
    assert torch.equal(daamlib.daam(record, -1), daamlib.daam(record, 76))  # counts from the end, like Python


def test_daam_token_index_out_of_range(record):
    with pytest.raises(IndexError, match=r"token index 77 is outside the 77 tokens"):
        daamlib.daam(record, 77)


def test_daam_negative_or_non_int_occurrence(record):
    with pytest.raises(ValueError, match="occurrence=-1 is negative; use 0"):
        daamlib.daam(record, "car", occurrence=-1)
    with pytest.raises(TypeError, match="occurrence is an int"):
        daamlib.daam(record, "a", occurrence=1.0)
    with pytest.raises(KeyError, match=r"occurs 2 time\(s\).*use 0..1"):
        daamlib.daam(record, "a", occurrence=2)
    assert not torch.equal(daamlib.daam(record, "a", occurrence=1), daamlib.daam(record, "a"))


def test_daam_occurrence_with_a_token_index(record):
    with pytest.raises(ValueError, match="occurrence=1 applies to words"):
        daamlib.daam(record, 2, occurrence=1)


def test_daam_empty_word(record):
    with pytest.raises(ValueError, match="empty"):
        daamlib.daam(record, "  ")


# -- daam: mode, upsample, record ---------------------------------------------------------------------
def test_daam_unknown_mode_and_upsample(record):
    with pytest.raises(ValueError, match=r"mode 'daam-0.3' is not supported; use one of \('thesis', 'daam-0.2'\)"):
        daamlib.daam(record, "car", mode="daam-0.3")
    with pytest.raises(ValueError, match="upsample mode 'nearest' is not supported"):
        daamlib.daam(record, "car", upsample="nearest")


def test_daam_02_refuses_options_the_package_did_not_have(record):
    with pytest.raises(ValueError, match="upsamples bicubically.*drop upsample='bilinear'"):
        daamlib.daam(record, "car", mode="daam-0.2", upsample="bilinear")
    with pytest.raises(ValueError, match="drop steps="):
        daamlib.daam(record, "car", mode="daam-0.2", steps=[0])
    assert torch.equal(daamlib.daam(record, "car", mode="daam-0.2", upsample="bicubic"),
                       daamlib.daam(record, "car", mode="daam-0.2"))


def test_daam_02_without_per_head_maps(plain_record):
    with pytest.raises(KeyError, match="per_head=True"):
        daamlib.daam(plain_record, "car", mode="daam-0.2")


def test_daam_given_the_list_of_records(record):
    with pytest.raises(TypeError, match=r"takes a daamlib Record.*got list\. pass one of its records, e.g\. records\[0\]"):
        daamlib.daam([record], "car")


def test_daam_of_a_record_with_nan_maps(record):
    broken = copy.copy(record)
    broken.daam = dict(record.daam)
    name = record.cross_layers[0].name
    broken.daam[name] = record.daam[name].clone()
    broken.daam[name][0, record.tokens.token_indices("car")[0]] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf values.*float32"):
        daamlib.daam(broken, "car")
    assert torch.isfinite(daamlib.daam(broken, "tree")).all()  # other tokens are unaffected


# -- token_maps ----------------------------------------------------------------------------------------
def test_token_maps_bad_indices(record):
    with pytest.raises(ValueError, match="token_indices is empty"):
        daamlib.token_maps(record, [])
    with pytest.raises(TypeError, match="For a word use daamlib.daam"):
        daamlib.token_maps(record, "car")
    with pytest.raises(IndexError, match="outside the 77 tokens"):
        daamlib.token_maps(record, [2, 100])
    with pytest.raises(TypeError, match="a token index is an int"):
        daamlib.token_maps(record, [2.0])
    maps = daamlib.token_maps(record, [2, 3])
    assert maps.shape == (2, 16, 16)
    assert torch.equal(maps[1], daamlib.daam(record, 3))


# -- resize ---------------------------------------------------------------------------------------------
def test_resize_bad_sizes_and_inputs():
    maps = torch.rand(2, 4, 4)
    with pytest.raises(ValueError, match="two positive ints"):
        resize(maps, (0, 8))
    with pytest.raises(ValueError, match="two positive ints"):
        resize(maps, (8,))
    with pytest.raises(ValueError, match="two positive ints"):
        resize(maps, (8.0, 8.0))
    with pytest.raises(TypeError, match="use torch.as_tensor"):
        resize(np.zeros((4, 4)), (8, 8))
    with pytest.raises(ValueError, match=r"maps \[..., h, w\]"):
        resize(torch.rand(4), (8, 8))
    with pytest.raises(ValueError, match="not supported"):
        resize(maps, (8, 8), "nearest")


def test_resize_integer_maps_as_float():
    maps = torch.tensor([[0, 2], [2, 0]])
    out = resize(maps, (4, 4), "bilinear")
    assert out.dtype == torch.float32
    assert torch.allclose(out, resize(maps.float(), (4, 4), "bilinear"))
    assert float(out[0, 0]) == pytest.approx(0.0) and float(out[0, 3]) == pytest.approx(2.0)
