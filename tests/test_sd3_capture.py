"""SD3 (MM-DiT joint attention over [image, text]) traced: DAAM reads the text columns of the softmax the
model computes over image and text keys, checked against that softmax recomputed plainly."""

import numpy as np
import pytest
import torch

import daamlib
from daamlab.testing.dit import published_transformer_on_meta, tiny_random_sd3_pipeline
from naive import naive_daam, naive_text_share, record_everything

PROMPT = "a car and a tree on the road"
HEIGHT, WIDTH = 32, 48  # the tiny VAE halves them; patches of 2: 8 x 12 image tokens
LATENT = (HEIGHT // 2, WIDTH // 2)
T5_LENGTH = 16
CLIP_LENGTH = 77


@pytest.fixture(scope="module")
def sd3():
    return tiny_random_sd3_pipeline(seed=0, sharpen=4.0, max_length=T5_LENGTH)


def run(pipe, prompt=PROMPT, seed=0, steps=2, **kwargs):
    generator = torch.Generator().manual_seed(seed)
    return pipe(prompt=prompt, generator=generator, num_inference_steps=steps, height=HEIGHT, width=WIDTH,
                output_type="np", max_sequence_length=T5_LENGTH, **kwargs).images


@pytest.mark.parametrize("guidance", [5.0, 1.0])
def test_tracing_sd3_does_not_change_the_image(sd3, guidance):
    plain = run(sd3, guidance_scale=guidance)
    with daamlib.trace(sd3, per_head=True, per_step=True):
        traced = run(sd3, guidance_scale=guidance)
    assert np.array_equal(plain, traced)


@pytest.mark.parametrize("guidance,row", [(5.0, 1), (1.0, 0)])
def test_sd3_daam_equals_the_plain_joint_softmax(sd3, guidance, row):
    calls, _ = record_everything(sd3, lambda: run(sd3, guidance_scale=guidance))
    with daamlib.trace(sd3, per_head=True) as tr:
        run(sd3, guidance_scale=guidance)
    (record,) = tr.records
    assert [layer.kind for layer in record.cross_layers] == ["joint", "joint"]
    for word in ("car", "tree", "<eot>"):
        token = record.tokens.token_indices(word)[0]
        naive = naive_daam(calls, row=row, token=token, latent=LATENT)
        ours = daamlib.daam(record, word)
        assert torch.allclose(ours, naive, rtol=1e-4, atol=1e-5), (ours - naive).abs().max()
        assert naive.std() > 1e-2 * naive.mean()  # the sharpened model's maps are not flat
    t5_car = CLIP_LENGTH + record.tokens.strings[CLIP_LENGTH:].index("\u2581car")
    assert torch.allclose(daamlib.daam(record, t5_car), naive_daam(calls, row=row, token=t5_car, latent=LATENT),
                          rtol=1e-4, atol=1e-5)
    # the text columns hold what the image queries give to text, as the softmax over [image, text] keys does
    for layer in record.cross_layers:
        share, naive_share = record.daam[layer.name].sum(-1), naive_text_share(calls, layer.name, row)  # [hw]
        assert torch.allclose(share, naive_share, atol=1e-5 * record.num_steps * layer.heads), layer.name


def test_sd3_tokens_are_clip_then_t5(sd3):
    (record,) = daamlib.generate(sd3, PROMPT, seed=0, num_inference_steps=2, height=HEIGHT, width=WIDTH,
                                 pipe_kwargs={"max_sequence_length": T5_LENGTH})
    tokens = record.tokens
    assert tokens.length == CLIP_LENGTH + T5_LENGTH == record.daam[record.cross_layers[0].name].shape[-1]
    assert tokens.strings[0] == "<|startoftext|>" and tokens.text == PROMPT  # words are read in the CLIP stream
    t5 = daamlib.tokens.PromptTokens(tokens.ids[CLIP_LENGTH:], tokens.strings[CLIP_LENGTH:])
    assert t5.sot_index is None and t5.text == PROMPT and t5.strings[t5.eot_index] == "</s>"


def test_sd3_without_t5_names_the_zero_positions_padding(sd3):
    from diffusers import StableDiffusion3Pipeline

    no_t5 = StableDiffusion3Pipeline(**{**sd3.components, "text_encoder_3": None, "tokenizer_3": None})
    (record,) = daamlib.generate(no_t5, PROMPT, seed=0, num_inference_steps=2, height=HEIGHT, width=WIDTH,
                                 pipe_kwargs={"max_sequence_length": T5_LENGTH})
    assert record.tokens.strings[CLIP_LENGTH:] == ("<pad>",) * T5_LENGTH and record.tokens.text == PROMPT


def test_sd3_refuses_what_joint_attention_does_not_define(sd3):
    for option in ({"queries": True}, {"contexts": ["a bicycle"]}):  # linear=True maps the prompt's words (test_dit_native_agreement)
        with pytest.raises(ValueError, match="each block projects its own text stream"):
            daamlib.trace(sd3, **option).__enter__()


def test_published_sd3_medium_layers_on_the_meta_device():
    layers = daamlib.attention_layers(published_transformer_on_meta("stabilityai/stable-diffusion-3-medium-diffusers"))
    assert [layer.name for layer in layers] == [f"transformer_blocks.{i}.attn" for i in range(24)]
    assert {(layer.kind, layer.heads, layer.head_dim, layer.key_dim) for layer in layers} == {("joint", 24, 64, 1536)}
