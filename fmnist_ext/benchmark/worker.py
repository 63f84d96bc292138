"""One whole-model measurement in its own process (whole_model.py starts them):

    python -m fmnist_ext.benchmark.worker '{"task": "train", "impl": "fused", "device": "cpu", ...}'

prints one JSON line. One process per implementation because the allocator
state one model leaves behind skews whichever model is timed after it. On CUDA
the model, data and stock references live on the GPU, every clock reading
follows torch.cuda.synchronize(), and TF32 is off.

Tasks: ``train`` (zero_grad, forward, cross-entropy, backward, Adam lr 0.01 at
batch B on synthetic uint8 images normalised per step; per-step times, then
whole epochs), ``infer`` (eval forward under no_grad per batch size) and
``profile`` (torch.profiler self CPU time of fused training steps by phase and
layer; on CUDA that is the host's time, not the GPU's). Before timing, train and
infer check the implementation against the stock model in float32 and float64
(loss and every gradient, or the logits); a mismatch is refused, not timed.
"""

from __future__ import annotations

import functools
import json
import sys
from collections import defaultdict

import torch
import torch.nn.functional as F

from .measure import MEAN, STD, autorange, clock, compare, fp32_means_fp32, stats

LR = 0.01


def _device(spec: dict) -> torch.device:
    device = torch.device(spec["device"])
    fp32_means_fp32(device)
    return device


def _model(kernels: str, device: torch.device, dtype=torch.float32):
    from ..model import FashionCNN

    torch.manual_seed(0)  # the same initial weights for every implementation
    return FashionCNN(kernels).to(device, dtype)


def _eval_model(kernels: str, device: torch.device, dtype=torch.float32):
    """In eval mode, with non-trivial BatchNorm statistics (drawn in float32 whatever the dtype)."""
    m = _model(kernels, torch.device("cpu"), dtype)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for bn in (m.bn1, m.bn2):
            r = torch.rand(4, bn.num_features, generator=gen).to(dtype)
            bn.running_mean.copy_(r[0] * 0.4 - 0.2)
            bn.running_var.copy_(r[1] + 0.5)
            bn.weight.copy_(r[2] + 0.5)
            bn.bias.copy_(r[3] * 0.2 - 0.1)
    return m.to(device).eval()


def _trained(kernels="fused", compiled=False, bn_fold=True, **adam):
    """A training implementation: device -> (model to call, module Adam updates, Adam kwargs)."""

    def build(device):
        if not bn_fold:  # bn1 as its own layer instead of folded into conv block 2 (this process only)
            from .. import bn_fold as fold

            fold.applies = lambda *a: False
        base = _model(kernels, device)
        return (torch.compile(base) if compiled else base), base, adam

    return build


# The whole-model implementations: name -> device -> what to time. Adding one is one entry here.
TRAIN = {
    "fused": _trained(),
    "stock": _trained("stock"),
    "compile": _trained("stock", compiled=True),
    "fused-adam-foreach": _trained(foreach=True),
    "fused-adam-fused": _trained(fused=True),
    "fused-bn1-unfolded": _trained(bn_fold=False),
}
INFER = {
    "stock": lambda device: _eval_model("stock", device),
    "fused": lambda device: _eval_model("fused", device),
    "inference": lambda device: _eval_model("fused", device).for_inference(),  # FashionCNN.for_inference()
    "compile": lambda device: torch.compile(_eval_model("stock", device)),
}


def _normalise(u8: torch.Tensor) -> torch.Tensor:
    return u8.float().div_(255).sub_(MEAN).div_(STD)


def _data(batch: int, steps: int, device: torch.device):
    """Synthetic uint8 images and labels, drawn on the CPU (the same on every device)."""
    gen = torch.Generator().manual_seed(1234)
    images = torch.randint(0, 256, (steps, batch, 1, 28, 28), dtype=torch.uint8, generator=gen)
    return images.to(device), torch.randint(0, 10, (steps, batch), generator=gen).to(device)


def _loss_and_grads(model, x, y) -> list[torch.Tensor]:
    model.train()
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    out = [loss.detach().reshape(1)] + [p.grad.detach().clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return out


def train_task(spec: dict) -> dict:
    device, steps = _device(spec), spec["epoch_steps"]
    images, labels = _data(spec["batch"], steps, device)
    x0, y0 = _normalise(images[0]), labels[0]
    model, base, adam = TRAIN[spec["impl"]](device)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    t0 = clock(device)
    got = _loss_and_grads(model, x0, y0)  # compiles, for torch.compile
    first_call_s = clock(device) - t0
    ref32 = _loss_and_grads(_model("stock", device), x0, y0)
    ref64 = _loss_and_grads(_model("stock", device, torch.float64), x0.double(), y0)
    names = ["loss"] + [n for n, _ in base.named_parameters()]
    result = {"check": compare(got, ref32, names, ref64), "first_call_s": first_call_s, "adam": adam or "default"}
    if not result["check"]["ok"]:
        return result
    base.load_state_dict(state)  # the gate ran BatchNorm in training mode
    opt = torch.optim.Adam(base.parameters(), lr=LR, **adam)

    def step(i: int):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(_normalise(images[i % steps])), labels[i % steps]).backward()
        opt.step()

    for i in range(spec["warmup_steps"]):
        step(i)
    times = []
    for i in range(spec["timed_steps"]):
        t = clock(device)
        step(i)
        times.append(clock(device) - t)
    t = clock(device)
    for i in range(steps):
        step(i)
    return {**result, "step": stats(times), "epoch": stats([clock(device) - t])}


