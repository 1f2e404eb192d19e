"""Every notebook runs headlessly with the toy-smoke preset, and the numbers it records check out."""

import json
import os
import stat

import numpy as np
import pytest
from PIL import Image

from daamlib import binarize, daam, iou
from daamlab.experiments import ThesisDataset
from daamlib.metrics import thresholds, to_mask_resolution
from daamlab.runs import NotebookFailed, load_preset, run_preset

pytest.importorskip("papermill")


RUN_UMASK = 0o002  # neither the usual 022 nor the 0600 that a private writer would give


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    previous = os.umask(RUN_UMASK)  # the kernels inherit it
    try:
        return run_preset("toy-smoke", tmp_path_factory.mktemp("toy-smoke"), progress=False)
    finally:
        os.umask(previous)


def test_every_file_of_the_run_honours_the_umask(run_dir):
    """Executed notebooks, report, results, figures, dataset, records and tokens: 0664 files, 0775 folders."""
    wrong = {str(path.relative_to(run_dir)): oct(stat.S_IMODE(path.stat().st_mode)) for path in run_dir.rglob("*")
             if stat.S_IMODE(path.stat().st_mode) != (0o777 if path.is_dir() else 0o666) & ~RUN_UMASK}
    assert wrong == {}
    assert any(path.suffix == ".safetensors" for path in run_dir.rglob("*"))


def results(run_dir, notebook):
    metadata = json.loads((run_dir / f"{notebook}.ipynb").read_text())["metadata"]["daamlib"]
    assert metadata["status"] == "ok"
    return metadata["results"]


def test_every_notebook_ran_and_the_report_lists_them(run_dir):
    preset = load_preset("toy-smoke")
    report = (run_dir / "report.md").read_text()
    for notebook in preset["notebooks"]:
        results(run_dir, notebook)
        assert f"## {notebook}" in report
    assert (run_dir / "figures" / "02_curves.png").exists()


def test_dataset_fidelity_matches_its_masks(run_dir):
    recorded = results(run_dir, "01_dataset")
    dataset = ThesisDataset.open(run_dir / "dataset")
    assert recorded["images"] == len(dataset.manifest) == 12
    for class_name, value in recorded["prompt_fidelity"].items():
        shares = [(np.asarray(Image.open(dataset.directory / row["mask"])) > 127).mean()
                  for _, row in dataset.rows(class_name).iterrows()]
        assert value == pytest.approx(np.mean(np.array(shares) >= 0.01))


def test_daam_baseline_numbers_equal_a_direct_per_threshold_computation(run_dir):
    recorded = results(run_dir, "02_daam_baseline")
    dataset = ThesisDataset.open(run_dir / "dataset")
    taus = thresholds()
    for class_name in dataset.classes:
        per_image = []
        for _, row in dataset.rows(class_name).iterrows():
            mask = dataset.mask(row)
            heatmap = to_mask_resolution(daam(dataset.record(row), row["word"]), mask.shape)
            per_image.append([iou(binarize(heatmap, tau), mask) for tau in taus])
        assert recorded["max_miou_percent"][class_name] == pytest.approx(100 * np.mean(per_image, axis=0).max(), abs=1e-4)
    assert recorded["max_miou_percent"]["All"] == pytest.approx(np.mean([recorded["max_miou_percent"][c] for c in dataset.classes]))


def test_later_notebooks_record_numbers_in_range(run_dir):
    linear = results(run_dir, "03_linear_daam")["max_miou_percent"]
    optimized = results(run_dir, "04_token_optimization")["max_miou_percent"]
    analysis = results(run_dir, "05_layer_timestep_analysis")
    summary = results(run_dir, "06_summary")
    for value in [*linear.values(), *[v for table in optimized.values() for v in table.values()]]:
        assert 0 <= value <= 100
    assert set(optimized) == {f"{v} {n} {s}" for v in ("linear", "softmax") for n in (1, 2) for s in ("train", "test")}
    assert 0 <= analysis["all_layers_all_steps_max_miou_percent"] <= 100
    assert set(summary["max_miou_percent"]) == {"DAAM (not optimized)", "Linear DAAM (not optimized)", "DAAM (optimized)",
                                        "Linear DAAM (optimized)"}
    # the optimized Linear DAAM column is the 2-image linear token's test score
    assert summary["max_miou_percent"]["Linear DAAM (optimized)"]["All"] == pytest.approx(optimized["linear 2 test"]["All"], abs=0.051)


