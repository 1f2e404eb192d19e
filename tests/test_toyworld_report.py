"""toyworld_report marks each goal of the toy model met or missed from the measured numbers."""

import pandas as pd
import pytest

from daamlab.toyworld_report import _targets, run_summary


def results(car_miou: float, car_tau: float, tree_share: float, optimized: float) -> dict:
    classes = ["car", "rider"]
    daam = pd.DataFrame({"max_miou": [car_miou, 0.20], "best_tau": [car_tau, 0.9], "auc": [0.1, 0.1], "images": [50, 50]},
                        index=classes)
    daam.loc["All"] = [daam["max_miou"].mean(), float("nan"), 0.1, 100]
    summary = {f"{variant} ({state})": {"All": value}
               for variant in ("DAAM", "Linear DAAM") for state, value in (("not optimized", 30.0), ("optimized", optimized))}
    return {"fidelity": pd.Series({"car": 1.0, "rider": 0.8}), "daam": daam, "summary": summary,
            "openvocab": pd.DataFrame({"mass share": [tree_share], "area share": [0.01]}, index=["tree"])}


def marks(lines: list[str]) -> dict[str, str]:
    """Each target's text (without the numbers after its colon) -> "met" or "missed"."""
    found = {}
    for line in lines:
        if line.startswith("- "):
            state, text = line[2:].split(": ", 1)
            found[text.split(":")[0]] = state.strip("*")
    return found


def test_targets_follow_the_numbers():
    good = marks(_targets(results(car_miou=0.50, car_tau=0.6, tree_share=0.7, optimized=40.0), {"miou": 0.95}))
    assert good["DAAM max mIoU ≥ 35 for car"] == "met" and good["DAAM max mIoU ≥ 35 for rider"] == "missed"
    assert good["best τ ≤ 0.7 for car"] == "met" and good["best τ ≤ 0.7 for rider"] == "missed"
    assert good["mean DAAM max mIoU ≥ 45"] == "missed"  # (50 + 20) / 2 = 35
    assert good["open-vocabulary mass share ≥ 0.5 for tree"] == "met"
    assert good["prompt fidelity ≥ 90 % for car"] == "met" and good["prompt fidelity ≥ 90 % for rider"] == "missed"
    assert good["annotator mIoU ≥ 0.90 on held-out scenes"] == "met"
    assert good["DAAM"] == "met" and good["Linear DAAM"] == "met"  # optimized 40 > 30
    bad = marks(_targets(results(car_miou=0.30, car_tau=0.8, tree_share=0.1, optimized=20.0), {"miou": 0.5}))
    assert bad["DAAM max mIoU ≥ 35 for car"] == "missed" and bad["best τ ≤ 0.7 for car"] == "missed"
    assert bad["open-vocabulary mass share ≥ 0.5 for tree"] == "missed"
    assert bad["DAAM"] == "missed" and bad["annotator mIoU ≥ 0.90 on held-out scenes"] == "missed"


def test_run_summary_needs_a_finished_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="finished toy-full run"):
        run_summary(tmp_path)
