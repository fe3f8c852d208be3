"""What every training stage builds the same way: data (synthetic generated once), loaders
(:mod:`stepwise.data.loaders`), the detector and its criterion, the prediction/evaluation callables, and the
:class:`~stepwise.engine.Trainer` (:func:`make_trainer`).

Before any loader is built, :func:`preflight` checks what the stage will read (``data.preflight``): the
validation file as the evaluator will load it, and every train/val image (header, size; full decode for
small sets), so a bad file stops the stage at minute one instead of after training.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import broadcast_object_list
from torch import nn
from torch.utils.data import DataLoader
from torchvision.ops import box_convert

from stepwise.checkpoint import load_checkpoint, load_model_weights, resolve_checkpoint
from stepwise.data.loaders import build_dataset, build_eval_loader, build_train_loader
from stepwise.data.synthetic import ensure_synthetic
from stepwise.engine import ForwardFn, Trainer, TrainSettings, detection_forward
from stepwise.evaluation.detections import Detections
from stepwise.models import build_detector, final_class_head, freeze_batch_norm, param_groups, trainable_only
from stepwise.models.criterion import SetCriterion, build_criterion
from stepwise.models.postprocess import PostProcess


# ------------------------------------------------------------------------------------------------- data
def ensure_data(cfg: Any, accelerator: Accelerator) -> None:
    """Generate the built-in data (``data.name`` synthetic or emoji_lvis) on first use (main process; the
    others wait)."""
    if cfg.data.name in ("synthetic", "emoji_lvis"):
        if accelerator.is_main_process:
            ensure_builtin_data(cfg.data)
        accelerator.wait_for_everyone()


def ensure_builtin_data(data: Any) -> None:
    """Generate ``data`` (a data config) under ``data.root`` when it is a built-in data set not made yet."""
    negatives = data.get("negatives", "preset")  # configs saved before the key existed: the preset's
    if data.name == "synthetic":
        ensure_synthetic(data.root, data.preset, int(data.synthetic_seed), negatives=negatives)
    elif data.name == "emoji_lvis":
        if negatives != "preset":
            raise ValueError(f"data.negatives={negatives} is an option of data=synthetic; the emoji benchmark "
                             f"sets its own negatives (its preset's neg_per_image): leave data.negatives=preset")
        from stepwise.data.emoji_lvis import ensure_emoji

        ensure_emoji(data.root, data.preset, int(data.synthetic_seed))


def build_datasets(cfg: Any, train_ann: str | None = None, categories: Any = None) -> tuple[Any, Any]:
    """(train, val) ``LVISDetection``; ``train_ann`` overrides the training file; val shares train's
    category map, or both use ``categories`` when given (a replay set: the full training file's map)."""
    train = build_dataset(cfg.data, "train", ann_file=train_ann, categories=categories)
    val = build_dataset(cfg.data, "val", categories=train.categories)
    return train, val


def build_loaders(cfg: Any, train_ds: Any, val_ds: Any, repeat_factors: torch.Tensor | None = None,
                  epoch_length: int | None = None) -> tuple[DataLoader, DataLoader]:
    """Training loader (:func:`~stepwise.data.loaders.build_train_loader`: ``repeat_factors``
    (len(train_ds),) or generic RFS with ``data.rfs_threshold`` and ``data.rfs_epoch``, ``epoch_length``
    samples per epoch) and evaluation loader (``stage.eval_batch_size``; first ``stage.max_eval_images``
    images when set). First refuses an empty training set and (with ``data.preflight``) runs :func:`preflight`."""
    check_not_empty(train_ds)
    limit = cfg.stage.max_eval_images
    if cfg.data.preflight:
        preflight(cfg, train_ds, val_ds, val_indices=None if limit is None else range(min(int(limit), len(val_ds))))
    train = build_train_loader(train_ds, cfg.data, int(cfg.seed), repeat_factors, epoch_length)
    return train, build_eval_loader(val_ds, cfg.data, cfg.stage.eval_batch_size, limit)


class PreflightError(ValueError):
    """What the stage would read is broken; the message lists every problem found, naming files and images."""


def check_not_empty(train_ds: Any) -> None:
    """ValueError naming the file when a training set has no image or no usable box (nothing to learn)."""
    source = getattr(train_ds, "ann_file", "the training set")
    if len(train_ds) == 0:
        raise ValueError(f"training annotation file {source} has no images: nothing to train on")
    boxes = getattr(train_ds, "num_boxes", None)
    if boxes == 0:
        dropped = {name: getattr(train_ds, attr, 0) for name, attr in (
            ("crowd", "num_crowd_skipped"), ("width or height <= 0", "num_degenerate_dropped"),
            ("outside the image", "num_outside_dropped"), ("ignore", "num_ignored"))}
        why = ", ".join(f"{n} {name}" for name, n in dropped.items() if n)
        raise ValueError(f"training annotation file {source} has no usable boxes in its {len(train_ds)} images"
                         f"{f' (skipped: {why})' if why else ''}: nothing to train on")


def preflight(cfg: Any, train_ds: Any, val_ds: Any, val_indices: Any = None, decode: bool | None = None,
              workers: int | None = None) -> None:
    """Check, before training, what the stage will read; raise :class:`PreflightError` on every process.

    The main process checks (others wait): the validation file as the evaluator will load it (LVIS
    schema, ``frequency`` per category, federated lists; ``data.train_ann``, which gives the AP1..AP4
    counts, must exist) and
    every image of ``train_ds`` and ``val_ds`` (``val_indices``: only those) with
    :func:`stepwise.data.preflight.check_images`: headers, or a full decode when ``decode`` is True or
    (``decode=None``) the two sets hold at most ``data.preflight_decode_max`` images.
    """
    state = PartialState()
    message = None
    if state.is_main_process:
        message = preflight_report(cfg, train_ds, val_ds, val_indices, decode, workers)
        if message:
            message = f"preflight found problems before training (data.preflight=false skips these checks):\n{message}"
    if state.num_processes > 1:
        message = broadcast_object_list([message])[0]
    if message:
        raise PreflightError(message)


def preflight_report(cfg: Any, train_ds: Any, val_ds: Any, val_indices: Any = None, decode: bool | None = None,
                     workers: int | None = None, progress: bool = True) -> str | None:
    """The problems :func:`preflight` raises about, one ``- `` item each, or None when everything is fine."""
    from stepwise.data.preflight import check_images, format_problems
    from stepwise.evaluation.inputs import load_gt

    sections = []
    val_ann = cfg.data.val_ann
    try:
        load_gt(val_ann)
        train_ann = Path(cfg.data.train_ann)
        if not train_ann.is_file():
            raise FileNotFoundError(f"training annotation file {train_ann} (AP1..AP4 counts) not found")
        # not read again here (LVIS: 1 GB): the stage has parsed it already (dataset or category map)
    except (OSError, ValueError, KeyError, TypeError) as err:
        hint = ""
        categories = getattr(train_ds, "categories", None)
        if "frequency" in str(err) and categories is not None and categories.has_frequency:
            hint = (f" (the training file {getattr(train_ds, 'ann_file', cfg.data.train_ann)} gives every category "
                    f"a frequency; the validation file needs them too)")
        sections.append(f"validation annotation file {val_ann} cannot be evaluated: {err}{hint}")
    val_indices = range(len(val_ds)) if val_indices is None else val_indices
    total = len(train_ds) + len(val_indices)
    if decode is None:
        decode = total <= int(cfg.data.get("preflight_decode_max", 0) or 0)
    problems = []
    for name, dataset, indices in (("train", train_ds, None), ("val", val_ds, val_indices)):
        found = check_images(dataset, indices, decode=decode, workers=workers, progress=progress, desc=name)
        if found:
            problems.append(f"{len(found)} bad {name} image(s) ({dataset.ann_file}, image root {dataset.image_root}):\n"
                            f"{format_problems(found)}")
    sections.extend(problems)
    if not sections:
        print(f"stepwise: preflight: {total} images ({'decoded' if decode else 'headers'}) and {val_ann} are fine",
              flush=True)
        return None
    return "- " + "\n- ".join(sections)


# ------------------------------------------------------------------------------------------------ model
def build_model(cfg: Any, categories: Any, accelerator: Accelerator, init_from: str | None = None,
                reinit: Sequence[str] = ()) -> nn.Module:
    """The detector with ``init_from`` weights (default ``cfg.init_from``; report printed) and only the
    ``stage.trainable`` parameter prefixes trainable.

    ``reinit``: parameter-name prefixes *not* loaded (they keep their fresh initialisation, e.g. a class
    head re-trained from scratch); tensors whose shape differs from the checkpoint's are skipped anyway.
    When the backbone is entirely frozen its BatchNorm layers are frozen too (statistics included), so a
    frozen part of the model stays bitwise unchanged in training mode.
    """
    model = build_detector(cfg.model, cfg.head, categories)
    prefixes = cfg.stage.trainable
    if prefixes and not any(p.rstrip(".") == "backbone" or p.startswith("backbone.") for p in prefixes):
        freeze_batch_norm(model.backbone)
    source = init_from if init_from is not None else cfg.init_from
    if source:
        state = load_checkpoint(resolve_checkpoint(source))
        if reinit:
            skip = tuple(p.rstrip(".") for p in reinit)
            state["model"] = {k: v for k, v in state["model"].items()
                              if not any(k == p or k.startswith(p + ".") for p in skip)}
            state.pop("head_state", None)
            accelerator.print(f"stepwise: re-initialising {list(skip)} instead of loading them")
        state["__source__"] = str(resolve_checkpoint(source))
        accelerator.print(f"stepwise: init_from {load_model_weights(model, state)}")
    if prefixes:
        names = trainable_only(model, list(prefixes))
        accelerator.print(f"stepwise: training {len(names)} parameter tensors under {list(prefixes)}")
    return model


def detector_criterion(cfg: Any, model: nn.Module, accelerator: Accelerator) -> SetCriterion:
    """``SetCriterion`` for the detector (its final-layer head), ``num_boxes`` averaged over processes by
    Accelerate."""
    return build_criterion(cfg.loss, final_class_head(model), num_layers=int(cfg.model.dec_layers),
                           two_stage=bool(cfg.model.two_stage),
                           reduce_fn=lambda t: accelerator.reduce(t, reduction="mean"))


@dataclass
class StageParts:
    """What a training stage builds before its Trainer (every stage the same way, see the module doc)."""

    cfg: Any
    settings: TrainSettings
    accelerator: Accelerator
    categories: Any
    model: nn.Module
    train_loader: DataLoader
    val_loader: DataLoader


def make_trainer(parts: StageParts, criterion: Any = None, forward_fn: ForwardFn = detection_forward) -> Trainer:
    """The Trainer of every training stage: Deformable DETR's AdamW groups from ``cfg.stage``, evaluation by
    the LVIS metrics on ``data.val_ann`` (AP1..AP4 counts from ``data.train_ann``); ``criterion`` default
    :func:`detector_criterion`, ``forward_fn`` default the detector on an ``ImageBatch``."""
    cfg, model, accelerator = parts.cfg, parts.model, parts.accelerator
    return Trainer(
        accelerator, model, criterion if criterion is not None else detector_criterion(cfg, model, accelerator),
        parts.train_loader, parts.settings, Path(cfg.run_dir), param_groups=param_groups(model, cfg.stage),
        val_loader=parts.val_loader, predict_fn=detection_predictor(model, parts.categories),
        evaluate_fn=lvis_evaluator(cfg.data.val_ann, cfg.data.train_ann), forward_fn=forward_fn,
        categories=parts.categories, config=cfg)


# ------------------------------------------------------------------------------------------- evaluation
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


def detection_predictor(model: nn.Module, categories: Any, num_top: int = 300) -> Any:
    """``predict_fn(model, batch) -> [detection_columns(...) per image]``: per image arrays, not one dict
    per detection, so gathering LVIS-size predictions across processes stays compact."""
    post = PostProcess(num_top=num_top, head=final_class_head(model))
    category_ids = np.asarray(list(categories.ids), dtype=np.int64)

    def predict(model: nn.Module, batch: Any) -> list[dict[str, Any]]:
        outputs = model(batch.images, batch.masks)
        orig = torch.stack([t["orig_size"] for t in batch.targets]).to(batch.images.device)
        detections = post(outputs, orig)
        ids = [int(t["image_id"]) for t in batch.targets]
        return [detection_columns(d, i, category_ids) for d, i in zip(detections, ids)]

    return predict


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
