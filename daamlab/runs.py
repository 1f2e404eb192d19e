"""Run the notebook suite headlessly with papermill, from a parameter preset, and write a report.

    python -m daamlab.runs toy-full                       # a new run in papermill_runs/toy-full/<timestamp>/
    python -m daamlab.runs toy-full --resume <run dir>    # continue a stopped run at its first unfinished notebook

A preset (``papermill_runs/<name>.yaml``) names the notebooks, the parameters they share and
per-notebook overrides. Each notebook receives ``run_dir`` (where it reads and writes shared
artifacts) and calls :func:`save_results` in its last cell; the runner copies those numbers into
the executed notebook's metadata (``metadata.daamlib.results``) and into ``report.md``.

Before any notebook runs, the preset is checked: its keys, every parameter name against the
notebooks' ``parameters`` cells, and path parameters (``model`` when it is a directory, ``mask_dir``,
``sam_checkpoint``), which are resolved against the directory the command was run from (the
notebooks themselves run in ``notebooks/``) and must exist. ``--resume`` needs a run directory made
by the same preset. Every attempt at a notebook is timed (``attempts.json``); the report gives the total.

A clean run prints progress, not noise: every notebook's cells carry ids (nbformat 4.5, so no
``MissingIDFieldWarning``), and the kernels are started with CurveZMQ transport encryption when the
kernelspec declares it (ipykernel's does), so ipykernel does not warn that it runs over TCP in plain
text. The runner writes executed notebooks (``.ipynb``) and ``report.md`` with PNG figures, and no
HTML: ``jupyter nbconvert --to html`` pages load require.js and the widget manager from public CDNs,
so offline their widget areas are blank. Open the executed notebooks in JupyterLab instead
(``jupyter lab <run dir>``); the report and its figures need nothing from the network.
"""

from __future__ import annotations

import argparse
import ast
import datetime as dt
import json
import math
import os
import sys
import time
from pathlib import Path

import yaml

from daamlib.io import atomic_path, write_text
from daamlab.io import write_json

REPOSITORY = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = REPOSITORY / "notebooks"
PRESET_DIR = REPOSITORY / "papermill_runs"
PRESET_KEYS = ("description", "notebooks", "parameters", "notebook_parameters")
# parameters that name files or folders: resolved against the caller's directory, checked before running
PATH_PARAMETERS = {"mask_dir": "directory", "sam_checkpoint": "file"}
ATTEMPTS_FILE = "attempts.json"


class NotebookFailed(RuntimeError):
    pass


# -- called from notebooks ------------------------------------------------------------------------
def save_results(run_dir: str | os.PathLike, notebook: str, results: dict) -> Path:
    """Record a notebook's headline numbers (JSON-serialisable) for the runner and the report."""
    path = Path(run_dir) / "results" / f"{notebook}.json"
    return write_text(path, json.dumps(results, indent=2, default=_jsonable))


def save_figure(run_dir: str | os.PathLike, name: str, figure) -> Path:
    """Save a matplotlib figure under ``<run_dir>/figures`` for the report."""
    path = Path(run_dir) / "figures" / f"{name}.png"
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=100, bbox_inches="tight")
    return path


def _jsonable(value):
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


# -- presets --------------------------------------------------------------------------------------
def notebook_defaults(notebook_path: str | os.PathLike) -> dict:
    """The names and literal defaults of a notebook's ``parameters`` cell (non-literals as None)."""
    cells = json.loads(Path(notebook_path).read_text())["cells"]
    cell = next((c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])), None)
    if cell is None:
        raise ValueError(f"{notebook_path} has no cell tagged 'parameters'")
    defaults = {}
    for statement in ast.parse("".join(cell["source"])).body:
        if isinstance(statement, ast.Assign):
            for target in statement.targets:
                if isinstance(target, ast.Name):
                    try:
                        defaults[target.id] = ast.literal_eval(statement.value)
                    except ValueError:
                        defaults[target.id] = None
    return defaults


