import pytest
import torch

import daamlib
from daamlib.methods.daam import daam_02_layers
from daamlab.testing.unet import tiny_random_pipeline
from naive import daam02_hooked_layers, naive_daam, naive_daam02, naive_linear, record_everything

PROMPT = "a car and a tree in an urban environment"


def generate(pipe, size=(32, 48), output_type="np", **trace_kwargs):
    """Naive full capture and daamlib's record of the same seeded generation."""
    def run():
        return pipe(prompt=PROMPT, generator=torch.Generator().manual_seed(0), num_inference_steps=3,
                    height=size[0], width=size[1], output_type=output_type)
    calls, _ = record_everything(pipe, run)
    with daamlib.trace(pipe, **trace_kwargs) as tr:
        run()
    return calls, tr.records[0]


def test_collapsed_linear_daam_equals_the_sum_over_steps_layers_and_heads(pipe):
    calls, record = generate(pipe, linear=True)
    torch.manual_seed(1)
    for x in (torch.randn(32), record.text_embeddings[2]):
        naive = naive_linear(calls, row=1, x=x, latent=(16, 24)).detach()  # W_k is a parameter
        ours = daamlib.linear(record, x)
        assert torch.allclose(ours, naive, rtol=1e-4, atol=1e-4 * float(naive.abs().max())), (ours - naive).abs().max()
    # a word of the prompt uses its contextual embedding
    car = record.tokens.token_indices("car")
    assert torch.allclose(daamlib.linear(record, "car"), daamlib.linear(record, record.text_embeddings[list(car)].mean(0)))


def test_linear_for_a_new_word_uses_the_text_encoder(pipe):
    _, record = generate(pipe, linear=True)
    vector = daamlib.TextEncoder(pipe).word_vector("bicycle")
    assert torch.allclose(daamlib.linear(record, "bicycle", pipe=pipe), daamlib.linear(record, vector))
    with pytest.raises(KeyError, match="pass pipe="):
        daamlib.linear(record, "bicycle")
    with pytest.raises(KeyError, match="occurs 1 time"):  # a bad occurrence is not mistaken for a new word
        daamlib.linear(record, "car", occurrence=3, pipe=pipe)


def test_openvocab_with_the_generating_prompt_as_context_equals_daam(pipe):
    _, cached = generate(pipe, queries=True, query_dtype=torch.float32)
    _, rerun = generate(pipe, contexts=[PROMPT], context_padding=True)
    for word in ("car", "tree", "<sot>", "<eot>"):
        reference = daamlib.daam(rerun, word)
        from_cache = daamlib.openvocab(cached, PROMPT, word, pipe=pipe, include_padding=True)
        from_rerun = daamlib.openvocab(rerun, PROMPT, word, include_padding=True)  # attached with its padding
        assert torch.allclose(from_cache, reference, rtol=1e-4, atol=1e-5)
        assert torch.allclose(from_rerun, reference, rtol=1e-5, atol=1e-6)


def test_a_trace_may_record_only_contexts(pipe):
    _, both = generate(pipe, contexts=["a tree"])
    _, only = generate(pipe, daam=False, contexts=["a tree"])
    assert not only.daam and torch.equal(daamlib.openvocab(only, "a tree", "tree"), daamlib.openvocab(both, "a tree", "tree"))
    with pytest.raises(ValueError, match="nothing to record"):
        with daamlib.trace(pipe, daam=False):
            pass


def test_openvocab_context_without_padding_is_a_distribution_over_its_tokens(pipe):
    _, record = generate(pipe, queries=True)
    context = "a car and a bicycle in an urban environment"
    maps = daamlib.openvocab(record, context, pipe=pipe)  # [m, H, W]: SOT, 9 words, EOT
    assert maps.shape == (11, 16, 24)
    expected = sum(l.heads for l in record.cross_layers) * record.num_steps
    # bilinear upsampling keeps per-pixel sums: every key-softmax sums to 1 per head, step, layer
    assert torch.allclose(maps.sum(0), torch.full((16, 24), float(expected)), rtol=1e-3)
    assert daamlib.openvocab(record, context, "bicycle", pipe=pipe).shape == (16, 24)


def five_level_pipeline():
    """A tiny random SD pipeline with cross-attention at 1, 1/2, 1/4, 1/8, 1/16 of the latent: the mid
    block sits at 1/16, so it is not among the 1/8 layers daam 0.2.0 skips."""
    return tiny_random_pipeline(block_out_channels=(8,) * 5, norm_num_groups=4)


def test_daam_02_mode_reproduces_the_original_package(pipe):
    calls, record = generate(pipe, size=(64, 64), per_head=True)  # latent 32: layers at 32, 16, 8; mid block at 8 (1/4)
    token = record.tokens.token_indices("car")[0]
    naive = naive_daam02(calls, row=1, token=token, latent=(32, 32), unet=pipe.unet)
    assert torch.allclose(daamlib.daam(record, "car", mode="daam-0.2"), naive, rtol=1e-4, atol=1e-6)


