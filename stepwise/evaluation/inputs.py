"""Load and check the two inputs of an evaluation: an LVIS-format ground truth and LVIS-format results.

Every problem names the file and the image, category, annotation or prediction at fault; the LVIS API
itself would only fail an ``assert`` or a ``KeyError`` deep inside.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np

from stepwise.utils.io import read_json

logger = logging.getLogger(__name__)

PathOrDict = Union[str, "os.PathLike[str]", dict]
PathOrList = Union[str, "os.PathLike[str]", list]

FREQUENCIES = ("r", "c", "f")
_MAX_NAMED = 5  # how many offending items an error or warning lists by name


def _source(obj: Any, default: str) -> str:
    return os.fspath(obj) if isinstance(obj, (str, os.PathLike)) else default


def _is_number(value: Any) -> bool:
    """A real number (int, float, numpy scalar), but not a bool or a string."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _examples(items: list[str]) -> str:
    more = f" (and {len(items) - _MAX_NAMED} more)" if len(items) > _MAX_NAMED else ""
    return "; ".join(items[:_MAX_NAMED]) + more


def load_gt(gt: PathOrDict) -> tuple[dict, str, list[str]]:
    """Load and check an LVIS-format annotation file or dict.

    Returns ``(dataset, source, warnings)`` where ``source`` names it in messages. Checks the keys the LVIS
    API needs (``frequency`` per category, ``neg_category_ids`` / ``not_exhaustive_category_ids`` per image,
    ``bbox`` and ``area`` per annotation) and that every annotation's image and category exist. GT boxes
    with width or height <= 0 are evaluated as the LVIS API does (no detection can match them) and
    reported in a counted warning.
    """
    src = _source(gt, "ground-truth dict")
    data = read_json(gt, "ground-truth file") if isinstance(gt, (str, os.PathLike)) else gt
    if not isinstance(data, dict):
        raise ValueError(f"{src}: expected an LVIS annotation object, got {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"{src}: missing or non-list key '{key}'")

    cat_ids = set()
    for k, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict):
            raise ValueError(f"{src}: category entry #{k} is not an object: {cat!r:.80}")
        if "id" not in cat:
            raise ValueError(f"{src}: a category has no 'id': {cat}")
        if cat["id"] in cat_ids:
            raise ValueError(f"{src}: category id {cat['id']} appears more than once")
        if cat.get("frequency") not in FREQUENCIES:
            raise ValueError(
                f"{src}: category {cat['id']} ({cat.get('name', '?')}) has frequency "
                f"{cat.get('frequency')!r}; LVIS evaluation needs one of {FREQUENCIES}"
            )
        cat_ids.add(cat["id"])
    img_ids = set()
    for k, img in enumerate(data["images"]):
        if not isinstance(img, dict):
            raise ValueError(f"{src}: image entry #{k} is not an object: {img!r:.80}")
        if "id" not in img:
            raise ValueError(f"{src}: an image has no 'id': {img}")
        if img["id"] in img_ids:
            raise ValueError(f"{src}: image id {img['id']} appears more than once")
        for key in ("neg_category_ids", "not_exhaustive_category_ids"):
            if not isinstance(img.get(key), list):
                raise ValueError(f"{src}: image {img['id']} has no list '{key}' (needed for LVIS's federated rules)")
        img_ids.add(img["id"])

    bad = []
    for k, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict):
            bad.append(f"annotation entry #{k} is not an object: {ann!r:.60}")
            continue
        aid = ann.get("id", "?")
        if ann.get("image_id") not in img_ids:
            bad.append(f"annotation {aid}: unknown image_id {ann.get('image_id')}")
        elif ann.get("category_id") not in cat_ids:
            bad.append(f"annotation {aid}: unknown category_id {ann.get('category_id')}")
        elif not (isinstance(ann.get("bbox"), list) and len(ann["bbox"]) == 4) or "area" not in ann or "id" not in ann:
            bad.append(f"annotation {aid}: needs 'id', 'bbox' [x, y, w, h] and 'area'")
        elif not all(_is_number(v) and math.isfinite(v) for v in ann["bbox"]):
            bad.append(f"annotation {aid}: bbox {ann['bbox']!r} is not 4 finite numbers")
    if bad:
        raise ValueError(f"{src}: {len(bad)} invalid annotation(s): {_examples(bad)}")
    degenerate = [
        f"annotation {ann['id']} (image {ann['image_id']}, bbox {ann['bbox']})"
        for ann in data["annotations"]
        if not (ann["bbox"][2] > 0 and ann["bbox"][3] > 0)
    ]
    warnings = []
    if degenerate:
        warnings.append(f"{src}: {len(degenerate)} GT box(es) with width or height <= 0: {_examples(degenerate)}")
        logger.warning(warnings[-1])
    return data, src, warnings


@dataclass
class Predictions:
    """Checked detections in the LVIS results format, at most ``max_dets`` per image.

    ``detections``: list of fresh dicts ``{image_id, category_id, bbox [x, y, w, h], score}``.
    ``warnings``: human-readable notes (degenerate boxes, truncation) to show with the report.
    """

    detections: list[dict]
    num_input: int
    num_degenerate: int = 0
    num_truncated: int = 0
    warnings: list[str] = field(default_factory=list)


