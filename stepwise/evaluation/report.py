"""The result of one evaluation: metrics, per-class rows, and how they were computed; saved and printed."""

from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from stepwise.utils.io import atomic_path, atomic_write_json


@dataclass
class ClassRow:
    """One category: LVIS id, name, frequency (r/c/f), training instance count, its bin (1-4) and AP (None = no valid AP)."""

    id: int
    name: str
    frequency: str
    train_instances: int
    bin: int
    ap: float | None


@dataclass
class EvalReport:
    """Metrics in [0, 1] (``None`` where undefined: no category with ground truth in that group or bin).

    ``metrics`` keys: AP, AP50, AP75, APs, APm, APl, APr, APc, APf, AP1, AP2, AP3, AP4.
    ``meta``: evaluator, max_dets, bin edges, where the instance counts came from, input sizes.
    """

    metrics: dict[str, float | None]
    per_class: list[ClassRow]
    meta: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def save(self, out_dir: str | os.PathLike) -> tuple[Path, Path]:
        """Write ``out_dir/metrics.json`` (metrics at the top level, plus ``meta`` and ``warnings``) and
        ``out_dir/per_class.csv``, each atomically. Returns both paths."""
        out_dir = Path(out_dir)
        metrics_path, csv_path = out_dir / "metrics.json", out_dir / "per_class.csv"
        clean = {k: (None if v is None or (isinstance(v, float) and math.isnan(v)) else v) for k, v in self.metrics.items()}
        atomic_write_json(metrics_path, {**clean, "meta": self.meta, "warnings": self.warnings}, indent=2)
        with atomic_path(csv_path) as tmp:
            with open(tmp, "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["id", "name", "frequency", "train_instances", "bin", "ap"])
                for row in self.per_class:
                    writer.writerow([row.id, row.name, row.frequency, row.train_instances, row.bin,
                                     "" if row.ap is None else repr(row.ap)])
        return metrics_path, csv_path

    def table(self) -> str:
        """A two-line table of every metric in percent, '-' where undefined, plus warnings."""
        fmt = lambda v: "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"  # noqa: E731
        keys = list(self.metrics)
        width = [max(len(k), 5) for k in keys]
        buf = io.StringIO()
        buf.write(" ".join(k.rjust(w) for k, w in zip(keys, width)) + "\n")
        buf.write(" ".join(fmt(self.metrics[k]).rjust(w) for k, w in zip(keys, width)) + "\n")
        edges = self.meta.get("bin_edges")
        if edges:
            bounds = [0, *edges, None]
            bins = ", ".join(
                f"AP{n + 1}: [{lo}, {hi})" if hi is not None else f"AP{n + 1}: >= {lo}"
                for n, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:]))
            )
            buf.write(f"(box AP in %, {self.meta.get('max_dets')} dets/image; training-instance bins {bins}; "
                      f"counts from {self.meta.get('instance_counts_from')}; evaluator {self.meta.get('evaluator')})\n")
        for msg in self.warnings:
            buf.write(f"warning: {msg}\n")
        return buf.getvalue()

    def to_dict(self) -> dict:
        return {"metrics": self.metrics, "per_class": [asdict(r) for r in self.per_class], "meta": self.meta, "warnings": self.warnings}
