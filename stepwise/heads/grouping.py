"""Class groups for grouped classifiers, computed from training instance counts.

* :func:`groups_from_edges` — BAGS (Li et al. 2020, eq. 3): class j goes to group n when
  ``edges[n-1] <= N(j) < edges[n]`` (with edges 10, 100, 1000: [0, 10), [10, 100), [100, 1000), [1000, inf)).
* :func:`groups_from_kmeans` — hybrid BAGS: bins from k-means on log instance counts. The 1-D k-means is
  solved exactly by dynamic programming (the optimal partition of the sorted values into k contiguous
  runs), so it has no initialisation and no randomness: the same counts always give the same bins.

Groups are numbered 0..N-1 from the rarest to the most frequent (the papers' G_1..G_N); the background
group G_0 is the head's business, not this module's.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import numpy as np
import torch

from stepwise.utils.bins import INSTANCE_BIN_EDGES, instance_bin_index


def groups_from_edges(instance_counts: Sequence[int], edges: Sequence[float] = INSTANCE_BIN_EDGES) -> torch.Tensor:
    """(C,) long group index of each class: the number of ``edges`` that are <= its instance count.

    Args:
        instance_counts: training instance (box) count of each contiguous class.
        edges: strictly increasing positive thresholds; ``len(edges) + 1`` groups.
    """
    edges = [float(e) for e in edges]
    if not edges or any(e <= 0 for e in edges) or any(b <= a for a, b in pairwise(edges)):
        raise ValueError(f"group edges must be a non-empty, strictly increasing list of positive numbers, "
                         f"got {edges}")
    counts = _counts(instance_counts)
    return torch.tensor([instance_bin_index(c, edges) for c in counts], dtype=torch.long)


def groups_from_kmeans(instance_counts: Sequence[int], num_bins: int) -> torch.Tensor:
    """(C,) long bin index of each class from exact 1-D k-means on log(max(count, 1)).

    Bins are numbered by increasing count. Classes with equal counts always share a bin; when there are
    fewer distinct counts than ``num_bins``, fewer bins come back (every bin is non-empty).
    """
    counts = _counts(instance_counts)
    if num_bins < 1:
        raise ValueError(f"num_bins must be >= 1, got {num_bins}")
    logs = np.log(np.maximum(np.asarray(counts, dtype=np.float64), 1.0))
    values, inverse, weights = np.unique(logs, return_inverse=True, return_counts=True)
    labels = kmeans_1d(values, weights.astype(np.float64), min(num_bins, len(values)))
    return torch.as_tensor(labels[inverse.reshape(-1)], dtype=torch.long)


def kmeans_1d(values: np.ndarray, weights: np.ndarray, k: int) -> np.ndarray:
    """Optimal weighted k-means of sorted, distinct 1-D ``values`` (M,) into ``k`` contiguous clusters.

    Minimises sum_i weights_i (values_i - mean of its cluster)^2 exactly (dynamic programming over split
    points, O(k M^2)); ties go to the earliest split. Returns (M,) cluster labels 0..k-1 in value order.
    """
    m = len(values)
    if not 1 <= k <= m:
        raise ValueError(f"kmeans_1d: need 1 <= k <= {m} values, got k={k}")
    if np.any(np.diff(values) <= 0):
        raise ValueError("kmeans_1d: values must be sorted and distinct")
    w = np.concatenate([[0.0], np.cumsum(weights)])
    s = np.concatenate([[0.0], np.cumsum(weights * values)])
    s2 = np.concatenate([[0.0], np.cumsum(weights * values ** 2)])
    j, i = np.meshgrid(np.arange(m), np.arange(m), indexing="ij")  # segment values[j..i]
    with np.errstate(divide="ignore", invalid="ignore"):
        seg_w = w[i + 1] - w[j]
        cost = s2[i + 1] - s2[j] - (s[i + 1] - s[j]) ** 2 / seg_w
    cost = np.where(j <= i, np.maximum(cost, 0.0), np.inf)  # (start j, end i)

    best = cost[0].copy()  # best[i]: 1 cluster over values[0..i]
    starts = [np.zeros(m, dtype=np.int64)]
    for _ in range(1, k):
        prev = np.concatenate([[np.inf], best[:-1]])  # clusters over values[0..j-1], for start j
        total = prev[:, None] + cost  # (j, i)
        start = np.argmin(total, axis=0)
        best = total[start, np.arange(m)]
        starts.append(start)
    labels = np.empty(m, dtype=np.int64)
    end = m - 1
    for cluster in range(k - 1, -1, -1):
        start = int(starts[cluster][end])
        labels[start:end + 1] = cluster
        end = start - 1
    return labels


def group_summary(instance_counts: Sequence[int], groups: torch.Tensor) -> list[dict[str, int]]:
    """Per group: number of classes, total instances, smallest and largest class count (for logs/notes)."""
    counts = _counts(instance_counts)
    out = []
    for n in range(int(groups.max()) + 1 if groups.numel() else 0):
        members = [c for c, g in zip(counts, groups.tolist()) if g == n]
        out.append({"classes": len(members), "instances": sum(members),
                    "min_count": min(members) if members else 0, "max_count": max(members) if members else 0})
    return out


def _counts(instance_counts: Sequence[int]) -> list[int]:
    counts = [int(c) for c in instance_counts]
    if not counts:
        raise ValueError("no classes: instance_counts is empty")
    bad = [c for c in counts if c < 0]
    if bad:
        raise ValueError(f"instance counts must be >= 0, got {bad[0]}")
    return counts
