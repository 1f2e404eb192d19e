"""The tiny random-weight pipelines the tests use (built by daamlab.testing.unet)."""

from daamlab.testing.unet import TEXT_DIM, clip_tokenizer, tiny_random_pipeline, tiny_text_encoder

tiny_pipeline = tiny_random_pipeline

__all__ = ["TEXT_DIM", "clip_tokenizer", "tiny_pipeline", "tiny_text_encoder"]
