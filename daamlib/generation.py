"""One call that generates seeded images under a trace and returns their records."""

from __future__ import annotations

import inspect
from dataclasses import replace

import numpy as np
import torch

from .capture import trace
from .modules import denoiser, family
from .record import Record


_OWN_ARGUMENTS = {  # pipeline arguments generate sets itself -> what to pass instead
    "prompt": "the prompt argument",
    "generator": "seed= (generate seeds its own generator so the record can name the seed)",
    "num_images_per_prompt": "num_images_per_prompt=",
    "output_type": "nothing (generate returns the images inside the records)",
    "num_inference_steps": "num_inference_steps=",
    "guidance_scale": "guidance_scale=",
    "height": "height=",
    "width": "width=",
    "negative_prompt": "negative_prompt=",
}


def generate(pipe, prompt: str | list[str], *, seed: int, num_inference_steps: int | None = None,
             guidance_scale: float | None = None, height: int | None = None, width: int | None = None,
             negative_prompt: str | list[str] | None = None, num_images_per_prompt: int = 1, pipe_kwargs: dict | None = None,
             **trace_kwargs) -> list[Record]:
    """Generate with ``torch.Generator().manual_seed(seed)`` inside :func:`daamlib.trace`.

    Each record gets the seed, the prompt and the image (uint8 [height, width, 3]).
    ``negative_prompt`` may be one string for every prompt. ``trace_kwargs`` choose what is
    recorded (see :func:`daamlib.trace`); ``pipe_kwargs`` go to the pipeline unchanged.
    """
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
        raise ValueError("the prompt is empty; DAAM attributes an image to the words of a prompt, so give it words")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, not {seed!r}; records name their seed so images can be regenerated")
    _check_count("num_images_per_prompt", num_images_per_prompt)
    call = dict(pipe_kwargs or {})
    clashes = sorted(set(call) & set(_OWN_ARGUMENTS))
    if clashes:
        raise ValueError(f"pipe_kwargs {clashes} are set by generate; pass " + "; ".join(_OWN_ARGUMENTS[k] for k in clashes))
    _check_pipeline_arguments(pipe, call)
    if num_inference_steps is not None:
        _check_count("num_inference_steps", num_inference_steps)
        call["num_inference_steps"] = num_inference_steps
    for name, value in (("guidance_scale", guidance_scale), ("height", height), ("width", width)):
        if value is not None:
            call[name] = value
    if negative_prompt is not None:
        call["negative_prompt"] = _negatives(negative_prompt, len(prompts))
    if "cfg" not in trace_kwargs and not hasattr(type(pipe), "do_classifier_free_guidance") and family(denoiser(pipe)) != "flux":
        # PixArt's pipeline keeps its CFG flag local; its rule is guidance_scale > 1. Flux's batch never holds two
        # halves (guidance_scale is its distilled guidance; true CFG makes separate calls the trace tells apart)
        scale = call.get("guidance_scale", inspect.signature(pipe.__call__).parameters["guidance_scale"].default)
        trace_kwargs["cfg"] = scale > 1
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    with trace(pipe, **trace_kwargs) as tr:
        output = pipe(prompt=prompts, generator=generator, num_images_per_prompt=num_images_per_prompt,
                      output_type="np", **call)
    records, images = tr.records, np.clip(np.round(np.asarray(output.images) * 255), 0, 255).astype(np.uint8)
    per_prompt = len(records) // len(prompts)
    return name_records(records, seed, [prompts[index // per_prompt] for index in range(len(records))], images)


def name_records(records: list[Record], seed: int, prompts: list[str], images: np.ndarray) -> list[Record]:
    """Each record gets the seed, its prompt (one per record) and its image (uint8 [height, width, 3])."""
    for record, prompt, image in zip(records, prompts, images, strict=True):
        record.meta = replace(record.meta, seed=int(seed), prompt=prompt, image_size=tuple(image.shape[:2]))
        record.image = image
    return records


def _check_pipeline_arguments(pipe, call: dict) -> None:
    """A misspelt pipeline argument would be ignored silently by a call that takes **kwargs; refuse it."""
    parameters = inspect.signature(pipe.__call__).parameters
    unknown = sorted(set(call) - set(parameters))
    if unknown:
        raise ValueError(f"pipe_kwargs {unknown} are not arguments of {type(pipe).__name__}; "
                         f"it takes: {', '.join(p for p in parameters if p != 'kwargs')}")


def _check_count(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, not {value!r}")


def _negatives(negative_prompt: str | list[str], num_prompts: int) -> list[str]:
    """One negative prompt per prompt (a single string is used for all)."""
    negatives = [negative_prompt] * num_prompts if isinstance(negative_prompt, str) else list(negative_prompt)
    if len(negatives) != num_prompts or not all(isinstance(n, str) for n in negatives):
        raise ValueError(f"negative_prompt must be a string or {num_prompts} strings, one per prompt; got {negative_prompt!r}")
    return negatives
