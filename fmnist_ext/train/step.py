"""One training step, eager or replayed from a CUDA graph (--cuda-graphs).

The eager step (train_step) zeroes the gradients, runs the forward, the loss,
the backward and the optimizer step; every op is a kernel launch issued from
Python, so at batch 1000 on a large GPU the host, not the GPU, bounds the
step. GraphedStep captures that same step once in a CUDA graph, on static
input buffers the batches are copied into (the data and the batches are on
the device already), and replays it: one launch per step. What the graph
holds: forward, loss, backward, the optimizer step (Adam/AdamW with
capturable=True: their step counter and bias corrections stay on the
device) and BatchNorm's running statistics (updated in place by the
forward). What stays outside, eager and in order on the same stream: the
batch's gather, augmentation and normalisation (batches.py, on the device),
the copy into the static buffers, the weight EMA and the epoch's running
sums. A learning-rate schedule is refused (graph_refusal): it sets the rate
and momentum as host numbers every step, which the graph would not see.

The first WARMUP_STEPS full-size batches train eagerly on a side stream (what
capture needs: the lazy initialisations, cuBLAS's workspace, the
optimizer's state, happen outside the graph); the next one is captured and
replayed, and so is every later full-size batch. A batch of another size
(an epoch's last, when the split does not divide) runs the same step
eagerly, zeroing the gradients in place so that the graph's gradient
buffers stay the parameters' gradients.

capture=False runs the static-buffer step without a graph: the tests
compare it with the eager step on the CPU, where no graph can be captured.
graph_refusal says where a graph cannot apply.
"""

from __future__ import annotations

import torch

WARMUP_STEPS = 3


def graph_refusal(config, device: torch.device | str, world_size: int) -> str | None:
    """Why --cuda-graphs cannot run with these settings (None when it can).
    `device` may be the --device choice ("auto" is resolved later)."""
    kind = device.type if isinstance(device, torch.device) else device
    if kind == "cpu":
        return "needs a CUDA device (CUDA graphs are a CUDA feature); drop it to train on the CPU"
    if world_size > 1:
        return "not supported under torchrun (DistributedDataParallel's gradient hooks are not captured here)"
    if config.schedule != "none":
        return (
            f"--schedule {config.schedule} changes the learning rate (and momentum) on the host every step, "
            "and a captured step keeps the values it recorded; use --schedule none"
        )
    return None


def _step_body(state, net, x, y, check=None):
    logits = net(x)
    loss = state.criterion(logits, y)
    if check is not None:
        check(loss)  # divergence.check_loss: before the step, so the weights stay finite
    loss.backward()
    state.optimizer.step()
    return logits, loss


def train_step(state, net, x, y, set_to_none: bool = True, check=None):
    """One eager step on (x, y); returns (logits, loss). check(loss), if
    given, runs before the backward and may raise to stop the step."""
    state.optimizer.zero_grad(set_to_none=set_to_none)
    return _step_body(state, net, x, y, check)


class GraphedStep:
    """train_step on static buffers, captured in a CUDA graph and replayed
    (see the module's docstring). Call it like train_step(state, net, x, y)
    without the first two; the returned logits and loss of a replay are the
    graph's own tensors, overwritten by the next step."""

    def __init__(self, state, net, batch_size: int, capture: bool = True, warmup: int = WARMUP_STEPS):
        self.state, self.net = state, net
        self.batch_size, self.capture, self.warmup = batch_size, capture, warmup
        if capture:
            # Adam/AdamW (fused: the step count is on the device already) refuse
            # to be captured unless capturable; also after a resume from an
            # eager run's checkpoint, which saved capturable=False.
            for group in state.optimizer.param_groups:
                if "capturable" in group:
                    group["capturable"] = True
        self.static_x = self.static_y = None
        self.graph = None
        self.outputs = None
        self.eager_steps = 0

    def __call__(self, x: torch.Tensor, y: torch.Tensor, check=None):
        """check(loss) as for train_step; a replayed step cannot stop half
        way, so there it runs after the step (the weights may then hold that
        step's non-finite values, which the caller must not save)."""
        if x.shape[0] != self.batch_size:
            # Zeroing in place once the graph exists: its backward writes into
            # these very gradient tensors, which the eager step then sums into.
            return train_step(self.state, self.net, x, y, set_to_none=self.graph is None, check=check)
        if self.static_x is None:
            self.static_x, self.static_y = torch.empty_like(x), torch.empty_like(y)
        self.static_x.copy_(x)
        self.static_y.copy_(y)
        if not self.capture:
            return train_step(self.state, self.net, self.static_x, self.static_y, set_to_none=False, check=check)
        if self.graph is None and self.eager_steps < self.warmup:
            self.eager_steps += 1
            return self._on_side_stream(check)
        if self.graph is None:
            self._capture()  # capturing records the step; the replay runs it
        self.graph.replay()
        if check is not None:
            check(self.outputs[1])
        return self.outputs

    def _on_side_stream(self, check):
        main = torch.cuda.current_stream()
        side = torch.cuda.Stream()
        side.wait_stream(main)  # after the copy into the static buffers (and the main stream's last use of memory)
        with torch.cuda.stream(side):
            out = train_step(self.state, self.net, self.static_x, self.static_y, check=check)
        main.wait_stream(side)
        return out

    def _capture(self):
        # Gradients None: the captured backward allocates them in the graph's
        # memory pool and writes them there on every replay.
        self.state.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.outputs = _step_body(self.state, self.net, self.static_x, self.static_y)
        self.graph = graph
