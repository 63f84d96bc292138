"""Without the compiled library the API still works (reference path) and says why."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from op_helpers import cpu_and_cuda, requires_compiled_cpu

import fmnist_ext

PROBE = textwrap.dedent(
    """
    import json, warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import torch, fmnist_ext
        import fmnist_ext.op.fused_conv  # a second import must not warn again
        from fmnist_ext.op import reference
        torch.manual_seed(0)
        x = torch.randn(3, 6, 12, 12, requires_grad=True)
        block = fmnist_ext.FusedConvReLUMaxPool2d(6, 12, 5)
        y = block(x)
        g = torch.randn_like(y)
        grads = torch.autograd.grad(y, [x, block.weight, block.bias], g)
        y_ref = reference.conv_relu_maxpool2d(x, block.weight, block.bias, (0, 0), 2)
        grads_ref = torch.autograd.grad(y_ref, [x, block.weight, block.bias], g)
        ok = torch.allclose(y, y_ref) and all(torch.allclose(a, b) for a, b in zip(grads, grads_ref))
    fallback = [str(w.message) for w in caught if w.category.__name__ == "ReferenceFallbackWarning"]
    print(json.dumps({"ok": ok, "warnings": fallback, "status": fmnist_ext.kernels_status()}))
    """
)


def run_probe(env_extra=None, pythonpath=None):
    env = dict(os.environ)
    env.pop("FMNIST_REQUIRE_COMPILED", None)
    env.update(env_extra or {})
    if pythonpath:
        env["PYTHONPATH"] = str(pythonpath)
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300, cwd=pythonpath or None
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_disabled_extension_runs_reference_and_warns_once():
    result = run_probe({"FMNIST_DISABLE_EXTENSION": "1"})
    assert result["ok"]
    assert len(result["warnings"]) == 1
    assert "FMNIST_DISABLE_EXTENSION" in result["warnings"][0]
    assert "pip install --no-build-isolation" in result["warnings"][0]
    assert result["status"]["cpu"] == "reference"


def _copy_package(tmp_path: Path) -> Path:
    src = Path(fmnist_ext.__file__).parent
    dst = tmp_path / "fmnist_ext"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def test_missing_library_is_reported(tmp_path):
    pkg = _copy_package(tmp_path)
    (pkg / "op" / "_C.so").unlink(missing_ok=True)
    result = run_probe(pythonpath=tmp_path)
    assert result["ok"]
    assert len(result["warnings"]) == 1 and "is not installed" in result["warnings"][0]


def _edit_build_record(tmp_path, old: str, new: str) -> None:
    pkg = _copy_package(tmp_path)
    info = pkg / "op" / "_build_info.py"
    text = info.read_text()
    assert old in text
    info.write_text(text.replace(old, new))


@requires_compiled_cpu
def test_torch_older_than_the_build_minimum_is_one_clear_sentence(tmp_path):
    # The stable ABI: a build loads into its minimum torch and every later one;
    # an older torch is the one version mismatch left.
    minimum = fmnist_ext.kernels_status()["minimum_torch"]
    _edit_build_record(tmp_path, f'TORCH_MIN_VERSION = "{minimum}"', 'TORCH_MIN_VERSION = "99.0"')
    result = run_probe(pythonpath=tmp_path)
    assert result["ok"]
    (message,) = result["warnings"]
    assert "it needs torch >= 99.0 (the oldest torch whose stable ABI it was built for) but torch" in message
    assert result["status"]["minimum_torch"] == "99.0"
    assert result["status"]["cpu"] == "reference"


@requires_compiled_cpu
def test_a_build_against_other_torch_headers_loads(tmp_path):
    # Which torch's headers built the library does not matter (only the minimum does).
    built = fmnist_ext.kernels_status()["built_against_torch"]
    _edit_build_record(tmp_path, f'TORCH_VERSION = "{built}"', 'TORCH_VERSION = "1.0.0+other"')
    result = run_probe(pythonpath=tmp_path)
    # (the probe's "ok" compares with the reference exactly: meant for the fallback)
    assert result["warnings"] == []
    assert result["status"]["built_against_torch"] == "1.0.0+other"
    assert result["status"]["cpu"] == "compiled"


class _Record:
    def __init__(self, minimum="2.11", cuda="", with_cuda=False):
        self.TORCH_VERSION, self.TORCH_MIN_VERSION = "2.11.0+cu130", minimum
        self.TORCH_CUDA_VERSION, self.WITH_CUDA = cuda, with_cuda


@pytest.mark.parametrize(
    "record, torch_version, torch_cuda, words",
    [
        (_Record(), "2.11.0+cpu", None, None),
        (_Record(), "2.15.0+cu132", "13.2", None),
        (_Record(), "3.0.0", None, None),
        (_Record(), "2.10.1", None, "needs torch >= 2.11"),
        (_Record(minimum="2.13"), "2.12.1+cu130", "13.0", "needs torch >= 2.13"),
        (_Record(cuda="13.0", with_cuda=True), "2.15.0+cu132", "13.2", None),
        (_Record(cuda="13.0", with_cuda=True), "2.13.0+cpu", None, "has no CUDA"),
        (_Record(cuda="13.0", with_cuda=True), "2.14.1+cu126", "12.6", "uses CUDA 12.6, another major version"),
        (_Record(cuda="13.0", with_cuda=False), "2.13.0+cpu", None, None),  # CUDA torch, CPU-only build
    ],
)
def test_load_mismatch_contract(record, torch_version, torch_cuda, words):
    from fmnist_ext.op import _library

    reason = _library.load_mismatch(record, torch_version, torch_cuda)
    if words is None:
        assert reason is None
    else:
        assert reason is not None and words in reason


@requires_compiled_cpu
def test_broken_library_is_reported(tmp_path):
    pkg = _copy_package(tmp_path)
    (pkg / "op" / "_C.so").write_bytes(b"not a shared library")
    result = run_probe(pythonpath=tmp_path)
    assert result["ok"]
    (message,) = result["warnings"]
    assert "is not an ELF shared library (20 bytes)" in message  # checked before dlopen


@requires_compiled_cpu
def test_info_command_reports_compiled_cpu_kernels():
    out = subprocess.run([sys.executable, "-m", "fmnist_ext.info"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "cpu kernels:   compiled" in out.stdout
    assert "running:       torch" in out.stdout
    js = subprocess.run(
        [sys.executable, "-m", "fmnist_ext.info", "--json"], capture_output=True, text=True, timeout=120
    )
    status = json.loads(js.stdout)
    assert status["cpu"] == "compiled"
    # One build for every torch from its minimum on (the stable ABI).
    minimum = tuple(int(p) for p in status["minimum_torch"].split("."))
    assert tuple(int(p) for p in status["running_torch"].split("+")[0].split(".")[:2]) >= minimum
    assert "built against: torch" in out.stdout and "(stable ABI)" in out.stdout


@requires_compiled_cpu
def test_source_checkout_uses_the_installed_library():
    # `python -m fmnist_ext.train` run in the repository imports the source
    # folder (no _C.so there); it must still get the installed kernels.
    repo = Path(__file__).resolve().parents[2]
    assert (repo / "pyproject.toml").exists() and (repo / "fmnist_ext").is_dir()
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    out = subprocess.run(
        [sys.executable, "-c", "import json, fmnist_ext; print(json.dumps(fmnist_ext.kernels_status()))"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1])["cpu"] == "compiled"


MODES_PROBE = textwrap.dedent(
    """
    import json, sys, torch, fmnist_ext
    import torch.autograd.forward_ad as fwAD
    device = sys.argv[1]
    torch.manual_seed(0)
    x = torch.randn(2, 2, 8, 8, dtype=torch.float64).to(device)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64).to(device)
    b = torch.randn(3, dtype=torch.float64).to(device)
    f = lambda x, w, b: fmnist_ext.conv_relu_maxpool2d(x, w, b, 1, 2)
    with fwAD.dual_level():
        t = fwAD.unpack_dual(f(fwAD.make_dual(x, torch.ones_like(x)), w, b)).tangent
    leaves = [v.clone().requires_grad_() for v in (x, w, b)]
    grads = torch.autograd.grad(f(*leaves).square().sum(), leaves, create_graph=True)
    second = torch.autograd.grad(sum(g.square().sum() for g in grads), leaves)
    with torch.autocast(device, dtype=torch.bfloat16):
        y = f(x.float(), w.float(), b.float())
    print(json.dumps({"kernels": fmnist_ext.kernels_status()[device], "tangent": float(t.abs().sum()),
                      "second": [float(s.abs().sum()) for s in second], "autocast": str(y.dtype)}))
    """
)


def _modes(device, env_extra):
    env = dict(os.environ)
    env.pop("FMNIST_REQUIRE_COMPILED", None)
    env.update(env_extra)
    out = subprocess.run(
        [sys.executable, "-c", MODES_PROBE, device], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_reference_fallback_supports_the_same_autodiff_modes_as_the_kernels(device):
    # Forward AD, double backward and autocast give the same answers whether
    # the compiled kernels or the reference run.
    compiled = _modes(device, {})
    reference = _modes(device, {"FMNIST_DISABLE_EXTENSION": "1"})
    assert compiled["kernels"] == "compiled" and reference["kernels"] == "reference"
    assert compiled["tangent"] > 0 and all(s > 0 for s in compiled["second"])
    assert abs(compiled["tangent"] - reference["tangent"]) < 1e-9 * reference["tangent"]
    for a, e in zip(compiled["second"], reference["second"]):
        assert abs(a - e) < 1e-9 * e
    assert compiled["autocast"] == reference["autocast"] == "torch.bfloat16"
