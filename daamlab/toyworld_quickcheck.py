"""A quick check of a toy-world model, beside the full report (``daamlab.toyworld_report``).

    python -m daamlab.toyworld_quickcheck [--model DIR] [--seeds 8] [--dataset-dir DIR]

The word-embedding cosines (:mod:`daamlab.toyworld.diagnostics`), then DAAM max mIoU and prompt
fidelity on a few seeds per class, and the share of the linear (open-vocabulary) map's mass on the
right label for background words, and where the attention to text goes (SOT, words, EOT, padding). ``--named-background`` measures the same shares for prompts that
name every background thing (``NAMED_BACKGROUND_PROMPT``), with DAAM and Linear DAAM of the words in the prompt:
whether the model localizes those words at all, or only the open-vocabulary maps fail.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import torch

from daamlab import data_dir
from daamlab.experiments import build_dataset, class_curves, prompt_fidelity
from daamlab.experiments.dataset import annotate_toy_dataset
from daamlab.toyworld import labels as L
from daamlab.toyworld.annotator import Annotator
from daamlab.toyworld.diagnostics import format_cosines, pipeline_cosines, token_group_shares
from daamlab.toyworld_report import label_mass_shares, model_fingerprint, openvocab_shares
from daamlib.methods import DAAM, LinearDAAM
from daamlib.models import load_pipeline, toy_model_dir


NAMED_BACKGROUND_PROMPT = "a {word} on the road by the sidewalk with a building, a tree and the sky"


# -- quick check ---------------------------------------------------------------------------------
def quick_check(pipe, annotator, dataset_dir: Path, seeds: int = 8) -> dict[str, object]:
    """DAAM max mIoU, best τ and prompt fidelity on ``seeds`` images per class (30 PNDM steps), and the
    open-vocabulary (linear) map's mass share on the right label for the background words."""
    dataset = build_dataset(pipe, dataset_dir, L.MAIN_CLASSES, range(seeds), linear=True, progress=True)
    shares = annotate_toy_dataset(dataset, annotator)
    daam_table = class_curves(dataset, DAAM()).summary()
    groups = pd.DataFrame([token_group_shares(dataset.record(row)) for _, row in dataset.manifest.iterrows()]).mean()
    return {"daam": daam_table, "fidelity": prompt_fidelity(shares), "openvocab": openvocab_shares(dataset, pipe),
            "token groups": groups}


def named_background_shares(pipe, annotator, dataset_dir: Path, seeds: int = 8) -> pd.DataFrame:
    """Mass share on the right label against area, per background word, of DAAM and Linear DAAM maps of the
    words *in* ``NAMED_BACKGROUND_PROMPT`` (``seeds`` images per class): rows (method, word)."""
    dataset = build_dataset(pipe, dataset_dir, L.MAIN_CLASSES, range(seeds), linear=True, progress=True,
                            prompt=lambda class_name: NAMED_BACKGROUND_PROMPT.format(word=L.CLASS_WORD[class_name]))
    annotate_toy_dataset(dataset, annotator)
    tables = {"DAAM": label_mass_shares(dataset, DAAM()), "Linear DAAM": label_mass_shares(dataset, LinearDAAM(pipe))}
    return pd.concat(tables, names=["method"])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="pipeline directory (default: the shipped toy model)")
    parser.add_argument("--seeds", type=int, default=0, help="images per class for the quick check (0: cosines only)")
    parser.add_argument("--dataset-dir", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--annotator", type=Path, default=None,
                        help="ground-truth annotator (default: the model's own, else the shipped model's)")
    parser.add_argument("--resize-annotator", action="store_true",
                        help="label images of another size than the annotator was trained at at its size")
    parser.add_argument("--named-background", action="store_true",
                        help="also the shares of the background words inside prompts that name them all")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model_dir = args.model or toy_model_dir()
    pipe = load_pipeline(model_dir, device="cpu", progress_bar=False)
    print(format_cosines(pipeline_cosines(pipe)))
    if args.seeds:
        dataset_dir = args.dataset_dir or data_dir() / "cache" / "toyworld-quick" / model_fingerprint(model_dir)
        annotator_dir = args.annotator or (model_dir / "annotator" if (model_dir / "annotator").exists()
                                           else toy_model_dir() / "annotator")
        annotator = Annotator.from_pretrained(annotator_dir, resize=args.resize_annotator)
        result = quick_check(pipe, annotator, dataset_dir, args.seeds)
        print(result["daam"].to_string(), result["fidelity"].to_string(), result["openvocab"].to_string(),
              "share of the attention to text by token group:\n" + result["token groups"].round(3).to_string(), sep="\n\n")
        if args.named_background:
            named = named_background_shares(pipe, annotator, dataset_dir.with_name(dataset_dir.name + "-named"), args.seeds)
            print(f"\nin the prompt ({NAMED_BACKGROUND_PROMPT!r}):\n{named.round(3).to_string()}")


if __name__ == "__main__":
    main()
