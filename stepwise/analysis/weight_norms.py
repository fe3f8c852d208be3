"""Entry point: classifier weight norm against training instance count (BAGS paper, Fig. 1 and 3).

    python -m stepwise.analysis.weight_norms checkpoint=A.pt [checkpoint=B.pt ...] [label=NAME ...] out=plot.png

For every checkpoint (a file or a run directory) the detector is rebuilt from its saved config, and the L2
norm of each class's weight row in the final decoder layer's class head (``head.class_weight_rows()``) is
plotted against the class's training instance count (log x axis; classes with 0 instances at 1), one curve
per checkpoint: its points and their running median. Curves are labelled ``label=`` (one per checkpoint,
in order) or "<head name> <exp>/<stage>". The numbers go to a CSV beside the plot (``plot.csv``), one row
per checkpoint and class. Exit codes: 0 success, 1 bad input (missing/invalid checkpoint), 2 bad arguments.
"""

from __future__ import annotations

import csv
import io
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stepwise import cli
from stepwise.cli import UsageError
from stepwise.heads.inference import class_weight_norms
from stepwise.trained import load_trained_model
from stepwise.utils.io import atomic_path, atomic_write_text

USAGE = "usage: python -m stepwise.analysis.weight_norms checkpoint=A.pt [checkpoint=B.pt ...] [label=NAME ...] out=plot.png"


@dataclass
class WeightNorms:
    """One checkpoint's curve: per contiguous class its category id, name, training instance count and
    final-layer classifier weight norm."""

    label: str
    source: str
    category_ids: list[int]
    names: list[str]
    instance_counts: list[int]
    norms: list[float]


def checkpoint_norms(checkpoint: str | Path, label: str | None = None) -> WeightNorms:
    """Rebuild the checkpoint's detector and read its final-layer class weight norms (see the module doc)."""
    trained = load_trained_model(checkpoint)
    norms = class_weight_norms(trained.detector.head).tolist()
    cats, cfg = trained.categories, trained.config
    if label is None:
        label = f"{cfg.head.name} {cfg.get('exp', '?')}/{cfg.stage.get('name', '?')}"
    return WeightNorms(label, str(trained.path), list(cats.ids), list(cats.names), list(cats.instance_counts), norms)


def write_csv(curves: Sequence[WeightNorms], path: str | Path) -> Path:
    """One row per (checkpoint, class): label, checkpoint, class_index, category_id, name, instance_count,
    weight_norm. Written atomically."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["label", "checkpoint", "class_index", "category_id", "name", "instance_count", "weight_norm"])
    for curve in curves:
        for k, (cid, name, count, norm) in enumerate(zip(curve.category_ids, curve.names, curve.instance_counts,
                                                         curve.norms)):
            writer.writerow([curve.label, curve.source, k, cid, name, count, f"{norm:.6g}"])
    atomic_write_text(path, buf.getvalue())
    return Path(path)


def running_median(counts: Sequence[int], norms: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """(x, y): classes sorted by count, y the median norm over a window of ~5% of the classes around each."""
    order = np.argsort(np.asarray(counts), kind="stable")
    x = np.maximum(np.asarray(counts, dtype=np.float64)[order], 1.0)
    y = np.asarray(norms, dtype=np.float64)[order]
    half = max(1, len(y) // 40)
    smooth = np.array([np.median(y[max(0, i - half): i + half + 1]) for i in range(len(y))])
    return x, smooth


def plot(curves: Sequence[WeightNorms], path: str | Path) -> Path:
    """Weight norm vs training instance count (log x), points and running median per curve, to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for i, curve in enumerate(curves):
        color = f"C{i % 10}"
        ax.scatter(np.maximum(curve.instance_counts, 1), curve.norms, s=10, alpha=0.5, color=color, linewidths=0)
        ax.plot(*running_median(curve.instance_counts, curve.norms), color=color, label=curve.label)
    ax.set_xscale("log")
    ax.set_xlabel("training instances of the class")
    ax.set_ylabel("classifier weight norm ||w_j||")
    ax.set_title("Final-layer classifier weight norm vs training instance count")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    return path


def parse_args(argv: Sequence[str]) -> tuple[list[str], list[str], str]:
    """(checkpoints, labels, out) from ``key=value`` arguments; ``checkpoint=`` and ``label=`` repeat."""
    args = cli.parse_args(argv, repeatable=("checkpoint", "label"))
    unknown = sorted(set(args) - {"checkpoint", "label", "out"})
    if unknown:
        raise UsageError(f"unknown key(s) {unknown}; known: checkpoint (repeatable), label (repeatable), out")
    checkpoints, labels, out = args.get("checkpoint", []), args.get("label", []), args.get("out")
    if not all([*checkpoints, *labels, out if out is not None else "-"]):
        raise UsageError("checkpoint=, label= and out= need a value")
    if not checkpoints or out is None:
        raise UsageError("need at least one checkpoint= and out=")
    if labels and len(labels) != len(checkpoints):
        raise UsageError(f"{len(labels)} label= for {len(checkpoints)} checkpoint=: give one per checkpoint or none")
    return checkpoints, labels, out


def _run(argv: list[str]) -> tuple[list, str]:
    """The weight-norm curves and ``out`` (``main``'s work before any output)."""
    checkpoints, labels, out = parse_args(argv)
    return [checkpoint_norms(c, labels[i] if labels else None) for i, c in enumerate(checkpoints)], out


def _finish(done: tuple[list, str]) -> int:
    curves, out = done
    seen: dict[str, int] = {}
    for curve in curves:  # two runs of one head and stage: tell them apart by file
        seen[curve.label] = seen.get(curve.label, 0) + 1
    for curve in curves:
        if seen[curve.label] > 1:
            curve.label = f"{curve.label} ({Path(curve.source).parent.name}/{Path(curve.source).name})"
    png = plot(curves, out)
    table = write_csv(curves, Path(out).with_suffix(".csv"))
    for curve in curves:
        norms = np.asarray(curve.norms)
        print(f"{curve.label}: {len(norms)} classes, weight norm min {norms.min():.4g} median "
              f"{np.median(norms):.4g} max {norms.max():.4g}")
    print(f"wrote {png} and {table}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m stepwise.analysis.weight_norms`` on ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    return cli.main(argv, USAGE, _run, _finish, failures=(NotImplementedError,))


if __name__ == "__main__":
    sys.exit(main())
