"""Native-resolution DAAM on DiTs equals the model's own attention, layer by layer, on many configurations.

Each configuration is a tiny pipeline built here (not the project's test pipelines): Flux with and without the
guidance embedding, other rotary axes, 1-4 heads, peaky and flat logits, non-square sizes, true CFG, with and
without T5 padding; SD3 with and without ``text_encoder_3``, with SD3.5's RMS q/k norms and dual attention;
PixArt-Σ with and without padding and CFG. ``daam(record, word, layers=[layer], upsample="native")`` is compared
with the attention recomputed plainly from each module's own projections, norms and rotary embeddings
(``tests/naive.py``: StoreFlux, StoreJoint, StoreEverything, written independently of the capture), summed over
heads and steps at the patch grid, with no interpolation on either side."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)

import daamlib
from daamlab.testing.dit import (
    FLUX_SCHEDULE,
    FLUX_VAE_FACTORS,
    SD3_VAE_FACTORS,
    T5_DIM,
    build_t5_tokenizer,
    sharpen_attention,
    tiny_clip_with_projection,
    tiny_t5_encoder,
    tiny_vae,
)
from daamlab.testing.unet import TEXT_DIM, clip_tokenizer, tiny_text_encoder
from naive import record_everything, up

PROMPT = "a car and a tree on the road"
WORDS = ("car", "tree", "road")
STEPS = 2
RELATIVE_TOLERANCE = 1e-4  # of the naive map's peak, in float32


@dataclass(frozen=True)
class Config:
    name: str
    height: int = 32
    width: int = 48
    heads: int = 2
    sharpen: float = 6.0
    padding: bool = True  # T5 padded past the prompt (else max_sequence_length = the prompt's token count)
    guidance_embeds: bool = True  # Flux
    rope_axes: tuple[int, int, int] = (4, 6, 6)  # Flux: sum = head dim
    true_cfg: bool = False  # Flux
    branch: str = "cond"
    guidance_scale: float = 4.5  # SD3, PixArt: > 1 runs classifier-free guidance (rows [uncond, cond])
    t5: bool = True  # SD3: text_encoder_3 present
    qk_norm: str | None = None  # SD3.5: "rms_norm"
    dual_attention: bool = False  # SD3.5: an image self-attention (attn2) beside the joint attention


def _t5_length(tokenizer, padding: bool) -> int:
    return len(tokenizer(PROMPT).input_ids) + (8 if padding else 0)


def build_flux(config: Config):
    torch.manual_seed(0)
    tokenizer_2 = build_t5_tokenizer(64)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=sum(config.rope_axes),
        num_attention_heads=config.heads, joint_attention_dim=T5_DIM, pooled_projection_dim=TEXT_DIM,
        guidance_embeds=config.guidance_embeds, axes_dims_rope=config.rope_axes,
    )
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULE), vae=tiny_vae(flow=FLUX_VAE_FACTORS),
        text_encoder=tiny_text_encoder(TEXT_DIM).eval(), tokenizer=clip_tokenizer(),
        text_encoder_2=tiny_t5_encoder(tokenizer_2), tokenizer_2=tokenizer_2, transformer=transformer,
    )
    length = _t5_length(tokenizer_2, config.padding)
    call = {"max_sequence_length": length}
    if config.true_cfg:
        call.update(negative_prompt="a black dog in the rain", true_cfg_scale=4.0)
    return pipe, call, length, 2 if config.true_cfg else 1, 0


def build_sd3(config: Config):
    torch.manual_seed(0)
    tokenizer_3 = build_t5_tokenizer(64)
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=8,
        num_attention_heads=config.heads, joint_attention_dim=T5_DIM, caption_projection_dim=8 * config.heads,
        pooled_projection_dim=2 * TEXT_DIM, pos_embed_max_size=32, qk_norm=config.qk_norm,
        dual_attention_layers=(0, 1) if config.dual_attention else (),
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=tiny_vae(flow=SD3_VAE_FACTORS),
        text_encoder=tiny_clip_with_projection(), tokenizer=clip_tokenizer(),
        text_encoder_2=tiny_clip_with_projection(), tokenizer_2=clip_tokenizer(),
        text_encoder_3=tiny_t5_encoder(tokenizer_3) if config.t5 else None, tokenizer_3=tokenizer_3 if config.t5 else None,
    )
    call = {"max_sequence_length": _t5_length(tokenizer_3, config.padding), "guidance_scale": config.guidance_scale}
    return pipe, call, None, 1, int(config.guidance_scale > 1)


def build_pixart_sigma(config: Config):
    torch.manual_seed(0)
    tokenizer = build_t5_tokenizer(64)
    transformer = PixArtTransformer2DModel(  # Σ: the α architecture with its own position-embedding scale
        num_attention_heads=config.heads, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=8 * config.heads, sample_size=16, patch_size=2, caption_channels=T5_DIM,
        use_additional_conditions=False, interpolation_scale=2,
    )
    pipe = PixArtSigmaPipeline(tokenizer=tokenizer, text_encoder=tiny_t5_encoder(tokenizer), vae=tiny_vae(),
                               transformer=transformer, scheduler=DDIMScheduler(clip_sample=False))
    call = {"max_sequence_length": _t5_length(tokenizer, config.padding), "guidance_scale": config.guidance_scale,
            "use_resolution_binning": False}
    return pipe, call, None, 1, int(config.guidance_scale > 1)


FAMILIES = {"flux": build_flux, "sd3": build_sd3, "pixart-sigma": build_pixart_sigma}
CONFIGS = {
    "flux": [
        Config("dev-like, peaky, padded"),
        Config("schnell-like (no guidance embedding), rope (2, 6, 8), 3 heads, portrait", height=48, width=32,
               heads=3, guidance_embeds=False, rope_axes=(2, 6, 8), sharpen=8.0),
        Config("flat logits, 1 head, rope (4, 4, 8), no padding, square", width=32, heads=1, sharpen=1.0,
               rope_axes=(4, 4, 8), padding=False),
        Config("true CFG, 4 heads, rope (8, 4, 4), 64 x 32", height=64, width=32, heads=4, rope_axes=(8, 4, 4),
               true_cfg=True, sharpen=4.0),
        Config("true CFG, the negative prompt's branch, head dim 24", heads=2, rope_axes=(4, 8, 12), true_cfg=True,
               branch="uncond"),
    ],
    "sd3": [
        Config("SD3 with T5, CFG, padded"),
        Config("SD3 without text_encoder_3, 3 heads, no CFG, portrait", height=48, width=32, heads=3, t5=False,
               guidance_scale=1.0),
        Config("SD3.5-like: RMS q/k norms and dual attention, flat, no padding", heads=1, sharpen=1.0,
               qk_norm="rms_norm", dual_attention=True, padding=False),
    ],
    "pixart-sigma": [
        Config("CFG, padded (masked), peaky"),
        Config("no CFG, no padding, 3 heads, flat, portrait", height=48, width=32, heads=3, sharpen=1.0,
               padding=False, guidance_scale=1.0),
    ],
}
CASES = [(family, config) for family, configs in CONFIGS.items() for config in configs]


def layer_order(name: str) -> tuple:
    """Module order: double-stream before single-stream blocks, then by block index."""
    block, index = name.split(".")[:2]
    return block.startswith("single"), int(index)


def naive_native(calls, layer, row, tokens, grid, calls_per_step, parity):
    """sum over the layer's calls of this branch and over heads of A[:, tokens].mean(tokens), at the patch grid."""
    kept = [call for call in calls if call["layer"] == layer]
    kept = kept[parity::calls_per_step]  # true CFG: prompt, negative prompt, prompt, ...
    total = sum(call["probs"][row][:, :, tokens].mean(-1).sum(0) for call in kept)  # [hw]
    return total.reshape(grid)


