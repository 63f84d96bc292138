"""The benchmark's whole-model section (fmnist_ext.benchmark.whole_model) and its
measuring processes (fmnist_ext.benchmark.worker).

The worker tasks run in-process on tiny settings, on every device (cuda skipped
where torch sees no GPU), and their gate must refuse a wrong model; the parent's
bookkeeping (rounds, best of rounds, ratios, compile once, allocators, devices)
is checked with canned worker results; one real subprocess checks the plumbing.
"""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from fmnist_ext import bn_fold
from fmnist_ext.benchmark import __main__ as bench
from fmnist_ext.benchmark import report, whole_model, worker

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible to torch")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]
TINY_TRAIN = {"task": "train", "device": "cpu", "threads": 1, "batch": 32, "epoch_steps": 2}
TINY_TRAIN.update(warmup_steps=1, timed_steps=2)
TINY_INFER = {"task": "infer", "device": "cpu", "threads": 1, "infer_batches": [1, 5], "min_time_s": 0.01}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["fused", "stock", "fused-adam-fused", "fused-bn1-unfolded"])
def test_train_task_checks_then_times(impl, device, monkeypatch):
    monkeypatch.setattr(bn_fold, "applies", bn_fold.applies)  # fused-bn1-unfolded switches the fold off
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
            assert row["forward"]["median_s"] > 0 and row["forward"]["n"] >= 1


