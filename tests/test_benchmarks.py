"""The benchmark suite runs end to end on a tiny pipeline, and what it measures is what it claims.

No timing is asserted: only that the naive capture it compares against computes the same DAAM
maps, that the byte counts match the shapes the model implies, and that the report is written."""

import json
import sys
from pathlib import Path

import pytest
from pipelines import tiny_pipeline

from daamlib import attention_layers
from daamlab.io import write_json

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCHMARKS))
    import report
    import run
    import sections

    yield run, sections, report
    sys.path.remove(str(BENCHMARKS))


def positions(layer: str, latent: int) -> int:
    """hw of a layer of the tiny UNet: three levels at latent, latent/2, latent/4; mid at the lowest."""
    block, index = layer.split(".")[:2]
    level = 2 if block == "mid_block" else int(index) if block == "down_blocks" else 2 - int(index)
    return (latent >> level) ** 2


def test_benchmark_case_and_report(bench, tmp_path):
    run, sections, report = bench
    case = sections.Case("tiny", "tiny random pipeline", tiny_pipeline, steps=2, size=None, repeats=1)
    results = run.run_case(case, "cpu", throughput_rounds=1, options=True)

    overhead = results["capture_overhead"]
    assert overhead["naive_agreement"] < 1e-5  # original-DAAM upsample-every-step == daamlib's sums
    assert set(overhead["ratios"]) == {"daam", "full", "naive"} and all(r > 0 for r in overhead["ratios"].values())

    pipe = tiny_pipeline()
    latent = pipe.unet.config.sample_size
    layers = attention_layers(pipe.unet, "cross")
    query_values = sum(positions(l.name, latent) * l.heads * l.head_dim for l in layers)
    kinds = results["bytes_per_image"]["kinds"]
    calls = {steps: sections.unet_calls(pipe, steps) for steps in (case.steps, 30)}
    assert calls == {2: 3, 30: 31}  # PNDM's PLMS evaluates its first timestep twice
    assert kinds["query cache, every step (OVAM)"]["fp16"] == 2 * calls[2] * query_values
    assert kinds["query cache, every step (OVAM)"]["fp16_at_30_steps"] == 2 * calls[30] * query_values
    d_text = pipe.text_encoder.config.hidden_size
    assert kinds["linear matrix"]["fp32"] == 4 * latent * latent * d_text  # no key bias in SD
    assert kinds["daam"]["fp32"] == 4 * 77 * sum(positions(l.name, latent) for l in layers)

    assert results["optimization"]["linear"] > 0 and results["throughput"]["throughput_ratio"] > 0
    assert set(results["option_overhead"]["ratios"]) == set(sections.OPTIONS)
    assert all(ratio > 0 for ratio in results["option_overhead"]["ratios"].values())
    assert results["notebook04"]["record_epochs_per_variant"] == 4 * 8 * 500  # 4 classes x (1 + 2 + 5) images x 500
    path = tmp_path / "results" / "tiny-cpu.json"
    write_json(path, results)
    docs = tmp_path / "benchmarks.md"
    docs.write_text(f"# Benchmarks\n\nhand-written notes\n\n{report.BEGIN}\nold\n{report.END}\n\nmore notes\n")
    report.write_report([path], docs)
    text = docs.read_text()
    assert "hand-written notes" in text and "more notes" in text and "old" not in text
    assert "| tiny | cpu |" in text and json.loads(path.read_text())["case"] == "tiny"
    assert "### 7. Each trace option alone" in text and "### 8. Notebook 04" in text
