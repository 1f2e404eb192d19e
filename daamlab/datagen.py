"""Sharded, resumable generation of labelled datasets: image + record + labels + metadata per sample.

    python -m daamlab.datagen prompts.yaml --out runs/city [--model DIR_OR_ID] [--shard 0/2]
    accelerate launch --num_processes 4 -m daamlab.datagen prompts.yaml --out runs/city

Samples are the (prompt, seed) pairs of a prompt set (``daamlab.prompts``), numbered in order;
shard i of n takes the indices i, i + n, i + 2n, ... (under ``accelerate launch`` the shard comes
from ``RANK``/``WORLD_SIZE`` and each process uses ``cuda:LOCAL_RANK`` when CUDA is present). Each
sample is a folder ``samples/<index>`` whose ``meta.json`` is written last, so a folder without it is
unfinished and is redone on resume. Each shard keeps a Parquet manifest that is rewritten atomically
after every newly generated sample and lists finished samples only, and writes
``done-<i>-of-<n>.json`` when all its samples are finished.

The output folder records what it was made from (``fingerprint.json``: the prompt set, the generation
settings, the model and the shard count); a run with anything else in the same folder is refused, so
a folder never mixes two datasets. ``--export`` runs once, in shard 0, after every shard's completion
marker is there (it waits up to ``--wait-timeout`` seconds for the others).

Everything (prompt set, settings, shard, model path, output folder) is checked before the model loads.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm.auto import tqdm

from daamlib.generation import generate
from daamlab.io import save_png, write_json, write_parquet
from daamlib.labels import (
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
from daamlib.methods import daam
from daamlab.prompts import PromptSet

MANIFEST_COLUMNS = ["index", "prompt", "seed", "attributes", "words", "image", "record", "labels"]
FINGERPRINT_FILE = "fingerprint.json"
TASKS = ("txt2img", "img2img", "inpaint")
THRESHOLDS = ("fixed", "otsu")
RECORD_DTYPES = ("float16", "bfloat16", "float32")


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

    def validate(self) -> "GenerationSettings":
        """Raise ValueError / FileNotFoundError for a setting that cannot work; returns self."""
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {list(TASKS)}, not {self.task!r}")
        if self.threshold not in THRESHOLDS:
            raise ValueError(f"threshold must be 'fixed' (with tau) or 'otsu', not {self.threshold!r}")
        if self.threshold == "fixed" and (self.tau is None or not 0 <= self.tau <= 1):
            raise ValueError(f"threshold 'fixed' needs tau in [0, 1], not {self.tau!r}")
        if not isinstance(self.num_inference_steps, int) or self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, not {self.num_inference_steps!r}")
        if self.guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0 (1 or less turns guidance off), not {self.guidance_scale}")
        if self.record_dtype not in RECORD_DTYPES:
            raise ValueError(f"record_dtype must be one of {list(RECORD_DTYPES)}, not {self.record_dtype!r}")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and (value <= 0 or value % 8):
                raise ValueError(f"{name} must be a positive multiple of 8 (the VAE's scale), not {value}")
        if self.strength is not None and not 0 < self.strength <= 1:
            raise ValueError(f"strength must lie in (0, 1], not {self.strength}")
        if self.task in ("img2img", "inpaint"):
            _require_file(self.init_image, f"task {self.task!r} needs init_image (a path)")
        if self.task == "inpaint":
            _require_file(self.mask_image, "task 'inpaint' needs mask_image (a path; white = repaint)")
        return self


def _require_file(path: str | None, missing_message: str) -> None:
    if path is None:
        raise ValueError(missing_message)
    if not Path(path).is_file():
        raise FileNotFoundError(f"no file at {path} ({Path(path).resolve()}); check the path")


def all_samples(prompt_set: PromptSet) -> list[Sample]:
    samples = []
    for spec in prompt_set.expand():
        for seed in spec.seeds:
            samples.append(Sample(len(samples), spec.prompt, seed, spec.attributes, spec.words))
    return samples


def parse_shard(text: str | None, environ: dict | None = None) -> tuple[int, int]:
    """"i/n" → (i, n); ``None`` → from accelerate's RANK/WORLD_SIZE in ``environ`` (default
    ``os.environ``), else (0, 1)."""
    if text is None:
        environ = os.environ if environ is None else environ
        rank, world = environ.get("RANK", "0"), environ.get("WORLD_SIZE", "1")
        try:
            shard, count = int(rank), int(world)
        except ValueError:
            raise ValueError(f"RANK={rank!r} and WORLD_SIZE={world!r} must be integers (set by accelerate launch / torchrun)") from None
        where = f"RANK={shard}, WORLD_SIZE={count}"
    else:
        try:
            shard, count = (int(part) for part in text.split("/"))
        except ValueError:
            raise ValueError(f"--shard must look like 0/4 (shard index / number of shards), not {text!r}") from None
        where = f"--shard {text}"
    if count < 1:
        raise ValueError(f"{where}: the number of shards must be at least 1")
    if not 0 <= shard < count:
        raise ValueError(f"{where}: shard index {shard} is outside 0..{count - 1}")
    return shard, count


def shard_device(device: str | None, environ: dict | None = None, cuda_devices: int | None = None) -> str | None:
    """The device of this process: ``device`` when given; else ``cuda:LOCAL_RANK`` when CUDA is present
    (one GPU per process under ``accelerate launch``); else ``None`` (load_pipeline's default)."""
    if device is not None:
        return device
    environ = os.environ if environ is None else environ
    cuda_devices = torch.cuda.device_count() if cuda_devices is None else cuda_devices
    if cuda_devices == 0:
        return None
    text = environ.get("LOCAL_RANK", "0")
    try:
        local_rank = int(text)
    except ValueError:
        raise ValueError(f"LOCAL_RANK={text!r} must be an integer (set by accelerate launch / torchrun)") from None
    if not 0 <= local_rank < cuda_devices:
        raise ValueError(f"LOCAL_RANK={local_rank} but this machine has {cuda_devices} CUDA device(s); "
                         "launch at most one process per GPU or pass --device")
    return f"cuda:{local_rank}"


def model_identity(model: str | os.PathLike | None) -> str:
    """What names the model in a fingerprint: the directory's absolute path, or the hub id.

    Checks a directory before anything loads: a path that does not exist (and is no hub id ``org/name``)
    or a directory without ``model_index.json`` is an error."""
    if model is None:
        from daamlib.models import toy_model_dir

        if not (toy_model_dir() / "model_index.json").exists():
            raise FileNotFoundError(f"the embedded toy model is missing at {toy_model_dir()}; train it with "
                                    "`python -m daamlab.toyworld.train` or pass --model")
        return str(toy_model_dir().resolve())
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").exists():
            raise ValueError(f"--model {model}: {path.resolve()} is a directory but not a diffusers pipeline "
                             "(no model_index.json); pass a save_pretrained directory or a hub id")
        return str(path.resolve())
    text = str(model)
    if path.exists():
        raise ValueError(f"--model {model} is a file; pass a save_pretrained directory or a hub id")
    if text.startswith((".", "/", "~")) or text.count("/") > 1 or not all(text.split("/")):
        raise FileNotFoundError(f"--model {model}: no pipeline directory at {path.resolve()}, and it is not a hub id "
                                "like 'stabilityai/stable-diffusion-2-base'; check the path")
    return text


def _pipe_identity(pipe) -> str | None:
    name = getattr(pipe, "name_or_path", None)
    if not name:
        return None
    return str(Path(name).resolve()) if Path(name).is_dir() else str(name)


def shard_samples(samples: list[Sample], shard: int, num_shards: int) -> list[Sample]:
    return samples[shard::num_shards]


def _pipe_kwargs(settings: GenerationSettings) -> dict:
    settings.validate()
    kwargs = {}
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
    write_parquet(frame, path)


# -- what a folder was made from -------------------------------------------------------------------
def dataset_fingerprint(prompt_set: PromptSet, settings: GenerationSettings, model: str | None, num_shards: int,
                        trace_kwargs: dict | None = None) -> dict:
    """Everything that decides a folder's samples, as plain JSON data."""
    payload = {"prompt_set": prompt_set.to_dict(), "settings": asdict(settings), "model": model,
               "num_shards": num_shards, "trace": dict(sorted((trace_kwargs or {}).items()))}
    return json.loads(json.dumps(payload, default=str))


def check_fingerprint(out_dir: str | os.PathLike, fingerprint: dict) -> Path:
    """Write ``fingerprint.json`` in a new folder; in a used one, refuse a different fingerprint."""
    out_dir = Path(out_dir)
    path = out_dir / FINGERPRINT_FILE
    if path.exists():
        saved = json.loads(path.read_text())
        differing = sorted(key for key in set(saved) | set(fingerprint) if saved.get(key) != fingerprint.get(key))
        if differing:
            details = "; ".join(f"{key}: was {json.dumps(saved.get(key))[:200]}, now {json.dumps(fingerprint.get(key))[:200]}"
                                for key in differing)
            raise ValueError(
                f"{out_dir} holds a dataset made with another {', '.join(differing)} ({details}). A folder holds one "
                f"dataset: to start over pass another --out or delete {out_dir}; to continue that dataset, rerun with "
                f"the prompt set, settings, model and shard count recorded in {path}.")
        return path
    if (out_dir / "samples").exists() or any(out_dir.glob("manifest-*.parquet")):
        raise ValueError(f"{out_dir} holds samples but no {FINGERPRINT_FILE} (made by an older daamlib or by hand), so "
                         f"what they were made from is unknown; pass another --out or delete {out_dir}")
    write_json(path, fingerprint)
    return path


def _done_marker(out_dir: Path, shard: int, num_shards: int) -> Path:
    return out_dir / f"done-{shard:03d}-of-{num_shards:03d}.json"


def unfinished_shards(out_dir: str | os.PathLike, num_shards: int) -> list[int]:
    """Shards of ``out_dir`` without their completion marker."""
    return [shard for shard in range(num_shards) if not _done_marker(Path(out_dir), shard, num_shards).exists()]


def wait_for_shards(out_dir: str | os.PathLike, num_shards: int, timeout: float, poll: float = 1.0) -> None:
    """Block until every shard's completion marker exists; FileNotFoundError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while unfinished := unfinished_shards(out_dir, num_shards):
        if time.monotonic() >= deadline:
            raise FileNotFoundError(
                f"shards {unfinished} of {num_shards} did not finish within {timeout:.0f} s (no "
                f"{_done_marker(Path(out_dir), unfinished[0], num_shards).name} in {out_dir}); nothing was exported. "
                "Finish them (rerun the same command: finished samples are kept), then export with --export, "
                "or raise --wait-timeout")
        time.sleep(poll)


def generate_dataset(pipe, prompt_set: PromptSet, out_dir: str | os.PathLike, settings: GenerationSettings | None = None,
                     shard: int = 0, num_shards: int = 1, progress: bool = True, model: str | None = None,
                     **trace_kwargs) -> pd.DataFrame:
    """Generate this shard's samples into ``out_dir`` (finished samples are kept); returns its manifest.

    ``model`` names the model in the folder's fingerprint (default: the pipeline's ``name_or_path``);
    a folder made from another prompt set, settings, model or shard count is refused (ValueError)."""
    settings = settings or GenerationSettings()
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard {shard} is outside 0..{num_shards - 1}")
    pipe_kwargs = _pipe_kwargs(settings)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model if model is not None else _pipe_identity(pipe)
    check_fingerprint(out_dir, dataset_fingerprint(prompt_set, settings, model, num_shards, trace_kwargs))
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
                             guidance_scale=settings.guidance_scale, height=settings.height, width=settings.width,
                             pipe_kwargs=pipe_kwargs, **trace_kwargs)
        record.save(out_dir / row["record"], dtype=dtype)
        save_png(record.image, out_dir / row["image"])
        write_semantic_png(out_dir / row["labels"], label_map(record, sample.words, record.image.shape, settings))
        write_json(folder / "meta.json", {**asdict(sample), "settings": asdict(settings), "model": record.meta.model_id})
        _write_manifest(manifest_path, rows)  # lists this sample only now that it is complete
    _write_manifest(manifest_path, rows)
    write_json(_done_marker(out_dir, shard, num_shards), {"shard": shard, "num_shards": num_shards, "samples": len(rows)})
    return pd.read_parquet(manifest_path)


def merged_manifest(out_dir: str | os.PathLike) -> pd.DataFrame:
    """All shards' manifests, in sample order; duplicated indices are an error."""
    paths = sorted(Path(out_dir).glob("manifest-*.parquet"))
    if not paths:
        raise FileNotFoundError(f"no manifests in {out_dir}; run daamlab.datagen first")
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


