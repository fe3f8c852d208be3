"""Load and check the two inputs of an evaluation: an LVIS-format ground truth and LVIS-format results.

Every problem names the file and the image, category, annotation or prediction at fault; the LVIS API
itself would only fail an ``assert`` or a ``KeyError`` deep inside.
"""

from __future__ import annotations

import itertools
import logging
import math
import numbers
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np
from tqdm.auto import tqdm

from stepwise.evaluation.detections import Detections
from stepwise.evaluation.gt_file import read_box_annotations, read_category_ids
from stepwise.evaluation.results_file import ResultRow, decode_results, row_columns
from stepwise.utils.io import read_json
from stepwise.utils.json_stream import JsonListReader

logger = logging.getLogger(__name__)

PathOrDict = Union[str, "os.PathLike[str]", dict]
PathOrList = Union[str, "os.PathLike[str]", list]

FREQUENCIES = ("r", "c", "f")
_MAX_NAMED = 5  # how many offending items an error or warning lists by name
READ_BLOCK_BYTES = 1 << 24  # a results file is decoded this many bytes at a time (~170k detections)


def _source(obj: Any, default: str) -> str:
    return os.fspath(obj) if isinstance(obj, (str, os.PathLike)) else default


def _is_number(value: Any) -> bool:
    """A real number (int, float, numpy scalar), but not a bool or a string."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _examples(items: list[str]) -> str:
    more = f" (and {len(items) - _MAX_NAMED} more)" if len(items) > _MAX_NAMED else ""
    return "; ".join(items[:_MAX_NAMED]) + more


def read_gt_file(path: str | os.PathLike, what: str = "ground-truth file") -> dict:
    """The box ground truth of an annotation file: ``{"images", "annotations", "categories"}``, each
    annotation ``id, image_id, category_id, bbox, area`` (``iscrowd`` / ``ignore`` where given).

    From this process's ``AnnotationIndex`` of the file (read once, shared with the datasets that read it:
    during training the val file is not read again for each evaluation). A file the index refuses is read by
    ``gt_file.read_box_annotations``, so that :func:`load_gt`'s checks name its problem as they always have.
    """
    from stepwise.data.annotation_index import AnnotationFileError, AnnotationIndex  # here: stepwise.data imports torch

    try:
        return AnnotationIndex.read(path, what).box_dict()
    except AnnotationFileError:
        return read_box_annotations(path, what)


def load_gt(gt: PathOrDict) -> tuple[dict, str, list[str]]:
    """Load and check an LVIS-format annotation file or dict.

    A file is read by :func:`read_gt_file` (segmentation polygons never built).
    Returns ``(dataset, source, warnings)`` where ``source`` names it in messages. Checks the keys the LVIS
    API needs (``frequency`` per category, ``neg_category_ids`` / ``not_exhaustive_category_ids`` per image,
    ``bbox`` and ``area`` per annotation) and that every annotation's image and category exist. GT boxes
    with width or height <= 0 are evaluated as the LVIS API does (no detection can match them) and
    reported in a counted warning.
    """
    src = _source(gt, "ground-truth dict")
    data = read_gt_file(gt, "ground-truth file") if isinstance(gt, (str, os.PathLike)) else gt
    if not isinstance(data, dict):
        raise ValueError(f"{src}: expected an LVIS annotation object, got {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"{src}: missing or non-list key '{key}'")

    cat_ids = _check_categories(data["categories"], src)
    img_ids = _check_images(data["images"], src)
    _check_annotations(data["annotations"], img_ids, cat_ids, src)
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


def _check_categories(categories: list, src: str) -> set:
    """The category ids; raises on an entry without a unique id or an LVIS frequency."""
    cat_ids = set()
    for k, cat in enumerate(categories):
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
    return cat_ids


def _check_images(images: list, src: str) -> set:
    """The image ids; raises on an entry without a unique id or the federated lists."""
    img_ids = set()
    for k, img in enumerate(images):
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
    return img_ids


def _check_annotations(annotations: list, img_ids: set, cat_ids: set, src: str) -> None:
    """Raises naming (a few of) the annotations with an unknown image or category or a malformed box."""
    bad = []
    for k, ann in enumerate(annotations):
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


@dataclass
class Predictions:
    """Checked detections in the LVIS results format, at most ``max_dets`` per image, as arrays.

    ``detections``: the kept detections (``Detections`` columns, in file order).
    ``warnings``: human-readable notes (degenerate boxes, truncation) to show with the report.
    """

    detections: Detections
    num_input: int
    num_degenerate: int = 0
    num_truncated: int = 0
    warnings: list[str] = field(default_factory=list)


class _Problems:
    """A count of problems and the first ``_MAX_NAMED`` messages (an LVIS-size file may have millions)."""

    def __init__(self) -> None:
        self.count, self.examples = 0, []

    def add(self, messages: Iterable[str], count: int) -> None:
        self.examples.extend(itertools.islice(messages, max(0, _MAX_NAMED - len(self.examples))))
        self.count += count

    def text(self) -> str:
        more = f" (and {self.count - len(self.examples)} more)" if self.count > len(self.examples) else ""
        return "; ".join(self.examples) + more


def _integral_ids(values: list) -> np.ndarray | None:
    """``values`` as int64 when every one is an integer (or an integral float), else None."""
    arr = np.asarray(values)
    if arr.dtype.kind in "iu":
        return arr.astype(np.int64, copy=False)
    if arr.dtype.kind == "f" and np.isfinite(arr).all() and (arr == np.round(arr)).all() and np.abs(arr).max(initial=0) < 2**53:
        return arr.astype(np.int64)
    return None


def _fast_columns(items: list) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """Columns of well-formed items (dicts with integer ids, a 4-number bbox, a numeric score); None if
    any item is not, so that the caller checks item by item and names it."""
    try:
        img = _integral_ids([d["image_id"] for d in items])
        cat = _integral_ids([d["category_id"] for d in items])
        boxes, scores = [d["bbox"] for d in items], [d["score"] for d in items]
        # numpy would turn "0.9", True or None into a float: anything but a plain int/float takes the
        # item-by-item path, which accepts numpy numbers and names the rest
        if any(type(v) not in (int, float) for v in scores) or any(
                type(v) not in (int, float) for b in boxes for v in b):
            return None
        box = np.array(boxes, dtype=np.float64)
        score = np.array(scores, dtype=np.float64)
    except (TypeError, KeyError, ValueError, OverflowError, IndexError):
        return None
    if img is None or cat is None or box.shape != (len(items), 4) or score.shape != (len(items),):
        return None
    return img, cat, box, score


def _checked_columns(items: list, offset: int, problems: _Problems) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
    """Item-by-item version of ``_fast_columns`` that names each malformed item in ``problems``.

    Returns the columns of the well-formed items and their indices (``offset`` + position in ``items``)."""
    img, cat, box, score, rows = [], [], [], [], []
    for i, det in enumerate(items, start=offset):
        if not isinstance(det, dict) or not {"image_id", "category_id", "bbox", "score"} <= det.keys():
            problems.add([f"prediction #{i} needs image_id, category_id, bbox, score: {det!r:.120}"], 1)
            continue
        ids = _integral_ids([det["image_id"], det["category_id"]]) if all(
            isinstance(det[k], (int, float)) and not isinstance(det[k], bool) for k in ("image_id", "category_id")) else None
        if ids is None:
            problems.add([f"prediction #{i}: image_id and category_id must be integers, got "
                          f"{det['image_id']!r:.40} and {det['category_id']!r:.40}"], 1)
            continue
        box_ok = isinstance(det["bbox"], (list, tuple)) and len(det["bbox"]) == 4
        if not (box_ok and all(_is_number(v) for v in det["bbox"]) and _is_number(det["score"])):
            problems.add([f"prediction #{i} (image {det['image_id']}): bbox must be 4 numbers and score a number "
                          f"(not a string or boolean), got bbox {det['bbox']!r:.60} and score {det['score']!r:.20}"], 1)
            continue
        b, s = [float(v) for v in det["bbox"]], float(det["score"])
        img.append(ids[0])
        cat.append(ids[1])
        box.append(b)
        score.append(s)
        rows.append(i)
    cols = (np.array(img, dtype=np.int64), np.array(cat, dtype=np.int64),
            np.array(box, dtype=np.float64).reshape(-1, 4), np.array(score, dtype=np.float64))
    return cols, np.array(rows, dtype=np.int64)


def _check_chunk(cols: tuple[np.ndarray, ...], rows: np.ndarray, img_ids: np.ndarray, cat_ids: np.ndarray,
                 gt_source: str, problems: _Problems, degenerate: _Problems) -> Detections:
    """Check one chunk's columns (``rows``: each row's index in the whole input) against the ground truth.

    Unknown image or category and non-finite numbers go to ``problems`` (one message per row, the first
    problem found); boxes with width or height <= 0 go to ``degenerate`` and become zero-size boxes.
    """
    img, cat, box, score = cols
    unknown_img = ~np.isin(img, img_ids)
    unknown_cat = ~unknown_img & ~np.isin(cat, cat_ids)
    non_finite = ~unknown_img & ~unknown_cat & ~(np.isfinite(box).all(1) & np.isfinite(score))
    bad = unknown_img | unknown_cat | non_finite
    if bad.any():
        def messages():
            for k in np.flatnonzero(bad):
                if unknown_img[k]:
                    yield f"prediction #{rows[k]}: image_id {img[k]} is not an image of {gt_source}"
                elif unknown_cat[k]:
                    yield f"prediction #{rows[k]} (image {img[k]}): category_id {cat[k]} is not a category of {gt_source}"
                else:
                    yield f"prediction #{rows[k]} (image {img[k]}): non-finite bbox or score"
        problems.add(messages(), int(bad.sum()))
    small = ~bad & ((box[:, 2] <= 0) | (box[:, 3] <= 0))
    if small.any():
        degenerate.add((f"prediction #{rows[k]} (image {img[k]}, category {cat[k]}, bbox {box[k].tolist()})"
                        for k in np.flatnonzero(small)), int(small.sum()))
        box = box.copy()
        box[:, 2:] = np.maximum(box[:, 2:], 0.0)
    return Detections(img, cat, box, score)


def load_predictions(predictions: PathOrList | Detections, gt: dict, max_dets: int = 300, gt_source: str = "ground truth",
                     progress: bool = False) -> Predictions:
    """Load and check detections against the ground truth ``gt`` (an already checked dict).

    ``predictions``: an LVIS results file (read piece by piece into arrays, see
    ``stepwise.utils.json_stream``; ``progress`` shows a bar over its bytes), a list of result dicts, or
    ``Detections``. Unknown ``image_id`` / ``category_id``, missing keys or a non-finite score are errors
    naming the prediction (its index in the input). A box with width or height <= 0 is kept as a
    zero-size box (it can match nothing, so it counts as a false positive exactly as a detector's real
    output would) and reported in a counted warning. Then the ``max_dets`` highest-scoring detections
    of each image are kept (``Detections.top_k``).
    """
    src = _source(predictions, "predictions list")
    img_ids = np.array(sorted(img["id"] for img in gt["images"]), dtype=np.int64)
    cat_ids = np.array(sorted(cat["id"] for cat in gt["categories"]), dtype=np.int64)
    problems, degenerate = _Problems(), _Problems()
    if isinstance(predictions, Detections):
        kept = [_check_chunk((predictions.image_id, predictions.category_id, predictions.bbox, predictions.score),
                             np.arange(len(predictions)), img_ids, cat_ids, gt_source, problems, degenerate)]
        num_input = len(predictions)
    else:
        if isinstance(predictions, (str, os.PathLike)):
            bar = tqdm(total=os.path.getsize(predictions) if os.path.isfile(predictions) else None, unit="B",
                       unit_scale=True, desc="reading predictions", disable=not progress, dynamic_ncols=True)
            chunks: Iterable[tuple[int, list]] = JsonListReader(predictions, "predictions file", READ_BLOCK_BYTES, bar.update,
                                                                    decode=decode_results)
        elif isinstance(predictions, list):
            bar, chunks = None, [(0, predictions)]
        else:
            raise ValueError(f"{src}: expected a list of detections in the LVIS results format, got {type(predictions).__name__}")
        kept, num_input = [], 0
        try:
            for offset, items in chunks:
                cols = (row_columns(items) if type(items[0]) is ResultRow else _fast_columns(items)) if items else None
                if cols is None:
                    cols, rows = _checked_columns(items, offset, problems)
                else:
                    rows = np.arange(offset, offset + len(items))
                kept.append(_check_chunk(cols, rows, img_ids, cat_ids, gt_source, problems, degenerate))
                num_input += len(items)
        finally:
            if bar is not None:
                bar.close()
    if problems.count:
        raise ValueError(f"{src}: {problems.count} invalid prediction(s): {problems.text()}")

    dets = Detections.concat(kept)
    out = Predictions(detections=dets.top_k(max_dets), num_input=num_input, num_degenerate=degenerate.count)
    if degenerate.count:
        msg = (f"{src}: {degenerate.count} prediction(s) with width or height <= 0, kept as zero-size boxes "
               f"(false positives): {degenerate.text()}")
        out.warnings.append(msg)
        logger.warning(msg)
    out.num_truncated = len(dets) - len(out.detections)
    if out.num_truncated:
        out.warnings.append(f"{out.num_truncated} lowest-scoring detection(s) beyond {max_dets} per image were not evaluated")
    return out


def training_instance_counts(gt: dict, train_gt: PathOrDict | None = None, gt_source: str = "ground truth") -> tuple[dict, str]:
    """Training instance count per category id of ``gt``.

    From ``train_gt``'s annotations when given (categories absent there count 0; a file this process has
    indexed already is not read again), else from the ``instance_count`` field of ``gt``'s categories (LVIS
    v1 val carries the train-set counts there).
    Returns ``(counts, source)``, ``source`` saying where the counts came from.
    """
    if train_gt is not None:
        tsrc = _source(train_gt, "training annotation dict")
        counts = {cat["id"]: 0 for cat in gt["categories"]}
        if isinstance(train_gt, (str, os.PathLike)):
            from stepwise.data.annotation_index import AnnotationIndex  # here: stepwise.data imports torch

            indexed = AnnotationIndex.cached(train_gt)  # a training process has it (LVIS train: 1 GB)
            if indexed is not None:
                for cid, n in indexed.category_annotation_counts().items():
                    if cid in counts:
                        counts[cid] = n
                return counts, f"annotations of {tsrc}"
            ids = read_category_ids(train_gt, "training annotation file")  # only the ids are built
            if ids is not None:
                for cid, n in zip(*np.unique(np.asarray(ids, dtype=np.int64), return_counts=True)):
                    if int(cid) in counts:
                        counts[int(cid)] = int(n)
                return counts, f"annotations of {tsrc}"
        train = read_json(train_gt, "training annotation file") if isinstance(train_gt, (str, os.PathLike)) else train_gt
        if not isinstance(train, dict) or not isinstance(train.get("annotations"), list):
            raise ValueError(f"{tsrc}: expected an annotation object with a list 'annotations'")
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
