"""What the three CLIs share: number and location types, settings from options (click only: fast --help)."""

from __future__ import annotations

import math
from dataclasses import fields
from pathlib import Path

import click

from shards import remote


class FiniteFloat(click.FloatRange):
    """A ``click.FloatRange`` that also refuses nan and inf.

    A plain range lets nan through: every comparison with nan is false.
    """

    name = "finite float"

    def convert(self, value, param, ctx):
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return super().convert(number, param, ctx)


POSITIVE = FiniteFloat(min=0, min_open=True)
RATE = FiniteFloat(0, 1)  # a share, 0..1
SEED = click.IntRange(min=0)  # numpy seeds are non-negative


class Location(click.ParamType):
    """A local path that must exist, or a URL (``s3://``, ``http(s)://``...) taken as it is."""

    name = "path|url"

    def convert(self, value, param, ctx):
        value = str(value)
        if not remote.is_remote(value) and not Path(value).exists():
            self.fail(f"{value}: no such file or directory", param, ctx)
        return value


LOCATION = Location()


def from_options(cls, options: dict, *, others: tuple = (), **given):
    """A settings dataclass from command-line options of the same names (``given`` wins).

    Every option must land in a setting: a field of ``cls`` or of ``others``
    (the command's other settings classes, built from the same options). One
    that matches none would be dropped silently, so it is refused by name.
    """
    names = {f.name for f in fields(cls)}
    stray = sorted(set(options) - names.union(*({f.name for f in fields(o)} for o in others)))
    if stray:
        raise TypeError(
            f"option(s) {', '.join(stray)} match no field of {', '.join(c.__name__ for c in (cls, *others))}"
        )
    return cls(**{k: v for k, v in options.items() if k in names and k not in given}, **given)