def recorded_pipeline(family, config):
    """The case's tiny pipeline, a function that runs it (seeded), and every attention call of one run, recorded
    plainly (tests/naive.py); with the calls per step and the traced row of the batch."""
    pipe, call, text_length, calls_per_step, row = FAMILIES[family](config)
    if config.sharpen != 1.0:
        sharpen_attention(pipe.transformer, config.sharpen)
    pipe.set_progress_bar_config(disable=True)

    def run():
        return pipe(prompt=PROMPT, generator=torch.Generator().manual_seed(0), num_inference_steps=STEPS,
                    height=config.height, width=config.width, output_type="np", **call).images

    calls, _ = record_everything(pipe, run, text_length=text_length)
    return pipe, run, calls, calls_per_step, row


@pytest.mark.parametrize("family,config", CASES, ids=[f"{family}: {config.name}" for family, config in CASES])
def test_native_daam_equals_the_models_attention_on_every_layer(family, config):
    pipe, run, calls, calls_per_step, row = recorded_pipeline(family, config)
    cfg = {"cfg": config.guidance_scale > 1} if family == "pixart-sigma" else {}
    with daamlib.trace(pipe, branch=config.branch, **cfg) as tr:
        run()
    (record,) = tr.records
    parity = int(config.branch == "uncond")
    if family == "flux" and config.branch == "uncond":
        words = ("black", "dog", "rain")
    else:
        words = WORDS
    assert record.num_steps == STEPS
    assert [layer.name for layer in record.cross_layers] == sorted({call["layer"] for call in calls}, key=layer_order)
    worst = 0.0
    for layer in record.cross_layers:
        for word in words:
            tokens = list(record.tokens.token_indices(word))
            ours = daamlib.daam(record, word, layers=[layer.name], upsample="native")
            assert ours.shape == layer.resolution
            naive = naive_native(calls, layer.name, row, tokens, layer.resolution, calls_per_step, parity)
            error = float((ours - naive).abs().max() / naive.abs().max())
            assert error <= RELATIVE_TOLERANCE, (layer.name, word, error)
            worst = max(worst, error)
    layers = [layer.name for layer in record.cross_layers]
    total = daamlib.daam(record, words[0], upsample="native")  # every layer of a DiT shares the patch grid
    naive_total = sum(naive_native(calls, name, row, list(record.tokens.token_indices(words[0])),
                                   record.cross_layers[0].resolution, calls_per_step, parity) for name in layers)
    assert float((total - naive_total).abs().max() / naive_total.max()) <= RELATIVE_TOLERANCE
    print(f"{family} [{config.name}]: {len(layers)} layers x {len(words)} words, "
          f"max |ours - naive| / peak = {worst:.2e}")


