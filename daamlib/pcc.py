"""Self-attention segmentation by principal components and clustering (PCC; seed 001).

1. Last-step per-head self-attention outputs of the up blocks (``trace(self_attention=True)``):
   PCA per head (head_dim → 3), upsampled to the latent grid, concatenated, standardised, plus
   normalised x/y.
2. K-Means for several cluster counts (fixed seed); clusters split into 4-connected components.
3. Classification with open-vocabulary maps of the class words, SOT standing for the background
   (its threshold raised by 20 %): at each threshold (0.3, 0.5, 0.8) every cluster takes the class
   whose binary map it overlaps best (IoU); per-pixel vote over all clusterings and thresholds,
   a winner with ≤ 50 % of the votes is uncertain.
4. Refinement at image resolution: K-Means(20) on RGB + x/y, split into components; a region takes
   its dominant class when that holds > 66 % of its pixels, else it is uncertain.

The report's list of cluster counts did not survive in our copy of the seed; ``cluster_counts``
defaults to (5, 10, 15) and is a parameter.

SD3 and Flux (no up blocks, no SOT): the features are the image tokens' last-step attention outputs of the later
half of the joint blocks (``trace(self_attention=True)``), and the maps are ConceptAttention's (``trace(concepts=)``):
each class word's concept map, and for the background the pixelwise maximum of the other concepts' maps (e.g.
"sky", "road", "building"), which then take SOT's place in step 3.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from skimage import measure
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from torch.nn import functional as F

from .labels import BACKGROUND, UNCERTAIN
from .layout import resize, unflatten_positions
from .methods import concept_attention, openvocab
from .metrics import iou, normalize
from .record import Record
from .text import TextEncoder


@dataclass(frozen=True)
class PCCConfig:
    components: int = 3
    cluster_counts: tuple[int, ...] = (5, 10, 15)
    thresholds: tuple[float, ...] = (0.3, 0.5, 0.8)
    background_raise: float = 0.2
    vote_share: float = 0.5
    refine_clusters: int = 20
    refine_dominance: float = 0.66
    seed: int = 0


def self_attention_features(record: Record, components: int = 3, seed: int = 0) -> np.ndarray:
    """Head-wise principal components on the latent grid, standardised, plus x/y.  [H, W, F]"""
    if not record.self_attention:
        raise KeyError("the record has no self-attention outputs; trace with self_attention=True")
    height, width = record.latent_size
    features = []
    for name, outputs in record.self_attention.items():  # [heads, hw, head_dim]
        resolution = record.layer(name).resolution
        for head in outputs.float().numpy():
            reduced = PCA(n_components=min(components, *head.shape), random_state=seed).fit_transform(head)  # [hw, c]
            features.append(resize(unflatten_positions(torch.from_numpy(reduced), resolution), (height, width)))
    stacked = torch.cat(features).permute(1, 2, 0).numpy()  # [H, W, F]
    stacked = (stacked - stacked.mean(axis=(0, 1))) / (stacked.std(axis=(0, 1)) + 1e-6)
    ys, xs = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")
    return np.concatenate([stacked, ys[..., None], xs[..., None]], axis=-1)


def split_components(segments: np.ndarray) -> np.ndarray:
    """Relabel so that every 4-connected piece of a cluster is its own segment."""
    return measure.label(segments + 1, connectivity=1, background=0)


def cluster(features: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """K-Means segments of a feature grid [H, W, F] → int labels [H, W], split into components."""
    height, width, _ = features.shape
    labels = KMeans(n_clusters=count, n_init=1, random_state=seed).fit_predict(features.reshape(height * width, -1))
    return split_components(labels.reshape(height, width))


def class_maps(record: Record, words: dict[int, str], pipe) -> tuple[dict[int, np.ndarray], np.ndarray]:
    """Normalised open-vocabulary maps of each class word, and of SOT (the background), on the latent grid.

    The words form one context phrase, so the maps share one softmax (SOT, the words, EOT). Records with
    ConceptAttention's concepts (SD3, Flux) use those maps instead, the concepts that are not class words standing
    for the background."""
    if record.meta.concepts:
        others = [concept for concept in record.meta.concepts if concept not in words.values()]
        if not others:
            raise ValueError(f"the record's concepts {record.meta.concepts} are all class words; trace concepts for the "
                             "background too (e.g. concepts=[..., 'sky', 'road', 'building']): they stand in for SOT")
        per_class = {label: normalize(concept_attention(record, word)).numpy() for label, word in words.items()}
        return per_class, normalize(torch.stack([concept_attention(record, c) for c in others]).amax(dim=0)).numpy()
    phrase = " ".join(words.values())
    maps = openvocab(record, phrase, pipe=pipe)  # the maps stored by re-run where the record has them
    tokens = TextEncoder(pipe).encode(phrase).tokens
    per_class = {label: normalize(maps[list(tokens.token_indices(word))].mean(dim=0)).numpy()
                 for label, word in words.items()}
    return per_class, normalize(maps[tokens.sot_index]).numpy()


def classify_segments(segmentations: list[np.ndarray], maps: dict[int, np.ndarray], background: np.ndarray,
                      config: PCCConfig = PCCConfig()) -> np.ndarray:
    """Vote over clusterings × thresholds: class label per pixel, UNCERTAIN where the winner has ≤ vote_share."""
    labels = [BACKGROUND, *maps]
    votes = np.zeros((len(labels), *background.shape), np.int32)
    for tau in config.thresholds:
        binary = [background >= min(tau * (1 + config.background_raise), 1.0)] + [maps[label] >= tau for label in maps]
        for segments in segmentations:
            for segment in range(1, segments.max() + 1):
                region = segments == segment
                scores = [iou(region, mask) for mask in binary]  # a region is never empty
                votes[int(np.argmax(scores)), region] += 1
    winner = votes.argmax(axis=0)
    share = votes.max(axis=0) / votes.sum(axis=0).clip(min=1)
    result = np.asarray(labels, np.uint8)[winner]
    result[share <= config.vote_share] = UNCERTAIN
    return result


def refine(latent_labels: np.ndarray, image: np.ndarray, config: PCCConfig = PCCConfig()) -> np.ndarray:
    """Image-resolution labels: RGB + x/y K-Means regions take their dominant class (> refine_dominance)."""
    height, width = image.shape[:2]
    coarse = F.interpolate(torch.from_numpy(latent_labels)[None, None].float(), size=(height, width), mode="nearest")
    coarse = coarse[0, 0].byte().numpy()
    ys, xs = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")
    features = np.concatenate([image.reshape(-1, 3) / 255.0, ys.reshape(-1, 1), xs.reshape(-1, 1)], axis=1)
    regions = KMeans(n_clusters=config.refine_clusters, n_init=1, random_state=config.seed).fit_predict(features)
    regions = split_components(regions.reshape(height, width))
    result = np.full((height, width), UNCERTAIN, np.uint8)
    for region in range(1, regions.max() + 1):
        inside = regions == region
        values, counts = np.unique(coarse[inside], return_counts=True)
        best = counts.argmax()
        if values[best] != UNCERTAIN and counts[best] / inside.sum() > config.refine_dominance:
            result[inside] = values[best]
    return result


def pcc_segment(record: Record, words: dict[int, str], pipe, config: PCCConfig = PCCConfig()) -> tuple[np.ndarray, np.ndarray]:
    """Latent-resolution and image-resolution label maps (class ids of ``words``, 0 background, 255 uncertain)."""
    features = self_attention_features(record, config.components, config.seed)
    segmentations = [cluster(features, count, config.seed) for count in config.cluster_counts]
    maps, background = class_maps(record, words, pipe)
    latent = classify_segments(segmentations, maps, background, config)
    if record.image is None:
        raise ValueError("refinement needs the generated image: create the record with daamlib.generate")
    return latent, refine(latent, record.image, config)
