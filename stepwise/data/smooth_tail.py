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

import msgspec
import numpy as np

from stepwise.data.annotation_index import AnnotationIndex
from stepwise.utils.io import atomic_path, atomic_write_json, read_json
from stepwise.utils.json_stream import mapped_file


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


class _ScoreLine(msgspec.Struct, gc=False):
    ann_id: int
    image_id: int
    label: int
    score: float
    iou: float
    max_score: float | None = None


_SCORE_LINES = msgspec.json.Decoder(_ScoreLine)


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
        """Read ``scores.jsonl``; a malformed line raises ValueError naming the file and line number.

        Decoded in one pass by msgspec (1.27M lines in about a second); a file it does not take (a line
        of another shape) is read line by line to name the line."""
        try:
            with mapped_file(path, "score file") as buf:
                rows = _SCORE_LINES.decode_lines(buf)
        except (msgspec.ValidationError, msgspec.DecodeError):
            rows = None
        if rows is not None:
            has_max = bool(rows) and all(r.max_score is not None for r in rows)
            return cls(ann_id=np.fromiter((r.ann_id for r in rows), np.int64, len(rows)),
                       image_id=np.fromiter((r.image_id for r in rows), np.int64, len(rows)),
                       label=np.fromiter((r.label for r in rows), np.int64, len(rows)),
                       score=np.fromiter((r.score for r in rows), np.float64, len(rows)),
                       iou=np.fromiter((r.iou for r in rows), np.float64, len(rows)),
                       max_score=np.fromiter((r.max_score for r in rows), np.float64, len(rows)) if has_max else None)

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


def replay_set_rows(index: AnnotationIndex, ann_ids: Iterable[int], keep_others_as_ignore: bool = False
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What :func:`subset_annotations` keeps, as masks over ``index``: ``(images (I,), selected (N,),
    made_ignore (N,))`` bool; ``made_ignore``: the other boxes of the kept images when ``keep_others_as_ignore``."""
    wanted = np.unique(np.asarray(ann_ids if isinstance(ann_ids, np.ndarray) else list(ann_ids), dtype=np.int64))
    selected = np.isin(index.ann_id, wanted)
    missing = np.setdiff1d(wanted, index.ann_id[selected])
    if len(missing):
        raise ValueError(f"{len(missing)} selected annotation ids are not in the training file "
                         f"(e.g. {missing[:5].tolist()}): scores.jsonl belongs to another annotation file?")
    images = np.zeros(index.num_images, dtype=bool)
    images[index.image_index[selected]] = True
    made_ignore = ~selected & images[index.image_index] if keep_others_as_ignore else np.zeros_like(selected)
    return images, selected, made_ignore


def write_replay_set_file(source: str | Path, index: AnnotationIndex, ann_ids: Iterable[int], path: str | Path,
                          keep_others_as_ignore: bool = False) -> dict[str, int]:
    """:func:`write_replay_set` of the annotation file ``source`` (whose index is ``index``) without holding it
    as dicts: the file is mapped, cut into its top-level values and its image and annotation entries
    (``msgspec.Raw``: byte ranges, nothing decoded), and the kept entries are copied byte for byte (an
    annotation made an ignore box is decoded, flagged and encoded). Written atomically to ``path``; the
    result is the same JSON value as :func:`subset_annotations` of the loaded file. Returns the counts."""
    images, selected, made_ignore = replay_set_rows(index, ann_ids, keep_others_as_ignore)
    try:
        with mapped_file(source, "training annotation file") as buf:
            _write_subset(buf, index, images, selected | made_ignore, made_ignore, Path(source), Path(path))
    except (msgspec.ValidationError, msgspec.DecodeError):  # a file msgspec does not take (NaN): as dicts
        return write_replay_set(read_json(source, "training annotation file"), index.ann_id[selected], path,
                                keep_others_as_ignore)
    already = int((index.ignore[selected] == 1).sum())  # selected boxes the source flags already
    return {"images": int(images.sum()), "annotations": int(selected.sum()) - already,
            "ignored": int(made_ignore.sum()) + already}


def _write_subset(buf: Any, index: AnnotationIndex, images: np.ndarray, kept: np.ndarray, made_ignore: np.ndarray,
                  source: Path, path: Path) -> None:
    top = msgspec.json.decode(buf, type=dict[str, msgspec.Raw])
    raw_images = msgspec.json.decode(top["images"], type=list[msgspec.Raw])
    raw_anns = msgspec.json.decode(top["annotations"], type=list[msgspec.Raw])
    if (len(raw_images), len(raw_anns)) != (index.num_images, index.num_annotations):
        raise ValueError(f"training annotation file {source} changed since it was read ({len(raw_images)} images "
                         f"and {len(raw_anns)} annotations now, {index.num_images} and {index.num_annotations} "
                         f"then)")
    with atomic_path(path, "replay set") as tmp, open(tmp, "wb") as f:
        f.write(b"{")
        for key, raw in top.items():
            if key not in ("images", "annotations"):
                f.write(json.dumps(key).encode() + b": " + bytes(raw) + b", ")
        f.write(b'"images": [' + b", ".join(raw_images[k] for k in np.flatnonzero(images).tolist()))
        f.write(b'], "annotations": [')
        rows, ignore = np.flatnonzero(kept).tolist(), made_ignore[kept].tolist()
        for start in range(0, len(rows), 50_000):  # in slices: the output may be most of a 1 GB file
            f.write((b", " if start else b"") + b", ".join(
                _flag_ignore(raw_anns[r]) if flag else raw_anns[r]
                for r, flag in zip(rows[start:start + 50_000], ignore[start:start + 50_000])))
        f.write(b"]}")
    del top, raw_images, raw_anns


def _flag_ignore(raw: msgspec.Raw) -> bytes:
    ann = msgspec.json.decode(raw)
    ann["ignore"] = 1
    return msgspec.json.encode(ann)
