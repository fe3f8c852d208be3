"""One compact index of an LVIS/COCO-format annotation file, read once per process and shared by every
reader: the dataset, the category map, selection and RFS, evaluation and visualisation.

Why: LVIS v1 train is a 1 GB file (100k images, 1.27M annotations, most of its bytes segmentation polygons).
``json.load`` makes it ~5 GB of Python objects and a minute of CPU, and a dataset that keeps one Python
object per annotation has its pages copied into every forked DataLoader worker as reference counts and
the garbage collector touch them (detectron2 serialises its dataset dicts into one numpy buffer for this
reason). Here the file is decoded by msgspec with typed structs that skip what no reader uses (polygons and
every other unknown key are never built), checked, and turned into numpy arrays; the decoded objects are
dropped at once. No segmentation data is kept.

:meth:`AnnotationIndex.read` caches the index per process by path, modification time and size (a few
files, least recently used first out), so the category map, the dataset, preflight and every evaluation of
a run read each file once.

Validation (:class:`AnnotationFileError`, a ``ValueError``) names the file and the item, in file order,
with the dataset's messages: the top-level keys, each image (an object with an integer ``id``, integer
``height``/``width`` when given, unique ids, integer federated lists), each category (an object with an
integer ``id``, unique), each annotation (``id``, ``image_id``, ``category_id``, ``bbox`` present; the image
and category exist; the bbox is 4 finite numbers; the id an integer) naming its image. A file that is not
valid JSON raises ``ValueError`` naming the file, line and column (``read_json``).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import msgspec
import numpy as np

from stepwise.data.annotation_columns import (
    AnnotationFileError,
    PackedStrings,
    Ragged,
    _annotations,
    _categories,
    _check_top_level,
    _decode,
    _File,
    _images,
    _lookup,
    _offsets,
    _source,
)

_CACHE_SIZE = 4  # files kept per process (LVIS train's index is ~110 MB)


# ---------------------------------------------------------------------------------------- the index
@dataclass(eq=False)
class AnnotationIndex:
    """An annotation file as arrays. Images (I,) in file order, annotations (N,) in file order,
    categories (C,).

    Attributes:
        path: the file.
        image_id: (I,) int64. height, width: (I,) int64, valid where ``has_size`` (I,) bool (both given).
        file_name, coco_url: :class:`PackedStrings` of I entries, ``""`` where the key is absent or empty.
        neg_category_ids, not_exhaustive_category_ids: :class:`Ragged` over the images; ``has_neg`` /
            ``has_not_exhaustive`` (I,) bool: the image gives the key as a list.
        ann_id, category_id: (N,) int64. image_index: (N,) int64, row of the annotation's image.
        bbox: (N, 4) float64 ``[x, y, w, h]``. area: (N,) float64, NaN where absent (or not a number).
        iscrowd, ignore: (N,) int8, 1 truthy, 0 falsy, -1 absent.
        by_image, image_offsets: annotation rows grouped by image: image k's rows in file order are
            ``by_image[image_offsets[k]:image_offsets[k + 1]]``; (N,) and (I + 1,) int64.
        categories: the category objects as the file gives them (file order; small).
        category_ids: (C,) int64, ascending.
    """

    path: Path
    image_id: np.ndarray
    height: np.ndarray
    width: np.ndarray
    has_size: np.ndarray
    file_name: PackedStrings
    coco_url: PackedStrings
    neg_category_ids: Ragged
    not_exhaustive_category_ids: Ragged
    has_neg: np.ndarray
    has_not_exhaustive: np.ndarray
    ann_id: np.ndarray
    image_index: np.ndarray
    category_id: np.ndarray
    bbox: np.ndarray
    area: np.ndarray
    iscrowd: np.ndarray
    ignore: np.ndarray
    by_image: np.ndarray
    image_offsets: np.ndarray
    categories: tuple[dict, ...]
    category_ids: np.ndarray

    # --------------------------------------------------------------------------------- reading
    @classmethod
    def read(cls, path: str | os.PathLike, what: str = "annotation file") -> "AnnotationIndex":
        """The index of ``path``, from this process's cache when the file is unchanged.

        ``what`` names the file when it is missing, unreadable or not valid JSON; the content checks
        say "annotation file <path>". Raises FileNotFoundError, OSError, ValueError (invalid JSON) or
        :class:`AnnotationFileError`.
        """
        path = Path(path)
        key = _cache_key(path, what)
        with _CACHE_LOCK:
            hit = _CACHE.get(key[0])
            if hit is not None and hit[0] == key[1]:
                _CACHE.move_to_end(key[0])
                return hit[1]
        index = cls.from_decoded(_decode(path, what), path)
        with _CACHE_LOCK:
            _CACHE[key[0]] = (key[1], index)
            _CACHE.move_to_end(key[0])
            while len(_CACHE) > _CACHE_SIZE:
                _CACHE.popitem(last=False)
        return index

    @classmethod
    def cached(cls, path: str | os.PathLike) -> "AnnotationIndex | None":
        """The index of ``path`` when this process has read the unchanged file already, else None."""
        try:
            key = _cache_key(Path(path), "annotation file")
        except OSError:
            return None
        with _CACHE_LOCK:
            hit = _CACHE.get(key[0])
        return hit[1] if hit is not None and hit[0] == key[1] else None

    @classmethod
    def from_dict(cls, data: dict, path: str | os.PathLike = "<dict>") -> "AnnotationIndex":
        """The index of an annotation dict (as ``json.load`` returns it); checks as for a file."""
        _check_top_level(data, _source(Path(path)))
        return cls.from_decoded(msgspec.convert(data, _File), Path(path))

    @classmethod
    def from_decoded(cls, decoded: _File, path: Path) -> "AnnotationIndex":
        src = _source(path)
        _check_top_level(decoded, src)
        categories, category_ids = _categories(decoded.categories, src)
        images = _images(decoded.images, src)
        decoded.images = decoded.categories = None
        anns = _annotations(decoded.annotations, images["image_id"], category_ids, src)
        decoded.annotations = None
        by_image = np.argsort(anns["image_index"], kind="stable")
        counts = np.bincount(anns["image_index"], minlength=len(images["image_id"]))
        index = cls(path=path, **images, **anns, by_image=by_image, image_offsets=_offsets(counts),
                    categories=categories, category_ids=category_ids)
        for value in vars(index).values():  # shared by every reader of the process: nobody may change it
            for array in vars(value).values() if isinstance(value, (PackedStrings, Ragged)) else [value]:
                if isinstance(array, np.ndarray):
                    array.flags.writeable = False
        return index

    # ------------------------------------------------------------------------------- accessors
    @property
    def num_images(self) -> int:
        return len(self.image_id)

    @property
    def num_annotations(self) -> int:
        return len(self.ann_id)

    def image_rows(self, k: int) -> np.ndarray:
        """(n,) int64 annotation rows of image ``k`` in file order."""
        return self.by_image[self.image_offsets[k]:self.image_offsets[k + 1]]

    def image_entry(self, k: int) -> dict[str, Any]:
        """Image ``k`` as a dict of the keys the index keeps (``id``, ``height``/``width``, ``file_name``
        / ``coco_url`` when non-empty, the federated lists when given)."""
        entry: dict[str, Any] = {"id": int(self.image_id[k])}
        if self.has_size[k]:
            entry["height"], entry["width"] = int(self.height[k]), int(self.width[k])
        for key, names in (("file_name", self.file_name), ("coco_url", self.coco_url)):
            name = names[k]
            if name:
                entry[key] = name
        if self.has_neg[k]:
            entry["neg_category_ids"] = self.neg_category_ids[k].tolist()
        if self.has_not_exhaustive[k]:
            entry["not_exhaustive_category_ids"] = self.not_exhaustive_category_ids[k].tolist()
        return entry

    def box_annotations(self, rows: np.ndarray | None = None) -> list[dict[str, Any]]:
        """Annotation dicts (``id, image_id, category_id, bbox, area`` and ``iscrowd`` / ``ignore`` where
        given) of ``rows`` (default: all, file order): what box evaluation reads."""
        rows = np.arange(self.num_annotations) if rows is None else np.asarray(rows, dtype=np.int64)
        ids, images = self.ann_id[rows].tolist(), self.image_id[self.image_index[rows]].tolist()
        cats, boxes, areas = self.category_id[rows].tolist(), self.bbox[rows].tolist(), self.area[rows].tolist()
        crowd, ignore = self.iscrowd[rows].tolist(), self.ignore[rows].tolist()
        out = []
        for a, i, c, b, area, cr, ig in zip(ids, images, cats, boxes, areas, crowd, ignore):
            ann = {"id": a, "image_id": i, "category_id": c, "bbox": b}
            if area == area:  # not NaN
                ann["area"] = area
            if cr >= 0:
                ann["iscrowd"] = cr
            if ig >= 0:
                ann["ignore"] = ig
            out.append(ann)
        return out

    def box_dict(self) -> dict[str, list]:
        """``{"images", "annotations", "categories"}`` as :func:`stepwise.evaluation.gt_file.read_box_annotations`
        gives them (images with the keys of :meth:`image_entry`), for the evaluators."""
        return {"images": [self.image_entry(k) for k in range(self.num_images)],
                "annotations": self.box_annotations(), "categories": [dict(c) for c in self.categories]}

    def category_annotation_counts(self) -> dict[int, int]:
        """Annotations per category id (every annotation, crowd included; 0 for unused categories)."""
        pos = np.searchsorted(self.category_ids, self.category_id)
        counts = np.bincount(pos, minlength=len(self.category_ids))
        return dict(zip(self.category_ids.tolist(), counts.tolist()))

    def rows_of_ids(self, ann_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """(n,) int64 rows of the annotations with ids ``ann_ids``; -1 where the file has no such id."""
        ann_ids = np.asarray(ann_ids, dtype=np.int64)
        order = np.argsort(self.ann_id, kind="stable")
        pos, found = _lookup(self.ann_id[order], ann_ids)
        return np.where(found, order[pos] if len(order) else -1, -1)


# --------------------------------------------------------------------------------------- the cache
_CACHE: "OrderedDict[str, tuple[tuple, AnnotationIndex]]" = OrderedDict()
_CACHE_LOCK = threading.Lock()


def _cache_key(path: Path, what: str) -> tuple[str, tuple]:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    return os.path.realpath(path), (st.st_ino, st.st_mtime_ns, st.st_size)


def clear_cache() -> None:
    """Forget every cached index (tests; a process that rewrites files in place within one mtime tick)."""
    with _CACHE_LOCK:
        _CACHE.clear()


__all__ = ["AnnotationFileError", "AnnotationIndex", "PackedStrings", "Ragged", "clear_cache"]
