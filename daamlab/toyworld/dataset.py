"""Rendered training and evaluation sets of the toy urban world.

Scenes are rendered at twice the model's image size and reduced by 2×2 blocks: the image by the
block mean (soft edges, like a decoded image), the labels by the block's majority label.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from daamlib.io import atomic_path
from daamlab.toyworld import labels as L
from daamlab.toyworld.captions import caption
from daamlab.toyworld.render import Scene, render_scene

RENDER_FACTOR = 2
HELD_OUT_FIRST_SEED = 1_000_000  # evaluation scenes never share a seed with training scenes


@dataclass
class SceneSet:
    """Scenes as arrays: images uint8 [N, S, S, 3], labels uint8 [N, S, S] (train ids), and per scene
    the main class index into ``labels.MAIN_CLASSES``, the render seed and a few captions."""

    images: np.ndarray
    labels: np.ndarray
    classes: np.ndarray
    seeds: np.ndarray
    captions: list[list[str]]

    def __len__(self) -> int:
        return len(self.images)

    def save(self, path: str | Path) -> None:
        with atomic_path(path) as temporary:
            np.savez_compressed(temporary, images=self.images, labels=self.labels, classes=self.classes, seeds=self.seeds,
                                captions=np.array(self.captions, dtype=object).astype(str))

    @classmethod
    def load(cls, path: str | Path) -> "SceneSet":
        with np.load(path) as data:
            return cls(data["images"], data["labels"], data["classes"], data["seeds"], data["captions"].tolist())


def reduce_scene(scene: Scene, factor: int) -> tuple[np.ndarray, np.ndarray]:
    """Block-mean image uint8 [S/f, S/f, 3] and majority labels uint8 [S/f, S/f] of ``scene``."""
    size = scene.labels.shape[0] // factor
    blocks = scene.image.reshape(size, factor, size, factor, 3).astype(np.float32)
    image = np.round(blocks.mean(axis=(1, 3))).astype(np.uint8)
    num_labels = int(scene.labels.max()) + 1
    one_hot = np.eye(num_labels, dtype=np.uint8)[scene.labels]  # [S, S, num_labels]
    votes = one_hot.reshape(size, factor, size, factor, num_labels).sum(axis=(1, 3))
    return image, votes.argmax(axis=-1).astype(np.uint8)


def render_scene_set(
    num_scenes: int, image_size: int, first_seed: int = 0, captions_per_scene: int = 3, progress: bool = True,
    variety: float = 0.0, attributes: bool = False,
) -> SceneSet:
    """``num_scenes`` scenes cycling through the main classes, seeds ``first_seed, first_seed + 1, ...``;
    with ``variety`` > 0 the scenes vary their background things and the captions say which they hold;
    with ``attributes`` the background things take named colours and the captions name colours."""
    images = np.empty((num_scenes, image_size, image_size, 3), np.uint8)
    label_maps = np.empty((num_scenes, image_size, image_size), np.uint8)
    classes = np.arange(num_scenes) % len(L.MAIN_CLASSES)
    seeds = first_seed + np.arange(num_scenes)
    captions = []
    for index in tqdm(range(num_scenes), desc="render scenes", disable=not progress):
        scene = render_scene(L.MAIN_CLASSES[classes[index]], int(seeds[index]), image_size * RENDER_FACTOR, variety, attributes)
        images[index], label_maps[index] = reduce_scene(scene, RENDER_FACTOR)
        reduced = Scene(images[index], label_maps[index], scene.main_class, attributes=scene.attributes)
        captions.append([caption(reduced, int(seeds[index]) * captions_per_scene + k, name_background=variety > 0,
                                 name_attributes=attributes)
                         for k in range(captions_per_scene)])
    return SceneSet(images, label_maps, classes, seeds, captions)
