"""attribute_image: records of real (not generated) images, checked against a hand-written loop."""

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

import daamlib
from daamlab.testing.unet import TEXT_DIM, clip_tokenizer, tiny_text_encoder
from naive import naive_daam, naive_linear, record_everything
from test_gpu_paths import OPTIONS, host_reads  # noqa: F401  (the fixture that watches the trace's hooks)

PROMPT = "a car and a tree in an urban environment"


def photo(height=32, width=48, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def plain_loop(pipe, image, prompt, timesteps, seed):
    """VAE encode -> x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps -> UNet, written out without daamlib."""
    device = pipe.unet.device
    with torch.no_grad():
        pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float().to(device) / 127.5 - 1
        latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed)).to(device)
        config = pipe.scheduler.config
        betas = torch.linspace(config.beta_start, config.beta_end, config.num_train_timesteps, dtype=torch.float64)
        assert config.beta_schedule == "linear"
        alphas = torch.cumprod(1 - betas, 0).float()
        ids = pipe.tokenizer(prompt, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(device)
        context = pipe.text_encoder(ids)[0]
        for t in timesteps:
            pipe.unet(alphas[t].sqrt() * latents + (1 - alphas[t]).sqrt() * noise, t, encoder_hidden_states=context)
    return context[0]


def test_the_record_equals_daam_and_linear_daam_of_a_hand_written_loop(pipe):
    image, steps = photo(), [200, 700]
    calls, context = record_everything(pipe, lambda: plain_loop(pipe, image, PROMPT, steps, seed=3))
    (record,) = daamlib.attribute_image(pipe, image, PROMPT, timesteps=steps, seed=3, linear=True)
    assert record.meta.timesteps == [200.0, 700.0] and record.num_steps == 2 and record.meta.seed == 3
    assert record.meta.prompt == PROMPT and record.tokens.text == PROMPT and record.image_size == (32, 48)
    assert torch.allclose(record.text_embeddings, context.cpu(), atol=1e-5)
    for word in ("car", "tree", "<eot>"):
        token = record.tokens.token_indices(word)[0]
        naive = naive_daam(calls, row=0, token=token, latent=(16, 24))
        assert torch.allclose(daamlib.daam(record, word), naive, rtol=1e-4, atol=1e-5), (daamlib.daam(record, word) - naive).abs().max()
    x = record.text_embeddings[record.tokens.token_indices("car")[0]]
    naive = naive_linear(calls, row=0, x=x, latent=(16, 24)).detach()
    assert torch.allclose(daamlib.linear(record, x), naive, rtol=1e-4, atol=1e-4 * float(naive.abs().max()))


def test_a_seed_gives_the_same_record_and_another_seed_another(pipe):
    first, again, other = (daamlib.attribute_image(pipe, photo(), PROMPT, timesteps=[600], seed=s)[0] for s in (1, 1, 2))
    assert torch.equal(daamlib.daam(first, "car"), daamlib.daam(again, "car"))
    assert not torch.allclose(daamlib.daam(first, "car"), daamlib.daam(other, "car"))


def test_more_timesteps_sum_like_the_steps_of_a_generation(pipe):
    kinds = dict(linear=True, per_step=True)
    (both,) = daamlib.attribute_image(pipe, photo(), PROMPT, timesteps=[100, 800], seed=0, **kinds)
    (early,), (late,) = (daamlib.attribute_image(pipe, photo(), PROMPT, timesteps=[t], seed=0, **kinds) for t in (100, 800))
    for layer, total in both.daam.items():
        assert torch.allclose(total, early.daam[layer] + late.daam[layer], atol=1e-5)
        assert torch.allclose(both.daam_steps[layer], torch.cat([early.daam_steps[layer], late.daam_steps[layer]]))
    assert torch.allclose(both.linear_matrix, early.linear_matrix + late.linear_matrix, rtol=1e-4, atol=1e-4)
    assert torch.allclose(daamlib.daam(both, "car", steps=[1]), daamlib.daam(late, "car"), atol=1e-5)


def test_open_vocabulary_and_linear_maps_work_on_a_real_image(pipe):
    (record,) = daamlib.attribute_image(pipe, photo(), PROMPT, timesteps=[300, 500], queries=True, linear=True,
                                        query_dtype=torch.float32)
    for heatmap in (daamlib.openvocab(record, "a bicycle on a sidewalk", "bicycle", pipe=pipe),
                    daamlib.linear(record, "bicycle", pipe=pipe)):
        assert heatmap.shape == (16, 24) and torch.isfinite(heatmap).all()
    # the prompt itself as context (padding included) reproduces DAAM
    same = daamlib.openvocab(record, PROMPT, "car", pipe=pipe, include_padding=True)
    assert torch.allclose(same, daamlib.daam(record, "car"), rtol=1e-4, atol=1e-4)


def test_guidance_batches_uncond_and_cond_without_changing_the_conditional_maps(pipe):
    (plain,) = daamlib.attribute_image(pipe, photo(), PROMPT, timesteps=[400])
    (guided,) = daamlib.attribute_image(pipe, photo(), PROMPT, timesteps=[400], guidance_scale=7.5)
    assert torch.allclose(daamlib.daam(plain, "car"), daamlib.daam(guided, "car"), atol=1e-5)
    (negative,) = daamlib.attribute_image(pipe, photo(), PROMPT, timesteps=[400], guidance_scale=7.5,
                                          negative_prompt="a blurry person", branch="uncond")
    assert negative.tokens.text == "a blurry person" and negative.meta.branch == "uncond"


def test_a_batch_of_images_gives_one_record_each_like_one_at_a_time(pipe):
    images = np.stack([photo(seed=0), photo(seed=1)])
    records = daamlib.attribute_image(pipe, images, [PROMPT, "a person"], timesteps=[300], seed=0)
    assert [r.meta.prompt for r in records] == [PROMPT, "a person"] and [r.meta.image_index for r in records] == [0, 1]
    (alone,) = daamlib.attribute_image(pipe, images[:1], PROMPT, timesteps=[300], seed=0)
    for layer in alone.daam:  # the first image's noise is the first slice of the batch's draw
        assert torch.allclose(records[0].daam[layer], alone.daam[layer], atol=1e-5)
    assert np.array_equal(records[1].image, images[1])


def test_the_image_is_unchanged_and_a_float_image_is_the_same_image(pipe):
    image = photo()
    original = image.copy()
    (record,) = daamlib.attribute_image(pipe, image, PROMPT, timesteps=[300])
    assert np.array_equal(image, original) and np.array_equal(record.image, image)
    assert not np.shares_memory(record.image, image)
    floats = image.astype(np.float64) / 255
    floats_before = floats.copy()
    (from_floats,) = daamlib.attribute_image(pipe, floats, PROMPT, timesteps=[300])
    assert np.array_equal(floats, floats_before) and np.array_equal(from_floats.image, image)
    assert torch.allclose(daamlib.daam(from_floats, "car"), daamlib.daam(record, "car"), atol=1e-5)


@pytest.mark.parametrize("image, prompt, kwargs, error", [
    (photo(33, 48), PROMPT, {}, "multiple of the VAE factor 2; resize or crop it, e.g. to 32x48"),
    (photo()[..., :2], PROMPT, {}, r"\[H, W, 3\] RGB"),
    (photo().astype(np.float32), PROMPT, {}, "divide 0-255 floats by 255"),
    (np.full((32, 48, 3), np.nan), PROMPT, {}, "floats in"),
    (photo(), "  ", {}, "non-empty prompt"),
    (photo(), [PROMPT, PROMPT], {}, r"one per image \(1\)"),
    (photo(), PROMPT, {"timesteps": [1000]}, r"training range 0..999"),
    (photo(), PROMPT, {"timesteps": []}, "non-empty list"),
    (photo(), PROMPT, {"timesteps": [True]}, "integers"),
    (photo(), PROMPT, {"seed": -1}, "non-negative integer"),
    (photo(), PROMPT, {"negative_prompt": "blurry"}, "needs it"),
    (photo(), PROMPT, {"cfg": True}, "not cfg"),
])
def test_bad_inputs_say_what_to_do(pipe, image, prompt, kwargs, error):
    with pytest.raises(ValueError, match=error):
        daamlib.attribute_image(pipe, image, prompt, **kwargs)


def test_one_timestep_may_be_a_number_and_direct_traces_need_cfg(pipe):
    (record,) = daamlib.attribute_image(pipe, photo(), PROMPT, timesteps=500)
    assert record.meta.timesteps == [500.0]
    with pytest.raises(ValueError, match="cfg=True or cfg=False"):
        with daamlib.trace(pipe, unet_calls=2):
            pass


def test_a_stale_pipeline_call_does_not_leak_into_a_direct_trace(pipe):
    """After a 3-step CFG generation the pipeline still says _num_timesteps=3 and guidance on."""
    pipe(prompt=PROMPT, num_inference_steps=3, guidance_scale=7.5, output_type="np")
    records = daamlib.attribute_image(pipe, photo(), PROMPT, timesteps=[300, 600])
    assert len(records) == 1 and records[0].num_steps == 2


@pytest.mark.parametrize("option", list(OPTIONS))
def test_attribution_never_reads_tensors_on_the_host(pipe, host_reads, option):  # noqa: F811
    records = daamlib.attribute_image(pipe, photo(), PROMPT, timesteps=[200, 600], **OPTIONS[option])
    assert host_reads.reads == [] and records[0].num_steps == 2


def test_sdxl_gets_its_added_conditioning():
    torch.manual_seed(0)
    tokenizer = clip_tokenizer()
    encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_DIM, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        projection_dim=TEXT_DIM, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    unet = UNet2DConditionModel(
        sample_size=16, layers_per_block=1, block_out_channels=(16, 32), norm_num_groups=8, attention_head_dim=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=2 * TEXT_DIM, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=TEXT_DIM + 6 * 8)
    vae = AutoencoderKL(block_out_channels=(16, 16), latent_channels=4, norm_num_groups=8,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=tiny_text_encoder(), text_encoder_2=encoder_2, tokenizer=tokenizer,
                                     tokenizer_2=tokenizer, unet=unet, scheduler=DDIMScheduler())
    records = daamlib.attribute_image(pipe, photo(), PROMPT, timesteps=[500], guidance_scale=5.0, linear=True)
    assert records[0].tokens.text == PROMPT and daamlib.daam(records[0], "car").shape == (16, 24)
    assert daamlib.linear(records[0], "tree", pipe=pipe).shape == (16, 24)
