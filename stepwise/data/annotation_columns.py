"""The parts of :mod:`stepwise.data.annotation_index` below the index: the typed decoding of an annotation
file (msgspec structs that skip polygons and unknown keys), the compact array types, and the checks that
turn decoded images, categories and annotations into numpy columns (:class:`AnnotationFileError` naming the
item at fault, in file order)."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, Union

import msgspec
import numpy as np

from stepwise.utils.io import read_json
from stepwise.utils.json_stream import mapped_file

_UNSET = msgspec.UNSET


class AnnotationFileError(ValueError):
    """An annotation file is valid JSON but not a usable LVIS/COCO annotation file; names the item."""


# ----------------------------------------------------------------------------------------- decoding
class _Image(msgspec.Struct, gc=False):
    id: Any = _UNSET
    height: Any = _UNSET
    width: Any = _UNSET
    file_name: Any = _UNSET
    coco_url: Any = _UNSET
    neg_category_ids: Any = _UNSET
    not_exhaustive_category_ids: Any = _UNSET


class _Annotation(msgspec.Struct, gc=False):
    id: Any = _UNSET
    image_id: Any = _UNSET
    category_id: Any = _UNSET
    bbox: Any = _UNSET
    area: Any = _UNSET
    iscrowd: Any = _UNSET
    ignore: Any = _UNSET


# An entry that is not an object is kept as what it is, for the check to name it.
_NotObject = Union[list, str, int, float, bool, None]


class _File(msgspec.Struct):
    images: Union[list[Union[_Image, _NotObject]], msgspec.UnsetType] = _UNSET
    annotations: Union[list[Union[_Annotation, _NotObject]], msgspec.UnsetType] = _UNSET
    categories: Union[list[Any], msgspec.UnsetType] = _UNSET


def _decode(path: Path, what: str) -> _File:
    """The file decoded into ``_File`` (unknown keys skipped without being built). A file msgspec cannot
    take as is (invalid JSON, NaN, numbers beyond 64 bits, a top-level key of another type) is read by
    ``read_json`` (which names invalid JSON) and checked, then converted."""
    try:
        with mapped_file(path, what) as buf:
            return msgspec.json.decode(buf, type=_File)
    except (msgspec.ValidationError, msgspec.DecodeError):
        pass
    data = read_json(path, what)
    _check_top_level(data, _source(path))
    return msgspec.convert(data, _File)


def _source(path: Path) -> str:
    return f"annotation file {path}"


def _check_top_level(data: Any, src: str) -> None:
    for key in ("images", "annotations", "categories"):
        value = data.get(key) if isinstance(data, dict) else getattr(data, key, None)
        if not isinstance(value, list):
            raise AnnotationFileError(f"{src}: missing or non-list key {key!r}")


# ------------------------------------------------------------------------------------------ arrays
@dataclass(frozen=True, eq=False)
class PackedStrings:
    """``n`` strings in one UTF-8 buffer: ``data`` uint8 (B,), ``offsets`` int64 (n + 1,)."""

    data: np.ndarray
    offsets: np.ndarray

    @classmethod
    def from_list(cls, strings: Sequence[str]) -> "PackedStrings":
        encoded = [s.encode("utf-8") for s in strings]
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=offsets[1:])
        return cls(np.frombuffer(b"".join(encoded), dtype=np.uint8).copy(), offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, k: int) -> str:
        return self.data[self.offsets[k]:self.offsets[k + 1]].tobytes().decode("utf-8")


@dataclass(frozen=True, eq=False)
class Ragged:
    """``n`` integer lists in CSR form: list ``k`` is ``values[offsets[k]:offsets[k + 1]]``;
    ``values`` int64 (L,), ``offsets`` int64 (n + 1,)."""

    values: np.ndarray
    offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, k: int) -> np.ndarray:
        return self.values[self.offsets[k]:self.offsets[k + 1]]


def _offsets(lengths: Sequence[int] | np.ndarray) -> np.ndarray:
    out = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


def _is_int(value: Any) -> bool:
    return type(value) is int and -2**63 <= value < 2**63


def _finite_number(value: Any) -> bool:
    """A finite int or float from JSON (not a bool, not a string)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond float range
        return False



