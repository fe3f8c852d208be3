"""LVIS v1, LVIS v0.5 and COCO-format detection datasets.

Image paths: ``file_name`` under ``image_root`` when present (LVIS v0.5's COCO-2014 names such as
``COCO_val2014_000000397133.jpg`` are mapped to the 2017 name ``000000397133.jpg``, as detectron2 does),
else the last two parts of ``coco_url`` under ``image_root`` (LVIS v1: ``train2017/000000391895.jpg``;
v1 val images live in train2017 as well, which this rule handles). A path must stay inside ``image_root``:
an absolute ``file_name``, or one with a ``..`` part, or a ``coco_url`` whose last two parts climb out,
is an error naming the image id and the name, raised when the file is loaded (no image is ever opened
outside the root); ``allow_outside_root=True`` (``data.allow_outside_root``) lifts this for data sets
whose files really live elsewhere.

Pixels: every PIL mode is converted to 8-bit RGB; 16-bit grey (``I;16``, and ``I`` as Pillow opens
16-bit PNGs) is scaled from 0..65535 to 0..255 (not clipped, which would make it white); 32-bit float
(``F``) or integer values beyond 16 bits are refused with an error naming the image. EXIF orientation
is not applied: COCO/LVIS boxes and sizes are in the stored pixel order (as the COCO API, the LVIS API
and Deformable DETR read them); an image whose size matches the annotation only when rotated says so.

The file is read through :class:`~stepwise.data.annotation_index.AnnotationIndex` (once per process, kept
as numpy arrays; the dataset adds arrays of the boxes it uses per image and builds each item from them, so
forked DataLoader workers share its pages instead of copying Python objects).

Validation happens once at load and names the item: a missing/unreadable/invalid file, an annotation
whose ``image_id`` or ``category_id`` does not exist, a malformed box (errors); boxes with width or height
<= 0, and boxes entirely outside their image (when the image's size is known), are dropped with one
counted warning per reason; COCO crowd boxes (``iscrowd=1``) are skipped for training and
counted in ``num_crowd_skipped``. Annotations flagged ``"ignore": 1`` (the step-wise replay sets' unselected
boxes, see ``stepwise.data.smooth_tail``) are appended after the real boxes with ``target["ignore"]`` (N,)
bool True; the criterion neither trains them as objects nor as background. A missing or undecodable image raises at ``__getitem__`` naming the
image id and path.
"""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from stepwise.data.annotation_index import AnnotationIndex, PackedStrings
from stepwise.data.categories import CategoryMap
from stepwise.data.samplers import ImageClasses
from stepwise.data.transforms import finishing_transforms

logger = logging.getLogger(__name__)

_COCO2014_NAME = re.compile(r"^COCO_(?:train|val|test)2014_(\d{12}\.\w+)$")


class DataWarning(UserWarning):
    """Input data problems that were handled (e.g. degenerate boxes dropped) but must not go unnoticed."""


def category_indices(categories: CategoryMap, category_ids: np.ndarray) -> np.ndarray:
    """(n,) int64 contiguous indices of ``category_ids`` (every one must be in ``categories``)."""
    ids = np.asarray(categories.ids, dtype=np.int64)
    order = np.argsort(ids, kind="stable")
    if not len(ids):
        pos = np.zeros(len(category_ids), dtype=np.int64)
    else:
        pos = order[np.minimum(np.searchsorted(ids[order], category_ids), len(ids) - 1)]
    if len(category_ids) and not np.array_equal(ids[pos], category_ids):
        bad = category_ids[ids[pos] != category_ids][0]
        categories.index(int(bad))  # raises KeyError naming it
    return pos.astype(np.int64)


_EXIF_ORIENTATION = 0x0112
_SWAPS_SIDES = (5, 6, 7, 8)  # EXIF orientations that rotate by 90 degrees


