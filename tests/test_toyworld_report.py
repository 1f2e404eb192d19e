"""toyworld_report marks each goal of the toy model met or missed from the measured numbers."""

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from daamlab.toyworld import labels as L
from daamlab.toyworld_report import _targets, label_mass_shares, run_minutes, run_summary


def results(car_miou: float, car_tau: float, tree_share: float, optimized: float, linear: float = 25.0,
            minutes: float | None = None) -> dict:
    classes = ["car", "rider"]
    daam = pd.DataFrame({"max_miou": [car_miou, 0.20], "best_tau": [car_tau, 0.9], "auc": [0.1, 0.1], "images": [50, 50]},
                        index=classes)
    daam.loc["All"] = [daam["max_miou"].mean(), float("nan"), 0.1, 100]
    summary = {f"{variant} ({state})": {"All": value}
               for variant in ("DAAM", "Linear DAAM") for state, value in (("not optimized", 30.0), ("optimized", optimized))}
    summary["Linear DAAM (not optimized)"]["All"] = linear
    return {"fidelity": pd.Series({"car": 1.0, "rider": 0.8}), "daam": daam, "summary": summary,
            "openvocab": pd.DataFrame({"mass share": [tree_share], "area share": [0.01]}, index=["tree"]),
            "toy_full_minutes": minutes}


def marks(lines: list[str]) -> dict[str, str]:
    """Each target's text (without the numbers after its colon) -> "met" or "missed"."""
    found = {}
    for line in lines:
        if line.startswith("- "):
            state, text = line[2:].split(": ", 1)
            found[text.split(":")[0]] = state.strip("*")
    return found


def test_targets_follow_the_numbers():
    good = marks(_targets(results(car_miou=0.50, car_tau=0.6, tree_share=0.7, optimized=40.0, minutes=21.0), {"miou": 0.95}))
    assert good["DAAM max mIoU ≥ 35 for car"] == "met" and good["DAAM max mIoU ≥ 35 for rider"] == "missed"
    assert good["best τ ≤ 0.7 for car"] == "met" and good["best τ ≤ 0.7 for rider"] == "missed"
    assert good["mean DAAM max mIoU ≥ 45"] == "missed"  # (50 + 20) / 2 = 35
    assert good["open-vocabulary mass share ≥ 0.5 for tree"] == "met"
    assert good["prompt fidelity ≥ 95% for car"] == "met" and good["prompt fidelity ≥ 95% for rider"] == "missed"
    assert good["annotator mIoU ≥ 0.90 on held-out scenes"] == "met"
    assert good["DAAM"] == "met" and good["Linear DAAM"] == "met"  # optimized 40 > 30
    assert good["Linear DAAM in the thesis' order, below DAAM without optimization"] == "met"  # 25 < 30
    assert good["toy-full ≤ 30 min on this machine"] == "met"
    bad = marks(_targets(results(car_miou=0.30, car_tau=0.8, tree_share=0.1, optimized=20.0, linear=31.0, minutes=30.5),
                         {"miou": 0.5}))
    assert bad["DAAM max mIoU ≥ 35 for car"] == "missed" and bad["best τ ≤ 0.7 for car"] == "missed"
    assert bad["open-vocabulary mass share ≥ 0.5 for tree"] == "missed"
    assert bad["DAAM"] == "missed" and bad["annotator mIoU ≥ 0.90 on held-out scenes"] == "missed"
    assert bad["Linear DAAM in the thesis' order, below DAAM without optimization"] == "missed"
    assert bad["toy-full ≤ 30 min on this machine"] == "missed"


def test_run_summary_needs_a_finished_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="finished toy-full run"):
        run_summary(tmp_path)


def test_label_mass_shares_are_the_maps_mass_on_each_words_label_beside_its_area(tmp_path):
    (tmp_path / "labels").mkdir()
    labels = np.full((8, 8), L.ROAD, np.uint8)
    labels[:, :2] = L.VEGETATION  # trees: a quarter of the image, the rest road
    Image.fromarray(labels).save(tmp_path / "labels" / "a.png")
    left_half = torch.zeros(8, 8)
    left_half[:, :4] = 1.0  # a map at the labels' size: half its mass on the trees, half on the road

    class LeftHalf:
        def attribute(self, record, word):
            return SimpleNamespace(heatmap=left_half)

    dataset = SimpleNamespace(manifest=pd.DataFrame({"name": ["a"]}), directory=tmp_path, record=lambda row: None)
    shares = label_mass_shares(dataset, LeftHalf())
    expected = {"tree": (0.5, 0.25), "road": (0.5, 0.75), "sidewalk": (0.0, 0.0), "building": (0.0, 0.0), "sky": (0.0, 0.0)}
    for word, (mass, area) in expected.items():
        assert tuple(shares.loc[word, ["mass share", "area share"]]) == pytest.approx((mass, area), abs=1e-6), word


def test_run_minutes_add_every_attempt(tmp_path):
    (tmp_path / "attempts.json").write_text('{"00_quickstart": [{"seconds": 60}, {"seconds": 30}], "01_dataset": [{"seconds": 90}]}')
    assert run_minutes(tmp_path) == 3.0


def test_token_group_shares_equal_the_attention_mass_summed_by_hand():
    """SOT / words / EOT / padding shares of the attention to text, against the softmax probabilities recorded
    plainly (tests/naive.py) and summed over steps, layers, heads and pixels."""
    import daamlib
    from daamlab.toyworld.diagnostics import token_group_shares
    from naive import record_everything
    from pipelines import tiny_pipeline

    pipe = tiny_pipeline(seed=1)
    prompt = "a car on the road"

    def run():
        return pipe(prompt, generator=torch.Generator().manual_seed(0), num_inference_steps=2, height=32, width=32,
                    guidance_scale=1.0, output_type="np")

    calls, _ = record_everything(pipe, run)
    with daamlib.trace(pipe) as tr:
        run()
    (record,) = tr.records
    mass = sum(call["probs"][0].sum(dim=(0, 1)) for call in calls)  # [77]: heads and pixels summed, every call
    ids = pipe.tokenizer(prompt).input_ids  # SOT, the words' pieces, EOT
    expected = {"SOT": mass[0], "words": mass[1 : len(ids) - 1].sum(), "EOT": mass[len(ids) - 1], "padding": mass[len(ids):].sum()}
    shares = token_group_shares(record)
    assert abs(sum(shares.values()) - 1) < 1e-6
    for group, value in expected.items():
        assert abs(shares[group] - float(value / mass.sum())) < 1e-5, group
