"""What every training stage builds the same way: data (synthetic generated once), deterministic loaders,
the detector and its criterion, and the prediction/evaluation callables the engine runs.

Before any loader is built, :func:`preflight` checks what the stage will read (``data.preflight``): the
validation file as the evaluator will load it, and every train/val image (header, size; full decode for
small sets), so a bad file stops the stage at minute one instead of after training.

Loaders here are built for exact resume: :class:`SeededDataset` gives sample ``i`` of epoch ``e`` its own
RNG seed (so augmentations do not depend on worker assignment, skipped batches or prefetching), the
sampler is ``RepeatFactorSampler`` (deterministic per ``(seed, epoch)``; all factors 1 without RFS), and
workers are not persistent so ``set_epoch`` reaches them.
"""

from __future__ import annotations

import random
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, Dataset


class SeededDataset(Dataset):
    """Wraps a dataset so item ``i`` is produced under RNG seeds derived from ``(seed, epoch, i)``.

    The global torch/numpy/python RNG states are restored afterwards, so data loading in the main process
    (``num_workers=0``) never shifts the training RNG (dropout) either. Other attributes (``categories``,
    ``image_ids``, ``image_classes``) are forwarded to the wrapped dataset.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        seed = int(np.random.SeedSequence([self.seed, self.epoch, int(index)]).generate_state(1)[0])
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed)
            try:
                return self.dataset[index]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)

    def __getattr__(self, name: str) -> Any:
        if name == "dataset" or name.startswith("__"):  # unpickling in workers looks these up first
            raise AttributeError(name)
        return getattr(self.dataset, name)


def collate_fn(cfg_data: Any) -> Any:
    """The data group's ``collate`` with its ``size_divisibility``."""
    from stepwise.data import collate
    return partial(collate, size_divisibility=int(cfg_data.get("size_divisibility", 1) or 1))


def train_loader(dataset: Dataset, batch_size: int, seed: int, collate: Any = None, num_workers: int = 0,
                 repeat_factors: torch.Tensor | None = None, epoch_length: int | None = None) -> DataLoader:
    """A shuffled training loader that an interrupted-and-resumed run replays exactly.

    Args:
        dataset: any map-style dataset (wrapped in :class:`SeededDataset`).
        batch_size: per process.
        seed: the run's seed (sampler order and per-sample seeds).
        repeat_factors: (len(dataset),) RFS factors; None = each item once per epoch.
        epoch_length: samples per epoch taken from the shuffled repeated list (None: all of it).
    """
    from stepwise.data.samplers import RepeatFactorSampler

    factors = torch.ones(len(dataset), dtype=torch.float64) if repeat_factors is None else repeat_factors
    return DataLoader(SeededDataset(dataset, seed), batch_size=batch_size,
                      sampler=RepeatFactorSampler(factors, seed=seed, shuffle=True, epoch_length=epoch_length),
                      collate_fn=collate,
                      num_workers=num_workers, persistent_workers=False, drop_last=False,
                      generator=torch.Generator().manual_seed(seed))


def eval_loader(dataset: Dataset, batch_size: int, collate: Any = None, num_workers: int = 0) -> DataLoader:
    """Sequential loader; the engine deals its batches out to the processes (``engine.shard_eval_loader``)."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate, num_workers=num_workers,
                      drop_last=False, generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------------------------- data
def ensure_data(cfg: Any, accelerator: Accelerator) -> None:
    """Generate the built-in synthetic data on first use (main process; the others wait)."""
    if cfg.data.name == "synthetic":
        if accelerator.is_main_process:
            from stepwise.data.synthetic import ensure_synthetic
            ensure_synthetic(cfg.data.root, cfg.data.preset, int(cfg.data.synthetic_seed))
        accelerator.wait_for_everyone()


def build_datasets(cfg: Any, train_ann: str | None = None) -> tuple[Any, Any]:
    """(train, val) ``LVISDetection``; val shares train's category map. ``train_ann`` overrides the file."""
    from stepwise.data import build_dataset

    train = build_dataset(cfg.data, "train", ann_file=train_ann)
    val = build_dataset(cfg.data, "val", categories=train.categories)
    return train, val


