import numpy as np
import pytest
import torch

import daamlib
from naive import grid, naive_daam, record_everything

PROMPT = "a car and a tree in an urban environment"


def run(pipe, prompt=PROMPT, seed=0, steps=3, **kwargs):
    generator = torch.Generator().manual_seed(seed)
    return pipe(prompt=prompt, generator=generator, num_inference_steps=steps, output_type="np", **kwargs).images


def test_every_cross_attention_layer_is_captured_with_its_resolution_and_heads(pipe):
    with daamlib.trace(pipe) as tr:
        run(pipe, height=32, width=48)
    (record,) = tr.records
    expected = {layer.name: layer for layer in daamlib.attention_layers(pipe.unet)}
    assert [l.name for l in record.cross_layers] == list(expected)
    for layer in record.cross_layers:
        module = pipe.unet.get_submodule(layer.name)
        assert layer.heads == module.heads == expected[layer.name].heads
        depth = int(layer.name.split(".")[1]) if not layer.name.startswith("mid") else 2
        if layer.name.startswith("up_blocks"):
            depth = 2 - depth
        assert layer.resolution == (16 // 2**depth, 24 // 2**depth)
        assert record.daam[layer.name].shape == (layer.resolution[0] * layer.resolution[1], 77)
    # softmax rows sum to 1 per head: the time- and head-summed maps sum to steps * heads per pixel
    for layer in record.cross_layers:
        sums = record.daam[layer.name].sum(-1)
        assert torch.allclose(sums, torch.full_like(sums, record.num_steps * layer.heads), rtol=1e-5)


def test_tracing_does_not_change_the_generated_image(pipe):
    plain = run(pipe)
    with daamlib.trace(pipe, per_head=True, per_step=True, queries=True, linear=True, self_attention=True):
        traced = run(pipe)
    assert np.array_equal(plain, traced)


def test_streaming_daam_equals_per_step_per_head_upsample_then_sum(pipe):
    calls, _ = record_everything(pipe, lambda: run(pipe, height=32, width=48))
    with daamlib.trace(pipe) as tr:
        run(pipe, height=32, width=48)
    (record,) = tr.records
    car = record.tokens.token_indices("car")[0]
    for mode in ("bilinear", "bicubic"):
        naive = naive_daam(calls, row=1, token=car, latent=(16, 24), mode=mode)  # row 1 = conditional half
        ours = daamlib.daam(record, "car", upsample=mode)
        assert torch.allclose(ours, naive, rtol=1e-4, atol=1e-5), (ours - naive).abs().max()


@pytest.mark.parametrize("guidance", [7.5, 1.0])
def test_batches_and_images_per_prompt_map_to_the_right_records(pipe, guidance):
    prompts = ["a car in a street", "a person next to a tree"]
    with daamlib.trace(pipe) as tr:
        pipe(prompt=prompts, num_images_per_prompt=2, num_inference_steps=2, guidance_scale=guidance,
             generator=[torch.Generator().manual_seed(s) for s in range(4)], output_type="np")
    records = tr.records
    assert [r.tokens.text for r in records] == ["a car in a street"] * 2 + ["a person next to a tree"] * 2
    # each record equals the record of generating that image alone with the same seed
    for index, record in enumerate(records):
        with daamlib.trace(pipe) as single:
            pipe(prompt=prompts[index // 2], num_inference_steps=2, guidance_scale=guidance,
                 generator=torch.Generator().manual_seed(index), output_type="np")
        alone = single.records[0]
        for name, value in record.daam.items():
            assert torch.allclose(value, alone.daam[name], rtol=1e-4, atol=1e-4)


def test_unconditional_branch_is_traced_on_request(pipe):
    with daamlib.trace(pipe, branch="uncond") as tr:
        run(pipe, steps=2)
    (record,) = tr.records
    assert torch.allclose(record.text_embeddings, pipe.encode_prompt("", pipe.device, 1, False)[0][0].cpu(), atol=1e-6)


def test_processors_are_restored_after_an_exception_mid_generation(pipe):
    before = pipe.unet.attn_processors

    def fail(pipeline, step, timestep, kwargs):
        raise RuntimeError("stop at step 1")

    with pytest.raises(RuntimeError, match="stop at step 1"):
        with daamlib.trace(pipe, queries=True, linear=True) as tr:
            run(pipe, callback_on_step_end=fail)
    after = pipe.unet.attn_processors
    assert list(after) == list(before)
    assert all(after[key] is before[key] for key in before)
    assert tr.records == []
    assert not pipe.unet._forward_pre_hooks and not pipe.text_encoder._forward_pre_hooks


def test_two_generations_in_one_trace_give_two_records(pipe):
    with daamlib.trace(pipe) as tr:
        run(pipe, prompt="a car", steps=2)
        run(pipe, prompt="a tree", steps=2)
    assert [r.tokens.text for r in tr.records] == ["a car", "a tree"]
    assert all(r.num_steps == 3 for r in tr.records)  # PNDM evaluates the UNet steps + 1 times


def test_unknown_layer_names_are_rejected(pipe):
    with pytest.raises(KeyError, match="not an attention layer"):
        with daamlib.trace(pipe, layers=["up_blocks.9.attn2"]):
            pass


def test_layer_selection_and_query_cache_shapes(pipe):
    layers = [l.name for l in daamlib.attention_layers(pipe.unet)]
    with daamlib.trace(pipe, layers=layers[:2], daam=False, queries=True, query_steps=[0, 2]) as tr:
        run(pipe, steps=3)
    (record,) = tr.records
    assert sorted(record.queries) == sorted((name, step) for name in layers[:2] for step in (0, 2))
    assert record.queries[(layers[0], 0)].dtype == torch.float16
    assert record.queries[(layers[0], 0)].shape == (16 * 16, pipe.unet.get_submodule(layers[0]).to_q.out_features)
    assert record.daam == {}


def test_grid_helper_matches_library(pipe):
    assert daamlib.capture.layer_resolution(6 * 4, (21, 13)) == grid(6 * 4, (21, 13)) == (6, 4)
    with pytest.raises(ValueError):
        daamlib.capture.layer_resolution(7, (16, 16))
