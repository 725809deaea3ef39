"""The import graph of the convcore package, read from the source (nothing is
imported): which module imports which, at module level and inside functions,
and the cycles that those imports form.

    python scripts/import_graph.py [--package python/convcore] [--layers] [--edges]

Every `import` and `from ... import` statement of every .py file counts,
wherever it stands: at module level (`m` below: runs when the module is
imported) or inside a function or method (`f`: runs when the function is
called). `from . import x` counts as an import of the submodule x when x is
one, else of the package. The parent packages that Python imports before a
submodule (convcore/__init__.py before convcore.models) are not counted as
edges: every module has them. Dynamic imports (importlib.import_module) are
not seen.

Cycles: the strongly connected components of the graph with more than one
module, first over every edge (m and f), then over the same edges less those
into the top package itself (its __init__.py is the facade that imports
nearly every module, so one function-level `from . import __version__`
puts the whole package in one cycle and hides the smaller ones), then over
the module-level edges alone (the cycles that decide the import order).
--layers folds each module into its layer, as pyproject.toml's import-linter
layers contract declares them (a module no layer holds, such as the package's
__init__ or an entry point, stays itself), before finding them; a cycle there
is a layer that imports one above it. --edges lists every edge.
"""
from __future__ import annotations

import argparse
import ast
import os
import sys
from typing import Dict, List, Set, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_PACKAGE = os.path.join(os.path.dirname(HERE), "python", "convcore")
# The package's compiled modules (CMakeLists.txt's pybind11 module).
EXTENSIONS = ("_core",)


def modules(package_dir: str) -> Dict[str, str]:
    """{dotted name: path} of every .py file of the package; the package is
    its top-level name (convcore), a subpackage its dotted name."""
    root = os.path.basename(os.path.normpath(package_dir))
    found = {}
    for dirpath, dirnames, filenames in os.walk(package_dir):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__pycache__")))
        rel = os.path.relpath(dirpath, package_dir)
        parts = [root] + ([] if rel == "." else rel.split(os.sep))
        for name in sorted(filenames):
            if name.endswith(".py"):
                stem = name[:-3]
                dotted = ".".join(parts if stem == "__init__" else parts + [stem])
                found[dotted] = os.path.join(dirpath, name)
    # the compiled extension(s): nodes without source, whether built into
    # this tree or not (a clean clone has none: `from . import _core` must
    # not read as an import of the package itself)
    names = set(EXTENSIONS)
    names.update(n.split(".")[0] for n in os.listdir(package_dir) if n.endswith((".so", ".pyd")))
    for name in sorted(names):
        found.setdefault(f"{root}.{name}", "")
    return found


