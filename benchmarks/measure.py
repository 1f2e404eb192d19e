"""Timing and memory helpers: interleaved repetitions, median ratios, peak RSS and CUDA peaks."""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def seconds(function: Callable[[], object]) -> float:
    """Wall-clock seconds of one call (CUDA work included)."""
    _synchronize()
    start = time.perf_counter()
    function()
    _synchronize()
    return time.perf_counter() - start


def median_seconds(function: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        function()
    return statistics.median(seconds(function) for _ in range(repeats))


def interleaved(variants: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds of each variant over ``repeats`` rounds; each round runs every variant once,
    starting from a different one, so drifting machine load falls on all of them alike."""
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(seconds(variants[name]))
    return times


def median_ratio(times: dict[str, list[float]], numerator: str, denominator: str) -> float:
    """The median over rounds of the per-round ratio ``numerator / denominator``."""
    return statistics.median(a / b for a, b in zip(times[numerator], times[denominator]))


@dataclass
class PeakMemory:
    """Peak resident memory (and CUDA max allocated) while the ``with`` block ran, in bytes."""

    rss: int | None = None
    rss_at_start: int | None = None
    rss_is_process_peak: bool = False  # True where the kernel would not reset its peak counter
    cuda: int | None = None


@contextmanager
def peak_memory() -> Iterator[PeakMemory]:
    result = PeakMemory(rss_at_start=_status_bytes("VmRSS"))
    try:
        _CLEAR_REFS.write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        result.rss_is_process_peak = True
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        yield result
    finally:
        _synchronize()
        result.rss = _status_bytes("VmHWM")
        if torch.cuda.is_available():
            result.cuda = torch.cuda.max_memory_allocated()


def _status_bytes(field_name: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def tensor_values(tensors) -> int:
    """Number of values in the tensors of a dict, list or single tensor (nested; None counts 0)."""
    if isinstance(tensors, torch.Tensor):
        return tensors.numel()
    if isinstance(tensors, dict):
        return sum(tensor_values(value) for value in tensors.values())
    if isinstance(tensors, (list, tuple)):
        return sum(tensor_values(value) for value in tensors)
    return 0
