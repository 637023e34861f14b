"""Bounded option types shared by the command modules (no nan, no inf, no huge values)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:  # generic only in newer click; plain at run time so click 8.1 works
    _ParamBase = click.ParamType[float, Any]
else:
    _ParamBase = click.ParamType


class Seconds(_ParamBase):
    """A finite number of seconds in ``0..maximum`` (nan, inf and huge values refused)."""

    name = "seconds"

    def __init__(self, maximum: float) -> None:
        self.maximum = maximum

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> float:
        """Parse the text without ever producing nan or inf."""
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        else:
            text = str(value).strip()
            if len(text) > 32:
                self.fail(f"{text[:32]!r}... is not a number of seconds", param, ctx)
            try:
                number = float(text)
            except ValueError:
                self.fail(f"{text!r} is not a number of seconds", param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number of seconds", param, ctx)
        if not 0 <= number <= self.maximum:
            self.fail(f"{number:g} is not in 0..{self.maximum:.0f} seconds", param, ctx)
        return number


WATCH_MAX_SECONDS = 30 * 86400.0
"""--monitor-duration / --duration: at most 30 days."""
GRACE_MAX_SECONDS = 3600.0
"""--grace: at most an hour between SIGTERM and SIGKILL."""
STRATEGY_CHOICES = ("score", "binpack", "spread")
"""--strategy: the values of ``config.model.Strategy``, spelled here so that ``--help`` need
not load the config package (a test checks that the two agree)."""
