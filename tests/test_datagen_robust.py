"""Bad inputs to prompt sets and daamlab.datagen fail before any model loads; a reused output folder
never mixes two datasets; sharded runs (RANK / WORLD_SIZE / LOCAL_RANK) export once, after every shard."""

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from daamlab.datagen import (GenerationSettings, check_fingerprint, export_labels, generate_dataset, main, merged_manifest,
                             model_identity, parse_shard, shard_device, wait_for_shards)
from daamlab.prompts import PromptSet, contains_words

GOOD = {"template": "a {object} in a street", "attributes": {"object": ["car", "person"]}, "words": ["object"]}


def one_template(**changes):
    return {"templates": [{**GOOD, **changes}]}


# -- prompt sets ------------------------------------------------------------------------------------
@pytest.mark.parametrize("config, message", [
    (one_template(attributes={"object": "car"}), r"must be a list of strings.*\['car'\]"),  # not "c", "a", "r"
    (one_template(words="object"), "words .* must be a list"),
    ({"templates": "a {object}"}, "non-empty 'templates' list"),
    ({"templates": []}, "non-empty 'templates' list"),
    ({**one_template(), "seed_per_prompt": 3}, r"unknown keys \['seed_per_prompt'\]"),
    (one_template(word=["object"]), r"unknown keys \['word'\]"),
    ({**one_template(), "seeds_per_prompt": -2}, "seeds_per_prompt must be at least 1"),
    ({**one_template(), "seeds_per_prompt": 0}, "seeds_per_prompt must be at least 1"),
    ({**one_template(), "first_seed": -1}, "first_seed must be at least 0"),
    ({**one_template(), "first_seed": 1.5}, "first_seed must be an integer"),
    ({**one_template(), "first_seed": "7"}, "first_seed must be an integer"),
    ({**one_template(), "seeds_per_prompt": True}, "seeds_per_prompt must be an integer"),
    (one_template(mode="sample", samples=-3), "samples .* must be at least 1"),
    (one_template(mode="sample", samples=2, seed=-1), "seed .* must be at least 0"),
    (one_template(samples=4), "only used with mode: sample"),
    (one_template(template="two {object}s"), "'car' .* is not a whole word of its prompt 'two cars'"),
    (one_template(template="a {object}car"), "not a whole word"),
    (one_template(template=""), "non-empty string"),
    (one_template(template="a {} street", attributes={}, words=[]), "empty or invalid field"),
    (one_template(template="a {object street"), "not a valid format string"),
    (one_template(attributes={"object": ["car", "car"]}), r"lists \['car'\] more than once"),
    (one_template(attributes={"object": ["car", ""]}), "non-empty strings"),
    (one_template(attributes={"object": ["car", 3]}), "non-empty strings"),
    ({"templates": [["a {object}"]]}, "must be a mapping"),
    ({"templates": [{"template": "a car"}]}, "needs both 'template' and 'attributes'"),
    (["a car"], "must be a mapping"),
])
def test_bad_prompt_sets_are_refused_with_the_fault(config, message):
    with pytest.raises(ValueError, match=message):
        PromptSet.from_dict(config)


def test_labelled_words_are_whole_words_also_across_punctuation_and_multiword_values():
    assert contains_words("a traffic light, at night", "traffic light")
    assert contains_words("a car, rainy", "car") and not contains_words("two cars", "car")
    specs = PromptSet.from_dict(one_template(template="{object}, at night", attributes={"object": ["traffic light"]})).expand()
    assert [s.prompt for s in specs] == ["traffic light, at night"] and specs[0].words == ("traffic light",)