def load_preset(name_or_path: str | os.PathLike, notebook_dir: str | os.PathLike = NOTEBOOK_DIR) -> dict:
    """Read and check a preset: known keys, existing notebooks, parameter names the notebooks declare."""
    notebook_dir = Path(notebook_dir)
    path = Path(name_or_path)
    if not path.suffix:
        path = PRESET_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        available = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
        raise FileNotFoundError(f"no preset {name_or_path!r}; available: {available} (or pass a path to a YAML file)")
    try:
        preset = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"preset {path} is not valid YAML: {error}") from None
    if not isinstance(preset, dict):
        raise ValueError(f"preset {path} must be a mapping with notebooks and parameters")
    unknown_keys = sorted(set(preset) - set(PRESET_KEYS))
    if unknown_keys:
        raise ValueError(f"preset {path} has unknown keys {unknown_keys}; allowed: {list(PRESET_KEYS)}")
    notebooks = preset.get("notebooks")
    if not notebooks or not isinstance(notebooks, list):
        raise ValueError(f"preset {path} lists no notebooks (notebooks: [00_quickstart, ...])")
    for key in ("parameters", "notebook_parameters"):
        if not isinstance(preset.get(key) or {}, dict):
            raise ValueError(f"{key} of preset {path} must be a mapping, not {preset[key]!r}")
    missing = [nb for nb in notebooks if not (notebook_dir / f"{nb}.ipynb").exists()]
    if missing:
        raise FileNotFoundError(f"preset {path} names notebooks that do not exist in {notebook_dir}: {missing}")
    unknown = set(preset.get("notebook_parameters") or {}) - set(notebooks)
    if unknown:
        raise ValueError(f"preset {path} has parameters for notebooks it does not run: {sorted(unknown)}")
    preset["name"] = path.stem
    preset["source"] = str(name_or_path)
    _check_parameter_names(preset, notebook_dir, path)
    return preset


def _check_parameter_names(preset: dict, notebook_dir: Path, path: Path) -> None:
    declared = {nb: set(notebook_defaults(notebook_dir / f"{nb}.ipynb")) - {"run_dir"} for nb in preset["notebooks"]}
    everywhere = set().union(*declared.values())
    unknown = sorted(set(preset.get("parameters") or {}) - everywhere)
    if unknown:
        raise ValueError(f"preset {path}: parameters {unknown} are not declared by any of its notebooks (a typo?); "
                         f"they declare {sorted(everywhere)}")
    for notebook, values in (preset.get("notebook_parameters") or {}).items():
        if not isinstance(values, dict):
            raise ValueError(f"preset {path}: notebook_parameters of {notebook} must be a mapping, not {values!r}")
        unknown = sorted(set(values) - declared[notebook])
        if unknown:
            raise ValueError(f"preset {path}: {notebook} does not declare parameters {unknown} (a typo?); "
                             f"it declares {sorted(declared[notebook])}")


def resolve_path(name: str, value, base: Path):
    """A path parameter made absolute against ``base`` and checked; ``model`` stays a hub id when it is not a path."""
    if value is None:
        return None
    path = Path(str(value)).expanduser()
    path = path if path.is_absolute() else base / path
    if name == "model":
        text = str(value)
        if path.is_dir():
            return str(path.resolve())
        if text.startswith((".", "/", "~")) or text.count("/") > 1:
            raise FileNotFoundError(f"model {text!r}: no directory at {path} (relative paths are read from {base}); "
                                    "pass an existing save_pretrained directory or a hub id like 'org/name'")
        return text  # a hub id
    kind = PATH_PARAMETERS[name]
    exists = path.is_dir() if kind == "directory" else path.is_file()
    if not exists:
        raise FileNotFoundError(f"{name} {str(value)!r}: no {kind} at {path} (relative paths are read from {base}, "
                                "the directory the command was run from); fix the path in the preset")
    return str(path.resolve())


def resolve_paths(preset: dict, base: str | os.PathLike) -> dict:
    """A copy of ``preset`` whose path parameters are absolute and exist (see :func:`resolve_path`)."""
    base = Path(base)

    def resolve(values: dict) -> dict:
        return {name: resolve_path(name, value, base) if name in {"model", *PATH_PARAMETERS} else value
                for name, value in values.items()}

    resolved = dict(preset)
    resolved["parameters"] = resolve(preset.get("parameters") or {})
    resolved["notebook_parameters"] = {nb: resolve(values) for nb, values in (preset.get("notebook_parameters") or {}).items()}
    return resolved