def build_loaders(cfg: Any, train_ds: Any, val_ds: Any, repeat_factors: torch.Tensor | None = None,
                  epoch_length: int | None = None) -> tuple[DataLoader, DataLoader]:
    """Training loader and evaluation loader (``stage.eval_batch_size``; first ``stage.max_eval_images``
    images when set). First refuses an empty training set and (with ``data.preflight``) runs :func:`preflight`.

    ``repeat_factors`` (len(train_ds),): the sampler's per-image factors (a replay stage's step-wise RFS);
    None: generic RFS with ``data.rfs_threshold`` (every image once per epoch when that is null), an epoch
    of ``len(train_ds)`` samples with ``data.rfs_epoch=dataset`` (the whole repeated list with ``repeated``).
    ``epoch_length``: samples per epoch drawn from the shuffled repeated list (None: all of it).
    """
    from stepwise.data import repeat_factors_from_dataset

    check_not_empty(train_ds)
    limit = cfg.stage.get("max_eval_images")
    if cfg.data.get("preflight", True):
        preflight(cfg, train_ds, val_ds, val_indices=None if limit is None else range(min(int(limit), len(val_ds))))
    threshold = cfg.data.get("rfs_threshold")
    if repeat_factors is None and threshold is not None:
        repeat_factors = repeat_factors_from_dataset(train_ds, float(threshold))
        if cfg.data.rfs_epoch == "dataset":  # RFS changes the mix of an epoch, not its number of steps
            epoch_length = len(train_ds)
    workers = int(cfg.data.get("num_workers", 0) or 0)
    collate = collate_fn(cfg.data)
    train = train_loader(train_ds, int(cfg.data.batch_size), int(cfg.seed), collate, workers, repeat_factors,
                         epoch_length)
    if limit is not None:
        val_ds = torch.utils.data.Subset(val_ds, range(min(int(limit), len(val_ds))))
    eval_bs = cfg.stage.get("eval_batch_size") or cfg.data.batch_size
    return train, eval_loader(val_ds, int(eval_bs), collate, workers)


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
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

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
    from stepwise.checkpoint import load_checkpoint, load_model_weights, resolve_checkpoint
    from stepwise.models import build_detector, trainable_only
    from stepwise.models.backbone import freeze_batch_norm

    model = build_detector(cfg.model, cfg.head, categories)
    prefixes = cfg.stage.get("trainable")
    if prefixes and not any(p.rstrip(".") == "backbone" or p.startswith("backbone.") for p in prefixes):
        freeze_batch_norm(model.backbone)
    source = init_from if init_from is not None else cfg.get("init_from")
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


def model_head(model: nn.Module) -> nn.Module:
    """The classifier head of the final decoder layer (``class_embed[num_decoder_layers - 1]``)."""
    model = getattr(model, "module", model)
    return model.class_embed[model.transformer.decoder.num_layers - 1]


def build_criterion(cfg: Any, model: nn.Module, accelerator: Accelerator) -> nn.Module:
    """``SetCriterion`` for the detector, with ``num_boxes`` averaged over processes by Accelerate."""
    from stepwise.models.criterion import build_criterion as build

    return build(cfg.loss, model_head(model), num_layers=int(cfg.model.dec_layers),
                 two_stage=bool(cfg.model.two_stage),
                 reduce_fn=lambda t: accelerator.reduce(t, reduction="mean"))


def optimizer_groups(cfg: Any, model: nn.Module) -> list[dict]:
    """Deformable DETR's AdamW groups from ``cfg.stage`` (lr, lr_backbone, lr_linear_proj_mult, weight_decay)."""
    from stepwise.models import param_groups
    return param_groups(model, cfg.stage)


# ------------------------------------------------------------------------------------------- evaluation
def detection_columns(det: dict[str, torch.Tensor], image_id: int, category_ids: np.ndarray) -> dict[str, Any]:
    """One image's ``PostProcess`` output as compact arrays for gathering and evaluation.

    ``det``: ``scores`` (K,), ``labels`` (K,) contiguous, ``boxes`` (K, 4) xyxy pixels. Returns
    ``{"image_id", "category_id": (K,) int64 dataset ids, "bbox": (K, 4) float32 xywh, "score": (K,) float32}``
    (float32 as the model computed them; the results file holds their exact float64 values).
    """
    from torchvision.ops import box_convert

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
    from stepwise.models.postprocess import PostProcess

    post = PostProcess(num_top=num_top, head=model_head(model))
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
    from stepwise.evaluation.detections import Detections

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
