"""Bad and edge inputs of daamlib.metrics: each fails with a message that says what was wrong and
what to do, or gives the right number (issue 13, "No silent wrong answers").
docs/robustness.md (section 3) lists them."""

import numpy as np
import pytest
import torch

import daamlib
from daamlib import metrics


def box_mask(shape=(16, 16)):
    mask = np.zeros(shape, bool)
    mask[4:12, 4:12] = True
    return mask


def peaked(shape=(4, 4)):
    heatmap = torch.zeros(shape)
    heatmap[1:3, 1:3] = 1.0
    return heatmap


# -- iou_curve ----------------------------------------------------------------------------------------
def test_iou_curve_refuses_a_stack_of_heatmaps():
    with pytest.raises(ValueError, match=r"expected one heatmap \[h, w\]; got shape \[2, 8, 8\]"):
        metrics.iou_curve(torch.rand(2, 8, 8), np.zeros((16, 16), bool))


@pytest.mark.parametrize("taus, message", [
    ([], r"non-empty 1-D sequence in \[0, 1\]; got shape \[0\]"),
    (0.5, r"single value .*wrap it: \[tau\]"),
    ([[0.1, 0.2]], r"non-empty 1-D sequence"),
    ([0.0, float("nan")], r"thresholds \[nan\] are outside \[0, 1\]"),
    ([-0.1, 0.5], r"thresholds \[-0.1\] are outside \[0, 1\]"),
])
def test_iou_curve_bad_thresholds(taus, message):
    with pytest.raises(ValueError, match=message):
        metrics.iou_curve(peaked(), box_mask(), taus=taus)


def test_iou_curve_rgb_mask_says_what_to_do():
    with pytest.raises(ValueError, match=r"the mask is one \[H, W\] map; got shape \[32, 32, 3\]"):
        metrics.iou_curve(torch.rand(8, 8), np.zeros((32, 32, 3), bool))
    with pytest.raises(ValueError, match=r"a mask shape is \(H, W\); got \(32, 32, 3\).*image.shape\[:2\]"):
        metrics.to_mask_resolution(torch.rand(8, 8), (32, 32, 3))


def test_iou_curve_mask_smaller_than_the_heatmap():
    with pytest.raises(ValueError, match="image's resolution"):
        metrics.iou_curve(torch.rand(8, 8), np.zeros((4, 4), bool))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_iou_curve_non_finite_heatmap(value):
    heatmap = peaked()
    heatmap[0, 0] = value
    with pytest.raises(ValueError, match="the heatmap has 1 NaN or inf values"):
        metrics.iou_curve(heatmap, box_mask())


def test_iou_curve_needs_a_positive_peak():
    with pytest.raises(ValueError, match="maximum is 0, not positive.*empty selection"):
        metrics.iou_curve(torch.zeros(4, 4), box_mask())
    with pytest.raises(ValueError, match="maximum is -2, not positive.*daamlib.normalize"):
        metrics.iou_curve(torch.full((4, 4), -2.0), box_mask())


def test_iou_curve_heatmap_dtypes():
    taus = [0.0, 0.5, 1.0]
    as_float = metrics.iou_curve(peaked(), box_mask(), taus)
    up = metrics.to_mask_resolution(peaked(), (16, 16)).numpy()
    expected = [np.logical_and(up >= t * up.max(), box_mask()).sum() / np.logical_or(up >= t * up.max(), box_mask()).sum()
                for t in taus]
    np.testing.assert_allclose(as_float, expected)
    assert 0 < as_float[0] < as_float[1]
    np.testing.assert_allclose(metrics.iou_curve(peaked().long(), box_mask(), taus), as_float)
    np.testing.assert_allclose(metrics.iou_curve(peaked().half(), box_mask(), taus), as_float)
    np.testing.assert_allclose(metrics.iou_curve(peaked().numpy(), box_mask(), taus), as_float)
    np.testing.assert_allclose(metrics.iou_curve(peaked(), box_mask().astype(np.float16), taus), as_float)
    np.testing.assert_allclose(metrics.iou_curve(peaked().requires_grad_(), box_mask(), taus), as_float)
    with pytest.raises(TypeError, match="real-valued; got dtype torch.bool.*iou"):
        metrics.iou_curve(peaked() > 0, box_mask())
    with pytest.raises(TypeError, match="torch.Tensor or np.ndarray"):
        metrics.iou_curve([[0.0, 1.0], [1.0, 0.0]], box_mask())


# -- iou ------------------------------------------------------------------------------------------------
def test_iou_bad_masks():
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.iou(np.zeros((2, 2)), np.zeros((3, 3)))
    with pytest.raises(ValueError, match="the predicted mask is empty"):
        metrics.iou(np.zeros((0, 4)), np.zeros((0, 4)))
    with pytest.raises(ValueError, match="not binary: 1 values are neither 0 nor 1 \\(e.g. nan"):
        metrics.iou(np.array([0.0, np.nan]), np.array([0.0, 1.0]))
    with pytest.raises(TypeError, match="mask must be boolean or 0/1; got dtype <U3"):
        metrics.iou(np.array(["car"]), np.array([True]))
    with pytest.raises(TypeError, match="array or tensor; got NoneType"):
        metrics.iou(None, np.array([True]))


