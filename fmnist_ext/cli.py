"""What every command-line tool shares.

Argument types with one-line errors, the device choice, output paths checked
before any work (so a long run is not lost to a typo), and the ending: a
closed pipe or Ctrl-C is not a crash.

    @cli.guarded("fmnist_ext.evaluate")
    def main(argv=None) -> int: ...

`evaluate ... | head -1` closes stdout early: the next write raises
BrokenPipeError, and Python would print a traceback, then another one when it
flushes stdout at exit. The standard recipe: catch it, point stdout at
/dev/null so the exit flush has nowhere to fail, and exit 141 (128 + SIGPIPE,
what a shell reports for a tool killed by the signal), quietly. Ctrl-C is one
line and exit 130 (128 + SIGINT). SIGTERM (what `kill`, docker, SLURM and
torchrun send) is handled like Ctrl-C: it raises Terminated, a
KeyboardInterrupt, so every `except KeyboardInterrupt` cleans up the same
way; the exit status is then 143 (128 + SIGTERM). A path that is not valid
UTF-8 is printed as its bytes (surrogateescape), not a UnicodeEncodeError.

Output checks (check_writable, check_figure_format, check_outputs) raise
OutputError with one line naming the argument.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import NoReturn

import torch

from . import paths

DEVICES = ("auto", "cpu", "cuda")


def fail(parser: argparse.ArgumentParser, message: str, status: int = 2) -> NoReturn:
    """Print `prog: error: message` and exit with status 2 (argparse's convention for a user mistake)."""
    parser.exit(status, f"{parser.prog}: error: {message}\n")


def refuse_bad_cpu_isa(parser: argparse.ArgumentParser) -> None:
    """FMNIST_CPU_ISA naming a kernel build the CPU kernels refuse: one line,
    exit 2, before any work (the kernels would raise at their first call).
    Reads the op layer's private loader: the layer has no public name for
    this check (kernels_status() only raises it, as a ValueError)."""
    from .op import _library

    why = _library.cpu_isa_request_error()
    if why is not None:
        fail(parser, why)


class OneLineErrorParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (argparse prints the whole usage first)."""

    def error(self, message: str) -> NoReturn:
        fail(self, f"{message} (see --help)")


def parsed(text: str, cast, acceptable, expected: str):
    """argparse type helper: cast(text), refused with one message unless acceptable."""
    try:
        v = cast(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not acceptable(v):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return v


def positive_int(text: str) -> int:
    return parsed(text, int, lambda v: v >= 1, "a positive integer")


def nonneg_int(text: str) -> int:
    return parsed(text, int, lambda v: v >= 0, "a non-negative integer")


def batch_size(text: str) -> int:
    """A training batch size: at least 2, since BatchNorm cannot train on a batch of one image."""
    return parsed(text, int, lambda v: v >= 2, "an integer >= 2 (BatchNorm cannot train on one image)")


MAX_THREADS = 1024


def thread_count(text: str) -> int:
    """A torch thread count: [1, MAX_THREADS] (torch.set_num_threads takes a C int)."""
    return parsed(text, int, lambda v: 1 <= v <= MAX_THREADS, f"an integer in [1, {MAX_THREADS}]")


def positive_float(text: str) -> float:
    return parsed(text, float, lambda v: v > 0 and v != float("inf"), "a positive number")


def fraction(text: str) -> float:
    """A number in [0, 1)."""
    return parsed(text, float, lambda v: 0 <= v < 1, "a number in [0, 1)")


def nonneg_float(text: str) -> float:
    return parsed(text, float, lambda v: v >= 0 and v != float("inf"), "a non-negative number")


def add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument(
        "--data-dir",
        default=None,
        metavar="DIR",
        help="folder with the four Fashion-MNIST IDX files (gzipped or not; torchvision's "
        "ROOT/FashionMNIST/raw works too). Default: $FMNIST_DATA, the user cache, "
        "/usr/share/datasets/fashion-mnist, then a download into the user cache",
    )
    g.add_argument("--no-download", action="store_true", help="never download; fail if the files are not found")
    g.add_argument(
        "--no-verify",
        action="store_true",
        help="skip the MD5 check against the official files (for other IDX data of the same format)",
    )


def resolve_device(parser: argparse.ArgumentParser, name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            fail(
                parser,
                "argument --device: cuda requested but no CUDA device is available "
                f"(torch {torch.__version__}); use --device cpu",
            )
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def flag_pair(p, name: str, help_on: str, help_off: str) -> None:
    """--NAME / --no-NAME, default None (meaning: take it from the recipe)."""
    dest = name.replace("-", "_")
    p.add_argument(f"--{name}", dest=dest, action="store_true", default=None, help=help_on)
    p.add_argument(f"--no-{name}", dest=dest, action="store_false", help=help_off)


def print_err(*a) -> None:
    print(*a, file=sys.stderr)


def prog(module: str) -> str:
    """`python -m MODULE`, or the console script's name (fmnist-*) when run as one."""
    argv0 = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return argv0 if argv0.startswith("fmnist-") else f"python -m {module}"


# --------------------------------------------------------------------------- outputs


class OutputError(Exception):
    """An output path that cannot be written (the message names the argument and the path)."""


def check_writable(path: str | os.PathLike, arg: str, make_parents: bool = True) -> Path:
    """Refuse `path` unless a file can be written there (probed with a temp file, removed again)."""
    path = Path(path)
    if str(path) in ("", "."):
        raise OutputError(f"argument {arg}: empty path")
    try:
        what, parent_is = paths.kind(path), paths.kind(path.parent)
    except paths.PathError as e:
        raise OutputError(f"argument {arg}: {e}") from None
    if what == paths.FOLDER:
        raise OutputError(f"argument {arg}: {path} is a folder, expected a file name")
    parent = path.parent
    if parent_is != paths.FOLDER:
        if parent_is != paths.MISSING:
            raise OutputError(f"argument {arg}: {parent} (folder of {path}) is not a folder")
        if not make_parents:
            raise OutputError(f"argument {arg}: folder {parent} does not exist")
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"argument {arg}: cannot create folder {parent} for {path}: {e.strerror or e}") from None
    try:  # os.access is not enough (root, read-only mounts): try it
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.", suffix=".probe")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise OutputError(f"argument {arg}: cannot write {path}: {e.strerror or e}") from None
    return path


