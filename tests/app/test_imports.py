"""How the package's modules import each other: the operator library
(fmnist_ext/op/) never imports the application around it, so it can be read,
tested and reused on its own; no import cycle anywhere in fmnist_ext (lazy
imports inside functions included); a package root small enough to read, and
no two modules with the same file name."""

import ast
from collections import Counter
from pathlib import Path

import fmnist_ext.op

PACKAGE_DIR = Path(fmnist_ext.__file__).parent
OP_DIR = Path(fmnist_ext.op.__file__).parent


def _imports_outside_op(path: Path) -> list[str]:
    bad = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0:
                target = node.module or ""
            elif node.level == 1:
                continue  # a sibling in fmnist_ext.op
            else:
                names = [a.name for a in node.names]
                target = "." * node.level + (node.module or "") + f" import {', '.join(names)}"
        elif isinstance(node, ast.Import):
            target = ",".join(a.name for a in node.names)
        else:
            continue
        for name in target.split(","):
            if name.startswith(".") or (name.split(".")[0] == "fmnist_ext" and not name.startswith("fmnist_ext.op")):
                bad.append(f"{path.name}:{node.lineno}: {name}")
    return bad


def test_op_layer_imports_nothing_from_the_app():
    files = sorted(OP_DIR.glob("*.py"))
    assert len(files) >= 8, files  # the test looks where the op layer is
    bad = [line for f in files for line in _imports_outside_op(f)]
    assert not bad, "the op layer imports the app:\n" + "\n".join(bad)


def test_the_check_sees_a_bad_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from .. import checkpoint\nimport fmnist_ext.train\nfrom fmnist_ext import data\n")
    assert len(_imports_outside_op(bad)) == 3


def test_public_api_is_the_op_the_module_and_the_kernels_status():
    import fmnist_ext

    assert (
        sorted(fmnist_ext.__all__)
        == sorted(fmnist_ext.op.__all__)
        == [
            "FusedConvReLUMaxPool2d",
            "ReferenceFallbackWarning",
            "conv_relu_maxpool2d",
            "kernels_status",
            "uses_compiled_kernels",
        ]
    )
    for name in fmnist_ext.__all__:
        assert getattr(fmnist_ext, name) is getattr(fmnist_ext.op, name)


# --------------------------------------------------------------------------- cycles


def _module_name(root: Path, path: Path) -> str:
    parts = [root.name, *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _import_nodes(tree):
    """Every import statement, lazy ones in functions too, but not `if TYPE_CHECKING:` blocks."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if _is_type_checking(node):
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def import_graph(root: Path) -> dict[str, set[str]]:
    """module -> the package's modules it imports. Importing a.b.c runs a, a.b and
    a.b.c, so the parents count too, except the importer's own packages (already
    being imported when it runs)."""
    files = {_module_name(root, f): f for f in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        is_pkg = path.name == "__init__.py"
        here = mod.split(".") if is_pkg else mod.split(".")[:-1]
        own = {".".join(mod.split(".")[:i]) for i in range(1, len(mod.split(".")))}
        targets = set()
        for node in _import_nodes(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    base = ".".join(here[: len(here) - node.level + 1] + ([base] if base else []))
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            for name in names:
                parts = name.split(".")
                for i in range(1, len(parts) + 1):
                    t = ".".join(parts[:i])
                    if t in files and t != mod and (t not in own or i == len(parts)):
                        targets.add(t)
        graph[mod] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, on, stack, out = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_in_the_package():
    graph = import_graph(PACKAGE_DIR)
    assert len(graph) >= 40 and "fmnist_ext.train.state" in graph, sorted(graph)  # it read the package
    assert "fmnist_ext.checkpoint" in graph["fmnist_ext.train.state"]
    assert not cycles(graph), cycles(graph)


def test_the_cycle_check_sees_a_lazy_cycle(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from .sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("from .. import a\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import a\n")
    assert cycles(import_graph(pkg)) == [["pkg.a", "pkg.sub.b"]]


def test_package_root_is_small_and_file_names_are_unique():
    root = sorted(p.name for p in PACKAGE_DIR.glob("*.py"))
    assert len(root) <= 14, root
    names = Counter(p.name for p in PACKAGE_DIR.rglob("*.py") if p.name not in ("__init__.py", "__main__.py"))
    assert [n for n, k in names.items() if k > 1] == [], names
