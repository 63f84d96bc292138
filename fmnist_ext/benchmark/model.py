"""Whole-model section of the benchmark: training step, epoch, inference.

    python -m fmnist_ext.benchmark.model [--device cpu|cuda] [--quick] [--allocators default,tuned]
        [--rounds N] [--threads N] [--no-compile] [--json PATH] [--markdown PATH]

(also part of `python python/benchmark.py`, which calls run_section; the
markdown is model_render.py).

Every implementation is timed in its own process (model_worker.py),
one process per implementation, task and round, the implementations alternated
and their order rotated from round to round; the figure kept is the best
(lowest) of the rounds' medians. One process per model because the allocator
state one model leaves behind skews whichever model is timed after it.

* Training step and epoch at batch 1000 (synthetic uint8 images, normalised
  per step): stock eager, fused, torch.compile of the stock model, and the
  fused model with Adam(foreach=True) and Adam(fused=True).
* Eval forward at batch 1 and 1000 under no_grad: stock eager, the fused
  model, FashionCNN.for_inference(), torch.compile of the stock model.
* Per-layer breakdown of one fused training step from torch.profiler (self
  CPU time per phase and layer; the profiler's own overhead inflates it, so
  it is for proportions, the step time comes from the unprofiled runs).
* Both glibc allocator settings: `default`, and `tuned`
  (MALLOC_MMAP_THRESHOLD_=1000000000 MALLOC_TRIM_THRESHOLD_=10000000000, so
  big buffers are not returned to the OS on every free). torch.compile is
  timed in the first allocator setting only, in one round (its compile time
  dominates the section's run time).

`--device cuda` runs all of it on the GPU (model, data and the stock
references there; every clock reading after torch.cuda.synchronize()), except
that the `tuned` allocator setting is not run: glibc's malloc holds only host
memory, the GPU's tensors live in torch's CUDA caching allocator. The profile
stays self CPU time (on CUDA: the host's Python, dispatch and launch time, not
the GPU's). A CUDA run needs a visible GPU and the fused op's compiled CUDA
kernels (device_refusal); otherwise it is a one-line error before any timing.

Each process checks its implementation against the stock model in float32
and float64 (loss and all gradients, or logits) before timing; a mismatch is
reported as REFUSED and not timed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from .. import atomic, cli, clirun, kernels_status, outputs, uses_compiled_kernels
from .model_render import TARGETS, render
from .model_worker import INFER_IMPLS, TRAIN_IMPLS

ALLOCATORS = {
    "default": {},
    "tuned": {"MALLOC_MMAP_THRESHOLD_": "1000000000", "MALLOC_TRIM_THRESHOLD_": "10000000000"},
}
# glibc's malloc settings change only host memory: on CUDA the tensors are in torch's caching allocator
DEVICE_ALLOCATORS = {"cpu": tuple(ALLOCATORS), "cuda": ("default",)}
DEVICES = tuple(DEVICE_ALLOCATORS)
WORKER_TIMEOUT_S = 600


def device_refusal(device: str) -> str | None:
    """Why the section cannot run on `device` (None: it can). On CUDA: no visible
    GPU, or no compiled CUDA kernels (the "fused" figures would be the reference's)."""
    if device not in DEVICES:
        return f"unknown device {device!r}; choose from {','.join(DEVICES)}"
    if device == "cpu":
        return None
    if not torch.cuda.is_available():
        return "cuda requested but torch sees no CUDA device"
    if not uses_compiled_kernels("cuda"):
        why = kernels_status()["not_loaded_reason"] or "the library was built without the CUDA kernels"
        return f"cuda: the fused op has no compiled CUDA kernels here ({why}), so 'fused' would time the reference"
    return None


def settings(quick: bool) -> dict:
    if quick:
        return {
            "batch": 256,
            "epoch_steps": 3,
            "warmup_steps": 1,
            "timed_steps": 3,
            "epoch_reps": 1,
            "infer_batches": [1, 64],
            "min_time_s": 0.05,
            "blocks": 3,
            "profile_steps": 2,
        }
    return {
        "batch": 1000,
        "epoch_steps": 60,
        "warmup_steps": 3,
        "timed_steps": 10,
        "epoch_reps": 1,
        "infer_batches": [1, 1000],
        "min_time_s": 0.5,
        "blocks": 5,
        "profile_steps": 5,
    }


def _child_env(allocator: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ALLOCATORS["tuned"]}
    env.update(ALLOCATORS[allocator])
    # The child imports the same fmnist_ext as this process (installed or checkout).
    pkg_parent = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([pkg_parent, *filter(None, [env.get("PYTHONPATH")])])
    return env


def run_worker(spec: dict, allocator: str) -> dict:
    """Run one measurement process; its result, or {"error": why}."""
    cmd = [sys.executable, "-m", "fmnist_ext.benchmark.model_worker", json.dumps(spec)]
    env = _child_env(allocator)
    # torch.compile: a fresh inductor cache directory, so first_call_s is a cold compile
    # (the worker also turns off the in-process graph caches).
    with tempfile.TemporaryDirectory(prefix="fmnist-bench-inductor-") as cache:
        if spec.get("impl") == "compile":
            env["TORCHINDUCTOR_CACHE_DIR"] = cache
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {WORKER_TIMEOUT_S} s"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit code {proc.returncode}: {tail[:300]}"}
    try:
        return json.loads(lines[-1])
    except json.JSONDecodeError:
        return {"error": f"unreadable output: {lines[-1][:300]}"}


