"""Benchmark of the fused Conv2d+ReLU+MaxPool2d operator against stock PyTorch.

    python python/benchmark.py [--device cpu|cuda] [--threads N]
        [--batch-sizes 1,64,256,1000,4096] [--blocks 1,2]
        [--impls fused,stock,compile] [--no-model] [--quick]
        [--json PATH] [--png PATH] [--markdown PATH] [--min-run-time SECONDS]

(also ``fmnist-benchmark ...`` once installed, or ``python -m fmnist_ext.benchmark``
from outside the source tree).

What it measures, all in one run:

* the machine's ceilings: a large float32 matmul (GFLOP/s) and a large copy
  (GB/s) on the benchmarked device;
* per conv block of the seed CNN and per batch size, three passes --
  ``fwd`` (forward under no_grad), ``fwd+bwd`` (forward and backward for weight
  and bias only: the model's first block needs no input gradient) and
  ``fwd+bwd+dx`` (also the input gradient) -- for three implementations:
  ``fused`` (fmnist_ext.conv_relu_maxpool2d), ``stock`` (F.conv2d, F.relu,
  F.max_pool2d in eager mode; also what fmnist_ext's pure-PyTorch fallback
  computes) and ``compile`` (torch.compile of the stock sequence; compile
  time reported separately);
* on the same device, the whole seed CNN: the whole-model section
  (``python -m fmnist_ext.benchmark.model --device ...``; each implementation
  in its own process: training step and epoch, eval inference at batch 1 and
  1000 including FashionCNN.for_inference(), torch.compile, a per-layer
  profile of the fused step, both allocator settings on the CPU; with
  --quick, the training step and epoch of stock and fused only, at batch 256).

Before any timing, each implementation is checked against stock on the very
inputs that are then timed, and refused if it does not match. Every figure
printed is a time measured in this run or a ratio of such times.

One job per module, in the order a run uses them:

  cli.py            options, checks before any timing, output files, main()
  runner.py         one run: arguments -> report
  machine.py        the machine, software and commit the figures belong to
  ceilings.py       sgemm and copy ceilings of the device
  blocks.py         the seed CNN's conv blocks, passes, FLOP and byte conventions
  impls.py          the implementations, their inputs, one pass of each
  gate.py           the correctness gate (also used by the model workers)
  compile_cache.py  torch.compile with cold caches
  timing.py         interleaved torch.utils.benchmark timing
  rows.py           one row: gate, then timing, then the derived rates
  model.py          the whole-model section (parent, CLI), model_worker.py its
                    measuring processes, model_render.py its markdown
  render.py         the report's markdown; chart.py the PNG chart

Nothing is imported here, so ``python -m fmnist_ext.benchmark.model`` and the
workers do not load the per-block benchmark.
"""
