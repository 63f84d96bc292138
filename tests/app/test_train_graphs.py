"""--cuda-graphs (fmnist_ext/train/step.py) where no GPU is: the static-buffer
step against the eager step, and the refusals.

Capture and replay need a GPU (scripts/gpu_check.sh trains 20 epochs eager and
graphed there and compares the loss curves). Here the same GraphedStep runs
with capture=False: the batches go through its static buffers, the warm-up
count, the odd-size last batch and the in-place gradient zeroing, on the CPU.
"""

from __future__ import annotations

import pytest
import torch
from fmnist_app_helpers import exit_code, no_torchrun_env  # noqa: F401 (an autouse fixture)

import fmnist_ext
from fmnist_ext import train
from fmnist_ext.train.config import RunConfig
from fmnist_ext.train.recipes import RECIPES
from fmnist_ext.train.state import RunState
from fmnist_ext.train.step import GraphedStep, graph_refusal, train_step


def _config(kernels: str, **over) -> RunConfig:
    base = dict(recipe="baseline", seed=3, kernels=kernels, **RECIPES["baseline"])
    base.update(batch_size=16, epochs=1)
    return RunConfig(**{**base, **over})


def _snapshot(state: RunState) -> dict:
    out = {f"model.{k}": v.clone() for k, v in state.model.state_dict().items()}
    for i, s in enumerate(state.optimizer.state.values()):
        out.update({f"opt{i}.{k}": v.clone() for k, v in s.items() if isinstance(v, torch.Tensor)})
    return out


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
@pytest.mark.parametrize("kernels", ["fused", "stock"])
def test_static_buffer_step_equals_the_eager_step(kernels, optimizer):
    """Seven steps, one of them an odd-size batch after the warm-up: losses,
    logits, weights, BatchNorm statistics and optimizer state equal the eager
    step's bit for bit (on the CPU both run the same ops; the GPU's graphed
    Adam is capturable, which rounds its bias correction differently, so the
    GPU check compares loss curves instead)."""
    config = _config(kernels, optimizer=optimizer)
    eager = RunState.build(config, torch.device("cpu"), 112, 1)
    static = RunState.build(config, torch.device("cpu"), 112, 1)
    graphed = GraphedStep(static, static.model, config.batch_size, capture=False, warmup=2)
    gen = torch.Generator().manual_seed(0)
    for size in (16, 16, 16, 17, 16, 16, 5):  # warm-up, the static steps, odd sizes in between
        x = torch.randn(size, 1, 28, 28, generator=gen)
        y = torch.randint(0, 10, (size,), generator=gen)
        want_logits, want_loss = train_step(eager, eager.model, x, y)
        got_logits, got_loss = graphed(x, y)
        assert torch.equal(got_loss, want_loss) and torch.equal(got_logits, want_logits), size
    assert graphed.static_x is not None and graphed.static_x.shape[0] == config.batch_size
    want, got = _snapshot(eager), _snapshot(static)
    assert want.keys() == got.keys() and any(k.endswith("running_mean") for k in got)
    for k in want:
        assert torch.equal(got[k], want[k]), k


@pytest.mark.cuda
@pytest.mark.parametrize("kernels", ["fused", "stock"])
def test_graphed_step_equals_the_eager_step_on_a_gpu(kernels):
    """On a GPU: the step captured and replayed against the eager one, over
    steps before, at and after the capture and an odd-size batch. The graphed
    Adam is capturable (its bias correction is computed on the device), so the
    two agree to float32 rounding, not bit for bit: a few units in the last
    place per step, a relative 1e-5 over these six steps."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if kernels == "fused" and not fmnist_ext.uses_compiled_kernels("cuda"):
        pytest.skip("fmnist_ext was built without CUDA kernels")
    device = torch.device("cuda")
    config = _config(kernels)
    eager = RunState.build(config, device, 112, 1)
    static = RunState.build(config, device, 112, 1)
    graphed = GraphedStep(static, static.model, config.batch_size, warmup=2)
    gen = torch.Generator().manual_seed(0)
    for size in (16, 16, 16, 17, 16, 16):  # 2 warm-up, capture, odd size, 2 replays
        x = torch.randn(size, 1, 28, 28, generator=gen).to(device)
        y = torch.randint(0, 10, (size,), generator=gen).to(device)
        _, want_loss = train_step(eager, eager.model, x, y)
        _, got_loss = graphed(x, y)
        torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
    assert graphed.graph is not None
    want, got = _snapshot(eager), _snapshot(static)
    for k in want:
        torch.testing.assert_close(got[k].double(), want[k].double(), rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize(
    "over, world, device, fragment",
    [
        ({}, 1, "cpu", "needs a CUDA device"),
        ({}, 2, "cuda", "torchrun"),
        ({"schedule": "onecycle"}, 1, "cuda", "--schedule onecycle"),
        ({"schedule": "cosine"}, 1, "cuda", "--schedule cosine"),
    ],
)
def test_graph_refusal(over, world, device, fragment):
    assert fragment in graph_refusal(_config("fused", **over), device, world)
    assert graph_refusal(_config("fused"), torch.device("cuda", 0), 1) is None
    assert graph_refusal(_config("stock", optimizer="sgd", crop_pad=2, flip=True, ema=0.9), "cuda", 1) is None


@pytest.mark.parametrize(
    "args, env, fragment",
    [
        (["--device", "cpu"], {}, "needs a CUDA device"),
        (["--device", "cuda", "--schedule", "cosine"], {}, "--schedule cosine"),
        (["--device", "cuda", "--recipe", "improved"], {}, "--schedule onecycle"),
        (["--device", "cuda", "--sweep", "lr=0.01,0.02"], {}, "not supported with --sweep"),
        (["--device", "cuda"], {"RANK": "0", "WORLD_SIZE": "2"}, "torchrun"),
    ],
)
def test_cuda_graphs_refused_in_one_line_before_any_work(tmp_path, capsys, monkeypatch, args, env, fragment):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    out = tmp_path / "run"
    argv = ["--cuda-graphs", *args, "--out", str(out), "--data-dir", str(tmp_path / "no-data"), "--no-download"]
    assert exit_code(train.main, argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "argument --cuda-graphs:" in err and fragment in err, err
    assert not out.exists()  # refused before the run folder or the data


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_graphs_with_device_auto_on_a_cpu_machine_is_refused(tmp_path, capsys):
    argv = ["--cuda-graphs", "--out", str(tmp_path / "run"), "--data-dir", str(tmp_path / "x"), "--no-download"]
    assert exit_code(train.main, argv) == 2
    assert "needs a CUDA device" in capsys.readouterr().err


def test_help_says_cuda_graphs_has_not_run_on_a_gpu(capsys):
    assert exit_code(train.main, ["--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--cuda-graphs" in out and "it has not yet run on a GPU" in out