def image_path(image: dict, image_root: str | Path, allow_outside_root: bool = False) -> Path:
    """Path of one LVIS/COCO ``images`` entry under ``image_root`` (see the module docstring).

    Raises:
        ValueError: naming the image id, when the entry has no usable name or (unless
            ``allow_outside_root``) its name would lead outside ``image_root``.
    """
    root = Path(image_root)
    if image.get("file_name"):
        name = str(image["file_name"])
        if not allow_outside_root:
            _refuse_escape(image, "file_name", name, name.replace("\\", "/").split("/"), root)
        match = _COCO2014_NAME.match(Path(name).name)
        return root / (match.group(1) if match else name)
    if image.get("coco_url"):
        parts = [p for p in urlparse(str(image["coco_url"])).path.split("/") if p]
        if len(parts) < 2:
            raise ValueError(f"image {image.get('id')}: coco_url {image['coco_url']!r} has no folder/file part")
        if not allow_outside_root:
            _refuse_escape(image, "coco_url", image["coco_url"], parts[-2:], root)
        return root / parts[-2] / parts[-1]
    raise ValueError(f"image {image.get('id')}: has neither 'file_name' nor 'coco_url'")


def _refuse_escape(image: dict, key: str, value: str, parts: list[str], root: Path) -> None:
    """ValueError when a name is absolute or has a ``..`` part (it would resolve outside ``root``)."""
    absolute = key == "file_name" and (Path(value).is_absolute() or value.startswith(("/", "\\")))
    if absolute or any(p == ".." for p in parts):
        raise ValueError(f"image {image.get('id')}: {key} {value!r} leads outside the image root {root} "
                         f"({'an absolute path' if absolute else 'a .. part'}); refused without opening it "
                         f"(set data.allow_outside_root=true if the files really live there)")


def to_rgb(pil: Image.Image, what: str) -> Image.Image:
    """8-bit RGB of any PIL image; 16-bit grey is scaled (65535 -> 255), float or >16-bit values refused.

    ``what`` names the image in errors (``image 7: /path/x.png``).
    """
    if pil.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        values = np.asarray(pil)
        if pil.mode == "I" and values.size and (values.min() < 0 or values.max() > 65535):
            raise ValueError(f"{what} has 32-bit integer pixels outside 0..65535 (mode I, range "
                             f"{values.min()}..{values.max()}); convert it to 8 or 16 bits")
        scaled = (values.astype(np.uint32) * 255 + 32767) // 65535  # rounded, 0..65535 -> 0..255
        return Image.fromarray(scaled.astype(np.uint8), "L").convert("RGB")
    if pil.mode == "F":
        raise ValueError(f"{what} has 32-bit float pixels (mode F), which have no standard 8-bit scale; "
                         f"convert it to an 8-bit image")
    return pil.convert("RGB")


def exif_rotation_hint(pil: Image.Image, expected: tuple[int, int]) -> str:
    """A note when ``pil`` matches the (h, w) ``expected`` only after its EXIF rotation, else ''."""
    try:
        orientation = pil.getexif().get(_EXIF_ORIENTATION)
    except Exception:  # a broken EXIF block must not hide the size error itself
        return ""
    if orientation in _SWAPS_SIDES and (pil.width, pil.height) == expected:
        return (f" (its EXIF orientation {orientation} rotates it by 90 degrees; stepwise uses the stored pixel "
                f"order, as the COCO/LVIS tools do, so the annotation must too)")
    return ""


