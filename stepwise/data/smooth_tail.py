"""Smooth-tail replay sets of the step-wise method: head/tail division, confidence-guided exemplar
selection, and the LVIS-format files ``d_head.json`` / ``d_tail.json``.

Everything here is pure and deterministic: it works on a score table (one row per ground-truth instance,
as ``stage=select`` writes it to ``scores.jsonl``) and an annotation dict, not on a model.

Selection rule (per class, independent of the other classes, hence of any class order): instances are
ranked by priority tier, then by score (descending), then by annotation id:

* tier 0: score > ``threshold`` and the best-scoring instance of its image within this class;
* tier 1: score > ``threshold``, a further instance from an image the class already uses;
* tier 2: score <= ``threshold``, best of its image;  tier 3: the rest.

The first ``quota`` instances are kept (all of them when the quota is None). "Image not yet chosen" is
evaluated within the class: picking greedily by descending score, an image's first pick is its
best-scoring instance, so tiers 0/2 are exactly the greedy "new image" picks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from stepwise.utils.io import atomic_write_json


@dataclass(frozen=True)
class Quotas:
    """Instances per class of each replay set; None = every instance.

    Defaults are the paper's: D_head = 200 per head class + 30 per tail class; D_tail = 50 per head class +
    every tail instance.
    """

    head_in_head: int | None = 200
    tail_in_head: int | None = 30
    head_in_tail: int | None = 50
    tail_in_tail: int | None = None


@dataclass
class ScoreTable:
    """One row per scored ground-truth instance (column arrays of equal length N).

    Attributes:
        ann_id, image_id, label: (N,) int64; ``label`` is the contiguous class index.
        score: (N,) float64, the probability of the instance's class of the prediction matched to it.
        iou: (N,) float64, IoU of that prediction's box with the instance's box.
        max_score: (N,) float64, that prediction's largest class probability (any class), or None when
            the score file has none.
    """

    ann_id: np.ndarray
    image_id: np.ndarray
    label: np.ndarray
    score: np.ndarray
    iou: np.ndarray
    max_score: np.ndarray | None = None

    @classmethod
    def from_records(cls, records: Iterable[Mapping[str, Any]]) -> "ScoreTable":
        """From dicts with ``ann_id``, ``image_id``, ``label``, ``score``, ``iou`` (and ``max_score`` in
        every record, or in none)."""
        cols: dict[str, list] = {k: [] for k in ("ann_id", "image_id", "label", "score", "iou", "max_score")}
        for r in records:
            for k in cols:
                cols[k].append(r.get(k))
        ints = {k: np.asarray(cols[k], dtype=np.int64) for k in ("ann_id", "image_id", "label")}
        has_max = bool(cols["max_score"]) and all(v is not None for v in cols["max_score"])
        return cls(**ints, score=np.asarray(cols["score"], dtype=np.float64),
                   iou=np.asarray(cols["iou"], dtype=np.float64),
                   max_score=np.asarray(cols["max_score"], dtype=np.float64) if has_max else None)

    @classmethod
    def read_jsonl(cls, path: str | Path) -> "ScoreTable":
        """Read ``scores.jsonl``; a malformed line raises ValueError naming the file and line number."""
        def rows():
            with open(path) as f:
                for number, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                        yield {**{k: row[k] for k in ("ann_id", "image_id", "label", "score", "iou")},
                               "max_score": row.get("max_score")}
                    except (json.JSONDecodeError, KeyError, TypeError) as err:
                        raise ValueError(f"{path}: line {number} is not a score record ({err})") from None
        return cls.from_records(rows())

    def __len__(self) -> int:
        return len(self.ann_id)


def head_classes(image_counts: Sequence[int], min_images: int = 30) -> np.ndarray:
    """(C,) bool: class k is a head class when it appears in at least ``min_images`` training images."""
    return np.asarray(image_counts) >= int(min_images)


def rank_class(table: ScoreTable, rows: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """``rows`` (indices into ``table``, one class) in selection order (see the module docstring)."""
    score, image, ann = table.score[rows], table.image_id[rows], table.ann_id[rows]
    by_score = np.lexsort((ann, -score))  # score descending, ties by annotation id
    ordered = rows[by_score]
    seen: set[int] = set()
    first_of_image = np.zeros(len(ordered), dtype=bool)
    for k, img in enumerate(image[by_score]):
        if img not in seen:
            seen.add(int(img))
            first_of_image[k] = True
    confident = score[by_score] > threshold
    tier = np.where(confident, np.where(first_of_image, 0, 1), np.where(first_of_image, 2, 3))
    return ordered[np.argsort(tier, kind="stable")]


def select_instances(table: ScoreTable, is_head: np.ndarray, head_quota: int | None, tail_quota: int | None,
                     threshold: float = 0.5) -> np.ndarray:
    """Annotation ids selected for one replay set: per class the first ``head_quota`` (head classes) or
    ``tail_quota`` (tail classes) instances in :func:`rank_class` order; None = all. Sorted ascending."""
    chosen = []
    order = np.argsort(table.label, kind="stable")
    labels = table.label[order]
    starts = np.flatnonzero(np.r_[True, labels[1:] != labels[:-1]]) if len(labels) else np.array([], int)
    for start, stop in zip(starts, np.r_[starts[1:], len(labels)]):
        label = int(labels[start])
        if label < 0 or label >= len(is_head):
            raise ValueError(f"score table has label {label}, outside the {len(is_head)} classes")
        quota = head_quota if is_head[label] else tail_quota
        ranked = rank_class(table, order[start:stop], threshold)
        chosen.append(table.ann_id[ranked if quota is None else ranked[:quota]])
    return np.sort(np.concatenate(chosen)) if chosen else np.array([], dtype=np.int64)


def select_replay_sets(table: ScoreTable, image_counts: Sequence[int], min_images: int = 30,
                       quotas: Quotas = Quotas(), threshold: float = 0.5) -> dict[str, np.ndarray]:
    """``{"d_head": ann_ids, "d_tail": ann_ids}`` (sorted int64) for the step-wise division and quotas."""
    is_head = head_classes(image_counts, min_images)
    return {
        "d_head": select_instances(table, is_head, quotas.head_in_head, quotas.tail_in_head, threshold),
        "d_tail": select_instances(table, is_head, quotas.head_in_tail, quotas.tail_in_tail, threshold),
    }


def subset_annotations(data: Mapping[str, Any], ann_ids: Iterable[int],
                       keep_others_as_ignore: bool = False) -> dict[str, Any]:
    """An LVIS-format dict with only the images that hold a selected annotation and only the selected
    annotations; with ``keep_others_as_ignore`` the other boxes of those images stay, marked
    ``"ignore": 1`` (trained neither as objects nor as background). Categories and every other top-level
    key are kept as they are (so frequencies and counts describe the original training set)."""
    wanted = {int(a) for a in ann_ids}
    known = {int(a["id"]) for a in data["annotations"]}
    missing = sorted(wanted - known)
    if missing:
        raise ValueError(f"{len(missing)} selected annotation ids are not in the training file "
                         f"(e.g. {missing[:5]}): scores.jsonl belongs to another annotation file?")
    images = {int(a["image_id"]) for a in data["annotations"] if int(a["id"]) in wanted}
    annotations = []
    for ann in data["annotations"]:
        if int(ann["id"]) in wanted:
            annotations.append(ann)
        elif keep_others_as_ignore and int(ann["image_id"]) in images:
            annotations.append({**ann, "ignore": 1})
    out = {k: v for k, v in data.items() if k not in ("images", "annotations")}
    out["images"] = [im for im in data["images"] if int(im["id"]) in images]
    out["annotations"] = annotations
    return out


def write_replay_set(data: Mapping[str, Any], ann_ids: Iterable[int], path: str | Path,
                     keep_others_as_ignore: bool = False) -> dict[str, int]:
    """Write :func:`subset_annotations` atomically to ``path``; returns image/annotation counts."""
    subset = subset_annotations(data, ann_ids, keep_others_as_ignore)
    atomic_write_json(path, subset)
    ignored = sum(1 for a in subset["annotations"] if a.get("ignore"))
    return {"images": len(subset["images"]), "annotations": len(subset["annotations"]) - ignored,
            "ignored": ignored}
