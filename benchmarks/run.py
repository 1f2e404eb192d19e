"""Run the benchmarks and write their tables into docs/benchmarks.md.

    python benchmarks/run.py                       # toy, SD 2-base and SDXL-base architectures
    python benchmarks/run.py --cases toy --device cuda

Each case's results are written to ``benchmarks/results/<case>-<device>.json`` as soon as it
finishes; a rerun skips the cases that already have results (``--force`` measures them again),
so a killed run resumes with the next case. The tables between the markers in
``docs/benchmarks.md`` are regenerated from every results file present.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
from pathlib import Path

import diffusers
import psutil
import torch
import transformers

import daamlib
from daamlab.io import write_json
from daamlab.testing.unet import sd2_base_random_pipeline, sdxl_base_random_pipeline

from measure import peak_memory  # benchmarks/ is on sys.path when this file runs as a script
from report import write_report
from sections import (
    Case,
    bytes_per_image,
    capture_overhead,
    dataset_throughput,
    notebook04_projection,
    option_overhead,
    optimization_speed,
    query_latency,
    record_with_everything,
    to_thesis_steps,
)

HERE = Path(__file__).resolve().parent
CASES = {
    "toy": Case("toy", "the embedded toy model (64x64 px, 16x16 latent), 30 PNDM steps",
                lambda: daamlib.load_pipeline(progress_bar=False), steps=30, size=None, repeats=7),
    "sd2-base": Case("sd2-base", "SD 2-base architecture, random weights, 512x512 px (64x64 latent)",
                     sd2_base_random_pipeline, steps=2, size=512, repeats=3),
    "sdxl-base": Case("sdxl-base", "SDXL-base architecture, random weights, 512x512 px (64x64 latent)",
                      sdxl_base_random_pipeline, steps=1, size=512, repeats=3),
}
ON_CUDA = {  # a GPU runs the published settings: 30 steps, SDXL at its native 1024x1024, fp16
    "sd2-base": dict(steps=30, size=512, repeats=5),
    "sdxl-base": dict(steps=30, size=1024, repeats=3,
                      description="SDXL-base architecture, random weights, 1024x1024 px (128x128 latent)"),
    "toy": dict(steps=30, repeats=7),
}


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    info = {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "daamlib": daamlib.__version__, "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def run_case(case: Case, device: str, throughput_rounds: int, options: bool) -> dict:
    print(f"[{case.name}] building the pipeline", flush=True)
    pipe = case.build().to(device)
    if device == "cuda":
        pipe = pipe.to(dtype=torch.float16)
    results = {"case": case.name, "description": case.description, "steps": case.steps, "device": device,
               "machine": machine(), "peak_memory": {}}

    def section(name: str, function):
        print(f"[{case.name}] {name}", flush=True)
        with peak_memory() as peak:
            value = function()
        results["peak_memory"][name] = {"rss": peak.rss, "rss_at_start": peak.rss_at_start, "cuda": peak.cuda, "rss_is_process_peak": peak.rss_is_process_peak}
        return value

    results["capture_overhead"] = section("capture_overhead", lambda: capture_overhead(pipe, case))
    record = section("record_with_everything", lambda: record_with_everything(pipe, case))
    results["bytes_per_image"] = bytes_per_image(record, to_thesis_steps(pipe, case))
    results["query_latency"] = section("query_latency", lambda: query_latency(pipe, case, record))
    results["optimization"] = section("optimization", lambda: optimization_speed(pipe, case, record))
    results["throughput"] = section("throughput", lambda: dataset_throughput(pipe, case, throughput_rounds))
    if options:
        results["option_overhead"] = section("option_overhead", lambda: option_overhead(pipe, case))
    results["notebook04"] = notebook04_projection(results)
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=None, help="override every case's step count")
    parser.add_argument("--repeats", type=int, default=None, help="override every case's interleaved rounds")
    parser.add_argument("--throughput-rounds", type=int, default=3)
    parser.add_argument("--results", type=Path, default=HERE / "results")
    parser.add_argument("--docs", type=Path, default=HERE.parent / "docs" / "benchmarks.md")
    parser.add_argument("--force", action="store_true", help="measure cases that already have results")
    parser.add_argument("--options", action="store_true", default=None,
                        help="also time each trace option alone (default: on CUDA only)")
    args = parser.parse_args(argv)
    for name in args.cases:
        case = CASES[name]
        overrides = {key: value for key, value in (("steps", args.steps), ("repeats", args.repeats)) if value is not None}
        cuda = args.device.startswith("cuda")
        case = dataclasses.replace(case, **{**(ON_CUDA.get(name, {}) if cuda else {}), **overrides})
        path = args.results / f"{name}-{args.device}.json"
        if path.exists() and not args.force:
            print(f"[{name}] results exist at {path}; skipped (pass --force to measure again)")
            continue
        options = cuda if args.options is None else args.options
        write_json(path, run_case(case, args.device, args.throughput_rounds, options))
    write_report(sorted(args.results.glob("*.json")), args.docs)
    print(f"wrote {args.docs}")


if __name__ == "__main__":
    main()
