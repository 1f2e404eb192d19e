"""Train the toy urban world's text-to-image model and its annotator from scratch.

    python -m daamlab.toyworld.train                  # all stages, defaults below
    python -m daamlab.toyworld.train --stages unet    # one stage (earlier stages' outputs must exist)

Stages, in order: ``data`` (render the training and held-out scenes), ``vae`` (the autoencoder),
``annotator`` (the ground-truth segmenter, trained on renders and on their VAE reconstructions),
``textenc`` (optional: the CLIP text encoder pre-trained contrastively on (scene, caption) pairs with a
small image encoder, see :mod:`daamlab.toyworld.textenc`), ``unet`` (UNet and CLIP text encoder
together, or the UNet alone on the frozen ``textenc`` encoder with ``--frozen-text-encoder``, on
cached latents, with an EMA copy). ``--reuse-from DIR`` copies the VAE and the annotator of a
trained pipeline instead of training them. Every stage is
seeded and resumable: checkpoints are written atomically to the work directory, and a killed run
continues from its last checkpoint when started again with the same arguments. The pipeline is
exported with ``save_pretrained`` (fp16 safetensors) at every export interval and at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file
from torch.nn import functional as F
from tqdm.auto import tqdm
from transformers import CLIPTextModel

from daamlib.io import save_safetensors
from daamlab.io import honour_umask, save_pretrained, write_json
from daamlab import data_dir
from daamlib.models import default_device, toy_model_dir
from daamlab.toyworld.annotator import LABEL_IDS, Annotator, SegmentationNet, dataset_iou
from daamlab.toyworld.architecture import (
    ToyArchitecture,
    build_text_encoder,
    build_tokenizer,
    build_unet,
    build_vae,
    inference_scheduler,
    training_scheduler,
)
from daamlab.toyworld import labels as L
from daamlab.toyworld.dataset import HELD_OUT_FIRST_SEED, SceneSet, render_scene_set

STAGES = ("data", "vae", "annotator", "textenc", "unet")
# Seeds of a stage's steps: fixed per stage, so that adding a stage changes no other stage's randomness.
_STAGE_SEED_INDEX = {"data": 0, "vae": 1, "annotator": 2, "unet": 3, "textenc": 4}


@dataclass
class TrainConfig:
    output_dir: Path = field(default_factory=toy_model_dir)
    work_dir: Path = field(default_factory=lambda: data_dir() / "training" / "toy-urban")
    architecture: ToyArchitecture = field(default_factory=ToyArchitecture)
    seed: int = 0
    num_scenes: int = 8000
    num_held_out: int = 256
    vae_steps: int = 1600
    annotator_steps: int = 1000
    unet_steps: int = 2000
    batch_size: int = 32
    vae_batch_size: int = 16
    vae_learning_rate: float = 5e-4
    annotator_learning_rate: float = 2e-3
    unet_learning_rate: float = 5e-4
    textenc_steps: int = 0  # 0: no contrastive pre-training
    textenc_batch_size: int = 128
    textenc_learning_rate: float = 1e-3
    frozen_text_encoder: bool = False  # the unet stage trains the UNet alone on the textenc stage's encoder
    unet_init: Path | None = None  # a pipeline directory whose UNet weights start the unet stage
    spatial_caption_share: float = 0.0  # share of unet-stage captions that say what is where
    scene_variety: float = 0.0  # probability that a scene leaves out each background thing (render.BACKGROUND_THINGS)
    scene_attributes: bool = False  # background things take named colours and captions name colours (render_scene(attributes=True))
    caption_dropout: float = 0.1  # empty prompts, for classifier-free guidance
    ema_decay: float = 0.999
    min_snr_gamma: float = 5.0
    checkpoint_every: int = 100
    checkpoint_dir: Path | None = None  # where the stages' resumable checkpoints go (None: the work directory)
    export_every: int = 500
    device: str = field(default_factory=lambda: default_device().type)
    progress: bool = True

    @property
    def scenes_path(self) -> Path:
        return self.work_dir / "scenes.npz"

    @property
    def held_out_path(self) -> Path:
        return self.work_dir / "held_out.npz"

    @property
    def vae_dir(self) -> Path:
        return self.work_dir / "vae"

    @property
    def text_encoder_dir(self) -> Path:
        return self.work_dir / "textenc"


# -- helpers -------------------------------------------------------------------------------------
# What a checkpoint was trained on: a resumed stage must share it (step counts may grow, paths and devices may change).
RESUME_RECIPE = ("architecture", "seed", "num_scenes", "scene_variety", "scene_attributes", "spatial_caption_share", "frozen_text_encoder",
                 "unet_init", "caption_dropout")


def _recipe(config: "TrainConfig") -> dict:
    settings = asdict(config)
    return json.loads(json.dumps({name: settings[name] for name in RESUME_RECIPE}, default=str))


def _stored_recipe(checkpoint: dict) -> dict | None:
    """A checkpoint's recipe (None: written before recipes were kept); architecture fields added since it was
    written take their defaults, which are the architecture it was trained with."""
    stored = checkpoint.get("recipe")
    if stored is None or "architecture" not in stored:
        return stored
    defaults = json.loads(json.dumps(asdict(ToyArchitecture())))
    return stored | {"architecture": defaults | stored["architecture"]}


def _save_checkpoint(state: dict, path: Path) -> None:
    """Nested training state as safetensors (its tensors) + JSON (everything else), in one atomic file."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _split(state, "state", tensors)
    save_safetensors(tensors, path, {"skeleton": json.dumps(skeleton)})


