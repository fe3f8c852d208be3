"""Metrics from the LVIS precision array: the LVIS API's summary, per-class AP, and AP by training-instance bin."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from stepwise.evaluation.backends import AREA_LABELS, IOU_THRS
from stepwise.evaluation.inputs import FREQUENCIES
from stepwise.utils.bins import INSTANCE_BIN_EDGES, instance_bin_index

LVIS_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")


def instance_bin(count: int, edges: Sequence[int] = INSTANCE_BIN_EDGES) -> int:
    """1-based bin of a category with ``count`` training instances (1 .. len(edges) + 1), the n of APn:
    :func:`stepwise.utils.bins.instance_bin_index` + 1 (10 instances: bin 2, 100: bin 3, 1000: bin 4)."""
    return instance_bin_index(count, edges) + 1


def _mean_valid(s: np.ndarray) -> float | None:
    valid = s[s > -1]
    return float(np.mean(valid)) if valid.size else None


def summarize(precision: np.ndarray, gt: dict) -> dict[str, float | None]:
    """AP, AP50, AP75, APs, APm, APl, APr, APc, APf exactly as ``LVISEval.summarize``.

    ``precision``: (T, R, K, A) with categories sorted by id. Each value is the mean over all cells > -1;
    ``None`` where the LVIS API reports -1 (no category with ground truth in that slice).
    """
    cats = sorted(gt["categories"], key=lambda cat: cat["id"])
    groups = {f: [k for k, cat in enumerate(cats) if cat["frequency"] == f] for f in FREQUENCIES}
    area = {label: AREA_LABELS.index(label) for label in AREA_LABELS}
    at_iou = lambda thr: precision[np.where(thr == IOU_THRS)[0]]  # noqa: E731  (LVIS's exact lookup)
    return {
        "AP": _mean_valid(precision[..., area["all"]]),
        "AP50": _mean_valid(at_iou(0.50)[..., area["all"]]),
        "AP75": _mean_valid(at_iou(0.75)[..., area["all"]]),
        "APs": _mean_valid(precision[..., area["small"]]),
        "APm": _mean_valid(precision[..., area["medium"]]),
        "APl": _mean_valid(precision[..., area["large"]]),
        "APr": _mean_valid(precision[:, :, groups["r"], area["all"]]),
        "APc": _mean_valid(precision[:, :, groups["c"], area["all"]]),
        "APf": _mean_valid(precision[:, :, groups["f"], area["all"]]),
    }


def per_class_ap(precision: np.ndarray) -> list[float | None]:
    """AP (IoU 0.50:0.95, all areas) of each category, in category-id order; ``None`` = no valid AP (-1)."""
    return [_mean_valid(precision[:, :, k, 0]) for k in range(precision.shape[2])]


def bin_means(aps: Sequence[float | None], counts: Sequence[int], edges: Sequence[int] = INSTANCE_BIN_EDGES) -> dict[str, float | None]:
    """AP1..AP{len(edges)+1}: mean per-class AP of the categories in each training-instance bin.

    Categories without a valid AP are left out; a bin with none left is ``None``.
    """
    out: dict[str, list[float]] = {f"AP{n}": [] for n in range(1, len(edges) + 2)}
    for ap, count in zip(aps, counts):
        if ap is not None:
            out[f"AP{instance_bin(count, edges)}"].append(ap)
    return {key: (float(np.mean(v)) if v else None) for key, v in out.items()}
