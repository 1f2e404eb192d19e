"""Bad and edge inputs of the research harness: the papermill runner (presets, --resume, path
parameters, attempts), atomic files and the umask, ground truth (mask names, SAM model types and
device) and the seeded downstream training."""

import json
import os
import stat

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from daamlab.experiments.dataset import ThesisDataset, ground_truth_source, import_masks, sample_name
from daamlib.io import write_text
from daamlab.io import write_json
from daamlab.runs import (NOTEBOOK_DIR, PRESET_DIR, load_preset, main, notebook_defaults, resolve_path, run_preset)


# -- io: files honour the umask ---------------------------------------------------------------------
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_files_get_0666_filtered_by_the_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        path = write_json(tmp_path / "a.json", {"x": 1})
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == mode
    assert json.loads(path.read_text()) == {"x": 1} and [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_a_failed_atomic_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    from daamlib.io import atomic_path

    write_text(tmp_path / "a.txt", "old")
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "a.txt") as temporary:
            temporary.write_text("half")
            raise RuntimeError("killed")
    assert (tmp_path / "a.txt").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]


# -- the runner, on tiny notebooks ------------------------------------------------------------------
def notebook(parameters: str, body: str) -> dict:
    def cell(source, tags=(), number=0):
        return {"cell_type": "code", "execution_count": None, "id": f"c{number}{len(tags)}", "metadata": {"tags": list(tags)},
                "outputs": [], "source": source}
    return {"cells": [cell(parameters, ["parameters"], 1), cell(body, (), 2)], "metadata": {"kernelspec": {
        "display_name": "Python 3", "language": "python", "name": "python3"}}, "nbformat": 4, "nbformat_minor": 5}


@pytest.fixture()
def notebooks(tmp_path):
    folder = tmp_path / "notebooks"
    folder.mkdir()
    (folder / "a.ipynb").write_text(json.dumps(notebook(
        'run_dir = "."\nmask_dir = None\nmodel = None\nvalue = 1',
        "import os\nfrom daamlab.runs import save_results\n"
        "save_results(run_dir, 'a', {'value': value, 'mask_dir': mask_dir, 'model': model, 'cwd': os.getcwd()})")))
    (folder / "b.ipynb").write_text(json.dumps(notebook(
        'run_dir = "."\nflag = ""',
        "import os\nfrom daamlab.runs import save_results\n"
        "assert os.path.exists(flag), 'flag missing'\nsave_results(run_dir, 'b', {'ok': 1})")))
    return folder


def write_preset(path, **content):
    path.write_text(yaml.safe_dump({"notebooks": ["a"], **content}))
    return path


def test_notebook_defaults_are_read_from_the_parameters_cell(notebooks):
    assert notebook_defaults(notebooks / "a.ipynb") == {"run_dir": ".", "mask_dir": None, "model": None, "value": 1}
    assert notebook_defaults(NOTEBOOK_DIR / "01_dataset.ipynb")["sam_model_type"] is None


@pytest.mark.parametrize("content, error, message", [
    ({"parameters": {"valeu": 2}}, ValueError, r"parameters \['valeu'\] are not declared"),
    ({"notebook_parameters": {"a": {"flag": "x"}}}, ValueError, r"a does not declare parameters \['flag'\]"),
    ({"notebook_parameters": {"b": {}}}, ValueError, "notebooks it does not run"),
    ({"notebooks": ["a", "zz"]}, FileNotFoundError, r"do not exist .*\['zz'\]"),
    ({"notebooks": []}, ValueError, "lists no notebooks"),
    ({"notebook": ["a"]}, ValueError, r"unknown keys \['notebook'\]"),
    ({"parameters": [1, 2]}, ValueError, "parameters of preset .* must be a mapping"),
])
def test_bad_presets_are_refused_before_running(tmp_path, notebooks, content, error, message):
    preset = write_preset(tmp_path / "p.yaml", **content)
    with pytest.raises(error, match=message):
        run_preset(preset, tmp_path / "run", progress=False, notebook_dir=notebooks)
    assert not (tmp_path / "run").exists()


