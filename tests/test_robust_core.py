"""Bad or edge input to trace, generate, records, open-vocabulary / linear maps and token optimization:
each is a clear error or a right answer, never a silent wrong one."""

import numpy as np
import pytest
import torch

import daamlib
from daamlib.modules import model_fingerprint, same_model
from pipelines import tiny_pipeline

PROMPT = "a car in an urban environment"


def run(pipe, **kwargs):
    return pipe(prompt=PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np",
                **kwargs).images


# -- trace ------------------------------------------------------------------------------------------
def test_the_unconditional_branch_carries_the_negative_prompts_tokens(pipe):
    with daamlib.trace(pipe, branch="uncond") as tr:
        run(pipe, negative_prompt="a tree")
    (record,) = tr.records
    assert record.tokens.text == "a tree"
    uncond = pipe.encode_prompt("a tree", pipe.device, 1, False)[0][0].float().cpu()
    assert torch.allclose(record.text_embeddings, uncond, atol=1e-6)
    assert daamlib.daam(record, "tree").shape == (16, 16)
    with pytest.raises(KeyError, match="not in the prompt"):
        daamlib.daam(record, "car")  # the positive prompt's word is not what this branch attended to


def test_the_unconditional_branch_of_an_embedded_negative_has_no_words(pipe):
    negative = pipe.encode_prompt("a tree", pipe.device, 1, False)[0]
    with daamlib.trace(pipe, branch="uncond") as tr:
        run(pipe, negative_prompt_embeds=negative)
    with pytest.raises(KeyError, match="no prompt tokens"):
        tr.records[0].tokens


@pytest.mark.parametrize("cfg, guidance", [(False, 7.5), (True, 1.0)])
def test_a_cfg_override_that_contradicts_the_pipeline_is_refused(pipe, cfg, guidance):
    with pytest.raises(ValueError, match="leave cfg=None"):
        with daamlib.trace(pipe, cfg=cfg):
            run(pipe, guidance_scale=guidance)
    with pytest.raises(ValueError, match="leave cfg=None"):
        daamlib.generate(pipe, PROMPT, seed=0, num_inference_steps=2, guidance_scale=guidance, cfg=cfg)


def test_an_exception_after_a_finished_generation_keeps_its_record(pipe):
    with pytest.raises(RuntimeError, match="saving failed"):
        with daamlib.trace(pipe) as tr:
            run(pipe)
            raise RuntimeError("saving failed")
    (record,) = tr.records
    assert record.num_steps == 3 and record.tokens.text == PROMPT


def test_contexts_must_be_a_list_of_phrases_or_vectors_of_the_right_size(pipe):
    with pytest.raises(ValueError, match=r"contexts=\['a tree'\]"):
        daamlib.trace(pipe, contexts="a tree").__enter__()
    with pytest.raises(ValueError, match=r"must be vectors \[m, 32\]"):
        daamlib.trace(pipe, contexts={"tok": torch.zeros(2, 16)}).__enter__()


# -- generate ---------------------------------------------------------------------------------------
def test_generate_takes_one_negative_prompt_for_many_prompts(pipe):
    records = daamlib.generate(pipe, [PROMPT, "a person"], seed=0, num_inference_steps=2, negative_prompt="a tree",
                               branch="uncond")
    assert [r.tokens.text for r in records] == ["a tree", "a tree"]
    with pytest.raises(ValueError, match="one per prompt"):
        daamlib.generate(pipe, [PROMPT, "a person"], seed=0, negative_prompt=["a tree"])


@pytest.mark.parametrize("kwargs, message", [
    ({"seed": None}, "seed must be a non-negative integer"),
    ({"seed": -1}, "seed must be a non-negative integer"),
    ({"seed": 1.5}, "seed must be a non-negative integer"),
    ({"seed": 0, "num_inference_steps": 0}, "num_inference_steps must be a positive integer"),
    ({"seed": 0, "num_images_per_prompt": 0}, "num_images_per_prompt must be a positive integer"),
    ({"seed": 0, "pipe_kwargs": {"generator": torch.Generator()}}, r"pass seed="),
    ({"seed": 0, "pipe_kwargs": {"negative_prompt": "x"}}, r"pass negative_prompt="),
])
def test_generate_checks_its_arguments_before_generating(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message) as error:
        daamlib.generate(pipe, PROMPT, **kwargs)
    assert len(str(error.value)) < 300  # says what to do, without dumping the pipeline