def notebook_parameters(preset: dict, notebook: str, run_dir: Path) -> dict:
    parameters = dict(preset.get("parameters") or {})
    parameters.update((preset.get("notebook_parameters") or {}).get(notebook, {}))
    parameters["run_dir"] = str(run_dir)
    return parameters


def check_ground_truth(preset: dict, notebook_dir: Path) -> None:
    """01_dataset on a model without an annotator needs mask_dir or sam_checkpoint: fail before running."""
    if "01_dataset" not in preset["notebooks"]:
        return
    from daamlab.experiments.dataset import ground_truth_source

    values = {**notebook_defaults(notebook_dir / "01_dataset.ipynb"), **notebook_parameters(preset, "01_dataset", Path("."))}
    ground_truth_source(values.get("model"), values.get("mask_dir"), values.get("sam_checkpoint"))


def _preset_identity(preset: dict) -> dict:
    return {key: preset.get(key) for key in ("name", "notebooks", "parameters", "notebook_parameters")}


def prepare_run_dir(preset: dict, run_dir: Path, resume: bool) -> None:
    """Create a new run directory, or check that an existing one was made by the same preset."""
    saved_path = run_dir / "preset.yaml"
    if resume and not run_dir.is_dir():
        raise FileNotFoundError(f"--resume {run_dir}: no such run directory; pass the directory a stopped run printed, "
                                f"or leave out --resume to start a new run")
    if saved_path.exists():
        saved = yaml.safe_load(saved_path.read_text()) or {}
        if _preset_identity(saved) != _preset_identity(preset):
            differing = [key for key in ("name", "notebooks", "parameters", "notebook_parameters")
                         if saved.get(key) != preset.get(key)]
            raise ValueError(f"{run_dir} was made by preset {saved.get('name')!r} ({saved.get('source')}), which differs "
                             f"from {preset['name']!r} ({preset['source']}) in {differing}; resume it with its own preset "
                             f"(`python -m daamlab.runs {saved.get('source')} --resume {run_dir}`) or start a new run "
                             "without --resume")
        return
    if resume or (run_dir.is_dir() and any(run_dir.iterdir())):
        raise ValueError(f"{run_dir} is not a run directory (no preset.yaml); pass the directory a run printed, "
                         "or an empty or new directory")
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text(saved_path, yaml.safe_dump(preset))


# -- running --------------------------------------------------------------------------------------
def _finished(output: Path) -> bool:
    if not output.exists():
        return False
    metadata = json.loads(output.read_text()).get("metadata", {})
    return metadata.get("daamlib", {}).get("status") == "ok"


def record_attempt(run_dir: Path, notebook: str, seconds: float, status: str) -> list[dict]:
    """Append one timed attempt of ``notebook`` to ``attempts.json``; returns the notebook's attempts."""
    path = run_dir / ATTEMPTS_FILE
    attempts = json.loads(path.read_text()) if path.exists() else {}
    attempts.setdefault(notebook, []).append(
        {"seconds": round(seconds, 1), "status": status, "finished": dt.datetime.now().isoformat(timespec="seconds")})
    write_json(path, attempts)
    return attempts[notebook]


def _stamp_metadata(output: Path, results: dict, attempts: list[dict]) -> None:
    import nbformat

    notebook = nbformat.read(output, as_version=4)
    notebook.metadata["daamlib"] = {"status": "ok", "seconds": round(sum(a["seconds"] for a in attempts), 1),
                                    "attempts": attempts, "results": results}
    with atomic_path(output) as temporary:
        nbformat.write(notebook, temporary)


def kernel_config():
    """Kernel-manager settings for papermill: CurveZMQ transport encryption where the kernelspec declares
    it (``auto`` falls back to plain TCP for one that does not); nothing where pyzmq lacks CurveZMQ."""
    import zmq
    from traitlets.config import Config

    config = Config()
    if zmq.has("curve"):
        config.KernelManager.transport_encryption = "auto"
    return config


