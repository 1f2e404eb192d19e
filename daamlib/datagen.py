"""Sharded, resumable generation of labelled datasets: image + record + labels + metadata per sample.

    python -m daamlib.datagen prompts.yaml --out runs/city [--model DIR_OR_ID] [--shard 0/2]
    accelerate launch --num_processes 4 -m daamlib.datagen prompts.yaml --out runs/city

Samples are the (prompt, seed) pairs of a prompt set (``daamlib.prompts``), numbered in order;
shard i of n takes the indices i, i + n, i + 2n, ... (under ``accelerate launch`` the shard comes
from ``RANK``/``WORLD_SIZE``). Each sample is a folder ``samples/<index>`` whose ``meta.json`` is
written last, so a folder without it is unfinished and is redone on resume. Each shard keeps a
Parquet manifest that is rewritten atomically after every newly generated sample and lists finished
samples only.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm.auto import tqdm

from .generation import generate
from .io import atomic_path, save_png, write_json
from .labels import (
    BACKGROUND,
    UNCERTAIN,
    LabelledImage,
    clean_mask,
    heatmap_to_mask,
    instances,
    write_coco,
    write_semantic_png,
    write_yolo,
)
from .methods import daam
from .prompts import PromptSet

MANIFEST_COLUMNS = ["index", "prompt", "seed", "attributes", "words", "image", "record", "labels"]


@dataclass(frozen=True)
class Sample:
    index: int
    prompt: str
    seed: int
    attributes: dict
    words: tuple[str, ...]

    @property
    def folder(self) -> str:
        return f"samples/{self.index:06d}"


@dataclass
class GenerationSettings:
    task: str = "txt2img"
    num_inference_steps: int = 30
    guidance_scale: float = 7.5
    threshold: str = "fixed"  # "fixed" (tau) or "otsu"
    tau: float | None = 0.4
    init_image: str | None = None  # img2img and inpaint
    mask_image: str | None = None  # inpaint
    strength: float | None = None  # img2img / inpaint
    record_dtype: str = "float16"
    height: int | None = None  # None: the model's default resolution
    width: int | None = None


def all_samples(prompt_set: PromptSet) -> list[Sample]:
    samples = []
    for spec in prompt_set.expand():
        for seed in spec.seeds:
            samples.append(Sample(len(samples), spec.prompt, seed, spec.attributes, spec.words))
    return samples


def parse_shard(text: str | None) -> tuple[int, int]:
    """"i/n" → (i, n); ``None`` → from accelerate's RANK/WORLD_SIZE, else (0, 1)."""
    if text is None:
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    try:
        shard, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like 0/4 (shard index / number of shards), not {text!r}") from None
    if not 0 <= shard < count:
        raise ValueError(f"shard index {shard} is outside 0..{count - 1}")
    return shard, count


def shard_samples(samples: list[Sample], shard: int, num_shards: int) -> list[Sample]:
    return samples[shard::num_shards]


def _pipe_kwargs(settings: GenerationSettings) -> dict:
    kwargs = {name: value for name, value in (("height", settings.height), ("width", settings.width)) if value is not None}
    if settings.task in ("img2img", "inpaint"):
        if settings.init_image is None:
            raise ValueError(f"task {settings.task!r} needs init_image (a path)")
        kwargs["image"] = Image.open(settings.init_image).convert("RGB")
        if settings.strength is not None:
            kwargs["strength"] = settings.strength
    if settings.task == "inpaint":
        if settings.mask_image is None:
            raise ValueError("task 'inpaint' needs mask_image (a path; white = repaint)")
        kwargs["mask_image"] = Image.open(settings.mask_image).convert("L")
    elif settings.task not in ("txt2img", "img2img"):
        raise ValueError(f"task must be txt2img, img2img or inpaint, not {settings.task!r}")
    return kwargs


def label_map(record, words, image_shape, settings: GenerationSettings) -> np.ndarray:
    """Semantic labels uint8 [H, W]: 1 + the word's index where only that word's mask covers the pixel,
    UNCERTAIN where several do, BACKGROUND where none does."""
    result = np.full(image_shape[:2], BACKGROUND, np.uint8)
    claims = np.zeros(image_shape[:2], np.int32)
    for index, word in enumerate(words):
        mask = heatmap_to_mask(daam(record, word), image_shape, settings.threshold, settings.tau)
        result[mask] = index + 1
        claims += mask
    result[claims > 1] = UNCERTAIN
    return result


def _write_manifest(path: Path, rows: list[dict]) -> None:
    frame = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    frame["attributes"] = frame["attributes"].map(json.dumps)
    frame["words"] = frame["words"].map(list)
    with atomic_path(path) as temporary:
        frame.to_parquet(temporary, index=False)


