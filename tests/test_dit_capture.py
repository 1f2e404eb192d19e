"""PixArt-α (DiT with cross-attention over T5) traced like a UNet: maps checked against attention
recomputed plainly in the model's own processors, with the T5 padding mask the model applies."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

import daamlib
from daamlab.testing.dit import published_transformer_on_meta, tiny_random_pixart_pipeline
from naive import naive_daam, naive_linear, record_everything

PROMPT = "a car and a tree on the road"
HEIGHT, WIDTH = 32, 48  # pixels; the tiny VAE halves them, patches of 2 halve again: 8 x 12 image tokens
LATENT = (HEIGHT // 2, WIDTH // 2)
MAX_LENGTH = 16  # T5 positions the pipeline pads to
CALL = {"use_resolution_binning": False, "max_sequence_length": MAX_LENGTH}


@pytest.fixture(scope="module")
def pixart():
    return tiny_random_pixart_pipeline(seed=0, sharpen=4.0, max_length=MAX_LENGTH)


def run(pipe, prompt=PROMPT, seed=0, steps=2, **kwargs):
    generator = torch.Generator().manual_seed(seed)
    return pipe(prompt=prompt, generator=generator, num_inference_steps=steps, height=HEIGHT, width=WIDTH,
                output_type="np", **CALL, **kwargs).images


@pytest.mark.parametrize("guidance", [4.5, 1.0])
def test_tracing_pixart_does_not_change_the_image(pixart, guidance):
    plain = run(pixart, guidance_scale=guidance)
    with daamlib.trace(pixart, cfg=guidance > 1, per_head=True, per_step=True, queries=True, linear=True):
        traced = run(pixart, guidance_scale=guidance)
    assert np.array_equal(plain, traced)


def test_pixart_layers_tokens_and_padding(pixart):
    (record,) = daamlib.generate(pixart, PROMPT, seed=0, num_inference_steps=2, height=HEIGHT, width=WIDTH,
                                 pipe_kwargs=CALL)
    assert [layer.name for layer in record.cross_layers] == ["transformer_blocks.0.attn2", "transformer_blocks.1.attn2"]
    assert all(layer.resolution == (8, 12) for layer in record.cross_layers)
    tokens = record.tokens
    assert tokens.length == MAX_LENGTH and tokens.sot_index is None
    assert tokens.text == PROMPT and tokens.strings[tokens.eot_index] == "</s>"
    for layer in record.cross_layers:
        maps = record.daam[layer.name]  # [hw, n]: every softmax row sums to 1 per head and step
        assert torch.allclose(maps.sum(-1), torch.full((96,), 2.0 * layer.heads), rtol=1e-5)
        # the model masks T5's padding with -10000: no attention reaches it
        assert maps[:, list(tokens.padding_indices)].max() < 1e-6
        assert torch.allclose(maps[:, : tokens.eot_index + 1].sum(-1), torch.full((96,), 2.0 * layer.heads), rtol=1e-5)


@pytest.mark.parametrize("guidance,row", [(4.5, 1), (1.0, 0)])
def test_pixart_daam_equals_the_plain_recomputation(pixart, guidance, row):
    calls, _ = record_everything(pixart, lambda: run(pixart, guidance_scale=guidance))
    with daamlib.trace(pixart, cfg=guidance > 1) as tr:
        run(pixart, guidance_scale=guidance)
    (record,) = tr.records
    for word in ("car", "tree", "<eot>"):
        token = record.tokens.token_indices(word)[0]
        for mode in ("bilinear", "bicubic"):
            naive = naive_daam(calls, row=row, token=token, latent=LATENT, mode=mode)
            ours = daamlib.daam(record, word, upsample=mode)
            assert torch.allclose(ours, naive, rtol=1e-4, atol=1e-5), (ours - naive).abs().max()
            assert naive.std() > 1e-2 * naive.mean()  # the sharpened model's maps are not flat


def test_pixart_linear_daam_collapses_exactly(pixart):
    calls, _ = record_everything(pixart, lambda: run(pixart, guidance_scale=4.5))
    with daamlib.trace(pixart, cfg=True, linear=True) as tr:
        run(pixart, guidance_scale=4.5)
    (record,) = tr.records
    d_text = pixart.transformer.config.num_attention_heads * pixart.transformer.config.attention_head_dim
    assert record.text_embeddings.shape == (MAX_LENGTH, d_text)  # the caption projection's output: what keys read
    for x in (torch.randn(d_text, generator=torch.Generator().manual_seed(1)), record.text_embeddings[2]):
        naive = naive_linear(calls, row=1, x=x, latent=LATENT).detach()
        assert torch.allclose(daamlib.linear(record, x), naive, rtol=1e-4, atol=1e-4)


def test_pixart_open_vocabulary_cache_equals_the_rerun_with_attached_keys(pixart):
    (cached,) = daamlib.generate(pixart, PROMPT, seed=0, num_inference_steps=2, height=HEIGHT, width=WIDTH,
                                 pipe_kwargs=CALL, queries=True, query_dtype=torch.float32)
    (attached,) = daamlib.generate(pixart, PROMPT, seed=0, num_inference_steps=2, height=HEIGHT, width=WIDTH,
                                   pipe_kwargs=CALL, contexts=["a bicycle"])
    from_cache = daamlib.openvocab(cached, "a bicycle", "bicycle", pipe=pixart)
    from_keys = daamlib.openvocab(attached, "a bicycle", "bicycle")
    assert torch.allclose(from_cache, from_keys, rtol=1e-4, atol=1e-5), (from_cache - from_keys).abs().max()
    # a word of the prompt, asked for as a phrase of its own, is not the in-prompt map (other context)
    assert not torch.allclose(daamlib.openvocab(cached, "car", "car", pipe=pixart), daamlib.daam(cached, "car"))


def test_pixart_batches_map_to_the_right_records(pixart):
    prompts = ["a car on the road", "a person next to a tree"]
    records = daamlib.generate(pixart, prompts, seed=3, num_images_per_prompt=2, num_inference_steps=2,
                               height=HEIGHT, width=WIDTH, pipe_kwargs=CALL)
    assert [r.tokens.text for r in records] == [prompts[0]] * 2 + [prompts[1]] * 2
    with daamlib.trace(pixart, cfg=True) as tr:
        pixart(prompt=prompts[1], num_inference_steps=2, height=HEIGHT, width=WIDTH, output_type="np",
               generator=torch.Generator().manual_seed(3), num_images_per_prompt=4, **CALL)
    alone = tr.records[2]  # same seeded noise batch: the 3rd image of a 4-image call with the same generator
    for name, value in records[2].daam.items():
        assert torch.allclose(value, alone.daam[name], rtol=1e-4, atol=1e-4)


def test_pixart_needs_to_be_told_about_guidance(pixart):
    with pytest.raises(ValueError, match="pass cfg=True or cfg=False"):
        with daamlib.trace(pixart):
            run(pixart)
    with pytest.raises(ValueError, match="up blocks' self-attention of a UNet"):
        daamlib.trace(pixart, self_attention=True).__enter__()


def test_published_pixart_alpha_512_layers_on_the_meta_device():
    transformer = published_transformer_on_meta("PixArt-alpha/PixArt-XL-2-512x512")
    layers = daamlib.attention_layers(transformer)
    assert [layer.name for layer in layers] == [f"transformer_blocks.{i}.attn2" for i in range(28)]
    assert {(layer.heads, layer.head_dim, layer.key_dim) for layer in layers} == {(16, 72, 1152)}
    assert transformer.caption_projection.linear_1.in_features == 4096  # T5-XXL features, projected to 1152


def test_flux_dev_is_traced_not_refused():
    """Flux-dev's 19 double- and 38 single-stream blocks are traced (checked in tests/test_flux_capture.py)."""
    pipe = SimpleNamespace(transformer=published_transformer_on_meta("black-forest-labs/FLUX.1-dev"))
    with daamlib.trace(pipe) as tr:
        assert len(tr.layers) == 19 + 38 and {layer.kind for layer in tr.layers} == {"joint"}


