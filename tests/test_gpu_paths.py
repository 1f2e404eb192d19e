"""The paths that keep a GPU busy, checked on the CPU: no host reads inside a traced generation,
no gradients into pipeline weights, weights read from offloaded modules, context keys made once."""

import copy

import pytest
import torch
from accelerate import cpu_offload
from torch.utils._python_dispatch import TorchDispatchMode

import daamlib
from daamlib.capture.trace import Trace
from daamlib.modules import linear_parameters
from pipelines import tiny_pipeline

PROMPT = "a car and a tree in an urban environment"
OPTIONS = {
    "daam": {},
    "per_head": {"per_head": True},
    "per_step": {"per_step": True},
    "queries": {"queries": True},
    "linear": {"linear": True},
    "self_attention": {"self_attention": True},
    "contexts": {"contexts": ["a tree on a sidewalk"]},
}
HOOKS = ("on_denoiser", "on_text_encoder", "observe_cross_attention", "observe_joint_attention", "observe_self_attention")


class HostReads(TorchDispatchMode):
    """Notes every operation that reads a tensor's value on the host (what syncs a GPU stream)."""

    READS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default)

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.READS:
            self.reads.append(func.__name__)
        if func is torch.ops.aten._to_copy.default and args[0].device.type != "cpu" and \
                torch.device(kwargs.get("device") or args[0].device).type == "cpu":
            self.reads.append("copy to host")
        return func(*args, **kwargs)


@pytest.fixture
def host_reads(monkeypatch):
    """Runs every trace hook and processor callback under HostReads."""
    mode = HostReads()
    for name in HOOKS:
        original = getattr(Trace, name)

        def watched(self, *args, _original=original, **kwargs):
            with mode:
                return _original(self, *args, **kwargs)

        monkeypatch.setattr(Trace, name, watched)
    return mode


@pytest.mark.parametrize("option", list(OPTIONS))
def test_a_traced_generation_never_reads_tensors_on_the_host(pipe, host_reads, option):
    with daamlib.trace(pipe, **OPTIONS[option]) as tr:
        pipe(prompt=[PROMPT, "a person"], num_inference_steps=3, generator=torch.Generator().manual_seed(0),
             output_type="np")
        assert host_reads.reads == []  # nothing read during the generation ...
        records = tr.records  # ... the values are read here, after it
    assert len(records) == 2 and records[0].num_steps == 4 and records[0].tokens.text == PROMPT


def test_context_keys_are_computed_once_per_layer(pipe, monkeypatch):
    calls = []
    original = Trace._layer_context_keys

    def counted(self, layer, attn, like):
        calls.append(layer.name in self._context_keys)
        return original(self, layer, attn, like)

    monkeypatch.setattr(Trace, "_layer_context_keys", counted)
    with daamlib.trace(pipe, contexts=["a tree"]) as tr:
        pipe(prompt=PROMPT, num_inference_steps=3, output_type="np")
    layers = len(tr.records[0].cross_layers)
    assert calls.count(False) == layers  # computed on the first step only
    assert calls.count(True) == layers * 3  # reused on the other 3 UNet calls


@pytest.mark.parametrize("variant", ["linear", "softmax"])
def test_optimization_leaves_no_gradient_in_the_pipeline(variant):
    pipe = tiny_pipeline()
    records = daamlib.generate(pipe, ["a car in a street"] * 2, seed=0, num_inference_steps=2, linear=True,
                               queries=True, query_dtype=torch.float32)
    masks = [torch.zeros(32, 32, dtype=torch.bool).index_fill_(0, torch.arange(8, 20), True)] * 2
    daamlib.optimize_tokens(records, masks, init="car", variant=variant, epochs=3, pipe=pipe, progress=False)
    for extra in (daamlib.openvocab(records[0], "a tree", "tree", pipe=pipe), daamlib.linear(records[0], "tree", pipe=pipe)):
        assert not extra.requires_grad
    with_grad = [name for module in (pipe.unet, pipe.text_encoder, pipe.vae)
                 for name, parameter in module.named_parameters() if parameter.grad is not None]
    assert with_grad == []


def test_offloaded_weights_are_read_through_the_module(pipe):
    to_k = copy.deepcopy(pipe.unet.get_submodule(daamlib.attention_layers(pipe.unet)[0].name).to_k).cpu()
    expected = to_k.weight.detach().clone()
    cpu_offload(to_k, execution_device=torch.device("cpu"))
    assert to_k.weight.device.type == "meta"
    weight, bias = linear_parameters(to_k, "cpu")
    assert bias is None
    assert torch.allclose(weight, expected, atol=1e-6)


def test_every_record_kind_works_with_an_offloaded_unet():
    """Sequential offload (accelerate's hooks, weights on the meta device between forwards), emulated on the CPU."""
    kinds = dict(linear=True, queries=True, per_head=True, per_step=True, self_attention=True, contexts=["a tree"])
    plain = tiny_pipeline()
    offloaded = tiny_pipeline()
    cpu_offload(offloaded.unet, execution_device=torch.device("cpu"))
    (reference,) = daamlib.generate(plain, PROMPT, seed=0, num_inference_steps=2, **kinds)
    (record,) = daamlib.generate(offloaded, PROMPT, seed=0, num_inference_steps=2, **kinds)
    assert torch.equal(record.linear_matrix, reference.linear_matrix)
    assert torch.equal(daamlib.daam(record, "car", mode="daam-0.2"), daamlib.daam(reference, "car", mode="daam-0.2"))
    for name in reference.self_attention:
        assert torch.equal(record.self_attention[name], reference.self_attention[name])
    assert torch.equal(daamlib.openvocab(record, "a tree", "tree"), daamlib.openvocab(reference, "a tree", "tree"))
    cached = daamlib.openvocab(record, "a red bicycle", "bicycle", pipe=offloaded)
    assert torch.allclose(cached, daamlib.openvocab(reference, "a red bicycle", "bicycle", pipe=plain), atol=1e-5)
    assert torch.allclose(daamlib.linear(record, "bicycle", pipe=offloaded), daamlib.linear(reference, "bicycle", pipe=plain),
                          atol=1e-5)


def test_query_cache_options():
    pipe = tiny_pipeline()
    with pytest.raises(ValueError, match="query_device must be None"):
        daamlib.generate(pipe, PROMPT, seed=0, num_inference_steps=2, queries=True, query_device="cuda:0")
    with pytest.raises(ValueError, match="floating dtype"):
        daamlib.generate(pipe, PROMPT, seed=0, num_inference_steps=2, queries=True, query_dtype=torch.int8)
    (on_device,) = daamlib.generate(pipe, PROMPT, seed=0, num_inference_steps=2, queries=True)
    (on_host,) = daamlib.generate(pipe, PROMPT, seed=0, num_inference_steps=2, queries=True, query_device="cpu")
    assert on_device.queries.keys() == on_host.queries.keys()
    for key, value in on_device.queries.items():
        assert value.dtype == torch.float16 and torch.equal(value, on_host.queries[key])


def test_record_to_moves_every_tensor_and_keeps_the_maps(pipe):
    (record,) = daamlib.generate(pipe, PROMPT, seed=0, num_inference_steps=2, queries=True, linear=True)
    moved = record.to("cpu")
    assert moved is not record and moved.meta is record.meta
    assert torch.equal(daamlib.daam(moved, "car"), daamlib.daam(record, "car"))
    assert all(torch.equal(moved.queries[key], value) for key, value in record.queries.items())
