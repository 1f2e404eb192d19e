"""The pixart-alpha-thesis preset, end to end on a tiny random PixArt-α: every notebook it lists runs through
the same runner (``daamlab.runs``) with its parameters, only the model, the device and the counts made tiny.

The tiny pipeline is shaped like PixArt-alpha/PixArt-XL-2-512x512 where the harness could notice: a
``PixArtAlphaPipeline`` saved with ``save_pretrained``, a VAE of factor 8, DPM-Solver, T5 tokens (no SOT,
120 positions), ``use_resolution_binning`` left on. Its latent ``sample_size`` is 32, so its default
256 x 256 is the pipeline's own 256 bin, as 512 x 512 is the 512 model's: images come back at the size they
were generated at. Ground truth comes from ``mask_dir`` (fixed rectangles: the numbers are smoke, not a
result). The run takes about 3 minutes (192 s on 2 CPU cores shared with other work), most of it each of the
8 kernels importing torch and diffusers (a tiny generation takes 0.3 s).
"""

import inspect

import pytest
import torch

from daamlab.experiments import ThesisDataset
from daamlab.experiments.analysis import short_layer_name
from daamlab.runs import load_preset
from presets import CLASSES, SEEDS, results, run_tiny_preset

pytest.importorskip("papermill")

PRESET = "pixart-alpha-thesis"
SIZE = 256  # pixels: the tiny model's default (latent sample_size 32 x VAE factor 8)


def tiny_pixart_like_the_512_model():
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtAlphaPipeline

    from daamlab.testing.dit import tiny_random_pixart_pipeline

    pipe = tiny_random_pixart_pipeline(seed=0, sample_size=SIZE // 8, sharpen=4.0)
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8,) * 4, in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4,
                        layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4)  # factor 8, as PixArt's SD VAE
    return PixArtAlphaPipeline(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=vae,
                               transformer=pipe.transformer, scheduler=DPMSolverMultistepScheduler())


RENDERED = "10_rendered_scenes"  # not in the preset (the toy world's flat scenes are far from PixArt's images), run here


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return run_tiny_preset(PRESET, tiny_pixart_like_the_512_model(), SIZE, tmp_path_factory.mktemp("pixart-preset"),
                           "tests/test_pixart_preset.py", extra_notebooks={RENDERED: {}})


def test_the_preset_uses_pixarts_own_settings():
    from diffusers import PixArtAlphaPipeline
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import ASPECT_RATIO_512_BIN

    from daamlab.testing.dit import PIXART_ALPHA_512_TRANSFORMER

    preset = load_preset(PRESET)
    defaults = inspect.signature(PixArtAlphaPipeline.__call__).parameters
    assert preset["parameters"]["model"] == "PixArt-alpha/PixArt-XL-2-512x512"
    for name in ("num_inference_steps", "guidance_scale"):
        assert preset["parameters"][name] == defaults[name].default
    # the notebooks generate at the default size: 64 latents x 8 = 512, which resolution binning keeps
    side = PIXART_ALPHA_512_TRANSFORMER["sample_size"] * 8
    assert ASPECT_RATIO_512_BIN["1.0"] == [side, side]
    assert not {"08_pcc_segmentation", "09_downstream_utility"} & set(preset["notebooks"])


def test_every_notebook_of_the_preset_ran_on_the_tiny_pixart(run_dir):
    report = (run_dir / "report.md").read_text()
    for notebook in load_preset(PRESET)["notebooks"]:
        results(run_dir, notebook)
        assert f"## {notebook}" in report