def test_load_pipeline_loads_a_saved_pixart_and_its_records_name_it(pixart, tmp_path):
    pixart.save_pretrained(tmp_path / "pixart")
    loaded = daamlib.load_pipeline(tmp_path / "pixart", device="cpu")
    assert type(loaded).__name__ == "PixArtAlphaPipeline"
    loaded.set_progress_bar_config(disable=True)
    (ours,) = daamlib.generate(loaded, PROMPT, seed=0, num_inference_steps=2, height=HEIGHT, width=WIDTH, pipe_kwargs=CALL)
    (theirs,) = daamlib.generate(pixart, PROMPT, seed=0, num_inference_steps=2, height=HEIGHT, width=WIDTH, pipe_kwargs=CALL)
    assert np.array_equal(ours.image, theirs.image)
    assert torch.allclose(daamlib.daam(ours, "tree"), daamlib.daam(theirs, "tree"))
    daamlib.modules.check_same_model(ours.meta.model_fingerprint, pixart)  # raises if the fingerprints differ


def test_pixart_sigma_pipeline_is_traced_like_alpha(pixart):
    from diffusers import PixArtSigmaPipeline

    sigma = PixArtSigmaPipeline(**pixart.components)
    sigma.set_progress_bar_config(disable=True)
    (ours,) = daamlib.generate(sigma, PROMPT, seed=0, num_inference_steps=2, height=HEIGHT, width=WIDTH, pipe_kwargs=CALL)
    (alpha,) = daamlib.generate(pixart, PROMPT, seed=0, num_inference_steps=2, height=HEIGHT, width=WIDTH, pipe_kwargs=CALL)
    assert ours.tokens.text == PROMPT
    assert torch.allclose(daamlib.daam(ours, "car"), daamlib.daam(alpha, "car"), rtol=1e-4, atol=1e-5)
