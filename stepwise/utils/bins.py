"""The training-instance bins of the BAGS paper (Li et al. 2020, eq. 3 and Sec. 4.1), defined once.

A class with N training instances (boxes) is in bin index ``n`` when ``edges[n-1] <= N < edges[n]``: with
edges 10, 100, 1000 the bins are [0, 10), [10, 100), [100, 1000), [1000, inf), indices 0..3. A class with
exactly 10 instances is in index 1. BAGS's groups use the index; the metrics name the bins AP1..AP4
(index + 1), the papers' numbering.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

INSTANCE_BIN_EDGES = (10, 100, 1000)


def instance_bin_index(count: float, edges: Sequence[float] = INSTANCE_BIN_EDGES) -> int:
    """0-based bin of a class with ``count`` training instances: the number of ``edges`` <= ``count``."""
    return bisect.bisect_right(list(edges), count)
