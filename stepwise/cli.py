"""What every ``key=value`` entry point shares: the usage error (exit code 2), argument parsing and
:func:`main`, the ``-h`` / error / exit-code frame around an entry point's work.

Entry points whose arguments are all config overrides (``stepwise.run``, ``stepwise.select_exemplars``) go
through :func:`stepwise.config.cli_config` instead; both refuse Hydra's ``+key=value`` (it would add a key
silently).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Collection, Sequence
from typing import Any, TypeVar

T = TypeVar("T")
Errors = tuple[type[BaseException], ...]

TRUE, FALSE = ("true", "1", "yes"), ("false", "0", "no")


class UsageError(ValueError):
    """Bad command-line arguments (exit code 2)."""


def parse_args(argv: Sequence[str], repeatable: Collection[str] = ()) -> dict[str, str | list[str]]:
    """``["a=1", "b=x"]`` -> ``{"a": "1", "b": "x"}``; keys in ``repeatable`` collect a list of values.

    UsageError for an argument that is not ``key=value``, a ``+key`` (adding keys is not allowed), or a
    key given twice that is not repeatable.
    """
    args: dict[str, str | list[str]] = {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or not key:
            raise UsageError(f"expected key=value, got {arg!r}")
        if key.startswith("+"):
            raise UsageError(f"{arg!r}: adding keys is not allowed (check the spelling of {key.lstrip('+')!r})")
        if key in repeatable:
            args.setdefault(key, []).append(value)  # type: ignore[union-attr]
        elif key in args:
            raise UsageError(f"key {key!r} given twice")
        else:
            args[key] = value
    return args


def parse_bool(key: str, text: str) -> bool:
    """``true/false`` (also 1/0, yes/no) -> bool; anything else is a UsageError naming ``key``."""
    value = text.strip().lower()
    if value not in TRUE + FALSE:
        raise UsageError(f"{key} must be true or false, got {text!r}")
    return value in TRUE


def parse_int(key: str, text: str, minimum: int | None = None) -> int:
    """An integer (>= ``minimum`` when given); a UsageError naming ``key`` otherwise."""
    try:
        value = int(text)
    except ValueError:
        raise UsageError(f"{key} must be an integer, got {text!r}") from None
    if minimum is not None and value < minimum:
        raise UsageError(f"{key} must be >= {minimum}, got {value}")
    return value


def parse_number(key: str, text: str) -> float:
    """A finite number; a UsageError naming ``key`` otherwise."""
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"{key} must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise UsageError(f"{key} must be a finite number, got {text!r}")
    return value


def wants_help(argv: Sequence[str]) -> bool:
    """True for ``-h`` / ``--help`` as the first argument."""
    return bool(argv) and argv[0] in ("-h", "--help")


def main(argv: Sequence[str] | None, usage: str, run: Callable[[list[str]], T],
         finish: Callable[[T], int] | None = None, *, help: str | None = None, usage_errors: Errors = (),
         refused: Errors = (), failures: Errors = ()) -> int:
    """The frame of an entry point; returns its exit code.

    ``argv`` (default ``sys.argv[1:]``) starting with ``-h``/``--help`` prints ``help`` (default ``usage``)
    and returns 0. Otherwise ``run(argv)``: a UsageError (or one of ``usage_errors``) prints
    ``error: ...`` and the usage to stderr and returns 2; one of ``refused`` prints ``error: ...`` and
    returns 2; an OSError or ValueError (or one of ``failures``) prints ``error: ...`` and returns 1. Without
    an error the result is ``finish(run's result)`` (outside the error handling), or run's own result as
    the exit code when there is no ``finish``.
    """
    args = sys.argv[1:] if argv is None else list(argv)
    if wants_help(args):
        print(usage if help is None else help)
        return 0
    try:
        result: Any = run(args)
    except (UsageError, *usage_errors) as err:
        print(f"error: {err}\n{usage}", file=sys.stderr)
        return 2
    except refused as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (OSError, ValueError, *failures) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return result if finish is None else finish(result)
