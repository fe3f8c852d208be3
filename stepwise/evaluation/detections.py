"""Detections in the LVIS results format kept as four numpy columns instead of one dict per detection.

LVIS v1 val with 300 detections per image is 5.9M detections: as Python dicts that is several GB and
minutes of interpreter time; as columns it is 330 MB and every step (checks, top-k, evaluation) is one
numpy call. Only the LVIS API reference evaluator and small tests ever see dicts (``to_records``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Detections:
    """N detections; row i is ``{image_id[i], category_id[i], bbox[i] = [x, y, w, h], score[i]}``.

    ``image_id``, ``category_id``: (N,) int64. ``bbox``: (N, 4) float64, absolute pixels, x/y top-left.
    ``score``: (N,) float64. Row order is the order of the results file (it decides ties, see ``top_k``).
    """

    image_id: np.ndarray
    category_id: np.ndarray
    bbox: np.ndarray
    score: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.image_id)
        if self.bbox.shape != (n, 4) or self.category_id.shape != (n,) or self.score.shape != (n,):
            raise ValueError(f"inconsistent detection columns: image_id {self.image_id.shape}, category_id "
                             f"{self.category_id.shape}, bbox {self.bbox.shape}, score {self.score.shape}")

    def __len__(self) -> int:
        return len(self.image_id)

    @classmethod
    def empty(cls) -> Detections:
        return cls(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 4)), np.zeros(0))

    @classmethod
    def from_columns(cls, image_id: Sequence | np.ndarray, category_id: Sequence | np.ndarray,
                     bbox: Sequence | np.ndarray, score: Sequence | np.ndarray) -> Detections:
        """Columns of any numeric dtype (e.g. float32 model outputs) converted to the canonical dtypes.

        Float32 values become the float64 numbers they are exactly, as ``float(np.float32(v))`` does.
        """
        return cls(np.asarray(image_id, dtype=np.int64).reshape(-1), np.asarray(category_id, dtype=np.int64).reshape(-1),
                   np.asarray(bbox, dtype=np.float64).reshape(-1, 4), np.asarray(score, dtype=np.float64).reshape(-1))

    @classmethod
    def from_records(cls, records: Sequence[dict]) -> Detections:
        """From already checked dicts ``{image_id, category_id, bbox, score}`` (see ``inputs.load_predictions``
        for the checked path that names a bad record)."""
        if not records:
            return cls.empty()
        return cls.from_columns([r["image_id"] for r in records], [r["category_id"] for r in records],
                                [r["bbox"] for r in records], [r["score"] for r in records])

    @classmethod
    def concat(cls, parts: Iterable[Detections]) -> Detections:
        parts = [p for p in parts if len(p)]
        if not parts:
            return cls.empty()
        if len(parts) == 1:
            return parts[0]
        return cls(*(np.concatenate([getattr(p, k) for p in parts]) for k in ("image_id", "category_id", "bbox", "score")))

    def take(self, index: np.ndarray) -> Detections:
        """The rows ``index`` (an integer index array or a boolean mask), in that order."""
        return Detections(self.image_id[index], self.category_id[index], self.bbox[index], self.score[index])

    def to_records(self) -> list[dict]:
        """One fresh dict per detection (for the LVIS API reference and small inputs only)."""
        return [{"image_id": i, "category_id": c, "bbox": b, "score": s}
                for i, c, b, s in zip(self.image_id.tolist(), self.category_id.tolist(), self.bbox.tolist(), self.score.tolist())]

    def top_k(self, max_dets: int) -> Detections:
        """The ``max_dets`` highest-scoring detections of each image, in file order.

        The same detections as ``lvis.results.LVISResults.limit_dets_per_image`` keeps (a stable sort by
        descending score within each image, so among equal scores the earlier row wins), and within each
        (image, category) pair the same order, which is all the evaluators' stable sorts depend on.
        ``max_dets < 0`` keeps everything.
        """
        if max_dets < 0 or len(self) <= max_dets:
            return self
        ids = self.image_id
        small_ids = ids.min() >= 0 and ids.max() <= 4 * len(ids)
        counts = np.bincount(ids) if small_ids else np.unique(ids, return_counts=True)[1]
        if counts.max() <= max_dets:  # the usual case: nothing to cut, no sort needed
            return self
        order = np.lexsort((np.arange(len(self)), -self.score, self.image_id))  # by image, score desc, row
        sorted_img = self.image_id[order]
        starts = np.flatnonzero(np.r_[True, sorted_img[1:] != sorted_img[:-1]])
        rank = np.arange(len(self)) - np.repeat(starts, np.diff(np.r_[starts, len(self)]))
        keep = np.sort(order[rank < max_dets])
        return self.take(keep)

    def hotcoco_array(self) -> np.ndarray:
        """(N, 7) float64 rows ``[image_id, x, y, w, h, score, category_id]``: the array form of hotcoco's
        ``load_res`` (pycocotools' ``loadNumpyAnnotations`` layout). Ids must stay below 2**53."""
        out = np.empty((len(self), 7), dtype=np.float64)
        out[:, 0] = self.image_id
        out[:, 1:5] = self.bbox
        out[:, 5] = self.score
        out[:, 6] = self.category_id
        return out