# -- model identity ---------------------------------------------------------------------------------
def test_fingerprints_tell_models_apart_and_match_copies():
    first, same, other = tiny_pipeline(seed=0), tiny_pipeline(seed=0), tiny_pipeline(seed=1)
    assert same_model(model_fingerprint(first), model_fingerprint(same))
    assert same_model(model_fingerprint(first), model_fingerprint(first.to(torch.float16).to(torch.float32)))
    assert not same_model(model_fingerprint(first), model_fingerprint(other))  # same shapes, other weights


def test_a_record_is_refused_by_another_models_pipeline(pipe, tmp_path):
    other = tiny_pipeline(seed=1)
    (record,) = daamlib.generate(pipe, PROMPT, seed=0, num_inference_steps=2, queries=True, linear=True)
    record = daamlib.load_record(record.save(tmp_path / "r"))  # the fingerprint survives the file
    for call in (lambda p: daamlib.openvocab(record, "a tree", "tree", pipe=p),
                 lambda p: daamlib.linear(record, "tree", pipe=p),
                 lambda p: daamlib.optimize_tokens([record], [np.ones((32, 32), bool)], init="car", pipe=p, epochs=1,
                                                   progress=False)):
        with pytest.raises(ValueError, match="another model"):
            call(other)
        call(pipe)  # the generating pipeline is accepted


# -- token optimization -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_records():
    pipe = tiny_pipeline()
    return pipe, daamlib.generate(pipe, [PROMPT] * 2, seed=0, num_inference_steps=2, linear=True)


def _mask():
    mask = np.zeros((32, 32), bool)
    mask[8:20, 8:20] = True
    return mask


@pytest.mark.parametrize("masks, kwargs, message", [
    ([_mask(), np.zeros((32, 32), bool)], {}, "mask 1 is empty"),
    ([_mask(), _mask() * 0.3], {}, "mask 1 is not binary"),
    ([_mask(), _mask()], {"epochs": -5}, "epochs must be a positive integer"),
    ([_mask(), _mask()], {"epochs": 0}, "epochs must be a positive integer"),
    ([_mask(), _mask()], {"learning_rate": float("nan")}, "learning_rate must be a positive number"),
    ([_mask(), _mask()], {"variant": "softmax"}, "needs pipe="),
])
def test_optimize_tokens_checks_its_inputs(two_records, masks, kwargs, message):
    _, records = two_records
    with pytest.raises(ValueError, match=message):
        daamlib.optimize_tokens(records, masks, init="car", progress=False, **kwargs)


def test_optimize_tokens_refuses_records_of_two_models(two_records):
    _, records = two_records
    (foreign,) = daamlib.generate(tiny_pipeline(seed=1), PROMPT, seed=0, num_inference_steps=2, linear=True)
    with pytest.raises(ValueError, match="record 1 comes from another model"):
        daamlib.optimize_tokens([records[0], foreign], [_mask(), _mask()], init="car", progress=False)


def test_optimize_tokens_names_the_missing_record_kind(two_records):
    pipe, records = two_records
    with pytest.raises(ValueError, match="record 0 has no queries; variant='softmax' needs records traced with queries=True"):
        daamlib.optimize_tokens(records, [_mask(), _mask()], init="car", variant="softmax", pipe=pipe, progress=False)


def test_optimized_tokens_load_refuses_a_record_file_and_checks_the_model(two_records, tmp_path):
    pipe, records = two_records
    record_path = records[0].save(tmp_path / "record")
    with pytest.raises(ValueError, match="it is a daamlib record: read it with daamlib.load_record"):
        daamlib.OptimizedTokens.load(record_path)
    with pytest.raises(FileNotFoundError, match="no optimized tokens"):
        daamlib.OptimizedTokens.load(tmp_path / "missing")
    tokens = daamlib.optimize_tokens(records, [_mask(), _mask()], init="car", epochs=2, progress=False)
    path = tokens.save(tmp_path / "tokens")
    assert torch.equal(daamlib.OptimizedTokens.load(path, pipe=pipe).vectors, tokens.vectors)
    with pytest.raises(ValueError, match="another model"):
        daamlib.OptimizedTokens.load(path, pipe=tiny_pipeline(seed=1))


def test_occurrence_has_no_meaning_for_sot_and_eot(pipe):
    (record,) = daamlib.generate(pipe, PROMPT, seed=0, num_inference_steps=2)
    assert daamlib.daam(record, "<eot>").shape == (16, 16)
    with pytest.raises(KeyError, match="occurs once per prompt"):
        daamlib.daam(record, "<eot>", occurrence=1)


