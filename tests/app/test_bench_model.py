"""The whole-model benchmark section (fmnist_ext.benchmark.model and its worker).

The worker tasks run in-process on tiny settings (their figures are not
asserted: the machine is noisy); the gate must refuse a wrong model; the
parent's bookkeeping (rounds, best of rounds, ratios, compile once, targets)
is checked on canned worker results; one real subprocess checks the plumbing.
The worker tasks run on every device (cuda skipped, with the reason, where
torch sees no GPU); the parent's CUDA plumbing (specs, one allocator
setting, the GPU's name, the refusals) is checked here with canned workers.
"""

from __future__ import annotations

import pytest
import torch

from fmnist_ext.benchmark import model as bench_model
from fmnist_ext.benchmark import model_worker as worker

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible to torch")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]

TINY_TRAIN = {
    "task": "train",
    "device": "cpu",
    "threads": 1,
    "batch": 32,
    "epoch_steps": 2,
    "warmup_steps": 1,
    "timed_steps": 2,
    "epoch_reps": 1,
}
TINY_INFER = {"task": "infer", "device": "cpu", "threads": 1, "batches": [1, 5], "min_time_s": 0.01, "blocks": 2}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["fused", "stock", "fused-adam-fused"])
def test_train_task_checks_then_times(impl, device):
    res = worker.train_task({**TINY_TRAIN, "impl": impl, "device": device})
    assert res["check"]["ok"], res["check"]
    assert set(res["check"]["max_rel_err"]) >= {"loss", "conv1.weight", "bn2.bias", "out.bias"}
    assert res["step"]["n"] == 2 and res["step"]["median_s"] > 0
    assert res["epoch"]["n"] == 1 and res["epoch"]["median_s"] > 0


@pytest.mark.parametrize("device", DEVICES)
def test_infer_task_checks_then_times(device):
    for impl in ("stock", "fused", "inference"):
        res = worker.infer_task({**TINY_INFER, "impl": impl, "device": device})
        for b in ("1", "5"):
            row = res["batches"][b]
            assert row["check"]["ok"], (impl, row["check"])
            assert row["forward"]["median_s"] > 0 and row["forward"]["n"] == 2


