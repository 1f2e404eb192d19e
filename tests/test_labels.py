"""Labels from heatmaps: round trips mask → polygon → COCO/YOLO → mask on rendered shapes."""


import numpy as np
import pytest
import torch
from PIL import Image

from daamlib import labels as LB
from daamlib.metrics import iou
from daamlab.toyworld import labels as L
from daamlab.toyworld.render import render_scene


def rendered_objects():
    for index, name in enumerate(L.MAIN_CLASSES):
        for seed in range(3):
            scene = render_scene(name, seed)
            for component in LB.instances(scene.mask(name)):
                if component.sum() >= 30:
                    yield name, component


def test_polygon_round_trip_keeps_rendered_shapes():
    scores = [iou(LB.polygons_to_mask(LB.mask_to_polygons(mask), mask.shape), mask) for _, mask in rendered_objects()]
    assert len(scores) >= 12 and min(scores) >= 0.95, min(scores)


def test_coco_export_loads_with_pycocotools_and_decodes_to_the_masks(tmp_path):
    from pycocotools.coco import COCO

    objects = list(rendered_objects())[:8]
    images = [LB.LabelledImage(f"{i}.png", 128, 128, [obj]) for i, obj in enumerate(objects)]
    path = LB.write_coco(tmp_path / "instances.json", images, list(L.MAIN_CLASSES))
    coco = COCO(str(path))
    assert len(coco.getAnnIds()) == len(objects)
    for annotation in coco.loadAnns(coco.getAnnIds()):
        name, mask = objects[annotation["image_id"] - 1]
        assert coco.loadCats(annotation["category_id"])[0]["name"] == name
        assert iou(coco.annToMask(annotation).astype(bool), mask) >= 0.95
        x, y, w, h = annotation["bbox"]
        rows, cols = np.nonzero(mask)
        assert (x, y, w, h) == (cols.min(), rows.min(), cols.max() - cols.min() + 1, rows.max() - rows.min() + 1)


def test_yolo_lines_are_normalised_polygons_of_the_class(tmp_path):
    name, mask = next(rendered_objects())
    image = LB.LabelledImage("scene.png", 128, 128, [(name, mask)])
    LB.write_yolo(tmp_path, [image], list(L.MAIN_CLASSES))
    line = (tmp_path / "scene.txt").read_text().splitlines()[0].split()
    assert int(line[0]) == L.MAIN_CLASSES.index(name)
    polygon = np.array(line[1:], dtype=float).reshape(-1, 2) * 128
    assert iou(LB.polygons_to_mask([polygon], mask.shape), mask) >= 0.95
    assert (tmp_path / "classes.txt").read_text().splitlines() == list(L.MAIN_CLASSES)


def test_thresholds_are_explicit_and_checked():
    heatmap = torch.zeros(8, 8)
    heatmap[2:5, 2:5] = 1.0
    fixed = LB.heatmap_to_mask(heatmap, (16, 16), "fixed", tau=0.5)
    otsu = LB.heatmap_to_mask(heatmap, (16, 16), "otsu")
    assert fixed.shape == (16, 16) and fixed[6, 6] and not fixed[0, 0]
    assert iou(fixed, otsu) > 0.8
    with pytest.raises(ValueError, match="needs tau"):
        LB.heatmap_to_mask(heatmap, (16, 16), "fixed")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        LB.heatmap_to_mask(heatmap, (16, 16), "fixed", tau=1.5)
    with pytest.raises(ValueError, match="'fixed' or 'otsu'"):
        LB.heatmap_to_mask(heatmap, (16, 16), "mean")


def test_semantic_png_marks_uncertain_pixels(tmp_path):
    car = np.array([[0.9, 0.5, 0.1]])
    person = np.array([[0.2, 0.3, 0.05]])
    label_map = LB.semantic_map({L.CAR: car, L.PERSON: person}, sure=0.6, unsure=0.2)
    assert label_map.tolist() == [[L.CAR, LB.UNCERTAIN, LB.BACKGROUND]]
    path = LB.write_semantic_png(tmp_path / "labels.png", label_map)
    stored = Image.open(path)
    assert stored.mode == "P" and np.asarray(stored).tolist() == label_map.tolist()
    with pytest.raises(ValueError, match="must not exceed"):
        LB.semantic_map({L.CAR: car}, sure=0.2, unsure=0.6)


def test_cleaning_removes_specks_and_fills_holes():
    mask = np.zeros((32, 32), bool)
    mask[5:20, 5:20] = True
    mask[10, 10] = False  # a hole
    mask[28, 28] = True  # a speck
    cleaned = LB.clean_mask(mask, min_area=4)
    assert cleaned[10, 10] and not cleaned[28, 28] and cleaned[5:20, 5:20].all()
