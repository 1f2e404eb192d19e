"""daamlab.testing.dit: tiny random DiT pipelines (PixArt-α, SD3, Flux), their T5 tokenizer, sharper
attention, and the published transformers on the meta device."""

import json
import math
from functools import partial

import numpy as np
import pytest
import torch

from daamlab.testing.dit import (
    LATENT_CHANNELS,
    PUBLISHED_TRANSFORMERS,
    SHARPEN,
    T5_MAX_LENGTH,
    T5_VOCAB_SIZE,
    build_t5_tokenizer,
    published_transformer_on_meta,
    sharpen_attention,
    tiny_random_flux_pipeline,
    tiny_random_pixart_pipeline,
    tiny_random_sd3_pipeline,
)

PROMPT = "a car on the road"
PROMPT_PIECES = ["▁", "a", "▁car", "▁on", "▁the", "▁road", "</s>"]
BUILDERS = {"pixart": tiny_random_pixart_pipeline, "sd3": tiny_random_sd3_pipeline, "flux": tiny_random_flux_pipeline}
CALL = {"pixart": dict(use_resolution_binning=False, clean_caption=False), "sd3": {}, "flux": {}}
HEIGHT, WIDTH = 48, 32  # non-square: 24 × 16 latent, 12 × 8 = 96 image tokens
IMAGE_TOKENS = (HEIGHT // 4) * (WIDTH // 4)
CLIP_POSITIONS = 77


@pytest.fixture(scope="module")
def pipes():
    return {kind: build() for kind, build in BUILDERS.items()}


def generate(pipe, kind, **kwargs):
    options = dict(num_inference_steps=2, height=HEIGHT, width=WIDTH, max_sequence_length=T5_MAX_LENGTH,
                   generator=torch.Generator().manual_seed(0), **CALL[kind])
    return pipe(PROMPT, **{**options, **kwargs}).images


def attention_inputs(module, run):
    """The (hidden_states, encoder_hidden_states, attention_mask) of each call of ``module`` during ``run()``."""
    calls = []

    def hook(_, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        calls.append((hidden, kwargs.get("encoder_hidden_states"), kwargs.get("attention_mask")))

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        run()
    finally:
        handle.remove()
    return calls


# -- the T5 tokenizer -------------------------------------------------------------------------------
def test_t5_tokenizer_marks_word_starts_and_appends_eos():
    tokenizer = build_t5_tokenizer()
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert tokenizer.model_max_length == T5_MAX_LENGTH and 150 < len(tokenizer) <= T5_VOCAB_SIZE
    ids = tokenizer(PROMPT).input_ids
    assert ids[-1] == 1 and tokenizer.convert_ids_to_tokens(ids) == PROMPT_PIECES  # "a" is "▁" + "a", as in T5
    common = "car person rider tree road sidewalk building bicycle dog cat banana traffic light sky an the in on of "
    common += "with and left right"
    assert {w: tokenizer.tokenize(w) for w in common.split()} == {w: ["▁" + w] for w in common.split()}
    assert len(tokenizer.tokenize("zebra")) >= 3 and tokenizer.unk_token_id not in tokenizer("Zebra, 42!").input_ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == PROMPT
    padded = tokenizer([PROMPT], padding="max_length", max_length=T5_MAX_LENGTH)
    assert padded.input_ids[0][len(ids):] == [0] * (T5_MAX_LENGTH - len(ids))
    assert sum(padded.attention_mask[0]) == len(ids)
    assert build_t5_tokenizer(8)("a car", padding="max_length").input_ids == ids[:3] + [1] + [0] * 4


def test_the_frozen_t5_vocabulary_is_what_the_trainer_learns():
    """The tokenizer is built from t5_pieces.json, since the trainer orders two close pieces at random run to
    run; retraining must still give the same pieces, with scores that differ by no more than that noise."""
    from daamlab.testing.dit import T5_PIECES_FILE, train_t5_pieces

    frozen = {piece: score for piece, score in json.loads(T5_PIECES_FILE.read_text(encoding="utf-8"))}
    trained = dict(train_t5_pieces())
    assert set(trained) == set(frozen)
    assert max(abs(trained[piece] - frozen[piece]) for piece in frozen) < 1e-3


# -- generation -------------------------------------------------------------------------------------
LATENT_SHAPES = {"pixart": (1, LATENT_CHANNELS, HEIGHT // 2, WIDTH // 2),
                 "sd3": (1, LATENT_CHANNELS, HEIGHT // 2, WIDTH // 2),
                 "flux": (1, IMAGE_TOKENS, 4 * LATENT_CHANNELS)}  # Flux returns its packed 2×2 patches


@pytest.mark.parametrize("kind", BUILDERS)
@pytest.mark.parametrize("guidance", [1.0, 4.5])
def test_tiny_pipeline_generates_non_square_images_with_and_without_cfg(pipes, kind, guidance):
    image = generate(pipes[kind], kind, guidance_scale=guidance, output_type="np")
    assert image.shape == (1, HEIGHT, WIDTH, 3) and np.isfinite(image).all()
    assert 0.0 <= image.min() <= image.max() <= 1.0 and image.std() > 0
    latents = generate(pipes[kind], kind, guidance_scale=guidance, output_type="latent")
    assert tuple(latents.shape) == LATENT_SHAPES[kind] and torch.isfinite(latents).all()


@pytest.mark.parametrize("kind", BUILDERS)
def test_same_seed_same_pipeline(pipes, kind):
    quick = dict(num_inference_steps=1, guidance_scale=1.0, output_type="latent")
    a, b = (generate(BUILDERS[kind](seed=3), kind, **quick) for _ in range(2))
    seed_0 = generate(pipes[kind], kind, **quick)
    assert torch.equal(a, b) and (a - seed_0).abs().max() > 1e-3


@pytest.mark.parametrize("kind, guidance, expected_batches", [
    ("pixart", 1.0, [1, 1]), ("pixart", 4.5, [2, 2]), ("sd3", 1.0, [1, 1]), ("sd3", 4.5, [2, 2]),
    ("flux", 4.5, [1, 1]),  # Flux-dev's guidance is an embedding, not CFG
])
def test_cfg_batches_unconditional_and_conditional_except_flux(pipes, kind, guidance, expected_batches):
    pipe = pipes[kind]
    calls = attention_inputs(pipe.transformer, lambda: generate(pipe, kind, guidance_scale=guidance))
    assert [hidden.shape[0] for hidden, _, _ in calls] == expected_batches


def test_flux_true_cfg_runs_the_negative_prompt_as_a_second_call(pipes):
    pipe = pipes["flux"]
    calls = attention_inputs(pipe.transformer, lambda: generate(pipe, "flux", negative_prompt="", true_cfg_scale=3.0))
    assert [hidden.shape[0] for hidden, _, _ in calls] == [1, 1, 1, 1]  # per step: prompt, then negative prompt


# -- what the attention processors receive ----------------------------------------------------------
def test_pixart_cross_attention_gets_a_bias_mask_over_t5_positions(pipes):
    pipe = pipes["pixart"]
    attn2 = pipe.transformer.transformer_blocks[0].attn2
    hidden, text, mask = attention_inputs(attn2, lambda: generate(pipe, "pixart", num_inference_steps=1))[0]
    assert tuple(hidden.shape) == (2, IMAGE_TOKENS, 16) and tuple(text.shape) == (2, T5_MAX_LENGTH, 16)
    assert tuple(mask.shape) == (2, 1, T5_MAX_LENGTH) and set(mask.unique().tolist()) == {0.0, -10000.0}
    assert (mask == 0).sum(-1).flatten().tolist() == [1, len(PROMPT_PIECES)]  # [negative "" → "</s>", prompt]


def test_sd3_joint_attention_text_is_77_clip_then_t5_positions(pipes):
    pipe = pipes["sd3"]
    attn = pipe.transformer.transformer_blocks[0].attn
    hidden, text, mask = attention_inputs(attn, lambda: generate(pipe, "sd3", num_inference_steps=1))[0]
    assert tuple(hidden.shape[:2]) == (2, IMAGE_TOKENS) and mask is None
    assert tuple(text.shape[:2]) == (2, CLIP_POSITIONS + T5_MAX_LENGTH)


def test_flux_double_block_gets_t5_text_and_single_block_the_concatenation(pipes):
    pipe = pipes["flux"]
    double, single = pipe.transformer.transformer_blocks[0].attn, pipe.transformer.single_transformer_blocks[0].attn
    calls = {name: attention_inputs(m, lambda: generate(pipe, "flux", num_inference_steps=1))[0]
             for name, m in (("double", double), ("single", single))}
    assert tuple(calls["double"][0].shape[:2]) == (1, IMAGE_TOKENS)
    assert tuple(calls["double"][1].shape[:2]) == (1, T5_MAX_LENGTH)
    assert tuple(calls["single"][0].shape[:2]) == (1, T5_MAX_LENGTH + IMAGE_TOKENS) and calls["single"][1] is None


# -- sharper attention ------------------------------------------------------------------------------
def _heads(x, attn):
    return x.unflatten(-1, (attn.heads, -1)).transpose(1, 2)  # (batch, heads, tokens, head dim)


def _normed(norm, x):
    return x if norm is None else norm(x)


def relative_entropy(attn, hidden, text, mask) -> float:
    """Mean entropy of softmax(q·k/√d) over the keys the mask keeps, as a fraction of log(their number);
    joint attention (``add_q_proj``) attends over image and text tokens together (rotary embeddings left out)."""
    q = _normed(attn.norm_q, _heads(attn.to_q(hidden), attn))
    joint = text is not None and getattr(attn, "add_q_proj", None) is not None
    k = _normed(attn.norm_k, _heads(attn.to_k(hidden if text is None or joint else text), attn))
    if joint:
        q = torch.cat([q, _normed(attn.norm_added_q, _heads(attn.add_q_proj(text), attn))], 2)
        k = torch.cat([k, _normed(attn.norm_added_k, _heads(attn.add_k_proj(text), attn))], 2)
    bias = torch.zeros(k.shape[0], 1, 1, k.shape[2]) if mask is None else mask[:, None]  # (batch, 1, 1, keys)
    p = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias).softmax(-1)
    entropy = -(p * p.clamp_min(torch.finfo(p.dtype).tiny).log()).sum(-1)
    return (entropy / (bias > -1).sum(-1).log()).mean().item()


@pytest.mark.parametrize("kind, layer", [
    ("pixart", "transformer_blocks.0.attn2"), ("pixart", "transformer_blocks.1.attn1"),
    ("sd3", "transformer_blocks.0.attn"), ("flux", "transformer_blocks.0.attn"),
    ("flux", "single_transformer_blocks.0.attn"),
])
def test_sharpening_lowers_attention_entropy(kind, layer):
    entropies = []
    for sharpen in (1.0, SHARPEN):
        pipe = BUILDERS[kind](sharpen=sharpen)
        attn = pipe.transformer.get_submodule(layer)
        calls = attention_inputs(attn, partial(generate, pipe, kind, num_inference_steps=1, guidance_scale=1.0))
        with torch.no_grad():
            entropies.append(relative_entropy(attn, *calls[0]))
    assert entropies[0] > 0.8 and entropies[1] < entropies[0] - 0.15, entropies  # near uniform, then clearly lower


def test_sharpen_scales_projections_or_the_qk_norms_that_would_undo_it():
    pixart, flux = tiny_random_pixart_pipeline(), tiny_random_flux_pipeline()
    before = {name: {key: value.clone() for key, value in m.transformer.state_dict().items()}
              for name, m in (("pixart", pixart), ("flux", flux))}
    assert sharpen_attention(pixart.transformer, 3.0) == len(pixart.transformer.attn_processors) == 4
    assert sharpen_attention(flux.transformer, 3.0) == len(flux.transformer.attn_processors) == 2
    after = {"pixart": pixart.transformer.state_dict(), "flux": flux.transformer.state_dict()}
    ratio = {(kind, key): (after[kind][key] / before[kind][key]).mean().item()
             for kind, key in [("pixart", "transformer_blocks.0.attn2.to_k.weight"),
                               ("pixart", "transformer_blocks.0.attn1.to_q.bias"),
                               ("pixart", "transformer_blocks.0.attn1.to_v.weight"),
                               ("flux", "transformer_blocks.0.attn.to_q.weight"),
                               ("flux", "transformer_blocks.0.attn.norm_q.weight"),
                               ("flux", "transformer_blocks.0.attn.norm_added_k.weight"),
                               ("flux", "single_transformer_blocks.0.attn.norm_k.weight")]}
    assert [round(r, 4) for r in ratio.values()] == [3.0, 3.0, 1.0, 1.0, 3.0, 3.0, 3.0]


# -- the published transformers on the meta device ---------------------------------------------------
@pytest.mark.parametrize("name, attentions, heads, inner, billions", [
    ("PixArt-alpha/PixArt-XL-2-512x512", 56, 16, 1152, 0.61),  # 28 blocks × (attn1 self + attn2 cross)
    ("stabilityai/stable-diffusion-3-medium-diffusers", 24, 24, 1536, 2.03),  # 24 joint blocks
    ("black-forest-labs/FLUX.1-dev", 57, 24, 3072, 11.90),  # 19 double-stream + 38 single-stream blocks
])
def test_published_transformer_on_meta(name, attentions, heads, inner, billions):
    model = published_transformer_on_meta(name)
    modules = [model.get_submodule(key.removesuffix(".processor")) for key in model.attn_processors]
    assert len(modules) == attentions
    assert {m.heads for m in modules} == {heads} and {m.to_q.out_features for m in modules} == {inner}
    assert {p.device.type for p in [*model.parameters(), *model.buffers()]} == {"meta"}
    assert round(sum(p.numel() for p in model.parameters()) / 1e9, 2) == billions
    assert set(PUBLISHED_TRANSFORMERS) >= {name}
    with pytest.raises(KeyError):
        published_transformer_on_meta("PixArt-alpha/PixArt-XL-2-1024-MS")
