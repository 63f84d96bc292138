"""The ending every command-line tool shares: a closed pipe or Ctrl-C is not a crash.

    @clirun.guarded("fmnist_ext.evaluate")
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
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import threading

EXIT_BROKEN_PIPE = 141
EXIT_INTERRUPTED = 130


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
    PROG is `name` if given (the parser's prog), else as cli.prog names the module."""

    def prog() -> str:
        from .cli import prog as cli_prog  # the console script's name when run as one

        return name or cli_prog(module)

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
                    print(f"{prog()}: {what}", file=sys.stderr, flush=True)
                return exit_status(e)

        return run

    return wrap
