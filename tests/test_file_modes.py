"""Every file the project writes ends with mode 0666 & ~umask (folders 0777 & ~umask), through each writer's public
entry point: records, optimized tokens, JSON, Parquet, PNG, COCO, YOLO, palette PNGs, models (``save_pretrained``,
the annotator), datagen shards and their exports, and the runner's results, figures and report. safetensors >= 0.8
writes its own 0600 file and moves it into place; the writers must undo that. (The executed notebooks of a whole
run are checked in tests/test_notebooks.py.)"""

from __future__ import annotations

import os
import stat
from contextlib import contextmanager
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import daamlib  # noqa: E402
from daamlib.labels import LabelledImage, write_coco, write_semantic_png, write_yolo  # noqa: E402
from daamlib.optimize import OptimizedTokens  # noqa: E402
from daamlab.datagen import GenerationSettings, export_labels, generate_dataset  # noqa: E402
from daamlab.io import save_png, save_pretrained, write_json, write_parquet  # noqa: E402
from daamlab.prompts import PromptSet  # noqa: E402
from daamlab.runs import save_figure, save_results, write_report  # noqa: E402
from daamlab.toyworld.annotator import Annotator, SegmentationNet  # noqa: E402

UMASKS = [0o022, 0o002, 0o077]


@contextmanager
def umask(value: int):
    previous = os.umask(value)
    try:
        yield
    finally:
        os.umask(previous)


def modes_under(root: Path) -> dict[str, int]:
    """{relative path: permission bits} of every file and folder under ``root`` (itself excluded)."""
    return {str(path.relative_to(root)): stat.S_IMODE(path.stat().st_mode) for path in sorted(root.rglob("*"))}


def assert_modes(root: Path, mask: int) -> None:
    expected = {name: (0o777 if (root / name).is_dir() else 0o666) & ~mask for name in modes_under(root)}
    assert modes_under(root) == expected
    assert expected, "nothing was written"


def write_records_and_tokens(directory: Path, pipe) -> None:
    (record,) = daamlib.generate(pipe, "a car in a street", seed=0, num_inference_steps=1)
    record.save(directory / "record")
    record.save(directory / "record-fp16", dtype=torch.float16)
    tokens = OptimizedTokens(vectors=torch.zeros(2, 4), variant="softmax", loss="thesis", names=["car", "bg"],
                             model_id="tiny")
    tokens.save(directory / "tokens")


def write_tables_and_images(directory: Path, pipe=None) -> None:
    write_json(directory / "a.json", {"x": 1})
    write_parquet(pd.DataFrame({"x": [1, 2]}), directory / "a.parquet")
    save_png(np.zeros((4, 6, 3), np.uint8), directory / "a.png")


def write_label_exports(directory: Path, pipe=None) -> None:
    mask = np.zeros((8, 8), bool)
    mask[2:6, 2:6] = True
    image = LabelledImage("images/0.png", 8, 8, [("car", mask)])
    write_coco(directory / "coco" / "instances.json", [image], ["car"])
    write_yolo(directory / "yolo", [image], ["car"])
    write_semantic_png(directory / "labels.png", mask.astype(np.uint8))


def write_models(directory: Path, pipe) -> None:
    save_pretrained(pipe, directory / "pipeline", safe_serialization=True)
    torch.manual_seed(0)
    Annotator(SegmentationNet()).save_pretrained(directory / "annotator")


def write_runner_outputs(directory: Path, pipe=None) -> None:
    save_results(directory, "02_daam_baseline", {"max_miou": 0.5})
    figure, axis = plt.subplots()
    axis.plot([0, 1])
    save_figure(directory, "curves", figure)
    plt.close(figure)
    write_report(directory, {"name": "toy-smoke", "notebooks": ["02_daam_baseline"]})


WRITERS = [write_records_and_tokens, write_tables_and_images, write_label_exports, write_models, write_runner_outputs]


@pytest.mark.parametrize("mask", UMASKS, ids=[f"umask {m:03o}" for m in UMASKS])
@pytest.mark.parametrize("writer", WRITERS, ids=[w.__name__ for w in WRITERS])
def test_every_writer_honours_the_umask(tmp_path, pipe, writer, mask):
    out = tmp_path / "out"
    with umask(mask):
        out.mkdir()
        writer(out, pipe)
    assert_modes(out, mask)


@pytest.mark.parametrize("mask", [0o002, 0o077], ids=["umask 002", "umask 077"])
def test_datagen_shards_and_their_exports_honour_the_umask(tmp_path, pipe, mask):
    prompt_set = PromptSet.from_dict({"templates": [{"template": "a {object} in a street",
                                                     "attributes": {"object": ["car"]}, "words": ["object"]}]})
    out = tmp_path / "out"
    with umask(mask):
        out.mkdir()
        generate_dataset(pipe, prompt_set, out, GenerationSettings(num_inference_steps=1), progress=False, model="tiny")
        export_labels(out, ("coco", "yolo"))
    assert any(path.suffix == ".safetensors" for path in out.rglob("*"))
    assert_modes(out, mask)


def test_the_umask_is_read_not_assumed(tmp_path):
    """The 0600 that safetensors gives is undone even where it would be the right answer for another umask."""
    from daamlab.io import honour_umask

    with umask(0o027):
        (tmp_path / "tree" / "inner").mkdir(parents=True)
        private = tmp_path / "tree" / "inner" / "weights.bin"
        private.write_bytes(b"x")
        os.chmod(private, 0o600)
        os.chmod(tmp_path / "tree" / "inner", 0o700)
        honour_umask(tmp_path / "tree")
    assert modes_under(tmp_path / "tree") == {"inner": 0o750, "inner/weights.bin": 0o640}
