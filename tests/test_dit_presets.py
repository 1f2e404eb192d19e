"""The sd3-medium-thesis and flux-schnell-thesis presets, end to end on tiny random pipelines of those families
(tests/presets.py: the preset's notebooks and parameters, only the model, the device, the steps and the counts made
tiny), as tests/test_pixart_preset.py runs pixart-alpha-thesis.

The tiny SD3 is a ``StableDiffusion3Pipeline`` with both CLIP encoders and T5 (text = 77 CLIP then T5 positions)
and flow-matching Euler; the tiny Flux is schnell-shaped (``guidance_embeds=False``, so no guidance embedding and
no CFG), with the shifted-sigma schedule. Each run takes about 1 (SD3) and 2.5 (Flux) minutes on 2 CPU cores.
"""

import inspect

import pytest

from daamlab.experiments import ThesisDataset
from daamlab.runs import load_preset
from presets import CLASSES, SEEDS, results, run_tiny_preset

pytest.importorskip("papermill")

SD3, FLUX = "sd3-medium-thesis", "flux-schnell-thesis"
JOINT_LEFT_OUT = {"04_token_optimization", "08_pcc_segmentation", "09_downstream_utility", "10_rendered_scenes"}
RENDERED = "10_rendered_scenes"  # not in the presets (flat rendered scenes, far from these models' training images), run here
EXTRA = {"08_pcc_segmentation": {}, "09_downstream_utility": {"optimized": False}, RENDERED: {}}  # as sd2-base-thesis, not
# in the presets (08 needs masks of its own dataset, 09 scores on rendered scenes); run here


def tiny_pipeline(preset: str):
    from daamlab.testing.dit import tiny_random_flux_pipeline, tiny_random_sd3_pipeline

    if preset == SD3:
        return tiny_random_sd3_pipeline(seed=0, sharpen=4.0)
    return tiny_random_flux_pipeline(seed=0, sharpen=4.0, guidance_embeds=False)


@pytest.fixture(scope="module", params=[SD3, FLUX])
def run(request, tmp_path_factory):
    from daamlab.experiments.rendered import default_image_size

    pipe = tiny_pipeline(request.param)
    size = default_image_size(pipe)  # the pipeline's default: what the notebooks generate at
    run_dir = run_tiny_preset(request.param, pipe, size, tmp_path_factory.mktemp(request.param),
                              "tests/test_dit_presets.py", extra_notebooks=EXTRA)
    return request.param, run_dir, size


def test_the_presets_use_the_models_own_settings():
    from diffusers import StableDiffusion3Pipeline

    sd3, flux = load_preset(SD3), load_preset(FLUX)
    defaults = inspect.signature(StableDiffusion3Pipeline.__call__).parameters
    assert sd3["parameters"]["model"] == "stabilityai/stable-diffusion-3-medium-diffusers"
    for name in ("num_inference_steps", "guidance_scale"):
        assert sd3["parameters"][name] == defaults[name].default  # 28, 7.0
    assert flux["parameters"]["model"] == "black-forest-labs/FLUX.1-schnell"
    assert (flux["parameters"]["num_inference_steps"], flux["parameters"]["guidance_scale"]) == (4, 0.0)  # its card's
    for preset in (sd3, flux):
        assert not JOINT_LEFT_OUT & set(preset["notebooks"])
        assert preset["notebook_parameters"]["06_summary"] == {"optimized": False}


def test_every_notebook_of_the_preset_ran(run):
    preset, run_dir, _ = run
    report = (run_dir / "report.md").read_text()
    for notebook in [*load_preset(preset)["notebooks"], *EXTRA]:
        results(run_dir, notebook)
        assert f"## {notebook}" in report