def infer_task(spec: dict) -> dict:
    device = _device(spec)
    model = INFER[spec["impl"]](device)
    ref32, ref64 = _eval_model("stock", device), _eval_model("stock", device, torch.float64)
    gen, out = torch.Generator().manual_seed(99), {}
    with torch.no_grad():
        for batch in spec["infer_batches"]:
            x = _normalise(torch.randint(0, 256, (batch, 1, 28, 28), dtype=torch.uint8, generator=gen).to(device))
            t0 = clock(device)
            got = model(x)  # compiles for this shape, for torch.compile
            row = {"first_call_s": clock(device) - t0}
            row["check"] = compare([got], [ref32(x)], ["logits"], [ref64(x.double())])
            if row["check"]["ok"]:
                row["forward"] = stats(autorange(functools.partial(model, x), spec["threads"], spec["min_time_s"]))
            out[str(batch)] = row
    return {"batches": out}


# layer -> name fragments of a top-level operator (forward) or autograd node (backward); first match
# wins. Each operator's self CPU time goes to its top-level ancestor's layer: nothing counted twice.
LAYERS = {
    "conv blocks": ("conv_relu_maxpool2d", "ConvReluMaxpool2D"),
    # channel_moments: bn1 folded into conv block 2 (fmnist_ext/bn_fold.py); add_: num_batches_tracked += 1
    "BatchNorm": ("batch_norm", "BatchNorm", "channel_moments", "MomentsOfBlockInput", "aten::add_"),
    "Linear": ("linear", "addmm", "Addmm", "TBackward"),
    "ReLU": ("relu", "Relu", "threshold"),
    "cross-entropy": ("cross_entropy", "log_softmax", "LogSoftmax", "nll_loss", "NllLoss"),
    "gradient accumulation": ("AccumulateGrad",),
    "flatten/view": ("flatten", "View"),
}
_NODE = "autograd::engine::evaluate_function: "


def _charge(ev) -> str:
    """'phase | layer' that one profiler event's self time is charged to."""
    top, p = ev, ev.cpu_parent
    while p is not None and not p.name.startswith("phase:"):
        if p.name.startswith(_NODE):
            top = p  # the innermost autograd node, in the backward
            break
        top, p = p, p.cpu_parent
    while p is not None and not p.name.startswith("phase:"):
        p = p.cpu_parent
    layer = next((k for k, frags in LAYERS.items() if any(f in top.name for f in frags)), None)
    layer = layer or "other: " + top.name.removeprefix(_NODE)
    if p is None:
        return "outside the step phases | " + layer
    phase = p.name.removeprefix("phase:")
    return f"{phase} | all" if phase in ("zero_grad", "optimizer", "data") else f"{phase} | {layer}"


def profile_task(spec: dict) -> dict:
    from torch.profiler import ProfilerActivity, profile, record_function

    device, steps = _device(spec), spec["profile_steps"]
    images, labels = _data(spec["batch"], 4, device)
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
    t0 = clock(device)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(steps):
            step(i)
    wall = (clock(device) - t0) / steps
    per: dict[str, float] = defaultdict(float)
    for ev in prof.events():
        phase = ev.name.removeprefix("phase:")
        key = f"{phase} | not in an operator (Python, autograd engine)" if phase != ev.name else _charge(ev)
        per[key] += ev.self_cpu_time_total / 1e6 / steps
    return {"steps": steps, "wall_per_step_s": wall, "self_cpu_s_per_step": dict(sorted(per.items()))}


TASKS = {"train": train_task, "infer": infer_task, "profile": profile_task}


def main(argv: list[str]) -> int:
    import fmnist_ext

    from ..op._torch_internals import disable_compile_caches

    spec = json.loads(argv[0])
    torch.set_num_threads(spec["threads"])
    disable_compile_caches()  # and the parent gives torch.compile a fresh cache folder: cold compiles
    result = TASKS[spec["task"]](spec)
    result.update(spec=spec, fused_compiled=fmnist_ext.uses_compiled_kernels(spec["device"]))
    print(json.dumps(result, allow_nan=False))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