def check_export_formats(formats: Sequence[str]) -> None:
    if isinstance(formats, str):
        raise ValueError(f"formats must be a list such as ['coco', 'yolo'], not the string {formats!r}")
    unknown = set(formats) - {"coco", "yolo"}
    if unknown:
        raise ValueError(f"unknown export formats {sorted(unknown)}; choose from coco, yolo")


def export_labels(out_dir: str | os.PathLike, formats: Sequence[str] = ("coco", "yolo")) -> dict[str, Path]:
    """Write the generated dataset's labels as COCO instances (``annotations/instances.json``, checked
    with pycocotools) and / or YOLO-seg (``yolo/``). The palette PNGs are already in every sample folder.

    Every shard must be finished (its completion marker written), else FileNotFoundError: a partial
    dataset is never exported."""
    check_export_formats(formats)
    out_dir = Path(out_dir)
    fingerprint_path = out_dir / FINGERPRINT_FILE
    if not fingerprint_path.exists():
        raise FileNotFoundError(f"no {FINGERPRINT_FILE} in {out_dir}: not a dataset folder; generate it with daamlab.datagen first")
    num_shards = json.loads(fingerprint_path.read_text())["num_shards"]
    unfinished = unfinished_shards(out_dir, num_shards)
    if unfinished:
        raise FileNotFoundError(f"shards {unfinished} of {num_shards} in {out_dir} are not finished; run them "
                                "(finished samples are kept), then export")
    images, categories = labelled_images(out_dir)
    paths = {}
    if "coco" in formats:
        paths["coco"] = write_coco(out_dir / "annotations" / "instances.json", images, categories)
    if "yolo" in formats:
        paths["yolo"] = write_yolo(out_dir / "yolo", images, categories)
    return paths


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Generate a labelled dataset from a prompt set (sharded, resumable).")
    parser.add_argument("prompt_set", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default=None, help="hub id or directory; default: the embedded toy model")
    parser.add_argument("--shard", default=None, help="i/n; default: RANK/WORLD_SIZE from accelerate, else 0/1")
    parser.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK when CUDA is present, else the CPU")
    numeric = {"num_inference_steps": int, "guidance_scale": float, "tau": float, "strength": float, "height": int, "width": int}
    choices = {"task": TASKS, "threshold": THRESHOLDS, "record_dtype": RECORD_DTYPES}
    for name, value in asdict(GenerationSettings()).items():
        parser.add_argument("--" + name.replace("_", "-"), type=numeric.get(name, str), default=value, choices=choices.get(name))
    parser.add_argument("--linear", action="store_true", help="also record the linear matrix")
    parser.add_argument("--export", nargs="*", default=[], choices=["coco", "yolo"],
                        help="after every shard has finished, export the labels (once, in shard 0)")
    parser.add_argument("--wait-timeout", type=float, default=3600.0,
                        help="seconds shard 0 waits for the other shards before --export gives up (default 3600)")
    return parser


