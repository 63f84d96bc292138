"""The whole-model section: FashionCNN's training step and epoch, eval inference
and a profile of the fused step, each implementation in its own process
(worker.py), alternated over rounds with the order rotated, best of the rounds'
medians; on the CPU under both glibc allocator settings. torch.compile is timed
in one round of the first allocator setting only (its compiles dominate)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from .. import kernels_status, uses_compiled_kernels
from .worker import INFER, TRAIN

# glibc malloc settings; on CUDA only the default, since glibc's malloc holds no GPU tensors
ALLOCATORS = {
    "default": {},
    "tuned": {"MALLOC_MMAP_THRESHOLD_": "1000000000", "MALLOC_TRIM_THRESHOLD_": "10000000000"},
}
DEVICE_ALLOCATORS = {"cpu": ("default", "tuned"), "cuda": ("default",)}
WORKER_TIMEOUT_S = 600
TASK_KEYS = {
    "train": ("batch", "epoch_steps", "warmup_steps", "timed_steps"),
    "infer": ("infer_batches", "min_time_s"),
    "profile": ("batch", "profile_steps"),
}
SETTINGS = {  # name: (full run, --quick)
    "batch": (1000, 256),
    "epoch_steps": (60, 3),
    "warmup_steps": (3, 1),
    "timed_steps": (10, 3),
    "infer_batches": ([1, 1000], [1, 64]),
    "min_time_s": (0.5, 0.05),  # of timed forwards per implementation, batch size and round
    "profile_steps": (5, 0),
    "rounds": (2, 1),
}


def device_refusal(device: str) -> str | None:
    """Why the section cannot run on `device`, or None."""
    if device == "cpu":
        return None
    if not torch.cuda.is_available():
        return "cuda requested but torch sees no CUDA device"
    if not uses_compiled_kernels("cuda"):
        why = kernels_status()["not_loaded_reason"] or "the library was built without the CUDA kernels"
        return f"cuda: the fused op has no compiled CUDA kernels here ({why}), so 'fused' would time the reference"
    return None


def run_worker(spec: dict, allocator: str) -> dict:
    """One measuring process under `allocator`; its result, or {"error": why}."""
    env = {k: v for k, v in os.environ.items() if k not in ALLOCATORS["tuned"]}
    env.update(ALLOCATORS[allocator])
    # the child imports the same fmnist_ext as this process (installed or checkout)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "fmnist_ext.benchmark.worker", json.dumps(spec)]
    with tempfile.TemporaryDirectory(prefix="fmnist-bench-inductor-") as cache:
        if spec.get("impl") == "compile":
            env["TORCHINDUCTOR_CACHE_DIR"] = cache  # a fresh cache: first_call_s is a cold compile
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {WORKER_TIMEOUT_S} s"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return {
            "error": f"exit code {proc.returncode}: {(proc.stderr.strip().splitlines() or ['no output'])[-1][:300]}"
        }
    try:
        return json.loads(lines[-1])
    except json.JSONDecodeError:
        return {"error": f"unreadable output: {lines[-1][:300]}"}


def _summary(runs: list[dict], timed: tuple[str, ...]) -> dict:
    """One implementation over the rounds: failed (no process gave figures), refused (the
    gate said no in any round) or ok, each of `timed` the best round's (lowest median)."""
    good = [r for r in runs if "error" not in r]
    out = {"status": "failed", "errors": [r["error"] for r in runs if "error" in r]}
    if good:
        bad = [r["check"] for r in good if not r["check"]["ok"]]
        out.update(status="refused" if bad else "ok", check=(bad or [good[0]["check"]])[0])
        out.update(reason=bad[0]["reason"] if bad else None, first_call_s=good[0]["first_call_s"])
        for key in timed if not bad else ():
            medians = [r[key]["median_s"] for r in good]
            out[key] = {**min((r[key] for r in good), key=lambda t: t["median_s"]), "round_medians_s": medians}
    return out


