"""One exception type for every error a user can fix.

The CLI prints ``error: <message>`` on one line and exits non-zero; the library raises it so
that callers can handle it. Messages say what went wrong *and* what to do about it.
"""

from __future__ import annotations


class EdgesqzError(Exception):
    """An error caused by the user's input or environment, with a one-line fix."""

    exit_code = 2

    def __init__(self, message: str, *, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class AccuracyGateError(EdgesqzError):
    """The exported model lost more accuracy than ``--max-drop`` allows."""

    exit_code = 3


class Interrupted(BaseException):
    """SIGTERM or SIGHUP outside a run: unwind like Ctrl-C (clean-ups run, temporary files go), then exit
    128 + the signal's number. A BaseException, so ``except Exception`` blocks do not swallow it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
