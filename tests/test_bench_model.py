"""The whole-model benchmark section (fmnist_ext.benchmark.model and its worker).

The worker tasks run in-process on tiny settings (their figures are not
asserted: the machine is noisy); the gate must refuse a wrong model; the
parent's bookkeeping (rounds, best of rounds, ratios, compile once, targets)
is checked on canned worker results; one real subprocess checks the plumbing.
"""

from __future__ import annotations

import pytest
import torch

from fmnist_ext.benchmark import model as bench_model
from fmnist_ext.benchmark import model_worker as worker

TINY_TRAIN = {
    "task": "train",
    "threads": 1,
    "batch": 32,
    "epoch_steps": 2,
    "warmup_steps": 1,
    "timed_steps": 2,
    "epoch_reps": 1,
}
TINY_INFER = {"task": "infer", "threads": 1, "batches": [1, 5], "min_time_s": 0.01, "blocks": 2}


@pytest.mark.parametrize("impl", ["fused", "stock", "fused-adam-fused"])
def test_train_task_checks_then_times(impl):
    res = worker.train_task({**TINY_TRAIN, "impl": impl})
    assert res["check"]["ok"], res["check"]
    assert set(res["check"]["max_rel_err"]) >= {"loss", "conv1.weight", "bn2.bias", "out.bias"}
    assert res["step"]["n"] == 2 and res["step"]["median_s"] > 0
    assert res["epoch"]["n"] == 1 and res["epoch"]["median_s"] > 0


def test_infer_task_checks_then_times():
    for impl in ("stock", "fused", "inference"):
        res = worker.infer_task({**TINY_INFER, "impl": impl})
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


def test_the_gate_refuses_wrong_logits_and_times_nothing(monkeypatch):
    monkeypatch.setattr(worker, "_infer_model", lambda impl: _Off(worker._eval_model("fused")))
    res = worker.infer_task({**TINY_INFER, "impl": "fused"})
    for row in res["batches"].values():
        assert not row["check"]["ok"] and "logits differs" in row["check"]["reason"]
        assert "forward" not in row


def test_the_gate_refuses_a_wrong_training_step(monkeypatch):
    def wrong(impl):
        m = worker._model("fused")
        return _Off(m), m, {}

    monkeypatch.setattr(worker, "_train_model", wrong)
    res = worker.train_task({**TINY_TRAIN, "impl": "fused"})
    assert not res["check"]["ok"] and "step" not in res


def test_profile_task_charges_time_to_layers():
    res = worker.profile_task({"task": "profile", "threads": 1, "batch": 32, "profile_steps": 1})
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


def _fake_worker(calls):
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
    bad = bench_model.run_worker({**TINY_INFER, "impl": "no-such-impl"}, "default")
    assert bad["error"].startswith("exit code 1")


@pytest.mark.parametrize(
    "argv, msg",
    [
        (["--allocators", "jemalloc"], "--allocators"),
        (["--rounds", "0"], "--rounds"),
        (["--threads", "0"], "--threads"),
    ],
)
def test_cli_rejects_bad_arguments(argv, msg, capsys):
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
