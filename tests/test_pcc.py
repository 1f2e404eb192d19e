"""PCC self-attention segmentation: its pieces on known inputs, and a run on a traced generation."""

import numpy as np
import pytest

import daamlib
from daamlib.labels import BACKGROUND, UNCERTAIN
from daamlib.pcc import PCCConfig, classify_segments, pcc_segment, refine, self_attention_features, split_components


def test_disconnected_clusters_are_split():
    segments = np.array([[0, 0, 1, 0], [0, 0, 1, 0]])
    assert split_components(segments).max() == 3


def test_classification_votes_and_marks_ties_uncertain():
    car = np.zeros((4, 4))
    car[:, :2] = 1.0  # the car's map covers the left half
    background = 1 - car
    left_right = np.array([[1, 1, 2, 2]] * 4)
    labels = classify_segments([left_right], {13: car}, background, PCCConfig(thresholds=(0.5,)))
    assert (labels[:, :2] == 13).all() and (labels[:, 2:] == BACKGROUND).all()
    # one cluster over everything overlaps car and background equally (IoU 0.5): the tie goes to the
    # background, so the left half gets one car vote and one background vote → uncertain
    everything = np.ones((4, 4), int)
    labels = classify_segments([left_right, everything], {13: car}, background, PCCConfig(thresholds=(0.5,)))
    assert (labels[:, :2] == UNCERTAIN).all() and (labels[:, 2:] == BACKGROUND).all()


def test_refinement_follows_colour_regions():
    image = np.zeros((8, 8, 3), np.uint8)
    image[:, 4:] = 255
    latent = np.array([[13, 0], [13, 0]], np.uint8)
    refined = refine(latent, image, PCCConfig(refine_clusters=2))
    assert (refined[:, :4] == 13).all() and (refined[:, 4:] == BACKGROUND).all()


def test_pcc_runs_on_a_traced_generation(pipe):
    (record,) = daamlib.generate(pipe, "a car in an urban environment", seed=0, num_inference_steps=3,
                                 height=32, width=32, self_attention=True, queries=True)
    features = self_attention_features(record)
    assert features.shape[:2] == record.latent_size
    latent, full = pcc_segment(record, {13: "car"}, pipe, PCCConfig(cluster_counts=(2, 3), refine_clusters=4))
    assert latent.shape == record.latent_size and full.shape == record.image.shape[:2]
    assert set(np.unique(full)) <= {BACKGROUND, 13, UNCERTAIN}
    with pytest.raises(KeyError, match="self_attention=True"):
        self_attention_features(daamlib.generate(pipe, "a car", seed=0, num_inference_steps=2, height=32, width=32)[0])


def test_pcc_on_toy_generations_beats_the_trivial_baselines(tmp_path):
    """Semantic mIoU against the annotator, pooled over 2 seeds x 4 classes of the thesis prompt (30 steps)."""
    from daamlab.experiments import build_dataset
    from daamlab.experiments.dataset import annotate_toy_dataset
    from daamlab.experiments.segmentation import SINGLE_CLUSTER, baseline_labels, pcc_labels, semantic_scores, truth_labels
    from daamlib.metrics import iou
    from daamlab.toyworld import labels as L
    from daamlab.toyworld.annotator import Annotator, find_annotator

    toy = daamlib.load_pipeline(device="cpu", progress_bar=False)
    classes = list(L.MAIN_CLASSES)
    dataset = build_dataset(toy, tmp_path / "pcc", classes, range(2), self_attention=True,
                            contexts=[L.CLASS_WORD[name] for name in classes], progress=False)
    annotate_toy_dataset(dataset, Annotator.from_pretrained(find_annotator(None)))
    predictions = {"PCC": pcc_labels(dataset, toy, progress=False),
                   "single cluster": pcc_labels(dataset, toy, SINGLE_CLUSTER, progress=False),
                   **baseline_labels(dataset)}
    table = semantic_scores(dataset, predictions)
    # the pooled score, recomputed label by label from the stacked maps
    truth = truth_labels(dataset)
    for label, name in enumerate(["background", *classes]):
        assert table.loc["PCC", name] == pytest.approx(100 * iou(predictions["PCC"] == label, truth == label))
    assert table.loc["all background", "mIoU"] == pytest.approx(100 * np.mean(truth == 0) / (1 + len(classes)))
    assert table.loc["PCC", "mIoU"] > table.loc["all background", "mIoU"] + 2, table
    assert table.loc["PCC", "mIoU"] > table.loc["single cluster", "mIoU"] + 2, table
