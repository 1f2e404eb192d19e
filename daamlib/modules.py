"""Reading a pipeline's modules without changing them.

* :func:`denoiser` / :func:`family`: the network that denoises (a UNet, or a DiT's transformer) and its family;
* :func:`conditioning`: text-encoder output -> what the cross-attention keys are projected from;
* :func:`execution_device`: where the pipeline computes (also under CPU offload);
* :func:`linear_parameters` / :func:`project`: a projection's weight and bias as plain detached
  tensors on a chosen device, also when ``enable_sequential_cpu_offload`` keeps them on the meta
  device between forwards (then they are read through the module's own forward);
* :func:`model_fingerprint` / :func:`check_same_model`: which model produced a record, so that
  a record is never silently combined with another model's weights.
"""

from __future__ import annotations

import hashlib
import json

import torch

_CONFIG_NOISE = ("_name_or_path", "_diffusers_version", "_use_default_values", "_commit_hash", "transformers_version",
                 "torch_dtype", "dtype", "vocab_size")  # vocab_size: textual-inversion tokens add rows, old ones stay
_PROBE_SIZE = 8  # values of each weight probe kept in the fingerprint
_PROBE_RTOL = 2e-2  # fp16 and fp32 copies of one model agree far better; other models differ by O(1)


def denoiser(pipe) -> torch.nn.Module:
    """``pipe.unet`` (Stable Diffusion 1.x/2.x/XL) or ``pipe.transformer`` (PixArt and other DiTs)."""
    for name in ("unet", "transformer"):
        module = getattr(pipe, name, None)
        if module is not None:
            return module
    raise ValueError(f"{type(pipe).__name__} has neither a unet nor a transformer; pass a diffusers text-to-image pipeline")


_FAMILIES = {"UNet2DConditionModel": "unet", "PixArtTransformer2DModel": "pixart", "SD3Transformer2DModel": "sd3",
             "FluxTransformer2DModel": "flux"}


def family(model: torch.nn.Module) -> str | None:
    """The denoiser family daamlib reads: "unet" (SD 1.x/2.x/XL), "pixart", "sd3", "flux"; None for others."""
    return _FAMILIES.get(type(model).__name__)


def conditioning(pipe, text_embeddings: torch.Tensor) -> torch.Tensor:
    """The text encoder's output [..., n, d_encoder] mapped into the space the cross-attention keys are
    projected from [..., n, d_text]: unchanged for UNets; through the transformer's ``caption_projection``
    for PixArt (T5's 4096 -> the model width), as its forward does before the first block."""
    projection = getattr(denoiser(pipe), "caption_projection", None)
    if projection is None:
        return text_embeddings
    with torch.no_grad():
        weight_dtype = next(projection.parameters()).dtype
        return projection(text_embeddings.to(weight_dtype)).float()


def execution_device(pipe) -> torch.device:
    """The device the pipeline's models run on (diffusers' own answer under CPU offload)."""
    device = getattr(pipe, "_execution_device", None)
    return torch.device(device) if device is not None else denoiser(pipe).device


def linear_parameters(module: torch.nn.Linear, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight [out, in], bias [out] or None)`` of a linear layer, detached, float32, on ``device``."""
    device = torch.device(device)
    if module.weight.device.type != "meta":
        bias = None if module.bias is None else module.bias.detach().to(device, torch.float32)
        return module.weight.detach().to(device, torch.float32), bias
    # offloaded: the module's forward onloads its weights; y(I) - y(0) = W^T, y(0) = b
    with torch.no_grad():
        probe = torch.cat([torch.zeros(1, module.in_features), torch.eye(module.in_features)])
        dtype = module.weight.dtype if module.weight.dtype.is_floating_point else torch.float32
        outputs = module(probe.to(execution_device_of(module), dtype)).to(device, torch.float32)
    bias = outputs[0] if module.bias is not None else None
    return (outputs[1:] - outputs[0]).T.contiguous(), bias


def project(module: torch.nn.Linear, inputs: torch.Tensor) -> torch.Tensor:
    """``inputs @ W^T + b`` in float32 on ``inputs``' device. Differentiable in ``inputs``, never in the weights."""
    weight, bias = linear_parameters(module, inputs.device)
    return torch.nn.functional.linear(inputs.float(), weight, bias)


def execution_device_of(module: torch.nn.Module) -> torch.device:
    hook = getattr(module, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    return torch.device(device) if device is not None else torch.device("cpu")


# -- model identity ------------------------------------------------------------------------------
def model_fingerprint(pipe) -> dict:
    """What identifies the weights a record was made with.

    ``config``: a hash of the denoiser's and text encoder's configurations (architecture);
    ``probe``: a few outputs of the first cross-attention key projection and of the token
    embedding on fixed inputs (the weights). fp16 and fp32 copies of one model match.
    """
    configs = [_config_dict(denoiser(pipe))]
    text_encoder = getattr(pipe, "text_encoder", None)
    if text_encoder is not None:
        configs.append(_config_dict(text_encoder))
    digest = hashlib.sha256(json.dumps(configs, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return {"config": digest, "probe": _weight_probe(pipe)}


def same_model(first: dict | None, second: dict | None) -> bool:
    """Whether two fingerprints name the same weights (``None`` matches nothing)."""
    if not first or not second or first["config"] != second["config"]:
        return False
    a, b = torch.tensor(first["probe"]), torch.tensor(second["probe"])
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=_PROBE_RTOL, atol=_PROBE_RTOL * b.abs().max()))


def check_same_model(fingerprint: dict | None, pipe, what: str = "this record") -> None:
    """Raise when ``pipe`` is not the model that made ``what``."""
    if fingerprint is None:
        raise ValueError(f"{what} carries no model fingerprint (it was written by an older daamlib), so it cannot be checked "
                         "against this pipeline; regenerate it with the model you want to use")
    if not same_model(fingerprint, model_fingerprint(pipe)):
        raise ValueError(f"{what} was made with another model than this pipeline "
                         f"({getattr(pipe, 'name_or_path', None) or type(pipe).__name__!r}); its queries and "
                         "embeddings only make sense with the weights that produced them: pass the pipeline that generated it")


def _config_dict(module) -> dict:
    config = getattr(module, "config", {})
    config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {key: value for key, value in config.items() if key not in _CONFIG_NOISE}


@torch.no_grad()
def _weight_probe(pipe) -> list[float]:
    device = execution_device(pipe)
    cross = next((m for m in denoiser(pipe).modules() if getattr(m, "is_cross_attention", False)), None)
    values = []
    if cross is not None:
        weight, _ = linear_parameters(cross.to_k, device)
        values.append(weight[:_PROBE_SIZE].sum(dim=1))  # [8]
    text_encoder = getattr(pipe, "text_encoder", None)
    if text_encoder is not None:
        embedding = text_encoder.get_input_embeddings()
        ids = torch.arange(_PROBE_SIZE, device=execution_device_of(embedding) if embedding.weight.is_meta else embedding.weight.device)
        values.append(embedding(ids).float().sum(dim=1).to(device))  # [8]
    return torch.cat(values).cpu().tolist() if values else []
