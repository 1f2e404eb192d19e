"""Loading Stable Diffusion pipelines (SD 1.x, 2.x, XL) by hub id, local directory or the embedded default."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import torch

Task = Literal["txt2img", "img2img", "inpaint"]
TOY_MODEL_NAME = "toy-urban"


def data_dir() -> Path:
    """The repository's ``data/`` directory (the package is used from its checkout)."""
    return Path(__file__).resolve().parent.parent / "data"


def toy_model_dir() -> Path:
    """Where the embedded toy model is saved with ``save_pretrained``."""
    return data_dir() / "models" / TOY_MODEL_NAME


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.float16 if device.type == "cuda" else torch.float32


def _pipeline_class(task: Task):
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting, AutoPipelineForText2Image

    classes = {"txt2img": AutoPipelineForText2Image, "img2img": AutoPipelineForImage2Image, "inpaint": AutoPipelineForInpainting}
    if task not in classes:
        raise ValueError(f"task {task!r} is not supported; use one of {sorted(classes)}")
    return classes[task]


def load_pipeline(
    name_or_dir: str | os.PathLike | None = None,
    *,
    task: Task = "txt2img",
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    local_files_only: bool | None = None,
    progress_bar: bool = True,
    **from_pretrained_kwargs,
):
    """Load a diffusers pipeline with ``from_pretrained``.

    Args:
        name_or_dir: a hub id (``"stabilityai/stable-diffusion-2-base"``), a directory written by
            ``save_pretrained``, or ``None`` for the embedded toy model.
        task: "txt2img", "img2img" or "inpaint" (diffusers' AutoPipeline picks SD or SDXL).
        device, dtype: default CUDA + float16 when available, else CPU + float32.
        local_files_only: only use the local Hugging Face cache for hub ids. By default the
            cache is tried first and the hub only when the id is not cached.
    """
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    cls = _pipeline_class(task)
    source = _resolve_source(name_or_dir)
    kwargs = {"dtype": dtype, **from_pretrained_kwargs}
    if isinstance(source, Path):
        pipe = cls.from_pretrained(source, **kwargs)
    else:
        pipe = _from_hub(cls, source, local_files_only, kwargs)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=not progress_bar)
    return pipe


def _resolve_source(name_or_dir: str | os.PathLike | None) -> Path | str:
    if name_or_dir is None:
        directory = toy_model_dir()
        if not (directory / "model_index.json").exists():
            raise FileNotFoundError(
                f"the embedded toy model is missing at {directory}; train it with "
                "`python -m daamlib.toyworld.train` or pass a model id or directory"
            )
        return directory
    path = Path(name_or_dir).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").exists():
            raise ValueError(f"{path} is a directory but not a diffusers pipeline (no model_index.json)")
        return path
    text = str(name_or_dir)
    looks_like_path = text.startswith((".", "/", "~")) or os.sep in text and text.count("/") != 1
    if looks_like_path:
        raise FileNotFoundError(f"no pipeline directory at {path}")
    return text


def _from_hub(cls, model_id: str, local_files_only: bool | None, kwargs: dict):
    from huggingface_hub import constants

    try:
        return cls.from_pretrained(model_id, local_files_only=True, **kwargs)
    except (OSError, ValueError, EnvironmentError) as cached_error:
        if local_files_only or constants.HF_HUB_OFFLINE:
            raise ValueError(_offline_message(model_id)) from cached_error
    try:
        return cls.from_pretrained(model_id, **kwargs)
    except OSError as error:
        raise ValueError(_offline_message(model_id)) from error


def _offline_message(model_id: str) -> str:
    return (
        f"{model_id!r} is not in the local Hugging Face cache and the hub cannot be reached. "
        f"On a machine with network access run `huggingface-cli download {model_id}` (then copy "
        "the cache, or set HF_HOME), or save the pipeline with save_pretrained and pass its directory."
    )
