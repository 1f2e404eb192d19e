"""``attribute_image``: records of a real image (not generated). The VAE encodes it (the latent mean), one
seeded noise draw noises it to each timestep (``add_noise`` of the training DDPM schedule, from the scheduler's
config; for the flow-matching SD3 and Flux, x_t = (1 - t/T) x_0 + (t/T) noise: sigma = t/T, whatever shift the
pipeline's step schedule applies), the denoiser (a UNet, PixArt's, SD3's or Flux's transformer, the latter on
2x2-packed latents) runs once per timestep under a trace; a record sums over them as over a generation's steps."""

from __future__ import annotations

from functools import partial

import numpy as np
import torch

from .capture import trace
from .generation import _negatives, name_records
from .modules import denoiser as denoiser_of, execution_device, family
from .record import Record


def attribute_image(pipe, image, prompt: str | list[str], *, timesteps: int | list[int] | tuple[int, ...] = (500,), seed: int = 0,
                    negative_prompt: str | list[str] | None = None, guidance_scale: float = 1.0, **trace_fields) -> list[Record]:
    """One record per image: ``image`` uint8 or float in [0, 1], [H, W, 3] or [N, H, W, 3] (or PIL, or a list),
    H and W multiples of the VAE factor; ``prompt`` one string or one per image. ``guidance_scale > 1`` batches
    [negative prompt, prompt] as CFG does (only ``branch="uncond"`` needs it: the conditional half's attention
    is the same); on Flux (guidance-distilled) it is the guidance embedding's value, as FluxPipeline feeds it.
    ``trace_fields``: what to record (:class:`daamlib.TraceOptions`). Records carry the image, prompt, seed and timesteps."""
    family = _family(pipe)
    images = _images(image, getattr(pipe, "vae_scale_factor", 8) * (2 if family == "flux" else 1))  # [N, H, W, 3]
    prompts = [prompt] * len(images) if isinstance(prompt, str) else list(prompt)
    if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts) or len(prompts) != len(images):
        raise ValueError(f"give one non-empty prompt, or one per image ({len(images)}), not {prompt!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer (it seeds the noise), not {seed!r}")
    steps = [timesteps] if isinstance(timesteps, (int, np.integer)) else list(timesteps)
    last = pipe.scheduler.config.num_train_timesteps - 1
    if not steps or any(isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= t <= last for t in steps):
        raise ValueError(f"timesteps must be a non-empty list of integers in the training range 0..{last} (0 = no noise), "
                         f"not {steps!r}")
    cfg = float(guidance_scale) > 1 and family != "flux"
    if family == "flux" and negative_prompt is not None:
        raise ValueError("Flux is guidance-distilled: attribute_image feeds guidance_scale to its guidance embedding and "
                         "runs no negative prompt; drop negative_prompt")
    if "cfg" in trace_fields or (negative_prompt is not None and not cfg):
        raise ValueError("attribute_image sets cfg itself: guidance_scale > 1 batches [negative prompt, prompt] (a "
                         "negative_prompt needs it); pass guidance_scale, not cfg")
    negatives = None if negative_prompt is None else _negatives(negative_prompt, len(prompts))
    vae, unet, device = pipe.vae, denoiser_of(pipe), execution_device(pipe)
    if unet.config.in_channels != vae.config.latent_channels * (4 if family == "flux" else 1):  # inpainting: + mask, image
        raise NotImplementedError(f"this UNet takes {unet.config.in_channels} channels, not the VAE's "
                                  f"{vae.config.latent_channels}; use a text-to-image UNet")
    from diffusers import DDPMScheduler  # here: import daamlib stays light
    with torch.no_grad():
        pixels = torch.from_numpy(images).permute(0, 3, 1, 2).to(device) * 2 - 1
        mean = vae.encode(pixels.to(vae.dtype)).latent_dist.mean
        latents = (mean - (getattr(vae.config, "shift_factor", None) or 0)) * vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(int(seed))).to(latents)
        fractions = [t / pipe.scheduler.config.num_train_timesteps for t in steps]
        if family in ("sd3", "flux"):  # rectified flow: t/T of the way from the image to the noise
            noisy = [((1 - f) * latents + f * noise).to(unet.dtype) for f in fractions]
        else:
            schedule = DDPMScheduler.from_config(pipe.scheduler.config)
            noisy = [schedule.add_noise(latents, noise, torch.full((len(images),), int(t), device=device)).to(unet.dtype)
                     for t in steps]
        with trace(pipe, unet_calls=len(steps), cfg=cfg, **trace_fields) as tr:
            inputs = _conditioning(pipe, family, prompts, negatives, cfg, device, tuple(images.shape[1:3]), guidance_scale)
            for t, fraction, sample in zip(steps, fractions, noisy):
                batch = torch.cat([sample] * 2) if cfg else sample
                if family == "flux":  # [N, C, h, w] -> [N, h/2 * w/2, 4C] tokens; the timestep is sigma, as FluxPipeline gives it
                    unet(hidden_states=pipe._pack_latents(batch, *batch.shape), timestep=torch.full((len(batch),), fraction,
                         device=device), **inputs)
                    continue
                timestep = torch.full((len(batch),), float(t) if family == "sd3" else int(t), device=device)
                unet(batch, timestep=timestep, **inputs)
    return name_records(tr.records, seed, prompts, np.round(images * 255).astype(np.uint8))


