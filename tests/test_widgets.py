"""The heatmap browser, driven programmatically: what it shows equals the library's own maps."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from daamlib import daam, generate, linear, normalize, openvocab
from daamlib.metrics import to_mask_resolution
from daamlib.optimize import OptimizedTokens
from daamlab.testing.unet import tiny_random_pipeline
from daamlab.widgets import HeatmapBrowser, default_token

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
    torch.testing.assert_close(browser.current_heatmap, normalize(linear(records[0], "tree", pipe=pipe)))  # min-max scaled, as evaluated
    browser.method.value = "open-vocabulary"
    torch.testing.assert_close(browser.current_heatmap, openvocab(records[0], "tree", "tree", pipe=pipe))
    browser.record_select.value = 1
    torch.testing.assert_close(browser.current_heatmap, openvocab(records[1], "tree", "tree", pipe=pipe))
    assert browser.overlay_view.value[:4] == b"\x89PNG"


def test_optimized_tokens_and_clear_errors(records, pipe):
    vector = torch.randn(1, records[0].linear_matrix.shape[1], generator=torch.Generator().manual_seed(0))
    tokens = {"random": OptimizedTokens(vectors=vector, variant="linear", loss="ce", names=["x"], model_id=None)}
    browser = HeatmapBrowser(records, pipe=pipe, tokens=tokens)
    browser.method.value = "optimized"
    torch.testing.assert_close(browser.current_heatmap, normalize(linear(records[0], vector[0])))
    shown_before = browser.overlay_view.value
    browser.method.value = "linear"  # no phrase typed: the message says why and the old image is gone
    assert "type a phrase" in browser.message.value and browser.current_heatmap is None
    assert browser.overlay_view.value != shown_before
    for view in (browser.overlay_view, browser.mask_view):
        blank = np.asarray(Image.open(io.BytesIO(view.value)))
        assert (blank == blank.flat[0]).all()  # one flat grey: nothing that could pass for a map
    browser.text.value = "tree"  # a valid request shows a map again and clears the message
    assert browser.message.value == "" and browser.current_heatmap is not None
    with pytest.raises(ValueError, match="need their images"):
        records_without_image = [type(records[0])(meta=records[0].meta, daam=records[0].daam)]
        HeatmapBrowser(records_without_image)


def test_opens_on_the_object_word_not_the_article(records, pipe):
    browser = HeatmapBrowser(records, pipe=pipe)
    assert browser.token.value == records[0].tokens.token_indices("car")[0]
    browser.record_select.value = 1  # "a rider on a bicycle"
    assert browser.token.value == records[1].tokens.token_indices("rider")[0]
    assert default_token(records[1].tokens) == records[1].tokens.token_indices("rider")[0]


def test_overlay_scale_matches_the_threshold_and_the_mask(records, pipe):
    """The overlay shows D / max D; the mask is on exactly where that value reaches τ."""
    from daamlab.widgets import scaled

    browser = HeatmapBrowser(records, pipe=pipe)
    for tau in (0.0, 0.4, 0.75, 1.0):
        browser.threshold.value = tau
        upsampled = to_mask_resolution(browser.current_heatmap, browser.record.image.shape[:2])
        shown = scaled(upsampled).numpy()
        assert shown.max() == pytest.approx(1.0) and shown.min() >= 0
        on, off = shown[browser.current_mask], shown[~browser.current_mask]
        assert (on >= tau - 1e-6).all() and (off < tau + 1e-6).all()
    assert "D / max D" in browser.scale_label.value


def test_layer_selector_is_wide_enough_for_full_names(records, pipe):
    browser = HeatmapBrowser(records, pipe=pipe)
    longest = max(len(layer.name) for layer in records[0].cross_layers)
    assert f"{longest + 4}ch" in browser.layers.layout.width


@pytest.fixture(scope="module")
def generated(pipe, tmp_path_factory):
    from daamlab.datagen import GenerationSettings, generate_dataset
    from daamlab.prompts import PromptSet

    prompts = PromptSet.from_dict({"seeds_per_prompt": 1, "templates": [
        {"template": "a {object} in an urban environment", "words": ["object"], "attributes": {"object": ["car", "tree"]}}]})
    out_dir = tmp_path_factory.mktemp("generated")
    settings = GenerationSettings(num_inference_steps=2).validate()
    generate_dataset(pipe, prompts, out_dir, settings, progress=False)
    return out_dir


def test_dataset_browser_steps_through_samples(generated):
    from daamlab.dataset_browser import DatasetBrowser

    browser = DatasetBrowser(generated, display_size=64)
    assert len(browser) == 2
    views = browser.views()
    assert list(views) == ["image", "labels", "DAAM: car"] and not browser.errors
    widget = browser.widget
    first = [tile.children[1].value for tile in browser.gallery.children]
    assert len(first) == 3 and all(value[:4] == b"\x89PNG" for value in first)
    assert "a car in an urban environment" in browser.title.value
    browser.next_button.click()
    assert browser.index == 1 and browser.position.value == 1 and browser.slider.value == 1
    assert "tree" in browser.title.value
    assert [tile.children[1].value for tile in browser.gallery.children] != first
    browser.next_button.click()  # stays on the last sample
    assert browser.index == 1
    browser.position.value = 0  # typing a number moves too
    assert browser.index == 0 and "car" in browser.title.value
    browser.previous_button.click()
    assert browser.index == 0 and widget is browser.widget
    with pytest.raises(FileNotFoundError, match="no finished samples"):
        DatasetBrowser(generated / "samples" / "000000")
