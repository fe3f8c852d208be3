"""The step table (AP, APr, APc, APf, AP1..AP4 after each step, like the step-wise paper's Table 3) and the
AP-by-frequency plot of a ``stage=all`` run."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

COLUMNS = ("AP", "AP50", "APr", "APc", "APf", "AP1", "AP2", "AP3", "AP4")


def _pct(value: Any) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"


def step_table(rows: Mapping[str, Mapping[str, Any]], columns: Sequence[str] = COLUMNS) -> str:
    """A Markdown table, one row per step (metrics as fractions; printed in %)."""
    lines = ["| step | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for step, metrics in rows.items():
        lines.append(f"| {step} | " + " | ".join(_pct(metrics.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def read_per_class(path: str | Path) -> list[dict[str, Any]]:
    """``per_class.csv`` of an evaluation report: ``train_instances`` and ``ap`` (None when not evaluated)."""
    with open(path, newline="") as f:
        return [{**row, "train_instances": int(row["train_instances"]),
                 "ap": float(row["ap"]) if row["ap"] not in ("", "nan") else None} for row in csv.DictReader(f)]


def draw_per_class(ax: Any, per_class: Mapping[str, list[dict]]) -> None:
    """Per-class AP (%) against the class's training instances (log x) on ``ax``: one point per class and a
    running mean per entry of ``per_class`` (label -> rows of :func:`read_per_class`)."""
    for label, classes in per_class.items():
        pts = sorted((c["train_instances"], 100 * c["ap"]) for c in classes if c["ap"] is not None)
        if not pts:
            continue
        counts, aps = np.array(pts).T
        line = ax.plot(counts, aps, ".", alpha=0.35)[0]
        window = min(len(aps), max(3, len(aps) // 8))  # fewer classes than 3: the mean of them all
        smooth = np.convolve(aps, np.ones(window) / window, mode="valid")
        ax.plot(counts[window // 2: window // 2 + len(smooth)], smooth, "-", color=line.get_color(), label=label)
    ax.set_xscale("log")
    ax.set_xlabel("training instances of the class")
    ax.set_ylabel("class AP (%)")
    ax.set_title("per-class AP (lines: running mean)")
    ax.legend()


def plot_ap_by_frequency(rows: Mapping[str, Mapping[str, Any]], per_class: Mapping[str, list[dict]],
                         out: str | Path) -> Path:
    """Two panels: grouped bars of APr/APc/APf/AP1..AP4 per step, and per-class AP against the number of
    training instances (log scale) with a running mean per step. Writes a PNG; returns its path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = ["APr", "APc", "APf", "AP1", "AP2", "AP3", "AP4"]
    fig, (bars, scatter) = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.8 / max(len(rows), 1)
    x = np.arange(len(keys))
    for k, (step, metrics) in enumerate(rows.items()):
        values = [100 * (metrics.get(key) or 0.0) for key in keys]
        bars.bar(x + (k - (len(rows) - 1) / 2) * width, values, width, label=step)
    bars.set_xticks(x, keys)
    bars.set_ylabel("box AP (%)")
    bars.set_title("AP by frequency group / training-instance bin")
    bars.legend()
    draw_per_class(scatter, per_class)
    fig.tight_layout()
    return save_figure(fig, out)


def save_figure(fig: Any, out: str | Path, dpi: int = 110) -> Path:
    """Write a matplotlib figure to ``out`` atomically (temporary name, then rename) and close it."""
    import matplotlib.pyplot as plt

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp{out.suffix}")
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    tmp.replace(out)
    return out
