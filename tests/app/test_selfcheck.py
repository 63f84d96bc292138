"""`info --check` and the training pre-check (fmnist_ext/selfcheck.py).

There is no GPU here, so the device is a parameter of the check: the refusal
paths are exercised on the CPU with a deliberately wrong operator in place of
the fused one.
"""

import argparse
import os
import subprocess
import sys

import pytest
import torch
from op_helpers import requires_compiled_cpu

from fmnist_ext import info, selfcheck
from fmnist_ext.op import reference


def wrong_output(x, w, b, padding, pool):
    """Right everywhere except one output element per 1000 (like a kernel
    with a bad edge case)."""
    y = reference.conv_relu_maxpool2d(x, w, b, padding, pool)
    bump = torch.zeros_like(y)
    bump.view(-1)[::1000] = 0.5
    return y + bump


class _ReferenceBlock(torch.autograd.Function):
    """The reference forward and backward; subclasses change the grad_weight
    the backward returns (tweak), as a broken kernel would."""

    @staticmethod
    def forward(ctx, x, w, b, padding, pool):
        ctx.save_for_backward(x, w, b)
        ctx.padding, ctx.pool = padding, pool
        return reference.conv_relu_maxpool2d(x, w, b, padding, pool)

    @classmethod
    def backward(cls, ctx, g):
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in ctx.saved_tensors]
            y = reference.conv_relu_maxpool2d(*leaves, ctx.padding, ctx.pool)
            gx, gw, gb = torch.autograd.grad(y, leaves, g)
        return gx if ctx.needs_input_grad[0] else None, cls.tweak(gw), gb, None, None


class _WrongWeightGrad(_ReferenceBlock):
    """grad_weight off by 0.1% (like a kernel that drops a term of its reduction)."""

    @staticmethod
    def tweak(gw):
        return gw * 1.001


def wrong_weight_grad(x, w, b, padding, pool):
    return _WrongWeightGrad.apply(x, w, b, padding, pool)


SMALL_CASES = 4  # FULL_CASES[SMALL_CASES:] are the small ones (quicker)


def test_training_form_passes_on_cpu():
    report = selfcheck.check_device("cpu", quick=True, batch_size=64)
    assert report.ok, report.summary()
    assert report.cases == len(selfcheck.training_cases(64)) == 4
    assert set(report.worst) == {torch.float32}
    assert report.summary().startswith("cpu (") and "): OK," in report.summary()
    assert "backward repeats bit for bit: yes" in report.summary()


def test_training_form_runs_training_batch_masks_and_multichunk_plans(monkeypatch):
    """The blocks at the training batch size with training's output masks, and
    at the multi-chunk size under the SM-count override, which is set only
    around the fused op's calls there."""
    cases = selfcheck.training_cases(500)
    assert [(c.n, c.cin, c.grad_input, c.sms) for c in cases] == [
        (500, 1, False, None),
        (500, 6, True, None),
        (selfcheck.MULTI_CHUNK_BATCH, 1, False, selfcheck.MULTI_CHUNK_SMS),
        (selfcheck.MULTI_CHUNK_BATCH, 6, True, selfcheck.MULTI_CHUNK_SMS),
    ]
    assert selfcheck.FULL_CASES[:SMALL_CASES] == selfcheck.training_cases(1000)
    seen = []

    def spy(x, w, b, padding, pool):
        seen.append((x.shape[0], x.requires_grad, os.environ.get("FMNIST_CUDA_SM_COUNT")))
        return reference.conv_relu_maxpool2d(x, w, b, padding, pool)

    monkeypatch.delenv("FMNIST_CUDA_SM_COUNT", raising=False)
    monkeypatch.setattr(selfcheck, "training_cases", lambda n: cases)
    report = selfcheck.check_device("cpu", quick=True, op=spy)
    assert report.ok, report.summary()
    assert seen == [
        (500, False, None),
        (500, True, None),
        (1001, False, str(selfcheck.MULTI_CHUNK_SMS)),
        (1001, True, str(selfcheck.MULTI_CHUNK_SMS)),
    ]
    assert "FMNIST_CUDA_SM_COUNT" not in os.environ


def test_battery_data_make_float32_exact():
    # The premise of the tolerances: on these data float32 reproduces the
    # float64 stock result exactly (no near-ties that round differently).
    case = selfcheck.FULL_CASES[1]
    x, w, b, g = selfcheck.case_tensors(case, seed=1234)
    want, _ = selfcheck._forward_and_grads(selfcheck._stock, x, w, b, g, (0, 0), 2)
    got, _ = selfcheck._forward_and_grads(selfcheck._stock, x.float(), w.float(), b.float(), g.float(), (0, 0), 2)
    for a, e in zip(got, want):
        assert torch.equal(a.double(), e)


class _Unrepeatable(_ReferenceBlock):
    """Each backward's grad_weight differs in its last bit from the one
    before (like a reduction with atomics)."""

    calls = 0

    @staticmethod
    def tweak(gw):
        _Unrepeatable.calls += 1
        return torch.nextafter(gw, torch.full_like(gw, float("inf"))) if _Unrepeatable.calls % 2 == 0 else gw


def test_a_backward_that_does_not_repeat_bitwise_is_refused(monkeypatch, capsys):
    monkeypatch.setattr(selfcheck, "_fused", lambda *a: _Unrepeatable.apply(*a))
    parser = argparse.ArgumentParser(prog="python -m fmnist_ext.train")
    with pytest.raises(SystemExit) as stop:
        selfcheck.precheck_training(parser, "fused", torch.device("cpu"), batch_size=8, check_types=("cpu",))
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "grad_weight: a second backward differs" in err and "bit for bit" in err and err.count("\n") == 1


