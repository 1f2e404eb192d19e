"""The thesis dataset (§4.1): "a {class} in an urban environment", classes × seeds, records saved.

Layout of a dataset directory::

    records/<class>-<seed>.safetensors   the trace of each image (see daamlib.Record)
    images/<class>-<seed>.png            the generated image
    masks/<class>-<seed>.png             the ground-truth mask of the class (0/255), once annotated
    manifest.parquet                     one row per finished sample (SAMPLE_COLUMNS)

Sample names (:func:`sample_name`), the one naming rule for every file above and for masks imported
from elsewhere (``import_masks``): the class with spaces as underscores, a hyphen, the seed with four
digits, e.g. ``car-0007`` and ``traffic_light-0003`` (so ``traffic_light-0003.png``).

Every file is written atomically and a sample is finished when its record and image exist, so a
killed build resumes where it stopped and never lists a partial sample.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm.auto import tqdm

from daamlib.generation import generate
from daamlab.experiments.families import dataset_trace_options
from daamlab.io import save_png, write_parquet
from daamlib.record import Record, load_record
from daamlab.toyworld.captions import thesis_prompt
from daamlab.toyworld.labels import CLASS_WORD

SAMPLE_COLUMNS = ["name", "class_name", "word", "seed", "prompt", "record", "image", "mask"]


MASK_NAMING = "<class with spaces as underscores>-<seed with 4 digits>.png, e.g. traffic_light-0003.png"


def sample_name(class_name: str, seed: int) -> str:
    """The name of a sample's files: ``traffic_light-0003`` for ("traffic light", 3)."""
    return f"{class_name.replace(' ', '_')}-{seed:04d}"


def ground_truth_source(model, mask_dir=None, sam_checkpoint=None) -> str:
    """Where a dataset's ground truth comes from: "masks" (``mask_dir``), "annotator" (a toy-world model's
    own), or "sam" (``sam_checkpoint``). Checks the paths; no source at all is a ValueError, raised
    before anything is generated."""
    from daamlab.toyworld.annotator import find_annotator

    if mask_dir is not None:
        if not Path(mask_dir).is_dir():
            raise FileNotFoundError(f"mask_dir {mask_dir!r}: no directory at {Path(mask_dir).resolve()}; "
                                    f"it should hold one PNG per sample named {MASK_NAMING}")
        return "masks"
    if _looks_local(model) and find_annotator(model) is not None:
        return "annotator"
    if sam_checkpoint is not None:
        if not Path(sam_checkpoint).is_file():
            raise FileNotFoundError(f"sam_checkpoint {sam_checkpoint!r}: no file at {Path(sam_checkpoint).resolve()}; "
                                    "download it from the Segment Anything release (e.g. sam_vit_h_4b8939.pth)")
        return "sam"
    raise ValueError(f"model {model!r} has no toy-world annotator, so its ground truth must come from masks annotated "
                     f"elsewhere (set mask_dir: PNGs named {MASK_NAMING}) or from SAM prompted by the heatmaps (set "
                     "sam_checkpoint to a Segment Anything checkpoint)")


def _looks_local(model) -> bool:
    return model is None or Path(model).is_dir()


def label_ids(classes: Sequence[str]) -> dict[str, int]:
    """The one label rule of every label map in the experiments: background 0, then 1 + each class's index."""
    return {"background": 0, **{name: 1 + index for index, name in enumerate(classes)}}


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
            raise FileNotFoundError(f"no dataset at {directory}: build it with daamlab.experiments.build_dataset")
        return cls(directory, pd.read_parquet(path))

    @property
    def classes(self) -> list[str]:
        return list(dict.fromkeys(self.manifest["class_name"]))

    @property
    def label_ids(self) -> dict[str, int]:
        return label_ids(self.classes)

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
        return not self.missing_masks()

    def missing_masks(self) -> list[str]:
        """Names of the samples without a ground-truth mask file."""
        return [row["name"] for _, row in self.manifest.iterrows() if not (self.directory / row["mask"]).exists()]

    def require_masks(self) -> None:
        """FileNotFoundError listing every sample without a ground-truth mask."""
        missing = self.missing_masks()
        if missing:
            shown = ", ".join(f"{name}.png" for name in missing[:20]) + (f" and {len(missing) - 20} more" if len(missing) > 20 else "")
            raise FileNotFoundError(f"{len(missing)} of {len(self.manifest)} samples have no ground-truth mask in "
                                    f"{self.directory / 'masks'}: {shown}. Annotate them (import_masks, SAM review) "
                                    f"with files named {MASK_NAMING}")

    def write_manifest(self) -> None:
        write_manifest(self.directory, self.manifest)


