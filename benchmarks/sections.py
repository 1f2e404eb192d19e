"""The five measurements of the benchmark, each on one pipeline, each returning plain numbers.

Costs that grow with the number of denoising steps (per-step maps, the query cache, softmax
queries, re-running generation) are measured at the case's step count and also projected to the
thesis' 30 PNDM steps by multiplying the per-step cost; the table says which numbers are projected.
"""

from __future__ import annotations

import tempfile
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from measure import (
    interleaved,
    median_ratio,
    median_seconds,
    peak_memory,
    seconds,
    tensor_values,
)
from naive_capture import naive_daam, naive_trace

import daamlib
from daamlab.datagen import GenerationSettings, generate_dataset
from daamlab.io import save_png
from daamlib.methods.linear import linear_maps
from daamlib.methods.openvocab import openvocab_maps
from daamlab.prompts import PromptSet
from daamlib.text import TextEncoder

THESIS_STEPS = 30
THESIS_SECONDS_PER_EPOCH_PER_IMAGE = 0.5  # Appendix B: Apple M1 Max GPU


@dataclass(frozen=True)
class Case:
    """One pipeline and how to call it."""

    name: str
    description: str
    build: Callable[[], object]
    steps: int
    size: int | None  # image side in pixels; None: the model's default
    repeats: int
    template: str = "a {object} in an urban environment"
    word: str = "car"
    new_word: str = "tree"

    @property
    def prompt(self) -> str:
        return self.template.format(object=self.word)

    def call_kwargs(self, output_type: str = "latent") -> dict:
        kwargs = dict(prompt=[self.prompt], num_inference_steps=self.steps, output_type=output_type)
        if self.size is not None:
            kwargs.update(height=self.size, width=self.size)
        return kwargs


def unet_calls(pipe, steps: int) -> int:
    """UNet evaluations of a ``steps``-step generation (PNDM's PLMS repeats its first timestep: 31 for 30)."""
    pipe.scheduler.set_timesteps(steps)
    return len(pipe.scheduler.timesteps)


def to_thesis_steps(pipe, case: Case) -> float:
    """Factor from the measured step count to the thesis' 30 steps, counted in UNet evaluations."""
    return unet_calls(pipe, THESIS_STEPS) / unet_calls(pipe, case.steps)


FULL_RECORD = dict(per_step=True, queries=True, linear=True)
OPTIONS = {  # each trace option on top of the DAAM record
    "per_head": dict(per_head=True),
    "per_step": dict(per_step=True),
    "queries (on device)": dict(queries=True),
    "queries (pinned host)": dict(queries=True, query_device="cpu"),
    "linear": dict(linear=True),
    "self_attention": dict(self_attention=True),
    "contexts": dict(contexts=["a tree on a sidewalk"]),
}
EVERY_RECORD = dict(per_head=True, per_step=True, queries=True, linear=True, self_attention=True)


def _generate(pipe, case: Case, output_type: str = "latent"):
    return pipe(generator=torch.Generator().manual_seed(0), **case.call_kwargs(output_type))


def _latent_size(pipe, case: Case) -> tuple[int, int]:
    side = case.size or pipe.unet.config.sample_size * pipe.vae_scale_factor
    return side // pipe.vae_scale_factor, side // pipe.vae_scale_factor


# -- 1. capture overhead ---------------------------------------------------------------------------
def capture_overhead(pipe, case: Case) -> dict:
    """Median per-round ratio of generation time with each capture to generation without."""
    latent_size = _latent_size(pipe, case)
    contexts = {
        "plain": nullcontext,
        "daam": lambda: daamlib.trace(pipe),
        "full": lambda: daamlib.trace(pipe, **FULL_RECORD),
        "naive": lambda: naive_trace(pipe, latent_size, cfg=True),  # every case runs with guidance > 1
    }
    peaks: dict[str, int] = {}  # the largest increase of RSS over its value before the call

    def variant(name: str):
        def run():
            with peak_memory() as peak, contexts[name]():
                _generate(pipe, case)
            peaks[name] = max(peaks.get(name, 0), (peak.rss or 0) - (peak.rss_at_start or 0))
        return run

    times = interleaved({name: variant(name) for name in contexts}, case.repeats)
    return {
        "plain_seconds": float(np.median(times["plain"])),
        "ratios": {name: median_ratio(times, name, "plain") for name in contexts if name != "plain"},
        "times": times,
        "peak_rss_increase": peaks,
        "naive_agreement": naive_agreement(pipe, case, latent_size),
    }


