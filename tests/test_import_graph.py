"""The package's imports go one way (docs/architecture.md): the import graph
that scripts/import_graph.py reads from the source, imports inside functions
included, has no cycle, not even through the package's __init__.py. (CI's
`lint-imports` checks the direction of the layers, pyproject.toml's
contracts.)"""
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


def test_the_checker_sees_imports_inside_functions(edges):
    """The GPU ops are imported on the first GPU call, inside a function: an
    edge the graph must hold for its "no cycle" to mean anything."""
    assert edges["convcore._backends"]["convcore.cuda.functional"] == "f"
