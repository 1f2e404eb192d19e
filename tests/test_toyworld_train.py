"""The toy model's training script: every stage runs, checkpoints resume exactly, the export loads."""

import re
import shutil

import numpy as np
import pytest
import torch

from daamlib.models import load_pipeline
from daamlab.toyworld import labels as L
from daamlab.toyworld import train as T
from daamlab.toyworld.annotator import LABEL_IDS, Annotator, seeded_segmentation_net
from daamlab.toyworld.architecture import ToyArchitecture
from daamlab.toyworld.dataset import SceneSet, reduce_scene
from daamlab.toyworld.render import Scene

TINY = ToyArchitecture(image_size=32, vae_channels=(16, 16), unet_channels=(16, 32, 32), text_hidden_size=32)


def tiny_config(tmp_path, **overrides) -> T.TrainConfig:
    settings = dict(output_dir=tmp_path / "model", work_dir=tmp_path / "work", architecture=TINY, num_scenes=8,
                    num_held_out=4, vae_steps=2, annotator_steps=2, unet_steps=2, batch_size=2, checkpoint_every=1,
                    export_every=2, device="cpu", progress=False)
    settings.update(overrides)
    return T.TrainConfig(**settings)


def test_reduce_scene_averages_pixels_and_takes_the_majority_label():
    image = np.zeros((4, 4, 3), np.uint8)
    image[:2, :2] = [200, 100, 0]
    image[0, 0] = [0, 0, 0]
    labels = np.full((4, 4), L.ROAD, np.uint8)
    labels[:2, :2] = L.CAR
    labels[0, 0] = L.ROAD  # one of four pixels: the block stays car
    reduced_image, reduced_labels = reduce_scene(Scene(image, labels, "car"), 2)
    assert reduced_image[0, 0].tolist() == [150, 75, 0]
    assert reduced_labels.tolist() == [[L.CAR, L.ROAD], [L.ROAD, L.ROAD]]


