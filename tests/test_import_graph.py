"""The package's imports go one way (docs/architecture.md): the import graph
that scripts/import_graph.py reads from the source, imports inside functions
included, has no cycle, not even through the package's __init__.py, module
by module or folded into the layers of pyproject.toml's import-linter
contract. (CI's `lint-imports` checks those contracts themselves.)"""
import importlib.util
import os

import pytest

_SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts",
                       "import_graph.py")
_spec = importlib.util.spec_from_file_location("import_graph", _SCRIPT)
import_graph = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(import_graph)


@pytest.fixture(scope="module")
def edges():
    return import_graph.graph(import_graph.DEFAULT_PACKAGE)


@pytest.mark.parametrize("view", ["all", "no-root", "module"])
def test_the_import_graph_has_no_cycle(edges, view):
    assert import_graph.cycles(edges, view) == []


@pytest.mark.parametrize("view", ["all", "no-root", "module"])
def test_the_graph_of_the_declared_layers_has_no_cycle(edges, view):
    pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11+")
    layers = import_graph.declared_layers()
    assert "convcore.nn" in layers and "convcore.functional" in layers
    assert import_graph.cycles(import_graph.fold(edges, layers), view) == []


def test_the_checker_sees_imports_inside_functions(edges):
    """The GPU ops are imported on the first GPU call, inside a function: an
    edge the graph must hold for its "no cycle" to mean anything."""
    assert edges["convcore._backends"]["convcore.cuda.functional"] == "f"