def _images(image, factor: int) -> np.ndarray:
    """A new float32 array [N, H, W, 3] in [0, 1] (the caller's array is not changed)."""
    array = np.stack([np.asarray(i) for i in image]) if isinstance(image, (list, tuple)) else np.asarray(image)
    array = array[None] if array.ndim == 3 else array
    if array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"an image is [H, W, 3] RGB (or [N, H, W, 3]), not shape {array.shape}; convert it with .convert('RGB')")
    (height, width), fit = array.shape[1:3], lambda n: n // factor * factor
    if height % factor or width % factor:
        raise ValueError(f"the image is {height}x{width}, not a multiple of the VAE factor {factor}; "
                         f"resize or crop it, e.g. to {fit(height)}x{fit(width)}")
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255
    if not np.issubdtype(array.dtype, np.floating) or not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
        raise ValueError(f"image values must be uint8 or floats in [0, 1], not {array.dtype} in "
                         f"[{array.min()}, {array.max()}]; divide 0-255 floats by 255")
    return array.astype(np.float32)


def _cfg_batch(cfg: bool, cond: torch.Tensor, uncond: torch.Tensor | None) -> torch.Tensor:
    return torch.cat([uncond, cond]) if cfg else cond


def _family(pipe) -> str:
    """Which denoiser inputs to build: "unet" (SD 1.x/2.x/XL), "pixart", "sd3" or "flux"."""
    if getattr(pipe, "vae", None) is None:
        raise NotImplementedError(f"attribute_image needs a pipeline with a VAE; {type(pipe).__name__} has none")
    model = denoiser_of(pipe)
    if family(model) not in ("unet", "pixart", "sd3", "flux"):
        raise NotImplementedError(f"attribute_image runs SD 1.x/2.x/XL UNets, PixArt, SD3 and Flux; not {type(model).__name__}")
    return family(model)


def _conditioning(pipe, family: str, prompts, negatives, cfg: bool, device, size, guidance_scale: float) -> dict:
    """The denoiser's inputs besides the sample and timestep: text conditioning [batch, n, d] ([uncond x N, cond x N]
    with CFG, as diffusers batches it), and what each family adds: PixArt the T5 padding mask, SD3 the pooled text,
    Flux the pooled text, text and image position ids and the guidance value (dev), SDXL the pooled text and the
    size/crop ids of an uncropped image of this size."""
    both = partial(_cfg_batch, cfg)
    model = denoiser_of(pipe)
    dtype = model.dtype
    if family == "flux":
        embeds, pooled, text_ids = pipe.encode_prompt(prompts, None, device=device, max_sequence_length=pipe.tokenizer_2.model_max_length)
        height, width = (side // pipe.vae_scale_factor // 2 for side in size)  # the packed token grid
        guidance = torch.full((len(prompts),), float(guidance_scale), device=device) if model.config.guidance_embeds else None
        return {"encoder_hidden_states": embeds.to(dtype), "pooled_projections": pooled.to(dtype), "txt_ids": text_ids,
                "img_ids": pipe._prepare_latent_image_ids(len(prompts), height, width, device, dtype), "guidance": guidance}
    if family == "pixart":
        cond, mask, uncond, uncond_mask = pipe.encode_prompt(prompts, cfg, negative_prompt=negatives or "", device=device)
        return {"encoder_hidden_states": both(cond, uncond).to(dtype), "encoder_attention_mask": both(mask, uncond_mask),
                "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
    if family == "sd3":
        cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(prompts, None, None, device=device,
                                                                 do_classifier_free_guidance=cfg, negative_prompt=negatives)
        return {"encoder_hidden_states": both(cond, uncond).to(dtype), "pooled_projections": both(pooled, uncond_pooled).to(dtype)}
    kind = getattr(pipe.unet.config, "addition_embed_type", None)  # SDXL: "text_time"
    if kind not in (None, "text_time") or "requires_aesthetics_score" in pipe.config:  # SDXL img2img: other time ids
        raise NotImplementedError(f"attribute_image builds the added conditioning of SDXL's text-to-image pipeline only "
                                  f"(text_embeds, time_ids); {type(pipe).__name__} with addition_embed_type={kind!r} needs other inputs")
    if kind is None:
        context = both(*pipe.encode_prompt(prompts, device, 1, cfg, negatives))
        return {"encoder_hidden_states": context.to(dtype), "added_cond_kwargs": None}
    cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(prompts, device=device, do_classifier_free_guidance=cfg,
                                                             negative_prompt=negatives)
    ids = pipe._get_add_time_ids(size, (0, 0), size, cond.dtype, pipe.text_encoder_2.config.projection_dim).to(device)
    added = {"text_embeds": both(pooled, uncond_pooled), "time_ids": ids.repeat(len(cond) * (1 + cfg), 1)}
    return {"encoder_hidden_states": both(cond, uncond).to(dtype), "added_cond_kwargs": added}
