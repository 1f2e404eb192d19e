"""Noun chunks with a parse built offline (no spaCy model download), concept maps and segmenter scores."""

import numpy as np
import pytest
import spacy
import torch
from spacy.tokens import Doc

import daamlib
from daamlab.noun_chunks import chunk_maps, concept_statistics, noun_chunks, score_segmenter


def parsed(caption):
    """A hand-parsed caption: what en_core_web_sm gives for 'a red car next to a tree'."""
    assert caption == "a red car next to a tree"
    vocab = spacy.blank("en").vocab
    return Doc(vocab, words=["a", "red", "car", "next", "to", "a", "tree"],
               pos=["DET", "ADJ", "NOUN", "ADV", "ADP", "DET", "NOUN"],
               deps=["det", "amod", "ROOT", "advmod", "prep", "det", "pobj"], heads=[2, 2, 2, 2, 3, 6, 4])


def test_noun_chunks_drop_determiners():
    assert noun_chunks("a red car next to a tree", parsed) == ["red car", "tree"]


def test_chunk_maps_average_the_chunk_tokens(pipe):
    (record,) = daamlib.generate(pipe, "a red car next to a tree", seed=0, num_inference_steps=2, height=32, width=32)
    maps = chunk_maps(record, parsed)
    assert set(maps) == {"red car", "tree"}
    expected = (daamlib.daam(record, "red") + daamlib.daam(record, "car")) / 2
    assert torch.allclose(maps["red car"], expected, atol=1e-6)
    stats = concept_statistics([(c, m) for c, m in maps.items()] * 2, (8, 8))
    assert stats["tree"].shape == (8, 8) and np.isclose(stats["tree"].max(), 1.0)


def test_a_segmenter_that_copies_the_attention_scores_perfectly():
    heatmap = torch.zeros(4, 4)
    heatmap[1:3, 1:3] = 1.0
    mask = np.kron((heatmap >= 0.4).numpy(), np.ones((2, 2))).astype(bool)
    table = score_segmenter({"car": mask, "tree": ~mask}, {"car": heatmap, "tree": heatmap})
    assert table.loc["car", "iou"] > 0.5 and table.loc["car", "pearson"] > 0.8
    assert table.loc["tree", "pearson"] < -0.8
    with pytest.raises(KeyError, match="no attention map"):
        score_segmenter({"bus": mask}, {"car": heatmap})
