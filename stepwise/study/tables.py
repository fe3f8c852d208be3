"""The report of a study (``python -m stepwise.study``): per variant the mean +- sample standard deviation
over seeds and the per-seed values of AP, AP50, APr, APc, APf, AP1..AP4 (``study.md``, ``study.json``),
and a plot (``study.png``): per-variant bars with the seed spread, and per-class AP against training
instances for a few key variants.

Inputs are plain dicts, so the report can be rebuilt from ``study.json`` or from metrics files alone:
``results[variant] = {"steps": [...], "per_seed": {seed: metrics}, ...}`` where ``metrics`` is an
evaluation's ``metrics.json`` (fractions in [0, 1], ``None`` where a bin is empty) plus optional
``optimizer_steps`` (step -> optimizer steps that step trained).
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from stepwise.analysis.steps import COLUMNS, draw_per_class, save_figure

BAR_METRICS = ("AP", "APr", "APc", "APf")


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None, int]:
    """(mean, sample standard deviation with ddof=1, n) of the non-missing values; std is None for n < 2,
    mean is None for n = 0."""
    kept = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not kept:
        return None, None, 0
    return statistics.fmean(kept), (statistics.stdev(kept) if len(kept) > 1 else None), len(kept)


def steps_after_pretrain(metrics: Mapping[str, Any]) -> int | None:
    """Optimizer steps a run trained after its pre-training (0 for a pretrain-only run; None if unknown)."""
    steps = metrics.get("optimizer_steps")
    if steps is None:
        return None
    values = [v for k, v in steps.items() if k != "pretrain"]
    return None if any(v is None for v in values) else int(sum(values))


def summarize(results: Mapping[str, Mapping[str, Any]], columns: Sequence[str] = COLUMNS) -> dict[str, Any]:
    """Add ``mean``, ``std`` (ddof=1) and ``n`` (seeds with a value) per column to each variant of ``results``.

    Returns a new dict ``{variant: {**results[variant], "mean": {...}, "std": {...}, "n": {...}}}``; the
    column ``steps_after_pretrain`` is summarised like the metrics.
    """
    out = {}
    for variant, entry in results.items():
        per_seed = entry.get("per_seed", {})
        mean, std, n = {}, {}, {}
        for column in (*columns, "steps_after_pretrain"):
            if column == "steps_after_pretrain":
                values = [steps_after_pretrain(m) for m in per_seed.values()]
            else:
                values = [m.get(column) for m in per_seed.values()]
                for seed, value in zip(per_seed, values):
                    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                        raise ValueError(f"variant {variant!r}, seed {seed}: {column} is {value!r}, not a number "
                                         "(or null)")
            mean[column], std[column], n[column] = mean_std(values)
        out[variant] = {**entry, "mean": mean, "std": std, "n": n}
    return out


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _pm(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "-"
    return f"{100 * mean:.1f}" + (f" ± {100 * std:.1f}" if std is not None else "")


CURVE_METRICS = ("AP", "APr")
PAIRED_METRICS = ("AP", "APr", "APc", "APf")


def per_seed_differences(summary: Mapping[str, Mapping[str, Any]], reference: str,
                         columns: Sequence[str] = PAIRED_METRICS) -> dict[str, dict[str, list[float]]]:
    """Per variant other than ``reference`` and per column, the list of (variant − ``reference``) on each seed
    both rows finished (seeds where either value is missing are left out)."""
    ref = summary[reference].get("per_seed", {})
    out = {}
    for variant, entry in summary.items():
        if variant == reference:
            continue
        mine = entry.get("per_seed", {})
        out[variant] = {c: [mine[k][c] - ref[k][c] for k in mine
                            if k in ref and mine[k].get(c) is not None and ref[k].get(c) is not None]
                        for c in columns}
    return out


def paired_differences(summary: Mapping[str, Mapping[str, Any]], reference: str,
                       columns: Sequence[str] = PAIRED_METRICS) -> dict[str, dict[str, tuple]]:
    """Per variant, ``(mean, std, n)`` over seeds of (variant − ``reference``) on the same seed, per column.

    Rows of one seed share their pretrain, so the paired difference leaves out the seed-to-seed spread of
    the starting point that the per-row std includes. Seeds missing from either row are skipped."""
    return {variant: {c: mean_std(values) for c, values in diffs.items()}
            for variant, diffs in per_seed_differences(summary, reference, columns).items()}


def paired_table(summary: Mapping[str, Mapping[str, Any]], reference: str,
                 columns: Sequence[str] = PAIRED_METRICS) -> list[str]:
    """Markdown rows of :func:`paired_differences` (points of AP; ``*`` where |mean| > 2 std with n >= 3)."""
    lines = [f"| variant − {reference} | seeds | " + " | ".join(columns) + " |", "|---" * (len(columns) + 2) + "|"]
    for variant, diffs in paired_differences(summary, reference, columns).items():
        n = max(d[2] for d in diffs.values())
        if not n:
            continue
        cells = []
        for c in columns:
            mean, std, k = diffs[c]
            mark = "*" if mean is not None and std is not None and k >= 3 and abs(mean) > 2 * std else ""
            cells.append("-" if mean is None else f"{100 * mean:+.1f}" + (f" ± {100 * std:.1f}" if std is not None else "") + mark)
        lines.append(f"| {variant} | {n} | " + " | ".join(cells) + " |")
    return lines


def curve_table(curves: Mapping[str, Mapping[str, Sequence[Mapping[str, Any]]]],
                metrics: Sequence[str] = CURVE_METRICS) -> list[str]:
    """Markdown rows: per pre-training run label and epoch, the mean ± std over seeds of ``metrics``."""
    labels = list(curves)
    head = " | ".join(f"{label} {m}" for label in labels for m in metrics)
    lines = [f"| epoch | {head} |", "|---" * (1 + len(labels) * len(metrics)) + "|"]
    epochs = sorted({point["epoch"] for label in labels for curve in curves[label].values() for point in curve})
    for epoch in epochs:
        cells = []
        for label in labels:
            at = [p["metrics"] for curve in curves[label].values() for p in curve if p["epoch"] == epoch]
            for m in metrics:
                mean, std, _ = mean_std([x.get(m) for x in at])
                cells.append(_pm(mean, std))
        lines.append(f"| {epoch} | " + " | ".join(cells) + " |")
    return lines


def study_markdown(summary: Mapping[str, Mapping[str, Any]], title: str, notes: Sequence[str] = (),
                   columns: Sequence[str] = COLUMNS, pending: Sequence[str] = (),
                   curves: Mapping[str, Mapping[str, Sequence[Mapping[str, Any]]]] | None = None,
                   compare: Sequence[str] = ()) -> str:
    """``study.md``: the mean ± std table, the paired differences against each variant in ``compare``, the
    per-seed table, the pre-training curves (``curves``: see :func:`stepwise.study.pretrain_curves`), then the
    runs not finished yet."""
    lines = [f"# {title}", ""]
    for note in notes:
        lines += [note, ""]
    lines += ["## Mean ± sample standard deviation (ddof=1) over seeds, box AP (%)", "",
              "| variant | seeds | " + " | ".join(columns) + " | steps after pretrain |",
              "|---" * (len(columns) + 3) + "|"]
    for variant, entry in summary.items():
        seeds = len(entry.get("per_seed", {}))
        cells = [_pm(entry["mean"][c], entry["std"][c]) for c in columns]
        steps = entry["mean"]["steps_after_pretrain"]
        lines.append(f"| {variant} | {seeds} | " + " | ".join(cells) + f" | {'-' if steps is None else round(steps)} |")
    for reference in compare:
        if summary.get(reference, {}).get("per_seed"):
            lines += ["", f"## Paired differences against {reference}, same seed: mean ± std over seeds (points)", "",
                      "`*`: |mean| > 2 std over >= 3 seeds.", ""] + paired_table(summary, reference)
    lines += ["", "## Per seed, box AP (%)", "", "| variant | seed | " + " | ".join(columns) + " |",
              "|---" * (len(columns) + 2) + "|"]
    for variant, entry in summary.items():
        for seed, metrics in entry.get("per_seed", {}).items():
            lines.append(f"| {variant} | {seed} | " + " | ".join(_pct(metrics.get(c)) for c in columns) + " |")
    if curves:
        lines += ["", "## Pre-training: box AP (%) after each epoch, mean ± std over seeds", ""] + curve_table(curves)
    if pending:
        lines += ["", "## Not finished yet", ""] + [f"- {item}" for item in pending]
    return "\n".join(lines) + "\n"


def plot_study(summary: Mapping[str, Mapping[str, Any]], per_class: Mapping[str, list[dict]],
               out: str | Path, metrics: Sequence[str] = BAR_METRICS, reference: str | None = None) -> Path:
    """Top: per variant, bars of the mean of ``metrics`` with ± std error bars and every seed as a dot.
    Middle (when ``reference`` has finished seeds): per variant, the same-seed difference to ``reference``
    (bars: mean, error bars: std, dots: seeds) -- the bars from 0 above hide 1-point differences.
    Bottom: per-class AP against training instances for the variants in ``per_class`` (seed means).
    Writes a PNG; returns its path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    variants = [v for v, e in summary.items() if e.get("per_seed")]
    paired = reference is not None and bool(summary.get(reference, {}).get("per_seed"))
    rows = 3 if paired else 2
    fig, axes = plt.subplots(rows, 1, figsize=(max(8.0, 1.1 * len(variants) + 3), 4.5 * rows))
    bars, scatter = axes[0], axes[-1]
    x = np.arange(len(variants))
    _grouped_bars(bars, x, {m: {v: [100 * s[m] for s in summary[v]["per_seed"].values() if s.get(m) is not None]
                                for v in variants} for m in metrics}, variants)
    bars.set_xticks(x, variants, rotation=30, ha="right")
    bars.set_ylabel("box AP (%)")
    bars.set_title("mean over seeds (error bars: sample std, dots: seeds)")
    bars.legend(ncols=len(metrics))
    if paired:
        diff_ax = axes[1]
        others = [v for v in variants if v != reference]
        diffs = per_seed_differences({v: summary[v] for v in [reference] + others}, reference, metrics)
        _grouped_bars(diff_ax, np.arange(len(others)),
                      {m: {v: [100 * d for d in diffs[v][m]] for v in others} for m in metrics}, others)
        diff_ax.axhline(0.0, color="black", lw=0.8)
        diff_ax.set_xticks(np.arange(len(others)), others, rotation=30, ha="right")
        diff_ax.set_ylabel(f"− {reference} (points)")
        diff_ax.set_title(f"same-seed difference to {reference} (bars: mean, error bars: std, dots: seeds)")
        diff_ax.grid(axis="y", alpha=0.3)
    draw_per_class(scatter, per_class)
    scatter.set_title("per-class AP, mean over seeds (lines: running mean)")
    fig.tight_layout()
    return save_figure(fig, out)


