"""What tracing costs on the published DiT transformers (random weights): one denoiser call, plain vs traced.

    python benchmarks/dit_overhead.py                 # CPU: PixArt-α 512 and SD3-medium at 256x256 px, fp32
    python benchmarks/dit_overhead.py --device cuda   # GPU: also Flux-dev, at 1024x1024 px, bf16

The text encoders are not needed: the transformer gets random conditioning of the published shapes
(PixArt: 120 T5 positions with the model's padding mask; SD3: 77 CLIP + 256 T5 positions and the pooled
vector; Flux: 512 T5 positions, the pooled vector, the guidance scale). Plain and traced calls are
interleaved round by round (``measure.interleaved``), so a drifting machine load falls on all of them alike;
the ratio is the median of the per-round ratios. Results go to ``benchmarks/results/dit-<device>.json``
and are summarised in docs/benchmarks.md by hand.
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path
from types import SimpleNamespace

import torch

import daamlib
from daamlab.io import write_json
from daamlab.testing.dit import PUBLISHED_TRANSFORMERS

from measure import interleaved, median_ratio  # benchmarks/ is on sys.path when this file runs as a script

HERE = Path(__file__).resolve().parent
LATENT_FACTOR = 8  # pixels per latent cell of these models' VAEs
T5_POSITIONS = {"PixArt-alpha/PixArt-XL-2-512x512": 120, "stabilityai/stable-diffusion-3-medium-diffusers": 256,
                "black-forest-labs/FLUX.1-dev": 512}
CLIP_POSITIONS = 77
OPTIONS = {"daam": {}, "daam + per_head": {"per_head": True}, "daam + linear": {"linear": True}}
JOINT_OPTIONS = {"daam + self_attention": {"self_attention": True}}  # PCC's features: SD3 and Flux only (PixArt has none)


def denoiser_inputs(name: str, transformer, size: int, device, dtype) -> dict:
    """Random inputs of the published shapes for one call with one image (no CFG)."""
    config, latent = transformer.config, size // LATENT_FACTOR
    generator = torch.Generator().manual_seed(0)
    random = lambda *shape: torch.randn(*shape, generator=generator).to(device, dtype)  # noqa: E731
    t5 = T5_POSITIONS[name]
    if "PixArt" in name:
        mask = torch.zeros(1, t5, device=device)
        mask[:, :20] = 1  # a 20-token prompt; the model masks the rest
        return {"hidden_states": random(1, config.in_channels, latent, latent), "encoder_hidden_states": random(1, t5, config.caption_channels),
                "encoder_attention_mask": mask, "timestep": torch.tensor([500], device=device),
                "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
    if "stable-diffusion-3" in name:
        return {"hidden_states": random(1, config.in_channels, latent, latent),
                "encoder_hidden_states": random(1, CLIP_POSITIONS + t5, config.joint_attention_dim),
                "pooled_projections": random(1, config.pooled_projection_dim), "timestep": torch.tensor([500.0], device=device)}
    tokens = (latent // 2) ** 2  # Flux packs 2x2 latent cells into one token
    rows, cols = torch.meshgrid(torch.arange(latent // 2), torch.arange(latent // 2), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(tokens, 3).to(device, dtype)
    return {"hidden_states": random(1, tokens, config.in_channels), "encoder_hidden_states": random(1, t5, config.joint_attention_dim),
            "pooled_projections": random(1, config.pooled_projection_dim), "timestep": torch.tensor([0.5], device=device, dtype=dtype),
            "img_ids": img_ids, "txt_ids": torch.zeros(t5, 3, device=device, dtype=dtype),
            "guidance": torch.tensor([3.5], device=device, dtype=dtype)}


def measure(name: str, size: int, device: str, dtype: torch.dtype, repeats: int) -> dict:
    cls, config = PUBLISHED_TRANSFORMERS[name]
    torch.manual_seed(0)
    transformer = cls(**config).to(device, dtype).eval()
    pipe = SimpleNamespace(transformer=transformer, scheduler=None)  # a direct call: no pipeline state is read
    inputs = denoiser_inputs(name, transformer, size, device, dtype)

    def plain():
        with torch.no_grad():
            transformer(**inputs)

    def traced(fields):
        def call():
            with torch.no_grad(), daamlib.trace(pipe, unet_calls=1, cfg=False, **fields):
                transformer(**inputs)
        return call

    options = {**OPTIONS, **(JOINT_OPTIONS if "PixArt" not in name else {})}
    times = interleaved({"plain": plain, **{option: traced(fields) for option, fields in options.items()}}, repeats)
    layers = daamlib.attention_layers(transformer)
    result = {"model": name, "size": size, "dtype": str(dtype), "traced layers": len(layers),
              "parameters (B)": round(sum(p.numel() for p in transformer.parameters()) / 1e9, 3),
              "plain seconds (median)": sorted(times["plain"])[len(times["plain"]) // 2]}
    for option in options:
        result[f"{option} / plain"] = round(median_ratio(times, option, "plain"), 3)
    del transformer
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    on_gpu = args.device.startswith("cuda")
    names = list(PUBLISHED_TRANSFORMERS) if on_gpu else [n for n in PUBLISHED_TRANSFORMERS if "FLUX" not in n]
    size, dtype = (1024, torch.bfloat16) if on_gpu else (256, torch.float32)  # Flux-dev in fp32 needs 48 GB: GPU only
    rows = []
    for name in names:
        rows.append(measure(name, size, args.device, dtype, args.repeats))
        print(rows[-1], flush=True)
    write_json(HERE / "results" / f"dit-{args.device.split(':')[0]}.json",
               {"machine": {"platform": platform.platform(), "threads": torch.get_num_threads(), "torch": torch.__version__},
                "rows": rows})


if __name__ == "__main__":
    main()
