"""Atomic file writes (a killed process leaves the old file or the new one, never half of one), and the one
safetensors convention of records and optimized tokens: the ``.safetensors`` suffix is added when missing."""

from __future__ import annotations

import os
import stat
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` (same suffix) to write to; it replaces ``path`` when the
    ``with`` block succeeds and is removed when it fails.

    The final file has mode 0666 & ~umask, as ``open()`` gives, even where the writer moved a private file of
    its own to the temporary name (safetensors >= 0.8 does)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _create_temporary(path)
    mode = stat.S_IMODE(os.stat(temporary).st_mode)  # 0666 & ~umask, as the kernel applied it
    try:
        yield Path(temporary)
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def _create_temporary(path: Path) -> str:
    """Create an empty, new file beside ``path`` (same suffix) with mode 0666 & ~umask; returns its name."""
    temporary = str(path.parent / f".{path.name}.{uuid.uuid4().hex}{path.suffix}")  # 122 random bits: no collision
    os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    return temporary


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as temporary:
        temporary.write_text(text)
    return Path(path)


def safetensors_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path if path.suffix == ".safetensors" else path.with_name(path.name + ".safetensors")


def save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Write ``tensors`` atomically to ``path`` (``.safetensors`` added when missing); returns the path written."""
    from safetensors.torch import save_file

    path = safetensors_path(path)
    with atomic_path(path) as temporary:
        save_file(tensors, temporary, metadata=metadata)
    return path


def read_safetensors(path: str | os.PathLike, what: str, fix: str) -> tuple[Path, dict[str, str], dict]:
    """``(path, metadata, tensors)`` of a file written by :func:`save_safetensors` (found also without its
    suffix). A missing file raises ``FileNotFoundError``; a directory or damaged file a ``ValueError``
    naming ``what`` it should hold and how to ``fix`` it."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.exists() and safetensors_path(path).exists():
        path = safetensors_path(path)
    if not path.exists():
        raise FileNotFoundError(f"no {what} at {path}")
    if path.is_dir():
        raise ValueError(f"{path} is a directory; pass the {what}'s .safetensors file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return path, handle.metadata() or {}, {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path} is not a readable {what} ({error}); {fix}") from error
