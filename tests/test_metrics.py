import numpy as np
import pytest
import torch

import daamlib
from daamlib import metrics


def naive_iou_curve(heatmap, mask, taus):
    up = torch.nn.functional.interpolate(heatmap[None, None], size=mask.shape, mode="bicubic", align_corners=False)[0, 0]
    out = []
    for tau in taus:
        predicted = (up >= tau * up.max()).numpy()
        union = np.logical_or(predicted, mask).sum()
        out.append(1.0 if union == 0 else np.logical_and(predicted, mask).sum() / union)
    return np.array(out)


def test_iou_curve_matches_a_plain_threshold_loop():
    torch.manual_seed(0)
    heatmap = torch.rand(8, 12)
    mask = np.zeros((32, 48), bool)
    mask[8:20, 10:30] = True
    taus = metrics.thresholds(101)
    assert len(taus) == 101 and taus[0] == 0 and taus[-1] == 1
    np.testing.assert_allclose(metrics.iou_curve(heatmap, mask, taus), naive_iou_curve(heatmap, mask, taus))


def test_iou_of_known_masks():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[:2] = True  # 8 pixels
    b[1:3] = True  # 8 pixels, 4 shared
    assert metrics.iou(a, b) == pytest.approx(4 / 12)
    assert metrics.iou(np.zeros((2, 2)), np.zeros((2, 2))) == 1.0


def test_summary_max_auc_and_all_row():
    taus = metrics.thresholds(5)  # 0, .25, .5, .75, 1
    curves = {"car": np.array([[0.0, 0.5, 1.0, 0.5, 0.0], [0.0, 0.5, 0.5, 0.5, 0.0]]),
              "person": np.array([[0.2, 0.2, 0.2, 0.2, 0.2]])}
    table = metrics.summarize(curves, taus)
    assert table.loc["car", "max_miou"] == pytest.approx(0.75)
    assert table.loc["car", "best_tau"] == pytest.approx(0.5)
    assert table.loc["car", "auc"] == pytest.approx(np.trapezoid([0, 0.5, 0.75, 0.5, 0], taus))
    assert table.loc["person", "auc"] == pytest.approx(0.2)
    assert table.loc["All", "max_miou"] == pytest.approx((0.75 + 0.2) / 2)
    bands = metrics.curve_bands(curves["car"])
    np.testing.assert_allclose(bands["low"], np.percentile(curves["car"], 5, axis=0))


def test_pearson_against_numpy():
    rng = np.random.default_rng(0)
    a, b = rng.random(100), rng.random(100)
    assert metrics.pearson(a, b) == pytest.approx(np.corrcoef(a, b)[0, 1])
    assert metrics.pearson(a, 2 * a + 1) == pytest.approx(1.0)


def test_bad_inputs_fail_clearly():
    with pytest.raises(ValueError, match="cannot be normalised"):
        daamlib.normalize(torch.zeros(4, 4))
    assert torch.allclose(daamlib.normalize(torch.tensor([1.0, 3.0])), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="image's resolution"):
        metrics.iou_curve(torch.rand(8, 8), np.zeros((30, 30), bool))
    with pytest.raises(ValueError, match="outside \\[0, 1\\]"):
        daamlib.binarize(torch.rand(4, 4), 1.5)
    with pytest.raises(ValueError, match="outside \\[0, 1\\]"):
        metrics.iou_curve(torch.rand(4, 4), np.zeros((8, 8), bool), taus=[0.0, 2.0])
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.iou(np.zeros((2, 2)), np.zeros((3, 3)))


def test_pooled_iou_counts_pixels_over_the_whole_set():
    predicted = np.zeros((2, 4, 4), np.uint8)
    target = np.zeros((2, 4, 4), np.uint8)
    predicted[0, :2] = 1  # 8 pixels of label 1 in image 0
    target[0, :1] = 1  # 4 of them right
    target[1, :1] = 1  # 4 missed in image 1
    target[1, 3] = 2  # label 2 never predicted
    scores = metrics.pooled_iou(predicted, target, {"one": 1, "two": 2, "absent": 3})
    assert scores["one"] == pytest.approx(4 / 12)  # pooled, not the mean of 0.5 and 0.0
    assert scores["two"] == 0.0
    assert np.isnan(scores["absent"])
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.pooled_iou(predicted, target[:1], {"one": 1})


def test_soft_masks_are_refused_not_read_as_all_true():
    ones = np.ones((4, 4), bool)
    soft = np.full((4, 4), 0.1)
    with pytest.raises(ValueError, match=r"target mask is not binary: 16 values are neither 0 nor 1 \(e\.g\. 0\.1.*binarize"):
        metrics.iou(ones, soft)
    with pytest.raises(ValueError, match="mask is not binary"):
        metrics.iou_curve(torch.rand(4, 4), np.full((8, 8), 0.1))
    png = np.zeros((4, 4), np.uint8)
    png[:2] = 255
    with pytest.raises(ValueError, match=r"0/255 \(an 8-bit image\).*png > 127"):
        metrics.iou(ones, png)
    assert metrics.iou(ones, png > 127) == 0.5
    # exact 0/1 masks of any numeric dtype are read as masks
    half = np.zeros((4, 4))
    half[:2] = 1
    for dtype in (np.uint8, np.int64, np.float16, np.float32):
        assert metrics.iou(ones, half.astype(dtype)) == 0.5
    assert metrics.iou(torch.ones(4, 4, dtype=torch.float16), torch.from_numpy(half)) == 0.5
