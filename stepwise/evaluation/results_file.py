"""Write detections as an LVIS results file, streaming from arrays; one detection per line.

The file is what ``json.dump`` of the dicts would hold (the same keys, numbers written as Python's
``repr``, which reads back to the identical float64), but it is written a block of rows at a time, so
5.9M detections never exist as dicts, and atomically (a temporary name renamed at the end).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from stepwise.evaluation.detections import Detections
from stepwise.utils.io import atomic_path

_ROW = '{"image_id": %d, "category_id": %d, "bbox": [%r, %r, %r, %r], "score": %r}'
_BLOCK_ROWS = 100_000


def write_results(path: str | os.PathLike, dets: Detections) -> Path:
    """Write ``dets`` to ``path`` in the LVIS results format (a JSON list of
    ``{image_id, category_id, bbox: [x, y, w, h], score}``), atomically. Returns the path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write("[")
            for start in range(0, len(dets), _BLOCK_ROWS):
                part = dets.take(slice(start, start + _BLOCK_ROWS))
                rows = zip(part.image_id.tolist(), part.category_id.tolist(), *part.bbox.T.tolist(), part.score.tolist())
                if np.isfinite(part.bbox).all() and np.isfinite(part.score).all():
                    text = ",\n".join(_ROW % row for row in rows)
                else:  # NaN / Infinity written as json.dump writes them (the reader then names the row)
                    text = ",\n".join(_ROW.replace("%r", "%s") % (*row[:2], *map(json.dumps, row[2:])) for row in rows)
                f.write(("\n" if start == 0 else ",\n") + text)
            f.write("\n]\n")
    return path