def test_a_failing_notebook_stops_with_a_resume_command_and_resume_skips_finished_ones(tmp_path, run_dir):
    preset = tmp_path / "broken.yaml"
    preset.write_text("notebooks: [00_quickstart, 02_daam_baseline]\nparameters: {device: cpu, num_inference_steps: 2}\n")
    with pytest.raises(NotebookFailed, match="--resume"):  # 02 needs the dataset of 01
        run_preset(preset, tmp_path / "run", progress=False)
    assert results(tmp_path / "run", "00_quickstart")
    (tmp_path / "run" / "dataset").symlink_to(run_dir / "dataset")
    (tmp_path / "run" / "curves").mkdir(exist_ok=True)
    stamp = (tmp_path / "run" / "00_quickstart.ipynb").stat().st_mtime
    run_preset(preset, tmp_path / "run", progress=False)
    assert (tmp_path / "run" / "00_quickstart.ipynb").stat().st_mtime == stamp
    assert results(tmp_path / "run", "02_daam_baseline")["max_miou_percent"]


def test_unknown_preset_lists_the_available_ones():
    with pytest.raises(FileNotFoundError, match="toy-full"):
        load_preset("no-such-preset")


def test_label_export_counts_match_the_files(run_dir):
    from pycocotools.coco import COCO

    from daamlab.datagen import merged_manifest
    from daamlib.labels import UNCERTAIN

    recorded = results(run_dir, "07_labels_and_export")
    manifest = merged_manifest(run_dir / "generated")
    assert recorded["images"] == len(manifest) == 2
    coco = COCO(str(run_dir / "generated" / "annotations" / "instances.json"))
    assert recorded["coco_annotations"] == len(coco.getAnnIds()) == sum(recorded["instances_per_category"].values())
    labels = np.stack([np.asarray(Image.open(run_dir / "generated" / path)) for path in manifest["labels"]])
    assert recorded["labelled_percent"] == pytest.approx(100 * np.mean((labels > 0) & (labels != UNCERTAIN)))


def test_pcc_scores_equal_a_direct_computation(run_dir):
    scores = results(run_dir, "08_pcc_segmentation")
    recorded = scores["binary_miou_percent"]
    dataset = ThesisDataset.open(run_dir / "pcc_dataset")
    pcc_maps, truth_maps = [], []
    for class_name in dataset.classes:
        pcc, background = [], []
        for _, row in dataset.rows(class_name).iterrows():
            truth = dataset.mask(row)
            label_map = np.asarray(Image.open(dataset.directory / "pcc" / f"{row['name']}.png"))
            predicted = label_map == 1 + dataset.classes.index(class_name)
            pcc_maps.append(label_map)
            truth_maps.append(np.where(truth, 1 + dataset.classes.index(class_name), 0))
            both, either = (predicted & truth).sum(), (predicted | truth).sum()
            rest, rest_union = (~predicted & ~truth).sum(), (~predicted | ~truth).sum()
            pcc.append(50 * ((both / either if either else 1) + (rest / rest_union if rest_union else 1)))
            background.append(50 * ((0 if truth.any() else 1) + (1 - truth.mean())))
        assert recorded["PCC"][class_name] == pytest.approx(np.mean(pcc))
        assert recorded["all background"][class_name] == pytest.approx(np.mean(background))
    # semantic mIoU: IoU per label with every image's pixels pooled
    pcc_maps, truth_maps = np.stack(pcc_maps), np.stack(truth_maps)
    semantic = scores["semantic_miou_percent"]["PCC"]
    for label, name in enumerate(["background", *dataset.classes]):
        union = ((pcc_maps == label) | (truth_maps == label)).sum()
        if union:
            assert semantic[name] == pytest.approx(100 * ((pcc_maps == label) & (truth_maps == label)).sum() / union)


def test_downstream_study_records_every_source(run_dir):
    table = results(run_dir, "09_downstream_utility")["iou_percent"]
    assert set(table) == {"DAAM", "optimized token (linear)", "PCC", "rendered, exact labels"}
    for scores in table.values():
        per_class = [scores[c] for c in ("car", "person", "traffic light", "rider") if scores[c] == scores[c]]  # NaN: class absent
        assert all(0 <= value <= 100 for value in per_class)
        assert scores["mean"] == pytest.approx(np.mean(per_class))


def test_rendered_scene_scores_equal_a_direct_per_threshold_computation(run_dir):
    from daamlab.experiments.rendered import load_attributions, scene_class, scene_mask
    from daamlab.toyworld.labels import CLASS_WORD

    recorded = results(run_dir, "10_rendered_scenes")
    scenes, records = load_attributions(run_dir / "rendered")
    assert recorded["scenes"] == len(records) == 8 and [r.meta.timesteps for r in records] == [[300.0]] * 8
    per_class = {}
    for index, record in enumerate(records):
        mask = scene_mask(scenes, index)
        heatmap = to_mask_resolution(daam(record, CLASS_WORD[scene_class(scenes, index)]), mask.shape)
        per_class.setdefault(scene_class(scenes, index), []).append([iou(binarize(heatmap, tau), mask) for tau in thresholds()])
    for class_name, per_image in per_class.items():
        assert recorded["max_miou_percent"]["DAAM"][class_name] == pytest.approx(100 * np.mean(per_image, axis=0).max(), abs=1e-4)
    assert set(recorded["max_miou_percent"]) == {"DAAM", "Linear DAAM", "open-vocabulary"}
