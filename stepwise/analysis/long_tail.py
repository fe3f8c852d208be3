"""Entry point: does a data set show LVIS's long-tail problem? Check trained baselines against the criteria.

    python -m stepwise.analysis.long_tail run=RUN_DIR [run=...] [plus2=RUN_DIR ...] [control=RUN_DIR ...]
        [epoch=N] [out=DIR]

``run=``: training runs (``runs/<exp>/pretrain``) of the long-tailed data, one per seed; ``control=``: the
same training on a balanced version of the same vocabulary (every class with a common class's images,
classes keeping their r / c / f bin). Each run is read at the evaluation after ``epoch`` (default: its
last), and at ``epoch + 2`` when it was evaluated there (the convergence check); or ``plus2=``, one per
``run=`` in the same order, names a run that trained it two more epochs (study=stepwise's
``baseline_plus2``), whose last evaluation is then its ``AP(+2)``. Printed: AP, APr, APc, APf,
APr / APf per run and as mean +- sd, then the criteria, each PASS or FAIL:

* APr / APf <= 0.5 (LVIS v1's Deformable DETR baseline: 0.36; v0.5: 0.49), mean over the runs;
* 20 <= AP <= 50 (neither unlearnable nor saturated);
* two more epochs move AP by less than 1 point (every run evaluated at ``epoch + 2``);
* the control's APr / APf >= 0.8 (the rare classes are learnable: the gap comes from the long tail).

With ``out=``: ``long_tail.json`` (every figure) and ``ap_by_class.png`` (bars by bin; per-class AP
against training instances with a running mean per group). Exit codes: 0 success (whether or not the
criteria pass), 1 bad input, 2 bad arguments.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

from stepwise import cli
from stepwise.analysis.steps import plot_ap_by_frequency, read_per_class
from stepwise.cli import UsageError
from stepwise.utils.io import atomic_write_json

USAGE = ("usage: python -m stepwise.analysis.long_tail run=RUN_DIR [run=...] [plus2=RUN_DIR ...] "
         "[control=RUN_DIR ...] [epoch=N] [out=DIR]")
KEYS = ("AP", "APr", "APc", "APf")
BINS = ("AP1", "AP2", "AP3", "AP4")  # AP over classes with < 10, 10-100, 100-1000, >= 1000 training instances


def eval_dir(run: Path, epoch: int | None) -> Path:
    """The evaluation directory of ``run`` after ``epoch`` (None: the last one: ``eval/`` when it holds the
    final metrics, else the highest ``eval/epoch_NNN``)."""
    if epoch is None:
        if (run / "eval" / "metrics.json").is_file():
            return run / "eval"
        epochs = sorted(run.glob("eval/epoch_*/metrics.json"))
        if not epochs:
            raise ValueError(f"{run}: no evaluation (eval/metrics.json or eval/epoch_*/metrics.json)")
        return epochs[-1].parent
    path = run / "eval" / f"epoch_{epoch:03d}"
    if not (path / "metrics.json").is_file():
        raise ValueError(f"{run}: not evaluated after epoch {epoch} ({path / 'metrics.json'} is missing)")
    return path


def read_run(run: str | Path, epoch: int | None) -> dict:
    """AP, APr, APc, APf and APr / APf at ``epoch`` (and ``AP_plus2`` at epoch + 2 when evaluated there)."""
    run = Path(run)
    where = eval_dir(run, epoch)
    metrics = json.loads((where / "metrics.json").read_text())
    out = {"run": str(run), "eval": str(where), **{k: 100 * metrics[k] for k in KEYS}}
    out.update({k: 100 * metrics[k] for k in BINS if metrics.get(k) is not None})  # training-instance bins
    out["r_over_f"] = metrics["APr"] / metrics["APf"] if metrics["APf"] else float("nan")
    later = run / "eval" / f"epoch_{epoch + 2:03d}" / "metrics.json" if epoch is not None else None
    out["AP_plus2"] = 100 * json.loads(later.read_text())["AP"] if later and later.is_file() else None
    return out


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def criteria(runs: list[dict], control: list[dict]) -> list[tuple[str, bool | None, str]]:
    """(criterion, passed or None when not measurable, the figure) for the module doc's four criteria."""
    ratio, _ = mean_sd([r["r_over_f"] for r in runs])
    ap, _ = mean_sd([r["AP"] for r in runs])
    moves = [r["AP_plus2"] - r["AP"] for r in runs if r["AP_plus2"] is not None]
    out = [("APr / APf <= 0.5", ratio <= 0.5, f"{ratio:.2f}"), ("20 <= AP <= 50", 20 <= ap <= 50, f"{ap:.1f}")]
    if len(moves) == len(runs):
        out.append(("2 more epochs move AP < 1", max(map(abs, moves)) < 1, ", ".join(f"{m:+.2f}" for m in moves)))
    else:
        out.append(("2 more epochs move AP < 1", None, "not evaluated at epoch + 2 in every run"))
    if control:
        c_ratio, _ = mean_sd([r["r_over_f"] for r in control])
        out.append(("control APr / APf >= 0.8", c_ratio >= 0.8, f"{c_ratio:.2f}"))
    return out


