"""The shape of the code a newcomer reads: imports flow one way between the top-level
packages, no module imports itself back through others, every pipeline sub-package is a real
package, and no file runs past 400 lines without saying why at its top."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO_ROOT

PACKAGES = ("progan", "preprocessing", "pipeline")
# who may import whom: pipeline -> progan, preprocessing; preprocessing -> progan (device)
ALLOWED = {
    "progan": {"progan"},
    "preprocessing": {"preprocessing", "progan"},
    "pipeline": set(PACKAGES),
}
MAX_LINES = 400
REASON = "Longer than 400 lines because"


def modules() -> dict[str, Path]:
    """Every project module by dotted name."""
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            parts = path.relative_to(REPO_ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def imports_at_load(path: Path, name: str, known: set[str]) -> set[str]:
    """Project modules `name` imports when it is loaded (module level, not inside functions:
    a deferred import is how a module reaches an optional or heavy dependency)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.If | ast.Try):  # `if TYPE_CHECKING:` and try/except imports
            nodes = [n for n in ast.walk(node) if isinstance(n, ast.Import | ast.ImportFrom)]
        else:
            nodes = [node]
        for imp in nodes:
            if isinstance(imp, ast.Import):
                targets = [a.name for a in imp.names]
            elif isinstance(imp, ast.ImportFrom):
                base = imp.module or ""
                if imp.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - imp.level + 1])
                    base = f"{base}.{imp.module}" if imp.module else base
                targets = [f"{base}.{a.name}" for a in imp.names] + [base]
            else:
                continue
            for target in targets:
                while target and target not in known:
                    target = target.rpartition(".")[0]
                if target and target != name and not name.startswith(f"{target}."):
                    found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports_at_load(path, name, set(found)) for name, path in found.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as the list of modules on it, or None."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_imports_flow_one_way_between_packages():
    wrong = [
        f"{name} imports {target}"
        for name, targets in graph().items()
        for target in targets
        if target.split(".")[0] not in ALLOWED[name.split(".")[0]]
    ]
    assert wrong == []


def test_no_import_cycles():
    assert find_cycle(graph()) is None


def test_the_cycle_finder_finds_one():  # the check above is not vacuous
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    edges = graph()
    assert "pipeline.phases.session" in edges["pipeline.phases.local"]


def test_every_pipeline_subpackage_is_a_package_with_a_docstring():
    for folder in sorted(p for p in (REPO_ROOT / "pipeline").iterdir() if p.is_dir()):
        if folder.name.startswith("__") or not any(folder.glob("*.py")):
            continue
        init = folder / "__init__.py"
        assert init.is_file(), f"{folder} has no __init__.py (a wheel would leave it out)"
        assert ast.get_docstring(ast.parse(init.read_text())), init


def test_no_file_over_400_lines_without_a_reason():
    long = [
        f"{path.relative_to(REPO_ROOT)}: {n} lines"
        for path in modules().values()
        if (n := len(path.read_text().splitlines())) > MAX_LINES
        and REASON not in "".join(path.read_text().splitlines(keepends=True)[:30])
    ]
    assert long == []


def test_optional_tools_are_extras_not_everyones_dependencies():
    import tomllib

    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    core = {d.split(">")[0].split("[")[0].split("<")[0] for d in project["dependencies"]}
    assert not core & {"onnx", "onnxscript", "onnxruntime", "av", "optuna", "scipy"}
    extras = project["optional-dependencies"]
    assert {"export", "video", "tune"} <= set(extras)
    assert "progan-pipeline[export,video,tune]" in extras["dev"]  # the tests use them all
