"""Category id <-> contiguous index mapping, with names, LVIS frequency and training counts.

The model predicts contiguous indices ``0..C-1``; annotation files use arbitrary category ids. A
:class:`CategoryMap` is built from the training annotation file, stored in every checkpoint
(``to_dict``/``from_dict``) and reused for validation sets so a model always knows its classes.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from stepwise.data.annotation_index import AnnotationIndex

FREQUENCIES = ("r", "c", "f")


@dataclass(frozen=True)
class CategoryMap:
    """Categories sorted by id; index ``k`` of every field describes contiguous class ``k``.

    Attributes:
        ids: category id of each contiguous index.
        names: category name of each index.
        frequencies: LVIS frequency group ``'r'|'c'|'f'`` of each index, or ``None`` (COCO-format files).
        image_counts: number of training images containing the class.
        instance_counts: number of training instances (boxes) of the class.
    """

    ids: tuple[int, ...]
    names: tuple[str, ...]
    frequencies: tuple[str | None, ...]
    image_counts: tuple[int, ...]
    instance_counts: tuple[int, ...]
    _index: dict[int, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        n = len(self.ids)
        for name in ("names", "frequencies", "image_counts", "instance_counts"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"CategoryMap: {name} has {len(getattr(self, name))} entries, ids has {n}")
        index = {cid: k for k, cid in enumerate(self.ids)}
        if len(index) != n:
            dup = sorted({cid for cid in self.ids if self.ids.count(cid) > 1})
            raise ValueError(f"CategoryMap: duplicate category ids {dup[:10]}")
        bad = [(cid, f) for cid, f in zip(self.ids, self.frequencies) if f is not None and f not in FREQUENCIES]
        if bad:
            raise ValueError(f"CategoryMap: category {bad[0][0]} has frequency {bad[0][1]!r}, expected one of "
                             f"{FREQUENCIES} or None")
        object.__setattr__(self, "_index", index)

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, category_id: int) -> bool:
        return category_id in self._index

    def index(self, category_id: int) -> int:
        """Contiguous index of ``category_id`` (KeyError naming the id when unknown)."""
        try:
            return self._index[category_id]
        except KeyError:
            raise KeyError(f"category id {category_id} is not in the category map "
                           f"({len(self)} categories)") from None

    def category_id(self, index: int) -> int:
        """Category id of contiguous ``index``."""
        return self.ids[index]

    @property
    def has_frequency(self) -> bool:
        """True when every category carries an LVIS frequency group."""
        return len(self) > 0 and all(f is not None for f in self.frequencies)

    def to_dict(self) -> dict[str, list]:
        """Plain lists (JSON- and ``torch.save``-friendly)."""
        return {"ids": list(self.ids), "names": list(self.names), "frequencies": list(self.frequencies),
                "image_counts": list(self.image_counts), "instance_counts": list(self.instance_counts)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Sequence]) -> "CategoryMap":
        """Inverse of :meth:`to_dict`."""
        missing = [k for k in ("ids", "names", "frequencies", "image_counts", "instance_counts") if k not in data]
        if missing:
            raise KeyError(f"CategoryMap.from_dict: missing keys {missing}")
        return cls(ids=tuple(int(i) for i in data["ids"]), names=tuple(str(n) for n in data["names"]),
                   frequencies=tuple(data["frequencies"]),
                   image_counts=tuple(int(c) for c in data["image_counts"]),
                   instance_counts=tuple(int(c) for c in data["instance_counts"]))

    @classmethod
    def from_annotations(cls, data: Mapping[str, Any], source: str = "annotation file") -> "CategoryMap":
        """Build from an LVIS/COCO annotation dict (``categories`` and ``annotations`` lists).

        ``image_count``/``instance_count`` come from the category entries when every category has them;
        otherwise they are counted from the non-crowd annotations. ``source`` names the file in errors.
        """
        cats = data.get("categories")
        if not isinstance(cats, list):
            raise ValueError(f"{source}: 'categories' must be a list")
        for k, cat in enumerate(cats):
            if not isinstance(cat, dict) or "id" not in cat:
                raise ValueError(f"{source}: category entry #{k} has no 'id'")
        cats = sorted(cats, key=lambda c: c["id"])
        names = tuple(str(c.get("name", c["id"])) for c in cats)
        frequencies = tuple(c.get("frequency") for c in cats)

        counted_images: dict[int, set] = defaultdict(set)
        counted_instances: dict[int, int] = defaultdict(int)
        need_count = any("image_count" not in c or "instance_count" not in c for c in cats)
        if need_count:
            for ann in data.get("annotations", []):
                if ann.get("iscrowd", 0):
                    continue
                counted_images[ann.get("category_id")].add(ann.get("image_id"))
                counted_instances[ann.get("category_id")] += 1

        def count(cat: dict, key: str, counted) -> int:
            if all(key in c for c in cats):
                return int(cat[key])
            value = counted.get(cat["id"], 0)
            return len(value) if isinstance(value, set) else int(value)

        return cls(ids=tuple(int(c["id"]) for c in cats), names=names, frequencies=frequencies,
                   image_counts=tuple(count(c, "image_count", counted_images) for c in cats),
                   instance_counts=tuple(count(c, "instance_count", counted_instances) for c in cats))

    @classmethod
    def from_index(cls, index: AnnotationIndex) -> "CategoryMap":
        """Build from an :class:`AnnotationIndex`; the same map as :meth:`from_annotations` of the file's dict
        (counts from the category entries when every category has them, else from the non-crowd annotations)."""
        cats = sorted(index.categories, key=lambda c: c["id"])  # index.category_ids is this order
        fields = {}
        for key in ("image_count", "instance_count"):
            if all(key in c for c in cats):
                fields[key] = tuple(int(c[key]) for c in cats)
        if len(fields) < 2:
            counted_images, counted_instances = index_category_counts(index)
            fields.setdefault("image_count", tuple(counted_images.tolist()))
            fields.setdefault("instance_count", tuple(counted_instances.tolist()))
        return cls(ids=tuple(int(c["id"]) for c in cats), names=tuple(str(c.get("name", c["id"])) for c in cats),
                   frequencies=tuple(c.get("frequency") for c in cats), image_counts=fields["image_count"],
                   instance_counts=fields["instance_count"])


def index_category_counts(index: AnnotationIndex) -> tuple[np.ndarray, np.ndarray]:
    """(images, instances), each (C,) int64 in ascending category id order: the images holding the category and
    its boxes, over the non-crowd annotations of ``index``."""
    keep = index.iscrowd != 1
    category = np.searchsorted(index.category_ids, index.category_id[keep])
    num_classes = len(index.category_ids)
    instances = np.bincount(category, minlength=num_classes)
    pairs = np.unique(category * max(index.num_images, 1) + index.image_index[keep])
    images = np.bincount(pairs // max(index.num_images, 1), minlength=num_classes)
    return images.astype(np.int64), instances.astype(np.int64)