def _rotated(items: list[str], r: int) -> list[str]:
    k = r % len(items) if items else 0
    return items[k:] + items[:k]


def _best(rounds: list[dict], key: str) -> dict | None:
    """The round with the lowest median of `key` (best of rounds), with all rounds' medians."""
    ok = [r[key] for r in rounds if key in r]
    if not ok:
        return None
    best = min(ok, key=lambda s: s["median_s"])
    return {**best, "round_medians_s": [s["median_s"] for s in ok]}


def _train_summary(runs: list[dict]) -> dict:
    good = [r for r in runs if "error" not in r]
    out = {"status": "failed", "errors": [r["error"] for r in runs if "error" in r]}
    if not good:
        return out
    if not all(r["check"]["ok"] for r in good):
        bad = next(r for r in good if not r["check"]["ok"])
        return {**out, "status": "refused", "reason": bad["check"]["reason"], "check": bad["check"]}
    return {
        **out,
        "status": "ok",
        "check": good[0]["check"],
        "first_call_s": good[0]["first_call_s"],
        "adam": good[0]["adam"],
        "step": _best(good, "step"),
        "epoch": _best(good, "epoch"),
        "fused_compiled": good[0]["fused_compiled"],
    }


def _infer_summary(runs: list[dict], batches: list[int]) -> dict:
    good = [r for r in runs if "error" not in r]
    out: dict = {
        "status": "failed" if not good else "ok",
        "errors": [r["error"] for r in runs if "error" in r],
        "batches": {},
    }
    for b in batches:
        rows = [r["batches"][str(b)] for r in good]
        if not rows:
            continue
        bad = [x for x in rows if not x["check"]["ok"]]
        if bad:
            out["batches"][str(b)] = {"status": "refused", "reason": bad[0]["check"]["reason"]}
            continue
        out["batches"][str(b)] = {
            "status": "ok",
            "check": rows[0]["check"],
            "first_call_s": rows[0]["first_call_s"],
            "forward": _best(rows, "forward"),
        }
    return out


