"""One-line errors for every command line of the project (``atlas-shards``, ``atlas-train``, ``atlas-evaluate``).

Every failure ends as ``Error: <what>`` on one line and exit status 1: the
expected ones (each command raises ``click.ClickException`` naming the file
and the reason) and the unexpected ones (an ``OSError`` names its path:
a full disk, a permission, an output path under a file). A traceback is
printed only when asked for: ``--debug`` before the command, or
``ATLAS_DEBUG=1`` in the environment (torchrun children inherit it).
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
import traceback
from collections.abc import Iterator

import click

DEBUG_ENV = "ATLAS_DEBUG"


def one_line(exc: BaseException) -> str:
    """The error in one line: a path and its reason for an OSError; no traceback a DataLoader worker wraps around it."""
    if isinstance(exc, OSError) and exc.strerror:
        where = exc.filename if exc.filename is not None else "writing output"
        text = f"{where}: {exc.strerror}"
        if exc.errno == errno.ENOSPC:
            text += " (the disk is full: free space and run the same command again; finished work is kept)"
        return text
    text = str(exc).strip()
    if "Original Traceback" in text:  # a DataLoader worker's exception, re-raised with its traceback as text
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return text.splitlines()[0] if text else type(exc).__name__


@contextlib.contextmanager
def expected(*errors: type[BaseException]) -> Iterator[None]:
    """The errors a command expects of its API call become its one-line ``Error:`` (no traceback, even in debug)."""
    try:
        yield
    except errors as exc:
        raise click.ClickException(one_line(exc)) from exc


def debugging(ctx: click.Context | None = None) -> bool:
    asked = ctx is not None and ctx.meta.get("debug", False)
    return bool(asked or os.environ.get(DEBUG_ENV, "") not in ("", "0"))


def _remember(ctx: click.Context, _param, value: bool) -> None:
    ctx.meta["debug"] = value  # meta is shared by the group's context and its command's


class OneLineErrors(click.Group):
    """A command group whose failures are one line, with a ``--debug`` flag for the traceback."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.params.append(
            click.Option(
                ["--debug"],
                is_flag=True,
                expose_value=False,
                callback=_remember,
                help=f"Show the full traceback of an error (or set {DEBUG_ENV}=1).",
            )
        )

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort):
            raise
        except KeyboardInterrupt:  # Ctrl-C: the shell's convention, 128 + SIGINT, in every command
            click.echo("interrupted", err=True)
            raise SystemExit(130) from None
        except click.ClickException as exc:
            cause = exc.__cause__ or exc.__context__
            if debugging(ctx) and cause is not None:
                traceback.print_exception(cause, file=sys.stderr)
            raise
        except Exception as exc:
            if debugging(ctx):
                raise
            known = isinstance(exc, OSError)
            hint = "" if known else f" ({type(exc).__name__}; run with --debug for the traceback)"
            raise click.ClickException(one_line(exc) + hint) from None