def test_prompt_set_files_missing_or_malformed(tmp_path):
    with pytest.raises(FileNotFoundError, match="no prompt-set file"):
        PromptSet.load(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("templates: [\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        PromptSet.load(broken)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ValueError, match="must be a mapping"):
        PromptSet.load(empty)


# -- the command line fails before loading the model ------------------------------------------------
@pytest.fixture()
def prompts_file(tmp_path):
    path = tmp_path / "prompts.yaml"
    path.write_text(yaml.safe_dump(one_template()))
    return path


def cli_error(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--threshold", "foo"], "invalid choice: 'foo'"),
    (["--tau", "2"], r"tau in \[0, 1\]"),
    (["--num-inference-steps", "0"], "num_inference_steps must be a positive integer"),
    (["--height", "100"], "multiple of 8"),
    (["--task", "img2img"], "needs init_image"),
    (["--task", "img2img", "--init-image", "missing.png"], "no file at missing.png"),
    (["--record-dtype", "int8"], "invalid choice: 'int8'"),
    (["--shard", "2/2"], "outside 0..1"),
    (["--shard", "0/0"], "at least 1"),
    (["--shard", "a/b"], "must look like 0/4"),
    (["--export", "voc"], "invalid choice: 'voc'"),
    (["--wait-timeout", "-1"], "wait-timeout must be >= 0"),
    (["--model", "./no/such/model"], "no pipeline directory"),
    (["--model", "a/b/c"], "no pipeline directory"),
])
def test_cli_refuses_bad_arguments_before_loading_a_model(tmp_path, capsys, prompts_file, extra, message):
    err = cli_error(capsys, [str(prompts_file), "--out", str(tmp_path / "out"), *extra])
    assert message in err or __import__("re").search(message, err), err
    assert not (tmp_path / "out" / "samples").exists()


def test_cli_refuses_a_bad_prompt_set_or_model_dir_before_loading(tmp_path, capsys, prompts_file):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(one_template(template="two {object}s")))
    assert "not a whole word" in cli_error(capsys, [str(bad), "--out", str(tmp_path / "out")])
    assert "no prompt-set file" in cli_error(capsys, [str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "out")])
    (tmp_path / "not_a_model").mkdir()
    assert "no model_index.json" in cli_error(capsys, [str(prompts_file), "--out", str(tmp_path / "o"), "--model",
                                                       str(tmp_path / "not_a_model")])
    (tmp_path / "file_out").write_text("x")
    assert "is a file" in cli_error(capsys, [str(prompts_file), "--out", str(tmp_path / "file_out")])
    monkeypatched = {"RANK": "3", "WORLD_SIZE": "2"}
    with pytest.raises(ValueError, match="RANK=3, WORLD_SIZE=2: shard index 3 is outside 0..1"):
        parse_shard(None, monkeypatched)


