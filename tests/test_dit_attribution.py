"""attribute_image on PixArt, SD3 and Flux: the records equal the attention of a hand-written noising + denoiser loop."""

import numpy as np
import pytest
import torch

import daamlib
from daamlab.testing.dit import tiny_random_flux_pipeline, tiny_random_pixart_pipeline, tiny_random_sd3_pipeline
from naive import naive_daam, naive_linear, record_everything

PROMPT = "a car and a tree on the road"
LATENT = (16, 24)  # a 32 x 48 photo through the factor-2 tiny VAE


def photo(seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (32, 48, 3), dtype=np.uint8)


def encoded(pipe, image) -> torch.Tensor:
    pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1
    config = pipe.vae.config
    return (pipe.vae.encode(pixels).latent_dist.mean - (config.shift_factor or 0)) * config.scaling_factor


@pytest.fixture(scope="module")
def pixart():
    return tiny_random_pixart_pipeline(seed=0, sharpen=6.0, max_length=16)


@pytest.fixture(scope="module")
def sd3():
    return tiny_random_sd3_pipeline(seed=0, sharpen=6.0, max_length=16)


def pixart_loop(pipe, image, timesteps, seed):
    """x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps with the training betas, T5 with its padding mask, the transformer."""
    with torch.no_grad():
        latents = encoded(pipe, image)
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed))
        config = pipe.scheduler.config
        assert config.beta_schedule == "linear"
        betas = torch.linspace(config.beta_start, config.beta_end, config.num_train_timesteps, dtype=torch.float64)
        alphas = torch.cumprod(1 - betas, 0).float()
        text = pipe.tokenizer(PROMPT, padding="max_length", max_length=120, truncation=True, return_tensors="pt")
        context = pipe.text_encoder(text.input_ids, attention_mask=text.attention_mask)[0]
        for t in timesteps:
            pipe.transformer(alphas[t].sqrt() * latents + (1 - alphas[t]).sqrt() * noise, encoder_hidden_states=context,
                             encoder_attention_mask=text.attention_mask, timestep=torch.tensor([t]),
                             added_cond_kwargs={"resolution": None, "aspect_ratio": None})


def sd3_loop(pipe, image, timesteps, seed):
    """x_t = (1 - t/1000) x_0 + (t/1000) eps (rectified flow), the pipeline's own prompt encoding, the transformer."""
    with torch.no_grad():
        latents = encoded(pipe, image)
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed))
        context, _, pooled, _ = pipe.encode_prompt(PROMPT, None, None, do_classifier_free_guidance=False)
        for t in timesteps:
            pipe.transformer(hidden_states=(1 - t / 1000) * latents + t / 1000 * noise, encoder_hidden_states=context,
                             pooled_projections=pooled, timestep=torch.tensor([float(t)]))


def test_pixart_record_equals_a_hand_written_loop(pixart):
    steps = [200, 700]
    calls, _ = record_everything(pixart, lambda: pixart_loop(pixart, photo(), steps, seed=3))
    (record,) = daamlib.attribute_image(pixart, photo(), PROMPT, timesteps=steps, seed=3, linear=True)
    assert record.num_steps == 2 and record.meta.timesteps == [200.0, 700.0]
    for word in ("car", "tree", "<eot>"):
        token = record.tokens.token_indices(word)[0]
        naive = naive_daam(calls, row=0, token=token, latent=LATENT)
        assert torch.allclose(daamlib.daam(record, word), naive, rtol=1e-4, atol=1e-5)
    x = record.text_embeddings[1]
    assert torch.allclose(daamlib.linear(record, x), naive_linear(calls, row=0, x=x, latent=LATENT).detach(), rtol=1e-4, atol=1e-4)