# ------------------------------------------------------------------------------------------ checks
def _categories(cats: list, src: str) -> tuple[tuple[dict, ...], np.ndarray]:
    ids = []
    for k, cat in enumerate(cats):
        if not isinstance(cat, dict) or "id" not in cat:
            raise AnnotationFileError(f"{src}: category entry #{k} has no 'id'")
        if not _is_int(cat["id"]):
            raise AnnotationFileError(f"{src}: category entry #{k} has a non-integer id {cat['id']!r}")
        ids.append(cat["id"])
    ids = np.asarray(ids, dtype=np.int64)
    unique, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise AnnotationFileError(f"{src}: category id {int(unique[counts > 1][0])} appears more than once")
    return tuple(cats), unique


def _images(images: list, src: str) -> dict[str, Any]:
    """Image columns (see ``AnnotationIndex``), checked in file order with the dataset's messages."""
    n = len(images)
    ids = np.zeros(n, dtype=np.int64)
    height, width = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    has_size = np.zeros(n, dtype=bool)
    names: dict[str, list[str]] = {"file_name": [], "coco_url": []}
    lists: dict[str, tuple[list, list, np.ndarray]] = {
        key: ([], [], np.zeros(n, dtype=bool)) for key in ("neg_category_ids", "not_exhaustive_category_ids")}
    for k, img in enumerate(images):
        if not isinstance(img, _Image):
            raise AnnotationFileError(f"{src}: image entry #{k} is not an object: {img!r:.80}")
        if img.id is _UNSET:
            raise AnnotationFileError(f"{src}: image entry #{k} has no 'id'")
        if not _is_int(img.id):
            raise AnnotationFileError(f"{src}: image entry #{k} has a non-integer id {img.id!r}")
        ids[k] = img.id
        if img.height is not _UNSET and img.width is not _UNSET:
            try:
                height[k], width[k] = int(img.height), int(img.width)
            except (TypeError, ValueError, OverflowError):
                raise AnnotationFileError(f"{src}: image {img.id} has a non-integer height or width "
                                          f"({img.height!r}, {img.width!r})") from None
            has_size[k] = True
        for key, values in names.items():
            value = getattr(img, key)
            values.append(str(value) if value is not _UNSET and value else "")
        for key, (lengths, values, given) in lists.items():
            value = getattr(img, key)
            if isinstance(value, list):
                if not all(_is_int(v) for v in value):
                    raise AnnotationFileError(f"{src}: image {img.id} has a non-integer entry in {key!r}: "
                                              f"{value!r:.80}")
                given[k] = True
                values.extend(value)
                lengths.append(len(value))
            else:
                lengths.append(0)
    unique, first, counts = np.unique(ids, return_index=True, return_counts=True)
    if (counts > 1).any():
        dup = ids[np.sort(first[counts > 1])[0]]  # the first id, in file order, that appears again
        raise AnnotationFileError(f"{src}: image id {int(dup)} appears more than once")
    ragged = {key: Ragged(np.asarray(values, dtype=np.int64), _offsets(lengths))
              for key, (lengths, values, _) in lists.items()}
    return {"image_id": ids, "height": height, "width": width, "has_size": has_size,
            "file_name": PackedStrings.from_list(names["file_name"]),
            "coco_url": PackedStrings.from_list(names["coco_url"]),
            "neg_category_ids": ragged["neg_category_ids"],
            "not_exhaustive_category_ids": ragged["not_exhaustive_category_ids"],
            "has_neg": lists["neg_category_ids"][2], "has_not_exhaustive": lists["not_exhaustive_category_ids"][2]}


