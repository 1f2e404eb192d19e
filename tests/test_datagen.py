"""Templated prompt sets and sharded, resumable dataset generation (kill -9, then resume)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from daamlab.datagen import all_samples, merged_manifest, parse_shard, shard_samples
from daamlib.labels import UNCERTAIN
from daamlab.prompts import PromptSet

PROMPTS = {
    "seeds_per_prompt": 2,
    "templates": [{"template": "a {object} in a city street, {weather}", "words": ["object"],
                   "attributes": {"object": ["car", "person"], "weather": ["sunny", "rainy"]}}],
}


def test_templates_expand_as_a_product_with_their_own_seeds():
    specs = PromptSet.from_dict(PROMPTS).expand()
    assert [s.prompt for s in specs] == ["a car in a city street, sunny", "a car in a city street, rainy",
                                         "a person in a city street, sunny", "a person in a city street, rainy"]
    assert [s.seeds for s in specs] == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert specs[2].words == ("person",) and specs[2].attributes == {"object": "person", "weather": "sunny"}
    sampled = PromptSet.from_dict({"templates": [{**PROMPTS["templates"][0], "mode": "sample", "samples": 5, "seed": 3}]})
    assert len(sampled.expand()) == 5 and sampled.expand() == sampled.expand()


@pytest.mark.parametrize("template, message", [
    ({"template": "a {object} at {time}", "attributes": {"object": ["car"]}}, r"uses \['time'\]"),
    ({"template": "a {object}", "attributes": {"object": []}}, "empty"),
    ({"template": "a {object}", "attributes": {"object": ["car"]}, "colour": "red"}, "unknown keys"),
    ({"template": "a {object}", "attributes": {"object": ["car"]}, "mode": "sample"}, "needs samples"),
])
def test_bad_prompt_sets_fail_clearly(template, message):
    with pytest.raises(ValueError, match=message):
        PromptSet.from_dict({"templates": [template]})


def test_shards_cover_every_sample_exactly_once():
    samples = all_samples(PromptSet.from_dict(PROMPTS))
    for count in (1, 2, 3, 5):
        indices = sorted(s.index for shard in range(count) for s in shard_samples(samples, shard, count))
        assert indices == list(range(len(samples)))
    assert parse_shard("1/4") == (1, 4)
    with pytest.raises(ValueError, match="outside"):
        parse_shard("4/4")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from daamlab.testing.unet import tiny_random_pipeline

    root = tmp_path_factory.mktemp("datagen")
    tiny_random_pipeline().save_pretrained(root / "model")
    (root / "prompts.yaml").write_text(yaml.safe_dump(PROMPTS))
    return root


def run_cli(root, out, *extra, wait=True):
    command = [sys.executable, "-m", "daamlab.datagen", str(root / "prompts.yaml"), "--out", str(out),
               "--model", str(root / "model"), "--device", "cpu", "--num-inference-steps", "3", *extra]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if wait:
        assert process.wait(timeout=600) == 0, process.stderr.read().decode()[-2000:]
    return process


def test_two_shard_processes_build_the_whole_dataset(setup):
    out = setup / "sharded"
    processes = [run_cli(setup, out, "--shard", f"{i}/2", wait=False) for i in range(2)]
    for process in processes:
        assert process.wait(timeout=600) == 0, process.stderr.read().decode()[-2000:]
    manifest = merged_manifest(out)
    assert manifest["index"].tolist() == list(range(8))
    labels = np.asarray(Image.open(out / manifest.loc[0, "labels"]))
    assert set(np.unique(labels)) <= {0, 1, UNCERTAIN} and (labels == 1).any()


def test_kill_9_then_resume_gives_the_same_dataset(setup):
    reference = setup / "reference"
    run_cli(setup, reference)
    interrupted = setup / "interrupted"
    process = run_cli(setup, interrupted, wait=False)
    deadline = time.time() + 300
    while len(list(interrupted.glob("samples/*/meta.json"))) < 3 and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    partial = pd.read_parquet(next(interrupted.glob("manifest-*.parquet")))
    for _, row in partial.iterrows():  # the manifest never lists an unfinished sample
        assert (interrupted / Path(row["image"]).parent / "meta.json").exists()
    assert len(partial) < 8
    run_cli(setup, interrupted)
    expected, resumed = merged_manifest(reference), merged_manifest(interrupted)
    pd.testing.assert_frame_equal(expected, resumed)
    for _, row in expected.iterrows():
        for column in ("image", "labels"):
            assert np.array_equal(np.asarray(Image.open(reference / row[column])), np.asarray(Image.open(interrupted / row[column])))


def test_export_writes_coco_and_yolo_matching_the_label_pngs(setup):
    from pycocotools.coco import COCO

    from daamlab.datagen import export_labels, labelled_images
    from daamlib.labels import clean_mask, instances, mask_to_polygons

    out = setup / "exported"
    run_cli(setup, out, "--export", "coco", "yolo")
    images, categories = labelled_images(out)
    assert categories == ["car", "person"]
    coco = COCO(str(out / "annotations" / "instances.json"))
    manifest = merged_manifest(out)
    for image_id, (_, row) in enumerate(manifest.iterrows(), 1):
        labels = np.asarray(Image.open(out / row["labels"]))
        expected = instances(clean_mask(labels == 1))  # the prompt's one word has label 1
        annotations = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
        assert len(annotations) == len(expected)
        for annotation, mask in zip(annotations, expected):
            assert coco.loadCats(annotation["category_id"])[0]["name"] == row["words"][0]
            decoded = coco.annToMask(annotation).astype(bool)
            assert (decoded & mask).sum() / (decoded | mask).sum() >= 0.8  # polygons approximate the pixels
        yolo_lines = (out / "yolo" / Path(row["image"]).with_suffix(".txt")).read_text().splitlines()
        assert len(yolo_lines) == sum(len(mask_to_polygons(mask)) for mask in expected) and all(line.split()[0] == str(categories.index(row["words"][0])) for line in yolo_lines)
    assert (out / "yolo" / "classes.txt").read_text().split() == categories
    with pytest.raises(ValueError, match="unknown export formats"):
        export_labels(out, ["voc"])
