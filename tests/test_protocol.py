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
    raw = daamlib.linear(record, "bicycle", pipe=pipe)
    scaled = LinearDAAM(pipe).attribute(record, "bicycle").heatmap
    assert torch.allclose(scaled, (raw - raw.min()) / (raw.max() - raw.min()))
    assert scaled.min() == 0 and scaled.max() == 1
    assert torch.equal(LinearDAAM(pipe, min_max=False).attribute(record, "bicycle").heatmap, raw)
    mask = np.zeros(record.image_size, bool)
    mask[8:20, 8:24] = True
    tokens = {variant: daamlib.optimize_tokens([record], [mask], init="light", variant=variant, epochs=2, pipe=pipe,
                                               progress=False) for variant in ("linear", "softmax")}
    for variant, found in tokens.items():
        method = OptimizedToken.by_init_word([found], pipe)
        expected = vector_maps(record, found.vectors, variant, pipe)[0].detach()
        if variant == "linear":  # trained on min-max scaled maps, evaluated the same way
            assert torch.equal(OptimizedToken.by_init_word([found], pipe, min_max=False).attribute(record, "light").heatmap, expected)
            expected = (expected - expected.min()) / (expected.max() - expected.min())
        assert torch.allclose(method.attribute(record, "light").heatmap, expected)
        with pytest.raises(KeyError, match=r"optimized words: \['light'\]"):
            method.attribute(record, "car")


def test_a_linear_map_negative_everywhere_is_scored_on_its_range(record):
    """M x can be negative at every pixel; min-max scaling keeps its top region instead of refusing it."""

    class Negative:
        def attribute(self, record, word, occurrence=0):
            return daamlib.methods.Attribution(-100 - torch.linspace(300, 1, 64).reshape(8, 8), ("x",), "negative")

    negative = Negative().attribute(record, "light").heatmap
    mask = np.zeros((64, 64), bool)
    mask[56:, :] = True  # the last latent row: where the map is least negative
    with pytest.raises(ValueError, match="positive"):
        daamlib.metrics.iou_curve(negative, mask)
    from daamlib.methods.protocol import _min_max_linear
    curve = daamlib.metrics.iou_curve(_min_max_linear(negative, "linear", True), mask, np.array([0.0, 0.9]))
    assert curve[0] == pytest.approx(mask.mean(), abs=0.01) and curve[1] > 0.5  # τ=0: ~all pixels; τ=0.9: the top rows
