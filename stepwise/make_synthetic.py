"""Entry: ``python -m stepwise.make_synthetic out=DIR [preset=tiny|small|study|large] [seed=0] [workers=N]``.

Writes the built-in long-tailed data set (see :mod:`stepwise.data.synthetic`) into DIR and prints a
summary. When DIR already holds the same preset and seed it only says so. Exit codes: 0 done, 1 the
output directory holds something else, 2 bad arguments (unknown key, bad value, missing ``out``).
"""

from __future__ import annotations

import sys

from stepwise.cli import UsageError, parse_args, parse_int
from stepwise.data.synthetic import PRESETS, ensure_synthetic, format_summary, read_meta

USAGE = "usage: python -m stepwise.make_synthetic out=DIR [preset=tiny|small|study|large] [seed=0] [workers=N, 0 = auto]"
DEFAULTS = {"out": None, "preset": "small", "seed": "0", "workers": None}


def options(argv: list[str]) -> dict:
    """``key=value`` arguments -> {out: str, preset: str, seed: int, workers: int | None}."""
    given = parse_args(argv)
    unknown = [key for key in given if key not in DEFAULTS]
    if unknown:
        raise UsageError(f"unknown key {unknown[0]!r}; known keys: {', '.join(DEFAULTS)}")
    args = {**DEFAULTS, **given}
    if not args["out"]:
        raise UsageError("missing out=DIR")
    for key in ("seed", "workers"):
        if args[key] is not None:
            args[key] = parse_int(key, args[key], minimum=0)
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the entry point; returns the exit code."""
    try:
        args = options(sys.argv[1:] if argv is None else argv)
        if args["preset"] not in PRESETS:
            raise UsageError(f"unknown preset {args['preset']!r}; known: {', '.join(PRESETS)}")
    except UsageError as err:
        print(f"make_synthetic: {err}\n{USAGE}", file=sys.stderr)
        return 2
    existed = read_meta(args["out"]) is not None
    try:
        root = ensure_synthetic(args["out"], args["preset"], args["seed"], workers=args["workers"] or None)
    except FileExistsError as err:
        print(f"make_synthetic: {err}", file=sys.stderr)
        return 1
    if existed:
        print(f"{root} already holds preset={args['preset']} seed={args['seed']}; nothing to do")
        print(format_summary(read_meta(root)["summary"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