def limit_dets_per_image(dets: list[dict], max_dets: int) -> list[dict]:
    """Keep the ``max_dets`` highest-scoring detections of each image.

    Exactly ``lvis.results.LVISResults.limit_dets_per_image``: grouped by image in first-seen order, a
    stable sort by descending score only for images over the limit. Both evaluators then see the same list.
    """
    if max_dets < 0:
        return list(dets)
    per_image: dict[Any, list[dict]] = defaultdict(list)
    for det in dets:
        per_image[det["image_id"]].append(det)
    for img_id, img_dets in per_image.items():
        if len(img_dets) > max_dets:
            per_image[img_id] = sorted(img_dets, key=lambda d: d["score"], reverse=True)[:max_dets]
    return [det for img_dets in per_image.values() for det in img_dets]


def load_predictions(predictions: PathOrList, gt: dict, max_dets: int = 300, gt_source: str = "ground truth") -> Predictions:
    """Load and check detections against the ground truth ``gt`` (an already checked dict).

    Unknown ``image_id`` / ``category_id``, missing keys or a non-finite score are errors naming the
    prediction. A box with width or height <= 0 is kept as a zero-size box (it can match nothing, so it
    counts as a false positive exactly as a detector's real output would) and reported in a counted warning.
    """
    src = _source(predictions, "predictions list")
    raw = read_json(predictions, "predictions file") if isinstance(predictions, (str, os.PathLike)) else predictions
    if not isinstance(raw, list):
        raise ValueError(f"{src}: expected a list of detections in the LVIS results format, got {type(raw).__name__}")
    img_ids = {img["id"] for img in gt["images"]}
    cat_ids = {cat["id"] for cat in gt["categories"]}

    dets, bad, degenerate = [], [], []
    for i, det in enumerate(raw):
        if not isinstance(det, dict) or not {"image_id", "category_id", "bbox", "score"} <= det.keys():
            bad.append(f"prediction #{i} needs image_id, category_id, bbox, score: {det!r:.120}")
            continue
        img_id, cat_id, box, score = det["image_id"], det["category_id"], det["bbox"], det["score"]
        if img_id not in img_ids:
            bad.append(f"prediction #{i}: image_id {img_id} is not an image of {gt_source}")
            continue
        if cat_id not in cat_ids:
            bad.append(f"prediction #{i} (image {img_id}): category_id {cat_id} is not a category of {gt_source}")
            continue
        if not (isinstance(box, (list, tuple)) and len(box) == 4 and all(_is_number(v) for v in box)
                and _is_number(score)):
            bad.append(f"prediction #{i} (image {img_id}): bbox must be 4 numbers and score a number "
                       f"(not a string or boolean), got bbox {box!r:.60} and score {score!r:.20}")
            continue
        x, y, w, h = (float(v) for v in box)
        score = float(score)
        if not all(math.isfinite(v) for v in (x, y, w, h, score)):
            bad.append(f"prediction #{i} (image {img_id}): non-finite bbox or score")
            continue
        if w <= 0 or h <= 0:
            degenerate.append(f"prediction #{i} (image {img_id}, category {cat_id}, bbox {list(box)})")
            w, h = max(w, 0.0), max(h, 0.0)
        dets.append({"image_id": img_id, "category_id": cat_id, "bbox": [x, y, w, h], "score": score})
    if bad:
        raise ValueError(f"{src}: {len(bad)} invalid prediction(s): {_examples(bad)}")

    out = Predictions(detections=limit_dets_per_image(dets, max_dets), num_input=len(raw), num_degenerate=len(degenerate))
    if degenerate:
        msg = (
            f"{src}: {len(degenerate)} prediction(s) with width or height <= 0, kept as zero-size boxes "
            f"(false positives): {_examples(degenerate)}"
        )
        out.warnings.append(msg)
        logger.warning(msg)
    out.num_truncated = len(dets) - len(out.detections)
    if out.num_truncated:
        out.warnings.append(f"{out.num_truncated} lowest-scoring detection(s) beyond {max_dets} per image were not evaluated")
    return out


def training_instance_counts(gt: dict, train_gt: PathOrDict | None = None, gt_source: str = "ground truth") -> tuple[dict, str]:
    """Training instance count per category id of ``gt``.

    From ``train_gt``'s annotations when given (categories absent there count 0), else from the
    ``instance_count`` field of ``gt``'s categories (LVIS v1 val carries the train-set counts there).
    Returns ``(counts, source)``, ``source`` saying where the counts came from.
    """
    if train_gt is not None:
        tsrc = _source(train_gt, "training annotation dict")
        train = read_json(train_gt, "training annotation file") if isinstance(train_gt, (str, os.PathLike)) else train_gt
        if not isinstance(train, dict) or not isinstance(train.get("annotations"), list):
            raise ValueError(f"{tsrc}: expected an annotation object with a list 'annotations'")
        counts = {cat["id"]: 0 for cat in gt["categories"]}
        for ann in train["annotations"]:
            if "category_id" not in ann:
                raise ValueError(f"{tsrc}: annotation {ann.get('id', '?')} has no category_id")
            if ann["category_id"] in counts:
                counts[ann["category_id"]] += 1
        return counts, f"annotations of {tsrc}"
    missing = [str(cat["id"]) for cat in gt["categories"] if not isinstance(cat.get("instance_count"), int)]
    if missing:
        raise ValueError(
            f"{gt_source}: categories {_examples(missing)} have no integer 'instance_count'; "
            "pass train_gt=<training annotation file> to count training instances"
        )
    return {cat["id"]: cat["instance_count"] for cat in gt["categories"]}, f"'instance_count' field of {gt_source}"
