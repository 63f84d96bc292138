"""Private torch APIs (names with a leading underscore under torch) live in
one module, fmnist_ext/op/_torch_internals.py, each with the reason no public
API serves; a new one anywhere else in the package fails here, so a torch
release can break only that file."""

import ast
from pathlib import Path

import fmnist_ext

PACKAGE = Path(fmnist_ext.__file__).parent
ALLOWED = PACKAGE / "op" / "_torch_internals.py"
# Names a module binds to torch or one of its submodules, in this package's style.
TORCH_ALIASES = {"torch", "nn", "F", "fwAD"}


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _dotted(node: ast.AST) -> list[str] | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return [node.id, *reversed(parts)]
    return None


def private_torch_uses(path: Path) -> list[str]:
    where = path.relative_to(PACKAGE.parent) if path.is_relative_to(PACKAGE.parent) else path.name
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name.split(".") for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            mod = node.module.split(".")
            names = [mod, *([*mod, a.name] for a in node.names)]
        elif isinstance(node, ast.Attribute) and (chain := _dotted(node)):
            names = [chain]
        for chain in names:
            if chain[:2] == ["torch", "ops"]:
                continue  # an op's own name (fmnist_ext's private ops), not torch's API
            if chain[0] in TORCH_ALIASES and any(_is_private(p) for p in chain[1:]):
                found.append(f"{where}:{node.lineno}: {'.'.join(chain)}")
    return found


def test_private_torch_apis_only_in_the_internals_module():
    files = [f for f in sorted(PACKAGE.rglob("*.py")) if f != ALLOWED]
    assert len(files) > 30, files  # the test looks where the package is
    found = sorted({line for f in files for line in private_torch_uses(f)})
    assert not found, "private torch API outside op/_torch_internals.py:\n" + "\n".join(found)
    assert private_torch_uses(ALLOWED), "the internals module should hold the private uses"


def test_the_check_sees_each_kind_of_private_use(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import torch._dynamo\n"
        "from torch._functorch.utils import x\n"
        "from torch.autograd.function import _SingleLevelFunction\n"
        "torch._C._is_fwd_grad_enabled()\n"
        "nn.init._calculate_fan_in_and_fan_out(w)\n"
        "fwAD._current_level\n"
        "ok = torch.__version__, torch.compiler.reset(), torch.ops.fmnist_ext._backward\n"
    )
    lines = {line.split(": ", 1)[1] for line in private_torch_uses(bad)}
    assert {
        "torch._dynamo",
        "torch._functorch.utils",
        "torch.autograd.function._SingleLevelFunction",
        "torch._C._is_fwd_grad_enabled",
        "nn.init._calculate_fan_in_and_fan_out",
        "fwAD._current_level",
    } <= lines, lines
    assert not any("__version__" in x or "compiler" in x or "ops" in x for x in lines), lines
