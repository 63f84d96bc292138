"""The benchmark (python/benchmark.py, python -m fmnist_ext.benchmark): a --quick run
end to end, the per-block rows' correctness gate and cost model, and the command
line's refusals and output files. The whole-model section is test_bench_model.py.
No timing is asserted: the figures come from a tiny, noisy run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fmnist_ext.benchmark import __main__ as bench
from fmnist_ext.benchmark import blocks, report

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "python" / "benchmark.py"
COMPILED = os.environ.get("FMNIST_REQUIRE_COMPILED", "") not in ("", "0")


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_quick_run_writes_markdown_json_png(tmp_path):
    out = {ext: tmp_path / f"b.{ext}" for ext in ("json", "png", "md")}
    argv = ["--quick", "--threads", "1", "--json", out["json"], "--png", out["png"], "--markdown", out["md"]]
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, argv)], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]

    rep = json.loads(out["json"].read_text())
    cfg, m, ceil = rep["config"], rep["machine"], rep["ceilings"]
    assert rep["schema"] == bench.SCHEMA
    assert cfg["quick"] is True and cfg["device"] == "cpu" and cfg["threads"] == 1
    assert cfg["batch_sizes"] == [1, 64] and cfg["blocks"] == [1, 2] and cfg["impls"] == ["stock", "fused"]
    for key in ("date", "cpu_model", "cpu_flags", "cpu_count", "kernels_status", "git", "env", "loadavg_at_end"):
        assert key in m, key
    assert m["torch"] == torch.__version__ and "cpu_isa" in m["kernels_status"]
    assert m["git"]["commit"] and len(m["git"]["commit"]) == 40
    assert m["fused_uses_compiled_kernels"] is True or not COMPILED
    assert ceil["sgemm"]["gflops"] > 0 and ceil["copy"]["gbps"] > 0

    rows = rep["rows"]
    assert {(r["block"], r["batch"], r["pass"], r["impl"]) for r in rows} == {
        (b, n, p, i) for b in (1, 2) for n in (1, 64) for p in blocks.PASSES for i in ("fused", "stock")
    }
    stock = {(r["block"], r["batch"], r["pass"]): r for r in rows if r["impl"] == "stock"}
    for r in rows:
        assert r["status"] == "ok" and r["check"]["ok"] is True, r
        assert r["median_s"] > 0 and r["n"] >= blocks.ROUNDS
        assert r["flops"] == blocks.BLOCKS[r["block"]].flops(r["batch"], r["pass"])
        assert r["gflops"] == pytest.approx(r["flops"] / r["median_s"] / 1e9)
        assert r["gbps"] == pytest.approx(r["bytes"] / r["median_s"] / 1e9)
        assert r["frac_sgemm"] == pytest.approx(r["gflops"] / ceil["sgemm"]["gflops"])
        assert r["frac_copy"] == pytest.approx(r["gbps"] / ceil["copy"]["gbps"])
        base = stock[(r["block"], r["batch"], r["pass"])]["median_s"]
        assert r["speedup_vs_stock"] == pytest.approx(base / r["median_s"])

    # the whole model, each implementation in its own process: training, and eval including for_inference()
    section = rep["whole_model"]
    assert section["config"]["device"] == "cpu" and section["config"]["gpu"] is None
    assert list(section["allocators"]) == ["default"]
    a = section["allocators"]["default"]
    assert set(a["train"]) == {"fused", "stock"} and set(a["infer"]) == {"stock", "fused", "inference"}
    for t in a["train"].values():
        assert t["status"] == "ok" and t["step"]["median_s"] > 0 and t["epoch"]["median_s"] > 0, t
    assert a["train"]["fused"]["step_vs_stock"] > 0
    for impl in a["infer"].values():
        assert set(impl) == {"1", "64"} and all(
            b["status"] == "ok" and b["forward"]["median_s"] > 0 for b in impl.values()
        )
    assert a["infer"]["inference"]["1"]["forward_vs_stock"] > 0

    md = out["md"].read_text()
    assert md == proc.stdout
    assert "| batch | pass | impl | median | vs stock |" in md and "| for_inference() |" in md
    assert "## Whole model" in md and "REFUSED" not in md
    assert "issue" not in md.lower() and "target" not in md.lower()  # measurements, not verdicts
    assert out["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- the correctness gate ---------------------------------------------------------


class _WrongWeightGrad(torch.autograd.Function):
    """The stock forward, with a weight gradient 1% off."""

    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w, b)
        return blocks.stock_block(x, w, b)

    @staticmethod
    def backward(ctx, g):
        with torch.enable_grad():
            xx, ww, bb = (t.detach().requires_grad_(True) for t in ctx.saved_tensors)
            gx, gw, gb = torch.autograd.grad(blocks.stock_block(xx, ww, bb), (xx, ww, bb), g)
        return gx, gw * 1.01, gb


def _wrong_output(x, w, b):
    return blocks.stock_block(x, w, b) * 1.001


def _inputs(block, batch):
    return blocks.make_inputs(blocks.BLOCKS[block], batch, torch.device("cpu"))


def _exact(inputs, pass_name):
    return blocks.runner(blocks.stock_block, {k: t.double() for k, t in inputs.items()}, pass_name)()


@pytest.mark.parametrize("block", [1, 2])
@pytest.mark.parametrize("pass_name", blocks.PASSES)
def test_gate_accepts_the_real_implementations(block, pass_name):
    inputs = _inputs(block, 3)
    for fn in (blocks.stock_block, blocks.fused_block):
        res = blocks.check(fn, inputs, pass_name)
        assert res["ok"], (fn, res["reason"])
        assert set(res["max_rel_err"]) == set(blocks.RESULTS[pass_name])


def test_block2_inputs_make_every_convolution_sum_exact_in_float32():
    # So float32 fused and stock pick the float64 yardstick's pool winners even at
    # batch 1000 (unrounded inputs had near-ties there, and the gate refused a correct backward).
    inputs = _inputs(2, 1000)
    conv32 = torch.nn.functional.conv2d(inputs["x"], inputs["w"], inputs["b"])
    conv64 = torch.nn.functional.conv2d(*(inputs[k].double() for k in "xwb"))
    assert torch.equal(conv32.double(), conv64)
    assert 0.9 < inputs["x"].std().item() < 1.1  # still standard-normal activations


def test_gate_refuses_wrong_outputs_gradients_shapes_and_exceptions():
    res = blocks.check(_wrong_output, _inputs(1, 4), "fwd")
    assert not res["ok"] and res["reason"].startswith("output differs from stock")
    inputs = _inputs(2, 4)
    assert blocks.check(_WrongWeightGrad.apply, inputs, "fwd")["ok"]  # its forward is right
    for pass_name in ("fwd+bwd", "fwd+bwd+dx"):
        res = blocks.check(_WrongWeightGrad.apply, inputs, pass_name)
        assert not res["ok"] and res["reason"].startswith("grad_weight differs from stock"), res["reason"]
    res = blocks.check(lambda x, w, b: torch.relu(torch.conv2d(x, w, b)), _inputs(1, 2), "fwd")
    assert not res["ok"] and "shape" in res["reason"]

    def raises(x, w, b):
        raise RuntimeError("kernel exploded")

    res = blocks.check(raises, _inputs(1, 2), "fwd")
    assert not res["ok"] and "RuntimeError: kernel exploded" in res["reason"]


@pytest.mark.parametrize("pass_name", ["fwd+bwd", "fwd+bwd+dx"])
def test_gate_with_float64_reference_accepts_real_and_refuses_wrong(pass_name):
    # What the rows use: "about as accurate as stock" against float64.
    inputs = _inputs(2, 64)
    exact = _exact(inputs, pass_name)
    for fn in (blocks.stock_block, blocks.fused_block):
        res = blocks.check(fn, inputs, pass_name, exact=exact)
        assert res["ok"], (fn, res["reason"])
    res = blocks.check(_WrongWeightGrad.apply, inputs, pass_name, exact=exact)
    assert not res["ok"] and res["reason"].startswith("grad_weight differs from the float64 reference"), res["reason"]


def _quick_args(*extra):
    argv = ["--quick", "--no-model", "--threads", "1", "--blocks", "1", "--batch-sizes", "2", "--min-run-time", "0.01"]
    return bench.build_parser().parse_args([*argv, *extra])


def test_refused_implementation_gets_no_speed(monkeypatch, restore_threads):
    """End to end: a broken 'fused' is checked, refused, not timed, and shown as REFUSED."""
    monkeypatch.setitem(blocks.IMPLS, "fused", lambda inputs, pass_name: (_wrong_output, None))
    rep = bench.run(_quick_args(), log=lambda msg: None)
    fused = [r for r in rep["rows"] if r["impl"] == "fused"]
    assert len(fused) == len(blocks.PASSES)
    for r in fused:
        assert r["status"] == "refused" and "output differs from the float64 reference" in r["reason"]
        assert "median_s" not in r and "speedup_vs_stock" not in r
    others = [r for r in rep["rows"] if r["impl"] != "fused"]
    assert others and all(r["status"] == "ok" and r["median_s"] > 0 for r in others)
    md = report.render_markdown(rep)
    assert md.count("| fused | REFUSED: output differs from the float64 reference") == len(blocks.PASSES)
    assert "## Whole model: not run (--no-model)" in md
    json.dumps(rep, allow_nan=False)  # still serialisable


def test_an_implementation_that_cannot_be_built_is_skipped_with_its_reason(monkeypatch, restore_threads):
    calls = []

    def broken_compile(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", broken_compile)
    rep = bench.run(_quick_args("--impls", "compile"), log=lambda msg: None)
    comp = [r for r in rep["rows"] if r["impl"] == "compile"]
    assert len(comp) == len(blocks.PASSES) and len(calls) == 1  # later rows skipped without trying again
    assert all(r["status"] == "skipped" and "RuntimeError: no compiler here" in r["reason"] for r in comp)
    assert all("median_s" not in r for r in comp)
    assert "| compile | SKIPPED: could not be built: RuntimeError: no compiler here" in report.render_markdown(rep)


def test_flop_and_byte_conventions():
    b1, b2 = blocks.BLOCKS[1], blocks.BLOCKS[2]
    # 2*Cout*Hconv*Wconv*Cin*k*k per image: 173 M and 230 M at batch 1000
    assert b1.flops(1000, "fwd") == 2 * 6 * 24 * 24 * 1 * 25 * 1000 == 172_800_000
    assert b2.flops(1000, "fwd") == 2 * 12 * 8 * 8 * 6 * 25 * 1000 == 230_400_000
    assert b1.flops(10, "fwd+bwd") == 2 * b1.flops(10, "fwd")
    assert b1.flops(10, "fwd+bwd+dx") == 3 * b1.flops(10, "fwd")
    x, w, b, y = 784, 150, 6, 864  # forward: read x, w, b; write pooled y (float32)
    assert b1.bytes_moved(1, "fwd") == 4 * (x + w + b + y)
    assert b1.bytes_moved(1, "fwd+bwd") == 4 * ((x + w + b + y) + (y + x + w + w + b))
    assert b1.bytes_moved(1, "fwd+bwd+dx") == b1.bytes_moved(1, "fwd+bwd") + 4 * x


# --- arguments and outputs, checked before any timing --------------------------------


@pytest.fixture
def no_timing(monkeypatch):
    def timed(*a, **k):
        raise AssertionError("the benchmark ran before its arguments were checked")

    monkeypatch.setattr(bench, "run", timed)


def _one_line_error(capsys, argv) -> str:
    try:
        code = bench.main(argv)
    except SystemExit as e:
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--min-run-time", "nan"], "--min-run-time"),
        (["--min-run-time", "-1"], "--min-run-time"),
        (["--min-run-time", "0"], "--min-run-time"),
        (["--min-run-time", "inf"], "--min-run-time"),
        (["--threads", "0"], "--threads"),
        (["--threads", "x"], "--threads"),
        (["--threads", "99999999999"], "--threads"),  # past torch.set_num_threads' C int
        (["--batch-sizes", "0"], "--batch-sizes"),
        (["--batch-sizes", "a"], "--batch-sizes"),
        (["--batch-sizes", "1,1000000000000"], "--batch-sizes"),  # a terabyte allocation
        (["--blocks", "3"], "--blocks"),
        (["--impls", "fused,bogus"], "--impls: unknown bogus"),
        (["--impls", "reference"], "--impls: unknown reference"),  # the stock sequence: every row times it
        (["--device", "tpu"], "--device"),
        (["--rounds", "0"], "--rounds"),
        (["--allocators", "jemalloc"], "--allocators: unknown jemalloc"),
        (["--allocators", "default,default"], "--allocators: empty or repeated"),  # it would be timed twice
        (["--no-blocks", "--no-model"], "--no-model: not allowed with --no-blocks"),
    ],
)
def test_bad_arguments_are_one_line_errors_before_timing(capsys, no_timing, argv, words):
    assert words in _one_line_error(capsys, argv)


@pytest.mark.parametrize(
    "args, words",
    [
        (lambda t: ["--json", str(t)], "--json: {t} is a folder"),
        (lambda t: ["--markdown", str(t / "file" / "b.md")], "--markdown: {t}/file (folder of"),
        (lambda t: ["--png", str(t / "b.weird")], "--png: cannot write {t}/b.weird: unknown image format 'weird'"),
        (lambda t: ["--json", str(t / "b.out"), "--markdown", str(t / "b.out")], "is also the --json file"),
        (lambda t: ["--no-blocks", "--png", str(t / "b.png")], "--png: the chart is of the per-block rows"),
    ],
)
def test_bad_output_paths_refused_before_timing(tmp_path, capsys, no_timing, args, words):
    (tmp_path / "file").write_text("x")
    assert words.format(t=tmp_path) in _one_line_error(capsys, ["--quick", *args(tmp_path)])


@pytest.mark.parametrize("command", [[str(SCRIPT)], ["-m", "fmnist_ext.benchmark"]])
def test_both_spellings_reject_nan_quickly(command):
    # The reported hang: --min-run-time nan made blocked_autorange loop forever. From python/, `-m`
    # imports the installed package (as the script does), not the checkout's sources.
    proc = subprocess.run(
        [sys.executable, *command, "--quick", "--min-run-time", "nan"],
        cwd=SCRIPT.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "--min-run-time" in proc.stderr and "Traceback" not in proc.stderr
    # One line of ours; torch's own import-time log lines may come first (a CUDA build of
    # torch without a CUDA runtime logs "W1203 ... torch/utils/cpp_extension.py:183] No CUDA runtime").
    ours = [line for line in proc.stderr.splitlines() if not re.match(r"[DIWEF]\d{4} [\d:.]+ +\d+ torch/", line)]
    assert len(ours) == 1 and ours[0].startswith("fmnist-benchmark: error: argument --min-run-time:"), proc.stderr


def test_outputs_written_atomically(tmp_path, monkeypatch):
    import matplotlib.figure

    rep = {
        "schema": bench.SCHEMA,
        "config": {"impls": ["stock", "fused"], "blocks": [1], "batch_sizes": [1], "device": "cpu", "threads": 1},
        "machine": {"torch": torch.__version__},
        "rows": [],
    }
    rep["config"]["quick"] = True
    png = tmp_path / "b.png"
    png.write_bytes(b"old chart")

    def failing_savefig(self, fname, *a, **k):
        with open(fname, "wb") if isinstance(fname, (str, os.PathLike)) else fname as f:
            f.write(b"half a chart")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", failing_savefig)
    args = bench.build_parser().parse_args(["--png", str(png), "--json", str(tmp_path / "b.json")])
    errors = bench.write_outputs(args, rep, "md")
    assert len(errors) == 1 and "--png" in errors[0] and "No space left" in errors[0]
    assert png.read_bytes() == b"old chart"  # the old file is intact, no half-written one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.json", "b.png"]  # no temp files left
    assert json.loads((tmp_path / "b.json").read_text())["schema"] == bench.SCHEMA  # the others still written


class _ClosedPipe:
    """A stdout whose reader went away (`fmnist-benchmark ... | head -0`)."""

    def write(self, text):
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self):
        raise BrokenPipeError(32, "Broken pipe")


def test_closed_stdout_loses_no_results_and_ctrl_c_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "run", lambda args, repo_dir=None: {"schema": bench.SCHEMA})
    monkeypatch.setattr(report, "render_markdown", lambda rep: "| table |\n")
    out = tmp_path / "b.json"
    monkeypatch.setattr(sys, "stdout", _ClosedPipe())
    assert bench.main(["--json", str(out)]) == 141
    assert json.loads(out.read_text()) == {"schema": bench.SCHEMA}  # written before stdout was tried
    monkeypatch.undo()

    def interrupted(args, repo_dir=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "run", interrupted)
    assert bench.main(["--quick"]) == 130
    assert capsys.readouterr().err.strip().splitlines() == ["fmnist-benchmark: interrupted"]