# -- found by the adversarial pass ------------------------------------------------------------------
def test_stored_context_maps_are_read_only_with_the_padding_they_were_attached_with(pipe):
    (record,) = daamlib.generate(pipe, PROMPT, seed=0, num_inference_steps=2, contexts=["a car and a tree"],
                                 context_padding=True)
    assert daamlib.openvocab(record, "a car and a tree", include_padding=True).shape[0] == 77
    with pytest.raises(ValueError, match="attached with its padding keys"):
        daamlib.openvocab(record, "a car and a tree")  # was: 77 padding-softmax maps instead of 7
    with pytest.raises(ValueError, match="summed over steps; steps= needs a query cache"):
        daamlib.openvocab(record, "a car and a tree", "tree", include_padding=True, steps=[0])
    with pytest.raises(TypeError, match="include_padding is True or False"):
        daamlib.openvocab(record, "a car and a tree", include_padding="no")
    with pytest.raises(IndexError, match="outside the 77 keys"):
        daamlib.openvocab(record, "a car and a tree", 80, include_padding=True)


def test_query_steps_are_checked_before_the_generation_runs(pipe):
    for bad, error, message in (([], ValueError, r"query_steps=\[\] selects no step"),
                                ([-1], IndexError, r"query_steps \[-1\] are negative"),
                                (["0"], TypeError, r"query_steps are integer step indices"),
                                ([1, 1], ValueError, r"query_steps \[1\] are repeated")):
        with pytest.raises(error, match=message):
            daamlib.generate(pipe, PROMPT, seed=0, num_inference_steps=2, queries=True, query_steps=bad)
    with pytest.raises(TypeError, match=r"query_steps=\[0\]"):
        daamlib.generate(pipe, PROMPT, seed=0, num_inference_steps=2, queries=True, query_steps=0)
    steps = []
    with pytest.raises(ValueError, match="reach past this generation's 3 UNet calls"):
        daamlib.generate(pipe, PROMPT, seed=0, num_inference_steps=2, queries=True, query_steps=[99],
                         pipe_kwargs={"callback_on_step_end": lambda p, i, t, kw: steps.append(i) or kw})
    assert steps == []  # refused at the first UNet call, before any step finished
    (record,) = daamlib.generate(pipe, PROMPT, seed=0, num_inference_steps=2, queries=True, query_steps=np.array([0, 2]))
    assert sorted({step for _, step in record.queries}) == [0, 2]


def test_trace_layers_must_be_a_list(pipe):
    name = daamlib.attention_layers(pipe.unet)[0].name
    with pytest.raises(TypeError, match=r"wrap one layer: layers=\["):
        daamlib.trace(pipe, layers=name).__enter__()


def test_record_save_and_load_name_wrong_kinds(pipe, tmp_path):
    (record,) = daamlib.generate(pipe, PROMPT, seed=0, num_inference_steps=2, linear=True)
    with pytest.raises(ValueError, match="floating torch dtype"):
        record.save(tmp_path / "int", dtype=torch.int8)  # was: every map saved as zeros
    with pytest.raises(ValueError, match="is a directory"):
        daamlib.load_record(tmp_path)
    mask = np.zeros((32, 32), bool)
    mask[4:12, 4:12] = True
    tokens = daamlib.optimize_tokens([record], [mask], init="car", epochs=1, progress=False).save(tmp_path / "tokens")
    with pytest.raises(ValueError, match="holds optimized tokens, not a record; read it with daamlib.OptimizedTokens.load"):
        daamlib.load_record(tokens)


def test_linear_takes_one_finite_vector(pipe):
    (record,) = daamlib.generate(pipe, PROMPT, seed=0, num_inference_steps=2, linear=True)
    vector = torch.randn(32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(daamlib.linear(record, vector[None]), daamlib.linear(record, vector))
    with pytest.raises(ValueError, match="for several vectors use linear_maps"):
        daamlib.linear(record, torch.randn(2, 16))  # was: flattened into one vector
    with pytest.raises(ValueError, match="NaN or inf"):
        daamlib.linear(record, torch.full((32,), float("nan")))


def test_generate_refuses_arguments_the_pipeline_does_not_take(pipe):
    with pytest.raises(ValueError, match=r"pipe_kwargs \['guidance_scal'\] are not arguments of StableDiffusionPipeline"):
        daamlib.generate(pipe, PROMPT, seed=0, num_inference_steps=2, pipe_kwargs={"guidance_scal": 3.0})


def test_non_ascii_words_are_found_as_typed(pipe):
    (record,) = daamlib.generate(pipe, "a café near 東京", seed=0, num_inference_steps=2)
    assert record.tokens.text == "a café near 東京"
    assert torch.equal(daamlib.daam(record, "café"), daamlib.token_maps(record, record.tokens.token_indices("café")).mean(0))
    assert len(record.tokens.token_indices("東京")) >= 2  # one word of several byte-level pieces