class _Off(torch.nn.Module):
    """A model whose logits are 1% off."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x) * 1.01


@pytest.mark.parametrize("device", DEVICES)
def test_the_gate_refuses_wrong_logits_or_a_wrong_training_step_and_times_nothing(monkeypatch, device):
    monkeypatch.setitem(worker.INFER, "fused", lambda dev: _Off(worker._eval_model("fused", dev)))
    res = worker.infer_task({**TINY_INFER, "impl": "fused", "device": device})
    for row in res["batches"].values():
        assert not row["check"]["ok"] and "logits differs" in row["check"]["reason"]
        assert "forward" not in row

    def wrong(dev):
        m = worker._model("fused", dev)
        return _Off(m), m, {}

    monkeypatch.setitem(worker.TRAIN, "fused", wrong)
    res = worker.train_task({**TINY_TRAIN, "impl": "fused", "device": device})
    assert not res["check"]["ok"] and "differs from" in res["check"]["reason"] and "step" not in res


@pytest.mark.parametrize("device", DEVICES)
def test_profile_task_charges_time_to_layers(device):
    res = worker.profile_task({"task": "profile", "device": device, "threads": 1, "batch": 32, "profile_steps": 1})
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


# --- the parent: rounds, best of rounds, ratios ---------------------------------------


def _fake_worker(calls, specs=None):
    step = {"fused": 0.010, "stock": 0.070, "compile": 0.100, "fused-adam-foreach": 0.009}
    step.update({"fused-adam-fused": 0.008, "fused-bn1-unfolded": 0.011})
    fwd = {"stock": 250e-6, "fused": 100e-6, "inference": 25e-6, "compile": 200e-6}  # at batch 1; x8 at 64
    ok = {"ok": True, "reason": None, "max_rel_err": {}}

    def run(spec, allocator):
        calls.append((allocator, spec["task"], spec.get("impl")))
        if specs is not None:
            specs.append(spec)
        slow = 1.0 + 0.5 * (calls.count(calls[-1]) % 2)  # the first round 1.5x slower than the second
        if spec["task"] == "train":
            if spec["impl"] == "fused-adam-foreach":
                return {"error": "exit code 1: boom"}
            s = step[spec["impl"]] * slow
            t = {"median_s": s, "min_s": s, "n": 3}
            return {"check": ok, "first_call_s": 0.5, "step": t, "epoch": {**t, "median_s": 60 * s}}
        if spec["task"] == "infer":
            f = fwd[spec["impl"]] * slow
            return {
                "batches": {
                    str(b): {"check": ok, "first_call_s": 0.1, "forward": {"median_s": f * (1 if b == 1 else 8)}}
                    for b in spec["infer_batches"]
                }
            }
        return {"steps": 1, "wall_per_step_s": 0.02, "self_cpu_s_per_step": {"forward | conv blocks": 0.004}}

    return run


def test_run_section_bookkeeping(monkeypatch):
    calls = []
    monkeypatch.setattr(whole_model, "run_worker", _fake_worker(calls))
    monkeypatch.setitem(whole_model.SETTINGS, "infer_batches", ([1, 64], [1, 64]))
    sec = whole_model.run_section("cpu", quick=False, threads=2, log=lambda m: None)
    assert sec["config"]["rounds"] == 2 and list(sec["allocators"]) == ["default", "tuned"]
    # compile: one process, in the first allocator setting only; everything else once per round and setting
    assert calls.count(("default", "train", "compile")) == 1 and calls.count(("tuned", "train", "compile")) == 0
    assert calls.count(("default", "infer", "compile")) == 1
    assert calls.count(("tuned", "train", "fused")) == 2 and calls.count(("default", "infer", "inference")) == 2
    assert calls.count(("default", "profile", None)) == 1 and calls.count(("tuned", "profile", None)) == 1
    a = sec["allocators"]["default"]
    fused = a["train"]["fused"]
    assert fused["step"]["median_s"] == pytest.approx(0.010)  # best of rounds (the other was 1.5x)
    assert sorted(fused["step"]["round_medians_s"]) == pytest.approx([0.010, 0.015])
    assert fused["step_vs_stock"] == pytest.approx(7.0) and fused["epoch_vs_stock"] == pytest.approx(7.0)
    assert a["train"]["fused-adam-foreach"]["status"] == "failed"
    assert a["infer"]["inference"]["1"]["forward_vs_stock"] == pytest.approx(10.0)
    assert a["infer"]["fused"]["64"]["forward_vs_stock"] == pytest.approx(2.5)
    md = "\n".join(report._whole_model(sec))
    assert "### Allocator: default (glibc defaults)" in md and "### Allocator: tuned (MALLOC_MMAP_THRESHOLD_" in md
    assert "| fused | 10 ms | 7x | 0.60 s | 7x | 0.50 s |" in md
    assert "| for_inference() | 25 µs | 10x | 200 µs | 10x |" in md
    assert "| fused-adam-foreach | FAILED: exit code 1: boom |" in md
    assert "| forward / conv blocks | 4.00 | 100% |" in md


def test_a_real_worker_process():
    res = whole_model.run_worker({**TINY_INFER, "impl": "inference", "infer_batches": [1]}, "tuned")
    assert "error" not in res, res
    assert res["batches"]["1"]["check"]["ok"] and res["spec"]["impl"] == "inference"
    bad = whole_model.run_worker({**TINY_INFER, "impl": "no-such-impl"}, "default")
    assert bad["error"].startswith("exit code 1") and "KeyError" in bad["error"]


def test_compile_workers_get_a_fresh_inductor_cache(monkeypatch):
    seen = {}

    def fake_run(cmd, env, **kw):
        seen[json.loads(cmd[-1])["impl"]] = (env.get("TORCHINDUCTOR_CACHE_DIR"), env.get("MALLOC_MMAP_THRESHOLD_"))
        return subprocess.CompletedProcess(cmd, 0, stdout='{"ok": 1}\n', stderr="")

    monkeypatch.setattr(whole_model.subprocess, "run", fake_run)
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    assert whole_model.run_worker({"impl": "compile"}, "default") == {"ok": 1}
    assert whole_model.run_worker({"impl": "fused"}, "tuned") == {"ok": 1}
    assert "fmnist-bench-inductor-" in seen["compile"][0] and seen["compile"][1] is None
    assert seen["fused"] == (None, "1000000000")


def test_the_benchmark_keeps_its_rows_when_the_section_fails(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("section exploded")

    monkeypatch.setattr(whole_model, "run_section", broken)
    argv = ["--quick", "--blocks", "1", "--batch-sizes", "1", "--impls", "fused", "--threads", "1"]
    rep = bench.run(bench.build_parser().parse_args(argv), log=lambda m: None)
    assert rep["whole_model"] == {"skipped": "RuntimeError: section exploded"}
    assert rep["rows"] and all(r["status"] == "ok" for r in rep["rows"])
    assert "\n## Whole model: RuntimeError: section exploded\n" in report.render_markdown(rep)


def test_the_benchmark_hands_its_device_and_choices_to_the_section(monkeypatch):
    seen = []
    monkeypatch.setattr(whole_model, "run_section", lambda *a: seen.append(a) or {"skipped": "stub"})
    argv = ["--quick", "--no-blocks", "--impls", "fused,inference", "--rounds", "3", "--allocators", "tuned"]
    rep = bench.run(bench.build_parser().parse_args([*argv, "--threads", "1"]), log=lambda m: None)
    assert seen[0][:6] == ("cpu", True, ["fused", "inference"], ["tuned"], 3, 1)
    assert rep["rows"] == [] and rep["config"]["blocks"] == []


# --- the device: cpu by default, cuda on request -------------------------------------


def test_the_device_goes_into_every_worker_spec(monkeypatch):
    calls, specs = [], []
    monkeypatch.setattr(whole_model, "run_worker", _fake_worker(calls, specs))
    sec = whole_model.run_section("cpu", quick=True, log=lambda m: None)
    assert specs and all(spec["device"] == "cpu" for spec in specs)
    assert {spec["task"] for spec in specs} == {"train", "infer"}  # --quick: no profile
    assert sec["config"]["gpu"] is None and list(sec["allocators"]) == ["default"]
    assert "\nDevice cpu, " in "\n".join(report._whole_model(sec))


def test_a_cuda_section_runs_every_worker_on_cuda_with_one_allocator(monkeypatch):
    # No GPU needed: the refusal and the GPU's name are stubbed, the workers canned.
    calls, specs = [], []
    monkeypatch.setattr(whole_model, "run_worker", _fake_worker(calls, specs))
    monkeypatch.setattr(whole_model, "device_refusal", lambda device: None)
    monkeypatch.setattr(whole_model.torch.cuda, "get_device_name", lambda *a: "Fake GPU 80GB")
    monkeypatch.setitem(whole_model.SETTINGS, "infer_batches", ([1, 64], [1, 64]))
    sec = whole_model.run_section("cuda", quick=False, impls=["fused"], rounds=1, log=lambda m: None)
    assert specs and all(spec["device"] == "cuda" for spec in specs)
    assert {a for a, _, _ in calls} == {"default"}  # glibc's malloc settings: not on cuda
    assert sec["config"]["gpu"] == "Fake GPU 80GB" and list(sec["config"]["allocators"]) == ["default"]
    md = "\n".join(report._whole_model(sec))
    assert "Device cuda (Fake GPU 80GB; every time read after torch.cuda.synchronize())" in md
    assert "host's Python, dispatch and launch time" in md  # the profile is CPU time
    with pytest.raises(ValueError, match="allocators \\['tuned'\\]: on cuda only default"):
        whole_model.run_section("cuda", quick=False, allocators=["tuned"], log=lambda m: None)


def _no_timing(*args, **kwargs):
    raise AssertionError("timed something after a refusal")


def test_cuda_is_refused_before_any_timing_without_a_gpu_or_its_kernels(monkeypatch, capsys):
    monkeypatch.setattr(bench, "run", _no_timing)
    monkeypatch.setattr(whole_model, "run_worker", _no_timing)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for argv in (["--device", "cuda"], ["--device", "cuda", "--no-model"]):
        with pytest.raises(SystemExit) as e:
            bench.main([*argv, "--quick"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1
        assert "argument --device: cuda requested but torch sees no CUDA device" in err
    # a GPU without the compiled CUDA kernels: "fused" would be the reference
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(whole_model, "uses_compiled_kernels", lambda device: False)
    with pytest.raises(SystemExit) as e:
        bench.main(["--device", "cuda", "--quick"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert "argument --device: cuda: the fused op has no compiled CUDA kernels" in err and "--no-model" in err
    with pytest.raises(SystemExit) as e:
        bench.main(["--device", "cuda", "--quick", "--allocators", "default,tuned"])
    assert e.value.code == 2 and "--allocators: tuned changes glibc's malloc" in capsys.readouterr().err
    with pytest.raises(ValueError, match="no compiled CUDA kernels"):
        whole_model.run_section("cuda", quick=True, log=lambda m: None)
