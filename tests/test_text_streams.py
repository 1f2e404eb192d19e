"""Words in every text stream: SD3 joins CLIP's 77 positions and T5's; ``stream=`` picks the one a word is read in,
and the default (None) reads CLIP, then T5 where CLIP lacks the word. Checked on words the two tokenizers split
differently, against positions found by tokenizing the prompt with each tokenizer directly and the joint softmax
recomputed plainly."""

import pytest
import torch

import daamlib
from daamlab.testing.dit import tiny_random_flux_pipeline, tiny_random_sd3_pipeline
from daamlib.methods import DAAM
from daamlib.tokens import WordNotInPrompt
from naive import naive_daam, record_everything

PROMPT = "a streetlamp by the hydrant and a car"
HEIGHT, WIDTH = 32, 32
LATENT = (HEIGHT // 2, WIDTH // 2)
T5_LENGTH = 32


@pytest.fixture(scope="module")
def sd3():
    return tiny_random_sd3_pipeline(seed=3, sharpen=4.0, max_length=T5_LENGTH)


def run(pipe, prompt=PROMPT, t5_length=T5_LENGTH):
    return pipe(prompt=prompt, generator=torch.Generator().manual_seed(0), num_inference_steps=2, height=HEIGHT,
                width=WIDTH, guidance_scale=1.0, output_type="np", max_sequence_length=t5_length).images


def positions(tokenizer, prompt, word, offset=0):
    """Where ``word``'s ids sit among ``tokenizer(prompt)``'s, found from the ids alone (plus ``offset``)."""
    ids = tokenizer(prompt).input_ids
    wanted = tokenizer(word, add_special_tokens=False).input_ids
    starts = [i for i in range(len(ids)) if ids[i : i + len(wanted)] == wanted]
    assert len(starts) == 1, (word, starts)
    return [offset + starts[0] + k for k in range(len(wanted))]


def test_a_word_is_read_in_the_stream_asked_for(sd3):
    calls, _ = record_everything(sd3, lambda: run(sd3))
    with daamlib.trace(sd3) as tr:
        run(sd3)
    (record,) = tr.records
    clip_length = sd3.tokenizer.model_max_length
    assert record.tokens.streams == (("clip", 0), ("t5", clip_length))
    for word in ("streetlamp", "hydrant"):
        clip = positions(sd3.tokenizer, PROMPT, word)
        t5 = positions(sd3.tokenizer_3, PROMPT, word, offset=clip_length)
        assert len(clip) != len(t5)  # the two tokenizers split the word differently
        for stream, expected in ((None, clip), ("clip", clip), ("t5", t5)):
            assert list(record.tokens.token_indices(word, stream=stream)) == expected
            naive = torch.stack([naive_daam(calls, row=0, token=k, latent=LATENT) for k in expected]).mean(0)
            ours = daamlib.daam(record, word, stream=stream)
            assert torch.allclose(ours, naive, rtol=1e-4, atol=1e-6), (word, stream, (ours - naive).abs().max())
        t5_tokens = DAAM(stream="t5").attribute(record, word).tokens
        assert t5_tokens == tuple(record.tokens.strings[k] for k in t5) and t5_tokens[0].startswith("\u2581")
    assert not torch.allclose(daamlib.daam(record, "hydrant", stream="t5"), daamlib.daam(record, "hydrant"))


def test_the_default_finds_a_word_clip_cut_off_in_t5(sd3):
    """A prompt longer than CLIP's 77 tokens loses its last words there; T5 (longer here) keeps them."""
    long_prompt = " ".join(["a street"] * 40) + " and a hydrant"
    t5_length = 256
    with pytest.warns(UserWarning, match="truncated"):
        with daamlib.trace(sd3) as tr:
            run(sd3, long_prompt, t5_length)
    (record,) = tr.records
    clip_length = sd3.tokenizer.model_max_length
    expected = positions(sd3.tokenizer_3, long_prompt, "hydrant", offset=clip_length)
    assert list(record.tokens.token_indices("hydrant")) == expected
    with pytest.raises(WordNotInPrompt, match="cut at the text encoder's length"):
        record.tokens.token_indices("hydrant", stream="clip")


def test_streams_are_kept_on_disk_and_unknown_ones_refused(sd3, tmp_path):
    with daamlib.trace(sd3) as tr:
        run(sd3)
    path = tr.records[0].save(tmp_path / "record")
    loaded = daamlib.load_record(path)
    assert loaded.tokens.token_indices("car", stream="t5") == tr.records[0].tokens.token_indices("car", stream="t5")
    with pytest.raises(KeyError, match=r"no 'byt5' text stream; its streams: \['clip', 't5'\]"):
        daamlib.daam(loaded, "car", stream="byt5")
    with pytest.raises(ValueError, match="stream=.t5. applies to words"):
        daamlib.daam(loaded, 3, stream="t5")


def test_flux_has_one_stream_t5():
    flux = tiny_random_flux_pipeline(seed=0, max_length=T5_LENGTH)
    (record,) = daamlib.generate(flux, PROMPT, seed=0, num_inference_steps=1, height=HEIGHT, width=WIDTH,
                                 pipe_kwargs={"max_sequence_length": T5_LENGTH})
    assert record.tokens.streams == (("t5", 0),)
    assert record.tokens.token_indices("hydrant", stream="t5") == record.tokens.token_indices("hydrant")
    with pytest.raises(KeyError, match="no 'clip' text stream"):
        daamlib.daam(record, "car", stream="clip")


def test_linear_daam_reads_the_stream_asked_for(sd3):
    with daamlib.trace(sd3, linear=True) as tr:
        run(sd3)
    (record,) = tr.records
    t5 = list(record.tokens.token_indices("hydrant", stream="t5"))
    expected = sum(torch.nn.functional.interpolate(record.linear_logits[layer.name][:, t5].T.reshape(len(t5), 1, *layer.resolution),
                                                   size=LATENT, mode="bilinear", align_corners=False)[:, 0]
                   for layer in record.cross_layers).mean(0)
    assert torch.allclose(daamlib.linear(record, "hydrant", stream="t5"), expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(daamlib.linear(record, "hydrant", stream="t5"), daamlib.linear(record, "hydrant"))


def test_a_record_with_one_conditioning_space_refuses_a_stream():
    from pipelines import tiny_pipeline

    pipe = tiny_pipeline(seed=0)
    (record,) = daamlib.generate(pipe, "a car on the road", seed=0, num_inference_steps=2, height=32, width=32, linear=True)
    assert record.tokens.streams == (("clip", 0),)
    assert torch.equal(daamlib.daam(record, "car", stream="clip"), daamlib.daam(record, "car"))
    with pytest.raises(ValueError, match="chooses among the text streams of SD3 and Flux"):
        daamlib.linear(record, "car", stream="clip")