def test_the_dataset_holds_pixart_records(run_dir):
    dataset = ThesisDataset.open(run_dir / "dataset")
    assert results(run_dir, "01_dataset")["images"] == len(dataset.manifest) == len(CLASSES) * SEEDS
    record = dataset.record(dataset.manifest.iloc[0])
    assert [layer.name for layer in record.cross_layers] == ["transformer_blocks.0.attn2", "transformer_blocks.1.attn2"]
    assert record.tokens.sot_index is None and record.tokens.length == 120  # T5, the pipeline's max_sequence_length
    assert record.image.shape == (SIZE, SIZE, 3) and record.cross_layers[0].resolution == (SIZE // 16, SIZE // 16)
    assert record.linear_matrix is not None  # Linear DAAM and the linear token optimization read it


def test_the_numbers_are_in_range(run_dir):
    for notebook in ("02_daam_baseline", "03_linear_daam"):
        assert all(0 <= v <= 100 for v in results(run_dir, notebook)["max_miou_percent"].values())
    optimized = results(run_dir, "04_token_optimization")["max_miou_percent"]
    assert set(optimized) == {f"{v} {n} {s}" for v in ("linear", "softmax") for n in (1, 2) for s in ("train", "test")}
    assert all(0 <= value <= 100 for table in optimized.values() for value in table.values())
    analysis = results(run_dir, "05_layer_timestep_analysis")
    assert set(analysis["per_layer_max_miou_percent"]) == {"block0", "block1"}
    assert set(results(run_dir, "06_summary")["max_miou_percent"]) == {
        "DAAM (not optimized)", "Linear DAAM (not optimized)", "DAAM (optimized)", "Linear DAAM (optimized)"}
    assert results(run_dir, "07_labels_and_export")["images"] == 2
    assert set(results(run_dir, RENDERED)["max_miou_percent"]) == {"DAAM", "Linear DAAM", "open-vocabulary"}


@pytest.mark.parametrize("name,short", [
    ("down_blocks.0.attentions.1.transformer_blocks.0.attn2", "down0.1"),  # SD 1.x / 2.x
    ("mid_block.attentions.0.transformer_blocks.0.attn2", "mid"),
    ("up_blocks.3.attentions.2.transformer_blocks.0.attn2", "up3.2"),
    ("up_blocks.0.attentions.1.transformer_blocks.7.attn2", "up0.1.7"),  # SDXL: 10 transformer blocks per attention
    ("mid_block.attentions.0.transformer_blocks.9.attn2", "mid.9"),
    ("transformer_blocks.27.attn2", "block27"),  # PixArt
    ("transformer_blocks.3.attn", "block3"),  # SD3, Flux double-stream
    ("single_transformer_blocks.5.attn", "single5"),  # Flux single-stream
])
def test_short_layer_name(name, short):
    assert short_layer_name(name) == short


def test_sdxl_layer_names_stay_apart():
    names = [f"up_blocks.0.attentions.{a}.transformer_blocks.{b}.attn2" for a in range(3) for b in range(10)]
    names += [f"mid_block.attentions.0.transformer_blocks.{b}.attn2" for b in range(10)]
    assert len({short_layer_name(name) for name in names}) == len(names)


def test_background_init_is_sot_for_clip_and_the_end_token_for_t5():
    from types import SimpleNamespace

    from daamlib.optimize import default_background
    from daamlab.testing.unet import clip_tokenizer
    from daamlab.testing.dit import build_t5_tokenizer
    from daamlib.tokens import PromptTokens

    for tokenizer, expected in ((clip_tokenizer(), "<sot>"), (build_t5_tokenizer(), "<eot>")):
        record = SimpleNamespace(tokens=PromptTokens.from_text("a car on the road", tokenizer))
        assert default_background(record) == expected
        assert record.tokens.token_indices(expected)


def test_rendered_scenes_take_the_size_of_unet_and_dit_pipelines():
    from daamlab.experiments.rendered import default_image_size
    from daamlab.testing.unet import tiny_random_pipeline
    from daamlab.testing.dit import tiny_random_flux_pipeline

    assert default_image_size(tiny_random_pipeline()) == 32  # the UNet's sample_size 16 x the tiny VAE's 2
    assert default_image_size(tiny_pixart_like_the_512_model()) == SIZE
    assert default_image_size(tiny_random_flux_pipeline()) == 256  # Flux: the pipeline's default_sample_size 128 x 2