def main(argv=None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    # everything is checked before the model loads
    try:
        shard, count = parse_shard(args.shard)
        settings = GenerationSettings(**{name: getattr(args, name) for name in asdict(GenerationSettings())}).validate()
        prompt_set = PromptSet.load(args.prompt_set)
        if not all_samples(prompt_set):
            raise ValueError(f"{args.prompt_set} expands to no samples")
        if args.out.exists() and not args.out.is_dir():
            raise ValueError(f"--out {args.out} is a file; pass a directory")
        if args.wait_timeout < 0:
            raise ValueError(f"--wait-timeout must be >= 0, not {args.wait_timeout}")
        model = model_identity(args.model)
        device = shard_device(args.device)
        trace_kwargs = {"linear": args.linear}
        args.out.mkdir(parents=True, exist_ok=True)
        check_fingerprint(args.out, dataset_fingerprint(prompt_set, settings, model, count, trace_kwargs))
    except (ValueError, KeyError, FileNotFoundError) as error:
        parser.error(str(error))
    from daamlib.models import load_pipeline

    pipe = load_pipeline(None if args.model is None else model, task=settings.task, device=device, progress_bar=False)
    generate_dataset(pipe, prompt_set, args.out, settings, shard, count, model=model, **trace_kwargs)
    if not args.export:
        return
    if shard != 0:
        print(f"shard {shard}/{count} finished; shard 0 exports once every shard has finished", flush=True)
        return
    wait_for_shards(args.out, count, args.wait_timeout)
    for name, path in export_labels(args.out, args.export).items():
        print(f"{name}: {path}", flush=True)


if __name__ == "__main__":
    main()
