"""Run the notebook suite headlessly with papermill, from a parameter preset, and write a report.

    python -m daamlib.runs toy-full                       # a new run in papermill_runs/toy-full/<timestamp>/
    python -m daamlib.runs toy-full --resume <run dir>    # continue a stopped run at its first unfinished notebook

A preset (``papermill_runs/<name>.yaml``) names the notebooks, the parameters they share and
per-notebook overrides. Each notebook receives ``run_dir`` (where it reads and writes shared
artifacts) and calls :func:`save_results` in its last cell; the runner copies those numbers into
the executed notebook's metadata (``metadata.daamlib.results``) and into ``report.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import sys
import time
from pathlib import Path

import yaml

from .io import atomic_path

REPOSITORY = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = REPOSITORY / "notebooks"
PRESET_DIR = REPOSITORY / "papermill_runs"


class NotebookFailed(RuntimeError):
    pass


# -- called from notebooks ------------------------------------------------------------------------
def save_results(run_dir: str | os.PathLike, notebook: str, results: dict) -> Path:
    """Record a notebook's headline numbers (JSON-serialisable) for the runner and the report."""
    path = Path(run_dir) / "results" / f"{notebook}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=_jsonable))
    return path


def save_figure(run_dir: str | os.PathLike, name: str, figure) -> Path:
    """Save a matplotlib figure under ``<run_dir>/figures`` for the report."""
    path = Path(run_dir) / "figures" / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100, bbox_inches="tight")
    return path


def _jsonable(value):
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


# -- presets --------------------------------------------------------------------------------------
def load_preset(name_or_path: str | os.PathLike) -> dict:
    path = Path(name_or_path)
    if not path.suffix:
        path = PRESET_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        available = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
        raise FileNotFoundError(f"no preset {name_or_path!r}; available: {available}")
    preset = yaml.safe_load(path.read_text()) or {}
    preset["name"] = path.stem
    preset["source"] = str(name_or_path)
    notebooks = preset.get("notebooks")
    if not notebooks:
        raise ValueError(f"preset {path} lists no notebooks")
    missing = [nb for nb in notebooks if not (NOTEBOOK_DIR / f"{nb}.ipynb").exists()]
    if missing:
        raise FileNotFoundError(f"preset {path} names notebooks that do not exist in {NOTEBOOK_DIR}: {missing}")
    unknown = set(preset.get("notebook_parameters", {})) - set(notebooks)
    if unknown:
        raise ValueError(f"preset {path} has parameters for notebooks it does not run: {sorted(unknown)}")
    return preset


def notebook_parameters(preset: dict, notebook: str, run_dir: Path) -> dict:
    parameters = dict(preset.get("parameters", {}))
    parameters.update(preset.get("notebook_parameters", {}).get(notebook, {}))
    parameters["run_dir"] = str(run_dir)
    return parameters


# -- running --------------------------------------------------------------------------------------
def _finished(output: Path) -> bool:
    if not output.exists():
        return False
    metadata = json.loads(output.read_text()).get("metadata", {})
    return metadata.get("daamlib", {}).get("status") == "ok"


def _stamp_metadata(output: Path, results: dict, seconds: float) -> None:
    import nbformat

    notebook = nbformat.read(output, as_version=4)
    notebook.metadata["daamlib"] = {"status": "ok", "seconds": round(seconds, 1), "results": results}
    with atomic_path(output) as temporary:
        nbformat.write(notebook, temporary)


def run_preset(preset_name: str, run_dir: Path | None = None, progress: bool = True, kernel_name: str = "python3") -> Path:
    """Execute the preset's notebooks in order into ``run_dir``; finished notebooks are skipped."""
    import papermill

    preset = load_preset(preset_name)
    if run_dir is None:
        run_dir = PRESET_DIR / preset["name"] / dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "preset.yaml").write_text(yaml.safe_dump(preset))
    notebooks = preset["notebooks"]
    for position, notebook in enumerate(notebooks, 1):
        output = run_dir / f"{notebook}.ipynb"
        if _finished(output):
            print(f"[{position}/{len(notebooks)}] {notebook}: done before, skipped", flush=True)
            continue
        print(f"[{position}/{len(notebooks)}] {notebook} ...", flush=True)
        started = time.perf_counter()
        try:
            papermill.execute_notebook(
                NOTEBOOK_DIR / f"{notebook}.ipynb", output, parameters=notebook_parameters(preset, notebook, run_dir),
                kernel_name=kernel_name, progress_bar=progress, cwd=NOTEBOOK_DIR,
            )
        except papermill.PapermillExecutionError as error:
            raise NotebookFailed(
                f"notebook {notebook} failed in cell {error.exec_count}: {error.ename}: {error.evalue}\n"
                f"The executed notebook with the traceback is {output}. Fix the cause, then resume with\n"
                f"    python -m daamlib.runs {preset['source']} --resume {run_dir}"
            ) from None
        results_path = run_dir / "results" / f"{notebook}.json"
        if not results_path.exists():
            raise NotebookFailed(f"notebook {notebook} ran but did not call save_results(run_dir, {notebook!r}, ...)")
        _stamp_metadata(output, json.loads(results_path.read_text()), time.perf_counter() - started)
    write_report(run_dir, preset)
    return run_dir


# -- the report -----------------------------------------------------------------------------------
def _format(value) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.3f}"
    return str(value)


def _results_markdown(results: dict, depth: int = 0) -> list[str]:
    """Nested dicts of numbers as nested bullet lists; a dict of equal-keyed dicts as a table."""
    import pandas as pd

    lines = []
    for key, value in results.items():
        if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
            table = pd.DataFrame(value).T
            lines += [f"{'  ' * depth}- **{key}**", "", table.map(_format).to_markdown(), ""]
        elif isinstance(value, dict):
            lines.append(f"{'  ' * depth}- **{key}**")
            lines += _results_markdown(value, depth + 1)
        else:
            lines.append(f"{'  ' * depth}- {key}: {_format(value)}")
    return lines


def write_report(run_dir: Path, preset: dict) -> Path:
    lines = [f"# daamlib run `{preset['name']}`", "", preset.get("description", ""), "",
             f"Run directory: `{run_dir}`", ""]
    total = 0.0
    for notebook in preset["notebooks"]:
        output = run_dir / f"{notebook}.ipynb"
        meta = json.loads(output.read_text()).get("metadata", {}).get("daamlib", {}) if output.exists() else {}
        total += meta.get("seconds", 0.0)
        lines += [f"## {notebook}", "", f"Executed notebook: [{notebook}.ipynb]({notebook}.ipynb), "
                  f"{meta.get('seconds', float('nan')):.0f} s", ""]
        lines += _results_markdown(meta.get("results", {}))
        for figure in sorted((run_dir / "figures").glob(f"{notebook[:2]}_*.png")):
            lines += ["", f"![{figure.stem}](figures/{figure.name})"]
        lines.append("")
    lines.insert(4, f"Total notebook time: {total / 60:.1f} min on {os.cpu_count()} CPU cores.")
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Run daamlib's notebooks with a papermill preset.")
    parser.add_argument("preset", help="a preset name in papermill_runs/ (toy-smoke, toy-full, sd2-base-thesis) or a YAML path")
    parser.add_argument("--resume", type=Path, help="a run directory to continue")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        run_dir = run_preset(args.preset, args.resume, progress=not args.no_progress)
    except NotebookFailed as error:
        print(f"\nstopped: {error}", file=sys.stderr)
        raise SystemExit(1)
    print(f"report: {run_dir / 'report.md'}")


if __name__ == "__main__":
    main()
