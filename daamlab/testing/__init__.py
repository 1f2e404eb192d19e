"""Random-weight pipelines built offline, for tests, examples and benchmarks (no model download):
``daamlab.testing.unet`` for Stable Diffusion (SD 1.x-shaped tiny, SD 2-base, SDXL-base) and
``daamlab.testing.dit`` for the transformers (PixArt-α, SD3, Flux)."""

from .unet import build_clip_tokenizer, sd2_base_random_pipeline, sdxl_base_random_pipeline, tiny_random_pipeline

__all__ = ["build_clip_tokenizer", "sd2_base_random_pipeline", "sdxl_base_random_pipeline", "tiny_random_pipeline"]
