"""The harness's writers: atomic JSON, Parquet manifests and PNGs on :func:`daamlib.io.atomic_path` (a killed
process leaves the old file or the new one, never half of one), and ``save_pretrained`` for models; every file
ends with mode 0666 & ~umask."""

from __future__ import annotations

import json
import os
import stat
import uuid
from pathlib import Path

import numpy as np

from daamlib.io import atomic_path, write_text


def write_json(path: str | os.PathLike, payload, indent: int = 1) -> Path:
    return write_text(path, json.dumps(payload, indent=indent, default=str))


def write_parquet(frame, path: str | os.PathLike) -> Path:
    """Write a pandas DataFrame as parquet, atomically, without its index."""
    with atomic_path(path) as temporary:
        frame.to_parquet(temporary, index=False)
    return Path(path)


def save_png(array: np.ndarray, path: str | os.PathLike) -> Path:
    """Write ``array`` (uint8 [H, W] or [H, W, 3]) as a PNG."""
    from PIL import Image

    with atomic_path(path) as temporary:
        Image.fromarray(array).save(temporary, format="PNG")
    return Path(path)


def save_pretrained(model, directory: str | os.PathLike, **kwargs) -> Path:
    """``model.save_pretrained(directory, **kwargs)`` (a diffusers or transformers model or pipeline), then every
    file it wrote given mode 0666 & ~umask: their safetensors writer may make private (0600) files."""
    model.save_pretrained(directory, **kwargs)
    return honour_umask(directory)


def honour_umask(directory: str | os.PathLike) -> Path:
    """Give every file under ``directory`` mode 0666 & ~umask (folders 0777 & ~umask), as ``open()`` and
    ``mkdir`` would: for trees written by others' savers (``save_pretrained``), which may make private files."""
    directory = Path(directory)
    probe = directory / f".mode-probe-{uuid.uuid4().hex[:12]}"
    os.mkdir(probe, 0o777)  # the kernel filters it by the umask: read the umask without setting it
    folder_mode = stat.S_IMODE(os.stat(probe).st_mode)
    os.rmdir(probe)
    file_mode = folder_mode & 0o666
    for root, folders, files in os.walk(directory):
        os.chmod(root, folder_mode)
        for name in files:
            os.chmod(os.path.join(root, name), file_mode)
    return directory
