"""The thesis' experiments as library calls: the dataset, per-class evaluation, layer/step analysis."""

from daamlab.experiments.dataset import SAMPLE_COLUMNS, ThesisDataset, build_dataset, sample_name
from daamlab.experiments.evaluation import Curves, class_curves, prompt_fidelity

__all__ = ["SAMPLE_COLUMNS", "ThesisDataset", "build_dataset", "sample_name", "Curves", "class_curves",
           "prompt_fidelity"]
