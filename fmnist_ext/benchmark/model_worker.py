"""One measurement of the whole-model benchmark, in its own process.

    python -m fmnist_ext.benchmark.model_worker '{"task": "train", "impl": "fused", ...}'

prints one JSON line (the last line of stdout). model.py starts
one such process per implementation and round: an allocator that has served
one model's buffers is in a different state for the next model, so timing
several models in one process skews whichever comes later.

The spec's "device" (``cpu`` or ``cuda``) is where the model, the data and
the stock references live; on CUDA every clock reading is preceded by
torch.cuda.synchronize(), so a time covers the GPU work it launched, and
TF32 is off (float32 means float32, as in the per-block rows).

Tasks (the spec's "impl" picks the implementation):

* ``train``: training steps of FashionCNN at batch B (zero_grad, forward,
  cross-entropy, backward, Adam lr 0.01) on synthetic uint8 images normalised
  per step like the training CLI. impl: ``stock`` (eager), ``fused``,
  ``compile`` (torch.compile of the stock model; Adam eager), and
  ``fused-adam-foreach`` / ``fused-adam-fused`` (the fused model with
  Adam(foreach=True) / Adam(fused=True)). Reports per-step times and the
  time of whole epochs of `epoch_steps` steps.
* ``infer``: eval-mode forward under torch.no_grad() at each batch size.
  impl: ``stock``, ``fused`` (the fused FashionCNN in eval mode),
  ``inference`` (FashionCNN.for_inference()), ``compile`` (torch.compile of
  the stock eval model).
* ``profile``: torch.profiler over fused training steps; self CPU time per
  step by phase (zero_grad, forward, loss, backward, optimizer) and layer.
  CPU activity only, on CUDA too: there it is the host's time (Python,
  dispatch, kernel launches), not the GPU's, and the report says so.

Before timing, each implementation is checked against the stock model in
float32 and float64 on the very first batch (loss and every gradient, or the
logits), with gate.compare_results; a mismatch is reported as
refused and nothing is timed.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections import defaultdict

import torch
import torch.nn.functional as F

from .compile_cache import disable_compile_caches
from .gate import compare_results
from .impls import FMNIST_MEAN, FMNIST_STD

LR = 0.01
TRAIN_IMPLS = ("fused", "stock", "compile", "fused-adam-foreach", "fused-adam-fused")
INFER_IMPLS = ("stock", "fused", "inference", "compile")


def _stats(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "n": len(times)}


def _clock(device: torch.device) -> float:
    """perf_counter after the device's queued work is done (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _device(spec: dict) -> torch.device:
    device = torch.device(spec["device"])
    if device.type == "cuda":
        # float32 means float32: TF32 would not pass the gate against the float64 reference
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    return device


def _data(batch: int, steps: int, device: torch.device):
    """Synthetic uint8 images and labels, drawn on the CPU (the same on every device), kept on `device`."""
    gen = torch.Generator().manual_seed(1234)
    images = torch.randint(0, 256, (steps, batch, 1, 28, 28), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 10, (steps, batch), generator=gen)
    return images.to(device), labels.to(device)


