"""Contrastive (CLIP-style) pre-training of the toy text encoder on (rendered scene, caption) pairs.

Stable Diffusion conditions on a frozen CLIP text encoder whose word embeddings already differ by
what the words look like. The toy's jointly trained encoder gives every word nearly the same
contextual embedding (cosine ≈ 0.98), so cross-attention keys are alike and DAAM maps are flat.
This module pre-trains the encoder against a small image encoder with two InfoNCE losses:

* global, as CLIP: the EOT token's embedding against the mean of the image's patch features;
* token-wise, as FILIP (Yao et al. 2021): a caption's similarity to an image is the mean over its
  word tokens of each token's best cosine with a patch, so every word must match some region.

No attention map or mask is supervised; the captions only say what is in the scene and where.
The text side has no projection: the encoder's own outputs (what the UNet's ``to_k`` sees) must differ.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class ImageEncoder(nn.Module):
    """Images [B, 3, S, S] in [-1, 1] -> patch features [B, (S/8)^2, dim]."""

    def __init__(self, dim: int, width: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, width // 2, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(width // 2, width, 3, stride=2, padding=1), nn.GroupNorm(8, width), nn.GELU(),
            nn.Conv2d(width, width, 3, padding=1), nn.GroupNorm(8, width), nn.GELU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1), nn.GroupNorm(8, width), nn.GELU(),
            nn.Conv2d(width, dim, 1),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.net(images)  # [B, dim, S/8, S/8]
        return features.flatten(2).transpose(1, 2)  # [B, P, dim]


class ContrastiveHead(nn.Module):
    """The learnable temperature of both InfoNCE losses (CLIP's init 1/0.07, capped at 100)."""

    def __init__(self) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def scale(self) -> torch.Tensor:
        return self.log_scale.clamp(max=math.log(100)).exp()


def word_token_mask(ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """True at the word tokens of ids [B, T]: after SOT and before the first EOT.  [B, T]"""
    positions = torch.arange(ids.shape[1], device=ids.device)[None]  # [1, T]
    first_eot = (ids == eos_token_id).int().argmax(dim=1, keepdim=True)  # [B, 1]
    return (positions >= 1) & (positions < first_eot)


def symmetric_infonce(logits: torch.Tensor) -> torch.Tensor:
    """Logits [B_text, B_image] with matching pairs on the diagonal."""
    targets = torch.arange(len(logits), device=logits.device)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))


def contrastive_losses(tokens: torch.Tensor, ids: torch.Tensor, patches: torch.Tensor, eos_token_id: int,
                       scale: torch.Tensor) -> dict[str, torch.Tensor]:
    """Global and token-wise InfoNCE of text tokens [B, T, d] (ids [B, T]) against patches [B, P, d]."""
    tokens, patches = F.normalize(tokens, dim=-1), F.normalize(patches, dim=-1)
    eot = tokens[torch.arange(len(ids)), (ids == eos_token_id).int().argmax(dim=1)]  # [B, d]
    pooled = F.normalize(patches.mean(dim=1), dim=-1)  # [B, d]
    global_logits = scale * eot @ pooled.T  # [B, B]
    mask = word_token_mask(ids, eos_token_id).float()  # [B, T]
    similarity = torch.einsum("itd,jpd->ijtp", tokens, patches)  # [B_text, B_image, T, P]
    best = similarity.max(dim=-1).values  # [B_text, B_image, T]
    tokenwise = (best * mask[:, None]).sum(-1) / mask.sum(-1).clamp(min=1)[:, None]  # [B_text, B_image]
    return {"global": symmetric_infonce(global_logits), "tokenwise": symmetric_infonce(scale * tokenwise)}
