"""Token optimization recovers a hidden target token: masks are thresholded maps of a secret
vector x*, so the ground truth is known and held-out records test transfer."""

import numpy as np
import pytest
import torch

import daamlib
from daamlib.metrics import iou_curve
from daamlib.methods.linear import word_vector
from daamlib.optimize import OptimizedTokens, token_loss

PROMPT = "a car in an urban environment"


@pytest.fixture(scope="module")
def records(pipe):
    return [daamlib.generate(pipe, PROMPT, seed=seed, num_inference_steps=2, linear=True, queries=True,
                             query_dtype=torch.float32)[0] for seed in range(4)]


def image_mask(heatmap, image_size):
    up = torch.nn.functional.interpolate(heatmap[None, None], size=image_size, mode="bicubic")[0, 0]
    return (up >= up.median()).numpy()


def test_linear_token_optimization_lowers_loss_and_transfers(records, tmp_path):
    secret = torch.randn(32, generator=torch.Generator().manual_seed(7))
    masks = [image_mask(daamlib.linear(r, secret), r.image_size) for r in records]
    train, test = records[:2], records[2:]
    tokens = daamlib.optimize_tokens(train, masks[:2], init="car", epochs=150, learning_rate=0.1, progress=False)
    assert tokens.history[-1] < 0.8 * tokens.history[0]

    def best_iou(vector, record, mask):
        return iou_curve(daamlib.linear(record, vector), mask).max()

    before = np.mean([best_iou("car", r, m) for r, m in zip(test, masks[2:])])
    after = np.mean([best_iou(tokens.object_vector, r, m) for r, m in zip(test, masks[2:])])
    assert after > before + 0.05, (before, after)

    path = tokens.save(tmp_path / "car_token")
    loaded = OptimizedTokens.load(path, expected_model_id=tokens.model_id)
    assert torch.equal(loaded.vectors, tokens.vectors) and loaded.history == tokens.history
    with pytest.raises(ValueError, match="do not transfer"):
        OptimizedTokens.load(path, expected_model_id="another/model")


@pytest.mark.parametrize("loss", ["bce"])
def test_linear_with_bce(records, loss):
    secret = torch.randn(32, generator=torch.Generator().manual_seed(3))
    masks = [image_mask(daamlib.linear(r, secret), r.image_size) for r in records[:2]]
    tokens = daamlib.optimize_tokens(records[:2], masks, init="car", loss=loss, epochs=60, learning_rate=0.1, progress=False)
    assert tokens.history[-1] < tokens.history[0]


@pytest.mark.parametrize("loss", ["ce", "softmax_ce"])
def test_two_token_softmax_optimization(records, pipe, loss):
    secret = torch.randn(2, 32, generator=torch.Generator().manual_seed(5))

    def mask(record):
        maps = daamlib.openvocab_maps(record, secret, pipe)
        share = torch.nn.functional.interpolate((maps[0] / maps.sum(0))[None, None], size=record.image_size)[0, 0]
        return (share > share.median()).numpy()

    masks = [mask(r) for r in records]
    tokens = daamlib.optimize_tokens(records[:2], masks[:2], init="car", variant="softmax", loss=loss, epochs=60,
                                     learning_rate=0.1, pipe=pipe, progress=False)
    assert tokens.names == ["car", "background"] and tokens.vectors.shape == (2, 32)
    assert tokens.history[-1] < 0.95 * tokens.history[0]

    def held_out_iou(vectors):
        values = []
        for record, target in zip(records[2:], masks[2:]):
            maps = daamlib.openvocab_maps(record, vectors, pipe)
            values.append(iou_curve((maps[0] / maps.sum(0)).detach(), target).max())
        return np.mean(values)

    start = torch.stack([word_vector(records[0], w) for w in ("car", "<sot>")])
    assert held_out_iou(tokens.vectors) > held_out_iou(start)


def test_two_token_cross_entropy_is_eq_3_11():
    """The pair's "ce" is the sum over tokens of eq. 3.10 on each min-max scaled map: object against the mask,
    background against its complement; "softmax_ce" is the per-pixel share cross-entropy."""
    generator = torch.Generator().manual_seed(0)
    maps = torch.rand(2, 4, 5, generator=generator) + 0.1
    target = (torch.rand(4, 5, generator=generator) > 0.6).float()

    def eq_3_10(heatmap, mask):
        scaled = (heatmap - heatmap.min()) / (heatmap.max() - heatmap.min() + 1e-6)
        return -(mask * torch.log(scaled.clamp_min(1e-6))).sum() / mask.sum()

    expected = eq_3_10(maps[0], target) + eq_3_10(maps[1], 1 - target)
    torch.testing.assert_close(token_loss(maps, target, "ce"), expected)
    torch.testing.assert_close(token_loss(maps[:1], target, "ce"), eq_3_10(maps[0], target))
    share = maps[0] / maps.sum(0)
    expected_share = -(target * share.log() + (1 - target) * (1 - share).log()).mean()
    torch.testing.assert_close(token_loss(maps, target, "softmax_ce"), expected_share)


def test_bad_optimization_inputs(records, pipe):
    wrong = np.zeros((8, 8), bool)
    with pytest.raises(ValueError, match="image resolution"):
        daamlib.optimize_tokens(records[:1], [wrong], init="car", epochs=1, progress=False)
    with pytest.raises(ValueError, match="one mask per record"):
        daamlib.optimize_tokens(records[:2], [wrong], init="car", epochs=1, progress=False)
    with pytest.raises(ValueError, match="needs pipe"):
        daamlib.optimize_tokens(records[:1], [np.zeros(records[0].image_size, bool)], init="car", variant="softmax")
