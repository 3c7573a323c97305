"""The package's layering: no module imports a package above its own (imports inside
functions included), so each package can be read, tested and changed from below."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "mpi_easgd"
# Who may import whom: a layer imports its own and those listed. "foundation" is every
# top-level module but the entry points, and the data package.
ALLOWED = {
    "foundation": {"foundation"},
    "rules": {"foundation", "rules"},
    "runtime": {"foundation", "runtime"},
    "collectives": {"foundation", "rules", "runtime", "collectives"},
    "ps": {"foundation", "rules", "runtime", "ps"},
    "entry": {"foundation", "rules", "runtime", "collectives", "ps", "entry"},
}
ENTRY = {"__init__", "__main__", "train", "plot", "plan", "flight", "join"}


def layer(module: str) -> str:
    """The layer of a dotted module name inside the package."""
    parts = module.split(".")[1:]
    if not parts or parts[0] in ENTRY:
        return "entry"
    return parts[0] if parts[0] in ALLOWED else "foundation"


def imported(path: Path) -> list[str]:
    """Every module of the package that ``path`` imports, at any depth of its code."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            if node.module == "mpi_easgd":  # from mpi_easgd import ps
                names += [f"mpi_easgd.{a.name}" for a in node.names]
    return [n for n in names if n.startswith("mpi_easgd.")]


def upward_edges() -> list[str]:
    edges = []
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(("mpi_easgd", *path.relative_to(PACKAGE).with_suffix("").parts))
        own = layer(module)
        for name in imported(path):
            target = layer(name)
            if target not in ALLOWED[own] and not (target == "entry" and name.count(".") == 1
                                                   and name.split(".")[1] in ("rules", "runtime", "ps",
                                                                              "collectives")):
                edges.append(f"{module} ({own}) imports {name} ({target})")
    return edges


def test_no_module_imports_a_layer_above_its_own():
    assert upward_edges() == []


def test_the_check_sees_an_upward_edge(tmp_path, monkeypatch):
    """The check itself can fail: a rule that imported the engine is found."""
    fake = tmp_path / "mpi_easgd"
    (fake / "rules").mkdir(parents=True)
    (fake / "rules" / "bad.py").write_text("def f():\n    from mpi_easgd.ps.server import Server\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    assert upward_edges() == ["mpi_easgd.rules.bad (rules) imports mpi_easgd.ps.server (ps)"]


def algorithm_name_tests(root: Path = PACKAGE) -> list[str]:
    """Comparisons of an algorithm's name with a string outside the registry."""
    found = []
    for path in root.rglob("*.py"):
        if path.name == "registry.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                names = [n for n in (node.left, *node.comparators)
                         if isinstance(n, (ast.Name, ast.Attribute)) and (getattr(n, "attr", None) or n.id) == "algo"]
                literals = [n for n in (node.left, *node.comparators)
                            if isinstance(n, (ast.Constant, ast.Tuple, ast.List, ast.Set))]
                if names and literals:
                    found.append(f"{path.relative_to(root.parent)}:{node.lineno}")
    return found


def test_only_the_registry_tells_algorithms_apart_by_name(tmp_path):
    assert algorithm_name_tests() == []
    (tmp_path / "mpi_easgd").mkdir()
    (tmp_path / "mpi_easgd" / "bad.py").write_text("def f(cfg):\n    return cfg.algo == 'sgd'\n")
    assert algorithm_name_tests(tmp_path / "mpi_easgd") == ["mpi_easgd/bad.py:2"]


def test_every_registered_algorithm_names_classes_that_exist():
    from mpi_easgd import registry
    from mpi_easgd.rules.asynchronous import ServerRule, WorkerRule

    for algo in registry.ALGORITHMS.values():
        cls = algo.load()
        assert isinstance(cls, type), algo.name
        if algo.is_async:
            assert issubclass(cls, ServerRule) and issubclass(cls.worker_rule, WorkerRule), algo.name


def test_a_job_started_by_an_unmarked_test_fails_it():
    """Tests that launch are marked, so that ``pytest -m 'not launch'`` runs in-process only."""
    import pytest
    from conftest import launch

    with pytest.raises(pytest.fail.Exception, match="pytest.mark.launch"):
        launch(1, "-c", "pass")
