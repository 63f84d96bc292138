"""The operator library (fmnist_ext/op/) never imports the application
around it, so it can be read, tested and reused on its own."""

import ast
from pathlib import Path

import fmnist_ext.op

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
                # `from .. import __version__` (the one version string) is the
                # only thing the op layer takes from the package root.
                names = [a.name for a in node.names]
                if node.level == 2 and not node.module and names == ["__version__"]:
                    continue
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
