"""One method protocol: every method object's attribute(record, word) equals its shortcut function,
and carries the tokens it averaged."""

import numpy as np
import pytest
import torch

import daamlib
from daamlib.methods import DAAM, LinearDAAM, OpenVocabulary, OptimizedToken, vector_maps

PROMPT = "a traffic light in an urban environment"


@pytest.fixture(scope="module")
def record(pipe):
    (record,) = daamlib.generate(pipe, PROMPT, seed=0, num_inference_steps=2, queries=True, linear=True, per_head=True,
                                 contexts=["a tree by the road"])
    return record


def test_daam_method_equals_the_shortcut_and_names_its_tokens(record):
    found = DAAM().attribute(record, "traffic light")
    assert torch.equal(found.heatmap, daamlib.daam(record, "traffic light"))
    assert found.tokens == ("traffic</w>", "light</w>") and found.method == "DAAM"
    layers = [layer.name for layer in record.cross_layers[:2]]
    assert torch.equal(DAAM(layers=layers).attribute(record, "light").heatmap, daamlib.daam(record, "light", layers=layers))
    assert torch.equal(DAAM(mode="daam-0.2").attribute(record, "light").heatmap, daamlib.daam(record, "light", mode="daam-0.2"))


def test_open_vocabulary_method_formats_its_context_and_reads_stored_phrases(pipe, record):
    method = OpenVocabulary(pipe, "a {word} by the road")
    found = method.attribute(record, "tree")
    assert torch.equal(found.heatmap, daamlib.openvocab(record, "a tree by the road", "tree", pipe=pipe))
    stored = OpenVocabulary(context="a tree by the road", token=4).attribute(record, "ignored")
    assert torch.equal(stored.heatmap, daamlib.openvocab(record, "a tree by the road")[4])


def test_linear_and_optimized_methods(pipe, record):
    assert torch.equal(LinearDAAM(pipe).attribute(record, "bicycle").heatmap, daamlib.linear(record, "bicycle", pipe=pipe))
    mask = np.zeros(record.image_size, bool)
    mask[8:20, 8:24] = True
    tokens = {variant: daamlib.optimize_tokens([record], [mask], init="light", variant=variant, epochs=2, pipe=pipe,
                                               progress=False) for variant in ("linear", "softmax")}
    for variant, found in tokens.items():
        method = OptimizedToken.by_init_word([found], pipe)
        expected = vector_maps(record, found.vectors, variant, pipe)[0]
        assert torch.allclose(method.attribute(record, "light").heatmap, expected)
        with pytest.raises(KeyError, match=r"optimized words: \['light'\]"):
            method.attribute(record, "car")
