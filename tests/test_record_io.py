import numpy as np
import pytest
import torch

import daamlib


@pytest.fixture(scope="module")
def record(pipe):
    (record,) = daamlib.generate(pipe, "a car and a tree", seed=3, num_inference_steps=2, per_head=True,
                                 per_step=True, queries=True, linear=True, self_attention=True, contexts=["a tree"])
    return record


def test_record_round_trip(tmp_path, record):
    path = record.save(tmp_path / "sample")
    assert path.name == "sample.safetensors"
    loaded = daamlib.load_record(path)
    assert loaded.meta == record.meta
    assert loaded.meta.seed == 3 and loaded.meta.prompt == "a car and a tree"
    assert loaded.meta.model_id is not None or loaded.meta.model_id is record.meta.model_id
    np.testing.assert_array_equal(loaded.image, record.image)
    for name in ("daam", "daam_heads", "daam_steps", "queries", "self_attention"):
        original, restored = getattr(record, name), getattr(loaded, name)
        assert original.keys() == restored.keys() and original
        assert all(torch.equal(original[k], restored[k]) for k in original)
    assert torch.equal(loaded.linear_matrix, record.linear_matrix)
    assert torch.equal(loaded.contexts["a tree"]["down_blocks.0.attentions.0.transformer_blocks.0.attn2"],
                       record.contexts["a tree"]["down_blocks.0.attentions.0.transformer_blocks.0.attn2"])
    assert torch.equal(daamlib.daam(loaded, "tree"), daamlib.daam(record, "tree"))
    assert torch.equal(daamlib.openvocab(loaded, "a tree", "tree"), daamlib.openvocab(record, "a tree", "tree"))


def test_half_precision_save(tmp_path, record):
    path = record.save(tmp_path / "half", dtype=torch.float16)
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        assert handle.get_tensor("linear_matrix").dtype == torch.float16  # stored in half precision
    loaded = daamlib.load_record(path)
    assert loaded.linear_matrix.dtype == torch.float32  # converted once on load, not on every query
    assert torch.equal(loaded.linear_matrix, record.linear_matrix.half().float())
    exact = daamlib.linear(record, "car")  # fp16 storage: an error of about 2**-11 of |M| |x|, far below the map's peak
    assert torch.allclose(daamlib.linear(loaded, "car"), exact, rtol=0, atol=2e-3 * exact.abs().max())


def test_corrupt_or_foreign_files_raise_a_clear_error(tmp_path, record):
    path = record.save(tmp_path / "broken")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable daamlib record"):
        daamlib.load_record(path)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, tmp_path / "foreign.safetensors")
    with pytest.raises(ValueError, match="is a safetensors file but not a daamlib record"):
        daamlib.load_record(tmp_path / "foreign.safetensors")
    with pytest.raises(FileNotFoundError):
        daamlib.load_record(tmp_path / "missing.safetensors")


def test_save_is_atomic_and_leaves_no_temporary_files(tmp_path, record):
    record.save(tmp_path / "a")
    record.save(tmp_path / "a")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]


def test_a_file_with_a_kind_this_version_does_not_know_is_refused(tmp_path, record):
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = record.save(tmp_path / "record")
    with safe_open(path, framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        metadata = handle.metadata()
    save_file({**tensors, "attention_rollout/x": torch.zeros(2)}, tmp_path / "newer.safetensors", metadata)
    with pytest.raises(ValueError, match="a kind this daamlib does not know"):
        daamlib.load_record(tmp_path / "newer.safetensors")


def test_record_kinds_declare_every_tensor_field():
    from dataclasses import fields

    from daamlib.record import RECORD_KINDS

    tensor_fields = {f.name for f in fields(daamlib.Record)} - {"meta", "image"}
    assert {kind.name for kind in RECORD_KINDS} == tensor_fields