def run_preset(preset_name: str, run_dir: Path | None = None, progress: bool = True, kernel_name: str = "python3", *,
               resume: bool = False, notebook_dir: str | os.PathLike = NOTEBOOK_DIR,
               cwd: str | os.PathLike | None = None) -> Path:
    """Execute the preset's notebooks in order into ``run_dir``; finished notebooks are skipped.

    ``resume``: ``run_dir`` must be an existing run of the same preset. Relative path parameters are
    read from ``cwd`` (default: the current directory), not from the notebooks' directory."""
    import papermill

    notebook_dir = Path(notebook_dir)
    preset = load_preset(preset_name, notebook_dir)
    resolved = resolve_paths(preset, Path(cwd) if cwd is not None else Path.cwd())
    check_ground_truth(resolved, notebook_dir)
    if run_dir is None:
        if resume:
            raise ValueError("resume needs the run directory to continue")
        run_dir = PRESET_DIR / preset["name"] / dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = Path(run_dir).resolve()
    prepare_run_dir(preset, run_dir, resume)
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
                notebook_dir / f"{notebook}.ipynb", output, parameters=notebook_parameters(resolved, notebook, run_dir),
                kernel_name=kernel_name, progress_bar=progress, cwd=notebook_dir, config=kernel_config(),
            )
        except papermill.PapermillExecutionError as error:
            record_attempt(run_dir, notebook, time.perf_counter() - started, "failed")
            raise NotebookFailed(
                f"notebook {notebook} failed in cell {error.exec_count}: {error.ename}: {error.evalue}\n"
                f"The executed notebook with the traceback is {output}. Fix the cause, then resume with\n"
                f"    python -m daamlab.runs {preset['source']} --resume {run_dir}"
            ) from None
        attempts = record_attempt(run_dir, notebook, time.perf_counter() - started, "ok")
        results_path = run_dir / "results" / f"{notebook}.json"
        if not results_path.exists():
            raise NotebookFailed(f"notebook {notebook} ran but did not call save_results(run_dir, {notebook!r}, ...)")
        _stamp_metadata(output, json.loads(results_path.read_text()), attempts)
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
        attempts = meta.get("attempts") or ([{"seconds": meta["seconds"], "status": "ok"}] if "seconds" in meta else [])
        seconds = sum(attempt["seconds"] for attempt in attempts)
        total += seconds
        timing = f"{seconds:.0f} s" if attempts else "not run"
        if len(attempts) > 1:
            timing += f" in {len(attempts)} attempts (" + ", ".join(f"{a['seconds']:.0f} s {a['status']}" for a in attempts) + ")"
        lines += [f"## {notebook}", "", f"Executed notebook: [{notebook}.ipynb]({notebook}.ipynb), {timing}", ""]
        lines += _results_markdown(meta.get("results", {}))
        for figure in sorted((run_dir / "figures").glob(f"{notebook[:2]}_*.png")):
            lines += ["", f"![{figure.stem}](figures/{figure.name})"]
        lines.append("")
    lines.insert(4, f"Total notebook time: {total / 60:.1f} min on {os.cpu_count()} CPU cores.")
    return write_text(run_dir / "report.md", "\n".join(lines))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Run daamlib's notebooks with a papermill preset.")
    parser.add_argument("preset", help="a preset name in papermill_runs/ (toy-smoke, toy-full, sd2-base-thesis, pixart-alpha-thesis, "
                        "sd3-medium-thesis, flux-schnell-thesis) or a YAML path")
    parser.add_argument("--resume", type=Path, help="a run directory (made by the same preset) to continue")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        run_dir = run_preset(args.preset, args.resume, progress=not args.no_progress, resume=args.resume is not None)
    except (ValueError, KeyError, FileNotFoundError) as error:
        parser.error(str(error))
    except NotebookFailed as error:
        print(f"\nstopped: {error}", file=sys.stderr)
        raise SystemExit(1)
    print(f"report: {run_dir / 'report.md'}")


if __name__ == "__main__":
    main()
