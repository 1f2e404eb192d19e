"""Loading Stable Diffusion pipelines (SD 1.x, 2.x, XL) by hub id, local directory or the embedded default."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import torch

Task = Literal["txt2img", "img2img", "inpaint"]
TOY_MODEL_NAME = "toy-urban"


TOY_MODEL_ENV = "DAAMLIB_TOY_MODEL"


def toy_model_dir() -> Path:
    """The embedded toy model's ``save_pretrained`` directory: ``$DAAMLIB_TOY_MODEL`` when set, else
    ``data/models/toy-urban`` of the source checkout daamlib is installed from."""
    configured = os.environ.get(TOY_MODEL_ENV)
    if configured:
        return Path(configured).expanduser()
    return Path(__file__).resolve().parent.parent / "data" / "models" / TOY_MODEL_NAME


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


Offload = Literal["model", "sequential"]
_FP16_VARIANT = "fp16"


def load_pipeline(name_or_dir: str | os.PathLike | None = None, *, task: Task = "txt2img", device: str | torch.device | None = None,
                  dtype: torch.dtype | None = None, offload: Offload | None = None, download: bool = False,
                  progress_bar: bool = True, **from_pretrained_kwargs):
    """Load a diffusers pipeline with ``from_pretrained``.

    Args:
        name_or_dir: a hub id (``"stabilityai/stable-diffusion-2-base"``), a directory written by
            ``save_pretrained``, or ``None`` for the embedded toy model.
        task: "txt2img", "img2img" or "inpaint" (diffusers' AutoPipeline picks SD or SDXL).
        device, dtype: default CUDA + float16 when available, else CPU + float32. On float16 the
            ``fp16`` weight variant is used when it is there (half the bytes to read).
        offload: ``None`` (everything on ``device``), ``"model"`` (each model moves to the GPU
            while it runs) or ``"sequential"`` (each layer does; slowest, least memory). Needs CUDA.
        download: hub ids come from the local Hugging Face cache only, unless this is True.
    """
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but CUDA is not available here; pass device='cpu' "
                         "(or install a CUDA build of torch on a machine with a GPU)")
    if offload not in (None, "model", "sequential"):
        raise ValueError(f"offload must be None, 'model' or 'sequential', not {offload!r}")
    if offload is not None and device.type != "cuda":
        raise ValueError(f"offload={offload!r} moves models to a GPU while they run; it needs device='cuda'")
    dtype = dtype or default_dtype(device)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype such as torch.float16, not {dtype!r}")
    cls = _pipeline_class(task)
    source = _resolve_source(name_or_dir)
    kwargs = {"torch_dtype": dtype, **from_pretrained_kwargs}  # torch_dtype: every diffusers >= 0.30 takes it
    fp16 = [{**kwargs, "variant": _FP16_VARIANT}] if dtype == torch.float16 and "variant" not in kwargs else []
    if isinstance(source, Path):  # the fp16 variant where the directory holds it
        has_variant = fp16 and any(source.glob(f"*/*.{_FP16_VARIANT}.safetensors"))
        pipe = cls.from_pretrained(source, **(fp16[0] if has_variant else kwargs))
    else:
        pipe = _from_hub(cls, source, download, fp16 + [kwargs])
    _check_dtype(pipe, dtype)
    if offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=not progress_bar)
    return pipe


def _check_dtype(pipe, dtype: torch.dtype) -> None:
    for name in ("unet", "transformer", "text_encoder"):
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module) and module.dtype != dtype:
            raise ValueError(f"the pipeline's {name} loaded as {module.dtype}, not the requested {dtype}; "
                             "pass torch_dtype/dtype consistently or convert the saved weights")


def _resolve_source(name_or_dir: str | os.PathLike | None) -> Path | str:
    if name_or_dir is None:
        directory = toy_model_dir()
        if not (directory / "model_index.json").exists():
            raise FileNotFoundError(f"the embedded toy model is not at {directory}. It ships in the repository's "
                                    "data/models/toy-urban: install daamlib from a checkout (pip install -e .) or set "
                                    f"{TOY_MODEL_ENV}=<checkout>/data/models/toy-urban; or pass a model id or directory")
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


def _from_hub(cls, model_id: str, download: bool, attempts: list[dict]):
    for attempt in attempts:  # the cache first, the fp16 variant first; a download takes the last
        try:
            return cls.from_pretrained(model_id, local_files_only=True, **attempt)
        except (OSError, ValueError) as error:
            cached_error = error
    if not download:
        raise ValueError(_not_cached_message(model_id)) from cached_error
    try:
        return cls.from_pretrained(model_id, **attempts[-1])
    except OSError as error:
        raise ValueError(_not_cached_message(model_id)) from error


def _not_cached_message(model_id: str) -> str:
    relative = Path(model_id).resolve()
    return (
        f"{model_id!r} is neither a pipeline directory ({relative} does not exist) nor in the local Hugging Face "
        f"cache. Fetch it once with `hf download {model_id}` (huggingface_hub's CLI) on a machine with network "
        "access, or pass load_pipeline(..., download=True), or save the pipeline with save_pretrained and pass its directory."
    )
