"""Mask review: the heatmap's prompt, re-prompting with points, accept / reject saved and resumed."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from daamlib import daam
from daamlab.experiments import build_dataset
from daamlab.review import DECISIONS_FILE, MaskReview
from daamlab.sam import SamSegmenter, heatmap_prompt
from daamlab.review import sam_masks
from pipelines import tiny_pipeline

pytest.importorskip("ipywidgets")


class BoxSegmenter:
    """A stand-in for SAM with known output: the box, with 3x3 squares set at object / cleared at background points."""

    def __init__(self):
        self.calls = []

    def __call__(self, image, box, points, labels):
        self.calls.append((np.array(box), np.array(points), np.array(labels)))
        mask = np.zeros(image.shape[:2], bool)
        x0, y0, x1, y1 = np.round(box).astype(int)
        mask[y0 : y1 + 1, x0 : x1 + 1] = True
        for (x, y), label in zip(np.round(points).astype(int), labels):
            mask[max(y - 1, 0) : y + 2, max(x - 1, 0) : x + 2] = bool(label)
        return mask


@pytest.fixture()
def dataset(tmp_path):
    return build_dataset(tiny_pipeline(), tmp_path / "dataset", ["car", "person"], [0, 1], num_inference_steps=2,
                         progress=False)


def test_heatmap_prompt_boxes_the_thresholded_region():
    heatmap = torch.zeros(8, 8)
    heatmap[2:4, 5:7] = 1.0
    heatmap[3, 6] = 2.0
    box, point = heatmap_prompt(heatmap, (8, 8, 3), tau=0.4)
    assert box.tolist() == [5, 2, 6, 3] and point.tolist() == [[6, 3]]


def test_review_prompts_from_the_heatmap_and_reprompts_with_points(dataset):
    segmenter = BoxSegmenter()
    review = MaskReview(dataset, segmenter, tau=0.4)
    row = dataset.manifest.iloc[0]
    box, peak = heatmap_prompt(daam(dataset.record(row), row["word"]), dataset.image(row).shape, 0.4)
    sent_box, sent_points, sent_labels = segmenter.calls[-1]
    assert np.array_equal(sent_box, box) and np.array_equal(sent_points, peak) and sent_labels.tolist() == [1]
    x, y = int(box[0]), int(box[1])
    review.add_point(x, y, positive=False)
    assert segmenter.calls[-1][2].tolist() == [1, 0]
    assert not review.current_mask[y, x] and np.array_equal(review.current_mask, segmenter(review.image, *review.prompt()))
    with pytest.raises(ValueError, match="outside"):
        review.add_point(10_000, 0)
    review.reset()
    assert review.decision.points == [] and len(segmenter.calls[-1][1]) == 1


def test_accept_reject_are_saved_and_a_new_review_resumes(dataset):
    review = MaskReview(dataset, BoxSegmenter())
    review.add_point(1, 1, positive=True)
    accepted = review.current_mask.copy()
    review.accept()
    first, second = dataset.manifest.iloc[0], dataset.manifest.iloc[1]
    assert np.array_equal(np.asarray(Image.open(dataset.directory / first["mask"])) > 127, accepted)
    assert review.index == 1
    review.widget.children  # the widget builds; its buttons drive the same actions
    review.buttons["reject"].click()
    assert not (dataset.directory / second["mask"]).exists()
    saved = json.loads((dataset.directory / DECISIONS_FILE).read_text())
    assert saved[first["name"]] == {"status": "accepted", "points": [[1.0, 1.0]], "labels": [1]}
    assert saved[second["name"]]["status"] == "rejected"

    resumed = MaskReview(dataset, BoxSegmenter())
    assert resumed.index == 2 and resumed.counts == {"accepted": 1, "rejected": 1, "pending": 2}
    resumed.widget
    assert "1 accepted, 1 rejected, 2 pending" in resumed.status.value


def tiny_sam():
    """SAM's own modules, scaled down (256 px input, 2-layer encoder) and randomly initialised."""
    from functools import partial

    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    torch.manual_seed(0)
    size, patch, dim = 256, 16, 32
    encoder = ImageEncoderViT(img_size=size, patch_size=patch, embed_dim=dim, depth=2, num_heads=2, out_chans=dim,
                              norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True, window_size=4,
                              global_attn_indexes=(1,))
    prompts = PromptEncoder(embed_dim=dim, image_embedding_size=(size // patch, size // patch), input_image_size=(size, size),
                            mask_in_chans=8)
    decoder = MaskDecoder(num_multimask_outputs=3, transformer=TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=64, num_heads=2),
                          transformer_dim=dim, iou_head_depth=2, iou_head_hidden_dim=32)
    return Sam(image_encoder=encoder, prompt_encoder=prompts, mask_decoder=decoder).eval()


def test_sam_segmenter_runs_the_real_predictor(dataset):
    pytest.importorskip("segment_anything")
    segmenter = SamSegmenter(tiny_sam())
    encoded = []
    original = segmenter.predictor.set_image
    segmenter.predictor.set_image = lambda image: (encoded.append(1), original(image))
    proposals = sam_masks(dataset, segmenter)
    first = dataset.manifest.iloc[0]
    image = dataset.image(first)
    assert proposals[first["name"]].shape == image.shape[:2] and proposals[first["name"]].dtype == bool
    assert len(encoded) == len(dataset.manifest)
    segmenter(image, np.array([0, 0, 5, 5]), np.array([[2, 2]]), np.array([1]))
    segmenter(image, np.array([0, 0, 5, 5]), np.array([[2, 2], [4, 4]]), np.array([1, 0]))
    assert len(encoded) == len(dataset.manifest) + 1  # re-prompting one image encodes it once
    assert dataset.has_masks()
