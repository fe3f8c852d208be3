"""Entry: ``python -m stepwise.check [data=...] [data.root=...] [decode=true] [workers=N] [key=value ...]``.

Checks a data set before anyone trains on it, as a stage's preflight does (:func:`stepwise.stages.parts.
preflight.preflight`), and prints one report listing every problem: the train and val annotation files (schema,
as the dataset and the LVIS evaluator load them) and every image they reference (exists, header readable,
size as annotated; ``decode=true`` decodes each fully, which also finds truncated files). Threads read the
images (``workers``, default 4 per CPU, at most 32) with a progress bar.

Exit codes: 0 everything is fine, 1 problems found (the report is on stderr), 2 bad arguments.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

from stepwise.cli import parse_bool, parse_int
from stepwise.config import ConfigError, load_config
from stepwise.data.loaders import build_dataset
from stepwise.stages.parts.preflight import preflight_report

USAGE = ("usage: python -m stepwise.check [data=<synthetic|lvis_v1|lvis_v0_5|coco>] [data.root=DIR] "
         "[decode=true|false] [workers=N] [other config overrides]")
OWN_KEYS = ("decode", "workers")


def parse_args(argv: Sequence[str]) -> tuple[dict, list[str]]:
    """Split ``argv`` into this entry's options {decode: bool, workers: int | None} and config overrides."""
    options: dict = {"decode": False, "workers": None}
    overrides = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if key not in OWN_KEYS:
            overrides.append(arg)
            continue
        if key == "decode":
            options["decode"] = parse_bool("decode", value)
        else:
            options["workers"] = parse_int("workers", value, minimum=1)
    return options, overrides


def main(argv: Sequence[str] | None = None) -> int:
    """Run the check; returns the exit code."""
    try:
        options, overrides = parse_args(sys.argv[1:] if argv is None else argv)
        cfg = load_config(overrides)
    except (ValueError, ConfigError) as err:
        print(f"stepwise.check: {err}\n{USAGE}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        train = build_dataset(cfg.data, "train", train_transforms=False)
        val = build_dataset(cfg.data, "val", train_transforms=False, categories=train.categories)
    except (OSError, ValueError, KeyError) as err:  # the annotation files themselves
        print(f"stepwise.check: {err}", file=sys.stderr)
        return 1
    report = preflight_report(cfg, train, val, decode=options["decode"], workers=options["workers"])
    took = time.perf_counter() - start
    if report:
        print(f"stepwise.check: problems found ({took:.1f} s):\n{report}", file=sys.stderr)
        return 1
    print(f"stepwise.check: {len(train)} train and {len(val)} val images fine ({took:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