def test_two_steps_of_every_stage_run_and_export_a_loadable_pipeline(tmp_path):
    config = tiny_config(tmp_path)
    T.train(config)
    for stage in ("vae", "annotator", "unet"):
        assert T._load_checkpoint(config.work_dir / f"{stage}.checkpoint.safetensors")["step"] == 2
    pipe = load_pipeline(config.output_dir, device="cpu", progress_bar=False)
    assert pipe.unet.config.sample_size == TINY.latent_size
    image = pipe("a car in an urban environment", num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (TINY.image_size, TINY.image_size, 3)
    labels = Annotator.from_pretrained(config.output_dir / "annotator")(np.uint8(image * 255))
    assert labels.shape == (1, TINY.image_size, TINY.image_size) and set(np.unique(labels)) <= set(L.NAMES)


@pytest.mark.parametrize("checkpoints_elsewhere", [False, True], ids=["in the work dir", "in --checkpoint-dir, work dir lost"])
def test_a_killed_stage_resumes_to_the_same_weights(tmp_path, monkeypatch, checkpoints_elsewhere):
    straight = tiny_config(tmp_path / "straight", vae_steps=4)
    T.train(straight, stages=("data", "vae"))
    expected = T._load_checkpoint(straight.work_dir / "vae.checkpoint.safetensors")["modules"]["vae"]

    checkpoint_dir = tmp_path / "kept" if checkpoints_elsewhere else None
    interrupted = tiny_config(tmp_path / "interrupted", vae_steps=4, checkpoint_dir=checkpoint_dir)
    save = T._Stage.save

    def save_then_die(stage):
        save(stage)
        if stage.step == 2:
            raise KeyboardInterrupt  # killed right after the checkpoint of step 2

    monkeypatch.setattr(T._Stage, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        T.train(interrupted, stages=("data", "vae"))
    monkeypatch.setattr(T._Stage, "save", save)
    if checkpoints_elsewhere:  # a fresh machine: only the checkpoint folder survived, the scenes are rendered again
        assert not (interrupted.work_dir / "vae.checkpoint.safetensors").exists()
        shutil.rmtree(interrupted.work_dir)
    T.train(interrupted, stages=("data", "vae"))
    resumed = T._load_checkpoint((checkpoint_dir or interrupted.work_dir) / "vae.checkpoint.safetensors")
    assert resumed["step"] == 4
    for name, tensor in expected.items():
        torch.testing.assert_close(resumed["modules"]["vae"][name], tensor, rtol=0, atol=0)


def test_a_varied_run_retrains_the_text_encoder_it_reuses_nothing_else_of(tmp_path):
    """--reuse-from with --frozen-text-encoder and a textenc stage: VAE and annotator are copied, the text
    encoder is trained anew on the varied scenes (not the source's), and the export records the variety."""
    import json

    from transformers import CLIPTextModel

    source = tiny_config(tmp_path / "source", textenc_steps=2, textenc_batch_size=4, frozen_text_encoder=True)
    T.train(source)
    varied = tiny_config(tmp_path / "varied", textenc_steps=2, textenc_batch_size=4, frozen_text_encoder=True, scene_variety=0.5, seed=1,
                         unet_init=source.output_dir)
    T.train(varied, stages=("data", "textenc", "unet"), reuse_from=source.output_dir)
    assert json.loads((varied.work_dir / "vae_report.json").read_text())["reused_from"] == str(source.output_dir)
    assert "reused_from" not in json.loads((varied.work_dir / "textenc_report.json").read_text())
    old = CLIPTextModel.from_pretrained(source.output_dir / "text_encoder").state_dict()
    new = CLIPTextModel.from_pretrained(varied.output_dir / "text_encoder").state_dict()
    assert any(not torch.equal(old[name].float(), new[name].float()) for name in old)
    assert json.loads((varied.output_dir / "training.json").read_text())["config"]["scene_variety"] == 0.5


def test_a_work_dir_refuses_scenes_of_another_variety(tmp_path):
    T.train(tiny_config(tmp_path, num_scenes=4, num_held_out=2), stages=("data",))
    with pytest.raises(ValueError, match="rendered with .*scene_variety.*new --work-dir"):
        T.train(tiny_config(tmp_path, num_scenes=4, num_held_out=2, scene_variety=0.3), stages=("data",))
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        T.train(tiny_config(tmp_path / "other", scene_variety=2.0), stages=("data",))
    assert not (tmp_path / "other" / "work" / "scenes.npz").exists()


def test_unknown_stage_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown stages"):
        T.train(tiny_config(tmp_path), stages=("vae", "decoder"))


def test_an_annotator_refuses_another_image_size_unless_told_to_resize(tmp_path):
    net = seeded_segmentation_net((8, 8, 8), len(LABEL_IDS), torch.Generator().manual_seed(0))
    Annotator(net, image_size=8).save_pretrained(tmp_path)
    images = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="trained on 8 x 8 scenes.*--image-size 16"):
        Annotator.from_pretrained(tmp_path)(images)
    resizing = Annotator.from_pretrained(tmp_path, resize=True)
    labels = resizing(images)
    averaged = images.astype(np.float64).reshape(2, 8, 2, 8, 2, 3).mean(axis=(2, 4))  # 2x2 blocks, as the renderer reduces
    small = Annotator(resizing.net)(averaged.astype(np.float32))  # float images in [0, 255] are read as uint8 ones are
    np.testing.assert_array_equal(labels, small.repeat(2, axis=1).repeat(2, axis=2))


def test_a_checkpoint_made_under_another_recipe_is_refused(tmp_path):
    kept = tmp_path / "kept"

    def stage(config, total):
        net = torch.nn.Linear(2, 2)
        return T._Stage("probe", config, {"net": net}, torch.optim.SGD(net.parameters(), lr=0.1), total)

    first = tiny_config(tmp_path / "first", checkpoint_dir=kept)
    written = stage(first, 4)
    written.step = 3
    written.save()
    resumed = stage(tiny_config(tmp_path / "elsewhere", checkpoint_dir=kept, unet_steps=8), 8)  # same recipe, more steps
    assert resumed.step == 3
    with pytest.raises(ValueError, match=r"other \['scene_variety'\].*its own --checkpoint-dir"):
        stage(tiny_config(tmp_path / "varied", checkpoint_dir=kept, scene_variety=0.3), 4)


def test_a_work_dir_refuses_scenes_rendered_without_attributes(tmp_path):
    T.train(tiny_config(tmp_path, num_scenes=4, num_held_out=2), stages=("data",))
    with pytest.raises(ValueError, match="rendered with .*'scene_attributes': False.*--scene-attributes"):
        T.train(tiny_config(tmp_path, num_scenes=4, num_held_out=2, scene_attributes=True), stages=("data",))
    T.train(tiny_config(tmp_path / "coloured", num_scenes=4, num_held_out=2, scene_attributes=True), stages=("data",))
    scenes = SceneSet.load(tiny_config(tmp_path / "coloured").scenes_path)
    assert any(re.search(r"\b(red|blue|yellow|white|black|green|grey) (car|person|rider|traffic light)\b", text)
               for texts in scenes.captions for text in texts), scenes.captions


def test_a_text_encoder_without_layers_gives_padding_that_carries_nothing_of_the_caption(tmp_path):
    """--text-layers 0: each output is its token's embedding (plus position), so EOT and the padding are the same for
    every caption and only the words' tokens differ; the exported pipeline loads and generates."""
    import dataclasses

    config = tiny_config(tmp_path, architecture=dataclasses.replace(TINY, text_layers=0), seed=2)
    T.train(config, stages=("data", "vae", "unet"))
    pipe = load_pipeline(config.output_dir, device="cpu", progress_bar=False)
    assert pipe.text_encoder.config.num_hidden_layers == 0
    ids = pipe.tokenizer(["a red car", "a blue tree"], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        outputs = pipe.text_encoder(ids).last_hidden_state  # [2, 77, d]
    assert torch.equal(outputs[0, 4:], outputs[1, 4:])  # EOT (position 4) and the padding after it
    assert not torch.allclose(outputs[0, 2], outputs[1, 2])  # "red" and "blue"
    image = pipe("a car", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert np.isfinite(image).all()
    with pytest.raises(SystemExit):
        T.main(["--text-layers", "-1", "--stages", "data", "--work-dir", str(tmp_path / "w")])


def test_a_shortened_text_encoder_gives_the_long_one_s_outputs_and_long_captions_are_refused(tmp_path):
    """--text-length: a reused causal encoder keeps its first positions, whose outputs stay what they were; a run
    exports a tokenizer and encoder of that length; a caption longer than it is refused, never cut."""
    import dataclasses

    from daamlab.toyworld.architecture import build_text_encoder, build_tokenizer

    torch.manual_seed(0)
    long_tokenizer = build_tokenizer(TINY)
    encoder = build_text_encoder(TINY, long_tokenizer).eval()
    short_arch = dataclasses.replace(TINY, text_length=16)
    short_tokenizer = build_tokenizer(short_arch)
    shortened = T.shorten_positions(encoder, short_tokenizer.model_max_length).eval()
    prompt = "a car on the left and a tree on the right"
    long_ids = long_tokenizer(prompt, padding="max_length", max_length=long_tokenizer.model_max_length, return_tensors="pt").input_ids
    short_ids = short_tokenizer(prompt, padding="max_length", max_length=16, return_tensors="pt").input_ids
    assert torch.equal(long_ids[:, :16], short_ids)
    with torch.no_grad():
        expected = encoder(long_ids).last_hidden_state[:, :16]  # [1, 16, d]
        actual = shortened(short_ids).last_hidden_state
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="more than the text encoder's 5 positions"):
        T._token_ids(build_tokenizer(dataclasses.replace(TINY, text_length=5)), [prompt], {})
    with pytest.raises(ValueError, match="pre-train an encoder of that length"):
        T.shorten_positions(shortened, long_tokenizer.model_max_length)

    config = tiny_config(tmp_path, architecture=short_arch, seed=3)
    T.train(config, stages=("data", "vae", "unet"))
    pipe = load_pipeline(config.output_dir, device="cpu", progress_bar=False)
    assert pipe.tokenizer.model_max_length == 16 and pipe.text_encoder.config.max_position_embeddings == 16
    image = pipe("a car", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert np.isfinite(image).all()


def test_a_checkpoint_written_before_an_architecture_field_existed_still_resumes(tmp_path):
    """A recipe stored without ``text_length`` (checkpoints of earlier runs) means the field's default: it matches
    a run with the default and not one that sets it."""
    import dataclasses

    config = tiny_config(tmp_path)
    old = T._recipe(config)
    del old["architecture"]["text_length"]
    assert T._stored_recipe({"recipe": old}) == T._recipe(config)
    shortened = tiny_config(tmp_path, architecture=dataclasses.replace(TINY, text_length=16))
    assert T._stored_recipe({"recipe": old}) != T._recipe(shortened)
    assert T._stored_recipe({}) is None