def format_report(runs: list[dict], control: list[dict]) -> str:
    """One row per run, mean +- sd rows per group, then the criteria."""
    lines = [f"{'':<44}" + "".join(f"{k:>12}" for k in KEYS) + f"{'APr/APf':>13}{'AP(+2)':>8}"]
    for group, rows in (("long-tailed", runs), ("control", control)):
        for r in rows:
            plus2 = f"{r['AP_plus2']:>8.1f}" if r["AP_plus2"] is not None else f"{'-':>8}"
            lines.append(f"{r['eval'][-44:]:<44}" + "".join(f"{r[k]:>12.1f}" for k in KEYS)
                         + f"{r['r_over_f']:>13.2f}" + plus2)
        if rows:
            stats = [mean_sd([r[k] for r in rows]) for k in (*KEYS, "r_over_f")]
            lines.append(f"{group + f' mean +- sd ({len(rows)})':<44}"
                         + "".join(f"{f'{m:.1f} +- {s:.1f}':>12}" for m, s in stats[:-1])
                         + f"{f'{stats[-1][0]:.2f} +- {stats[-1][1]:.2f}':>13}")
    lines.append("")
    for name, ok, figure in criteria(runs, control):
        lines.append(f"{'PASS' if ok else 'FAIL' if ok is False else 'n/a '}  {name:<28} {figure}")
    return "\n".join(lines)


def write_outputs(out: Path, runs: list[dict], control: list[dict]) -> None:
    """``long_tail.json`` and ``ap_by_class.png`` (long-tailed runs' and control's mean per-class AP)."""
    groups = {"long-tailed": runs, "balanced control": control}
    rows, per_class = {}, {}
    for label, group in groups.items():
        if not group:
            continue
        rows[label] = {k: statistics.fmean(r[k] for r in group) / 100 for k in ("APr", "APc", "APf", *BINS)
                       if all(k in r for r in group)}
        per_class[label] = _mean_per_class([read_per_class(Path(r["eval"]) / "per_class.csv") for r in group])
    plot_ap_by_frequency(rows, per_class, out / "ap_by_class.png")
    atomic_write_json(out / "long_tail.json", {"runs": runs, "control": control,
                                               "criteria": [list(c) for c in criteria(runs, control)]})


def _mean_per_class(tables: list[list[dict]]) -> list[dict]:
    """Class rows with the AP averaged over ``tables`` (the same classes, e.g. one table per seed)."""
    out = []
    for rows in zip(*tables):
        aps = [r["ap"] for r in rows if r["ap"] is not None]
        out.append({**rows[0], "ap": statistics.fmean(aps) if aps else None})
    return out


def _run(argv: list[str]) -> int:
    args = cli.parse_args(argv, repeatable=("run", "plus2", "control"))
    if unknown := sorted(set(args) - {"run", "plus2", "control", "epoch", "out"}):
        raise UsageError(f"unknown key(s) {unknown}; known: run, plus2, control, epoch, out")
    if not args.get("run"):
        raise UsageError("need at least one run=")
    if args.get("plus2") and len(args["plus2"]) != len(args["run"]):
        raise UsageError(f"{len(args['plus2'])} plus2= for {len(args['run'])} run=: one per run, in order")
    epoch = cli.parse_int("epoch", args["epoch"], minimum=1) if "epoch" in args else None
    runs = [read_run(r, epoch) for r in args["run"]]
    for run, later in zip(runs, args.get("plus2", [])):
        run["AP_plus2"] = read_run(later, None)["AP"]
    control = [read_run(r, epoch) for r in args.get("control", [])]
    print(format_report(runs, control))
    if "out" in args:
        write_outputs(Path(args["out"]), runs, control)
        print(f"wrote {Path(args['out']) / 'long_tail.json'} and ap_by_class.png")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m stepwise.analysis.long_tail`` on ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    return cli.main(argv, USAGE, _run, failures=(KeyError,))


if __name__ == "__main__":
    sys.exit(main())
