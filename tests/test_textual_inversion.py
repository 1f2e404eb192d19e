"""Textual-inversion tokens (``pipe.load_textual_inversion``) get heatmaps like any word."""

import torch
from safetensors.torch import save_file

import daamlib
from daamlib import load_record
from pipelines import tiny_pipeline

TOKEN = "<toy-car>"


def pipeline_with_embedding(tmp_path, vectors: int = 2):
    pipe = tiny_pipeline()
    width = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    embedding = torch.randn(vectors, width, generator=torch.Generator().manual_seed(0))
    save_file({"emb_params": embedding}, tmp_path / "learned_embeds.safetensors")
    pipe.load_textual_inversion(tmp_path / "learned_embeds.safetensors", token=TOKEN)
    return pipe, embedding


def test_a_multi_vector_token_is_one_word_with_its_own_heatmap(tmp_path):
    pipe, embedding = pipeline_with_embedding(tmp_path)
    ids = pipe.tokenizer.convert_tokens_to_ids([TOKEN, f"{TOKEN}_1"])
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[ids], embedding)

    (record,) = daamlib.generate(pipe, f"a {TOKEN} in the street", seed=0, num_inference_steps=2, linear=True)
    assert record.tokens.text == f"a {TOKEN} in the street"
    assert record.tokens.token_indices(TOKEN) == (2, 3)  # SOT, a, <toy-car>, <toy-car>_1
    expected = daamlib.token_maps(record, [2, 3]).mean(dim=0)
    torch.testing.assert_close(daamlib.daam(record, TOKEN), expected)
    torch.testing.assert_close(daamlib.linear(record, TOKEN), daamlib.linear(record, record.text_embeddings[[2, 3]].mean(0)))

    reloaded = load_record(record.save(tmp_path / "record"))
    assert reloaded.tokens.token_indices(TOKEN) == (2, 3)


def test_the_text_encoder_expands_the_token_as_the_pipeline_does(tmp_path):
    pipe, _ = pipeline_with_embedding(tmp_path)
    encoded = daamlib.TextEncoder(pipe).encode(TOKEN)
    assert encoded.tokens.strings[:4] == ("<|startoftext|>", TOKEN, f"{TOKEN}_1", "<|endoftext|>")
    reference = pipe.encode_prompt(TOKEN, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)[0][0]
    torch.testing.assert_close(daamlib.TextEncoder(pipe).word_vector(TOKEN), reference[[1, 2]].mean(0))
