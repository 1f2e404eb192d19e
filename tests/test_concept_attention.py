"""ConceptAttention (Helbling et al., ICML 2025) on SD3 and Flux: a concept stream through each MM-DiT block's text
weights, read by nothing. Checked against the real transformer run with the concepts appended to its text sequence and
a mask (tests/naive.py: image and prompt never see the concepts; concepts see only image and concepts)."""

import numpy as np
import pytest
import torch

import daamlib
from daamlab.testing.unet import tiny_random_pipeline
from daamlab.testing.dit import (sharpen_attention, tiny_random_flux_pipeline, tiny_random_pixart_pipeline,
                                 tiny_random_sd3_pipeline)
from naive import naive_concept_maps, run_flux_with_concepts, run_with_concepts

PROMPT = "a car and a tree on the road"
CONCEPTS = ["car", "tree", "sky", "road"]
HEIGHT, WIDTH = 32, 48  # 8 x 12 image tokens
LATENT = (HEIGHT // 2, WIDTH // 2)
T5_LENGTH, CLIP_LENGTH = 16, 77
CONCEPT_T5_LENGTH = 256  # concepts are encoded with the pipeline's default max_sequence_length


@pytest.fixture(scope="module")
def sd3():
    return tiny_random_sd3_pipeline(seed=0, sharpen=6.0, max_length=T5_LENGTH)


def run(pipe, guidance=5.0):
    generator = torch.Generator().manual_seed(0)
    return pipe(prompt=PROMPT, generator=generator, num_inference_steps=2, height=HEIGHT, width=WIDTH, output_type="np",
                max_sequence_length=T5_LENGTH, guidance_scale=guidance).images


@pytest.fixture(scope="module")
def traced(sd3):
    """(record, the transformer's inputs at every call, the image) of a traced generation with concepts."""
    inputs = []
    hook = sd3.transformer.register_forward_pre_hook(lambda module, args, kwargs: inputs.append(dict(kwargs)),
                                                     with_kwargs=True)
    try:
        with daamlib.trace(sd3, concepts=CONCEPTS) as tr:
            image = run(sd3)
    finally:
        hook.remove()
    return tr.records[0], inputs, image


def naive_concept_vectors(pipe, concepts, flux=False):
    """Each concept encoded alone; the mean of the encoder output over its T5 pieces (all its T5 ids but </s>), which
    follow SD3's 77 CLIP positions and are all of Flux's."""
    vectors = []
    for concept in concepts:
        if flux:
            embeddings, tokenizer, start = pipe.encode_prompt(prompt=concept, prompt_2=None)[0][0], pipe.tokenizer_2, 0
        else:
            embeddings = pipe.encode_prompt(prompt=concept, prompt_2=None, prompt_3=None, device="cpu",
                                            do_classifier_free_guidance=False)[0][0]  # [77 + 256, d]
            tokenizer, start = pipe.tokenizer_3, CLIP_LENGTH
        ids = tokenizer(concept).input_ids
        assert ids[-1] == tokenizer.eos_token_id and embeddings.shape[0] == start + (512 if flux else CONCEPT_T5_LENGTH)
        vectors.append(embeddings[start:start + len(ids) - 1].mean(dim=0))
    return torch.stack(vectors)


def test_concepts_leave_the_image_unchanged(sd3, traced):
    assert np.array_equal(run(sd3), traced[2])


def test_concept_maps_equal_the_masked_joint_sequence(sd3, traced):
    record, inputs, _ = traced
    assert len(inputs) == 2 and record.meta.concepts == CONCEPTS
    calls, outputs = run_with_concepts(sd3.transformer, inputs, naive_concept_vectors(sd3, CONCEPTS))
    for call_inputs, output in zip(inputs, outputs):  # the masked concepts change nothing the image reads
        plain = sd3.transformer(**{**call_inputs, "return_dict": False})[0]
        assert torch.allclose(output, plain, rtol=1e-4, atol=1e-5)
    assert [call["layer"] for call in calls] == ["transformer_blocks.0.attn", "transformer_blocks.1.attn"] * 2
    for variant in ("output", "cross"):
        naive = naive_concept_maps(calls, row=1, latent=LATENT, variant=variant)  # row 1: the prompt's half of CFG
        ours = daamlib.concept_maps(record, variant=variant)
        error = ((ours - naive).abs().max() / naive.abs().max()).item()
        print(f"{variant}: max |diff| / peak = {error:.2e}")
        assert torch.allclose(ours, naive, rtol=1e-4, atol=1e-5 * naive.abs().max().item()), error
        for index, concept in enumerate(CONCEPTS):
            assert torch.equal(daamlib.concept_attention(record, concept, variant=variant), ours[index])
    one_block = daamlib.ConceptAttention(layers=["transformer_blocks.1.attn"]).attribute(record, "car")
    last_block = naive_concept_maps([c for c in calls if c["layer"].startswith("transformer_blocks.1")], 1, LATENT)
    assert one_block.tokens == ("car",) and torch.allclose(one_block.heatmap, last_block[0], rtol=1e-4, atol=1e-5)


def test_concept_maps_are_softmaxes_neither_flat_nor_alike(traced):
    record = traced[0]
    maps = daamlib.concept_maps(record)  # [k, H, W]
    blocks_times_steps = len(record.concept_output) * record.num_steps
    assert torch.allclose(maps.sum(0), torch.full(LATENT, float(blocks_times_steps)), atol=1e-4)
    assert (maps.std(dim=(1, 2)) > 0.05 * maps.mean(dim=(1, 2))).all()
    for first in range(len(CONCEPTS)):
        for second in range(first + 1, len(CONCEPTS)):
            assert (maps[first] - maps[second]).abs().max() > 0.1
    cross = daamlib.concept_maps(record, variant="cross")
    heads = record.cross_layers[0].heads
    assert torch.allclose(cross.sum(0), torch.full(LATENT, float(blocks_times_steps * heads)), atol=1e-4)


def test_concept_maps_survive_save_and_load(traced, tmp_path):
    record = traced[0]
    loaded = daamlib.load_record(record.save(tmp_path / "record"))
    assert loaded.meta.concepts == CONCEPTS
    assert torch.equal(daamlib.concept_attention(loaded, "sky"), daamlib.concept_attention(record, "sky"))


def test_bad_concepts_say_what_to_do(sd3, traced):
    with pytest.raises(ValueError, match="names no concept"):
        daamlib.TraceOptions(concepts=[])
    with pytest.raises(ValueError, match=r"pass words such as|a list of words"):
        daamlib.TraceOptions(concepts="car")
    with pytest.raises(TypeError, match="non-empty word"):
        daamlib.TraceOptions(concepts=["car", 3])
    with pytest.raises(ValueError, match="repeat a word"):
        daamlib.TraceOptions(concepts=["car", "car"])
    with pytest.raises(ValueError, match="drop layers="):
        daamlib.trace(sd3, concepts=["car"], layers=["transformer_blocks.0.attn"]).__enter__()
    for other in (tiny_random_pipeline(), tiny_random_pixart_pipeline()):
        with pytest.raises(ValueError, match="MM-DiT blocks .* contexts="):
            daamlib.trace(other, concepts=["car"]).__enter__()
    record = traced[0]
    with pytest.raises(KeyError, match=r"trace with concepts=\[..., 'bus'\]"):
        daamlib.concept_attention(record, "bus")
    with pytest.raises(ValueError, match="variant must be"):
        daamlib.concept_maps(record, variant="outputs")
    with pytest.raises(KeyError, match="no concept maps"):
        daamlib.concept_maps(daamlib.Record(meta=record.meta))
    with pytest.raises(TypeError, match="pass one of its records"):
        daamlib.concept_attention([record], "car")


@pytest.fixture(scope="module")
def flux():
    """Flux with two double-stream blocks (the concept stream crosses one block into the next) and one single-stream."""
    tiny = tiny_random_flux_pipeline(seed=0, sharpen=6.0, max_length=T5_LENGTH)
    torch.manual_seed(1)
    transformer = type(tiny.transformer).from_config({**tiny.transformer.config, "num_layers": 2})
    sharpen_attention(transformer, 6.0)
    pipe = type(tiny)(**{**tiny.components, "transformer": transformer})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_flux_concept_maps_equal_the_masked_joint_sequence(flux):
    def run_flux():
        generator = torch.Generator().manual_seed(0)
        return flux(prompt=PROMPT, generator=generator, num_inference_steps=2, height=HEIGHT, width=WIDTH,
                    output_type="np", max_sequence_length=T5_LENGTH).images

    plain, inputs = run_flux(), []
    hook = flux.transformer.register_forward_pre_hook(lambda module, args, kwargs: inputs.append(dict(kwargs)),
                                                      with_kwargs=True)
    try:
        with daamlib.trace(flux, concepts=CONCEPTS) as tr:
            assert np.array_equal(run_flux(), plain)
    finally:
        hook.remove()
    (record,) = tr.records
    assert sorted(record.concept_output) == ["transformer_blocks.0.attn", "transformer_blocks.1.attn"]  # double-stream
    calls, outputs = run_flux_with_concepts(flux.transformer, inputs, naive_concept_vectors(flux, CONCEPTS, flux=True))
    for call_inputs, output in zip(inputs, outputs):  # the masked concepts change nothing the image reads
        assert torch.allclose(output, flux.transformer(**{**call_inputs, "return_dict": False})[0], rtol=1e-4, atol=1e-5)
    assert len(calls) == 4  # 2 double-stream blocks x 2 steps
    for variant in ("output", "cross"):
        naive = naive_concept_maps(calls, row=0, latent=LATENT, variant=variant)
        ours = daamlib.concept_maps(record, variant=variant)
        error = ((ours - naive).abs().max() / naive.abs().max()).item()
        print(f"flux {variant}: max |diff| / peak = {error:.2e}")
        assert torch.allclose(ours, naive, rtol=1e-4, atol=1e-5 * naive.abs().max().item()), error
    assert (ours.std(dim=(1, 2)) > 0.05 * ours.mean(dim=(1, 2))).all()
