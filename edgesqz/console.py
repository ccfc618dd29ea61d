"""Terminal output shared by the commands: progress bars and tables on stderr, data on stdout."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

# Pipes and CI logs get 120 columns rather than rich's default 80, so tables stay readable.
err = Console(stderr=True, width=None if sys.stderr.isatty() else 120)
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 120)


@contextmanager
def progress_bars(enabled: bool = True) -> Iterator[Callable[[str, int], Callable[[int], None]]]:
    """Yield a factory ``(description, total) -> advance(n)``; bars go to stderr and vanish when done.

    The display starts with the first bar, so a command that fails before any work prints nothing else.
    """
    if not enabled:
        yield lambda _d, _t: (lambda _n: None)
        return
    bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=err, transient=True)

    def factory(description: str, total: int) -> Callable[[int], None]:
        if not bars.live.is_started:
            bars.start()
        task = bars.add_task(description, total=total)
        return lambda n: bars.advance(task, n)

    try:
        yield factory
    finally:
        if bars.live.is_started:
            bars.stop()


def human_size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"