def run_section(device: str, quick: bool, impls=None, allocators=None, rounds=None, threads=None, log=print) -> dict:
    """Every implementation of TRAIN and INFER named in `impls` (all by default;
    stock always) on `device`; the section's figures as a JSON-able dict."""
    refusal = device_refusal(device)
    if refusal:
        raise ValueError(refusal)
    t_start, cfg = time.perf_counter(), {k: v[quick] for k, v in SETTINGS.items()}
    allocators = allocators or list(DEVICE_ALLOCATORS[device][: 1 if quick else None])
    if any(a not in DEVICE_ALLOCATORS[device] for a in allocators):
        raise ValueError(f"allocators {allocators}: on {device} only {', '.join(DEVICE_ALLOCATORS[device])}")
    cfg.update(rounds=rounds or cfg["rounds"], threads=threads or torch.get_num_threads(), device=device)
    pick = [n for n in (impls or [*TRAIN, *INFER]) if n != "stock"]
    train = [n for n in TRAIN if n in ("stock", *pick)]
    infer = [n for n in INFER if n in ("stock", *pick)]
    cfg.update(train_impls=train, infer_impls=infer, allocators={a: ALLOCATORS[a] for a in allocators})
    cfg.update(gpu=torch.cuda.get_device_name() if device == "cuda" else None, profile=cfg["profile_steps"] > 0)
    cfg["compile_timed_in"] = allocators[0] if "compile" in train + infer else None
    base = {"device": device, "threads": cfg["threads"]}
    section: dict = {"config": cfg, "allocators": {}}
    for ai, alloc in enumerate(allocators):
        runs: dict[tuple[str, str], list[dict]] = {}
        for r in range(cfg["rounds"]):
            for task, names in (("train", train), ("infer", infer)):
                for impl in names[r % len(names) :] + names[: r % len(names)]:
                    if impl == "compile" and (ai > 0 or r > 0):
                        continue
                    spec = {**base, "task": task, "impl": impl, **{k: cfg[k] for k in TASK_KEYS[task]}}
                    t0 = time.perf_counter()
                    res = run_worker(spec, alloc)
                    runs.setdefault((task, impl), []).append(res)
                    what = res.get("error") or ("" if res.get("check", {"ok": True})["ok"] else "REFUSED")
                    log(f"  [{alloc} round {r}] {task} {impl} ({time.perf_counter() - t0:.0f} s) {what}".rstrip())
        a = {"train": {}, "infer": {}}  # compile: not in the later allocator settings
        for (task, n), res in runs.items():
            if task == "train":
                a["train"][n] = _summary(res, ("step", "epoch"))
            else:
                per_batch = [[x if "error" in x else x["batches"][str(b)] for x in res] for b in cfg["infer_batches"]]
                a["infer"][n] = {str(b): _summary(r, ("forward",)) for b, r in zip(cfg["infer_batches"], per_batch)}
        _ratios(a)
        if cfg["profile"]:
            a["profile"] = run_worker({**base, "task": "profile", **{k: cfg[k] for k in TASK_KEYS["profile"]}}, alloc)
        section["allocators"][alloc] = a
    section["duration_s"] = time.perf_counter() - t_start
    return section


def _ratios(a: dict) -> None:
    """stock's time / each implementation's, same allocator setting (`*_vs_stock`)."""
    stock_train, stock_infer = a["train"].get("stock"), a["infer"].get("stock", {})
    pairs = [(t, stock_train, ("step", "epoch")) for t in a["train"].values()]
    pairs += [(row, stock_infer.get(b), ("forward",)) for rows in a["infer"].values() for b, row in rows.items()]
    for row, stock, timed in pairs:
        if row["status"] == "ok" and stock and stock["status"] == "ok":
            row.update({f"{t}_vs_stock": stock[t]["median_s"] / row[t]["median_s"] for t in timed})
