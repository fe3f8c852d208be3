"""Batching images of different sizes: zero padding at the bottom/right plus a padding mask."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch


@dataclass
class ImageBatch:
    """A padded batch.

    Attributes:
        images: float (B, 3, Hmax, Wmax), each image at the top-left, zeros elsewhere.
        masks: bool (B, Hmax, Wmax), True on padding.
        targets: one target dict per image (boxes normalised to the unpadded image size).
    """

    images: torch.Tensor
    masks: torch.Tensor
    targets: list[dict[str, Any]]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "ImageBatch":
        """A copy with every tensor (images, masks, target tensors) on ``device``."""
        def move(value: Any) -> Any:
            return value.to(device, non_blocking=non_blocking) if isinstance(value, torch.Tensor) else value

        return ImageBatch(images=move(self.images), masks=move(self.masks),
                          targets=[{k: move(v) for k, v in t.items()} for t in self.targets])

    def pin_memory(self) -> "ImageBatch":
        """Page-locked copy (used by ``DataLoader(pin_memory=True)``)."""
        def pin(value: Any) -> Any:
            return value.pin_memory() if isinstance(value, torch.Tensor) else value

        return ImageBatch(images=pin(self.images), masks=pin(self.masks),
                          targets=[{k: pin(v) for k, v in t.items()} for t in self.targets])

    def __len__(self) -> int:
        return self.images.shape[0]


def collate(batch: Sequence[tuple[torch.Tensor, dict]], size_divisibility: int = 1) -> ImageBatch:
    """Stack ``[(image (3, H_i, W_i), target), ...]`` into an :class:`ImageBatch`.

    ``Hmax``/``Wmax`` are the largest height/width in the batch, rounded up to a multiple of
    ``size_divisibility``.
    """
    if len(batch) == 0:
        raise ValueError("collate: empty batch")
    if size_divisibility < 1:
        raise ValueError(f"collate: size_divisibility must be >= 1, got {size_divisibility}")
    images = [image for image, _ in batch]
    for image, target in batch:
        if image.dim() != 3:
            raise ValueError(f"collate: image {target.get('image_id')} has shape {tuple(image.shape)}, "
                             f"expected (C, H, W)")
    channels = images[0].shape[0]
    h_max = max(image.shape[1] for image in images)
    w_max = max(image.shape[2] for image in images)
    h_max = -(-h_max // size_divisibility) * size_divisibility
    w_max = -(-w_max // size_divisibility) * size_divisibility
    padded = images[0].new_zeros((len(images), channels, h_max, w_max))
    masks = torch.ones((len(images), h_max, w_max), dtype=torch.bool)
    for k, image in enumerate(images):
        _, h, w = image.shape
        padded[k, :, :h, :w] = image
        masks[k, :h, :w] = False
    return ImageBatch(images=padded, masks=masks, targets=[target for _, target in batch])
