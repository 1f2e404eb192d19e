"""The thin library and the harness beside it: daamlib stays small and light, and never imports daamlab."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ["pandas", "pyarrow", "sklearn", "skimage", "matplotlib", "scipy", "ipywidgets", "papermill"]
MAX_MODULE_LINES, MAX_LIBRARY_LINES = 400, 4000


def modules(package: str) -> dict[str, Path]:
    base = ROOT / package
    return {".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): path
            for path in base.rglob("*.py")}


def top_level_imports(name: str, path: Path) -> set[str]:
    """Absolute names of the modules a file imports at import time (not inside functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            found.add(".".join([*base, node.module] if node.module else base))
    return found


def test_import_daamlib_pulls_in_no_heavy_dependency():
    code = f"import sys, daamlib; print([m for m in {HEAVY!r} if m in sys.modules])"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"


def test_daamlib_is_small_and_made_of_small_modules():
    sizes = {name: len(path.read_text().splitlines()) for name, path in modules("daamlib").items()}
    assert {name: lines for name, lines in sizes.items() if lines > MAX_MODULE_LINES} == {}
    assert sum(sizes.values()) <= MAX_LIBRARY_LINES, sum(sizes.values())


def test_daamlib_never_imports_the_harness():
    for name, path in modules("daamlib").items():
        text = path.read_text()
        assert "import daamlab" not in text and "from daamlab" not in text, name


def test_no_import_cycles_between_packages():
    """Subpackages (daamlib.capture, daamlab.toyworld, ...) form an acyclic graph at import time."""
    def unit(module: str) -> str:
        return ".".join(module.split(".")[:2])

    graph: dict[str, set[str]] = {}
    for package in ("daamlib", "daamlab"):
        for name, path in modules(package).items():
            targets = {unit(t) for t in top_level_imports(name, path) if t.split(".")[0] in ("daamlib", "daamlab")}
            graph.setdefault(unit(name), set()).update(targets - {unit(name)})
    visiting, done = set(), set()

    def visit(node, trail):
        assert node not in visiting, f"import cycle: {' -> '.join(trail + [node])}"
        if node in done:
            return
        visiting.add(node)
        for target in graph.get(node, ()):
            visit(target, trail + [node])
        visiting.discard(node)
        done.add(node)

    for node in graph:
        visit(node, [])