def test_unknown_preset_and_broken_yaml(tmp_path):
    with pytest.raises(FileNotFoundError, match="available: .*toy-smoke"):
        load_preset("toy-smal")
    (tmp_path / "broken.yaml").write_text("notebooks: [a\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_preset(tmp_path / "broken.yaml")


def test_relative_paths_resolve_from_the_callers_directory_and_must_exist(tmp_path, notebooks):
    caller = tmp_path / "caller"
    (caller / "masks").mkdir(parents=True)
    (caller / "model").mkdir()
    preset = write_preset(tmp_path / "p.yaml", parameters={"mask_dir": "masks", "model": "model", "value": 3})
    run = run_preset(preset, tmp_path / "run", progress=False, notebook_dir=notebooks, cwd=caller)
    results = json.loads((run / "results" / "a.json").read_text())
    assert results["mask_dir"] == str(caller / "masks") and results["model"] == str(caller / "model")
    assert results["value"] == 3 and results["cwd"] == str(notebooks)  # the notebooks still run in their folder
    missing = write_preset(tmp_path / "q.yaml", parameters={"mask_dir": "no_masks"})
    with pytest.raises(FileNotFoundError, match=f"no directory at {caller / 'no_masks'}"):
        run_preset(missing, tmp_path / "run2", progress=False, notebook_dir=notebooks, cwd=caller)
    assert not (tmp_path / "run2").exists()


def test_model_parameter_directory_hub_id_or_missing_path(tmp_path):
    (tmp_path / "models" / "sd").mkdir(parents=True)
    assert resolve_path("model", "models/sd", tmp_path) == str(tmp_path / "models" / "sd")  # not a hub id
    assert resolve_path("model", "stabilityai/stable-diffusion-2-base", tmp_path) == "stabilityai/stable-diffusion-2-base"
    with pytest.raises(FileNotFoundError, match="no directory at"):
        resolve_path("model", "./models/missing", tmp_path)
    with pytest.raises(FileNotFoundError, match="no file at"):
        resolve_path("sam_checkpoint", "sam_vit_h_4b8939.pth", tmp_path)


def test_the_sd2_preset_fails_at_once_without_its_sam_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"sam_checkpoint 'sam_vit_h_4b8939.pth': no file at {tmp_path}"):
        run_preset("sd2-base-thesis", tmp_path / "run", progress=False, cwd=tmp_path)
    assert not (tmp_path / "run").exists()


def test_a_real_model_without_any_ground_truth_source_fails_before_generation(tmp_path):
    preset = tmp_path / "sd2.yaml"
    preset.write_text(yaml.safe_dump({"notebooks": ["00_quickstart", "01_dataset"],
                                      "parameters": {"model": "stabilityai/stable-diffusion-2-base"}}))
    with pytest.raises(ValueError, match=r"set mask_dir.* or from SAM .*set sam_checkpoint"):
        run_preset(preset, tmp_path / "run", progress=False, cwd=tmp_path)
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="no toy-world annotator"):
        ground_truth_source("stabilityai/stable-diffusion-2-base")
    assert ground_truth_source(None) == "annotator"  # the toy model ships its annotator


def test_resume_needs_an_existing_run_of_the_same_preset(tmp_path, notebooks, capsys):
    preset = write_preset(tmp_path / "p.yaml")
    with pytest.raises(FileNotFoundError, match="no such run directory"):
        run_preset(preset, tmp_path / "missing", progress=False, resume=True, notebook_dir=notebooks)
    assert not (tmp_path / "missing").exists()
    run = run_preset(preset, tmp_path / "run", progress=False, notebook_dir=notebooks)
    saved = (run / "preset.yaml").read_text()
    other = write_preset(tmp_path / "other.yaml", parameters={"value": 5})
    with pytest.raises(ValueError, match="made by preset 'p' .* differs from 'other'"):
        run_preset(other, run, progress=False, resume=True, notebook_dir=notebooks)
    assert (run / "preset.yaml").read_text() == saved
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a run directory"):
        run_preset(preset, tmp_path / "stuff", progress=False, resume=True, notebook_dir=notebooks)
    with pytest.raises(SystemExit):
        main(["toy-smoke", "--resume", str(tmp_path / "missing")])
    assert "no such run directory" in capsys.readouterr().err


