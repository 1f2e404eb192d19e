"""On a CUDA GPU (python -m pytest --device cuda): no host sync inside a traced generation, and fp16 on
the GPU agreeing with fp32 on the CPU. Skipped, with the reason, where there is no GPU.

Tolerances (maps min-max normalised to [0, 1]): Pearson r >= 0.99 and max |difference| <= 0.05
between fp16-GPU and fp32-CPU maps of the same seeded generation."""

import numpy as np
import pytest
import torch

import daamlib
from daamlib.capture.trace import Trace
from pipelines import tiny_pipeline

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU; run python -m pytest --device cuda on a machine with one")
PROMPT = "a car and a tree in an urban environment"
PEARSON_MIN, MAX_DIFFERENCE = 0.99, 0.05
OPTIONS = {"daam": {}, "per_head": {"per_head": True}, "per_step": {"per_step": True}, "queries": {"queries": True},
           "queries_host": {"queries": True, "query_device": "cpu"}, "linear": {"linear": True},
           "self_attention": {"self_attention": True}, "contexts": {"contexts": ["a tree on a sidewalk"]}}


@pytest.fixture(scope="module")
def pipes():
    return tiny_pipeline(), tiny_pipeline().to("cuda", torch.float16)


@pytest.mark.parametrize("option", list(OPTIONS))
def test_no_host_sync_inside_a_traced_generation(pipes, monkeypatch, option):
    _, gpu = pipes
    for name in ("on_denoiser", "on_text_encoder", "observe_cross_attention", "observe_joint_attention", "observe_self_attention"):
        original = getattr(Trace, name)

        def strict(self, *args, _original=original, **kwargs):
            torch.cuda.set_sync_debug_mode("error")  # any synchronizing call in daamlib's hooks raises
            try:
                return _original(self, *args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")

        monkeypatch.setattr(Trace, name, strict)
    with daamlib.trace(gpu, **OPTIONS[option]) as tr:
        gpu(prompt=PROMPT, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="latent")
    assert tr.records[0].num_steps == 4


def _agree(first: torch.Tensor, second: torch.Tensor) -> None:
    a, b = daamlib.normalize(first.float().cpu()).flatten(), daamlib.normalize(second.float().cpu()).flatten()
    assert float(np.corrcoef(a.numpy(), b.numpy())[0, 1]) >= PEARSON_MIN
    assert float((a - b).abs().max()) <= MAX_DIFFERENCE


@pytest.fixture(scope="module")
def records(pipes):
    cpu, gpu = pipes
    kinds = dict(seed=0, num_inference_steps=5, queries=True, linear=True)
    return daamlib.generate(cpu, PROMPT, **kinds)[0], daamlib.generate(gpu, PROMPT, **kinds)[0]


def test_fp16_gpu_daam_openvocab_and_linear_agree_with_fp32_cpu(pipes, records):
    (cpu, gpu), (on_cpu, on_gpu) = pipes, records
    assert next(iter(on_gpu.queries.values())).is_cuda  # the query cache stayed on the GPU
    _agree(daamlib.daam(on_gpu, "car"), daamlib.daam(on_cpu, "car"))
    _agree(daamlib.openvocab(on_gpu, "a red bicycle", "bicycle", pipe=gpu),
           daamlib.openvocab(on_cpu, "a red bicycle", "bicycle", pipe=cpu))
    _agree(daamlib.linear(on_gpu, "bicycle", pipe=gpu), daamlib.linear(on_cpu, "bicycle", pipe=cpu))


@pytest.mark.parametrize("variant", ["linear", "softmax"])
def test_fp16_gpu_optimization_agrees_with_fp32_cpu(pipes, records, variant):
    (cpu, gpu), (on_cpu, on_gpu) = pipes, records
    mask = np.zeros(on_cpu.image_size, bool)
    mask[4:20, 8:28] = True
    tokens = [daamlib.optimize_tokens([record], [mask], init="car", variant=variant, epochs=20, pipe=pipe, progress=False)
              for record, pipe in ((on_cpu, cpu), (on_gpu, gpu))]
    assert tokens[1].vectors.device.type == "cpu"  # returned on the CPU, computed on the GPU
    maps = [daamlib.linear(on_cpu, token.object_vector) for token in tokens]
    _agree(maps[1], maps[0])
    assert abs(tokens[1].history[-1] - tokens[0].history[-1]) <= 0.05 * abs(tokens[0].history[-1])
