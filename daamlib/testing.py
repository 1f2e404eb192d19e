"""Tiny random-weight Stable Diffusion pipelines, built offline: for tests, examples and quickstarts.

The CLIP tokenizer is built from the BPE file inside ``open_clip_torch`` (the ``toy`` extra)."""

from __future__ import annotations

from functools import lru_cache

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from .toyworld.tokenizer import build_clip_tokenizer

TEXT_DIM = 32


@lru_cache(maxsize=1)
def clip_tokenizer():
    return build_clip_tokenizer()


def tiny_text_encoder(hidden_size: int = TEXT_DIM) -> CLIPTextModel:
    tokenizer = clip_tokenizer()
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def tiny_random_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """Cross-attention at three resolutions plus the mid block; VAE factor 2."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32, 32),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_DIM, attention_head_dim=2, norm_num_groups=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(16, 16), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=tiny_text_encoder(), tokenizer=clip_tokenizer(), unet=unet,
        scheduler=PNDMScheduler(skip_prk_steps=True, steps_offset=1), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to("cpu")