def _load_checkpoint(path: Path) -> dict | None:
    if not path.exists():
        return None
    with safe_open(path, framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        skeleton = json.loads(handle.metadata()["skeleton"])
    return _join(skeleton, tensors)


def _split(value, prefix: str, tensors: dict):
    """Replace tensors by references and keep dict keys' types (optimizer states use int keys)."""
    if isinstance(value, torch.Tensor):
        tensors[prefix] = value.detach().to("cpu").clone().contiguous()
        return {"tensor": prefix}
    if isinstance(value, dict):
        return {"items": [[key, _split(item, f"{prefix}/{key}", tensors)] for key, item in value.items()]}
    if isinstance(value, (list, tuple)):
        return [_split(item, f"{prefix}/{index}", tensors) for index, item in enumerate(value)]
    return value


def _join(skeleton, tensors: dict):
    if isinstance(skeleton, dict):
        if "tensor" in skeleton:
            return tensors[skeleton["tensor"]]
        return {key: _join(item, tensors) for key, item in skeleton["items"]}
    if isinstance(skeleton, list):
        return [_join(item, tensors) for item in skeleton]
    return skeleton


def _step_generator(seed: int, stage: str, step: int) -> torch.Generator:
    """The randomness of one step depends only on (seed, stage, step): resuming replays it exactly."""
    state = np.random.SeedSequence([seed, _STAGE_SEED_INDEX[stage], step]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def _batch_images(scenes: SceneSet, indices: torch.Tensor, flips: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Images float [B, 3, S, S] in [-1, 1] and labels long [B, S, S], horizontally flipped where ``flips``."""
    images = torch.from_numpy(scenes.images[indices.numpy()]).permute(0, 3, 1, 2).float() / 127.5 - 1
    labels = torch.from_numpy(scenes.labels[indices.numpy()]).long()
    images = torch.where(flips[:, None, None, None], images.flip(-1), images)
    labels = torch.where(flips[:, None, None], labels.flip(-1), labels)
    return images, labels


def _warmup_cosine(step: int, total: int, warmup: int = 100, floor: float = 0.1) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


class _Stage:
    """A resumable training loop: ``step_fn(step, generator) -> loss`` over ``total`` steps."""

    def __init__(self, name: str, config: TrainConfig, modules: dict[str, torch.nn.Module], optimizer, total: int,
                 extra_state: dict | None = None) -> None:
        self.name, self.config, self.modules, self.optimizer, self.total = name, config, modules, optimizer, total
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _warmup_cosine(step, total))
        self.extra_state = extra_state or {}
        self.path = (config.checkpoint_dir or config.work_dir) / f"{name}.checkpoint.safetensors"
        self.losses: list[float] = []
        self.step = 0
        self.seconds = 0.0
        checkpoint = _load_checkpoint(self.path)
        stored = None if checkpoint is None else _stored_recipe(checkpoint)
        recipe = _recipe(config)
        if stored is not None and stored != recipe:
            changed = sorted(name for name in RESUME_RECIPE if stored.get(name) != recipe[name])
            theirs = {name: stored.get(name) for name in changed}
            raise ValueError(f"{self.path} is a checkpoint of a run with other {changed} ({theirs}); resume it with "
                             "that run's options, or give this run its own --checkpoint-dir (or --work-dir)")
        if checkpoint is not None:
            for key, module in modules.items():
                module.load_state_dict(checkpoint["modules"][key])
            optimizer.load_state_dict(checkpoint["optimizer"])
            self.scheduler.load_state_dict(checkpoint["scheduler"])
            for key, module in self.extra_state.items():
                module.load_state_dict(checkpoint["extra"][key])
            self.step, self.losses, self.seconds = checkpoint["step"], checkpoint["losses"], checkpoint["seconds"]

    def save(self) -> None:
        _save_checkpoint({
            "modules": {key: module.state_dict() for key, module in self.modules.items()},
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "extra": {key: module.state_dict() for key, module in self.extra_state.items()},
            "step": self.step, "losses": self.losses, "seconds": self.seconds, "recipe": _recipe(self.config),
        }, self.path)

    def run(self, step_fn, after_step=None, on_checkpoint=None) -> None:
        bar = tqdm(total=self.total, initial=self.step, desc=self.name, disable=not self.config.progress)
        started = time.perf_counter() - self.seconds
        while self.step < self.total:
            loss = step_fn(self.step, _step_generator(self.config.seed, self.name, self.step))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            if after_step is not None:
                after_step()
            self.losses.append(float(loss.detach()))
            self.step += 1
            self.seconds = time.perf_counter() - started
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(self.losses[-50:]):.4f}")
            if self.step % self.config.checkpoint_every == 0 or self.step == self.total:
                self.save()
                if on_checkpoint is not None:
                    on_checkpoint(self.step)
        bar.close()


# -- stages --------------------------------------------------------------------------------------
def _check_scene_recipe(config: TrainConfig) -> None:
    """Refuse a work directory whose scenes were rendered with another variety, attributes or size, so that one
    run's scenes are never trained on under another run's recipe (work directories from before ``scene_variety``
    have no recipe file; they hold scenes of variety 0; those from before ``scene_attributes`` hold none)."""
    recipe = {"scene_variety": config.scene_variety, "scene_attributes": config.scene_attributes,
              "image_size": config.architecture.image_size}
    path = config.work_dir / "scenes.json"
    if path.exists():
        stored = {"scene_attributes": False, **json.loads(path.read_text())}
    elif config.scenes_path.exists():
        stored = {"scene_variety": 0.0, "scene_attributes": False, "image_size": SceneSet.load(config.scenes_path).images.shape[1]}
    else:
        write_json(path, recipe)
        return
    if stored != recipe:
        raise ValueError(f"the scenes in {config.work_dir} were rendered with {stored}, this run asks for {recipe}; "
                         "pass the same --scene-variety/--scene-attributes/--image-size or a new --work-dir")


def train_data(config: TrainConfig) -> None:
    if not 0.0 <= config.scene_variety <= 1.0:
        raise ValueError(f"--scene-variety must lie in [0, 1] (a probability per background thing), got {config.scene_variety}")
    _check_scene_recipe(config)
    size = config.architecture.image_size
    if not config.scenes_path.exists():
        render_scene_set(config.num_scenes, size, first_seed=0, progress=config.progress,
                         variety=config.scene_variety, attributes=config.scene_attributes).save(config.scenes_path)
    if not config.held_out_path.exists():
        render_scene_set(config.num_held_out, size, HELD_OUT_FIRST_SEED, progress=config.progress,
                         variety=config.scene_variety, attributes=config.scene_attributes).save(config.held_out_path)


def train_vae(config: TrainConfig) -> AutoencoderKL:
    if (config.vae_dir / "config.json").exists():
        return AutoencoderKL.from_pretrained(config.vae_dir)
    torch.manual_seed(config.seed)
    scenes = SceneSet.load(config.scenes_path)
    vae = build_vae(config.architecture).to(config.device).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_learning_rate)
    stage = _Stage("vae", config, {"vae": vae}, optimizer, config.vae_steps)

    def step_fn(step: int, generator: torch.Generator) -> torch.Tensor:
        indices = torch.randint(len(scenes), (config.vae_batch_size,), generator=generator)
        images, _ = _batch_images(scenes, indices, torch.rand(config.vae_batch_size, generator=generator) < 0.5)
        images = images.to(config.device)
        posterior = vae.encode(images).latent_dist
        noise = torch.randn(posterior.mean.shape, generator=generator).to(config.device)
        reconstruction = vae.decode(posterior.mean + posterior.std * noise).sample
        kl = posterior.kl().mean() / images[0].numel()
        return F.l1_loss(reconstruction, images) + F.mse_loss(reconstruction, images) + 1e-4 * kl

    stage.run(step_fn)
    vae.eval()
    latents = _encode(vae, scenes.images[: 512], config.device)[0]
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    save_pretrained(vae.to("cpu"), config.vae_dir)
    write_json(config.work_dir / "vae_report.json", {"steps": stage.step, "seconds": stage.seconds,
                                                      "final_loss": float(np.mean(stage.losses[-50:])),
                                                      "scaling_factor": vae.config.scaling_factor})
    return vae


@torch.no_grad()
def _encode(vae: AutoencoderKL, images: np.ndarray, device: str, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior means and standard deviations [N, C, s, s] of uint8 images [N, S, S, 3]."""
    means, stds = [], []
    for start in range(0, len(images), batch_size):
        pixels = torch.from_numpy(images[start : start + batch_size]).permute(0, 3, 1, 2).float() / 127.5 - 1
        posterior = vae.encode(pixels.to(device, vae.dtype)).latent_dist
        means.append(posterior.mean.float().cpu())
        stds.append(posterior.std.float().cpu())
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def _reconstruct(vae: AutoencoderKL, images: np.ndarray, device: str, batch_size: int = 128) -> np.ndarray:
    """uint8 images [N, S, S, 3] as the VAE decodes their posterior means: the look of generated images."""
    decoded = []
    for start in tqdm(range(0, len(images), batch_size), desc="VAE reconstructions", leave=False):
        pixels = torch.from_numpy(images[start : start + batch_size]).permute(0, 3, 1, 2).float() / 127.5 - 1
        output = vae.decode(vae.encode(pixels.to(device)).latent_dist.mean).sample.clamp(-1, 1)
        decoded.append(((output + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(decoded)


def train_annotator(config: TrainConfig, vae: AutoencoderKL) -> dict:
    torch.manual_seed(config.seed)
    scenes, held_out = SceneSet.load(config.scenes_path), SceneSet.load(config.held_out_path)
    reconstructions_path = config.work_dir / "reconstructions.npy"
    if not reconstructions_path.exists():
        np.save(reconstructions_path, _reconstruct(vae.to(config.device).eval(), scenes.images, config.device))
    reconstructed = SceneSet(np.load(reconstructions_path), scenes.labels, scenes.classes, scenes.seeds, scenes.captions)
    net = SegmentationNet().to(config.device).train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.annotator_learning_rate)
    stage = _Stage("annotator", config, {"net": net}, optimizer, config.annotator_steps)
    channel_of_label = torch.zeros(256, dtype=torch.long)
    channel_of_label[list(LABEL_IDS)] = torch.arange(len(LABEL_IDS))

    def step_fn(step: int, generator: torch.Generator) -> torch.Tensor:
        batch = config.batch_size
        indices = torch.randint(len(scenes), (batch,), generator=generator)
        flips = torch.rand(batch, generator=generator) < 0.5
        images, labels = _batch_images(scenes, indices, flips)
        decoded, _ = _batch_images(reconstructed, indices, flips)
        use_reconstruction = torch.rand(batch, generator=generator) < 0.5  # half of each batch as the VAE decodes it
        images = torch.where(use_reconstruction[:, None, None, None], decoded, images)
        noise_level = 0.03 * torch.rand(batch, 1, 1, 1, generator=generator)
        images = images + noise_level * torch.randn(images.shape, generator=generator)
        return F.cross_entropy(net(images.to(config.device)), channel_of_label[labels].to(config.device))

    stage.run(step_fn)
    annotator = Annotator(net.to("cpu"), "cpu", image_size=config.architecture.image_size)
    predicted = annotator(held_out.images)
    scores = dataset_iou(predicted, held_out.labels)
    report = {"steps": stage.step, "seconds": stage.seconds, "final_loss": float(np.mean(stage.losses[-50:])),
              "held_out_scenes": len(held_out),
              "iou": scores, "miou": float(np.nanmean(list(scores.values())))}
    annotator.save_pretrained(config.work_dir / "annotator")
    if (config.output_dir / "model_index.json").exists():
        annotator.save_pretrained(config.output_dir / "annotator")
    write_json(config.work_dir / "annotator_report.json", report)
    return report


def reuse_components(config: TrainConfig, source: Path, stages=STAGES) -> None:
    """Copy a trained pipeline's VAE (as float32) and annotator, with their training reports, into the
    work directory, so that the vae and annotator stages are skipped; with ``frozen_text_encoder`` and no
    ``textenc`` stage to run, its contrastively pre-trained text encoder too (so the UNet can be trained
    further on the shipped encoder)."""
    reports = json.loads((Path(source) / "training.json").read_text())["reports"]
    if not (config.vae_dir / "config.json").exists():
        save_pretrained(AutoencoderKL.from_pretrained(Path(source) / "vae").float(), config.vae_dir)
        write_json(config.work_dir / "vae_report.json", {**reports["vae"], "reused_from": str(source)})
    if not (config.work_dir / "annotator").exists():
        shutil.copytree(Path(source) / "annotator", config.work_dir / "annotator")
        write_json(config.work_dir / "annotator_report.json", {**reports["annotator"], "reused_from": str(source)})
    reuse_text_encoder = config.frozen_text_encoder and not ("textenc" in stages and config.textenc_steps > 0)
    if reuse_text_encoder and not (config.text_encoder_dir / "config.json").exists() and "textenc" in reports:
        save_pretrained(CLIPTextModel.from_pretrained(Path(source) / "text_encoder").float(), config.text_encoder_dir)
        write_json(config.work_dir / "textenc_report.json", {**reports["textenc"], "reused_from": str(source)})


def _name_absent(config: TrainConfig) -> float:
    """How often a spatial caption names an absent background thing: only scenes that vary them lack any."""
    return 0.5 if config.scene_variety > 0 else 0.0


def _captions_of_batch(scenes: SceneSet, indices: torch.Tensor, flips: torch.Tensor, spatial_share: float,
                       generator: torch.Generator, name_absent: float = 0.0) -> list[str]:
    """One caption per scene: a spatial one (from its labels, flipped as the image is, naming each absent
    background thing with probability ``name_absent``) with probability ``spatial_share``, else one of its
    stored captions (which name no side, so they survive a flip)."""
    from daamlab.toyworld.captions import spatial_caption

    spatial = (torch.rand(len(indices), generator=generator) < spatial_share).tolist()
    choice = torch.randint(len(scenes.captions[0]), (len(indices),), generator=generator).tolist()
    rng_seed = int(torch.randint(2**31, (1,), generator=generator))
    rng = np.random.default_rng(rng_seed)
    captions = []
    for index, flip, use_spatial, k in zip(indices.tolist(), flips.tolist(), spatial, choice):
        if use_spatial:
            labels = scenes.labels[index][:, ::-1] if flip else scenes.labels[index]
            main_class = L.MAIN_CLASSES[int(scenes.classes[index])]
            captions.append(spatial_caption(labels, main_class, rng, name_absent=name_absent))
        else:
            captions.append(scenes.captions[index][k])
    return captions


def train_textenc(config: TrainConfig) -> dict:
    """Contrastive pre-training of the text encoder (see :mod:`daamlab.toyworld.textenc`); saves it to
    ``text_encoder_dir`` with a report holding the words' embedding cosines."""
    from daamlab.toyworld.diagnostics import embedding_cosines
    from daamlab.toyworld.textenc import ContrastiveHead, ImageEncoder, contrastive_losses

    torch.manual_seed(config.seed)
    arch = config.architecture
    scenes = SceneSet.load(config.scenes_path)
    tokenizer = build_tokenizer(arch)
    text_encoder = build_text_encoder(arch, tokenizer).to(config.device).train()
    image_encoder = ImageEncoder(arch.text_hidden_size).to(config.device).train()
    head = ContrastiveHead().to(config.device)
    modules = {"text_encoder": text_encoder, "image_encoder": image_encoder, "head": head}
    parameters = [p for module in modules.values() for p in module.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=config.textenc_learning_rate, weight_decay=0.01)
    stage = _Stage("textenc", config, modules, optimizer, config.textenc_steps)
    token_cache: dict[str, list[int]] = {}

    def step_fn(step: int, generator: torch.Generator) -> torch.Tensor:
        batch = config.textenc_batch_size
        indices = torch.randperm(len(scenes), generator=generator)[:batch]  # distinct scenes: no false negatives
        flips = torch.rand(batch, generator=generator) < 0.5
        images, _ = _batch_images(scenes, indices, flips)  # [B, 3, S, S]
        captions = _captions_of_batch(scenes, indices, flips, 0.5, generator, _name_absent(config))
        ids = _token_ids(tokenizer, captions, token_cache)  # [B, 77]
        # The encoder is causal: cutting the padding after the longest caption leaves every kept output as it was.
        length = int((ids == tokenizer.eos_token_id).int().argmax(dim=1).max()) + 1
        ids = ids[:, :length].to(config.device)  # [B, T]
        tokens = text_encoder(ids).last_hidden_state  # [B, T, d]
        patches = image_encoder(images.to(config.device))  # [B, P, d]
        losses = contrastive_losses(tokens, ids, patches, tokenizer.eos_token_id, head.scale())
        return losses["global"] + losses["tokenwise"]

    stage.run(step_fn)
    text_encoder.eval()
    cosines = embedding_cosines(text_encoder, tokenizer)
    save_pretrained(text_encoder.to("cpu"), config.text_encoder_dir)
    report = {"steps": stage.step, "seconds": stage.seconds, "final_loss": float(np.mean(stage.losses[-50:])),
              "batch_size": config.textenc_batch_size,
              "cosine": {name: value for name, value in cosines.items() if name != "matrix"}}
    write_json(config.work_dir / "textenc_report.json", report)
    return report


def _ema_with_warmup(decay: float):
    """EMA whose decay grows as min(decay, (1 + n) / (10 + n)): early averages forget the random init."""

    def average(averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor) -> torch.Tensor:
        rate = min(decay, (1 + float(num_averaged)) / (10 + float(num_averaged)))
        return rate * averaged + (1 - rate) * current

    return average


def _token_ids(tokenizer, captions: list[str], cache: dict[str, list[int]]) -> torch.Tensor:
    """Token ids [B, T] padded to the tokenizer's T positions; a caption longer than that is refused, not cut."""
    length = tokenizer.model_max_length
    for text in captions:
        if text not in cache:
            ids = tokenizer(text, padding="max_length", max_length=length).input_ids
            if len(ids) > length:
                raise ValueError(f"the caption {text!r} has {len(ids)} tokens, more than the text encoder's {length} "
                                 "positions; train with a larger --text-length (or none: the CLIP tokenizer's own)")
            cache[text] = ids
    return torch.tensor([cache[text] for text in captions])


def shorten_positions(text_encoder: CLIPTextModel, length: int) -> CLIPTextModel:
    """The encoder with its first ``length`` position embeddings alone. It is causal with absolute positions,
    so its outputs at those positions are the longer encoder's, for the same ids."""
    positions = text_encoder.config.max_position_embeddings
    if length == positions:
        return text_encoder
    if length > positions:
        raise ValueError(f"the text encoder has {positions} positions, fewer than the tokenizer's {length}; "
                         "pre-train an encoder of that length (--stages textenc) instead of reusing this one")
    config = text_encoder.config.to_dict() | {"max_position_embeddings": length}
    shortened = CLIPTextModel(type(text_encoder.config).from_dict(config))
    state = text_encoder.state_dict()
    for name, value in state.items():
        if name.endswith("position_embedding.weight"):  # [positions, d_text]
            state[name] = value[:length]
        elif name.endswith("position_ids"):  # [1, positions]
            state[name] = value[:, :length]
    shortened.load_state_dict(state)
    return shortened


def train_unet(config: TrainConfig, vae: AutoencoderKL) -> None:
    torch.manual_seed(config.seed)
    arch = config.architecture
    scenes = SceneSet.load(config.scenes_path)
    tokenizer = build_tokenizer(arch)
    latents_path = config.work_dir / "latents.safetensors"
    if not latents_path.exists():  # posteriors of every scene and of its mirror image
        vae = vae.to(config.device).eval()
        means, stds = _encode(vae, scenes.images, config.device)
        flipped_means, flipped_stds = _encode(vae, np.ascontiguousarray(scenes.images[:, :, ::-1]), config.device)
        save_safetensors({"means": torch.stack([means, flipped_means]).contiguous(),
                          "stds": torch.stack([stds, flipped_stds]).contiguous()}, latents_path)
    posteriors = load_file(latents_path)
    scaling = vae.config.scaling_factor
    unet = build_unet(arch)
    if config.unet_init is not None:  # overwritten by the checkpoint when resuming
        unet.load_state_dict(UNet2DConditionModel.from_pretrained(Path(config.unet_init) / "unet").float().state_dict())
    unet = unet.to(config.device).train()
    if config.frozen_text_encoder:
        text_encoder = CLIPTextModel.from_pretrained(config.text_encoder_dir).float()
        text_encoder = shorten_positions(text_encoder, tokenizer.model_max_length).to(config.device).eval()
        text_encoder.requires_grad_(False)
    else:
        text_encoder = build_text_encoder(arch, tokenizer).to(config.device).train()
    models = torch.nn.ModuleDict({"unet": unet, "text_encoder": text_encoder})
    ema = torch.optim.swa_utils.AveragedModel(models, avg_fn=_ema_with_warmup(config.ema_decay))
    trained = [p for p in models.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=config.unet_learning_rate, weight_decay=0.01)
    stage = _Stage("unet", config, {"models": models}, optimizer, config.unet_steps, {"ema": ema})
    noise_scheduler = training_scheduler()
    alphas = noise_scheduler.alphas_cumprod
    snr = alphas / (1 - alphas)
    token_cache: dict[str, list[int]] = {}

    def step_fn(step: int, generator: torch.Generator) -> torch.Tensor:
        batch = config.batch_size
        indices = torch.randint(len(scenes), (batch,), generator=generator)
        flips = (torch.rand(batch, generator=generator) < 0.5).long()
        mean, std = posteriors["means"][flips, indices], posteriors["stds"][flips, indices]
        latents = (mean + std * torch.randn(mean.shape, generator=generator)) * scaling
        dropped = torch.rand(batch, generator=generator) < config.caption_dropout
        if config.spatial_caption_share > 0:
            chosen = _captions_of_batch(scenes, indices, flips.bool(), config.spatial_caption_share, generator,
                                       _name_absent(config))
        else:  # the original draw, kept so that earlier runs resume identically
            choice = torch.randint(len(scenes.captions[0]), (batch,), generator=generator)
            chosen = [scenes.captions[i][c] for i, c in zip(indices.tolist(), choice.tolist())]
        captions = ["" if drop else text for text, drop in zip(chosen, dropped.tolist())]
        ids = _token_ids(tokenizer, captions, token_cache).to(config.device)
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(noise_scheduler.config.num_train_timesteps, (batch,), generator=generator)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        with torch.set_grad_enabled(not config.frozen_text_encoder):
            context = text_encoder(ids).last_hidden_state  # [B, T, d_text]
        prediction = unet(noisy.to(config.device), timesteps.to(config.device), context).sample
        weights = (torch.clamp(snr[timesteps], max=config.min_snr_gamma) / snr[timesteps]).to(config.device)
        per_sample = F.mse_loss(prediction, noise.to(config.device), reduction="none").mean(dim=(1, 2, 3))
        loss = (weights * per_sample).mean()
        return loss

    def after_step_checkpoint(step: int) -> None:
        if step % config.export_every == 0 or step == config.unet_steps:
            export_pipeline(config, ema.module, vae, tokenizer, stage)

    stage.run(step_fn, after_step=lambda: ema.update_parameters(models), on_checkpoint=after_step_checkpoint)


def export_pipeline(config: TrainConfig, models: torch.nn.ModuleDict, vae: AutoencoderKL, tokenizer, stage: _Stage,
                    weights: str = "ema") -> Path:
    """Write the pipeline (fp16 safetensors) and the annotator to ``output_dir``, replacing it atomically.

    ``weights`` says which UNet/text-encoder weights ``models`` holds ("ema" or "raw"); it is recorded."""
    import copy

    pipe = StableDiffusionPipeline(
        vae=copy.deepcopy(vae).to("cpu"), text_encoder=copy.deepcopy(models["text_encoder"]).to("cpu"), tokenizer=tokenizer,
        unet=copy.deepcopy(models["unet"]).to("cpu"), scheduler=inference_scheduler(), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    ).to(dtype=torch.float16)
    output = Path(config.output_dir)
    staging = output.with_name(output.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    save_pretrained(pipe, staging, safe_serialization=True)
    if (config.work_dir / "annotator").exists():
        shutil.copytree(config.work_dir / "annotator", staging / "annotator")
    honour_umask(staging)  # the annotator's files as copied
    reports = {name: json.loads((config.work_dir / f"{name}_report.json").read_text())
               for name in ("vae", "annotator") if (config.work_dir / f"{name}_report.json").exists()}
    for name in ("textenc",):
        if config.frozen_text_encoder and (config.work_dir / f"{name}_report.json").exists():
            reports[name] = json.loads((config.work_dir / f"{name}_report.json").read_text())
    reports["unet"] = {"steps": stage.step, "of_steps": stage.total, "seconds": stage.seconds,
                       "final_loss": float(np.mean(stage.losses[-100:])), "exported_weights": weights,
                       "frozen_text_encoder": config.frozen_text_encoder,
                       "init": None if config.unet_init is None else str(config.unet_init),
                       "spatial_caption_share": config.spatial_caption_share}
    write_json(staging / "training.json", {"config": asdict(config), "device": config.device,
                                             "torch": torch.__version__, "reports": reports})
    previous = output.with_name(output.name + ".previous")
    shutil.rmtree(previous, ignore_errors=True)
    if output.exists():
        output.replace(previous)
    staging.replace(output)
    shutil.rmtree(previous, ignore_errors=True)
    return output


def train(config: TrainConfig, stages=STAGES, reuse_from: Path | None = None) -> None:
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown stages {sorted(unknown)}; choose from {STAGES}")
    config.work_dir.mkdir(parents=True, exist_ok=True)
    if config.checkpoint_dir is not None:
        config.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    if "data" in stages:
        train_data(config)
    if reuse_from is not None:
        reuse_components(config, reuse_from, stages)
    vae = train_vae(config) if {"vae", "annotator", "unet"} & set(stages) else None
    if "annotator" in stages and not (reuse_from is not None and (config.work_dir / "annotator").exists()):
        train_annotator(config, vae)
    if "textenc" in stages and config.textenc_steps > 0:
        train_textenc(config)
    if "unet" in stages:
        train_unet(config, vae)


def main(argv=None) -> None:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--output-dir", type=Path, default=defaults.output_dir)
    parser.add_argument("--work-dir", type=Path, default=defaults.work_dir)
    parser.add_argument("--checkpoint-dir", type=Path, default=None,
                        help="write the resumable checkpoints here instead of the work directory (e.g. a folder kept in git, "
                             "so that a later session on a fresh machine resumes; everything else in the work dir is re-derived)")
    for name in ("seed", "num_scenes", "num_held_out", "vae_steps", "annotator_steps", "unet_steps", "batch_size", "vae_batch_size",
                 "checkpoint_every", "export_every", "textenc_steps", "textenc_batch_size"):
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name))
    parser.add_argument("--image-size", type=int, default=defaults.architecture.image_size)
    parser.add_argument("--text-layers", type=int, default=defaults.architecture.text_layers,
                        help="transformer layers of the text encoder (0: each token's embedding alone, so EOT and the "
                             "padding carry nothing of the caption and only the words' tokens can condition the UNet)")
    parser.add_argument("--text-length", type=int, default=None,
                        help="token positions of the tokenizer and text encoder (default: the CLIP tokenizer's own); "
                             "fewer positions leave fewer padding tokens after EOT")
    parser.add_argument("--device", default=defaults.device)
    parser.add_argument("--frozen-text-encoder", action="store_true", help="train the UNet alone on the textenc encoder")
    parser.add_argument("--unet-init", type=Path, default=None, help="start the UNet from this pipeline's UNet")
    parser.add_argument("--spatial-caption-share", type=float, default=defaults.spatial_caption_share)
    parser.add_argument("--ema-decay", type=float, default=defaults.ema_decay)
    parser.add_argument("--scene-variety", type=float, default=defaults.scene_variety,
                        help="probability that a training scene leaves out each background thing (0: every scene has them all)")
    parser.add_argument("--scene-attributes", action="store_true",
                        help="background things take named colours per scene and captions name the colours (\"a red car ... with an orange sky\")")
    parser.add_argument("--reuse-from", type=Path, default=None, help="copy the VAE and annotator (and, with --frozen-text-encoder, the text encoder) of this pipeline")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args(argv)
    if args.text_layers < 0:
        parser.error(f"--text-layers is a count of transformer layers (0 or more), not {args.text_layers}")
    if args.text_length is not None and args.text_length < 3:
        parser.error(f"--text-length counts token positions (SOT, at least one word, EOT: 3 or more), not {args.text_length}")
    if args.threads:
        torch.set_num_threads(args.threads)
    config = TrainConfig(
        output_dir=args.output_dir, work_dir=args.work_dir, checkpoint_dir=args.checkpoint_dir,
        architecture=ToyArchitecture(image_size=args.image_size, text_layers=args.text_layers,
                                      text_length=args.text_length),
        seed=args.seed, num_scenes=args.num_scenes, num_held_out=args.num_held_out, vae_steps=args.vae_steps,
        annotator_steps=args.annotator_steps, unet_steps=args.unet_steps, batch_size=args.batch_size,
        vae_batch_size=args.vae_batch_size,
        checkpoint_every=args.checkpoint_every, export_every=args.export_every, device=args.device,
        textenc_steps=args.textenc_steps, textenc_batch_size=args.textenc_batch_size,
        frozen_text_encoder=args.frozen_text_encoder, unet_init=args.unet_init,
        spatial_caption_share=args.spatial_caption_share, ema_decay=args.ema_decay, scene_variety=args.scene_variety,
        scene_attributes=args.scene_attributes,
    )
    train(config, args.stages, args.reuse_from)


if __name__ == "__main__":
    main()
