"""Flux (double- and single-stream blocks over [text, image] with rotary embeddings) traced: DAAM reads, for the
image queries, the text columns of the softmax over all keys, checked against that softmax recomputed plainly over
the whole joint sequence (tests/naive.py StoreFlux); true CFG's negative-prompt calls are kept apart."""

import sys

import numpy as np
import pytest
import torch

import daamlib
from daamlib.capture.trace import Trace
from daamlab.testing.dit import published_transformer_on_meta, tiny_random_flux_pipeline
from naive import naive_daam, naive_text_share, record_everything
from test_gpu_paths import HostReads

PROMPT = "a car and a tree on the road"
NEGATIVE = "a black dog in the rain"
HEIGHT, WIDTH = 32, 48  # the tiny VAE halves them, Flux packs 2x2: 8 x 12 image tokens
LATENT = (HEIGHT // 2, WIDTH // 2)
T5_LENGTH = 16
TRUE_CFG = {"negative_prompt": NEGATIVE, "true_cfg_scale": 4.0}
LAYERS = ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn"]


@pytest.fixture(scope="module")
def flux():
    return tiny_random_flux_pipeline(seed=0, sharpen=6.0, max_length=T5_LENGTH)


def run(pipe, prompt=PROMPT, seed=0, steps=2, height=HEIGHT, width=WIDTH, **kwargs):
    generator = torch.Generator().manual_seed(seed)
    return pipe(prompt=prompt, generator=generator, num_inference_steps=steps, height=height, width=width,
                output_type="np", max_sequence_length=T5_LENGTH, **kwargs).images


def check_equal(ours, naive, what):
    """rtol 1e-4 against the plain recomputation; returns max |diff| relative to the naive map's peak."""
    assert torch.allclose(ours, naive, rtol=1e-4, atol=1e-5 * naive.abs().max()), (what, (ours - naive).abs().max())
    assert naive.std() > 1e-2 * naive.mean(), what  # the sharpened model's maps are not flat
    return float((ours - naive).abs().max() / naive.abs().max())


@pytest.mark.parametrize("extra", [{}, TRUE_CFG, {**TRUE_CFG, "branch": "uncond"}], ids=["plain", "true-cfg", "uncond"])
def test_tracing_flux_does_not_change_the_image(flux, extra):
    call = {k: v for k, v in extra.items() if k != "branch"}
    plain = run(flux, **call)
    with daamlib.trace(flux, per_head=True, per_step=True, branch=extra.get("branch", "cond")) as tr:
        traced = run(flux, **call)
    assert np.array_equal(plain, traced)
    assert tr.records[0].num_steps == 2


@pytest.mark.parametrize("height,width", [(HEIGHT, WIDTH), (WIDTH, HEIGHT)])
def test_flux_daam_equals_the_plain_joint_softmax(flux, height, width):
    latent = (height // 2, width // 2)
    calls, _ = record_everything(flux, lambda: run(flux, height=height, width=width), text_length=T5_LENGTH)
    with daamlib.trace(flux, per_head=True) as tr:
        run(flux, height=height, width=width)
    (record,) = tr.records
    assert [(layer.name, layer.kind, layer.resolution) for layer in record.cross_layers] == \
        [(name, "joint", (height // 4, width // 4)) for name in LAYERS]  # the token grid, from img_ids
    assert record.meta.latent_size == latent and record.meta.image_size == (height, width)
    worst = 0.0
    for word in ("car", "tree", "<eot>"):
        token = record.tokens.token_indices(word)[0]
        worst = max(worst, check_equal(daamlib.daam(record, word), naive_daam(calls, 0, token, latent), word))
        for name in LAYERS:  # double- and single-stream blocks each equal their own plain softmax
            naive = naive_daam(calls, 0, token, latent, keep=lambda call, step, name=name: call["layer"] == name)
            worst = max(worst, check_equal(daamlib.daam(record, word, layers=[name]), naive, (word, name)))
    print(f"Flux {height}x{width}: max |ours - naive| / peak = {worst:.2e}")
    # the text columns hold what an image query gives to text, as the softmax over all [text, image] keys does
    for layer in record.cross_layers:
        share, naive_share = record.daam[layer.name].sum(-1), naive_text_share(calls, layer.name, 0)  # [hw]
        assert torch.allclose(share, naive_share, atol=1e-5 * record.num_steps * layer.heads), layer.name


def test_flux_tokens_are_t5_alone(flux):
    (record,) = daamlib.generate(flux, PROMPT, seed=0, num_inference_steps=2, height=HEIGHT, width=WIDTH,
                                 pipe_kwargs={"max_sequence_length": T5_LENGTH})  # generate needs no cfg for Flux
    tokens = record.tokens
    assert tokens.length == T5_LENGTH == record.daam[LAYERS[0]].shape[-1]
    assert tokens.sot_index is None and tokens.text == PROMPT and tokens.strings[tokens.eot_index] == "</s>"
    assert record.meta.image_size == (HEIGHT, WIDTH) and record.image.shape == (HEIGHT, WIDTH, 3)
    expected = flux.scheduler.timesteps  # the record keeps the scheduler's t (the model is given t / 1000)
    assert torch.allclose(torch.tensor(record.meta.timesteps), expected.float(), rtol=1e-5)


@pytest.mark.parametrize("branch,parity,text", [("cond", 0, PROMPT), ("uncond", 1, NEGATIVE)])
def test_true_cfg_traces_one_prompt_never_both(flux, branch, parity, text):
    calls, _ = record_everything(flux, lambda: run(flux, steps=3, **TRUE_CFG), text_length=T5_LENGTH)
    assert len(calls) == 3 * 2 * len(LAYERS)  # a prompt call and a negative call per step
    with daamlib.trace(flux, branch=branch, per_step=True) as tr:
        run(flux, steps=3, **TRUE_CFG)
    (record,) = tr.records
    assert record.num_steps == 3 and record.meta.branch == branch and record.tokens.text == text
    naive_steps = [2 * step + parity for step in range(3)]  # naive "steps" count calls: prompt, negative, ...
    worst = 0.0
    for word in ("<eot>", *text.split()[1:3]):
        token = record.tokens.token_indices(word)[0]  # a word's first token (rare words take several)
        naive = naive_daam(calls, 0, token, LATENT, keep=lambda call, step: step in naive_steps)
        worst = max(worst, check_equal(daamlib.daam(record, token), naive, word))
        last = naive_daam(calls, 0, token, LATENT, keep=lambda call, step: step == naive_steps[-1])
        worst = max(worst, check_equal(daamlib.daam(record, token, steps=[2]), last, (word, "step 2")))
        other = naive_daam(calls, 0, token, LATENT, keep=lambda call, step: step not in naive_steps)
        assert not torch.allclose(daamlib.daam(record, token), naive + other, rtol=1e-2)  # the other branch: not summed
    print(f"Flux true CFG, branch={branch}: max |ours - naive| / peak = {worst:.2e}")


def test_true_cfg_batches_map_to_the_right_records(flux):
    prompts, negatives = ["a car on the road", "a person next to a tree"], ["a dog", "a red bus"]
    calls, _ = record_everything(flux, lambda: run(flux, prompt=prompts, negative_prompt=negatives, true_cfg_scale=4.0),
                                 text_length=T5_LENGTH)
    records = daamlib.generate(flux, prompts, seed=0, num_inference_steps=2, height=HEIGHT, width=WIDTH,
                               negative_prompt=negatives, pipe_kwargs={"max_sequence_length": T5_LENGTH,
                                                                       "true_cfg_scale": 4.0})
    assert [r.tokens.text for r in records] == prompts
    for row, (record, word) in enumerate(zip(records, ("car", "tree"))):
        token = record.tokens.token_indices(word)[0]
        check_equal(daamlib.daam(record, word), naive_daam(calls, row, token, LATENT, keep=lambda c, s: s % 2 == 0), word)


def test_flux_generations_read_img_ids_once_and_nothing_else(flux, monkeypatch):
    """On CUDA the hooks must not stall the stream: the only host read is the token grid, once per generation."""
    reads, grids = HostReads(), []
    for name in ("on_denoiser", "on_text_encoder", "observe_joint_attention"):
        def watched(self, *args, _original=getattr(Trace, name), **kwargs):
            with reads:
                return _original(self, *args, **kwargs)
        monkeypatch.setattr(Trace, name, watched)
    flux_module = sys.modules["daamlib.capture.flux"]  # where the trace's FluxReader reads the token grid
    original_grid = flux_module.token_grid
    monkeypatch.setattr(flux_module, "token_grid", lambda *a: grids.append(a) or original_grid(*a))
    with daamlib.trace(flux, per_head=True, per_step=True) as tr:
        run(flux, steps=3, **TRUE_CFG)
        run(flux, prompt="a person", steps=2)
        assert reads.reads == [] and len(grids) == 2
    assert [r.num_steps for r in tr.records] == [3, 2]


def test_flux_refuses_what_it_cannot_read(flux):
    for option in ({"queries": True}, {"contexts": ["a bicycle"]}):  # linear=True maps the prompt's words (test_dit_native_agreement)
        with pytest.raises(ValueError, match="each block projects its own text stream"):
            daamlib.trace(flux, **option).__enter__()
    with pytest.raises(ValueError, match="leave cfg unset"):
        daamlib.trace(flux, cfg=True).__enter__()
    for call in ({}, {"negative_prompt": NEGATIVE}):  # no true CFG: the pipeline makes no negative-prompt call
        with pytest.raises(ValueError, match="true_cfg_scale > 1"):
            with daamlib.trace(flux, branch="uncond"):
                run(flux, **call)
    with torch.no_grad():
        embeds = flux.encode_prompt(PROMPT, prompt_2=None, max_sequence_length=T5_LENGTH)[:2]
    with pytest.raises(ValueError, match="true_cfg_scale > 1"):  # embeddings given: found at the second step
        with daamlib.trace(flux, branch="uncond"):
            flux(prompt_embeds=embeds[0], pooled_prompt_embeds=embeds[1], num_inference_steps=2, height=HEIGHT,
                 width=WIDTH, output_type="np", generator=torch.Generator().manual_seed(0))


def test_flux_from_embeddings_counts_generations_by_its_calls(flux):
    """No text encoder runs: each pipeline call is told apart by its prompt tensor and latents alone."""
    with torch.no_grad():
        (embeds, pooled, _), (negative, negative_pooled, _) = (
            flux.encode_prompt(text, prompt_2=None, max_sequence_length=T5_LENGTH) for text in (PROMPT, NEGATIVE))
    call = dict(prompt_embeds=embeds, pooled_prompt_embeds=pooled, height=HEIGHT, width=WIDTH, output_type="np")
    with daamlib.trace(flux) as tr:
        flux(**call, num_inference_steps=1, generator=torch.Generator().manual_seed(0), negative_prompt_embeds=negative,
             negative_pooled_prompt_embeds=negative_pooled, true_cfg_scale=4.0)
        flux(**call, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    first, second = tr.records
    assert (first.num_steps, second.num_steps) == (1, 2) and first.meta.token_ids is None
    (reference,) = daamlib.generate(flux, PROMPT, seed=0, num_inference_steps=2, height=HEIGHT, width=WIDTH,
                                    pipe_kwargs={"max_sequence_length": T5_LENGTH})
    for name in LAYERS:
        # the pipeline's own encoding path differs in the last bits (its images by ~3e-7)
        assert torch.allclose(second.daam[name], reference.daam[name], rtol=1e-4, atol=1e-4)


def test_published_flux_dev_layers_on_the_meta_device():
    layers = daamlib.attention_layers(published_transformer_on_meta("black-forest-labs/FLUX.1-dev"))
    assert [layer.name for layer in layers] == [f"transformer_blocks.{i}.attn" for i in range(19)] + \
        [f"single_transformer_blocks.{i}.attn" for i in range(38)]
    assert {(layer.kind, layer.heads, layer.head_dim, layer.key_dim) for layer in layers} == {("joint", 24, 128, 3072)}