def generate_dataset(pipe, prompt_set: PromptSet, out_dir: str | os.PathLike, settings: GenerationSettings | None = None,
                     shard: int = 0, num_shards: int = 1, progress: bool = True, **trace_kwargs) -> pd.DataFrame:
    """Generate this shard's samples into ``out_dir`` (finished samples are kept); returns its manifest."""
    settings = settings or GenerationSettings()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe_kwargs = _pipe_kwargs(settings)
    dtype = getattr(torch, settings.record_dtype)
    manifest_path = out_dir / f"manifest-{shard:03d}-of-{num_shards:03d}.parquet"
    rows = []
    for sample in tqdm(shard_samples(all_samples(prompt_set), shard, num_shards), desc=f"shard {shard}/{num_shards}",
                       disable=not progress):
        folder = out_dir / sample.folder
        row = {"index": sample.index, "prompt": sample.prompt, "seed": sample.seed, "attributes": sample.attributes,
               "words": sample.words, "image": f"{sample.folder}/image.png", "record": f"{sample.folder}/record.safetensors",
               "labels": f"{sample.folder}/labels.png"}
        rows.append(row)
        if (folder / "meta.json").exists():  # finished by an earlier run
            continue
        folder.mkdir(parents=True, exist_ok=True)
        (record,) = generate(pipe, sample.prompt, seed=sample.seed, num_inference_steps=settings.num_inference_steps,
                             guidance_scale=settings.guidance_scale, pipe_kwargs=pipe_kwargs, **trace_kwargs)
        record.save(out_dir / row["record"], dtype=dtype)
        save_png(record.image, out_dir / row["image"])
        write_semantic_png(out_dir / row["labels"], label_map(record, sample.words, record.image.shape, settings))
        write_json(folder / "meta.json", {**asdict(sample), "settings": asdict(settings), "model": record.meta.model_id})
        _write_manifest(manifest_path, rows)  # lists this sample only now that it is complete
    _write_manifest(manifest_path, rows)
    return pd.read_parquet(manifest_path)


def merged_manifest(out_dir: str | os.PathLike) -> pd.DataFrame:
    """All shards' manifests, in sample order; duplicated indices are an error."""
    paths = sorted(Path(out_dir).glob("manifest-*.parquet"))
    if not paths:
        raise FileNotFoundError(f"no manifests in {out_dir}; run daamlib.datagen first")
    frame = pd.concat([pd.read_parquet(path) for path in paths]).sort_values("index").reset_index(drop=True)
    duplicated = frame["index"][frame["index"].duplicated()].tolist()
    if duplicated:
        raise ValueError(f"samples {duplicated[:10]} appear in several shard manifests: were shards run with different counts?")
    return frame


def labelled_images(out_dir: str | os.PathLike, min_area: int = 16) -> tuple[list[LabelledImage], list[str]]:
    """Every sample's labels as instances: each word's region cleaned (``clean_mask``) and split into
    connected components. Returns the images and the categories (every word, sorted)."""
    out_dir = Path(out_dir)
    manifest = merged_manifest(out_dir)
    categories = sorted({word for words in manifest["words"] for word in words})
    images = []
    for _, row in manifest.iterrows():
        labels = np.asarray(Image.open(out_dir / row["labels"]))
        objects = [(word, instance) for index, word in enumerate(row["words"])
                   for instance in instances(clean_mask(labels == index + 1, min_area))]
        images.append(LabelledImage(row["image"], labels.shape[0], labels.shape[1], objects))
    return images, categories


def export_labels(out_dir: str | os.PathLike, formats: Sequence[str] = ("coco", "yolo")) -> dict[str, Path]:
    """Write the generated dataset's labels as COCO instances (``annotations/instances.json``, checked
    with pycocotools) and / or YOLO-seg (``yolo/``). The palette PNGs are already in every sample folder."""
    unknown = set(formats) - {"coco", "yolo"}
    if unknown:
        raise ValueError(f"unknown export formats {sorted(unknown)}; choose from coco, yolo")
    out_dir = Path(out_dir)
    images, categories = labelled_images(out_dir)
    paths = {}
    if "coco" in formats:
        paths["coco"] = write_coco(out_dir / "annotations" / "instances.json", images, categories)
    if "yolo" in formats:
        paths["yolo"] = write_yolo(out_dir / "yolo", images, categories)
    return paths


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Generate a labelled dataset from a prompt set (sharded, resumable).")
    parser.add_argument("prompt_set", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default=None, help="hub id or directory; default: the embedded toy model")
    parser.add_argument("--shard", default=None, help="i/n; default: RANK/WORLD_SIZE from accelerate, else 0/1")
    parser.add_argument("--device", default=None)
    numeric = {"num_inference_steps": int, "guidance_scale": float, "tau": float, "strength": float, "height": int, "width": int}
    for name, value in asdict(GenerationSettings()).items():
        parser.add_argument("--" + name.replace("_", "-"), type=numeric.get(name, str), default=value)
    parser.add_argument("--linear", action="store_true", help="also record the linear matrix")
    parser.add_argument("--export", nargs="*", default=[], choices=["coco", "yolo"],
                        help="after generating, export the labels (all shards must be finished)")
    args = parser.parse_args(argv)
    from .models import load_pipeline

    shard, count = parse_shard(args.shard)
    settings = GenerationSettings(**{name: getattr(args, name) for name in asdict(GenerationSettings())})
    pipe = load_pipeline(args.model, task=settings.task, device=args.device, progress_bar=False)
    generate_dataset(pipe, PromptSet.load(args.prompt_set), args.out, settings, shard, count, linear=args.linear)
    if args.export:
        for name, path in export_labels(args.out, args.export).items():
            print(f"{name}: {path}")


if __name__ == "__main__":
    main()