# -- binarize / normalize ----------------------------------------------------------------------------------
def test_binarize_bad_inputs():
    with pytest.raises(ValueError, match=r"expected one heatmap \[h, w\]"):
        daamlib.binarize(torch.rand(2, 4, 4), 0.5)
    with pytest.raises(TypeError, match="a threshold is a number in \\[0, 1\\]; got '0.5'"):
        daamlib.binarize(torch.rand(4, 4), "0.5")
    with pytest.raises(TypeError, match="got None"):
        daamlib.binarize(torch.rand(4, 4), None)
    with pytest.raises(ValueError, match="threshold nan is outside"):
        daamlib.binarize(torch.rand(4, 4), float("nan"))
    with pytest.raises(ValueError, match="not positive"):
        daamlib.binarize(torch.zeros(4, 4), 0.5)
    with pytest.raises(ValueError, match="NaN or inf"):
        daamlib.binarize(torch.full((4, 4), float("nan")), 0.5)
    mask = daamlib.binarize(peaked(), torch.tensor(0.5))  # a 0-d tensor threshold is a number
    assert mask.dtype == torch.bool and int(mask.sum()) == 4


def test_normalize_bad_inputs():
    with pytest.raises(ValueError, match="1 NaN or inf values"):
        daamlib.normalize(torch.tensor([0.0, float("nan"), 1.0]))
    with pytest.raises(ValueError, match="heatmap is empty"):
        daamlib.normalize(torch.zeros(0))
    with pytest.raises(TypeError, match="real-valued"):
        daamlib.normalize(torch.ones(2, 2, dtype=torch.bool))
    assert torch.allclose(daamlib.normalize(torch.tensor([2, 4, 6])), torch.tensor([0.0, 0.5, 1.0]))


# -- summarize / curve_bands / thresholds ---------------------------------------------------------------------
def test_summarize_bad_curves():
    taus = metrics.thresholds(3)
    with pytest.raises(ValueError, match=r"curves\['car'\] must be per-image IoU curves \[images, taus\].*\[1, 2, 3\]"):
        metrics.summarize({"car": np.zeros((1, 2, 3))}, taus)
    with pytest.raises(ValueError, match="at least one image; got shape \\[0, 3\\]"):
        metrics.summarize({"car": np.zeros((0, 3))}, taus)
    with pytest.raises(ValueError, match="has 4 thresholds per image but taus has 3"):
        metrics.summarize({"car": np.zeros((2, 4))}, taus)
    with pytest.raises(ValueError, match="strictly increasing"):
        metrics.summarize({"car": np.zeros((2, 3))}, taus[::-1])
    with pytest.raises(ValueError, match="outside \\[0, 1\\] or NaN"):
        metrics.summarize({"car": np.array([[0.1, np.nan, 0.2]])}, taus)
    with pytest.raises(ValueError, match="no classes"):
        metrics.summarize({})
    table = metrics.summarize({"car": np.array([0.2, 0.6, 0.4])}, taus)  # one curve is one image
    assert table.loc["car", "max_miou"] == pytest.approx(0.6) and table.loc["car", "images"] == 1


def test_curve_bands_bad_inputs():
    with pytest.raises(ValueError, match=r"\[images, taus\]"):
        metrics.curve_bands(np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match="0 <= low <= high <= 100; got low=95, high=5"):
        metrics.curve_bands(np.zeros((2, 3)), low=95, high=5)


def test_thresholds_count():
    with pytest.raises(ValueError, match="at least 2 points; got count=1"):
        metrics.thresholds(1)
    with pytest.raises(TypeError, match="an int"):
        metrics.thresholds(101.0)


# -- pearson / pooled_iou ------------------------------------------------------------------------------------
def test_pearson_bad_inputs():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=r"maps differ in shape: \[4, 4\] vs \[2, 8\]"):
        metrics.pearson(rng.random((4, 4)), rng.random((2, 8)))
    with pytest.raises(ValueError, match="map b has NaN or inf"):
        metrics.pearson(np.array([0.0, 1.0]), np.array([0.0, np.nan]))
    with pytest.raises(ValueError, match="at least 2 values"):
        metrics.pearson(np.array([1.0]), np.array([2.0]))
    assert np.isnan(metrics.pearson(np.ones(4), np.arange(4.0)))  # constant: undefined, NaN as documented
    assert metrics.pearson(torch.arange(4.0), np.arange(4) > 1) == pytest.approx(np.corrcoef(np.arange(4), [0, 0, 1, 1])[0, 1])


def test_pooled_iou_without_labels():
    with pytest.raises(ValueError, match="no labels to score"):
        metrics.pooled_iou(np.zeros((2, 2), np.uint8), np.zeros((2, 2), np.uint8), {})