LINEAR_CASES = [(family, config) for family, config in CASES if family in ("flux", "sd3")]


@pytest.mark.parametrize("family,config", LINEAR_CASES, ids=[f"{family}: {config.name}" for family, config in LINEAR_CASES])
def test_linear_daam_of_joint_attention_is_the_models_logits_summed(family, config, tmp_path):
    """Linear DAAM on SD3 and Flux: sum over steps, blocks and heads of up(q . k_word), the logits the model's softmax
    reads (unscaled), from each block's own text keys; averaged over the word's tokens."""
    pipe, run, calls, calls_per_step, row = recorded_pipeline(family, config)
    with daamlib.trace(pipe, branch=config.branch, daam=False, linear=True) as tr:
        run()
    (traced,) = tr.records
    record = daamlib.load_record(traced.save(tmp_path / "record.safetensors"))  # the logits survive a file
    assert not record.daam and record.linear_matrix is None
    parity = int(config.branch == "uncond")
    words = ("black", "dog", "rain") if family == "flux" and config.branch == "uncond" else WORDS
    latent = record.latent_size
    for word in words:
        tokens = list(record.tokens.token_indices(word))
        naive = torch.zeros(latent)
        for layer in record.cross_layers:
            kept = [c for c in calls if c["layer"] == layer.name][parity::calls_per_step]
            summed = sum(c["logits"][row][:, tokens].mean(-1) for c in kept).reshape(layer.resolution)
            naive += up(summed, latent, "bilinear")
        ours = daamlib.linear(record, word)
        error = float((ours - naive).abs().max() / naive.abs().max())
        assert error <= RELATIVE_TOLERANCE, (word, error)
    with pytest.raises(KeyError, match="ConceptAttention"):
        daamlib.linear(record, "bicycle", pipe=pipe)
    with pytest.raises(ValueError, match="conditioning vector"):
        daamlib.linear(record, torch.ones(record.text_embeddings.shape[-1]))
    mask = torch.ones(record.image_size, dtype=torch.bool)
    for variant in ("linear", "softmax"):  # refused before any epoch runs
        with pytest.raises(ValueError, match="no conditioning space"):
            daamlib.optimize_tokens([record], [mask], init="car", variant=variant, pipe=pipe, progress=False)