def _grouped_bars(ax: Any, x: np.ndarray, values: Mapping[str, Mapping[str, Sequence[float]]],
                  variants: Sequence[str]) -> None:
    """On ``ax``, one bar group per variant at ``x``: per metric the mean of ``values[metric][variant]`` with a
    sample-std error bar (none for one value) and each value as a dot."""
    width = 0.8 / len(values)
    for k, (metric, per_variant) in enumerate(values.items()):
        pos = x + (k - (len(values) - 1) / 2) * width
        stats = [mean_std(per_variant[v]) for v in variants]
        ax.bar(pos, [m or 0.0 for m, _, _ in stats], width, yerr=[s or 0.0 for _, s, _ in stats], capsize=2,
               label=metric, color=f"C{k}", alpha=0.8)
        for p, v in zip(pos, variants):
            ax.plot([p] * len(per_variant[v]), per_variant[v], "o", ms=3, color="black", alpha=0.6, zorder=3)


def plot_curves(curves: Mapping[str, Mapping[str, Sequence[Mapping[str, Any]]]], out: str | Path,
                metrics: Sequence[str] = CURVE_METRICS) -> Path:
    """One panel per metric: AP after each pre-training epoch, a line per seed, a colour per run label."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for k, (label, per_seed) in enumerate(curves.items()):
            for j, (_seed, curve) in enumerate(sorted(per_seed.items())):
                points = [(p["epoch"], 100 * p["metrics"][metric]) for p in curve if p["metrics"].get(metric) is not None]
                if points:
                    ax.plot(*zip(*points), "o-", ms=3, color=f"C{k}", alpha=0.8, label=label if j == 0 else None)
        ax.set_xlabel("pre-training epoch")
        ax.set_ylabel(f"{metric} (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("pre-training: validation AP after each epoch (a line per seed)")
    fig.tight_layout()
    return save_figure(fig, out)


def average_per_class(tables: Sequence[list[dict]]) -> list[dict]:
    """Per-class rows (``read_per_class``) of several seeds -> one row per class with the mean AP over the
    seeds where the class was evaluated (``ap`` None where it never was)."""
    merged: dict[Any, dict] = {}
    for table in tables:
        for row in table:
            entry = merged.setdefault(row["id"], {**row, "aps": []})
            if row["ap"] is not None:
                entry["aps"].append(row["ap"])
    return [{**{k: v for k, v in e.items() if k != "aps"}, "ap": statistics.fmean(e["aps"]) if e["aps"] else None}
            for e in merged.values()]