def test_the_dataset_holds_joint_attention_records_with_linear_logits(run):
    preset, run_dir, size = run
    dataset = ThesisDataset.open(run_dir / "dataset")
    assert results(run_dir, "01_dataset")["images"] == len(dataset.manifest) == len(CLASSES) * SEEDS
    record = dataset.record(dataset.manifest.iloc[0])
    names = [layer.name for layer in record.cross_layers]
    if preset == SD3:
        assert names == ["transformer_blocks.0.attn", "transformer_blocks.1.attn"]
        assert record.tokens.sot_index == 0  # CLIP's positions come first
    else:
        assert names == ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn"]
        assert record.tokens.sot_index is None  # T5 only
    assert {layer.kind for layer in record.cross_layers} == {"joint"}
    assert record.image.shape == (size, size, 3)
    assert record.linear_matrix is None and set(record.linear_logits) == set(names)  # Linear DAAM (03) reads them


def test_new_words_are_mapped_with_concept_attention(run):
    _, run_dir, _ = run
    quickstart = results(run_dir, "00_quickstart")
    assert quickstart["new_word_maps"] == ["ConceptAttention", "ConceptAttention, cross-attention variant"]
    assert all(-1 <= r <= 1 for r in quickstart["pearson_open_vocabulary_vs_linear"].values())


def test_the_numbers_are_in_range(run):
    _, run_dir, _ = run
    for notebook in ("02_daam_baseline", "03_linear_daam"):
        assert all(0 <= v <= 100 for v in results(run_dir, notebook)["max_miou_percent"].values())
    assert set(results(run_dir, "05_layer_timestep_analysis")["per_layer_max_miou_percent"]) <= {"block0", "block1", "single0"}
    assert set(results(run_dir, "06_summary")["max_miou_percent"]) == {
        "DAAM (not optimized)", "Linear DAAM (not optimized)", "ConceptAttention (not optimized)"}
    assert set(results(run_dir, RENDERED)["max_miou_percent"]) == {"DAAM", "Linear DAAM", "ConceptAttention"}


def test_concept_attention_is_scored_beside_daam_on_the_class_words(run):
    """01 traced ConceptAttention's concepts (the class words, then the urban background); 02 scored the class word's
    concept map with DAAM's protocol, and those numbers are the curves it saved."""
    from daamlab.experiments import Curves, ThesisDataset
    from daamlab.experiments.families import URBAN_CONCEPTS

    _, run_dir, _ = run
    dataset = ThesisDataset.open(run_dir / "dataset")
    assert dataset.record(dataset.manifest.iloc[0]).meta.concepts == ["car", "person", *URBAN_CONCEPTS]
    saved = results(run_dir, "02_daam_baseline")["concept_attention_max_miou_percent"]
    summary = Curves.load(run_dir / "curves" / "concept-attention.npz").summary()
    assert set(saved) == set(summary.index) and all(abs(saved[k] - 100 * summary["max_miou"][k]) < 1e-9 for k in saved)
    assert results(run_dir, "07_labels_and_export")["images"] == 2


def test_pcc_runs_on_joint_attention_and_feeds_the_downstream_study(run):
    """08 clustered the later joint blocks' image-token outputs and classified the segments with ConceptAttention's
    maps (the background concepts standing in for SOT); 09 trained on its labels without optimized tokens."""
    from daamlab.experiments import ThesisDataset

    _, run_dir, size = run
    dataset = ThesisDataset.open(run_dir / "pcc_dataset")
    record = dataset.record(dataset.manifest.iloc[0])
    names = [layer.name for layer in record.cross_layers]
    assert list(record.self_attention) == names[len(names) // 2:] and record.meta.concepts
    pcc = results(run_dir, "08_pcc_segmentation")
    assert 0 <= pcc["pcc_uncertain_percent"] <= 100 and "PCC" in pcc["binary_miou_percent"]
    labels = [dataset.directory / "pcc" / f"{name}.png" for name in dataset.manifest["name"]]
    assert all(path.exists() for path in labels)
    assert set(results(run_dir, "09_downstream_utility")["iou_percent"]) >= {"DAAM", "PCC"}
    assert "optimized token (linear)" not in results(run_dir, "09_downstream_utility")["iou_percent"]
