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
import math
import re
import warnings
from collections import defaultdict
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

from stepwise.data.categories import CategoryMap
from stepwise.data.transforms import finishing_transforms
from stepwise.utils.io import read_json

logger = logging.getLogger(__name__)

_COCO2014_NAME = re.compile(r"^COCO_(?:train|val|test)2014_(\d{12}\.\w+)$")


class DataWarning(UserWarning):
    """Input data problems that were handled (e.g. degenerate boxes dropped) but must not go unnoticed."""


def _is_number(value: Any) -> bool:
    """An int or float from JSON (not a bool, not a string)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


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
        data = read_json(self.ann_file, "annotation file")
        for key in ("images", "annotations", "categories"):
            if not isinstance(data, dict) or not isinstance(data.get(key), list):
                raise ValueError(f"annotation file {self.ann_file}: missing or non-list key {key!r}")
        file_categories = CategoryMap.from_annotations(data, source=f"annotation file {self.ann_file}")
        if categories is None:
            categories = file_categories
        else:
            missing = [cid for cid in file_categories.ids if cid not in categories]
            if missing:
                raise ValueError(f"annotation file {self.ann_file}: {len(missing)} categories are not in the "
                                 f"given category map (e.g. ids {missing[:10]})")
        self.categories = categories
        self._load_images(data["images"])
        self._load_annotations(data["annotations"], set(file_categories.ids))

    def _load_images(self, images: list[dict]) -> None:
        self.image_ids: list[int] = []
        self._paths: list[Path] = []
        self._sizes: list[tuple[int, int] | None] = []
        for k, img in enumerate(images):
            if not isinstance(img, dict):
                raise ValueError(f"annotation file {self.ann_file}: image entry #{k} is not an object: {img!r:.80}")
            if "id" not in img:
                raise ValueError(f"annotation file {self.ann_file}: image entry #{k} has no 'id'")
            if isinstance(img["id"], bool) or not isinstance(img["id"], int):
                raise ValueError(f"annotation file {self.ann_file}: image entry #{k} has a non-integer id "
                                 f"{img['id']!r}")
            self.image_ids.append(img["id"])
            try:
                self._paths.append(image_path(img, self.image_root, self.allow_outside_root))
            except ValueError as err:
                raise ValueError(f"annotation file {self.ann_file}: {err}") from None
            has_size = "height" in img and "width" in img
            try:
                self._sizes.append((int(img["height"]), int(img["width"])) if has_size else None)
            except (TypeError, ValueError):
                raise ValueError(f"annotation file {self.ann_file}: image {img['id']} has a non-integer height "
                                 f"or width ({img['height']!r}, {img['width']!r})") from None
        self._index_of = {iid: k for k, iid in enumerate(self.image_ids)}
        if len(self._index_of) != len(self.image_ids):
            dup = next(iid for iid in self.image_ids if self.image_ids.count(iid) > 1)
            raise ValueError(f"annotation file {self.ann_file}: image id {dup} appears more than once")

    def _load_annotations(self, annotations: list[dict], file_category_ids: set[int]) -> None:
        per_image: dict[int, list[tuple[int, int, list[float]]]] = defaultdict(list)
        degenerate: list[int] = []
        outside: list[int] = []
        self.num_crowd_skipped = 0
        self._ignored: dict[int, list[tuple[int, int, list[float]]]] = defaultdict(list)
        for k, ann in enumerate(annotations):
            ann_id = ann.get("id", f"#{k}") if isinstance(ann, dict) else f"#{k}"
            where = f"annotation file {self.ann_file}: annotation {ann_id}"
            if not isinstance(ann, dict) or any(key not in ann for key in ("id", "image_id", "category_id", "bbox")):
                raise ValueError(f"{where} lacks one of 'id', 'image_id', 'category_id', 'bbox'")
            if ann["image_id"] not in self._index_of:
                raise ValueError(f"{where} refers to image_id {ann['image_id']}, which does not exist")
            if ann["category_id"] not in file_category_ids:
                raise ValueError(f"{where} refers to category_id {ann['category_id']}, which does not exist")
            bbox = ann["bbox"]
            if (not isinstance(bbox, (list, tuple)) or len(bbox) != 4
                    or not all(_is_number(v) and math.isfinite(v) for v in bbox)):
                raise ValueError(f"{where} has an invalid bbox {bbox!r} (expected 4 finite numbers x, y, w, h)")
            if ann.get("iscrowd", 0):
                self.num_crowd_skipped += 1
                continue
            if bbox[2] <= 0 or bbox[3] <= 0:
                degenerate.append(ann["id"])
                continue
            size = self._sizes[self._index_of[ann["image_id"]]]
            if size is not None and (bbox[0] >= size[1] or bbox[1] >= size[0] or bbox[0] + bbox[2] <= 0
                                     or bbox[1] + bbox[3] <= 0):
                outside.append(ann["id"])
                continue
            entry = (int(ann["id"]), self.categories.index(ann["category_id"]), [float(v) for v in bbox])
            if ann.get("ignore", 0):  # a replay set's unselected box: neither object nor background
                self._ignored[ann["image_id"]].append(entry)
            else:
                per_image[ann["image_id"]].append(entry)
        self.num_degenerate_dropped = len(degenerate)
        self.num_outside_dropped = len(outside)
        for dropped, reason in ((degenerate, "with width or height <= 0"),
                                (outside, "entirely outside their image")):
            if dropped:
                warnings.warn(f"annotation file {self.ann_file}: dropped {len(dropped)} boxes {reason} (annotation "
                              f"ids {dropped[:5]}{' ...' if len(dropped) > 5 else ''})", DataWarning, stacklevel=3)
        if self.num_crowd_skipped:
            logger.info("annotation file %s: skipped %d crowd boxes (iscrowd=1)", self.ann_file,
                        self.num_crowd_skipped)
        self._anns = [per_image.get(iid, []) for iid in self.image_ids]
        self._ignore_anns = [self._ignored.get(iid, []) for iid in self.image_ids]
        self.num_ignored = sum(len(v) for v in self._ignored.values())
        del self._ignored
        empty = sum(1 for anns in self._anns if not anns)
        if empty:  # kept: DETR learns "no object" from them; RFS gives them factor 1
            logger.info("annotation file %s: %d of %d images have no boxes", self.ann_file, empty, len(self))

    def __len__(self) -> int:
        return len(self.image_ids)

    @property
    def num_boxes(self) -> int:
        """Boxes used as objects (after dropping degenerate, outside, crowd and ignore boxes)."""
        return sum(len(anns) for anns in self._anns)

    def expected_size(self, index: int) -> tuple[int, int] | None:
        """(height, width) the annotation file gives image ``index``, or None when it gives none."""
        return self._sizes[index]

    def image_classes(self, index: int) -> set[int]:
        """Contiguous labels present in image ``index`` (from the JSON; no image is decoded)."""
        return {label for _, label, _ in self._anns[index]}

    def path(self, index: int) -> Path:
        """Image file of ``index``."""
        return self._paths[index]

    def load_image(self, index: int) -> tv_tensors.Image:
        """The image as uint8 (3, H, W) RGB; errors name the image id and path."""
        image_id, path = self.image_ids[index], self._paths[index]
        if not path.is_file():
            raise FileNotFoundError(f"image {image_id}: file {path} not found")
        expected = self._sizes[index]
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
        """Target before transforms: ``boxes`` BoundingBoxes XYXY absolute (N, 4), labels, ann_ids, ids."""
        anns, ignored = self._anns[index], self._ignore_anns[index]
        xywh = torch.tensor([b for _, _, b in anns + ignored], dtype=torch.float32).reshape(-1, 4)
        xyxy = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1)
        target = {
            "boxes": tv_tensors.BoundingBoxes(xyxy, format="XYXY", canvas_size=canvas_size),
            "labels": torch.tensor([label for _, label, _ in anns + ignored], dtype=torch.long),
            "ann_ids": torch.tensor([a for a, _, _ in anns + ignored], dtype=torch.long),
            "image_id": self.image_ids[index],
            "orig_size": torch.tensor(canvas_size, dtype=torch.long),
        }
        if self.num_ignored:  # (N,) bool, True for "ignore" boxes (see stepwise.models.criterion)
            target["ignore"] = torch.tensor([False] * len(anns) + [True] * len(ignored))
        return target

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        image = self.load_image(index)
        target = self.raw_target(index, tuple(image.shape[-2:]))
        return self.transforms(image, target)

