"""Capture covers every cross-attention layer of the real SD 2-base and SDXL UNets (random weights)."""

import gc

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

import daamlib
from daamlab.testing.unet import SD2_BASE_UNET, SDXL_BASE_UNET, random_weights
from pipelines import clip_tokenizer, tiny_pipeline, tiny_text_encoder

pytestmark = pytest.mark.slow
HEAD_DIM = 64  # every SD 2 / SDXL attention head has 64 channels


def expected_cross_layers(config):
    """(name, heads) of every cross-attention layer, derived from the config alone."""
    depth = config.get("transformer_layers_per_block", 1)
    depth = depth if isinstance(depth, tuple) else (depth,) * len(config["block_out_channels"])
    channels = config["block_out_channels"]
    layers = []
    for b, kind in enumerate(config["down_block_types"]):
        if kind.startswith("CrossAttn"):
            for a in range(config["layers_per_block"]):
                layers += [(f"down_blocks.{b}.attentions.{a}.transformer_blocks.{t}.attn2", channels[b] // HEAD_DIM) for t in range(depth[b])]
    layers += [(f"mid_block.attentions.0.transformer_blocks.{t}.attn2", channels[-1] // HEAD_DIM) for t in range(depth[-1])]
    for b, kind in enumerate(config["up_block_types"]):
        level = len(channels) - 1 - b
        if kind.startswith("CrossAttn"):
            for a in range(config["layers_per_block"] + 1):
                layers += [(f"up_blocks.{b}.attentions.{a}.transformer_blocks.{t}.attn2", channels[level] // HEAD_DIM) for t in range(depth[level])]
    return layers


def check_capture(pipe, config, call_kwargs):
    expected = expected_cross_layers(config)
    with daamlib.trace(pipe, linear=True) as tr:
        pipe(prompt="a car in an urban environment", num_inference_steps=1, height=32, width=48, guidance_scale=1.0,
             output_type="latent", generator=torch.Generator().manual_seed(0), **call_kwargs)
    (record,) = tr.records
    assert [(l.name, l.heads) for l in record.cross_layers] == expected
    levels = {}
    for layer in record.cross_layers:
        assert layer.head_dim == HEAD_DIM
        assert record.daam[layer.name].shape == (layer.resolution[0] * layer.resolution[1], 77)
        levels.setdefault(layer.resolution, []).append(layer.name)
        assert torch.allclose(record.daam[layer.name].sum(-1), torch.full((layer.resolution[0] * layer.resolution[1],), float(layer.heads)), rtol=1e-4)
    assert record.linear_matrix.shape == (16 * 24, config["cross_attention_dim"])
    assert daamlib.daam(record, "car").shape == (16, 24)
    return sorted(levels)


def test_sd2_base_architecture():
    small = tiny_pipeline()
    pipe = StableDiffusionPipeline(
        vae=small.vae, text_encoder=tiny_text_encoder(1024), tokenizer=clip_tokenizer(),
        unet=random_weights(UNet2DConditionModel, SD2_BASE_UNET), scheduler=DDIMScheduler(), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    resolutions = check_capture(pipe, SD2_BASE_UNET, {})
    assert resolutions == [(2, 3), (4, 6), (8, 12), (16, 24)]  # 64/32/16/8 of SD 2 at a 16x24 latent
    del pipe
    gc.collect()


def test_sdxl_architecture():
    small = tiny_pipeline()
    tokenizer = clip_tokenizer()
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=1280, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=20, projection_dim=1280, max_position_embeddings=77,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
    pipe = StableDiffusionXLPipeline(
        vae=small.vae, text_encoder=tiny_text_encoder(768), text_encoder_2=CLIPTextModelWithProjection(config),
        tokenizer=tokenizer, tokenizer_2=tokenizer, unet=random_weights(UNet2DConditionModel, SDXL_BASE_UNET), scheduler=DDIMScheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    resolutions = check_capture(pipe, SDXL_BASE_UNET, {})
    assert resolutions == [(4, 6), (8, 12)]  # SDXL attends at 1/2 and 1/4 of the latent
    del pipe
    gc.collect()
