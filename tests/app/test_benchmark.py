"""Smoke tests of the benchmark script (python/benchmark.py, fmnist_ext.benchmark).
One file for the one command: its flags, outputs, refusals and gate (over
400 lines for that reason; the whole-model section is test_bench_model.py).

They check that a --quick run produces the markdown, JSON and PNG with the
documented structure, and that the correctness gate refuses an implementation
that does not match stock (no timing of these is asserted: the figures come
from a tiny, noisy run).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fmnist_ext.benchmark import blocks, cli, compile_cache, gate, impls, render, rows, runner, timing

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "python" / "benchmark.py"


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


# --- the whole script --------------------------------------------------------


def test_quick_run_writes_markdown_json_png(tmp_path):
    out_json, out_png, out_md = tmp_path / "b.json", tmp_path / "b.png", tmp_path / "b.md"
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--quick",
            "--threads",
            "1",
            "--json",
            str(out_json),
            "--png",
            str(out_png),
            "--markdown",
            str(out_md),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]

    report = json.loads(out_json.read_text())
    assert report["schema"] == runner.SCHEMA
    cfg = report["config"]
    assert cfg["quick"] is True and cfg["device"] == "cpu" and cfg["threads"] == 1
    assert cfg["batch_sizes"] == [1, 64] and cfg["blocks"] == [1, 2]
    assert set(cfg["impls"]) == {"fused", "stock"}

    m = report["machine"]
    for key in ("date", "cpu_model", "cpu_count", "torch", "kernels_status", "git", "env", "loadavg_at_start"):
        assert key in m, key
    assert m["torch"] == torch.__version__
    if os.environ.get("FMNIST_REQUIRE_COMPILED", "") not in ("", "0"):
        assert m["fused_uses_compiled_kernels"] is True
    assert "cpu_isa" in m["kernels_status"]

    peaks = report["peaks"]
    assert peaks["sgemm"]["gflops"] > 0 and peaks["sgemm"]["median_s"] > 0
    assert peaks["copy"]["gbps"] > 0 and peaks["copy"]["bytes"] > 0

    rows = report["rows"]
    keys = {(r["block"], r["batch"], r["pass"], r["impl"]) for r in rows}
    expected = {(b, n, p, i) for b in (1, 2) for n in (1, 64) for p in blocks.PASSES for i in ("fused", "stock")}
    assert keys == expected
    for r in rows:
        assert r["status"] == "ok", r
        assert r["check"]["ok"] is True
        assert r["median_s"] > 0 and r["n_measurements"] >= timing.ROUNDS
        assert r["flops"] == blocks.BLOCKS[r["block"]].flops(r["batch"], r["pass"])
        assert r["gflops"] == pytest.approx(r["flops"] / r["median_s"] / 1e9)
        assert r["gbps"] == pytest.approx(r["bytes"] / r["median_s"] / 1e9)
        assert r["frac_peak_flops"] == pytest.approx(r["gflops"] / peaks["sgemm"]["gflops"])
        assert r["frac_peak_bw"] == pytest.approx(r["gbps"] / peaks["copy"]["gbps"])
        if r["impl"] == "stock":
            assert r["speedup_vs_stock"] == 1.0
        else:
            stock = next(
                s
                for s in rows
                if s["impl"] == "stock" and (s["block"], s["batch"], s["pass"]) == (r["block"], r["batch"], r["pass"])
            )
            assert r["speedup_vs_stock"] == pytest.approx(stock["median_s"] / r["median_s"])

    # the whole model: the whole-model section's quick form (training step and epoch, one process each)
    assert report["whole_model"]["config"]["device"] == "cpu" and report["whole_model"]["config"]["gpu"] is None
    assert cfg["whole_model"].startswith("python -m fmnist_ext.benchmark.model --device cpu --quick")
    train = report["whole_model"]["allocators"]["default"]["train"]
    assert set(train) == {"fused", "stock"}
    assert train["fused"]["status"] == "ok", train["fused"]
    for impl in ("fused", "stock"):
        assert train[impl]["step"]["median_s"] > 0
        assert train[impl]["epoch"]["median_s"] > 0
    assert train["fused"]["step_vs_stock"] > 0
    if os.environ.get("FMNIST_REQUIRE_COMPILED", "") not in ("", "0"):
        assert train["fused"]["fused_compiled"] is True

    md = out_md.read_text()
    assert md == proc.stdout
    assert "| batch | pass | impl | median ms | vs stock |" in md
    assert "## Whole model" in md and "\nDevice: cpu.\n" in md and "REFUSED" not in md
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- the correctness gate ------------------------------------------------------


class _WrongWeightGrad(torch.autograd.Function):
    """The stock forward, with a weight gradient 1% off."""

    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w, b)
        return impls.stock_block(x, w, b)

    @staticmethod
    def backward(ctx, g):
        x, w, b = ctx.saved_tensors
        with torch.enable_grad():
            xx, ww, bb = (t.detach().requires_grad_(True) for t in (x, w, b))
            gx, gw, gb = torch.autograd.grad(impls.stock_block(xx, ww, bb), (xx, ww, bb), g)
        return gx, gw * 1.01, gb


def _wrong_output(x, w, b):
    return impls.stock_block(x, w, b) * 1.001


def _raises(x, w, b):
    raise RuntimeError("kernel exploded")


@pytest.mark.parametrize("block", [1, 2])
@pytest.mark.parametrize("pass_name", blocks.PASSES)
def test_gate_accepts_the_real_implementations(block, pass_name):
    inp = impls.make_inputs(blocks.BLOCKS[block], 3, torch.device("cpu"))
    for name, fn in impls.base_impls().items():
        res = gate.check_implementation(fn, inp, pass_name)
        assert res.ok, (name, res.reason)
        assert set(res.max_rel_err) == set(impls.RESULT_NAMES[pass_name])


def test_block2_inputs_make_every_convolution_sum_exact_in_float32():
    # So float32 fused and stock pick the float64 yardstick's pool winners
    # even at batch 1000 (unrounded inputs had near-ties there, and the gate
    # refused the fused backward for an equally right winner).
    inp = impls.make_inputs(blocks.BLOCKS[2], 1000, torch.device("cpu"))
    conv32 = torch.nn.functional.conv2d(inp.x, inp.w, inp.b)
    conv64 = torch.nn.functional.conv2d(inp.x.double(), inp.w.double(), inp.b.double())
    assert torch.equal(conv32.double(), conv64)
    assert 0.9 < inp.x.std().item() < 1.1  # still standard-normal activations


def test_gate_refuses_a_wrong_output():
    inp = impls.make_inputs(blocks.BLOCKS[1], 4, torch.device("cpu"))
    res = gate.check_implementation(_wrong_output, inp, "fwd")
    assert not res.ok and res.reason.startswith("output differs from stock")


def test_gate_refuses_a_wrong_gradient_but_not_its_forward():
    inp = impls.make_inputs(blocks.BLOCKS[2], 4, torch.device("cpu"))
    assert gate.check_implementation(_WrongWeightGrad.apply, inp, "fwd").ok
    for pass_name in ("fwd+bwd", "fwd+bwd+dx"):
        res = gate.check_implementation(_WrongWeightGrad.apply, inp, pass_name)
        assert not res.ok and res.reason.startswith("grad_weight differs from stock"), res.reason


def test_gate_refuses_an_implementation_that_raises():
    inp = impls.make_inputs(blocks.BLOCKS[1], 2, torch.device("cpu"))
    res = gate.check_implementation(_raises, inp, "fwd")
    assert not res.ok and "RuntimeError: kernel exploded" in res.reason


def test_gate_refuses_a_wrong_shape():
    inp = impls.make_inputs(blocks.BLOCKS[1], 2, torch.device("cpu"))
    res = gate.check_implementation(lambda x, w, b: torch.relu(torch.conv2d(x, w, b)), inp, "fwd")
    assert not res.ok and "shape" in res.reason


def test_refused_implementation_gets_no_speed(monkeypatch, restore_threads):
    """End to end: a broken 'fused' is checked, refused, not timed, and shown as REFUSED."""
    real = impls.base_impls()
    monkeypatch.setattr(impls, "base_impls", lambda: {**real, "fused": _wrong_output})
    args = cli.build_parser().parse_args(
        ["--quick", "--no-model", "--threads", "1", "--blocks", "1", "--batch-sizes", "2", "--min-run-time", "0.01"]
    )
    report = runner.run(args, log=lambda msg: None)
    fused = [r for r in report["rows"] if r["impl"] == "fused"]
    assert len(fused) == len(blocks.PASSES)
    for r in fused:
        assert r["status"] == "refused" and "output differs from the float64 reference" in r["reason"]
        assert "median_s" not in r and "speedup_vs_stock" not in r
    others = [r for r in report["rows"] if r["impl"] != "fused"]
    assert others and all(r["status"] == "ok" and r["median_s"] > 0 for r in others)
    md = render.render_markdown(report)
    assert md.count("| fused | REFUSED: output differs from the float64 reference") == len(blocks.PASSES)
    json.dumps(report, allow_nan=False)  # still serialisable


def test_compile_failure_is_skipped_with_its_reason(monkeypatch):
    def broken_compile(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", broken_compile)
    state = compile_cache.CompileState()
    recs = rows.bench_row(
        blocks.BLOCKS[2],
        2,
        "fwd",
        {"stock": impls.stock_block, "compile": None},
        torch.device("cpu"),
        1,
        0.01,
        None,
        state,
    )
    comp = next(r for r in recs if r["impl"] == "compile")
    assert comp["status"] == "skipped" and "RuntimeError: no compiler here" in comp["reason"]
    assert "median_s" not in comp
    # later rows are skipped with the same reason, without trying again
    recs = rows.bench_row(
        blocks.BLOCKS[2],
        2,
        "fwd+bwd",
        {"stock": impls.stock_block, "compile": None},
        torch.device("cpu"),
        1,
        0.01,
        None,
        state,
    )
    assert next(r for r in recs if r["impl"] == "compile")["status"] == "skipped"


# --- the cost model ------------------------------------------------------------


def test_flop_and_byte_conventions():
    b1, b2 = blocks.BLOCKS[1], blocks.BLOCKS[2]
    # 2*Cout*Hconv*Wconv*Cin*k*k per image: the 173 M and 230 M at batch 1000
    assert b1.flops(1000, "fwd") == 2 * 6 * 24 * 24 * 1 * 25 * 1000 == 172_800_000
    assert b2.flops(1000, "fwd") == 2 * 12 * 8 * 8 * 6 * 25 * 1000 == 230_400_000
    assert b1.flops(10, "fwd+bwd") == 2 * b1.flops(10, "fwd")
    assert b1.flops(10, "fwd+bwd+dx") == 3 * b1.flops(10, "fwd")
    # forward: read x, w, b; write pooled y (float32)
    assert b1.bytes_moved(1, "fwd") == 4 * (784 + 150 + 6 + 6 * 12 * 12)
    x, w, b, y = 784, 150, 6, 864
    assert b1.bytes_moved(1, "fwd+bwd") == 4 * ((x + w + b + y) + (y + x + w + w + b))
    assert b1.bytes_moved(1, "fwd+bwd+dx") == b1.bytes_moved(1, "fwd+bwd") + 4 * x


def test_cli_rejects_bad_values():
    parser = cli.build_parser()
    for argv in (["--impls", "fused,bogus"], ["--batch-sizes", "0"], ["--batch-sizes", "a"], ["--device", "tpu"]):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)


def _exact(inp, pass_name):
    inp64 = impls.RowInputs(inp.block, inp.batch, *(t.double() for t in (inp.x, inp.w, inp.b, inp.g)))
    return impls.pass_runner(impls.stock_block, inp64, pass_name)()


@pytest.mark.parametrize("pass_name", ["fwd+bwd", "fwd+bwd+dx"])
def test_gate_with_float64_reference_accepts_real_and_refuses_wrong(pass_name):
    # The gate the benchmark uses: "about as accurate as stock" against float64.
    inp = impls.make_inputs(blocks.BLOCKS[2], 64, torch.device("cpu"))
    exact = _exact(inp, pass_name)
    for name, fn in impls.base_impls().items():
        res = gate.check_implementation(fn, inp, pass_name, exact=exact)
        assert res.ok, (name, res.reason)
    res = gate.check_implementation(_WrongWeightGrad.apply, inp, pass_name, exact=exact)
    assert not res.ok and res.reason.startswith("grad_weight differs from the float64 reference"), res.reason


# --- arguments and outputs checked before any timing ------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["--min-run-time", "nan"],
        ["--min-run-time", "-1"],
        ["--min-run-time", "0"],
        ["--min-run-time", "inf"],
        ["--threads", "0"],
        ["--threads", "-2"],
        ["--threads", "x"],
        ["--threads", "99999999999"],  # issue 17 item 11: past torch.set_num_threads' C int
        ["--batch-sizes", "1,1000000000000"],  # issue 17 item 11: a terabyte allocation
        ["--blocks", "3"],
    ],
)
def test_cli_rejects_bad_numbers_before_timing(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.build_parser().parse_args(argv)
    assert e.value.code == 2
    assert argv[0] in capsys.readouterr().err


@pytest.fixture
def no_timing(monkeypatch):
    def timed(*a, **k):
        raise AssertionError("the benchmark ran before its arguments were checked")

    monkeypatch.setattr(runner, "run", timed)


@pytest.mark.parametrize(
    "args, words",
    [
        (lambda t: ["--json", str(t)], "is a folder"),
        (lambda t: ["--markdown", str(t / "file" / "b.md")], "is not a folder"),
        (lambda t: ["--png", str(t / "b.weird")], "unknown image format 'weird'"),
        (lambda t: ["--json", str(t / "b.out"), "--markdown", str(t / "b.out")], "is also the --json file"),
    ],
)
def test_bad_output_paths_refused_before_timing(tmp_path, capsys, no_timing, args, words):
    (tmp_path / "file").write_text("x")
    argv = args(tmp_path)
    assert _exit_code(cli.main, ["--quick", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "argument --" in err[0] and words in err[0], err


@pytest.mark.parametrize("impls_arg", ["reference", "fused,reference"])
def test_reference_is_refused_as_the_same_computation_as_stock(capsys, no_timing, impls_arg):
    # The pure-PyTorch fallback computes exactly the stock sequence: timing it was stock twice.
    assert _exit_code(cli.main, ["--quick", "--impls", impls_arg]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "argument --impls: 'reference' is the same computation as stock" in err[0], err
    assert "reference" not in impls.IMPLS and "reference" not in impls.base_impls()


def _exit_code(fn, argv) -> int:
    try:
        return fn(argv)
    except SystemExit as e:
        return e.code


def test_script_rejects_nan_quickly():
    # The reported hang: --min-run-time nan made blocked_autorange loop forever.
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--min-run-time", "nan"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "--min-run-time" in proc.stderr and "Traceback" not in proc.stderr


def test_outputs_written_atomically(tmp_path, monkeypatch):
    import matplotlib.figure

    report = {
        "schema": runner.SCHEMA,
        "config": {"impls": ["stock", "fused"], "batch_sizes": [1], "device": "cpu", "threads": 1, "quick": True},
        "machine": {"torch": torch.__version__},
        "rows": [],
        "whole_model": None,
    }
    png = tmp_path / "b.png"
    png.write_bytes(b"old chart")

    def failing_savefig(self, fname, *a, **k):
        with open(fname, "wb") if isinstance(fname, (str, os.PathLike)) else fname as f:
            f.write(b"half a chart")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", failing_savefig)
    args = cli.build_parser().parse_args(["--png", str(png), "--json", str(tmp_path / "b.json")])
    errors = cli.write_outputs(args, report, "md")
    assert len(errors) == 1 and "--png" in errors[0] and "No space left" in errors[0]
    assert png.read_bytes() == b"old chart"  # the old file is intact, no half-written one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.json", "b.png"]  # no temp files left
    assert json.loads((tmp_path / "b.json").read_text())["schema"] == runner.SCHEMA  # the others still written


class _ClosedPipe:
    """A stdout whose reader went away (`fmnist-benchmark ... | head -0`)."""

    def write(self, text):
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self):
        raise BrokenPipeError(32, "Broken pipe")


def test_closed_stdout_loses_no_results_and_ctrl_c_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(runner, "run", lambda args, repo_dir=None: {"schema": runner.SCHEMA})
    monkeypatch.setattr(render, "render_markdown", lambda report: "| table |\n")
    out = tmp_path / "b.json"
    monkeypatch.setattr(sys, "stdout", _ClosedPipe())
    assert cli.main(["--json", str(out)]) == 141
    assert json.loads(out.read_text()) == {"schema": runner.SCHEMA}  # written before stdout was tried
    monkeypatch.undo()

    def interrupted(args, repo_dir=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run", interrupted)
    assert cli.main(["--quick"]) == 130
    assert capsys.readouterr().err.strip().splitlines() == ["fmnist-benchmark: interrupted"]


# --- python/summarize_benchmarks.py ------------------------------------------------


def _summarize(argv, capsys) -> list[str]:
    import importlib.util

    spec = importlib.util.spec_from_file_location("summarize_benchmarks", REPO / "python" / "summarize_benchmarks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main([str(a) for a in argv]) == 0
    return capsys.readouterr().out.splitlines()


def test_summary_reads_recorded_and_whole_model_reports(tmp_path, capsys):
    # A recorded schema-1 run (in-process model rows), as quoted in BENCHMARKS.md.
    recorded = REPO / "docs" / "benchmarks" / "cpu-default.json"
    lines = _summarize([recorded], capsys)
    assert "| 1 | forward | 2.21 vs 32.93 ms = **14.9x**; torch.compile 28.09 ms (fused 12.7x faster) |" in lines
    assert "| model | training step | 16.1 vs 41.8 ms = **2.60x** |" in lines
    # A later run: the whole-model section's figures, per allocator setting it measured.
    train = {
        "fused": {"step": {"median_s": 0.010}, "epoch": {"median_s": 0.6}},
        "stock": {"step": {"median_s": 0.070}, "epoch": {"median_s": 4.2}},
    }
    new = tmp_path / "new.json"
    new.write_text(
        json.dumps(
            {
                "schema": runner.SCHEMA,
                "rows": [],
                "whole_model": {"allocators": {"default": {"train": train}, "tuned": {"train": {}}}},
            }
        )
    )
    lines = _summarize([recorded, new], capsys)
    assert "| model | training step | 16.1 vs 41.8 ms = **2.60x** | n/a |" in lines
    assert "| model, default allocator | training step | n/a | 10.0 vs 70.0 ms = **7.00x** |" in lines
    assert "| model, default allocator | training epoch | n/a | 600.0 vs 4200.0 ms = **7.00x** |" in lines
    assert "| model, tuned allocator | training step | n/a | n/a |" in lines
    assert "| 1 | forward | 2.21 vs 32.93 ms = **14.9x**; torch.compile 28.09 ms (fused 12.7x faster) | n/a |" in lines