class LVISDetection(Dataset):
    """Detection dataset over an LVIS v1 / v0.5 / COCO-format annotation file.

    ``dataset[i] -> (image float (3, H, W) normalised, target)`` with target keys ``boxes`` (N, 4)
    normalised cxcywh, ``labels`` long (N,) contiguous, ``image_id`` int, ``ann_ids`` long (N,),
    ``orig_size`` long (2,) = file (h, w), ``size`` long (2,) = transformed (h, w).

    Args:
        ann_file: the JSON annotation file.
        image_root: folder the image paths are relative to.
        transforms: a pipeline from :func:`~stepwise.data.transforms.build_transforms`; ``None`` applies
            only the finishing steps (no resize/augmentation, normalisation and cxcywh boxes).
        categories: an existing :class:`CategoryMap` (e.g. the training set's, for a val set); by default
            it is built from this file.
        allow_outside_root: accept absolute and ``..`` image paths (see the module docstring).
    """

    def __init__(self, ann_file: str | Path, image_root: str | Path,
                 transforms: Callable | None = None, categories: CategoryMap | None = None,
                 allow_outside_root: bool = False) -> None:
        self.ann_file = Path(ann_file)
        self.image_root = Path(image_root)
        self.allow_outside_root = bool(allow_outside_root)
        self.transforms = transforms if transforms is not None else v2.Compose(finishing_transforms())
        self.index = AnnotationIndex.read(self.ann_file, "annotation file")
        file_categories = CategoryMap.from_index(self.index)
        if categories is None:
            categories = file_categories
        else:
            missing = [cid for cid in file_categories.ids if cid not in categories]
            if missing:
                raise ValueError(f"annotation file {self.ann_file}: {len(missing)} categories are not in the "
                                 f"given category map (e.g. ids {missing[:10]})")
        self.categories = categories
        self._load_images()
        self._load_annotations()

    def _load_images(self) -> None:
        """Image paths (checked to stay under the root) packed into one buffer; ids as a list for callers."""
        index = self.index
        paths = []
        for k in range(index.num_images):
            try:
                paths.append(str(image_path(index.image_entry(k), self.image_root, self.allow_outside_root)))
            except ValueError as err:
                raise ValueError(f"annotation file {self.ann_file}: {err}") from None
        self._paths = PackedStrings.from_list(paths)
        self.image_ids: list[int] = index.image_id.tolist()

    def _load_annotations(self) -> None:
        """The boxes used per image as arrays: ``_rows`` (M,) annotation rows of the index grouped by image,
        real boxes first then ignore boxes (file order within each), ``_labels`` (M,) their contiguous labels,
        ``_offsets`` (I + 1,) and ``_num_real`` (I,)."""
        index = self.index
        crowd = index.iscrowd == 1
        x, y, w, h = index.bbox.T
        degenerate = ~crowd & ((w <= 0) | (h <= 0))
        image = index.image_index
        outside = ~crowd & ~degenerate & index.has_size[image] & (
            (x >= index.width[image]) | (y >= index.height[image]) | (x + w <= 0) | (y + h <= 0))
        rows = np.flatnonzero(~crowd & ~degenerate & ~outside)
        ignored = index.ignore[rows] == 1  # a replay set's unselected box: neither object nor background
        order = np.lexsort((rows, ignored, image[rows]))
        self._rows = rows[order]
        self._labels = category_indices(self.categories, index.category_id[self._rows])
        self._offsets = np.zeros(len(self) + 1, dtype=np.int64)
        np.cumsum(np.bincount(image[rows], minlength=len(self)), out=self._offsets[1:])
        self._num_real = np.bincount(image[rows][~ignored], minlength=len(self))
        self.num_crowd_skipped = int(crowd.sum())
        self.num_degenerate_dropped = int(degenerate.sum())
        self.num_outside_dropped = int(outside.sum())
        self.num_ignored = int(ignored.sum())
        for dropped, reason in ((degenerate, "with width or height <= 0"),
                                (outside, "entirely outside their image")):
            if dropped.any():
                ids = index.ann_id[dropped][:6].tolist()
                warnings.warn(f"annotation file {self.ann_file}: dropped {int(dropped.sum())} boxes {reason} "
                              f"(annotation ids {ids[:5]}{' ...' if len(ids) > 5 else ''})", DataWarning,
                              stacklevel=3)
        if self.num_crowd_skipped:
            logger.info("annotation file %s: skipped %d crowd boxes (iscrowd=1)", self.ann_file,
                        self.num_crowd_skipped)
        empty = int((self._num_real == 0).sum())
        if empty:  # kept: DETR learns "no object" from them; RFS gives them factor 1
            logger.info("annotation file %s: %d of %d images have no boxes", self.ann_file, empty, len(self))

    def __len__(self) -> int:
        return self.index.num_images

    @property
    def num_boxes(self) -> int:
        """Boxes used as objects (after dropping degenerate, outside, crowd and ignore boxes)."""
        return int(self._num_real.sum())

    def expected_size(self, index: int) -> tuple[int, int] | None:
        """(height, width) the annotation file gives image ``index``, or None when it gives none."""
        if not self.index.has_size[index]:
            return None
        return int(self.index.height[index]), int(self.index.width[index])

    def image_classes(self, index: int) -> set[int]:
        """Contiguous labels present in image ``index`` (from the JSON; no image is decoded)."""
        start = self._offsets[index]
        return set(self._labels[start:start + self._num_real[index]].tolist())

    def class_table(self) -> ImageClasses:
        """:meth:`image_classes` of every image at once, as arrays (RFS, class statistics)."""
        image = np.repeat(np.arange(len(self)), np.diff(self._offsets))
        real = np.arange(len(self._rows)) - self._offsets[image] < self._num_real[image]  # ignore boxes last
        return ImageClasses.from_pairs(image[real], self._labels[real], len(self))

    def path(self, index: int) -> Path:
        """Image file of ``index``."""
        return Path(self._paths[index])

    def load_image(self, index: int) -> tv_tensors.Image:
        """The image as uint8 (3, H, W) RGB; errors name the image id and path."""
        image_id, path = int(self.index.image_id[index]), self.path(index)
        if not path.is_file():
            raise FileNotFoundError(f"image {image_id}: file {path} not found")
        expected = self.expected_size(index)
        hint = ""
        try:  # PIL: torchvision.io's decoders are deprecated from torchvision 0.29
            with Image.open(path) as pil:
                image = F.pil_to_tensor(to_rgb(pil, f"image {image_id}: {path}"))
                if expected is not None and tuple(image.shape[-2:]) != expected:
                    hint = exif_rotation_hint(pil, expected)
        except (UnidentifiedImageError, OSError, ValueError) as err:
            if str(err).startswith(f"image {image_id}: "):
                raise
            raise ValueError(f"image {image_id}: cannot decode {path}: {err}") from err
        if expected is not None and tuple(image.shape[-2:]) != expected:
            raise ValueError(f"image {image_id}: {path} is {image.shape[-2]}x{image.shape[-1]} (h x w) but the "
                             f"annotation file says {expected[0]}x{expected[1]}{hint}")
        return tv_tensors.Image(image)

    def raw_target(self, index: int, canvas_size: tuple[int, int]) -> dict[str, Any]:
        """Target before transforms: ``boxes`` BoundingBoxes XYXY absolute (N, 4), labels, ann_ids, ids.

        Built from the arrays alone (no Python object per annotation is kept or touched)."""
        start, stop = self._offsets[index], self._offsets[index + 1]
        rows = self._rows[start:stop]
        xywh = torch.from_numpy(self.index.bbox[rows].astype(np.float32))
        xyxy = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1)
        target = {
            "boxes": tv_tensors.BoundingBoxes(xyxy, format="XYXY", canvas_size=canvas_size),
            "labels": torch.from_numpy(self._labels[start:stop].copy()),
            "ann_ids": torch.from_numpy(self.index.ann_id[rows]),
            "image_id": int(self.index.image_id[index]),
            "orig_size": torch.tensor(canvas_size, dtype=torch.long),
        }
        if self.num_ignored:  # (N,) bool, True for "ignore" boxes (see stepwise.models.criterion)
            target["ignore"] = torch.from_numpy(np.arange(stop - start) >= self._num_real[index])
        return target

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        image = self.load_image(index)
        target = self.raw_target(index, tuple(image.shape[-2:]))
        return self.transforms(image, target)