def check_outputs(paths_by_arg: dict[str, str | os.PathLike | None], figures: tuple[str, ...] = ()) -> None:
    """Before a long run: every given output writable (check_writable), those in
    `figures` in a format matplotlib writes, and no two the same file (one would
    silently replace the other). Keys are the arguments' names (`--json`)."""
    seen: dict[Path, str] = {}
    for arg, path in paths_by_arg.items():
        if path is None:
            continue
        if arg in figures:
            check_figure_format(path, arg)
        check_writable(path, arg)
        key = Path(path).resolve()
        if key in seen:
            raise OutputError(f"argument {arg}: {path} is also the {seen[key]} file")
        seen[key] = arg


def check_figure_format(path: str | os.PathLike, arg: str) -> str:
    """The format matplotlib will write `path` in (its extension; png without one), refused
    with the list of supported ones when matplotlib cannot write it."""
    fmt = Path(path).suffix.lstrip(".").lower() or "png"
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        raise OutputError(f"argument {arg}: writing {path} needs matplotlib (pip install matplotlib)") from None
    supported = FigureCanvasBase.get_supported_filetypes()
    if fmt not in supported:
        raise OutputError(
            f"argument {arg}: cannot write {path}: unknown image format {fmt!r} "
            f"(extensions: {', '.join(sorted(supported))})"
        )
    return fmt


# --------------------------------------------------------------------------- ending

EXIT_BROKEN_PIPE = 141
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a tool stopped by Ctrl-C


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C would raise KeyboardInterrupt."""


def _raise_terminated(signum, frame):
    raise Terminated


def handle_sigterm_like_ctrl_c() -> None:
    """SIGTERM raises Terminated (only the main thread may set a handler; an ignored
    SIGTERM stays ignored)."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _raise_terminated)


def exit_status(e: KeyboardInterrupt) -> int:
    """128 + the signal: 143 for SIGTERM (Terminated), 130 for Ctrl-C."""
    return 128 + signal.SIGTERM if isinstance(e, Terminated) else EXIT_INTERRUPTED


def silence_stdout() -> None:
    """Send whatever is still buffered for stdout, and any later write, to /dev/null."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # stdout is not a real file (tests, embedding)
        pass


def bytes_safe_output() -> None:
    """Paths that are not valid UTF-8 (Python holds them as surrogate escapes)
    printed as the bytes they are, as `ls` does, instead of a UnicodeEncodeError
    after the work is done."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, ValueError, OSError):  # not a real text stream (tests)
            stream.reconfigure(errors="surrogateescape")


def guarded(module: str, name: str | None = None):
    """Decorator for the `main` of `python -m MODULE`: BrokenPipeError on stdout ->
    exit 141 quietly; KeyboardInterrupt -> `PROG: interrupted` on stderr, exit 130
    (SIGTERM: `PROG: terminated`, exit 143).
    PROG is `name` if given (the parser's prog), else as prog() names the module."""

    def shown_name() -> str:
        return name or prog(module)  # the console script's name when run as one

    def wrap(main):
        @functools.wraps(main)
        def run(*args, **kwargs) -> int:
            bytes_safe_output()
            handle_sigterm_like_ctrl_c()
            try:
                rc = main(*args, **kwargs)
                sys.stdout.flush()  # a closed pipe shows up here, not at interpreter exit
                return rc
            except BrokenPipeError:
                silence_stdout()
                return EXIT_BROKEN_PIPE
            except KeyboardInterrupt as e:
                with contextlib.suppress(OSError, ValueError):  # stderr closed too: the exit status still says it
                    what = "terminated" if isinstance(e, Terminated) else "interrupted"
                    print(f"{shown_name()}: {what}", file=sys.stderr, flush=True)
                return exit_status(e)

        return run

    return wrap
