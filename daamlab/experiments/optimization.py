"""Token optimization as in thesis §4.4 and Appendix B: train on the first n images of a class, test on the rest.

The linear variant needs only the dataset's linear matrices. The softmax (two-token) variant
trains on re-generated training images with a query cache, and is evaluated on every image by
re-running its seeded generation with the optimized vectors attached as non-influencing keys. Its
background token starts at SOT (CLIP), or at the end token where the tokenizer has no SOT (T5).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import pandas as pd
from tqdm.auto import tqdm

from daamlib.generation import generate
from daamlib.methods import OpenVocabulary, OptimizedToken
from daamlib.optimize import OptimizedTokens, optimize_tokens
from daamlab.experiments.dataset import ThesisDataset
from daamlab.experiments.evaluation import Curves, class_curves


@dataclass
class OptimizationStudy:
    """Tokens by (variant, train size, class) and test/train curves by (variant, train size)."""

    tokens: dict[tuple[str, int, str], OptimizedTokens] = field(default_factory=dict)
    curves: dict[tuple[str, int], Curves] = field(default_factory=dict)
    train_seeds: dict[int, dict[str, set[int]]] = field(default_factory=dict)

    def table(self) -> pd.DataFrame:
        """Max mIoU (%) per class, with columns (variant, train size, train/test) — thesis Table 4.1."""
        columns = {}
        for (variant, size), curves in self.curves.items():
            train = self.train_seeds[size]
            columns[(variant, size, "train")] = curves.only_seeds(train).summary()["max_miou"] * 100
            columns[(variant, size, "test")] = curves.without_seeds(train).summary()["max_miou"] * 100
        return pd.DataFrame(columns)

    def histories(self) -> pd.DataFrame:
        """Loss per epoch, one column per (variant, train size, class)."""
        return pd.DataFrame({key: tokens.history for key, tokens in self.tokens.items()})


def token_path(tokens_dir: str | Path, variant: str, size: int, class_name: str) -> Path:
    """Where the study keeps the tokens of one (variant, train size, class)."""
    return Path(tokens_dir) / f"{variant}-{size}-{class_name.replace(' ', '_')}.safetensors"


def load_study_tokens(tokens_dir: str | Path, variant: str, size: int, classes: Sequence[str]) -> dict[str, OptimizedTokens]:
    """The study's tokens of one variant and train size, by class."""
    return {name: OptimizedTokens.load(token_path(tokens_dir, variant, size, name)) for name in classes}


def _train_seeds(dataset: ThesisDataset, size: int) -> dict[str, set[int]]:
    return {name: set(int(s) for s in dataset.rows(name)["seed"].iloc[:size]) for name in dataset.classes}


def run_optimization_study(
    dataset: ThesisDataset,
    pipe,
    train_sizes: Sequence[int] = (1, 2, 5),
    variants: Sequence[str] = ("linear", "softmax"),
    epochs: int = 500,
    learning_rate: float = 3.0,
    tokens_dir: str | Path | None = None,
    progress: bool = True,
    **generation_kwargs,
) -> OptimizationStudy:
    """Optimize one token set per (variant, train size, class) and evaluate it on every image.

    ``tokens_dir`` keeps the optimized tokens: a rerun loads them instead of optimizing again.
    ``generation_kwargs`` (num_inference_steps, guidance_scale) must match the dataset's.
    """
    largest = max(train_sizes)
    too_small = [name for name in dataset.classes if len(dataset.rows(name)) <= largest]
    if too_small:
        raise ValueError(f"classes {too_small} have no test image left after {largest} training images; add seeds")
    study = OptimizationStudy(train_seeds={size: _train_seeds(dataset, size) for size in train_sizes})
    for variant in variants:
        for class_name in tqdm(dataset.classes, desc=f"optimize {variant}", disable=not progress):
            rows = dataset.rows(class_name)
            query_records = None
            for size in train_sizes:
                path = None if tokens_dir is None else token_path(tokens_dir, variant, size, class_name)
                if path is not None and path.exists():
                    study.tokens[(variant, size, class_name)] = OptimizedTokens.load(path)
                    continue
                train_rows = rows.iloc[:size]
                if variant == "softmax":  # the query cache of the training images, re-generated
                    if query_records is None:
                        query_records = [_regenerate(pipe, row, generation_kwargs, queries=True)
                                         for _, row in rows.iloc[:largest].iterrows()]
                    records = query_records[:size]
                else:
                    records = [dataset.record(row) for _, row in train_rows.iterrows()]
                masks = [dataset.mask(row) for _, row in train_rows.iterrows()]
                tokens = optimize_tokens(records, masks, init=train_rows.iloc[0]["word"], variant=variant,
                                         epochs=epochs, learning_rate=learning_rate, pipe=pipe, progress=False)
                if path is not None:
                    tokens.save(path)
                study.tokens[(variant, size, class_name)] = tokens
        if variant == "softmax":  # one re-run per image evaluates every train size's tokens at once
            rerun = _rerun_with_tokens(dataset, pipe, study.tokens, train_sizes, generation_kwargs)
        for size in train_sizes:
            if variant == "softmax":
                object_token = OpenVocabulary(context=_context_name(size), token=0)  # keys: object, background
                study.curves[(variant, size)] = class_curves(dataset, object_token, records=lambda row: rerun[row["name"]])
            else:
                chosen = {name: study.tokens[(variant, size, name)] for name in dataset.classes}
                study.curves[(variant, size)] = class_curves(dataset, OptimizedToken.by_init_word(chosen, pipe))
    return study


def _context_name(size: int) -> str:
    return f"softmax-{size}"


def _regenerate(pipe, row, generation_kwargs: dict, **trace_kwargs):
    return generate(pipe, row["prompt"], seed=int(row["seed"]), **generation_kwargs, **trace_kwargs)[0]


def _rerun_with_tokens(dataset: ThesisDataset, pipe, tokens: dict, train_sizes: Sequence[int], generation_kwargs: dict) -> dict:
    """Re-run every image with its class's softmax tokens of every train size attached as contexts
    named ``softmax-<size>`` (softmax maps of optimized vectors without a query cache)."""
    records = {}
    for _, row in dataset.manifest.iterrows():
        contexts = {_context_name(size): tokens[("softmax", size, row["class_name"])].vectors for size in train_sizes}
        records[row["name"]] = _regenerate(pipe, row, generation_kwargs, contexts=contexts)
    return records
