"""Entry: ``python -m stepwise.make_synthetic out=DIR [generator=shapes|emoji] [preset=...] [seed=0] [workers=N]``.

Writes a built-in long-tailed data set into DIR and prints a summary: ``generator=shapes`` (default) the
shape x colour x texture set of :mod:`stepwise.data.synthetic` (presets tiny|small|study|large),
``generator=emoji`` the OpenMoji benchmark with LVIS's long tail of :mod:`stepwise.data.emoji_lvis`
(presets tiny|demo|study|lvis; default study). When DIR already holds the same preset and seed it only says so. Exit codes: 0 done, 1 the
output directory holds something else, 2 bad arguments (unknown key, bad value, missing ``out``).
"""

from __future__ import annotations

import sys

from stepwise.cli import UsageError, parse_args, parse_int
from stepwise.data import emoji_lvis
from stepwise.data.synthetic import PRESETS, ensure_synthetic, format_summary, read_meta

USAGE = ("usage: python -m stepwise.make_synthetic out=DIR [generator=shapes|emoji] "
         "[preset=tiny|small|study|large (shapes) | tiny|demo|study|lvis (emoji)] [seed=0] [workers=N, 0 = auto]")
DEFAULTS = {"out": None, "generator": "shapes", "preset": None, "seed": "0", "workers": None}
GENERATORS = {  # name -> (presets, default preset, ensure, read_meta, format_summary)
    "shapes": (PRESETS, "small", ensure_synthetic, read_meta, format_summary),
    "emoji": (emoji_lvis.EMOJI_PRESETS, "study", emoji_lvis.ensure_emoji, emoji_lvis.read_meta,
              emoji_lvis.format_summary),
}


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
        if args["generator"] not in GENERATORS:
            raise UsageError(f"unknown generator {args['generator']!r}; known: {', '.join(GENERATORS)}")
        presets, default, ensure, meta_of, summary_text = GENERATORS[args["generator"]]
        args["preset"] = args["preset"] or default
        if args["preset"] not in presets:
            raise UsageError(f"unknown {args['generator']} preset {args['preset']!r}; known: {', '.join(presets)}")
    except UsageError as err:
        print(f"make_synthetic: {err}\n{USAGE}", file=sys.stderr)
        return 2
    existed = meta_of(args["out"]) is not None
    try:
        root = ensure(args["out"], args["preset"], args["seed"], workers=args["workers"] or None)
    except (FileExistsError, emoji_lvis.ArtworkError) as err:
        print(f"make_synthetic: {err}", file=sys.stderr)
        return 1
    if existed:
        print(f"{root} already holds preset={args['preset']} seed={args['seed']}; nothing to do")
        print(summary_text(meta_of(root)["summary"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
