"""The `covspec` command's argument types and its one error boundary.

    >>> p = Parser(prog="covspec"); p.add_argument("--toy", type=at_least(1))
    >>> sys.exit(run_guarded("bench", lambda: bench(args), debug="--debug" in argv))

A user mistake (a bad value, a missing file or folder, a refused input: ValueError and the
project's errors built on it, OSError, FloatingPointError, a bad recipe key or value, Lightning's
misconfiguration) prints
one line, `covspec <command>: error: <what>`, and exits 2; `--debug` (or COVSPEC_DEBUG=1) adds
the traceback. Anything else is a bug and keeps its traceback. Numeric flags are checked by
their argparse type, so `--max-new-tokens 0` is refused before any model loads.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import traceback
from collections.abc import Callable


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block) and the same class for subcommands."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def at_least(low: int) -> Callable[[str], int]:
    """An int flag >= `low`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def between(low: float | None, high: float | None) -> Callable[[str], float]:
    """A finite float flag in [low, high] (None: unbounded on that side)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if (
            not math.isfinite(value)
            or (low is not None and value < low)
            or (high is not None and value > high)
        ):
            raise argparse.ArgumentTypeError(f"must be in [{low}, {high}], got {value}")
        return value

    parse.__name__ = "number"
    return parse


def _user_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [
        ValueError, OSError, FloatingPointError, argparse.ArgumentError,  # a bad recipe key
    ]  # fmt: skip
    if "lightning" in sys.modules:  # a bad trainer setting, reported by Lightning
        from lightning.fabric.utilities.exceptions import MisconfigurationException

        errors.append(MisconfigurationException)
    return tuple(errors)


def debug_requested(argv: list[str]) -> tuple[bool, list[str]]:
    """(whether --debug was given anywhere or COVSPEC_DEBUG is set, argv without --debug)."""
    debug = "--debug" in argv or os.environ.get("COVSPEC_DEBUG", "") not in ("", "0")
    return debug, [a for a in argv if a != "--debug"]


def run_guarded(command: str, fn: Callable[[], object], debug: bool = False) -> int:
    """Run `fn`; a user mistake becomes one line on stderr and exit status 2."""
    try:
        fn()
    except KeyboardInterrupt:
        print(f"covspec {command}: interrupted", file=sys.stderr)
        return 130
    except _user_errors() as e:
        if debug:
            traceback.print_exc()
        message = " ".join(str(e).split()) or type(e).__name__
        hint = "" if debug else " (--debug for the traceback)"
        print(f"covspec {command}: error: {message}{hint}", file=sys.stderr)
        return 2
    return 0
