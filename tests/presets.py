"""A preset run end to end on a tiny random pipeline: the preset's notebooks and parameters, only the model, the
device, the step count and the counts made tiny (as in toy-smoke). Ground truth comes from ``mask_dir`` (fixed
rectangles: the numbers are smoke, not a result)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from daamlab.experiments.dataset import sample_name
from daamlab.runs import load_preset, run_preset

CLASSES, SEEDS = ["car", "person"], 3  # 3 seeds: token optimization trains on 1 and 2 images and tests on the rest
TINY_STEPS = 4
TINY_COUNTS = {  # the presets' notebook parameters, made tiny
    "01_dataset": {"seeds": SEEDS, "classes": CLASSES, "examples_per_class": 1},
    "02_daam_baseline": {"examples_per_class": 1},
    "03_linear_daam": {"examples_per_class": 1},
    "04_token_optimization": {"train_sizes": [1, 2], "epochs": 5, "summary_train_size": 2},
    "05_layer_timestep_analysis": {"images_per_class": 1},
    "06_summary": {"summary_train_size": 2},
    "07_labels_and_export": {"examples": 2, "prompt_set": {"seeds_per_prompt": 1, "templates": [
        {"template": "a {object} in an urban environment", "words": ["object"], "attributes": {"object": ["car", "tree"]}}]}},
    "08_pcc_segmentation": {"seeds": SEEDS, "classes": CLASSES, "cluster_counts": [3, 5], "examples": 2},
    "09_downstream_utility": {"steps": 5, "batch_size": 4, "evaluation_scenes": 8},
    "10_rendered_scenes": {"num_scenes": 4, "timesteps": [300], "examples": 2},
}


def tiny_preset(name: str, model_dir: Path, mask_dir: Path, test: str, extra_notebooks=None) -> dict:
    """Preset ``name`` with the tiny model on the CPU, TINY_STEPS steps and tiny counts; everything else as it is.
    ``extra_notebooks`` {notebook: parameters} run after the preset's own (notebooks a preset leaves out by choice,
    not because they fail)."""
    preset = load_preset(name)
    extra = dict(extra_notebooks or {})
    notebooks = [*preset["notebooks"], *extra]
    notebook_parameters = {}
    for notebook in notebooks:
        values = {**(preset["notebook_parameters"] or {}).get(notebook, {}), **extra.get(notebook, {}),
                  **TINY_COUNTS.get(notebook, {})}
        if notebook == "01_dataset":
            values.pop("sam_checkpoint")
        if notebook in ("01_dataset", "08_pcc_segmentation"):  # 08's samples are 01's: the same masks
            values["mask_dir"] = str(mask_dir)
        notebook_parameters[notebook] = values
    return {"description": f"{name} on a tiny random pipeline ({test})", "notebooks": notebooks,
            "parameters": {**preset["parameters"], "model": str(model_dir), "device": "cpu",
                           "num_inference_steps": TINY_STEPS},
            "notebook_parameters": notebook_parameters}


def run_tiny_preset(name: str, pipe, size: int, root: Path, test: str, extra_notebooks=None) -> Path:
    """Save ``pipe``, write a mask per sample at ``size`` x ``size``, run the tiny preset; returns the run directory."""
    pipe.save_pretrained(root / "model")
    (root / "masks").mkdir()
    for index, (class_name, seed) in enumerate((c, s) for c in CLASSES for s in range(SEEDS)):
        mask = np.zeros((size, size), np.uint8)
        mask[size // 8 + index: 5 * size // 8 + index, size // 6: size // 6 + 3 * size // 8 + index] = 255
        Image.fromarray(mask).save(root / "masks" / f"{sample_name(class_name, seed)}.png")
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_preset(name, root / "model", root / "masks", test, extra_notebooks)))
    return run_preset(path, root / "run", progress=False)


def results(run_dir: Path, notebook: str) -> dict:
    """A notebook's saved numbers; the notebook must have run to the end."""
    metadata = json.loads((run_dir / f"{notebook}.ipynb").read_text())["metadata"]["daamlib"]
    assert metadata["status"] == "ok"
    return metadata["results"]
