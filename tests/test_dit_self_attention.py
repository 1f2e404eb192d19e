"""PCC's features on SD3 and Flux: ``trace(self_attention=True)`` records, for the later half of the joint blocks, the
image tokens' attention outputs of the last step, which must equal what the model itself computes there: the input of
the block's output projection (SD3, Flux's double-stream blocks) or the attention's own output (Flux's single-stream
blocks, which have no output projection), split into heads."""

import numpy as np
import pytest
import torch

import daamlib
from daamlab.testing.dit import tiny_random_flux_pipeline, tiny_random_sd3_pipeline
from daamlib.pcc import PCCConfig

PROMPT = "a car and a tree on the road"
HEIGHT, WIDTH = 32, 48
T5_LENGTH = 16
STEPS = 3


def run(pipe):
    return pipe(prompt=PROMPT, generator=torch.Generator().manual_seed(0), num_inference_steps=STEPS, height=HEIGHT,
                width=WIDTH, guidance_scale=1.0, output_type="np", max_sequence_length=T5_LENGTH).images


def model_outputs(pipe, names) -> dict[str, torch.Tensor]:
    """The last call's image-token attention output of each named attention [1, hw, heads*d], from the model's own run."""
    model, seen, handles = pipe.transformer, {}, []
    for name in names:
        attn = model.get_submodule(name)
        if getattr(attn, "to_out", None) is not None:
            hook = lambda module, args, name=name: seen.__setitem__(name, args[0].detach().clone())  # noqa: E731
            handles.append(attn.to_out[0].register_forward_pre_hook(hook))
        else:  # Flux's single-stream attention returns [text, image] before the block's proj_out
            hook = lambda module, args, output, name=name: seen.__setitem__(name, output[:, T5_LENGTH:].detach().clone())  # noqa: E731
            handles.append(attn.register_forward_hook(hook))
    try:
        run(pipe)
    finally:
        for handle in handles:
            handle.remove()
    return seen


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_recorded_outputs_equal_the_models_own(family):
    pipe = (tiny_random_sd3_pipeline(seed=2, sharpen=4.0, max_length=T5_LENGTH) if family == "sd3"
            else tiny_random_flux_pipeline(seed=2, sharpen=4.0, max_length=T5_LENGTH))
    with daamlib.trace(pipe, self_attention=True) as tr:
        run(pipe)
    (record,) = tr.records
    joint = [layer.name for layer in record.cross_layers]
    assert list(record.self_attention) == joint[len(joint) // 2:]  # the later half: SD3 block 1, Flux's single block
    own = model_outputs(pipe, list(record.self_attention))
    for name, recorded in record.self_attention.items():  # [heads, hw, d]
        heads, positions, head_dim = recorded.shape
        assert positions == record.layer(name).resolution[0] * record.layer(name).resolution[1]
        expected = own[name][0].reshape(positions, heads, head_dim).transpose(0, 1)
        assert torch.allclose(recorded, expected, rtol=1e-4, atol=1e-5 * expected.abs().max()), (name, (recorded - expected).abs().max())


def test_self_attention_is_refused_where_there_is_none():
    from daamlab.testing.dit import tiny_random_pixart_pipeline

    pixart = tiny_random_pixart_pipeline(seed=0, max_length=T5_LENGTH)
    with pytest.raises(ValueError, match="up blocks' self-attention of a UNet, or the image tokens"):
        with daamlib.trace(pixart, self_attention=True):
            pass


def test_pcc_on_joint_attention_classifies_with_concept_maps_and_the_background_concepts_maximum():
    """The maps PCC votes with on SD3/Flux: each class word's ConceptAttention map, min-max scaled, and for the background
    the scaled pixelwise maximum of the other concepts' maps; a record whose concepts are all class words is refused."""
    from daamlib.metrics import normalize
    from daamlib.pcc import class_maps, pcc_segment

    sd3 = tiny_random_sd3_pipeline(seed=2, sharpen=4.0, max_length=T5_LENGTH)
    with daamlib.trace(sd3, self_attention=True, concepts=["car", "tree", "road", "sky"]) as tr:
        run(sd3)
    (record,) = tr.records
    maps, background = class_maps(record, {1: "car", 2: "tree"}, sd3)
    for label, word in ((1, "car"), (2, "tree")):
        assert torch.allclose(torch.from_numpy(maps[label]), normalize(daamlib.concept_attention(record, word)))
    others = torch.stack([daamlib.concept_attention(record, c) for c in ("road", "sky")])
    assert torch.allclose(torch.from_numpy(background), normalize(others.max(dim=0).values))
    record.image = (np.random.default_rng(0).random((HEIGHT, WIDTH, 3)) * 255).astype(np.uint8)
    latent, image = pcc_segment(record, {1: "car"}, sd3, PCCConfig(cluster_counts=(3,), refine_clusters=4))
    assert latent.shape == record.latent_size and image.shape == (HEIGHT, WIDTH)
    assert set(np.unique(latent)) <= {0, 1, 255}
    with daamlib.trace(sd3, self_attention=True, concepts=["car"]) as tr:
        run(sd3)
    with pytest.raises(ValueError, match="trace concepts for the background too"):
        class_maps(tr.records[0], {1: "car"}, sd3)