def test_shard_and_device_come_from_the_launcher_environment():
    assert parse_shard(None, {}) == (0, 1)
    assert parse_shard(None, {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == (1, 4)
    with pytest.raises(ValueError, match="must be integers"):
        parse_shard(None, {"RANK": "x", "WORLD_SIZE": "2"})
    assert shard_device(None, {"LOCAL_RANK": "1"}, cuda_devices=2) == "cuda:1"
    assert shard_device(None, {}, cuda_devices=1) == "cuda:0"
    assert shard_device(None, {"LOCAL_RANK": "1"}, cuda_devices=0) is None  # CPU: load_pipeline's default
    assert shard_device("cpu", {"LOCAL_RANK": "1"}, cuda_devices=2) == "cpu"  # --device wins
    with pytest.raises(ValueError, match="LOCAL_RANK=2 but this machine has 2 CUDA"):
        shard_device(None, {"LOCAL_RANK": "2"}, cuda_devices=2)


def test_model_identity_names_directories_absolutely_and_keeps_hub_ids(tmp_path, monkeypatch):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model_index.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    assert model_identity("m") == str(tmp_path / "m")
    assert model_identity("stabilityai/stable-diffusion-2-base") == "stabilityai/stable-diffusion-2-base"
    (tmp_path / "weights.bin").write_text("")
    with pytest.raises(ValueError, match="is a file"):
        model_identity("weights.bin")


# -- a folder holds one dataset ---------------------------------------------------------------------
SETTINGS = GenerationSettings(num_inference_steps=1)


def test_rerun_with_another_prompt_set_settings_or_model_is_refused_and_the_same_continues(tmp_path, pipe):
    out = tmp_path / "out"
    first = PromptSet.from_dict(one_template())
    manifest = generate_dataset(pipe, first, out, SETTINGS, progress=False, model="tiny")
    assert manifest["prompt"].tolist() == ["a car in a street", "a person in a street"]
    other = PromptSet.from_dict(one_template(attributes={"object": ["tree"]}))
    with pytest.raises(ValueError, match=r"another prompt_set .* pass another --out or delete"):
        generate_dataset(pipe, other, out, SETTINGS, progress=False, model="tiny")
    with pytest.raises(ValueError, match="another settings .*tau"):
        generate_dataset(pipe, first, out, GenerationSettings(num_inference_steps=1, tau=0.5), progress=False, model="tiny")
    with pytest.raises(ValueError, match="another model"):
        generate_dataset(pipe, first, out, SETTINGS, progress=False, model="other")
    with pytest.raises(ValueError, match="another num_shards"):
        generate_dataset(pipe, first, out, SETTINGS, shard=0, num_shards=2, progress=False, model="tiny")
    with pytest.raises(ValueError, match="another trace"):
        generate_dataset(pipe, first, out, SETTINGS, progress=False, model="tiny", linear=True)
    stamp = (out / "samples" / "000000" / "meta.json").stat().st_mtime
    again = generate_dataset(pipe, first, out, SETTINGS, progress=False, model="tiny")  # same: continues, nothing redone
    pd.testing.assert_frame_equal(again, manifest)
    assert (out / "samples" / "000000" / "meta.json").stat().st_mtime == stamp
    assert sorted(p.name for p in out.glob("manifest-*")) == ["manifest-000-of-001.parquet"]
    assert json.loads((out / "fingerprint.json").read_text())["prompt_set"]["templates"][0]["attributes"] == {"object": ["car", "person"]}
    assert [c["name"] for c in json.loads((export_labels(out, ["coco"])["coco"]).read_text())["categories"]] == ["car", "person"]


def test_a_folder_with_samples_but_no_fingerprint_is_refused(tmp_path):
    (tmp_path / "samples" / "000000").mkdir(parents=True)
    with pytest.raises(ValueError, match="no fingerprint.json"):
        check_fingerprint(tmp_path, {"model": "x"})


def test_export_refuses_an_unfinished_shard_and_waiting_times_out_with_the_fix(tmp_path, pipe):
    out = tmp_path / "out"
    generate_dataset(pipe, PromptSet.from_dict(one_template()), out, SETTINGS, shard=0, num_shards=2, progress=False)
    assert merged_manifest(out)["index"].tolist() == [0]
    with pytest.raises(FileNotFoundError, match=r"shards \[1\] of 2 .* are not finished"):
        export_labels(out, ["coco"])
    with pytest.raises(FileNotFoundError, match=r"shards \[1\] of 2 did not finish within 0 s .*done-001-of-002.json"):
        wait_for_shards(out, 2, timeout=0)
    assert not (out / "annotations").exists()
    with pytest.raises(ValueError, match="not the string 'coco'"):
        export_labels(out, "coco")
    with pytest.raises(FileNotFoundError, match="not a dataset folder"):
        export_labels(tmp_path / "nothing", ["coco"])


# -- launched processes: one shard and one device per rank, one export -------------------------------
def test_two_launched_ranks_build_disjoint_complete_shards_and_export_once(tmp_path):
    from daamlab.testing.unet import tiny_random_pipeline

    tiny_random_pipeline().save_pretrained(tmp_path / "model")
    prompts = tmp_path / "prompts.yaml"
    prompts.write_text(yaml.safe_dump({"seeds_per_prompt": 2, "templates": [GOOD]}))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "daamlab.datagen", str(prompts), "--out", str(out), "--model", str(tmp_path / "model"),
               "--num-inference-steps", "2", "--export", "coco", "--wait-timeout", "300"]
    processes = []
    for rank in (1, 0):  # rank 1 first: rank 0 must wait for it
        environment = {**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
                       "CUDA_VISIBLE_DEVICES": ""}
        processes.append(subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = {}
    for rank, process in zip((1, 0), processes):
        stdout, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr[-2000:]
        outputs[rank] = stdout
    shards = [pd.read_parquet(out / f"manifest-{i:03d}-of-002.parquet")["index"].tolist() for i in range(2)]
    assert shards == [[0, 2], [1, 3]]  # disjoint and together complete
    assert sorted(json.loads((out / f"done-{i:03d}-of-002.json").read_text())["samples"] for i in range(2)) == [2, 2]
    assert "coco:" in outputs[0] and "coco:" not in outputs[1] and "shard 0 exports" in outputs[1]
    coco = json.loads((out / "annotations" / "instances.json").read_text())
    assert [image["file_name"] for image in coco["images"]] == [f"samples/{i:06d}/image.png" for i in range(4)]
    assert not list(out.glob("annotations/.*"))  # no leftover temporary files


def test_a_chosen_image_size_reaches_the_pipeline(pipe, tmp_path):
    settings = GenerationSettings(num_inference_steps=1, height=32, width=48)
    manifest = generate_dataset(pipe, PromptSet.from_dict(one_template()), tmp_path / "sized", settings, progress=False,
                                model="tiny")
    image = np.asarray(Image.open(tmp_path / "sized" / manifest.iloc[0]["image"]))
    assert image.shape[:2] == (32, 48)
