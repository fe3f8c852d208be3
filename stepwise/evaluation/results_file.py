"""The LVIS results file (a JSON list of ``{image_id, category_id, bbox: [x, y, w, h], score}``), decoded
and written through msgspec's typed codec, a block of rows at a time.

Reading: ``decode_results`` turns the bytes of a JSON list into ``ResultRow`` structs when every element
is a well-formed detection (about 7x faster than ``json.loads`` and lighter than dicts), else into what
``json.loads`` makes of it, so the caller can name a malformed element and invalid JSON raises
``json.JSONDecodeError`` with its position. Writing: ``write_results`` streams ``Detections`` to disk,
one detection per line, atomically, never holding more than one block of rows as objects. Numbers are
written as the shortest text that reads back to the identical float64 (float32 model outputs included).
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import msgspec
import numpy as np

from stepwise.evaluation.detections import Detections
from stepwise.utils.io import atomic_path

_BLOCK_ROWS = 100_000


class ResultRow(msgspec.Struct, gc=False):
    """One well-formed detection of a results file (other keys, e.g. ``segmentation``, are skipped)."""

    image_id: int
    category_id: int
    bbox: tuple[float, float, float, float]
    score: float


_DECODER = msgspec.json.Decoder(list[ResultRow])
_ENCODER = msgspec.json.Encoder()


def decode_results(text: bytes) -> list:
    """The elements of the JSON list ``text``: ``ResultRow`` structs if all are well-formed detections,
    else ``json.loads(text)`` (dicts and whatever else the file holds; raises ``json.JSONDecodeError``)."""
    try:
        return _DECODER.decode(text)
    except (msgspec.ValidationError, msgspec.DecodeError):
        return json.loads(text)


def row_columns(rows: list[ResultRow]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(image_id (N,) int64, category_id (N,) int64, bbox (N, 4) float64, score (N,) float64)`` of ``rows``."""
    n = len(rows)
    return (np.fromiter((r.image_id for r in rows), np.int64, n), np.fromiter((r.category_id for r in rows), np.int64, n),
            np.array([r.bbox for r in rows], dtype=np.float64).reshape(n, 4), np.fromiter((r.score for r in rows), np.float64, n))


def _encode_block(part: Detections) -> bytes:
    """Rows of ``part`` as ``{...},\\n{...}`` (no enclosing brackets)."""
    columns = zip(part.image_id.tolist(), part.category_id.tolist(), zip(*part.bbox.T.tolist()), part.score.tolist())
    if np.isfinite(part.bbox).all() and np.isfinite(part.score).all():
        text = _ENCODER.encode(list(itertools.starmap(ResultRow, columns)))
        return text[1:-1].replace(b"},{", b"},\n{")  # no strings in these rows: "},{" only joins two rows
    # NaN / Infinity written as json.dump writes them (msgspec would write null); the reader names the row
    return ",\n".join(json.dumps({"image_id": i, "category_id": c, "bbox": list(b), "score": s})
                      for i, c, b, s in columns).encode()


def write_results(path: str | os.PathLike, dets: Detections) -> Path:
    """Write ``dets`` to ``path`` in the LVIS results format, one detection per line, atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(b"[")
            for start in range(0, len(dets), _BLOCK_ROWS):
                f.write((b"\n" if start == 0 else b",\n") + _encode_block(dets.take(slice(start, start + _BLOCK_ROWS))))
            f.write(b"\n]\n")
    return path
