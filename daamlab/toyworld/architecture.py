"""The toy model's components: sizes chosen so that it trains from scratch on a 2-core CPU.

The shape follows Stable Diffusion: a KL autoencoder (here with a 4× reduction, 4 latent
channels), a UNet with cross-attention at three resolutions plus the mid block (16/8/4 latent
pixels for 64×64 images, like SD's 64/32/16 and its mid block at 8), a CLIP text encoder over the
real 49408-token CLIP vocabulary, and PNDM with SD's noise schedule.
"""

from __future__ import annotations

from dataclasses import dataclass

from diffusers import AutoencoderKL, DDPMScheduler, PNDMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from daamlab.testing.unet import build_clip_tokenizer

# SD's training noise schedule; PNDM at inference shares it.
NOISE_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


@dataclass(frozen=True)
class ToyArchitecture:
    image_size: int = 64
    vae_channels: tuple[int, ...] = (32, 32, 64)  # one 2× reduction per block after the first
    latent_channels: int = 4
    unet_channels: tuple[int, ...] = (32, 64, 64)
    attention_head_dim: int = 8
    text_hidden_size: int = 64
    text_layers: int = 2
    text_length: int | None = None  # token positions of the tokenizer and encoder; None: the CLIP tokenizer's own
    text_heads: int = 4
    norm_groups: int = 16

    @property
    def latent_size(self) -> int:
        return self.image_size // 2 ** (len(self.vae_channels) - 1)


def build_vae(arch: ToyArchitecture) -> AutoencoderKL:
    levels = len(arch.vae_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=arch.latent_channels, block_out_channels=arch.vae_channels,
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        layers_per_block=1, norm_num_groups=arch.norm_groups, sample_size=arch.image_size,
    )


def build_tokenizer(arch: ToyArchitecture) -> CLIPTokenizer:
    """SD's CLIP tokenizer, with ``arch.text_length`` positions where the architecture sets them."""
    if arch.text_length is None:
        return build_clip_tokenizer()
    return build_clip_tokenizer(model_max_length=arch.text_length)


def build_text_encoder(arch: ToyArchitecture, tokenizer: CLIPTokenizer) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=arch.text_hidden_size, intermediate_size=4 * arch.text_hidden_size,
        num_hidden_layers=arch.text_layers, num_attention_heads=arch.text_heads,
        max_position_embeddings=tokenizer.model_max_length, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def build_unet(arch: ToyArchitecture) -> UNet2DConditionModel:
    levels = len(arch.unet_channels)
    return UNet2DConditionModel(
        sample_size=arch.latent_size, in_channels=arch.latent_channels, out_channels=arch.latent_channels,
        block_out_channels=arch.unet_channels, layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * levels, up_block_types=("CrossAttnUpBlock2D",) * levels,
        cross_attention_dim=arch.text_hidden_size, attention_head_dim=arch.attention_head_dim,
        norm_num_groups=arch.norm_groups,
    )


def training_scheduler() -> DDPMScheduler:
    return DDPMScheduler(**NOISE_SCHEDULE)


def inference_scheduler() -> PNDMScheduler:
    return PNDMScheduler(**NOISE_SCHEDULE, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
