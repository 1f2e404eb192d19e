"""Random-weight Stable Diffusion pipelines, built offline: for tests, examples and benchmarks.

* ``tiny_random_pipeline``: a few-kilobyte SD-shaped pipeline for unit tests;
* ``sd2_base_random_pipeline`` / ``sdxl_base_random_pipeline``: the published architectures of
  ``stabilityai/stable-diffusion-2-base`` and ``stable-diffusion-xl-base-1.0`` (UNet, text
  encoders, VAE, scheduler) with random weights: the cost of a forward pass and the size of a
  record are those of the real models.

The CLIP tokenizer is the project's own (SD's BPE vocabulary)."""

from __future__ import annotations

import copy
import gzip
import math
from functools import lru_cache
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from daamlib.tokens import byte_level_alphabet

TEXT_DIM = 32
CLIP_CONTEXT_LENGTH = 77  # positions of SD's CLIP tokenizer (the tokenizer of a real pipeline says its own)
_NUM_MERGES = 49152 - 256 - 2  # CLIP keeps this many merges of the BPE file


def open_clip_vocabulary_file() -> Path:
    try:
        import open_clip
    except ImportError as error:
        raise ImportError("building the CLIP tokenizer needs open_clip_torch: pip install open_clip_torch") from error
    return Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"


def build_clip_tokenizer(bpe_file: str | Path | None = None, model_max_length: int = CLIP_CONTEXT_LENGTH) -> CLIPTokenizer:
    """Stable Diffusion's CLIP tokenizer (49408 tokens, SOT 49406, EOT 49407, 77 positions unless
    ``model_max_length`` says otherwise, padded with EOT as in SD 1.x), built offline from the BPE merges
    file that ships inside ``open_clip_torch``."""
    path = Path(bpe_file) if bpe_file is not None else open_clip_vocabulary_file()
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]
    alphabet = list(byte_level_alphabet())
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length, pad_token="<|endoftext|>")


@lru_cache(maxsize=1)
def _built_clip_tokenizer():
    return build_clip_tokenizer()


def clip_tokenizer():
    """A fresh copy of SD's CLIP tokenizer (pipelines may add tokens to theirs, e.g. textual inversion)."""
    return copy.deepcopy(_built_clip_tokenizer())


def tiny_text_encoder(hidden_size: int = TEXT_DIM) -> CLIPTextModel:
    tokenizer = clip_tokenizer()
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def tiny_random_pipeline(seed: int = 0, block_out_channels: tuple[int, ...] = (16, 32, 32),
                         norm_num_groups: int = 8) -> StableDiffusionPipeline:
    """Cross-attention at every UNet level (three by default: 1, 1/2, 1/4 of the latent) plus the mid
    block at the lowest; VAE factor 2."""
    torch.manual_seed(seed)
    levels = len(block_out_channels)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=block_out_channels,
        down_block_types=("CrossAttnDownBlock2D",) * levels, up_block_types=("CrossAttnUpBlock2D",) * levels,
        cross_attention_dim=TEXT_DIM, attention_head_dim=2, norm_num_groups=norm_num_groups,
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


# -- the published architectures -------------------------------------------------------------------
SD2_BASE_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True,
)

SDXL_BASE_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(5, 10, 20), cross_attention_dim=2048, transformer_layers_per_block=(1, 2, 10),
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)

SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512,
)

SD_NOISE_SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                         steps_offset=1)


def random_weights(cls, config: dict, seed: int = 0) -> torch.nn.Module:
    """``cls(**config)`` built on the meta device and filled with scaled noise (1/sqrt(fan_in)).

    The default initialisation of an SDXL UNet takes about a minute on a CPU; this takes seconds."""
    with torch.device("meta"):
        module = cls(**config) if isinstance(config, dict) else cls(config)
    module.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if parameter.ndim > 1:
                parameter.normal_(0, 1 / math.sqrt(parameter[0].numel()), generator=generator)
            elif name.endswith("weight"):
                parameter.fill_(1.0)
            else:
                parameter.zero_()
        for name, buffer in module.named_buffers():  # e.g. CLIP's position ids
            if "position_ids" in name:
                buffer.copy_(torch.arange(buffer.shape[-1]).expand_as(buffer))
    return module.eval()


def _clip_text_config(hidden: int, layers: int, heads: int, act: str, projection: int) -> CLIPTextConfig:
    tokenizer = clip_tokenizer()
    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=tokenizer.model_max_length, hidden_act=act,
        projection_dim=projection, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def sd2_base_random_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """SD 2-base: 865M-parameter UNet (cross-attention at 1/1, 1/2, 1/4, 1/8 of the latent), OpenCLIP-H text (1024)."""
    pipe = StableDiffusionPipeline(
        vae=random_weights(AutoencoderKL, {**SD_VAE, "scaling_factor": 0.18215}, seed),
        text_encoder=random_weights(CLIPTextModel, _clip_text_config(1024, 23, 16, "gelu", 512), seed),
        tokenizer=clip_tokenizer(), unet=random_weights(UNet2DConditionModel, SD2_BASE_UNET, seed),
        scheduler=PNDMScheduler(skip_prk_steps=True, **SD_NOISE_SCHEDULE), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sdxl_base_random_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """SDXL-base: 2.6B-parameter UNet (cross-attention at 1/2 and 1/4 of the latent, 2 and 10
    transformer layers), CLIP-L + OpenCLIP-bigG text encoders (768 + 1280 = 2048)."""
    pipe = StableDiffusionXLPipeline(
        vae=random_weights(AutoencoderKL, {**SD_VAE, "scaling_factor": 0.13025}, seed),
        text_encoder=random_weights(CLIPTextModel, _clip_text_config(768, 12, 12, "quick_gelu", 768), seed),
        text_encoder_2=random_weights(CLIPTextModelWithProjection, _clip_text_config(1280, 32, 20, "gelu", 1280), seed),
        tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer(), unet=random_weights(UNet2DConditionModel, SDXL_BASE_UNET, seed),
        scheduler=EulerDiscreteScheduler(**SD_NOISE_SCHEDULE, timestep_spacing="leading"),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
