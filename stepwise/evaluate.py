"""Entry point: ``python -m stepwise.evaluate gt=FILE predictions=FILE [train_gt=FILE] [out=DIR] [evaluator=auto] [max_dets=300]``.

Prints the metric table and, with ``out=DIR``, writes ``DIR/metrics.json`` and ``DIR/per_class.csv``.
Arguments are ``key=value``; the mode is chosen by the keys present (``predictions=`` today). Another mode
(e.g. ``checkpoint=``, which runs a model first) is one more entry in ``MODES``.
Exit codes: 0 success, 1 bad input (missing/invalid file, unknown image or category), 2 bad arguments.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from stepwise.evaluation import evaluate_lvis


class UsageError(ValueError):
    """Bad command-line arguments (exit code 2)."""


@dataclass(frozen=True)
class Mode:
    """A way to run the evaluation: chosen when ``key`` is given; ``run(args)`` does it and returns an exit code."""

    key: str
    required: tuple[str, ...]
    optional: tuple[str, ...]
    run: Callable[[dict[str, str]], int]
    usage: str


def _run_predictions(args: dict[str, str]) -> int:
    try:
        max_dets = int(args.get("max_dets", "300"))
    except ValueError:
        raise UsageError(f"max_dets must be an integer, got {args['max_dets']!r}") from None
    evaluator = args.get("evaluator", "auto")
    if evaluator not in ("auto", "lvis", "faster"):
        raise UsageError(f"evaluator must be auto, lvis or faster, got {evaluator!r}")
    report = evaluate_lvis(args["gt"], args["predictions"], train_gt=args.get("train_gt"), max_dets=max_dets, evaluator=evaluator)
    print(report.table(), end="")
    if "out" in args:
        metrics_path, csv_path = report.save(args["out"])
        print(f"wrote {metrics_path} and {csv_path}")
    return 0


MODES: dict[str, Mode] = {
    "predictions": Mode(
        key="predictions",
        required=("gt", "predictions"),
        optional=("train_gt", "out", "evaluator", "max_dets"),
        run=_run_predictions,
        usage="gt=FILE predictions=FILE [train_gt=FILE] [out=DIR] [evaluator=auto|lvis|faster] [max_dets=300]",
    ),
}


def parse_args(argv: Sequence[str]) -> dict[str, str]:
    """``["a=1", "b=x"]`` -> ``{"a": "1", "b": "x"}``; anything else, or a repeated key, is a ``UsageError``."""
    args: dict[str, str] = {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or not key:
            raise UsageError(f"expected key=value, got {arg!r}")
        if key in args:
            raise UsageError(f"key {key!r} given twice")
        args[key] = value
    return args


def _usage() -> str:
    return "usage:\n" + "\n".join(f"  python -m stepwise.evaluate {m.usage}" for m in MODES.values())


def select_mode(args: dict[str, str]) -> Mode:
    """The mode whose key is present; checks required and unknown keys."""
    known = {k for m in MODES.values() for k in m.required + m.optional}
    unknown = sorted(set(args) - known)
    if unknown:
        raise UsageError(f"unknown key(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    present = [m for m in MODES.values() if m.key in args]
    if len(present) != 1:
        what = "no mode key" if not present else "several mode keys (" + ", ".join(m.key for m in present) + ")"
        raise UsageError(f"{what}: give exactly one of {', '.join(k + '=' for k in MODES)}")
    mode = present[0]
    unknown = sorted(set(args) - set(mode.required) - set(mode.optional))
    if unknown:
        raise UsageError(f"unknown key(s) for {mode.key}= mode: {', '.join(unknown)}; allowed: {', '.join(mode.required + mode.optional)}")
    missing = [k for k in mode.required if k not in args]
    if missing:
        raise UsageError(f"missing key(s): {', '.join(missing)}")
    return mode


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI on ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    try:
        args = parse_args(argv)
        return select_mode(args).run(args)
    except UsageError as err:
        print(f"error: {err}\n{_usage()}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
