"""Detection transforms on torchvision.transforms.v2 with ``tv_tensors.BoundingBoxes``.

A pipeline is called as ``image, target = transforms(image, target)`` where ``image`` is a
``tv_tensors.Image`` (uint8, 3 x H x W) and ``target["boxes"]`` a ``BoundingBoxes`` in absolute XYXY
pixels; ``target["labels"]``/``["ann_ids"]`` are long (N,). The output image is float (3, H', W')
normalised with ImageNet mean/std and ``target["boxes"]`` plain float (N, 4) normalised cxcywh in [0, 1]
of the transformed size, which is stored as ``target["size"]`` = (H', W').

Train (DETR): horizontal flip, then either a multi-scale resize of the short side, or resize ->
random-size crop -> multi-scale resize; boxes that vanish in the crop are removed with their labels and
annotation ids. Eval: resize the short side to ``eval_scale`` with the long side at most ``max_size``.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# DETR / Deformable DETR defaults (used when a config omits a key).
DEFAULTS: dict[str, Any] = {
    "train_scales": list(range(480, 801, 32)),
    "max_size": 1333,
    "crop_resize_scales": [400, 500, 600],
    "crop_min": 384,
    "crop_max": 600,
    "eval_scale": 800,
}


class RandomSizeCrop(v2.Transform):
    """DETR's crop: a window of random width in [min_size, min(W, max_size)] and height in
    [min_size, min(H, max_size)] at a random position (clamped to the image when it is smaller)."""

    def __init__(self, min_size: int, max_size: int) -> None:
        super().__init__()
        if not 0 < min_size <= max_size:
            raise ValueError(f"RandomSizeCrop: need 0 < min_size <= max_size, got {min_size}, {max_size}")
        self.min_size, self.max_size = int(min_size), int(max_size)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)

        def draw(limit: int) -> int:
            hi = min(limit, self.max_size)
            lo = min(self.min_size, hi)
            return int(torch.randint(lo, hi + 1, ()).item())

        w, h = draw(width), draw(height)
        top = int(torch.randint(0, height - h + 1, ()).item())
        left = int(torch.randint(0, width - w + 1, ()).item())
        return {"top": top, "left": left, "height": h, "width": w}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return F.crop(inpt, **params)


def _labels_and_ann_ids(inputs: Any) -> tuple[torch.Tensor, ...]:
    """``labels_getter`` for SanitizeBoundingBoxes: keep labels, ann_ids (and ``ignore`` flags when
    present) aligned with the boxes."""
    target = inputs[1]
    if "ignore" in target:
        return target["labels"], target["ann_ids"], target["ignore"]
    return target["labels"], target["ann_ids"]


def sanitize_boxes() -> v2.Transform:
    """Remove boxes smaller than 1 px (e.g. outside a crop) together with their labels and ann_ids."""
    return v2.SanitizeBoundingBoxes(labels_getter=_labels_and_ann_ids)


class ToNormalizedCxcywh:
    """Final step: plain tensors, boxes as normalised cxcywh (N, 4) clamped to [0, 1], ``size`` = (H, W)."""

    def __call__(self, image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
        height, width = image.shape[-2:]
        boxes = target["boxes"]
        xyxy = boxes.as_subclass(torch.Tensor).to(torch.float32).reshape(-1, 4)
        if isinstance(boxes, tv_tensors.BoundingBoxes) and boxes.format != tv_tensors.BoundingBoxFormat.XYXY:
            xyxy = F.convert_bounding_box_format(xyxy, old_format=boxes.format,
                                                 new_format=tv_tensors.BoundingBoxFormat.XYXY)
        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        xyxy = (xyxy / scale).clamp(0.0, 1.0)
        cxcywh = torch.stack([(xyxy[:, 0] + xyxy[:, 2]) / 2, (xyxy[:, 1] + xyxy[:, 3]) / 2,
                              xyxy[:, 2] - xyxy[:, 0], xyxy[:, 3] - xyxy[:, 1]], dim=-1)
        target = dict(target, boxes=cxcywh, size=torch.tensor([height, width], dtype=torch.long))
        return image.as_subclass(torch.Tensor), target


def finishing_transforms() -> list:
    """Clamp boxes, uint8 -> float in [0, 1], ImageNet normalisation, normalised cxcywh boxes."""
    return [v2.ClampBoundingBoxes(), v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD), ToNormalizedCxcywh()]


def _get(cfg_data: Mapping[str, Any] | Any, key: str) -> Any:
    """``cfg_data[key]`` (dict or DictConfig), or DETR's default when missing or null."""
    value = cfg_data.get(key, None) if cfg_data is not None else None
    return DEFAULTS[key] if value is None else value


def _scales(value: Any, key: str) -> list[int]:
    scales = [int(value)] if isinstance(value, (int, float)) else [int(v) for v in value]
    if not scales or any(s <= 0 for s in scales):
        raise ValueError(f"data.{key} must be a non-empty list of positive sizes, got {value!r}")
    return scales


def build_transforms(train: bool, cfg_data: Mapping[str, Any] | Any = None) -> v2.Compose:
    """The train or eval pipeline; sizes from ``cfg_data`` (``data.*`` config) keys ``train_scales``,
    ``max_size``, ``crop_resize_scales``, ``crop_min``, ``crop_max``, ``eval_scale`` (DETR defaults when absent).

    Call as ``image, target = pipeline(tv_tensors.Image uint8 (3,H,W), target)`` (see module docstring).
    """
    max_size = int(_get(cfg_data, "max_size"))
    if not train:
        eval_scale = int(_get(cfg_data, "eval_scale"))
        if eval_scale >= max_size:
            raise ValueError(f"data.eval_scale ({eval_scale}) must be smaller than data.max_size ({max_size})")
        return v2.Compose([v2.Resize(eval_scale, max_size=max_size), *finishing_transforms()])

    scales = _scales(_get(cfg_data, "train_scales"), "train_scales")
    crop_scales = _scales(_get(cfg_data, "crop_resize_scales"), "crop_resize_scales")
    crop_min, crop_max = int(_get(cfg_data, "crop_min")), int(_get(cfg_data, "crop_max"))
    resize = v2.RandomShortestSize(min_size=scales, max_size=max_size)
    resize_crop_resize = v2.Compose([
        v2.RandomShortestSize(min_size=crop_scales),
        RandomSizeCrop(crop_min, crop_max),
        v2.RandomShortestSize(min_size=scales, max_size=max_size),
    ])
    return v2.Compose([
        v2.RandomHorizontalFlip(p=0.5),
        v2.RandomChoice([resize, resize_crop_resize]),
        v2.ClampBoundingBoxes(),
        sanitize_boxes(),
        *finishing_transforms(),
    ])