def write_manifest(directory: Path, manifest: pd.DataFrame) -> None:
    write_parquet(manifest, directory / "manifest.parquet")


def build_dataset(
    pipe,
    directory: str | os.PathLike,
    classes: Sequence[str],
    seeds: Sequence[int],
    *,
    num_inference_steps: int = 30,
    guidance_scale: float = 7.5,
    prompt: Callable[[str], str] = thesis_prompt,
    class_words: Mapping[str, str] = CLASS_WORD,
    record_dtype: torch.dtype = torch.float16,
    progress: bool = True,
    **trace_kwargs,
) -> ThesisDataset:
    """Generate one image per (class, seed) under a trace and save everything; resumes.

    ``class_words`` names the word attributed for each class (default: the thesis' four classes, which
    the toy world renders); ``prompt`` makes a class's prompt. ``trace_kwargs`` choose what each record
    keeps (default: DAAM sums and the linear matrix, as the thesis' DAAM and Linear DAAM experiments need, and on
    SD3 and Flux ConceptAttention's maps of the class words and the urban background concepts).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    trace_kwargs = {"daam": True, "linear": True, **dataset_trace_options(pipe, [class_words.get(c, c) for c in classes]),
                    **trace_kwargs}
    unknown = [name for name in classes if name not in class_words]
    if unknown:
        raise ValueError(f"no attribution word for classes {unknown}; pass class_words={{class: word}} "
                         f"(known here: {sorted(class_words)})")
    rows = []
    jobs = [(name, int(seed)) for name in classes for seed in seeds]
    for class_name, seed in tqdm(jobs, desc="dataset", disable=not progress):
        name = sample_name(class_name, seed)
        row = {"name": name, "class_name": class_name, "word": class_words[class_name], "seed": seed,
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
    from daamlab.toyworld import labels as L

    shares = []
    for _, row in dataset.manifest.iterrows():
        labels = annotator(dataset.image(row))[0]
        mask = labels == L.IDS[row["class_name"]]
        save_png(np.uint8(mask) * 255, dataset.directory / row["mask"])
        save_png(labels, dataset.directory / "labels" / f"{row['name']}.png")
        shares.append({"name": row["name"], "class_name": row["class_name"], "seed": row["seed"], "share": float(mask.mean())})
    return pd.DataFrame(shares)


def import_masks(dataset: ThesisDataset, source_dir: str | os.PathLike) -> int:
    """Copy masks annotated elsewhere: one ``<source_dir>/<name>.png`` per sample (non-zero = object),
    named by :func:`sample_name` (``traffic_light-0003.png``). Returns the count.

    Every sample needs its file and every PNG must belong to a sample: otherwise nothing is copied and
    the error lists the missing and the unexpected file names."""
    source_dir = Path(source_dir)
    if not source_dir.is_dir():
        raise FileNotFoundError(f"mask_dir {source_dir}: no such directory ({source_dir.resolve()})")
    expected = {f"{name}.png": row for name, (_, row) in zip(dataset.manifest["name"], dataset.manifest.iterrows())}
    present = {path.name for path in source_dir.glob("*.png")}
    missing, unexpected = sorted(set(expected) - present), sorted(present - set(expected))
    if missing or unexpected:
        def listed(names):
            return ", ".join(names[:20]) + (f" and {len(names) - 20} more" if len(names) > 20 else "") if names else "none"
        raise ValueError(f"the masks in {source_dir} do not match the dataset's samples; files are named {MASK_NAMING}. "
                         f"Missing ({len(missing)}): {listed(missing)}. Unexpected ({len(unexpected)}): {listed(unexpected)}. "
                         "Rename or add the files, then import again (nothing was imported)")
    masks = {}
    for file_name, row in expected.items():
        mask = np.asarray(Image.open(source_dir / file_name).convert("L")) > 0
        size = dataset.image(row).shape[:2]
        if mask.shape != size:
            raise ValueError(f"{source_dir / file_name} is {mask.shape[1]}x{mask.shape[0]} but its image is {size[1]}x{size[0]}; "
                             "nothing was imported")
        masks[row["mask"]] = mask
    for path, mask in masks.items():
        save_png(np.uint8(mask) * 255, dataset.directory / path)
    return len(masks)