def test_every_attempt_is_timed_and_the_report_gives_the_total(tmp_path, notebooks):
    from daamlab.runs import NotebookFailed

    flag = tmp_path / "flag"
    preset = write_preset(tmp_path / "p.yaml", notebooks=["a", "b"], notebook_parameters={"b": {"flag": str(flag)}})
    with pytest.raises(NotebookFailed, match="--resume"):
        run_preset(preset, tmp_path / "run", progress=False, notebook_dir=notebooks)
    flag.write_text("")
    run = run_preset(preset, tmp_path / "run", progress=False, resume=True, notebook_dir=notebooks)
    attempts = json.loads((run / "attempts.json").read_text())
    assert [a["status"] for a in attempts["a"]] == ["ok"] and [a["status"] for a in attempts["b"]] == ["failed", "ok"]
    metadata = json.loads((run / "b.ipynb").read_text())["metadata"]["daamlib"]
    assert metadata["attempts"] == attempts["b"]
    assert metadata["seconds"] == pytest.approx(sum(a["seconds"] for a in attempts["b"]), abs=0.11)
    report = (run / "report.md").read_text()
    assert "in 2 attempts (" in report and "failed" in report
    total = sum(a["seconds"] for runs in attempts.values() for a in runs)
    assert f"Total notebook time: {total / 60:.1f} min" in report


# -- ground truth: mask names -----------------------------------------------------------------------
@pytest.fixture()
def small_dataset(tmp_path):
    rows = []
    for class_name, seed in [("car", 0), ("traffic light", 3)]:
        name = sample_name(class_name, seed)
        (tmp_path / "ds" / "images").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "ds" / "images" / f"{name}.png")
        rows.append({"name": name, "class_name": class_name, "word": class_name, "seed": seed, "prompt": "",
                     "record": "", "image": f"images/{name}.png", "mask": f"masks/{name}.png"})
    return ThesisDataset(tmp_path / "ds", pd.DataFrame(rows))


def save_mask(folder, name, size=8):
    folder.mkdir(exist_ok=True)
    mask = np.zeros((size, size), np.uint8)
    mask[2:5, 2:5] = 255
    Image.fromarray(mask).save(folder / name)


def test_masks_named_otherwise_are_listed_and_nothing_is_imported(tmp_path, small_dataset):
    masks = tmp_path / "masks"
    save_mask(masks, "car-0000.png")
    save_mask(masks, "traffic light-3.png")  # the documented-looking but wrong name
    with pytest.raises(ValueError, match=r"Missing \(1\): traffic_light-0003.png\. Unexpected \(1\): traffic light-3.png"):
        import_masks(small_dataset, masks)
    assert small_dataset.missing_masks() == ["car-0000", "traffic_light-0003"]
    with pytest.raises(FileNotFoundError, match="2 of 2 samples .*car-0000.png, traffic_light-0003.png"):
        small_dataset.require_masks()
    (masks / "traffic light-3.png").rename(masks / "traffic_light-0003.png")
    assert import_masks(small_dataset, masks) == 2 and small_dataset.has_masks()
    assert (np.asarray(Image.open(small_dataset.directory / "masks" / "car-0000.png")) > 127).sum() == 9


def test_mask_dir_missing_or_wrong_size(tmp_path, small_dataset):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        import_masks(small_dataset, tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="mask_dir .* named <class"):
        ground_truth_source("org/model", mask_dir=tmp_path / "nope")
    masks = tmp_path / "masks"
    save_mask(masks, "car-0000.png")
    save_mask(masks, "traffic_light-0003.png", size=16)
    with pytest.raises(ValueError, match="16x16 but its image is 8x8; nothing was imported"):
        import_masks(small_dataset, masks)
    assert small_dataset.missing_masks() == ["car-0000", "traffic_light-0003"]