def naive_agreement(pipe, case: Case, latent_size: tuple[int, int]) -> float:
    """max |daamlib - naive| / max |naive| over every token's DAAM map (bicubic, latent size)."""
    with naive_trace(pipe, latent_size, cfg=True) as sums, daamlib.trace(pipe) as tr:
        _generate(pipe, case)
    (record,) = tr.records
    ours = daamlib.token_maps(record, range(len(record.meta.token_ids)), upsample="bicubic")  # [n, H, W]
    naive = naive_daam(sums)[0]
    return float((ours - naive).abs().max() / naive.abs().max())


def option_overhead(pipe, case: Case) -> dict:
    """Each trace option alone against plain generation: median ratio and peak memory (CUDA max allocated)."""
    variants = {"plain": nullcontext, **{name: (lambda o=options: daamlib.trace(pipe, **o)) for name, options in OPTIONS.items()}}
    peaks: dict[str, int | None] = {}

    def variant(name: str):
        def run():
            with peak_memory() as peak, variants[name]() as traced:
                _generate(pipe, case)
                if traced is not None:
                    traced.records  # the records are part of the cost
            peaks[name] = peak.cuda if peak.cuda is not None else (peak.rss or 0) - (peak.rss_at_start or 0)
        return run

    times = interleaved({name: variant(name) for name in variants}, case.repeats)
    return {"ratios": {name: median_ratio(times, name, "plain") for name in OPTIONS}, "peaks": peaks,
            "peak_kind": "cuda max allocated" if torch.cuda.is_available() else "rss increase", "times": times}


# -- 2. bytes per image ----------------------------------------------------------------------------
def record_with_everything(pipe, case: Case) -> daamlib.Record:
    with daamlib.trace(pipe, **EVERY_RECORD) as tr:
        _generate(pipe, case)
    return tr.records[0]


def bytes_per_image(record: daamlib.Record, scale_to_thesis: float) -> dict:
    """Tensor bytes of each record kind (fp16 and fp32), at the measured and at 30 steps."""
    kinds = {
        "daam": (record.daam, False),
        "daam per head": (record.daam_heads, False),
        "daam per step": (record.daam_steps, True),
        "linear matrix": ([record.linear_matrix, record.linear_bias], False),
        "text embeddings": (record.text_embeddings, False),
        "self-attention (PCC)": (record.self_attention, False),
        "query cache, every step (OVAM)": (record.queries, True),
    }
    rows = {}
    for kind, (tensors, per_step) in kinds.items():
        values = tensor_values(tensors)
        scale = scale_to_thesis if per_step else 1.0
        rows[kind] = {"fp32": 4 * values, "fp16": 2 * values, "fp16_at_30_steps": round(2 * values * scale),
                      "grows_with_steps": per_step}
    query_cache = rows["query cache, every step (OVAM)"]["fp16_at_30_steps"]
    return {"kinds": rows, "query_cache_over_linear": query_cache / rows["linear matrix"]["fp16"]}


# -- 3. open-vocabulary query latency ------------------------------------------------------------
def query_latency(pipe, case: Case, record: daamlib.Record) -> dict:
    """Seconds for a heatmap of a word that was not in the prompt, three ways."""
    scale = to_thesis_steps(pipe, case)
    encoder = TextEncoder(pipe)
    vector = encoder.word_vector(case.new_word)[None]  # [1, d_text]
    encoded = encoder.encode(case.new_word)
    keys = encoded.embeddings[encoded.key_positions()]  # [m, d_text]: SOT, word, EOT
    stored = _fp16_round_trip(record)
    softmax_seconds = median_seconds(lambda: openvocab_maps(record, keys, pipe), repeats=3)
    rerun_seconds = median_seconds(lambda: _rerun(pipe, case), repeats=1, warmup=0)
    return {
        "linear_matvec": median_seconds(lambda: linear_maps(record, vector), repeats=200, warmup=5),
        "linear_matvec_fp16_record": median_seconds(lambda: linear_maps(stored, vector), repeats=200, warmup=5),
        "linear_with_text_encoding": median_seconds(lambda: daamlib.linear(record, case.new_word, pipe=pipe), repeats=5),
        "text_encoding": median_seconds(lambda: encoder.word_vector(case.new_word), repeats=5),
        "softmax_query_cache": softmax_seconds,
        "softmax_query_cache_at_30_steps": softmax_seconds * scale,
        "rerun_generation": rerun_seconds,
        "rerun_generation_at_30_steps": rerun_seconds * scale,
    }