def _lookup(sorted_ids: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(position of each value in ``sorted_ids``, whether it is there)."""
    if len(sorted_ids) == 0:
        return np.zeros(len(values), dtype=np.int64), np.zeros(len(values), dtype=bool)
    pos = np.minimum(np.searchsorted(sorted_ids, values), len(sorted_ids) - 1)
    return pos, sorted_ids[pos] == values


def _int_column(values: list) -> np.ndarray | None:
    """``values`` as int64 when every one is a JSON integer that fits, else None."""
    if not set(map(type, values)) <= {int}:
        return None
    try:
        return np.asarray(values, dtype=np.int64)
    except OverflowError:
        return None


def _flag_column(values: list) -> np.ndarray:
    """(N,) int8: -1 absent, else 1 truthy, 0 falsy."""
    if values.count(_UNSET) == len(values):
        return np.full(len(values), -1, dtype=np.int8)
    return np.fromiter((-1 if v is _UNSET else 1 if v else 0 for v in values), dtype=np.int8, count=len(values))


def _float_column(values: list) -> np.ndarray:
    """(N,) float64, NaN where a value is absent or not a number."""
    if set(map(type, values)) <= {int, float}:
        try:
            return np.asarray(values, dtype=np.float64)
        except OverflowError:
            pass
    return np.fromiter((float(v) if _finite_number(v) else math.nan for v in values),
                       dtype=np.float64, count=len(values))


def _annotations(anns: list, image_ids: np.ndarray, category_ids: np.ndarray, src: str) -> dict[str, np.ndarray]:
    """Annotation columns, checked. The whole list is checked in bulk; when anything is wrong,
    :func:`_first_bad_annotation` walks it in file order to name the first bad one."""
    n = len(anns)
    order = np.argsort(image_ids, kind="stable")
    sorted_images = image_ids[order]
    columns = None
    if set(map(type, anns)) <= {_Annotation}:
        columns = _bulk_columns(anns, sorted_images, category_ids)
    if columns is None:
        _first_bad_annotation(anns, set(image_ids.tolist()), set(category_ids.tolist()), src)
        raise AnnotationFileError(f"{src}: invalid annotations")  # not reached: the walk names one
    ann_id, image_pos, category_id, bbox = columns
    return {"ann_id": ann_id, "image_index": order[image_pos], "category_id": category_id, "bbox": bbox,
            "area": _float_column([a.area for a in anns]), "iscrowd": _flag_column([a.iscrowd for a in anns]),
            "ignore": _flag_column([a.ignore for a in anns])} if n else {
        "ann_id": np.zeros(0, np.int64), "image_index": np.zeros(0, np.int64), "category_id": np.zeros(0, np.int64),
        "bbox": np.zeros((0, 4)), "area": np.zeros(0), "iscrowd": np.zeros(0, np.int8),
        "ignore": np.zeros(0, np.int8)}


def _bulk_columns(anns: list, sorted_images: np.ndarray, category_ids: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """(ann_id, position of the image in ``sorted_images``, category_id, bbox (N, 4)) when every
    annotation passes every check, else None."""
    ann_id = _int_column([a.id for a in anns])
    image_id = _int_column([a.image_id for a in anns])
    category_id = _int_column([a.category_id for a in anns])
    boxes = [a.bbox for a in anns]
    if ann_id is None or image_id is None or category_id is None:
        return None
    if not (set(map(type, boxes)) <= {list} and set(map(len, boxes)) <= {4}
            and set(map(type, itertools.chain.from_iterable(boxes))) <= {int, float}):
        return None
    try:
        bbox = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    except OverflowError:
        return None
    image_pos, image_ok = _lookup(sorted_images, image_id)
    _, category_ok = _lookup(category_ids, category_id)
    if not (image_ok.all() and category_ok.all() and np.isfinite(bbox).all()):
        return None
    return ann_id, image_pos, category_id, bbox


def _first_bad_annotation(anns: list, image_ids: set, category_ids: set, src: str) -> None:
    """Raise :class:`AnnotationFileError` for the first annotation (file order) that fails a check."""
    for k, ann in enumerate(anns):
        if not isinstance(ann, _Annotation):
            raise AnnotationFileError(f"{src}: annotation #{k} lacks one of 'id', 'image_id', 'category_id', 'bbox'")
        ann_id = f"#{k}" if ann.id is _UNSET else ann.id
        where = f"{src}: annotation {ann_id}"
        image = "" if ann.image_id is _UNSET else f" in image {ann.image_id!r}"
        if any(v is _UNSET for v in (ann.id, ann.image_id, ann.category_id, ann.bbox)):
            raise AnnotationFileError(f"{where} lacks one of 'id', 'image_id', 'category_id', 'bbox'{image}")
        if not _is_int(ann.image_id) or ann.image_id not in image_ids:
            raise AnnotationFileError(f"{where} refers to image_id {ann.image_id}, which does not exist")
        if not _is_int(ann.category_id) or ann.category_id not in category_ids:
            raise AnnotationFileError(f"{where} refers to category_id {ann.category_id}, which does not "
                                      f"exist{image}")
        bbox = ann.bbox
        if (not isinstance(bbox, (list, tuple)) or len(bbox) != 4
                or not all(_finite_number(v) for v in bbox)):
            raise AnnotationFileError(f"{where} has an invalid bbox {bbox!r} (expected 4 finite numbers x, y, "
                                      f"w, h){image}")
        if not _is_int(ann.id):
            raise AnnotationFileError(f"{where} has a non-integer id {ann.id!r}{image}")
