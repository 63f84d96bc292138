"""Train the FashionCNN on Fashion-MNIST.

    python -m fmnist_ext.train                          # the baseline recipe, fused kernels
    python -m fmnist_ext.train --recipe improved --out runs/improved
    python -m fmnist_ext.train --out runs/x --resume    # continue an interrupted run
    python -m fmnist_ext.train --sweep lr=0.01,0.001 batch_size=100,1000
    python -m torch.distributed.run --nproc_per_node=2 -m fmnist_ext.train ...

The run folder (--out) receives: checkpoint.pt (after every epoch and on
Ctrl-C), metrics.jsonl (one line per epoch), and at the end confusion.png,
curves.png, summary.json. All files are written atomically. Everything that
can be checked is checked before the data loads or a folder is made; the run
folder is locked for the run's life (runfolder.py).

The package, read top to bottom:
    command.py      main: the checks before any work, then a run or a sweep
    parser.py       the command line's arguments
    config.py       RunConfig: a run's settings, from the recipe and the command line or a checkpoint
    recipes.py      the named recipes, their settings' checks, the optimizer/schedule/loss they build
    run.py          one run: build or resume the state, epoch after epoch, the final results
    state.py        RunState: what a run changes, and its checkpoint round trip
    epoch.py        one epoch of training; the evaluation of a split
    step.py         one training step: eager, or replayed from a CUDA graph (--cuda-graphs)
    sweep.py        --sweep: parse, plan (all checked up front), run, the table
    distributed.py  torchrun: the Dist record, process group, all_reduce, barrier
    interrupt.py    Ctrl-C or SIGTERM: finish the batch, save, exit 130 or 143; the resume command
    divergence.py   a NaN/inf loss, weight or metric: stop, keep the last finite checkpoint, exit 1
    errors.py       UsageError: one line, exit 2
    runfolder.py    the run folder's lock and its files
    ema.py          the weight EMA (--ema)
    tblog.py        --tensorboard
"""

from .command import main
from .config import RunConfig
from .interrupt import EXIT_INTERRUPTED, Interrupted, StopRequest
from .state import RunState

__all__ = ["EXIT_INTERRUPTED", "Interrupted", "RunConfig", "RunState", "StopRequest", "main"]
