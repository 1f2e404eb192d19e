"""Render benchmark results (JSON) as the Markdown tables of docs/benchmarks.md."""

from __future__ import annotations

import json
from pathlib import Path

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
TARGETS = {
    "overhead": 1.05,  # DAAM record / plain generation, SD 2-base
    "bytes": 80.0,  # query cache (30 steps) / linear matrix
    "linear_latency": 0.002,  # seconds, SD 2-base at latent resolution
    "optimization": 200.0,  # thesis seconds per epoch per image / ours, linear
    "throughput": 0.9,  # datagen / plain images per minute
    "option_overhead": 1.15,  # each trace option / plain generation, on the GPU
}


def _bytes(value: float | None) -> str:
    if value is None:
        return "–"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(value) >= size:
            return f"{value / size:,.1f} {unit}"
    return f"{value:.0f} B"


def _peak(section: dict) -> str:
    if section["rss"] is None:
        return "–"
    return f"{_bytes(section['rss'])} (+{_bytes(section['rss'] - section['rss_at_start'])})"


def _ms(value: float) -> str:
    return f"{value * 1e3:,.2f} ms" if value < 1 else f"{value:,.2f} s"


def _check(value: float, target: float, higher_is_better: bool) -> str:
    met = value >= target if higher_is_better else value <= target
    return "met" if met else "**missed**"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def render(results: list[dict]) -> str:
    parts = []
    machines = {json.dumps(r["machine"], sort_keys=True): r["machine"] for r in results}
    for info in machines.values():
        parts.append(
            f"Machine: {info['cpu']}, {info['cores']} cores ({info['threads']} torch threads), {info['memory_gib']} GiB"
            + (f", {info['gpu']}" if "gpu" in info else ", no GPU")
            + f"; torch {info['torch']}, diffusers {info['diffusers']}, transformers {info['transformers']}, "
            f"daamlib {info['daamlib']}."
        )
    parts.append(_table(["case", "device", "what", "steps measured"],
                        [[r["case"], r["device"], r["description"], str(r["steps"])] for r in results]))

    parts.append("### 1. Capture overhead (generation time with capture / without; median of per-round ratios)")
    rows = []
    for r in results:
        overhead = r["capture_overhead"]
        ratios = overhead["ratios"]
        target = _check(ratios["daam"], TARGETS["overhead"], False) if r["case"] == "sd2-base" else "–"
        rows.append([r["case"], r["device"], _ms(overhead["plain_seconds"]), f"{ratios['daam']:.3f}×", f"{ratios['full']:.3f}×",
                     f"{ratios['naive']:.3f}×", f"{overhead['naive_agreement']:.1e}", str(len(overhead["times"]["plain"])), target])
    parts.append(_table(["case", "device", "plain generation", "DAAM record", "full record", "naive (upsample every step)",
                         "naive vs daamlib max rel. diff", "rounds", f"target ≤ {TARGETS['overhead']} (SD 2-base)"], rows))
    parts.append("The full record is DAAM + per-step maps + query cache at every step + the linear matrix. "
                 "Generation stops at the latents (no VAE decode), which makes the ratios stricter.")

    parts.append("### 2. Bytes per image, by record kind (tensor bytes; fp16 as `Record.save(dtype=torch.float16)` writes)")
    rows = []
    for r in results:
        for kind, row in r["bytes_per_image"]["kinds"].items():
            if row["fp32"]:
                rows.append([r["case"], kind, _bytes(row["fp16"]), _bytes(row["fp32"]),
                             _bytes(row["fp16_at_30_steps"]) + (" (projected)" if row["grows_with_steps"] and r["steps"] != 30 else "")])
    parts.append(_table(["case", "kind", "fp16, measured steps", "fp32, measured steps", "fp16 at 30 steps"], rows))
    rows = [[r["case"], f"{r['bytes_per_image']['query_cache_over_linear']:.0f}×",
             _check(r["bytes_per_image"]["query_cache_over_linear"], TARGETS["bytes"], True)] for r in results]
    parts.append(_table(["case", "query cache (30 steps) / linear matrix", f"target ≥ {TARGETS['bytes']:.0f}×"], rows))

    parts.append("### 3. Heatmap of a word not in the prompt, from a stored record (median)")
    rows = []
    for r in results:
        q = r["query_latency"]
        target = _check(q["linear_matvec"], TARGETS["linear_latency"], False) if r["case"] == "sd2-base" else "–"
        rows.append([r["case"], _ms(q["linear_matvec"]), _ms(q["linear_matvec_fp16_record"]), _ms(q["linear_with_text_encoding"]),
                     _ms(q["softmax_query_cache_at_30_steps"]), _ms(q["rerun_generation_at_30_steps"]), target])
    parts.append(_table(["case", "linear: mat-vec", "linear: mat-vec, fp16 file", "linear incl. text encoding",
                         "softmax from query cache (30 steps)", "re-run generation (30 steps)",
                         f"target linear ≤ {TARGETS['linear_latency'] * 1e3:.0f} ms (SD 2-base)"], rows))
    parts.append("Softmax and re-run times at 30 steps are the measured per-step time × 30 where fewer steps were run.")

    parts.append("### 4. Token optimization (seconds per epoch per training image)")
    rows = []
    for r in results:
        o = r["optimization"]
        rows.append([r["case"], _ms(o["linear"]), _ms(o["softmax_at_30_steps"]), f"{o['linear_speedup_over_thesis']:,.0f}×",
                     _check(o["linear_speedup_over_thesis"], TARGETS["optimization"], True)])
    parts.append(_table(["case", "linear", "two-token softmax (30 steps)", "linear vs thesis (0.5 s, M1 Max GPU)",
                         f"target ≥ {TARGETS['optimization']:.0f}×"], rows))

    parts.append("### 5. Dataset throughput (images per minute, decoded images)")
    rows = []
    for r in results:
        t = r["throughput"]
        rows.append([r["case"], f"{t['plain_images_per_minute']:.2f}", f"{t['datagen_images_per_minute']:.2f}",
                     f"{t['throughput_ratio']:.3f}", _check(t["throughput_ratio"], TARGETS["throughput"], True)])
    parts.append(_table(["case", "generate + PNG", "daamlab.datagen (image, record, labels, meta, manifest)", "ratio",
                         f"target ≥ {TARGETS['throughput']}"], rows))

    parts.append("### 6. Peak memory")
    rows = []
    for r in results:
        peaks = r["capture_overhead"]["peak_rss_increase"]
        rows.append([r["case"]] + [_bytes(peaks[name]) for name in ("plain", "daam", "full", "naive")])
    parts.append("Largest increase of the resident set during one generation, over its size before the call:")
    parts.append(_table(["case", "plain", "DAAM record", "full record", "naive"], rows))
    rows = []
    for r in results:
        sections = r["peak_memory"]
        rows.append([r["case"]] + [_peak(sections[name]) for name in
                                   ("capture_overhead", "record_with_everything", "query_latency", "optimization", "throughput")]
                    + [_bytes(max((s["cuda"] or 0) for s in sections.values()) or None)])
    parts.append("Peak RSS of the whole process in each section (increase over its start), and CUDA max allocated:")
    parts.append(_table(["case", "overhead runs", "every record kind", "queries", "optimization", "datagen", "CUDA max"], rows))

    with_options = [r for r in results if "option_overhead" in r]
    if with_options:
        parts.append("### 7. Each trace option alone (generation time with the option / without; peak memory)")
        names = list(with_options[0]["option_overhead"]["ratios"])
        rows = [[r["case"], r["device"]] + [f"{r['option_overhead']['ratios'][n]:.3f}× / {_bytes(r['option_overhead']['peaks'].get(n))}"
                                             for n in names] for r in with_options]
        parts.append(_table(["case", "device"] + names, rows))
        parts.append(f"Targets: every option ≤ {TARGETS['option_overhead']}× on the GPU. Peaks are "
                     f"{with_options[0]['option_overhead']['peak_kind']}.")

    parts.append("### 8. Notebook 04 at the thesis protocol, projected from the measured costs")
    rows = [[r["case"], r["device"], f"{r['notebook04']['record_epochs_per_variant']:,}",
             f"{r['notebook04']['optimization_seconds'] / 60:.1f} min", f"{r['notebook04']['seconds'] / 60:.1f} min"]
            for r in results if "notebook04" in r]
    parts.append(_table(["case", "device", "record-epochs per variant", "optimization", "total incl. generation"], rows))
    return "\n\n".join(parts)


def write_report(paths: list[Path], docs: Path) -> None:
    """Replace the text between the result markers of ``docs`` (created if missing)."""
    results = [json.loads(Path(path).read_text()) for path in paths]
    order = {"toy": 0, "sd2-base": 1, "sdxl-base": 2}
    results.sort(key=lambda r: (order.get(r["case"], 9), r["device"]))
    block = f"{BEGIN}\n{render(results)}\n{END}"
    text = docs.read_text() if docs.exists() else f"# Benchmarks\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        raise ValueError(f"{docs} lacks the markers {BEGIN} / {END} around the generated tables")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    docs.parent.mkdir(parents=True, exist_ok=True)
    docs.write_text(head + block + tail)
