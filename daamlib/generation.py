"""One call that generates seeded images under a trace and returns their records."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from .capture import trace
from .record import Record


def generate(
    pipe,
    prompt: str | list[str],
    *,
    seed: int,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    height: int | None = None,
    width: int | None = None,
    num_images_per_prompt: int = 1,
    pipe_kwargs: dict | None = None,
    **trace_kwargs,
) -> list[Record]:
    """Generate with ``torch.Generator().manual_seed(seed)`` inside :func:`daamlib.trace`.

    Each record gets the seed, the prompt and the image (uint8 [height, width, 3]).
    ``trace_kwargs`` choose what is recorded (see :func:`daamlib.trace`).
    """
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
        raise ValueError("the prompt is empty; DAAM attributes an image to the words of a prompt, so give it words")
    call = dict(pipe_kwargs or {})
    if num_inference_steps is not None:
        call["num_inference_steps"] = num_inference_steps
    for name, value in (("guidance_scale", guidance_scale), ("height", height), ("width", width)):
        if value is not None:
            call[name] = value
    generator = torch.Generator(device="cpu").manual_seed(seed)
    with trace(pipe, **trace_kwargs) as tr:
        output = pipe(prompt=prompts, generator=generator, num_images_per_prompt=num_images_per_prompt,
                      output_type="np", **call)
    records = tr.records
    images = np.clip(np.round(np.asarray(output.images) * 255), 0, 255).astype(np.uint8)
    per_prompt = len(records) // len(prompts)
    finished = []
    for index, record in enumerate(records):
        record.meta = replace(record.meta, seed=seed, prompt=prompts[index // per_prompt],
                              image_size=tuple(images[index].shape[:2]))
        record.image = images[index]
        finished.append(record)
    return finished