def _fp16_round_trip(record: daamlib.Record) -> daamlib.Record:
    with tempfile.TemporaryDirectory() as folder:
        path = record.save(Path(folder) / "record", dtype=torch.float16)
        return daamlib.load_record(path)


def _rerun(pipe, case: Case) -> None:
    with daamlib.trace(pipe, daam=False, contexts=[case.new_word]) as tr:
        _generate(pipe, case)
    daamlib.openvocab(tr.records[0], case.new_word, case.new_word)


# -- 4. token optimization -----------------------------------------------------------------------
def optimization_speed(pipe, case: Case, record: daamlib.Record, epochs: int = 50, softmax_epochs: int = 3) -> dict:
    """Seconds per epoch per training image, linear and two-token softmax variants."""
    height, width = record.image_size
    mask = np.zeros((height, width), bool)
    mask[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = True

    def optimize(variant: str, count: int):
        return lambda: daamlib.optimize_tokens([record], [mask], init=case.word, variant=variant, epochs=count,
                                               pipe=pipe, progress=False)

    linear = seconds(optimize("linear", epochs)) / epochs
    softmax = seconds(optimize("softmax", softmax_epochs)) / softmax_epochs
    return {
        "linear": linear,
        "softmax": softmax,
        "softmax_at_30_steps": softmax * to_thesis_steps(pipe, case),
        "linear_speedup_over_thesis": THESIS_SECONDS_PER_EPOCH_PER_IMAGE / linear,
    }


def notebook04_projection(results: dict) -> dict:
    """Wall time of notebook 04 at the thesis protocol (4 classes, 1/2/5 training images, 500 epochs, both
    variants; 200 images re-run once to evaluate the softmax tokens), from the measured per-step costs."""
    classes, train_images, epochs, images = 4, 1 + 2 + 5, 500, 200
    record_epochs = classes * train_images * epochs  # per variant
    optimization = results["optimization"]
    plain = results["capture_overhead"]["plain_seconds"] * THESIS_STEPS / results["steps"]
    full = plain * results["capture_overhead"]["ratios"]["full"]
    seconds_total = (record_epochs * (optimization["linear"] + optimization["softmax_at_30_steps"])
                     + classes * train_images * full + images * plain * results["capture_overhead"]["ratios"]["daam"])
    return {"record_epochs_per_variant": record_epochs, "seconds": seconds_total,
            "optimization_seconds": record_epochs * (optimization["linear"] + optimization["softmax_at_30_steps"])}


# -- 5. dataset throughput -----------------------------------------------------------------------
def dataset_throughput(pipe, case: Case, rounds: int) -> dict:
    """Images per minute: generate + PNG, against daamlab.datagen (image, record, labels, meta, manifest)."""
    settings = GenerationSettings(num_inference_steps=case.steps, height=case.size, width=case.size)
    prompt_set = PromptSet.from_dict({"templates": [{"template": case.template, "attributes": {"object": [case.word]},
                                                     "words": ["object"]}]})
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        counter = iter(range(10**6))

        def plain():
            output = _generate(pipe, case, output_type="np")
            save_png((np.asarray(output.images[0]) * 255).round().astype(np.uint8), root / f"plain-{next(counter)}.png")

        def with_artifacts():
            generate_dataset(pipe, prompt_set, root / f"dataset-{next(counter)}", settings, progress=False)

        times = interleaved({"plain": plain, "datagen": with_artifacts}, rounds)
    return {
        "plain_images_per_minute": 60 / float(np.median(times["plain"])),
        "datagen_images_per_minute": 60 / float(np.median(times["datagen"])),
        "throughput_ratio": median_ratio(times, "plain", "datagen"),
        "times": times,
    }
