import numpy as np
import pytest
import torch
from PIL import Image

import daamlib
from daamlib import models
from pipelines import tiny_pipeline


@pytest.fixture(scope="module")
def saved_dir(pipe, tmp_path_factory):
    directory = tmp_path_factory.mktemp("pipelines") / "tiny-sd"
    pipe.save_pretrained(directory)
    return directory


def test_load_pipeline_from_a_local_directory(saved_dir, pipe):
    loaded = daamlib.load_pipeline(saved_dir, device="cpu")
    assert type(loaded).__name__ == "StableDiffusionPipeline"
    assert loaded.unet.dtype == torch.float32 and loaded.device.type == "cpu"
    (record,) = daamlib.generate(loaded, "a car", seed=0, num_inference_steps=2)
    on_cpu = pipe if pipe.device.type == "cpu" else tiny_pipeline()  # the same seeded weights, on the CPU as loaded
    (reference,) = daamlib.generate(on_cpu, "a car", seed=0, num_inference_steps=2)
    assert np.array_equal(record.image, reference.image)
    assert record.meta.model_id == str(saved_dir)


@pytest.mark.parametrize("task, expected", [("img2img", "StableDiffusionImg2ImgPipeline"),
                                            ("inpaint", "StableDiffusionInpaintPipeline")])
def test_img2img_and_inpaint_are_traced(saved_dir, task, expected):
    loaded = daamlib.load_pipeline(saved_dir, task=task, device="cpu")
    assert type(loaded).__name__ == expected
    image = Image.fromarray(np.full((32, 32, 3), 128, np.uint8))
    extra = {"mask_image": Image.fromarray(np.full((32, 32), 255, np.uint8))} if task == "inpaint" else {}
    (record,) = daamlib.generate(loaded, "a car", seed=0, num_inference_steps=4,
                                 pipe_kwargs={"image": image, "strength": 0.5, **extra})
    assert 2 <= record.num_steps <= 3  # only the last half of the schedule runs
    assert daamlib.daam(record, "car").shape == (16, 16)


def test_an_uncached_hub_id_is_never_downloaded_and_the_error_names_the_fix(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(ValueError, match="hf download nobody/no-such-model") as error:
        daamlib.load_pipeline("nobody/no-such-model", device="cpu")
    assert "neither a pipeline directory" in str(error.value)


def test_a_relative_directory_is_found_from_the_working_directory(saved_dir, monkeypatch):
    monkeypatch.chdir(saved_dir.parent)
    loaded = daamlib.load_pipeline(saved_dir.name, device="cpu")
    assert loaded.unet.config.sample_size == 16


def test_the_fp16_variant_is_preferred_when_saved(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "fp16-only", variant="fp16")  # only *.fp16.safetensors files
    loaded = daamlib.load_pipeline(tmp_path / "fp16-only", device="cpu", dtype=torch.float16)
    assert loaded.unet.dtype == torch.float16
    with pytest.raises((OSError, ValueError)):  # without the variant there is nothing to load
        daamlib.load_pipeline(tmp_path / "fp16-only", device="cpu", dtype=torch.float32)


def test_device_dtype_and_offload_are_checked_before_loading(tmp_path):
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            daamlib.load_pipeline(tmp_path, device="cuda")
    with pytest.raises(ValueError, match="needs device='cuda'"):
        daamlib.load_pipeline(tmp_path, device="cpu", offload="model")
    with pytest.raises(ValueError, match="offload must be"):
        daamlib.load_pipeline(tmp_path, device="cpu", offload="disk")
    with pytest.raises(ValueError, match="floating torch dtype"):
        daamlib.load_pipeline(tmp_path, device="cpu", dtype=torch.int8)


def test_bad_local_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="no pipeline directory"):
        daamlib.load_pipeline(tmp_path / "missing", device="cpu")
    with pytest.raises(ValueError, match="model_index.json"):
        daamlib.load_pipeline(tmp_path, device="cpu")
    with pytest.raises(ValueError, match="task"):
        daamlib.load_pipeline(tmp_path, task="video")


def test_device_and_dtype_defaults():
    device = models.default_device()
    assert device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert models.default_dtype(torch.device("cpu")) == torch.float32
    assert models.default_dtype(torch.device("cuda")) == torch.float16
