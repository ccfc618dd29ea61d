"""The ``edgesqz`` command: a thin layer over the library.

Every command imports what it needs when it runs, so ``run``, ``classify`` and ``bench`` never
import TensorFlow or PyTorch. Errors the user can fix print one line and exit non-zero.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from edgesqz import __version__
from edgesqz.errors import EdgesqzError

app = typer.Typer(
    name="edgesqz",
    help="SqueezeNet on the edge: convert to full-integer TFLite, then classify camera frames on a Raspberry Pi.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"edgesqz {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version_callback, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """SqueezeNet on the edge."""


def main() -> None:
    try:
        app()
    except EdgesqzError as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
