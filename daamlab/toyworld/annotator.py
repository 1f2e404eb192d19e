"""The toy world's ground-truth annotator: a small segmentation network trained on rendered scenes.

It stands in for the thesis' SAM + manual annotation: it labels *generated* images with the
toy world's Cityscapes train ids. It is saved beside the toy model (``<model>/annotator``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F

from daamlib.io import save_safetensors
from daamlib.metrics import pooled_iou
from daamlab.io import write_json
from daamlab.toyworld import labels as L

LABEL_IDS = tuple(sorted(L.NAMES))  # network output channel c predicts train id LABEL_IDS[c]
WEIGHTS_NAME = "annotator.safetensors"
CONFIG_NAME = "config.json"


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.GroupNorm(8, out_channels), nn.SiLU(),
        nn.Conv2d(out_channels, out_channels, 3, padding=1), nn.GroupNorm(8, out_channels), nn.SiLU(),
    )


class SegmentationNet(nn.Module):
    """A small U-Net: images [B, 3, S, S] in [-1, 1] → logits [B, len(LABEL_IDS), S, S]."""

    def __init__(self, channels: tuple[int, ...] = (32, 64, 96), num_labels: int = len(LABEL_IDS)) -> None:
        super().__init__()
        self.channels = tuple(channels)
        self.down = nn.ModuleList()
        previous = 3
        for width in channels:
            self.down.append(_conv_block(previous, width))
            previous = width
        self.up = nn.ModuleList(_conv_block(channels[i + 1] + channels[i], channels[i]) for i in reversed(range(len(channels) - 1)))
        self.head = nn.Conv2d(channels[0], num_labels, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        skips = []
        features = images
        for level, block in enumerate(self.down):
            if level > 0:
                features = F.max_pool2d(features, 2)
            features = block(features)
            skips.append(features)
        for block, skip in zip(self.up, reversed(skips[:-1])):
            features = F.interpolate(features, size=skip.shape[-2:], mode="nearest")
            features = block(torch.cat([features, skip], dim=1))
        return self.head(features)


@torch.no_grad()
def initialize(net: nn.Module, generator: torch.Generator) -> nn.Module:
    """Re-draw every convolution's weights and bias as PyTorch's default init does, from ``generator``
    (norm layers start at weight 1, bias 0, as by default)."""
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=generator)
            if module.bias is not None:
                fan_in = module.weight[0].numel()
                bound = 1 / math.sqrt(fan_in)
                module.bias.uniform_(-bound, bound, generator=generator)
        elif isinstance(module, nn.GroupNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    return net


def seeded_segmentation_net(channels: tuple[int, ...], num_labels: int, generator: torch.Generator) -> SegmentationNet:
    """A ``SegmentationNet`` whose initial weights come from ``generator`` only (built on the meta device,
    so torch's global RNG is neither used nor changed)."""
    with torch.device("meta"):
        net = SegmentationNet(channels, num_labels)
    return initialize(net.to_empty(device="cpu"), generator)


def images_to_tensor(images) -> torch.Tensor:
    """PIL images, or uint8 arrays [H, W, 3] / [N, H, W, 3] → float [N, 3, H, W] in [-1, 1]."""
    if isinstance(images, np.ndarray) and images.ndim == 3:
        images = images[None]
    array = np.stack([np.asarray(image.convert("RGB") if hasattr(image, "convert") else image) for image in images])
    if array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"expected RGB images [N, H, W, 3], got an array of shape {array.shape}")
    return torch.from_numpy(array).permute(0, 3, 1, 2).float() / 127.5 - 1


class Annotator:
    """Labels images with the toy world's train ids (``labels.NAMES``).

    ``image_size`` is the side of the scenes it was trained on (None: not recorded, as in annotators saved before
    it was). Images of another size are refused, since the objects' scale in pixels is what the network learned,
    unless ``resize=True``: then they are area-averaged to that size (as the renderer reduces its supersampled
    scenes) and the labels are scaled back with nearest neighbours."""

    def __init__(self, net: SegmentationNet, device: str | torch.device = "cpu", image_size: int | None = None,
                 resize: bool = False) -> None:
        self.net = net.to(device).eval()
        self.device = torch.device(device)
        self.image_size, self.resize = image_size, resize

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu", resize: bool = False) -> "Annotator":
        directory = Path(directory)
        if not (directory / WEIGHTS_NAME).exists():
            raise FileNotFoundError(f"no annotator in {directory}; train it with "
                                    "`python -m daamlab.toyworld.train --stages annotator`")
        config = json.loads((directory / CONFIG_NAME).read_text())
        net = SegmentationNet(tuple(config["channels"]), len(config["label_ids"]))
        net.load_state_dict(load_file(directory / WEIGHTS_NAME))
        return cls(net, device, config.get("image_size"), resize)

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {name: tensor.detach().to("cpu", torch.float16).contiguous() for name, tensor in self.net.state_dict().items()}
        save_safetensors(state, directory / WEIGHTS_NAME)
        config = {"channels": list(self.net.channels), "label_ids": list(LABEL_IDS)}
        write_json(directory / CONFIG_NAME, config if self.image_size is None else {**config, "image_size": self.image_size})

    @torch.no_grad()
    def __call__(self, images, batch_size: int = 64) -> np.ndarray:
        """Train-id label maps uint8 [N, H, W] for ``images`` (see ``images_to_tensor``)."""
        pixels = images_to_tensor(images)  # [N, 3, H, W]
        size = tuple(pixels.shape[-2:])
        trained = None if self.image_size is None else (self.image_size, self.image_size)
        if trained is not None and size != trained and not self.resize:
            raise ValueError(f"this annotator was trained on {self.image_size} x {self.image_size} scenes and the images are "
                             f"{size[0]} x {size[1]}; train one at their size (train --stages annotator --image-size "
                             f"{size[0]}), or pass resize=True to label them at {self.image_size} px and scale the labels back")
        lookup = torch.tensor(LABEL_IDS, dtype=torch.uint8)
        labels = []
        for batch in pixels.split(batch_size):
            if trained is not None and size != trained:
                batch = F.interpolate(batch, size=trained, mode="area")
            logits = self.net(batch.to(self.device, next(self.net.parameters()).dtype))
            channels = logits.argmax(dim=1, keepdim=True).float()  # [n, 1, h, w]
            labels.append(lookup[F.interpolate(channels, size=size, mode="nearest")[:, 0].long().cpu()])
        return torch.cat(labels).numpy()


def annotate(images, model_dir: str | Path | None = None, device: str | torch.device = "cpu") -> np.ndarray:
    """Label generated toy-world images: train ids uint8 [N, H, W]. ``model_dir`` defaults to the toy model's."""
    from daamlib.models import toy_model_dir

    directory = Path(model_dir) if model_dir is not None else toy_model_dir()
    return Annotator.from_pretrained(directory / "annotator", device)(images)


def dataset_iou(predicted: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """IoU of the thesis' four classes over a whole set of label maps (pixels pooled), keyed by class name."""
    return pooled_iou(predicted, target, {name: L.IDS[name] for name in L.MAIN_CLASSES})


def find_annotator(model: str | Path | None) -> Path | None:
    """The annotator shipped beside a toy-world model (``None`` = the embedded one), or ``None``."""
    from daamlib.models import toy_model_dir

    directory = toy_model_dir() if model is None else Path(model)
    candidate = directory / "annotator"
    return candidate if (candidate / WEIGHTS_NAME).exists() else None