def test_sd3_record_equals_a_hand_written_loop(sd3):
    steps = [300, 800]
    calls, _ = record_everything(sd3, lambda: sd3_loop(sd3, photo(), steps, seed=5))
    (record,) = daamlib.attribute_image(sd3, photo(), PROMPT, timesteps=steps, seed=5)
    for word in ("car", "tree"):
        token = record.tokens.token_indices(word)[0]
        naive = naive_daam(calls, row=0, token=token, latent=LATENT)
        assert torch.allclose(daamlib.daam(record, word), naive, rtol=1e-4, atol=1e-5)
    # guidance batches [negative, prompt]; the prompt's half is unchanged
    (guided,) = daamlib.attribute_image(sd3, photo(), PROMPT, timesteps=steps, seed=5, guidance_scale=5.0)
    assert torch.allclose(daamlib.daam(guided, "car"), daamlib.daam(record, "car"), rtol=1e-4, atol=1e-5)


def test_pixart_guidance_and_the_noise_seed(pixart):
    (plain,) = daamlib.attribute_image(pixart, photo(), PROMPT, timesteps=[400], seed=1)
    (guided,) = daamlib.attribute_image(pixart, photo(), PROMPT, timesteps=[400], seed=1, guidance_scale=4.5)
    (other,) = daamlib.attribute_image(pixart, photo(), PROMPT, timesteps=[400], seed=2)
    assert torch.allclose(daamlib.daam(plain, "car"), daamlib.daam(guided, "car"), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(daamlib.daam(plain, "car"), daamlib.daam(other, "car"))


def flux_loop(pipe, image, timesteps, seed, guidance):
    """x_t = (1 - t/1000) x_0 + (t/1000) eps on the VAE latent, packed by hand into 2x2 patches [1, h/2 * w/2, 4C]
    (channel-major within a patch), image ids (0, row, col), text ids 0, the timestep as sigma, the guidance value."""
    with torch.no_grad():
        latents = encoded(pipe, image)  # [1, C, h, w]
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed))
        context, pooled, _ = pipe.encode_prompt(PROMPT, None, max_sequence_length=16)
        _, channels, h, w = latents.shape
        rows, cols = torch.meshgrid(torch.arange(h // 2), torch.arange(w // 2), indexing="ij")
        image_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float()
        for t in timesteps:
            noisy = (1 - t / 1000) * latents + t / 1000 * noise
            packed = noisy.reshape(1, channels, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(1, -1, 4 * channels)
            pipe.transformer(hidden_states=packed, timestep=torch.tensor([t / 1000]), guidance=torch.tensor([guidance]),
                             pooled_projections=pooled, encoder_hidden_states=context, txt_ids=torch.zeros(context.shape[1], 3),
                             img_ids=image_ids)


def test_flux_record_equals_a_hand_written_loop():
    flux = tiny_random_flux_pipeline(seed=0, sharpen=6.0, max_length=16)
    steps = [250, 750]
    calls, _ = record_everything(flux, lambda: flux_loop(flux, photo(), steps, seed=4, guidance=3.5), text_length=16)
    (record,) = daamlib.attribute_image(flux, photo(), PROMPT, timesteps=steps, seed=4, guidance_scale=3.5)
    assert record.meta.timesteps == [250.0, 750.0] and record.tokens.streams == (("t5", 0),)
    for word in ("car", "tree"):
        token = record.tokens.token_indices(word)[0]
        naive = naive_daam(calls, row=0, token=token, latent=record.latent_size)
        assert torch.allclose(daamlib.daam(record, word), naive, rtol=1e-4, atol=1e-5), (naive - daamlib.daam(record, word)).abs().max()
        assert naive.std() > 1e-2 * naive.mean()
    (other,) = daamlib.attribute_image(flux, photo(), PROMPT, timesteps=steps, seed=4, guidance_scale=1.0)
    assert not torch.allclose(daamlib.daam(other, "car"), daamlib.daam(record, "car"))  # the guidance value is fed
    with pytest.raises(ValueError, match="guidance-distilled.*drop negative_prompt"):
        daamlib.attribute_image(flux, photo(), PROMPT, negative_prompt="a dog")
    with pytest.raises(ValueError, match="multiple of the VAE factor 4"):
        daamlib.attribute_image(flux, photo()[:, :42], PROMPT)