class _Off(torch.nn.Module):
    """A model whose logits are 1% off."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x) * 1.01


@pytest.mark.parametrize("device", DEVICES)
def test_the_gate_refuses_wrong_logits_and_times_nothing(monkeypatch, device):
    monkeypatch.setattr(worker, "_infer_model", lambda impl, dev: _Off(worker._eval_model("fused", dev)))
    res = worker.infer_task({**TINY_INFER, "impl": "fused", "device": device})
    for row in res["batches"].values():
        assert not row["check"]["ok"] and "logits differs" in row["check"]["reason"]
        assert "forward" not in row


@pytest.mark.parametrize("device", DEVICES)
def test_the_gate_refuses_a_wrong_training_step(monkeypatch, device):
    def wrong(impl, dev):
        m = worker._model("fused", dev)
        return _Off(m), m, {}

    monkeypatch.setattr(worker, "_train_model", wrong)
    res = worker.train_task({**TINY_TRAIN, "impl": "fused", "device": device})
    assert not res["check"]["ok"] and "step" not in res


@pytest.mark.parametrize("device", DEVICES)
def test_profile_task_charges_time_to_layers(device):
    res = worker.profile_task({"task": "profile", "device": device, "threads": 1, "batch": 32, "profile_steps": 1})
    assert res["device"] == device
    per = res["self_cpu_s_per_step"]
    for key in (
        "forward | conv blocks",
        "backward | conv blocks",
        "forward | BatchNorm",
        "backward | BatchNorm",
        "forward | Linear",
        "optimizer | all",
        "loss | cross-entropy",
    ):
        assert per.get(key, 0) > 0, (key, sorted(per))


# --- the parent: rounds, best of rounds, ratios -----------------------------------


def _fake_worker(calls, specs=None):
    specs = [] if specs is None else specs
    step = {"fused": 0.010, "stock": 0.070, "compile": 0.100, "fused-adam-foreach": 0.009, "fused-adam-fused": 0.008}
    fwd = {
        "stock": {1: 250e-6, 64: 2e-3},
        "fused": {1: 100e-6, 64: 1e-3},
        "inference": {1: 25e-6, 64: 0.5e-3},
        "compile": {1: 200e-6, 64: 1.5e-3},
    }
    ok = {"ok": True, "reason": None, "max_rel_err": {}}

    def run(spec, allocator):
        calls.append((allocator, spec["task"], spec.get("impl")))
        specs.append(spec)
        slow = 1.0 + 0.5 * (
            sum(1 for c in calls if c[1:] == (spec["task"], spec.get("impl")) and c[0] == allocator) % 2
        )
        if spec["task"] == "train":
            if spec["impl"] == "fused-adam-foreach":
                return {"error": "exit code 1: boom"}
            s = step[spec["impl"]] * slow
            return {
                "check": ok,
                "first_call_s": 0.5,
                "adam": "default",
                "fused_compiled": True,
                "step": {"median_s": s, "min_s": s, "n": 3},
                "epoch": {"median_s": 60 * s, "min_s": 60 * s, "n": 1},
            }
        if spec["task"] == "infer":
            return {
                "batches": {
                    str(b): {
                        "check": ok,
                        "first_call_s": 0.1,
                        "forward": {"median_s": fwd[spec["impl"]][b] * slow, "min_s": 0, "n": 2},
                    }
                    for b in spec["batches"]
                }
            }
        return {
            "steps": 1,
            "wall_per_step_s": 0.02,
            "self_cpu_s_per_step": {"forward | conv blocks": 0.004, "optimizer | all": 0.001},
        }

    return run


def test_run_section_bookkeeping(monkeypatch):
    calls = []
    monkeypatch.setattr(bench_model, "run_worker", _fake_worker(calls))
    tiny = {**bench_model.settings(True), "infer_batches": [1, 64]}
    monkeypatch.setattr(bench_model, "settings", lambda quick: tiny)
    sec = bench_model.run_section(quick=False, allocators=["default", "tuned"], rounds=2, threads=2, log=lambda m: None)
    # compile: one process, in the first allocator only; everything else once per round and allocator
    assert calls.count(("default", "train", "compile")) == 1 and calls.count(("tuned", "train", "compile")) == 0
    assert calls.count(("tuned", "train", "fused")) == 2 and calls.count(("default", "infer", "inference")) == 2
    assert calls.count(("default", "profile", None)) == 1
    a = sec["allocators"]["default"]
    fused = a["train"]["fused"]
    assert fused["step"]["median_s"] == pytest.approx(0.010)  # best of rounds (the other was 1.5x)
    assert fused["step"]["round_medians_s"] == pytest.approx([0.015, 0.010])
    assert fused["step_vs_stock"] == pytest.approx(7.0)
    assert a["train"]["fused-adam-foreach"]["status"] == "failed"
    assert a["infer"]["inference"]["batches"]["1"]["vs_stock"] == pytest.approx(10.0)
    assert a["infer"]["inference"]["batches"]["64"]["vs_stock"] == pytest.approx(4.0)
    md = bench_model.render(sec)
    assert "### Allocator: default" in md and "### Allocator: tuned" in md
    assert "| training step >= 7x stock | 7.00x | yes |" in md
    assert "| for_inference() at batch 1 >= 8x stock | 10.00x | yes |" in md
    assert "FAILED: exit code 1: boom" in md
    assert "forward / conv blocks" in md


def test_a_real_worker_process():
    res = bench_model.run_worker({**TINY_INFER, "impl": "inference", "batches": [1]}, "tuned")
    assert "error" not in res, res
    assert res["batches"]["1"]["check"]["ok"] and res["spec"]["impl"] == "inference"
    assert res["spec"]["device"] == "cpu"
    bad = bench_model.run_worker({**TINY_INFER, "impl": "no-such-impl"}, "default")
    assert bad["error"].startswith("exit code 1")


@pytest.mark.parametrize(
    "argv, msg",
    [
        (["--allocators", "jemalloc"], "--allocators"),
        (["--rounds", "0"], "--rounds"),
        (["--threads", "0"], "--threads"),
        (["--device", "tpu"], "--device"),
        (["--device", "cuda", "--allocators", "default,tuned"], "--allocators: tuned changes glibc's malloc"),
        # issue 17 items 10 and 11: the same allocator twice was timed twice; a thread count past a C int
        (["--allocators", "default,default"], "--allocators: default given twice"),
        (["--threads", "99999999999"], "--threads"),
    ],
)
def test_cli_rejects_bad_arguments(argv, msg, capsys, monkeypatch):
    monkeypatch.setattr(bench_model, "run_worker", _no_timing)  # a case not refused fails at once, not after minutes
    with pytest.raises(SystemExit) as e:
        bench_model.main(argv)
    assert e.value.code == 2 and msg in capsys.readouterr().err


def test_benchmark_report_renders_the_section(monkeypatch):
    from fmnist_ext.benchmark import cli, render, runner

    args = cli.build_parser().parse_args(
        ["--quick", "--no-model", "--blocks", "1", "--batch-sizes", "1", "--impls", "fused", "--threads", "1"]
    )
    report = runner.run(args, log=lambda m: None)
    assert report["whole_model"] is None  # --no-model: not run
    calls = []
    monkeypatch.setattr(bench_model, "run_worker", _fake_worker(calls))
    report["whole_model"] = bench_model.run_section(quick=True, rounds=1, threads=1, log=lambda m: None)
    md = render.render_markdown(report)
    assert "## Whole model (FashionCNN, separate process per implementation)" in md
    assert md.index("separate process per implementation") < md.index("Total benchmark time")


def test_compile_workers_get_a_fresh_inductor_cache(monkeypatch):
    seen = {}

    def fake_run(cmd, env, **kw):
        seen[__import__("json").loads(cmd[-1])["impl"]] = env.get("TORCHINDUCTOR_CACHE_DIR")
        return __import__("subprocess").CompletedProcess(cmd, 0, stdout='{"ok": 1}\n', stderr="")

    monkeypatch.setattr(bench_model.subprocess, "run", fake_run)
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    assert bench_model.run_worker({"impl": "compile"}, "default") == {"ok": 1}
    assert bench_model.run_worker({"impl": "fused"}, "tuned") == {"ok": 1}
    assert "fmnist-bench-inductor-" in seen["compile"] and seen["fused"] is None


def test_the_benchmark_keeps_its_rows_when_the_section_fails_and_says_when_it_is_not_run(monkeypatch):
    from fmnist_ext.benchmark import cli, render, runner

    def broken(**kwargs):
        raise RuntimeError("section exploded")

    monkeypatch.setattr(runner, "run_section", broken)
    argv = ["--quick", "--blocks", "1", "--batch-sizes", "1", "--impls", "fused", "--threads", "1"]
    report = runner.run(cli.build_parser().parse_args(argv), log=lambda m: None)
    assert report["whole_model"] == {"skipped": "RuntimeError: section exploded"}
    assert report["rows"] and all(r["status"] == "ok" for r in report["rows"])
    assert "## Whole model\n\nskipped: RuntimeError: section exploded\n" in render.render_markdown(report)

    report = runner.run(cli.build_parser().parse_args([*argv, "--no-model"]), log=lambda m: None)
    assert report["whole_model"] is None and report["config"]["whole_model"] == "not run (--no-model)"
    assert "\nWhole model: not run (--no-model).\n" in render.render_markdown(report)


# --- the device: cpu by default, cuda on request ----------------------------------


def test_the_device_goes_into_every_worker_spec_and_the_report(monkeypatch):
    calls, specs = [], []
    monkeypatch.setattr(bench_model, "run_worker", _fake_worker(calls, specs))
    sec = bench_model.run_section(quick=True, rounds=1, threads=1, log=lambda m: None)
    assert specs and all(spec["device"] == "cpu" for spec in specs)
    assert {spec["task"] for spec in specs} == {"train", "infer", "profile"}
    cfg = sec["config"]
    assert cfg["device"] == "cpu" and cfg["gpu"] is None and cfg["allocators_not_for_device"] == []
    md = bench_model.render(sec)
    assert "\nDevice: cpu.\n" in md and "| target (issue 10) |" in md


def test_a_cuda_section_runs_every_worker_on_cuda_with_one_allocator(monkeypatch):
    # No GPU here: the refusal and the GPU's name are stubbed, the workers canned.
    calls, specs = [], []
    monkeypatch.setattr(bench_model, "run_worker", _fake_worker(calls, specs))
    monkeypatch.setattr(bench_model, "device_refusal", lambda device: None)
    monkeypatch.setattr(bench_model.torch.cuda, "get_device_name", lambda *a: "Fake GPU 80GB")
    tiny = {**bench_model.settings(True), "infer_batches": [1, 64]}
    monkeypatch.setattr(bench_model, "settings", lambda quick: tiny)
    sec = bench_model.run_section(quick=False, rounds=1, threads=1, compile_=False, log=lambda m: None, device="cuda")
    assert specs and all(spec["device"] == "cuda" for spec in specs)
    assert {a for a, _, _ in calls} == {"default"}  # glibc's malloc settings: not on cuda
    cfg = sec["config"]
    assert cfg["device"] == "cuda" and cfg["gpu"] == "Fake GPU 80GB"
    assert cfg["allocators"] == ["default"] and cfg["allocators_not_for_device"] == ["tuned"]
    md = bench_model.render(sec)
    assert "Device: cuda (Fake GPU 80GB)" in md and "Allocator setting `tuned` not run" in md
    assert "| target (issue 10) |" not in md and "CPU targets: not judged" in md
    assert "host's Python, dispatch and launch time" in md  # the profile is CPU time
    with pytest.raises(ValueError, match="allocators: \\['tuned'\\]"):
        bench_model.run_section(allocators=["tuned"], log=lambda m: None, device="cuda")


def _no_timing(*args, **kwargs):
    raise AssertionError("timed something after a refusal")


def test_model_cli_refuses_cuda_before_any_timing(monkeypatch, capsys):
    monkeypatch.setattr(bench_model, "run_worker", _no_timing)
    monkeypatch.setattr(bench_model.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        bench_model.main(["--device", "cuda", "--quick"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "argument --device: cuda requested but torch sees no CUDA device" in err
    # a GPU without the compiled CUDA kernels: "fused" would be the reference
    monkeypatch.setattr(bench_model.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench_model, "uses_compiled_kernels", lambda device: False)
    with pytest.raises(SystemExit) as e:
        bench_model.main(["--device", "cuda", "--quick"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "argument --device: cuda: the fused op has no compiled CUDA kernels" in err
    with pytest.raises(ValueError, match="no compiled CUDA kernels"):
        bench_model.run_section(quick=True, device="cuda", log=lambda m: None)


def test_benchmark_cli_refuses_a_cuda_model_section_before_any_timing(monkeypatch, capsys):
    from fmnist_ext.benchmark import cli, runner

    monkeypatch.setattr(runner, "run", _no_timing)
    monkeypatch.setattr(bench_model.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench_model, "uses_compiled_kernels", lambda device: False)
    with pytest.raises(SystemExit) as e:
        cli.main(["--device", "cuda", "--quick"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "argument --device: cuda: the fused op has no compiled CUDA kernels" in err and "--no-model" in err


def test_the_benchmark_hands_its_device_to_the_section(monkeypatch):
    from fmnist_ext.benchmark import cli, runner

    seen = {}
    monkeypatch.setattr(runner, "run_section", lambda **kw: seen.update(kw) or {"skipped": "stub"})
    argv = ["--quick", "--blocks", "1", "--batch-sizes", "1", "--impls", "fused", "--threads", "1"]
    report = runner.run(cli.build_parser().parse_args(argv), log=lambda m: None)
    assert seen["device"] == "cpu" and seen["training_only"] is True
    assert report["config"]["whole_model"].startswith("python -m fmnist_ext.benchmark.model --device cpu --quick")


@pytest.mark.parametrize(
    "outputs, msg",
    [
        (lambda tmp: ["--json", str(tmp)], "--json: {tmp} is a folder"),
        (
            lambda tmp: ["--json", str(tmp / "x"), "--markdown", str(tmp / "x")],
            "--markdown: {tmp}/x is also the --json",
        ),
        (lambda tmp: ["--markdown", str(tmp / "file" / "x.md")], "--markdown: {tmp}/file (folder of"),
    ],
)
def test_model_cli_checks_its_outputs_before_any_timing(monkeypatch, capsys, tmp_path, outputs, msg):
    # issue 17 item 10: the outputs were checked only after minutes of timing (then a traceback lost the figures)
    monkeypatch.setattr(bench_model, "run_worker", _no_timing)
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as e:
        bench_model.main(["--quick", *outputs(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert msg.format(tmp=tmp_path) in err, err
