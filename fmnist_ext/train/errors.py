"""The one error the training command turns into `prog: error: ...` and exit 2.

Raised by the checks of the command line, the run folders, the torchrun
environment and the checkpoint to resume; command.main prints it.
"""

from __future__ import annotations


class UsageError(Exception):
    """A mistake in the command line or the run folder: `python -m ... error: <argument>: <message>`, exit 2."""

    def __init__(self, argument: str, message: str):
        super().__init__(f"argument {argument}: {message}")
