"""daamlab: the research harness beside daamlib.

The toy urban world (renderer, training, annotator, report), the thesis experiments (dataset
protocol, evaluation, optimization study, layer x step analysis, PCC scoring, downstream utility),
templated dataset generation, mask review, and the papermill runner with its presets. It imports
daamlib; daamlib never imports it.
"""

from pathlib import Path


def data_dir() -> Path:
    """The repository's ``data/`` directory (the harness runs from its checkout)."""
    return Path(__file__).resolve().parent.parent / "data"
