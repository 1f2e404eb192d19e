"""The thesis dataset (§4.1): "a {class} in an urban environment", classes × seeds, records saved.

Layout of a dataset directory::

    records/<class>-<seed>.safetensors   the trace of each image (see daamlib.Record)
    images/<class>-<seed>.png            the generated image
    masks/<class>-<seed>.png             the ground-truth mask of the class (0/255), once annotated
    manifest.parquet                     one row per finished sample (SAMPLE_COLUMNS)

Every file is written atomically and a sample is finished when its record and image exist, so a
killed build resumes where it stopped and never lists a partial sample.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..generation import generate
from ..io import atomic_path, save_png
from ..record import Record, load_record
from ..toyworld.captions import thesis_prompt
from ..toyworld.labels import CLASS_WORD

SAMPLE_COLUMNS = ["name", "class_name", "word", "seed", "prompt", "record", "image", "mask"]


def sample_name(class_name: str, seed: int) -> str:
    return f"{class_name.replace(' ', '_')}-{seed:04d}"


@dataclass
class ThesisDataset:
    """A built dataset directory and its manifest."""

    directory: Path
    manifest: pd.DataFrame

    @classmethod
    def open(cls, directory: str | os.PathLike) -> "ThesisDataset":
        directory = Path(directory)
        path = directory / "manifest.parquet"
        if not path.exists():
            raise FileNotFoundError(f"no dataset at {directory}: build it with daamlib.experiments.build_dataset")
        return cls(directory, pd.read_parquet(path))

    @property
    def classes(self) -> list[str]:
        return list(dict.fromkeys(self.manifest["class_name"]))

    def rows(self, class_name: str | None = None) -> pd.DataFrame:
        if class_name is None:
            return self.manifest
        if class_name not in self.classes:
            raise KeyError(f"class {class_name!r} is not in this dataset; it has {self.classes}")
        return self.manifest[self.manifest["class_name"] == class_name]

    def record(self, row) -> Record:
        return load_record(self.directory / row["record"])

    def image(self, row) -> np.ndarray:
        return np.asarray(Image.open(self.directory / row["image"]).convert("RGB"))

    def mask(self, row) -> np.ndarray:
        """The ground-truth mask bool [H, W] of the sample's class."""
        path = self.directory / row["mask"]
        if not path.exists():
            raise FileNotFoundError(
                f"no ground-truth mask for {row['name']}; run annotate_toy_dataset (toy model) or import_masks"
            )
        return np.asarray(Image.open(path)) > 127

    def has_masks(self) -> bool:
        return all((self.directory / path).exists() for path in self.manifest["mask"])

    def write_manifest(self) -> None:
        write_manifest(self.directory, self.manifest)


def write_manifest(directory: Path, manifest: pd.DataFrame) -> None:
    with atomic_path(directory / "manifest.parquet") as temporary:
        manifest.to_parquet(temporary, index=False)


def build_dataset(
    pipe,
    directory: str | os.PathLike,
    classes: Sequence[str],
    seeds: Sequence[int],
    *,
    num_inference_steps: int = 30,
    guidance_scale: float = 7.5,
    prompt: Callable[[str], str] = thesis_prompt,
    record_dtype: torch.dtype = torch.float16,
    progress: bool = True,
    **trace_kwargs,
) -> ThesisDataset:
    """Generate one image per (class, seed) under a trace and save everything; resumes.

    ``trace_kwargs`` choose what each record keeps (default: DAAM sums and the linear matrix,
    as the thesis' DAAM and Linear DAAM experiments need).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    trace_kwargs = {"daam": True, "linear": True, **trace_kwargs}
    unknown = [name for name in classes if name not in CLASS_WORD]
    if unknown:
        raise ValueError(f"no attribution word for classes {unknown}; known classes: {sorted(CLASS_WORD)}")
    rows = []
    jobs = [(name, int(seed)) for name in classes for seed in seeds]
    for class_name, seed in tqdm(jobs, desc="dataset", disable=not progress):
        name = sample_name(class_name, seed)
        row = {"name": name, "class_name": class_name, "word": CLASS_WORD[class_name], "seed": seed,
               "prompt": prompt(class_name), "record": f"records/{name}.safetensors", "image": f"images/{name}.png",
               "mask": f"masks/{name}.png"}
        if not ((directory / row["record"]).exists() and (directory / row["image"]).exists()):
            record = generate(pipe, row["prompt"], seed=seed, num_inference_steps=num_inference_steps,
                              guidance_scale=guidance_scale, **trace_kwargs)[0]
            record.save(directory / row["record"], dtype=record_dtype)
            save_png(record.image, directory / row["image"])
        rows.append(row)
    dataset = ThesisDataset(directory, pd.DataFrame(rows, columns=SAMPLE_COLUMNS))
    dataset.write_manifest()
    return dataset


def annotate_toy_dataset(dataset: ThesisDataset, annotator) -> pd.DataFrame:
    """Ground truth for a toy-model dataset: the annotator's labels, one class mask per sample.

    Returns the per-sample share of pixels the annotator gives the class (prompt fidelity)."""
    from ..toyworld import labels as L

    shares = []
    for _, row in dataset.manifest.iterrows():
        labels = annotator(dataset.image(row))[0]
        mask = labels == L.IDS[row["class_name"]]
        save_png(np.uint8(mask) * 255, dataset.directory / row["mask"])
        save_png(labels, dataset.directory / "labels" / f"{row['name']}.png")
        shares.append({"name": row["name"], "class_name": row["class_name"], "seed": row["seed"], "share": float(mask.mean())})
    return pd.DataFrame(shares)


def import_masks(dataset: ThesisDataset, source_dir: str | os.PathLike) -> int:
    """Copy masks annotated elsewhere: ``<source_dir>/<name>.png`` (non-zero = object). Returns the count."""
    source_dir = Path(source_dir)
    count = 0
    for _, row in dataset.manifest.iterrows():
        path = source_dir / f"{row['name']}.png"
        if not path.exists():
            continue
        mask = np.asarray(Image.open(path).convert("L")) > 0
        expected = dataset.image(row).shape[:2]
        if mask.shape != expected:
            raise ValueError(f"{path} is {mask.shape[1]}x{mask.shape[0]} but its image is {expected[1]}x{expected[0]}")
        save_png(np.uint8(mask) * 255, dataset.directory / row["mask"])
        count += 1
    return count