def run_section(
    quick: bool = False,
    allocators: list[str] | None = None,
    rounds: int | None = None,
    threads: int | None = None,
    compile_: bool = True,
    log=None,
    training_only: bool = False,
    device: str = "cpu",
) -> dict:
    """Run the section on `device` ("cpu" or "cuda"); its figures as a JSON-able
    dict (render() makes the markdown).

    `training_only` (the per-block benchmark's --quick run) times only the
    training step and epoch of stock and fused: no inference, no profile."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    t_start = time.perf_counter()
    refusal = device_refusal(device)
    if refusal:
        raise ValueError(f"device: {refusal}")
    allocators = allocators or (["default"] if quick else list(DEVICE_ALLOCATORS[device]))
    not_here = [a for a in allocators if a not in DEVICE_ALLOCATORS[device]]
    if not_here:
        raise ValueError(f"allocators: {not_here} change glibc's malloc, which holds no {device} tensors")
    rounds = rounds or (1 if quick else 2)
    threads = threads or torch.get_num_threads()
    cfg = settings(quick)
    with_compile = compile_ and not quick
    train_impls = [i for i in TRAIN_IMPLS if with_compile or i != "compile"]
    infer_impls = [i for i in INFER_IMPLS if with_compile or i != "compile"]
    if training_only:
        train_impls, infer_impls = [i for i in train_impls if i in ("stock", "fused")], []
    section: dict = {
        "config": {
            **cfg,
            "device": device,
            "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
            "allocators_not_for_device": [a for a in ALLOCATORS if a not in DEVICE_ALLOCATORS[device]],
            "rounds": rounds,
            "threads": threads,
            "allocators": allocators,
            "allocator_env": {a: ALLOCATORS[a] for a in allocators},
            "train_impls": train_impls,
            "infer_impls": infer_impls,
            "quick": quick,
            "profile": not training_only,
            "compile_timed_in": allocators[0] if "compile" in train_impls else None,
            "targets": TARGETS,
        },
        "allocators": {},
    }
    for ai, alloc in enumerate(allocators):
        train_runs: dict[str, list[dict]] = {i: [] for i in train_impls}
        infer_runs: dict[str, list[dict]] = {i: [] for i in infer_impls}
        for r in range(rounds):
            for impl in _rotated(train_impls, r):
                if impl == "compile" and (ai > 0 or r > 0):
                    continue
                spec = {
                    "task": "train",
                    "impl": impl,
                    "device": device,
                    "threads": threads,
                    **{k: cfg[k] for k in ("batch", "epoch_steps", "warmup_steps", "timed_steps", "epoch_reps")},
                }
                t0 = time.perf_counter()
                res = run_worker(spec, alloc)
                train_runs[impl].append(res)
                log(f"  [{alloc} r{r}] train {impl}: " + _brief(res, "step") + f" ({time.perf_counter() - t0:.0f} s)")
            for impl in _rotated(infer_impls, r):
                if impl == "compile" and (ai > 0 or r > 0):
                    continue
                spec = {
                    "task": "infer",
                    "impl": impl,
                    "device": device,
                    "threads": threads,
                    "batches": cfg["infer_batches"],
                    "min_time_s": cfg["min_time_s"],
                    "blocks": cfg["blocks"],
                }
                t0 = time.perf_counter()
                res = run_worker(spec, alloc)
                infer_runs[impl].append(res)
                log(
                    f"  [{alloc} r{r}] infer {impl}: ({time.perf_counter() - t0:.0f} s)"
                    + (f" {res['error']}" if "error" in res else "")
                )
        prof = None
        if not training_only:
            prof = run_worker(
                {
                    "task": "profile",
                    "device": device,
                    "threads": threads,
                    "batch": cfg["batch"],
                    "profile_steps": cfg["profile_steps"],
                },
                alloc,
            )
        section["allocators"][alloc] = _summarise(train_runs, infer_runs, prof, cfg["infer_batches"])
    section["duration_s"] = time.perf_counter() - t_start
    return section


def _brief(res: dict, key: str) -> str:
    if "error" in res:
        return "ERROR " + res["error"]
    if not res["check"]["ok"]:
        return "REFUSED " + str(res["check"]["reason"])
    return f"{res[key]['median_s'] * 1e3:.2f} ms"


def _ratio(stock: dict | None, impl: dict | None) -> float | None:
    if not stock or not impl:
        return None
    return stock["median_s"] / impl["median_s"]


def _summarise(train_runs, infer_runs, prof, batches) -> dict:
    train = {i: _train_summary(runs) for i, runs in train_runs.items() if runs}
    infer = {i: _infer_summary(runs, batches) for i, runs in infer_runs.items() if runs}
    stock = train.get("stock", {})
    for t in train.values():
        if t["status"] == "ok" and stock.get("status") == "ok":
            t["step_vs_stock"] = _ratio(stock["step"], t["step"])
            t["epoch_vs_stock"] = _ratio(stock["epoch"], t["epoch"])
    for t in infer.values():
        for b, row in t["batches"].items():
            srow = infer.get("stock", {}).get("batches", {}).get(b, {})
            if row["status"] == "ok" and srow.get("status") == "ok":
                row["vs_stock"] = _ratio(srow["forward"], row["forward"])
    return {"train": train, "infer": infer, "profile": prof}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fmnist_ext.benchmark.model",
        description="Whole-model benchmark of FashionCNN: training step and epoch, eval "
        "inference at batch 1 and 1000, one process per implementation.",
    )
    p.add_argument(
        "--device",
        choices=DEVICES,
        default="cpu",
        help="where model and data live (cuda: needs a GPU and the compiled CUDA kernels; one allocator setting)",
    )
    p.add_argument("--quick", action="store_true", help="smoke run: batch 256, 3-step epoch, batch 1/64, no compile")
    p.add_argument(
        "--allocators",
        default=None,
        help="comma-separated from default,tuned (default: both on cpu; --quick or cuda: default)",
    )
    p.add_argument(
        "--rounds", type=cli.positive_int, default=None, help="rounds per implementation (default 2; --quick 1)"
    )
    p.add_argument("--threads", type=cli.thread_count, default=None, help="torch threads (default: torch's default)")
    p.add_argument("--no-compile", action="store_true", help="do not time torch.compile")
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    p.add_argument("--markdown", type=Path, default=None, help="write the markdown here")
    return p


def parse_allocators(parser: argparse.ArgumentParser, text: str | None, device: str = "cpu") -> list[str] | None:
    if text is None:
        return None
    vals = [t.strip() for t in text.split(",") if t.strip()]
    bad = [v for v in vals if v not in ALLOCATORS]
    if bad or not vals:
        parser.error(f"argument --allocators: unknown {bad or text!r}; choose from {','.join(ALLOCATORS)}")
    twice = sorted({v for v in vals if vals.count(v) > 1})
    if twice:
        parser.error(f"argument --allocators: {','.join(twice)} given twice (it would be timed twice)")
    not_here = [v for v in vals if v not in DEVICE_ALLOCATORS[device]]
    if not_here:
        parser.error(
            f"argument --allocators: {','.join(not_here)} changes glibc's malloc, which holds no {device} tensors; "
            f"on {device} choose from {','.join(DEVICE_ALLOCATORS[device])}"
        )
    return vals


@clirun.guarded("fmnist_ext.benchmark.model", "python -m fmnist_ext.benchmark.model")
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    cli.refuse_bad_cpu_isa(parser)
    allocators = parse_allocators(parser, args.allocators, args.device)
    refusal = device_refusal(args.device)
    if refusal:
        cli.fail(parser, f"argument --device: {refusal}")
    try:  # before the minutes of timing: a figure lost to a bad path is a run lost
        outputs.check_outputs({"--json": args.json, "--markdown": args.markdown})
    except outputs.OutputError as e:
        cli.fail(parser, str(e))
    section = run_section(args.quick, allocators, args.rounds, args.threads, not args.no_compile, device=args.device)
    md = render(section)
    sys.stdout.write(md)
    # atomic: an interrupted run never leaves a half-written file in place of an old one. The JSON
    # first (it holds everything); a failure (the disk filled since the check) is one line, exit 1.
    writes = {"--json": lambda: json.dumps(section, indent=2, allow_nan=False) + "\n", "--markdown": lambda: md}
    status = 0
    for arg, path in (("--json", args.json), ("--markdown", args.markdown)):
        if path is not None:
            try:
                atomic.write_text(path, writes[arg]())
            except atomic.WriteError as e:
                print(f"{parser.prog}: error: argument {arg}: {e}", file=sys.stderr, flush=True)
                status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
