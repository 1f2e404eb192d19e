"""Layer × timestep analysis of DAAM (thesis Appendix A, eq. A.1): which blocks and steps align with objects.

The inputs are records traced with ``per_step=True`` and their ground-truth masks.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import torch

from daamlib.methods import daam
from daamlib.metrics import iou_curve, thresholds
from daamlib.record import Record

ALL = "all"


def _max_miou(curves: list[np.ndarray]) -> float:
    return float(np.mean(curves, axis=0).max())


def layer_step_miou(samples: Sequence[tuple[Record, str, np.ndarray]], taus: np.ndarray | None = None) -> pd.DataFrame:
    """Max mIoU of D_{k,t,i} per (layer i, step t), plus the all-steps column and the all-layers row.

    ``samples`` are (record, word, mask) triples. Rows: layers from input to output (UNet: down, mid, up;
    DiT: block 0 onwards), then "all";
    columns: steps 0..T-1, then "all". The ("all", "all") cell is ordinary DAAM.
    """
    if not samples:
        raise ValueError("layer_step_miou needs at least one (record, word, mask) sample")
    taus = thresholds() if taus is None else taus
    first = samples[0][0]
    if not first.daam_steps:
        raise KeyError("the records have no per-step maps; trace with per_step=True")
    layers = [layer.name for layer in first.cross_layers]
    steps = list(range(first.num_steps))
    table = pd.DataFrame(index=layers + [ALL], columns=steps + [ALL], dtype=float)
    for layer in layers + [ALL]:
        for step in steps + [ALL]:
            chosen_layers = None if layer == ALL else [layer]
            chosen_steps = None if step == ALL else [step]
            curves = [iou_curve(daam(record, word, layers=chosen_layers, steps=chosen_steps), mask, taus)
                      for record, word, mask in samples]
            table.loc[layer, step] = _max_miou(curves)
    return table


def _correlation(maps: torch.Tensor) -> np.ndarray:
    """Pearson correlation between the rows of maps [k, H, W] (constant rows give NaN)."""
    flat = maps.flatten(1).double()
    flat = flat - flat.mean(dim=1, keepdim=True)
    norms = flat.norm(dim=1, keepdim=True)
    unit = flat / torch.where(norms > 0, norms, torch.nan)
    return (unit @ unit.T).numpy()


def layer_correlations(samples: Sequence[tuple[Record, str, np.ndarray]]) -> pd.DataFrame:
    """Mean over samples of the correlation between the per-layer maps D_{k,i} (Fig. A.2a)."""
    layers = [layer.name for layer in samples[0][0].cross_layers]
    matrices = [_correlation(torch.stack([daam(record, word, layers=[layer]) for layer in layers]))
                for record, word, _ in samples]
    return pd.DataFrame(np.nanmean(matrices, axis=0), index=layers, columns=layers)


def step_correlations(samples: Sequence[tuple[Record, str, np.ndarray]]) -> pd.DataFrame:
    """Mean over samples of the correlation between the per-step maps D_{k,t} (Fig. A.2b)."""
    steps = list(range(samples[0][0].num_steps))
    matrices = [_correlation(torch.stack([daam(record, word, steps=[step]) for step in steps]))
                for record, word, _ in samples]
    return pd.DataFrame(np.nanmean(matrices, axis=0), index=steps, columns=steps)


def short_layer_name(name: str) -> str:
    """UNet: 'up_blocks.1.attentions.0.transformer_blocks.0.attn2' -> 'up1.0', 'mid_block...' -> 'mid'; SDXL's
    further transformer blocks inside one attention get their index: '...attentions.0.transformer_blocks.5.attn2'
    -> 'up1.0.5', 'mid_block.attentions.0.transformer_blocks.2.attn2' -> 'mid.2'.
    DiT: 'transformer_blocks.3.attn2' -> 'block3', Flux's 'single_transformer_blocks.5.attn' -> 'single5'."""
    parts = name.split(".")
    if parts[0] in ("transformer_blocks", "single_transformer_blocks"):
        return f"{'single' if parts[0].startswith('single') else 'block'}{parts[1]}"
    block = parts[0].replace("_blocks", "").replace("_block", "")
    inner = parts[parts.index("transformer_blocks") + 1] if "transformer_blocks" in parts else "0"
    suffix = "" if inner == "0" else f".{inner}"
    if block == "mid":
        return "mid" + suffix
    return f"{block}{parts[1]}.{parts[3]}{suffix}"
