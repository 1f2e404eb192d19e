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


_DEFINITE = {"sidewalk", "road", "sky"}  # named with "the"; buildings and trees with "a"


def named(word: str, colour: str | None = None) -> str:
    """The word with its article and, if given, its colour: "a tree", "an orange tree", "the grey road"."""
    phrase = f"{colour} {word}" if colour else word
    if word in _DEFINITE:
        return "the " + phrase
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def background_phrases(labels: np.ndarray, rng: np.random.Generator, name_present: float = 0.5,
                       name_absent: float = 0.7, colours: dict[str, str] | None = None) -> list[str]:
    """Phrases for the background things, each present one ("a tree", or "an orange tree" when ``colours``
    names its colour) named with probability ``name_present`` and each absent one ("no tree") with
    ``name_absent``; the singular word in both, so that an absent thing is named by the same token as a
    present one (labels uint8 [S, S])."""
    phrases = []
    for label, word in L.BACKGROUND_WORDS.items():
        present = (labels == label).sum() >= _MIN_PIXELS
        if rng.random() < (name_present if present else name_absent):
            phrases.append(named(word, (colours or {}).get(word)) if present else f"no {word}")
    return [phrases[i] for i in rng.permutation(len(phrases))]


ATTRIBUTE_SHARE = 0.75  # how often a caption with ``name_attributes`` names a colour it knows


def caption(scene: Scene, seed: int, name_background: bool = False, name_attributes: bool = False) -> str:
    """A seeded caption for ``scene``: a paraphrase of the thesis prompt, or one naming another thing;
    with ``name_background``, two in three captions go on to say which background things are there and
    which are not ("... with a tree and no building"), for scenes that vary them. With ``name_attributes``
    the colours in ``scene.attributes`` are named, each with probability ``ATTRIBUTE_SHARE`` ("a red car in
    a city street"), and two in three captions go on to name background things, with their colours where
    the scene has them ("... with an orange sky and a grey building")."""
    rng = np.random.default_rng([seed, 7])
    colours = {word: colour for word, colour in scene.attributes.items() if rng.random() < ATTRIBUTE_SHARE} if name_attributes else {}
    text = _object_caption(scene, rng, colours.get(scene.main_class))
    if (name_background or name_attributes) and rng.random() < 2 / 3:
        phrases = background_phrases(scene.labels, rng, name_absent=0.7 if name_background else 0.0, colours=colours)
        phrases = [phrase for phrase in phrases if phrase.split()[-1] not in text.split()]
        if phrases:
            text += " with " + " and ".join(phrases)
    return text


def _object_caption(scene: Scene, rng: np.random.Generator, colour: str | None = None) -> str:
    others = [
        word
        for label, word in L.CAPTION_WORDS.items()
        if (scene.labels == label).sum() >= _MIN_PIXELS and not (scene.main_class == "rider" and label == L.BICYCLE)
    ]
    if others and rng.random() < 0.5:
        template = WITH_OTHERS[rng.integers(len(WITH_OTHERS))]
        text = template.format(object=scene.main_class, other=others[rng.integers(len(others))])
    else:
        text = PARAPHRASES[rng.integers(len(PARAPHRASES))].format(object=scene.main_class)
    return _colour_first_mention(text, scene.main_class, colour)


def _colour_first_mention(text: str, word: str, colour: str | None) -> str:
    """``text`` with ``colour`` put before the first "a ``word``" ("a car" -> "a red car"; the article mended)."""
    if colour is None:
        return text
    if f"a {word}" not in text:
        raise ValueError(f"caption {text!r} does not name 'a {word}'")
    return text.replace(f"a {word}", named(word, colour), 1)


# -- spatial captions: what is where, from the exact labels ---------------------------------------
_SPATIAL_WORDS = {L.CAR: "car", L.PERSON: "person", L.TRAFFIC_LIGHT: "traffic light", L.RIDER: "rider",
                  L.VEGETATION: "tree", L.BUILDING: "building", L.BICYCLE: "bicycle"}
_AREA_WORDS = {L.ROAD: "road", L.SIDEWALK: "sidewalk", L.SKY: "sky"}  # always spread across: named without a side


def _side(mask: np.ndarray) -> str:
    """'on the left', 'in the middle' or 'on the right' by the mask's mean column (mask bool [S, S])."""
    column = np.nonzero(mask)[1].mean() / mask.shape[1]
    return "on the left" if column < 0.38 else "on the right" if column > 0.62 else "in the middle"


def spatial_caption(labels: np.ndarray, main_class: str, rng: np.random.Generator, max_others: int = 2,
                    name_absent: float = 0.0) -> str:
    """A caption naming the main object and up to ``max_others`` other things with where they are,
    e.g. "a car on the left and a tree on the right" (labels uint8 [S, S], as the image is shown); each
    background thing the scene lacks is added ("and no sky") with probability ``name_absent``."""
    main_label = L.IDS[main_class]
    phrases = []
    if (labels == main_label).any():
        phrases.append(f"a {main_class} {_side(labels == main_label)}")
    else:
        phrases.append(f"a {main_class}")
    others = []
    for label, word in {**_SPATIAL_WORDS, **_AREA_WORDS}.items():
        mask = labels == label
        if label == main_label or mask.sum() < _MIN_PIXELS or (main_class == "rider" and label == L.BICYCLE):
            continue
        others.append(f"a {word} {_side(mask)}" if label in _SPATIAL_WORDS else f"the {word}")
    for index in rng.permutation(len(others))[: rng.integers(0, max_others + 1)]:
        phrases.append(others[index])
    if name_absent:
        phrases += background_phrases(labels, rng, name_present=0.0, name_absent=name_absent)
    return " and ".join(phrases)
