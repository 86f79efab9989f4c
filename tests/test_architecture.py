"""The library's floor plan: stage modules and entry points on top, parts in subpackages below them.

Read from the source (the imports each module makes), so a new module or import that breaks the plan fails here.
"""
import ast
from pathlib import Path

import pytest

LIB = Path(__file__).resolve().parents[1] / "unetpp_lib"
STAGE_MODULES = {"convert", "plan", "preprocess", "train", "validate", "benchmark"}  # notebooks 01-06
ENTRY_POINTS = {"predict", "launch", "gpu_check", "import_v1", "scale"}  # `python -m unetpp_lib.<name>`
SUBPACKAGES = ["core", "prep", "nn", "evaluation", "qa", "perf"]  # each may import only those before it, or perf


def module_name(path: Path) -> str:
    """`unetpp_lib.nn.model` for unetpp_lib/nn/model.py."""
    parts = path.relative_to(LIB.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """The unetpp_lib modules `path` imports (relative imports resolved; `from pkg import mod` as pkg.mod)."""
    tree, me = ast.parse(path.read_text()), module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("unetpp_lib")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if not source.startswith("unetpp_lib"):
                continue
            for a in node.names:
                sub = f"{source}.{a.name}"
                found.add(sub if (LIB.parent / (sub.replace(".", "/") + ".py")).is_file() else source)
    return found


def graph() -> dict[str, set[str]]:
    """Every library module with the library modules it imports."""
    return {module_name(p): imports(p) for p in LIB.rglob("*.py")}


def test_top_level_holds_the_stages_the_entry_points_and_the_subpackages():
    modules = {p.stem for p in LIB.glob("*.py") if p.stem != "__init__"}
    folders = {p.name for p in LIB.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert modules == STAGE_MODULES | ENTRY_POINTS
    assert folders == set(SUBPACKAGES)
    for name in SUBPACKAGES:
        assert (LIB / name / "__init__.py").read_text().startswith('"""'), f"{name}/__init__.py says what it holds"


@pytest.mark.parametrize("package", SUBPACKAGES)
def test_a_subpackage_imports_nothing_above_it(package):
    allowed = {f"unetpp_lib.{p}" for p in SUBPACKAGES[:SUBPACKAGES.index(package) + 1]}
    if package == "perf":  # the measurements time the network, the data and the store
        allowed = {f"unetpp_lib.{p}" for p in SUBPACKAGES}
    for mod, deps in graph().items():
        if mod.startswith(f"unetpp_lib.{package}"):
            wrong = sorted(d for d in deps if not any(d == a or d.startswith(a + ".") for a in allowed))
            assert not wrong, f"{mod} imports {wrong}: a part must not import a stage, an entry point or a later room"


def test_no_import_circle():
    g = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(mod: str, path: list[str]) -> None:
        state[mod] = 1
        for dep in sorted(g.get(mod, ())):
            if dep not in g:
                continue
            assert state.get(dep) != 1, "import circle: " + " -> ".join(path[path.index(dep):] + [dep])
            if dep not in state:
                visit(dep, path + [dep])
        state[mod] = 2

    for mod in sorted(g):
        if mod not in state:
            visit(mod, [mod])


def test_the_graph_reader_sees_imports():
    """The checks above read real edges: a few known ones, relative and absolute, are found."""
    g = graph()
    assert "unetpp_lib.nn.model" in g["unetpp_lib.nn.autotune"]
    assert "unetpp_lib.core.io" in g["unetpp_lib.prep.store"]
    assert "unetpp_lib.train" in g["unetpp_lib.launch"]
    assert {"unetpp_lib.plan", "unetpp_lib.preprocess", "unetpp_lib.scale"} <= g["unetpp_lib.benchmark"]