def _resolve(importer: str, is_package: bool, level: int, module: str) -> str:
    """The absolute name of a relative import `from <level dots><module>`."""
    if level == 0:
        return module
    base = importer.split(".")
    if not is_package:
        base = base[:-1]
    base = base[:len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def imports(name: str, path: str, known: Set[str]) -> List[Tuple[str, str]]:
    """[(imported module, "m" or "f")] of one module: the package's own
    modules only, each with where it stands (module level or in a function)."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    is_package = os.path.basename(path) == "__init__.py"
    found: List[Tuple[str, str]] = []

    def nearest(target: str) -> str:
        """target, or its nearest enclosing module we know (a.b.C -> a.b)."""
        while target and target not in known:
            target = target.rpartition(".")[0]
        return target

    def visit(node: ast.AST, where: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = "f" if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                              ast.Lambda)) else where
            if isinstance(child, ast.Import):
                for alias in child.names:
                    target = nearest(alias.name)
                    if target:
                        found.append((target, where))
            elif isinstance(child, ast.ImportFrom):
                base = _resolve(name, is_package, child.level, child.module or "")
                for alias in child.names:
                    sub = f"{base}.{alias.name}"
                    target = sub if sub in known else nearest(base)
                    if target:
                        found.append((target, where))
            visit(child, inner)

    visit(tree, "m")
    return [(t, w) for t, w in found if t != name]


def graph(package_dir: str) -> Dict[str, Dict[str, str]]:
    """{module: {imported: "m" or "f"}}; "m" wins when both occur."""
    mods = modules(package_dir)
    known = set(mods)
    edges: Dict[str, Dict[str, str]] = {m: {} for m in mods}
    for name, path in mods.items():
        if not path:
            continue
        for target, where in imports(name, path, known):
            if edges[name].get(target) != "m":
                edges[name][target] = where
    return edges


PYPROJECT = os.path.join(os.path.dirname(HERE), "pyproject.toml")


def declared_layers(pyproject: str = PYPROJECT) -> List[str]:
    """The layers of pyproject.toml's import-linter layers contract, top
    first, each as written ("convcore.builder : convcore.io : ...")."""
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        raise SystemExit("--layers reads pyproject.toml with tomllib: it needs Python 3.11+")
    with open(pyproject, "rb") as f:
        config = tomllib.load(f)
    contracts = config.get("tool", {}).get("importlinter", {}).get("contracts", [])
    for contract in contracts:
        if contract.get("type") == "layers":
            return [" ".join(layer.split()) for layer in contract["layers"]]
    raise SystemExit(f"{pyproject} has no import-linter layers contract")


def layer_of(module: str, layers: List[str]) -> str:
    """The declared layer that holds module (itself or a package above it is
    one of the layer's modules; the deepest such wins), else module itself."""
    best, depth = module, -1
    for layer in layers:
        for member in layer.replace("|", ":").split(":"):
            member = member.strip()
            if (module == member or module.startswith(member + ".")) and \
                    member.count(".") > depth:
                best, depth = layer, member.count(".")
    return best


def fold(edges: Dict[str, Dict[str, str]], layers: List[str]) -> Dict[str, Dict[str, str]]:
    """The graph of layers: an edge between two layers when some module of
    one imports a module of the other."""
    out: Dict[str, Dict[str, str]] = {}
    for src, targets in edges.items():
        a = layer_of(src, layers)
        out.setdefault(a, {})
        for dst, where in targets.items():
            b = layer_of(dst, layers)
            out.setdefault(b, {})
            if a != b and out[a].get(b) != "m":
                out[a][b] = where
    return out


def _kept(where: str, target: str, view: str, root: str) -> bool:
    """Whether an edge counts in a view: "all", "no-root" or "module"."""
    if view == "module":
        return where == "m"
    return view == "all" or target != root


def cycles(edges: Dict[str, Dict[str, str]], view: str = "all") -> List[List[str]]:
    """The strongly connected components of more than one node (Tarjan),
    over the edges of one view (see _kept)."""
    root = min(edges, key=len)
    succ = {n: sorted(t for t, w in e.items() if _kept(w, t, view, root))
            for n, e in edges.items()}
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    result: List[List[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in succ.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                result.append(sorted(component))

    sys.setrecursionlimit(max(10000, sys.getrecursionlimit()))
    for v in sorted(succ):
        if v not in index:
            strong(v)
    return sorted(result)


def report(edges: Dict[str, Dict[str, str]], show_edges: bool) -> List[str]:
    lines = []
    n_m = sum(w == "m" for e in edges.values() for w in e.values())
    n_f = sum(w == "f" for e in edges.values() for w in e.values())
    lines.append(f"{len(edges)} modules, {n_m + n_f} edges ({n_m} module-level, "
                 f"{n_f} only inside functions)")
    if show_edges:
        for src in sorted(edges):
            for dst in sorted(edges[src]):
                lines.append(f"  {src} -> {dst} [{edges[src][dst]}]")
    root = min(edges, key=len)
    for label, view in (("every import (module level and in functions)", "all"),
                        (f"every import except those of {root} itself", "no-root"),
                        ("module-level imports only", "module")):
        found = cycles(edges, view)
        lines.append(f"cycles, {label}: {len(found)}")
        for component in found:
            members = set(component)
            lines.append(f"  {{{', '.join(component)}}}")
            for src in component:
                for dst in sorted(edges[src]):
                    if dst in members and _kept(edges[src][dst], dst, view, root):
                        lines.append(f"    {src} -> {dst} [{edges[src][dst]}]")
    return lines


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--package", default=DEFAULT_PACKAGE, help="the package's directory")
    p.add_argument("--layers", action="store_true", help="fold modules into their layers")
    p.add_argument("--edges", action="store_true", help="list every edge")
    args = p.parse_args(argv)
    edges = graph(args.package)
    if args.layers:
        edges = fold(edges, declared_layers())
    print("\n".join(report(edges, args.edges)))


if __name__ == "__main__":
    main()
