"""Benchmark of the fused Conv2d+ReLU+MaxPool2d operator against stock PyTorch and
torch.compile: `python -m fmnist_ext.benchmark --help` (also `python python/benchmark.py`,
`fmnist-benchmark`). It prints measurements: times from this run and ratios of them.

  __main__.py     the command line: options, checks before any timing, the run, output files
  measure.py      what every measurement shares: the correctness gate, interleaved timing,
                  cold torch.compile, the machine's ceilings and description
  blocks.py       per conv block, pass and batch size, interleaved in one process (IMPLS)
  whole_model.py  the whole model, one process per implementation, round and allocator setting
  worker.py       one such process: training step and epoch, eval inference, profile (TRAIN, INFER)
  report.py       the markdown report and the speedup chart

Adding an implementation is one entry in IMPLS, TRAIN or INFER: the gate, the
timing, the markdown, the chart and --impls take it from there.
"""