def test_daam_02_mode_skips_the_mid_block_and_the_eighth_layers_on_a_five_level_unet():
    pipe = five_level_pipeline()
    calls, record = generate(pipe, size=(64, 64), output_type="latent", per_head=True)
    resolutions = {layer.name: layer.resolution for layer in record.cross_layers}
    mid = [name for name in resolutions if name.startswith("mid_block")]
    assert resolutions[mid[0]] == (2, 2)  # the mid block is at 1/16 of the 32x32 latent, not 1/8
    eighth = sorted(name for name, size in resolutions.items() if size == (4, 4))
    assert len(eighth) == 3  # one down-block and two up-block layers at 1/8
    used = {layer.name for layer in daam_02_layers(record)}
    assert used == daam02_hooked_layers(pipe.unet) - set(eighth)
    assert not used & set(mid) and len(used) == len(resolutions) - 1 - 3
    token = record.tokens.token_indices("car")[0]
    naive = naive_daam02(calls, row=1, token=token, latent=(32, 32), unet=pipe.unet)
    ours = daamlib.daam(record, "car", mode="daam-0.2")
    assert torch.allclose(ours, naive, rtol=1e-4, atol=1e-6), (ours - naive).abs().max()
    with pytest.raises(ValueError, match="never uses layers .*mid_block"):
        daamlib.daam(record, "car", mode="daam-0.2", layers=mid)
    with pytest.raises(ValueError, match="never uses layers"):
        daamlib.daam(record, "car", mode="daam-0.2", layers=eighth[:1])
    one = sorted(used)[0]
    assert torch.allclose(daamlib.daam(record, "car", mode="daam-0.2", layers=[one]),
                          naive_daam02([c for c in calls if c["layer"] == one], 1, token, (32, 32), pipe.unet), rtol=1e-4, atol=1e-6)


def test_layer_and_step_filters(pipe):
    calls, record = generate(pipe, per_step=True)
    token = record.tokens.token_indices("tree")[0]
    up_layers = [l.name for l in record.cross_layers if l.name.startswith("up_blocks")]
    naive = naive_daam(calls, 1, token, (16, 24), keep=lambda call, step: call["layer"] in up_layers and step in (1, 2))
    ours = daamlib.daam(record, "tree", layers=up_layers, steps=[1, 2])
    assert torch.allclose(ours, naive, rtol=1e-4, atol=1e-5)
    with pytest.raises(IndexError, match="outside"):
        daamlib.daam(record, "tree", steps=[99])


def test_multi_token_word_averages_its_tokens(pipe):
    _, record = generate(pipe)
    assert record.tokens.token_indices("urban environment") == (8, 9)
    expected = (daamlib.daam(record, 8) + daamlib.daam(record, 9)) / 2
    assert torch.allclose(daamlib.daam(record, "urban environment"), expected)


def test_word_not_in_prompt_points_to_open_vocabulary(pipe):
    _, record = generate(pipe)
    with pytest.raises(KeyError, match="open-vocabulary"):
        daamlib.daam(record, "bicycle")
    with pytest.raises(KeyError, match="per_head=True"):
        daamlib.daam(record, "car", mode="daam-0.2")
    with pytest.raises(KeyError, match="queries=True"):
        daamlib.openvocab(record, "a bicycle", "bicycle", pipe=pipe)


def test_vector_contexts_in_a_rerun_equal_openvocab_maps_from_the_query_cache(pipe):
    torch.manual_seed(2)
    vectors = torch.randn(2, 32)  # e.g. an optimized object token and a background token
    _, cached = generate(pipe, queries=True, query_dtype=torch.float32)
    _, rerun = generate(pipe, contexts={"optimized": vectors})
    assert rerun.meta.contexts["optimized"] == ["optimized[0]", "optimized[1]"]
    expected = daamlib.openvocab_maps(cached, vectors, pipe)
    assert torch.allclose(daamlib.openvocab(rerun, "optimized"), expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=r"vectors \[m, 32\] \(the model.s conditioning size\)"):
        generate(pipe, contexts={"bad": torch.randn(32)})


def test_native_maps_sum_one_grid_without_interpolation(pipe):
    """upsample="native" on a UNet: the layers of one resolution summed as stored; mixed grids are refused."""
    calls, record = generate(pipe, per_head=False)
    token = record.tokens.token_indices("car")[0]
    with pytest.raises(ValueError, match="needs layers of one grid"):
        daamlib.daam(record, "car", upsample="native")
    resolutions = {layer.resolution for layer in record.cross_layers}
    assert len(resolutions) > 1
    for resolution in resolutions:
        layers = [layer.name for layer in record.cross_layers if layer.resolution == resolution]
        native = daamlib.daam(record, "car", layers=layers, upsample="native")
        expected = sum(call["probs"][1][:, :, token].sum(0) for call in calls if call["layer"] in layers)  # [hw]
        assert native.shape == resolution
        assert torch.allclose(native, expected.reshape(resolution), rtol=1e-4, atol=1e-5 * expected.max())