# -- SAM: model type from the checkpoint, device ----------------------------------------------------
def fake_sam_state(embed_dim, depth):
    state = {"image_encoder.patch_embed.proj.weight": torch.zeros(embed_dim, 3, 1, 1)}
    state.update({f"image_encoder.blocks.{i}.norm1.weight": torch.zeros(1) for i in range(depth)})
    return state


@pytest.mark.parametrize("embed_dim, depth, expected", [(768, 12, "vit_b"), (1024, 24, "vit_l"), (1280, 32, "vit_h")])
def test_sam_model_type_is_read_from_the_image_encoder(embed_dim, depth, expected):
    from daamlab.sam import sam_model_type

    assert sam_model_type(fake_sam_state(embed_dim, depth)) == expected


def test_sam_model_type_errors():
    from daamlab.sam import sam_model_type

    with pytest.raises(ValueError, match="embed dim 768, depth 24"):
        sam_model_type(fake_sam_state(768, 24))
    with pytest.raises(ValueError, match="not a Segment Anything checkpoint"):
        sam_model_type({"weight": torch.zeros(1)})


def test_a_vit_b_checkpoint_loads_and_the_segmenter_takes_a_device(tmp_path):
    pytest.importorskip("segment_anything")
    from segment_anything import sam_model_registry

    from daamlab.sam import SamSegmenter, load_sam

    torch.manual_seed(0)
    reference = sam_model_registry["vit_b"]()
    torch.save(reference.state_dict(), tmp_path / "sam_vit_b.pth")
    loaded = load_sam(tmp_path / "sam_vit_b.pth")
    assert loaded.image_encoder.patch_embed.proj.weight.shape[0] == 768 and len(loaded.image_encoder.blocks) == 12
    assert torch.equal(loaded.mask_decoder.iou_prediction_head.layers[0].weight, reference.mask_decoder.iou_prediction_head.layers[0].weight)
    with pytest.raises(ValueError, match="holds a vit_b model, not vit_h; pass model_type='vit_b'"):
        load_sam(tmp_path / "sam_vit_b.pth", "vit_h")
    with pytest.raises(ValueError, match="must be one of"):
        load_sam(tmp_path / "sam_vit_b.pth", "vit_x")
    with pytest.raises(FileNotFoundError, match="no SAM checkpoint"):
        load_sam(tmp_path / "missing.pth")
    segmenter = SamSegmenter(loaded)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert segmenter.device.type == expected and next(segmenter.predictor.model.parameters()).device.type == expected
    assert next(SamSegmenter(loaded, device="cpu").predictor.model.parameters()).device.type == "cpu"


# -- downstream: seeded end to end ------------------------------------------------------------------
def tiny_study_data():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    labels = np.zeros((4, 16, 16), np.uint8)
    labels[:, 4:12, 4:12] = 1
    labels[0, 0, :] = 255  # ignored
    return images, labels


def test_downstream_training_twice_gives_identical_numbers_and_leaves_the_global_rng_alone():
    from daamlab.experiments.downstream import evaluate_segmenter, train_segmenter

    images, labels = tiny_study_data()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    nets = [train_segmenter(images, labels, 2, steps=3, batch_size=2, channels=(8, 16), seed=7, progress=False)
            for _ in range(2)]
    assert torch.equal(torch.get_rng_state(), state)  # training used its own generator only
    for (name, first), second in zip(nets[0].state_dict().items(), nets[1].state_dict().values()):
        assert torch.equal(first, second), name
    scores = [evaluate_segmenter(net, images, labels, ["car"]) for net in nets]
    assert scores[0] == scores[1]
    other = train_segmenter(images, labels, 2, steps=3, batch_size=2, channels=(8, 16), seed=8, progress=False)
    assert not torch.equal(other.head.weight, nets[0].head.weight)  # the seed matters
    with pytest.raises(ValueError, match="differ in size"):
        train_segmenter(images, labels[:, :8], 2, steps=1, progress=False)
    with pytest.raises(ValueError, match="at least 1"):
        train_segmenter(images, labels, 2, steps=0, progress=False)