def test_an_asynchronous_device_fault_is_the_clean_refusal(monkeypatch, capsys):
    """A fault raised at the synchronisation after the fused launches (how a
    CUDA kernel's illegal address surfaces) is the one-line refusal, not a
    traceback."""

    calls = []

    def fault(device):  # the first synchronisation follows the reference, the second the fused op
        calls.append(device)
        if len(calls) == 2:
            raise RuntimeError("CUDA error: an illegal memory access was encountered\nCUDA kernel errors might be ...")

    monkeypatch.setattr(selfcheck, "_synchronize", fault)
    parser = argparse.ArgumentParser(prog="python -m fmnist_ext.train")
    with pytest.raises(SystemExit) as stop:
        selfcheck.precheck_training(parser, "fused", torch.device("cpu"), batch_size=8, check_types=("cpu",))
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "they fail: block1-b8 torch.float32: RuntimeError: CUDA error: an illegal memory access" in err


@pytest.mark.parametrize("op,tensor", [(wrong_output, "output"), (wrong_weight_grad, "grad_weight")])
def test_info_check_fails_naming_the_device_and_tensor(monkeypatch, capsys, op, tensor):
    monkeypatch.setattr(selfcheck, "FULL_CASES", selfcheck.FULL_CASES[SMALL_CASES:])
    monkeypatch.setattr(selfcheck, "_fused", op)
    assert info.main(["--check"]) == 1
    out = capsys.readouterr().out
    assert "cpu (compiled kernels): MISMATCH" in out or "cpu (reference, not compiled): MISMATCH" in out
    assert tensor in out
    assert "check FAILED on cpu" in out and "--kernels stock" in out


def test_info_check_reports_an_op_that_raises(monkeypatch, capsys):
    def broken(*args):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(selfcheck, "_fused", broken)
    assert info.main(["--check"]) == 1
    assert "): FAILED (block1-b1000 torch.float32: RuntimeError: CUDA error" in capsys.readouterr().out


@requires_compiled_cpu
def test_info_check_passes(capsys):
    assert info.main(["--check"]) == 0
    out = capsys.readouterr().out
    assert f"cpu (compiled kernels): OK, {2 * len(selfcheck.FULL_CASES)} cases" in out and "check passed" in out
    assert "float32 0.0e+00" in out  # the exact data: float32 reproduces float64 exactly


def test_training_precheck_refuses_wrong_kernels(monkeypatch, capsys):
    parser = argparse.ArgumentParser(prog="python -m fmnist_ext.train")
    # The real hook checks CUDA devices only; check_types makes it judge the CPU.
    selfcheck.precheck_training(parser, "fused", torch.device("cpu"), check_types=("cpu",))  # right kernels: no-op
    monkeypatch.setattr(selfcheck, "_fused", wrong_weight_grad)
    with pytest.raises(SystemExit) as stop:
        selfcheck.precheck_training(parser, "fused", torch.device("cpu"), check_types=("cpu",))
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(
        "python -m fmnist_ext.train: error: the fused kernels disagree with the stock sequence on cpu"
    )
    assert "--kernels stock" in err and err.count("\n") <= 2
    # Stock kernels never run the check, nor do CPU devices by default.
    selfcheck.precheck_training(parser, "stock", torch.device("cpu"), check_types=("cpu",))
    selfcheck.precheck_training(parser, "fused", torch.device("cpu"))


def test_check_and_json_together_are_refused(capsys):
    with pytest.raises(SystemExit) as stop:
        info.main(["--check", "--json"])
    assert stop.value.code == 2 and "--check: not allowed with --json" in capsys.readouterr().err


def _run(module, *args, **env):
    full_env = {**os.environ, **env}
    full_env.pop("FMNIST_REQUIRE_COMPILED", None)
    return subprocess.run(
        [sys.executable, "-m", module, *args], env=full_env, capture_output=True, text=True, timeout=300
    )


@requires_compiled_cpu
@pytest.mark.parametrize("value,fragment", [("sse9", "must be one of default, avx2, avx512"), ("AVX2", "got 'AVX2'")])
def test_bad_cpu_isa_variable_is_one_line_for_info_and_train(tmp_path, value, fragment):
    ckpt = tmp_path / "none.pt"  # never read: the variable is refused first
    commands = (
        ("fmnist_ext.info", ()),
        ("fmnist_ext.train", ("--device", "cpu", "--out", str(tmp_path / "run"))),
        ("fmnist_ext.evaluate", (str(ckpt),)),
        ("fmnist_ext.predict", (str(ckpt), "x.png")),
        ("fmnist_ext.benchmark", ("--quick",)),
    )
    for module, args in commands:
        out = _run(module, *args, FMNIST_CPU_ISA=value)
        assert out.returncode == 2, out.stderr
        assert "Traceback" not in out.stderr
        assert "FMNIST_CPU_ISA" in out.stderr and fragment in out.stderr
        assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv", [["--json"], []])
def test_info_into_a_closed_pipe_ends_quietly(argv):
    # `python -m fmnist_ext.info --json | true` ended in a BrokenPipeError traceback
    from cli_helpers import assert_quiet, closed_pipe_run

    rc, err = closed_pipe_run(["-m", "fmnist_ext.info", *argv])
    assert rc == 141, err
    assert_quiet(err)
