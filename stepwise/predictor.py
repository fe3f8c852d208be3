"""Detections of a trained detector: the Python API behind ``stepwise.evaluate``, ``stepwise.visualize`` and
the training-time evaluation, usable from a notebook::

    from stepwise.predictor import Predictor
    predictor = Predictor.from_checkpoint("runs/stepwise/pretrain")       # a run directory or a .pt file
    found = predictor(["a.jpg", "b.jpg"])                                 # or one image: path, PIL image
    found[0].names, found[0].scores, found[0].boxes                      # boxes: xyxy pixels of the file

An image goes through the checkpoint's eval transform; ``batch_size`` images at a time are padded into one
batch as the evaluation loader pads them (:func:`stepwise.data.loaders.collate_fn`), run through the network
and post-processed (top ``max_dets`` over queries x classes of the final-layer head's scores). The same
images in the same batches give the detections ``stepwise.evaluate`` writes to ``predictions.json``.

Also here, for the engine's evaluation (:func:`stepwise.engine.evaluate`): :meth:`Predictor.predict_batch`
(its ``predict_fn``: compact per-image arrays, :func:`detection_columns`) and :func:`lvis_evaluator` (its
``evaluate_fn``: results file, LVIS metrics, per-class table).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision import tv_tensors
from torchvision.ops import box_convert
from torchvision.transforms.v2 import functional as F

from stepwise.evaluation.detections import Detections
from stepwise.models import Detector


# ------------------------------------------------------------------------------------------- records
def detection_columns(det: dict[str, torch.Tensor], image_id: int, category_ids: np.ndarray) -> dict[str, Any]:
    """One image's ``PostProcess`` output as compact arrays for gathering and evaluation.

    ``det``: ``scores`` (K,), ``labels`` (K,) contiguous, ``boxes`` (K, 4) xyxy pixels. Returns
    ``{"image_id", "category_id": (K,) int64 dataset ids, "bbox": (K, 4) float32 xywh, "score": (K,) float32}``
    (float32 as the model computed them; the results file holds their exact float64 values).
    """
    labels = det["labels"].detach().cpu().numpy()
    if labels.size and (labels.min() < 0 or labels.max() >= len(category_ids)):
        bad = int(labels.max() if labels.max() >= len(category_ids) else labels.min())
        raise ValueError(f"image {image_id}: class index {bad} has no category id ({len(category_ids)} known)")
    return {"image_id": int(image_id), "category_id": category_ids[labels],
            "bbox": box_convert(det["boxes"].detach().float().cpu(), "xyxy", "xywh").numpy(),
            "score": det["scores"].detach().float().cpu().numpy()}


def records_to_detections(records: Sequence[dict[str, Any]]) -> Any:
    """``Detections`` of ``detection_columns`` records, in record order (the engine orders them by image id)."""
    if not records:
        return Detections.empty()
    counts = [len(r["score"]) for r in records]
    return Detections.from_columns(np.repeat([r["image_id"] for r in records], counts),
                                   np.concatenate([r["category_id"] for r in records]),
                                   np.concatenate([np.asarray(r["bbox"]).reshape(-1, 4) for r in records]),
                                   np.concatenate([r["score"] for r in records]))


def lvis_evaluator(val_ann: str | Path, train_ann: str | Path | None = None, max_dets: int = 300) -> Any:
    """``evaluate_fn(records, out_dir) -> metrics``: writes ``predictions.json`` (streaming, from arrays),
    ``metrics.json`` and ``per_class.csv`` into ``out_dir``. When only some val images were predicted
    (``max_eval_images``), the ground truth is restricted to them."""
    from stepwise.evaluation import evaluate_lvis
    from stepwise.evaluation.inputs import read_gt_file
    from stepwise.evaluation.results_file import write_results

    def evaluate(records: list[dict[str, Any]], out_dir: Path) -> dict[str, Any]:
        detections = records_to_detections(records)
        out_dir = Path(out_dir)
        write_results(out_dir / "predictions.json", detections)
        gt = read_gt_file(val_ann, "val annotation file")  # the val dataset's index: not read again
        seen = {record["image_id"] for record in records}
        if len(seen) < len(gt["images"]):
            gt["images"] = [im for im in gt["images"] if im["id"] in seen]
            gt["annotations"] = [a for a in gt["annotations"] if a["image_id"] in seen]
        report = evaluate_lvis(gt, detections, train_gt=train_ann, max_dets=max_dets)
        report.save(out_dir)
        print(report.table(), end="")
        return dict(report.metrics)

    return evaluate


# ------------------------------------------------------------------------------------------ predictor
@dataclass
class ImageDetections:
    """One image's detections, highest score first: ``scores`` (K,), ``labels`` (K,) contiguous class
    indices, ``boxes`` (K, 4) xyxy pixels of the image as given (CPU tensors), and per detection its
    dataset ``category_ids`` and class ``names``."""

    scores: torch.Tensor
    labels: torch.Tensor
    boxes: torch.Tensor
    category_ids: list[int]
    names: list[str]

    def __len__(self) -> int:
        return len(self.scores)


ImageLike = Any  # a path (str or Path), a PIL image, or a uint8 (3, H, W) RGB tensor


class Predictor:
    """checkpoint -> images -> detections with class names (see the module docstring).

    Args:
        detector: the network with its post-processing (``stepwise.models.Detector``).
        categories: its ``CategoryMap`` (contiguous index -> category id, name).
        cfg_data: the data config whose eval transform and batch padding the images get (None: only
            :meth:`predict_batch`, for batches the caller builds).
        max_dets: detections kept per image.
        batch_size: images per forward pass in :meth:`__call__`.
    """

    def __init__(self, detector: Detector, categories: Any, cfg_data: Any = None, max_dets: int = 300,
                 batch_size: int = 1) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.detector, self.categories, self.cfg_data = detector, categories, cfg_data
        self.max_dets, self.batch_size = max_dets, batch_size
        self.postprocess = detector.postprocess.with_num_top(max_dets)
        self.category_ids = np.asarray(list(categories.ids), dtype=np.int64)
        self._transform = self._collate = None

    @classmethod
    def from_trained(cls, trained: Any, max_dets: int = 300, batch_size: int = 1) -> "Predictor":
        """The predictor of a :class:`stepwise.trained.TrainedModel` (its data config's eval transform)."""
        return cls(trained.detector, trained.categories, trained.config.data, max_dets, batch_size)

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, overrides: Sequence[str] = (), device: str | None = None,
                        max_dets: int = 300, batch_size: int = 1) -> "Predictor":
        """Load ``checkpoint`` (a file or run directory; ``overrides`` change its saved config) onto ``device``
        (default CUDA when available) with :func:`stepwise.trained.load_trained_model`."""
        from stepwise.trained import load_trained_model

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return cls.from_trained(load_trained_model(checkpoint, overrides, device=device), max_dets, batch_size)

    def variant(self, model: nn.Module) -> "Predictor":
        """The same predictor around another network of the same classes (e.g. a tau-normalised copy)."""
        return Predictor(Detector.of(model, num_top=self.max_dets), self.categories, self.cfg_data,
                         self.max_dets, self.batch_size)

    @property
    def model(self) -> nn.Module:
        return self.detector.model

    def predict_batch(self, model: nn.Module, batch: Any) -> list[dict[str, Any]]:
        """``predict_fn(model, batch)`` of the engine's evaluation: ``model`` (this predictor's network, maybe
        prepared by Accelerate) on an ``ImageBatch``; :func:`detection_columns` per image."""
        outputs = model(batch.images, batch.masks)
        orig = torch.stack([t["orig_size"] for t in batch.targets]).to(batch.images.device)
        detections = self.postprocess(outputs, orig)
        ids = [int(t["image_id"]) for t in batch.targets]
        return [detection_columns(d, i, self.category_ids) for d, i in zip(detections, ids)]

    def __call__(self, images: ImageLike | Sequence[ImageLike]) -> ImageDetections | list[ImageDetections]:
        """Detections of one image (an :class:`ImageDetections`) or of a sequence of them (a list)."""
        single = isinstance(images, (str, Path, Image.Image, torch.Tensor))
        items = [images] if single else list(images)
        found: list[ImageDetections] = []
        for start in range(0, len(items), self.batch_size):
            found.extend(self._detect([self._prepare(item) for item in items[start:start + self.batch_size]]))
        return found[0] if single else found

    def _prepare(self, image: ImageLike) -> tuple[torch.Tensor, dict[str, Any]]:
        """(transformed image, target) as the evaluation's dataset gives them (no boxes)."""
        from stepwise.data.lvis_dataset import to_rgb
        from stepwise.data.transforms import build_transforms

        if self.cfg_data is None:
            raise ValueError("Predictor: images need a data config (eval transform); use from_checkpoint")
        if self._transform is None:
            self._transform = build_transforms(False, self.cfg_data)
        if isinstance(image, (str, Path)):
            with Image.open(image) as pil:
                pixels = F.pil_to_tensor(to_rgb(pil, f"image {image}"))
        elif isinstance(image, Image.Image):
            pixels = F.pil_to_tensor(to_rgb(image, "image"))
        else:
            pixels = image
        size = tuple(pixels.shape[-2:])
        empty = {"boxes": tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=size),
                 "labels": torch.zeros(0, dtype=torch.long), "ann_ids": torch.zeros(0, dtype=torch.long)}
        tensor, target = self._transform(tv_tensors.Image(pixels), empty)
        return tensor, {**target, "orig_size": torch.tensor(size), "image_id": 0}

    @torch.no_grad()
    def _detect(self, prepared: list[tuple[torch.Tensor, dict[str, Any]]]) -> list[ImageDetections]:
        from stepwise.data.loaders import collate_fn

        if self._collate is None:
            self._collate = collate_fn(self.cfg_data)
        device = next(self.model.parameters()).device
        batch = self._collate(prepared).to(device)
        outputs = self.model(batch.images, batch.masks)
        orig = torch.stack([t["orig_size"] for t in batch.targets]).to(device)
        found = []
        for det in self.postprocess(outputs, orig):
            labels = det["labels"].cpu()
            found.append(ImageDetections(det["scores"].cpu(), labels, det["boxes"].cpu(),
                                         [int(self.category_ids[k]) for k in labels.tolist()],
                                         [self.categories.names[k] for k in labels.tolist()]))
        return found
