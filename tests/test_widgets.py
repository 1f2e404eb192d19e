"""The heatmap browser, driven programmatically: what it shows equals the library's own maps."""

import numpy as np
import pytest
import torch

from daamlib import daam, generate, linear, openvocab
from daamlib.metrics import to_mask_resolution
from daamlib.optimize import OptimizedTokens
from daamlib.testing import tiny_random_pipeline
from daamlib.widgets import HeatmapBrowser

pytest.importorskip("ipywidgets")


@pytest.fixture(scope="module")
def pipe():
    return tiny_random_pipeline()


@pytest.fixture(scope="module")
def records(pipe):
    prompts = ["a car in an urban environment", "a rider on a bicycle"]
    return [generate(pipe, p, seed=i, num_inference_steps=3, height=32, width=32, linear=True, queries=True,
                     per_step=True)[0] for i, p in enumerate(prompts)]


def shown_mask(browser, heatmap):
    image = browser.record.image
    upsampled = to_mask_resolution(heatmap, image.shape[:2])
    return (upsampled >= browser.threshold.value * upsampled.max()).numpy()


def test_daam_token_selection_and_threshold(records, pipe):
    browser = HeatmapBrowser(records, pipe=pipe)
    car = records[0].tokens.token_indices("car")[0]
    browser.token.value = car
    torch.testing.assert_close(browser.current_heatmap, daam(records[0], "car"))
    before = browser.current_mask.sum()
    browser.threshold.value = 0.9
    assert browser.current_mask.sum() < before
    np.testing.assert_array_equal(browser.current_mask, shown_mask(browser, daam(records[0], "car")))
    browser.token.value = 0  # SOT
    torch.testing.assert_close(browser.current_heatmap, daam(records[0], 0))
    assert [label for label, _ in browser.token.options][:2] == ["<sot>", "a"]


def test_layer_and_step_filters(records, pipe):
    browser = HeatmapBrowser(records, pipe=pipe)
    layer = records[0].cross_layers[0].name
    browser.token.value = records[0].tokens.token_indices("car")[0]
    browser.layers.value = (layer,)
    browser.steps.value = (1, 2)
    torch.testing.assert_close(browser.current_heatmap, daam(records[0], "car", layers=[layer], steps=[1, 2]))


def test_free_text_methods_and_record_switch(records, pipe):
    browser = HeatmapBrowser(records, pipe=pipe)
    browser.method.value = "linear"
    browser.text.value = "tree"
    torch.testing.assert_close(browser.current_heatmap, linear(records[0], "tree", pipe=pipe))
    browser.method.value = "open-vocabulary"
    torch.testing.assert_close(browser.current_heatmap, openvocab(records[0], "tree", "tree", pipe=pipe))
    browser.record_select.value = 1
    torch.testing.assert_close(browser.current_heatmap, openvocab(records[1], "tree", "tree", pipe=pipe))
    assert browser.overlay_view.value[:4] == b"\x89PNG"


def test_optimized_tokens_and_clear_errors(records, pipe):
    vector = torch.randn(1, records[0].linear_matrix.shape[1])
    tokens = {"random": OptimizedTokens(vectors=vector, variant="linear", loss="ce", names=["x"], model_id=None)}
    browser = HeatmapBrowser(records, pipe=pipe, tokens=tokens)
    browser.method.value = "optimized"
    torch.testing.assert_close(browser.current_heatmap, linear(records[0], vector[0]))
    shown = browser.current_heatmap
    browser.method.value = "linear"  # no phrase typed: the display keeps the last map and says why
    assert "type a phrase" in browser.message.value and browser.current_heatmap is shown
    with pytest.raises(ValueError, match="need their images"):
        records_without_image = [type(records[0])(meta=records[0].meta, daam=records[0].daam)]
        HeatmapBrowser(records_without_image)
