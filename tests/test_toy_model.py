"""The shipped toy model: loads offline by the hub code path, generates with a record, and its
annotator reaches its accuracy on held-out rendered scenes."""

import numpy as np

import daamlib
from daamlib.models import toy_model_dir
from daamlab.toyworld import labels as L
from daamlab.toyworld.annotator import annotate, dataset_iou
from daamlab.toyworld.dataset import HELD_OUT_FIRST_SEED, render_scene_set


def test_the_embedded_model_loads_offline_and_generates_with_a_record(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = daamlib.load_pipeline(device="cpu", progress_bar=False)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    (record,) = daamlib.generate(pipe, "a car in an urban environment", seed=0, num_inference_steps=5, linear=True)
    assert record.image.shape == (size, size, 3)
    assert record.meta.model_id == str(toy_model_dir())
    assert len({layer.resolution for layer in record.cross_layers}) >= 3
    heatmap = daamlib.daam(record, "car")
    assert heatmap.shape == record.latent_size and float(heatmap.max()) > float(heatmap.min())
    assert pipe.tokenizer("a car").input_ids == [49406, 320, 1615, 49407]  # the real CLIP ids


def test_the_annotator_labels_held_out_scenes_accurately():
    image_size = daamlib.load_pipeline(device="cpu", progress_bar=False).vae.config.sample_size
    scenes = render_scene_set(40, image_size, first_seed=HELD_OUT_FIRST_SEED + 5000, progress=False)
    predicted = annotate(scenes.images)
    scores = dataset_iou(predicted, scenes.labels)
    assert set(scores) == set(L.MAIN_CLASSES)
    assert np.mean(list(scores.values())) >= 0.90, scores