def _normalise(u8: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return u8.to(dtype).div_(255).sub_(FMNIST_MEAN).div_(FMNIST_STD)


def _model(kernels: str, device: torch.device, dtype=torch.float32):
    from ..model import FashionCNN

    torch.manual_seed(0)  # same initial weights for every implementation (drawn on the CPU)
    return FashionCNN(kernels).to(device, dtype)


def _gate(got: list[torch.Tensor], names: list[str], stock32: list[torch.Tensor], stock64: list[torch.Tensor]) -> dict:
    return compare_results(got, stock32, names, exact=stock64).to_json()


def _cold_compile() -> None:
    """Inductor's FX-graph and AOTAutograd caches off (the parent also gives
    the process a fresh cache directory), so first_call_s is a cold compile."""
    disable_compile_caches()


# ----------------------------------------------------------------------------
# Training step
# ----------------------------------------------------------------------------


def _loss_and_grads(model, x, y) -> list[torch.Tensor]:
    model.train()
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    out = [loss.detach().reshape(1)] + [p.grad.detach().clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return out


def _train_model(impl: str, device: torch.device):
    """(model to train, the module whose parameters Adam updates, Adam kwargs)."""
    if impl == "compile":
        _cold_compile()
        base = _model("stock", device)
        return torch.compile(base), base, {}
    kernels = "stock" if impl == "stock" else "fused"
    model = _model(kernels, device)
    adam = {"fused-adam-foreach": {"foreach": True}, "fused-adam-fused": {"fused": True}}.get(impl, {})
    return model, model, adam


def train_task(spec: dict) -> dict:
    impl, batch, device = spec["impl"], spec["batch"], _device(spec)
    steps, warmup, timed = spec["epoch_steps"], spec["warmup_steps"], spec["timed_steps"]
    images, labels = _data(batch, steps, device)
    x0, y0 = _normalise(images[0]), labels[0]

    model, base, adam_kwargs = _train_model(impl, device)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    names = ["loss"] + [n for n, _ in base.named_parameters()]
    t0 = _clock(device)
    got = _loss_and_grads(model, x0, y0)  # also compiles, for impl == compile
    first_call_s = _clock(device) - t0
    ref32 = _loss_and_grads(_model("stock", device), x0, y0)
    ref64 = _loss_and_grads(_model("stock", device, torch.float64), x0.double(), y0)
    check = _gate(got, names, ref32, ref64)
    result = {"check": check, "first_call_s": first_call_s, "adam": adam_kwargs or "default"}
    if not check["ok"]:
        return result
    base.load_state_dict(state)  # the gate ran BatchNorm in training mode
    opt = torch.optim.Adam(base.parameters(), lr=LR, **adam_kwargs)

    def step(i: int):
        x, y = _normalise(images[i % steps]), labels[i % steps]
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    for i in range(warmup):
        step(i)
    times = []
    for i in range(timed):
        t = _clock(device)
        step(i)
        times.append(_clock(device) - t)
    result["step"] = _stats(times)
    epochs = []
    for _ in range(spec["epoch_reps"]):
        t = _clock(device)
        for i in range(steps):
            step(i)
        epochs.append(_clock(device) - t)
    result["epoch"] = _stats(epochs)
    return result


# ----------------------------------------------------------------------------
# Inference
# ----------------------------------------------------------------------------


def _eval_model(kernels: str, device: torch.device, dtype=torch.float32):
    """A model with non-trivial BatchNorm statistics, in eval mode, on `device`."""
    m = _model(kernels, torch.device("cpu"), dtype)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for bn in (m.bn1, m.bn2):
            # drawn in float32 whatever the dtype, so the float64 reference is the same model
            r = torch.rand(4, bn.num_features, generator=gen).to(dtype)
            bn.running_mean.copy_(r[0] * 0.4 - 0.2)
            bn.running_var.copy_(r[1] + 0.5)
            bn.weight.copy_(r[2] + 0.5)
            bn.bias.copy_(r[3] * 0.2 - 0.1)
    return m.to(device).eval()


def _infer_model(impl: str, device: torch.device):
    if impl == "inference":
        # on CUDA, whatever for_inference() does there (the folded model, op by op)
        return _eval_model("fused", device).for_inference()
    if impl == "compile":
        _cold_compile()
        return torch.compile(_eval_model("stock", device))
    return _eval_model(impl, device)


def _time_calls(fn, x, min_time: float, blocks: int) -> list[float]:
    """Per-call times: `blocks` blocks of k calls each (k sized so a block lasts ~min_time / blocks)."""
    t = _clock(x.device)
    fn(x)
    one = max(_clock(x.device) - t, 1e-7)
    k = max(1, int(min_time / blocks / one))
    out = []
    for _ in range(blocks):
        t = _clock(x.device)
        for _ in range(k):
            fn(x)
        out.append((_clock(x.device) - t) / k)
    return out


def infer_task(spec: dict) -> dict:
    impl, device = spec["impl"], _device(spec)
    model = _infer_model(impl, device)
    ref32, ref64 = _eval_model("stock", device), _eval_model("stock", device, torch.float64)
    result: dict = {"batches": {}}
    gen = torch.Generator().manual_seed(99)
    with torch.no_grad():
        for batch in spec["batches"]:
            x = _normalise(torch.randint(0, 256, (batch, 1, 28, 28), dtype=torch.uint8, generator=gen).to(device))
            t0 = _clock(device)
            got = model(x)  # compiles for this shape, for impl == compile
            first_call_s = _clock(device) - t0
            check = _gate([got], ["logits"], [ref32(x)], [ref64(x.double())])
            row: dict = {"check": check, "first_call_s": first_call_s}
            if check["ok"]:
                for _ in range(3):
                    model(x)
                row["forward"] = _stats(_time_calls(model, x, spec["min_time_s"], spec["blocks"]))
            result["batches"][str(batch)] = row
    return result


# ----------------------------------------------------------------------------
# Profile of the fused training step
# ----------------------------------------------------------------------------

# Name fragments of the top-level operator (forward) or autograd node
# (backward) -> layer; first match wins. Every operator's self CPU time is
# charged to the layer of its top-level ancestor, so nothing is counted twice.
LAYERS = (
    ("conv_relu_maxpool2d", "conv blocks"),
    ("ConvReluMaxpool2D", "conv blocks"),
    ("batch_norm", "BatchNorm"),
    ("BatchNorm", "BatchNorm"),
    ("channel_moments", "BatchNorm"),  # bn1 folded into block 2 (fmnist_ext/bn_fold.py)
    ("MomentsOfBlockInput", "BatchNorm"),
    ("linear", "Linear"),
    ("addmm", "Linear"),
    ("Addmm", "Linear"),
    ("TBackward", "Linear"),
    ("relu", "ReLU"),
    ("Relu", "ReLU"),
    ("threshold", "ReLU"),
    ("cross_entropy", "cross-entropy"),
    ("log_softmax", "cross-entropy"),
    ("LogSoftmax", "cross-entropy"),
    ("nll_loss", "cross-entropy"),
    ("NllLoss", "cross-entropy"),
    ("AccumulateGrad", "gradient accumulation"),
    ("flatten", "flatten/view"),
    ("View", "flatten/view"),
    ("aten::add_", "BatchNorm"),  # num_batches_tracked += 1
)
_NODE = "autograd::engine::evaluate_function: "


def _layer(top_name: str) -> str:
    for frag, layer in LAYERS:
        if frag in top_name:
            return layer
    return "other: " + top_name.removeprefix(_NODE)


def _charge(ev) -> str:
    """'phase | layer' for one profiler event (its self time goes there)."""
    top, p = ev, ev.cpu_parent
    while p is not None and not p.name.startswith("phase:"):
        if p.name.startswith(_NODE):
            top = p  # innermost autograd node wins in the backward
            break
        top, p = p, p.cpu_parent
    while p is not None and not p.name.startswith("phase:"):
        p = p.cpu_parent
    if p is None:
        return "outside the step phases | " + _layer(top.name)
    phase = p.name[len("phase:") :]
    if phase in ("zero_grad", "optimizer", "data"):
        return f"{phase} | all"
    return f"{phase} | {_layer(top.name)}"


def profile_task(spec: dict) -> dict:
    from torch.profiler import ProfilerActivity, profile, record_function

    batch, steps, device = spec["batch"], spec["profile_steps"], _device(spec)
    images, labels = _data(batch, 4, device)
    model = _model("fused", device)
    opt = torch.optim.Adam(model.parameters(), lr=LR)

    def step(i: int):
        with record_function("phase:data"):
            x, y = _normalise(images[i % 4]), labels[i % 4]
        with record_function("phase:zero_grad"):
            opt.zero_grad(set_to_none=True)
        with record_function("phase:forward"):
            logits = model(x)
        with record_function("phase:loss"):
            loss = F.cross_entropy(logits, y)
        with record_function("phase:backward"):
            loss.backward()
        with record_function("phase:optimizer"):
            opt.step()

    for i in range(3):
        step(i)
    t0 = _clock(device)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(steps):
            step(i)
    wall = (_clock(device) - t0) / steps
    per: dict[str, float] = defaultdict(float)
    for ev in prof.events():
        if ev.name.startswith("phase:"):
            # time inside a phase but in no operator: Python, autograd, dispatch
            per[f"{ev.name[len('phase:') :]} | not in an operator (Python, autograd engine)"] += (
                ev.self_cpu_time_total / 1e6 / steps
            )
            continue
        per[_charge(ev)] += ev.self_cpu_time_total / 1e6 / steps
    return {
        "steps": steps,
        "device": device.type,
        "wall_per_step_s": wall,
        "self_cpu_s_per_step": dict(sorted(per.items())),
    }


TASKS = {"train": train_task, "infer": infer_task, "profile": profile_task}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m fmnist_ext.benchmark.model_worker SPEC_JSON", file=sys.stderr)
        return 2
    spec = json.loads(argv[0])
    torch.set_num_threads(spec["threads"])
    result = TASKS[spec["task"]](spec)
    result["spec"] = spec
    import fmnist_ext

    result["fused_compiled"] = fmnist_ext.uses_compiled_kernels(spec["device"])
    print(json.dumps(result, allow_nan=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
