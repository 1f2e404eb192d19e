"""Captions for rendered scenes: the thesis' prompt, paraphrases, and mentions of what else is there.

A caption only names things present in the scene (checked against its labels).
"""

from __future__ import annotations

import numpy as np

from daamlab.toyworld import labels as L
from daamlab.toyworld.render import Scene

THESIS_TEMPLATE = "a {object} in an urban environment"
PARAPHRASES = (
    THESIS_TEMPLATE,
    "a {object} in a city street",
    "a photo of a {object} in the city",
    "an urban scene with a {object}",
)
WITH_OTHERS = (
    "a {object} and a {other} in an urban environment",
    "a {object} next to a {other} in a city street",
    "a {object} near a {other}",
)
_MIN_PIXELS = 20  # a background thing is mentioned only when clearly visible


def thesis_prompt(class_name: str) -> str:
    return THESIS_TEMPLATE.format(object=class_name)


def caption(scene: Scene, seed: int) -> str:
    """A seeded caption for ``scene``: a paraphrase of the thesis prompt, or one naming another thing."""
    rng = np.random.default_rng([seed, 7])
    others = [
        word
        for label, word in L.CAPTION_WORDS.items()
        if (scene.labels == label).sum() >= _MIN_PIXELS and not (scene.main_class == "rider" and label == L.BICYCLE)
    ]
    if others and rng.random() < 0.5:
        template = WITH_OTHERS[rng.integers(len(WITH_OTHERS))]
        return template.format(object=scene.main_class, other=others[rng.integers(len(others))])
    return PARAPHRASES[rng.integers(len(PARAPHRASES))].format(object=scene.main_class)
