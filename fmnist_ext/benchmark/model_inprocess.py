"""The in-process model benchmark: FashionCNN training step and epoch, fused vs
stock, same initial weights and synthetic data, timed interleaved in this process.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F

import fmnist_ext

from .gate import compare_results
from .impls import FMNIST_MEAN, FMNIST_STD
from .timing import sync, time_interleaved

MODEL_BATCH = 1000
MODEL_EPOCH_STEPS = 60
MODEL_LR = 0.01


def bench_model(device: torch.device, threads: int, quick: bool, min_run_time: float) -> dict:
    """Training step and epoch of FashionCNN, fused vs stock, same initial
    weights, same synthetic data, interleaved."""
    from ..model import FashionCNN

    batch = 256 if quick else MODEL_BATCH
    steps = 3 if quick else MODEL_EPOCH_STEPS
    epoch_reps = 1 if quick else 3
    gen = torch.Generator().manual_seed(1234)
    images = torch.randint(0, 256, (steps, batch, 1, 28, 28), dtype=torch.uint8, generator=gen).to(device)
    labels = torch.randint(0, 10, (steps, batch), generator=gen).to(device)

    torch.manual_seed(0)
    models = {"stock": FashionCNN("stock").to(device), "fused": FashionCNN("fused").to(device)}
    models["fused"].load_state_dict(models["stock"].state_dict())
    result: dict[str, Any] = {
        "data": "synthetic uint8 images (uniform 0..255) and labels, normalised on the fly",
        "batch": batch,
        "epoch_steps": steps,
        "epoch_reps": epoch_reps,
        "optimizer": f"Adam(lr={MODEL_LR})",
        "impls": {},
    }

    def batch_at(i: int):
        x = images[i].float().div_(255).sub_(FMNIST_MEAN).div_(FMNIST_STD)
        return x, labels[i]

    # Correctness gate: loss and every parameter gradient from the same state.
    x0, y0 = batch_at(0)
    grads = {}
    losses = {}
    for name, model in models.items():
        model.train()
        model.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x0), y0)
        loss.backward()
        losses[name] = loss.detach().reshape(1)
        grads[name] = [p.grad.detach().clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
    pnames = [n for n, _ in models["stock"].named_parameters()]
    check = compare_results(
        [losses["fused"], *grads["fused"]], [losses["stock"], *grads["stock"]], ["loss", *[f"grad {n}" for n in pnames]]
    )
    # Restore identical state (the gate ran BatchNorm in train mode).
    models["fused"].load_state_dict(models["stock"].state_dict())

    opts = {n: torch.optim.Adam(m.parameters(), lr=MODEL_LR) for n, m in models.items()}

    def make_step(name: str):
        model, opt = models[name], opts[name]
        counter = [0]

        def step(i: int | None = None):
            k = counter[0] % steps if i is None else i
            counter[0] += 1
            x, y = batch_at(k)
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            return loss

        return step

    step_fns = {n: make_step(n) for n in models}
    names = ["stock", "fused"] if check.ok else ["stock"]
    result["impls"]["stock"] = {"status": "ok", "reason": None, "check": None}
    result["impls"]["fused"] = {
        "status": "ok" if check.ok else "refused",
        "reason": check.reason,
        "check": check.to_json(),
    }
    result["fused_backend"] = "compiled" if fmnist_ext.uses_compiled_kernels(device) else "reference fallback"

    step_t = time_interleaved({n: step_fns[n] for n in names}, min_run_time, threads, label="train step")
    for n in names:
        result["impls"][n]["step"] = step_t[n]

    epoch_times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(epoch_reps):
        for n in names if r % 2 == 0 else list(reversed(names)):
            sync(device)
            t0 = time.perf_counter()
            for i in range(steps):
                step_fns[n](i)
            sync(device)
            epoch_times[n].append(time.perf_counter() - t0)
    for n in names:
        result["impls"][n]["epoch"] = {
            "median_s": statistics.median(epoch_times[n]),
            "times_s": epoch_times[n],
        }
    if check.ok:
        for what in ("step", "epoch"):
            result[f"{what}_speedup_fused_vs_stock"] = (
                result["impls"]["stock"][what]["median_s"] / result["impls"]["fused"][what]["median_s"]
            )
    return result
