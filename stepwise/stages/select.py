"""Step 1, ``stage=select`` (also ``python -m stepwise.select_exemplars``): score every ground-truth
instance of the training set with the pretrained model and build the smooth-tail replay sets.

Writes into ``runs/<exp>/select/``:

* ``scores.jsonl`` — one line per instance, sorted by annotation id: ``ann_id``, ``image_id``,
  ``category_id``, ``label`` (contiguous), ``score`` (the class probability, from ``head.scores``, of the
  prediction the training matcher assigns to the instance), ``iou`` (of that prediction's box),
  ``max_score`` (that prediction's largest class probability; ``stepwise.score=max`` selects by it, as the
  public code does).
* ``d_head.json`` / ``d_tail.json`` — LVIS-format training files holding only the selected annotations
  (see :mod:`stepwise.data.smooth_tail` for the rule; division and quotas from the root ``stepwise:``
  config block), ``summary.json`` — per-class counts.

Scoring streams: each process writes its records to ``scores.part<rank>.jsonl`` as it goes (memory does not
grow with the number of images; the part appears under its name, complete, only when its process has scored
its share, like every file of the run directory); evaluation batches are fixed before they are dealt to the processes, so
the scores — and hence the files — are the same with one process or many. An existing ``scores.jsonl`` is
reused (delete it to re-score); the selection itself is cheap and always re-run.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from torchvision.ops import box_convert, box_iou

from stepwise.data.annotation_index import AnnotationIndex
from stepwise.data.categories import CategoryMap
from stepwise.data.loaders import build_dataset, build_eval_loader
from stepwise.data.smooth_tail import ScoreTable, head_classes, select_replay_sets, write_replay_set_file
from stepwise.engine import shard_predictions
from stepwise.models import Detector
from stepwise.models.matcher import build_matcher
from stepwise.stage_settings import DivisionSettings, SelectSettings
from stepwise.stages.parts.data import ensure_data
from stepwise.trained import load_trained_model
from stepwise.utils.io import atomic_path, atomic_write_json

SCORES_NAME = "scores.jsonl"
OUTPUTS = ("d_head.json", "d_tail.json")  # the step is done when both replay sets exist


@torch.no_grad()
def score_batch(model: torch.nn.Module, detector: Detector, matcher: Any, batch: Any,
                category_ids: tuple[int, ...]) -> list[dict]:
    """Score records of one ``ImageBatch``: the final layer's matched prediction for every target box.
    ``model``: ``detector``'s network (maybe prepared by Accelerate), whose class probabilities
    ``detector.scores`` gives."""
    outputs = model(batch.images, batch.masks)
    scores = detector.scores(outputs)  # (B, Q, C)
    boxes = outputs.boxes[-1].float()
    matches = matcher(scores, boxes, batch.targets)
    records = []
    for b, ((q, j), target) in enumerate(zip(matches, batch.targets)):
        q, j = q.to(scores.device), j.to(scores.device)
        labels = target["labels"][j]
        pred = box_convert(boxes[b, q], "cxcywh", "xyxy")
        gt = box_convert(target["boxes"][j].float(), "cxcywh", "xyxy")
        ious = box_iou(pred, gt).diagonal() if len(j) else torch.zeros(0)
        values, best = scores[b, q, labels], scores[b, q].amax(-1)
        for ann, label, value, top, iou in zip(target["ann_ids"][j].tolist(), labels.tolist(), values.tolist(),
                                               best.tolist(), ious.tolist()):
            records.append({"ann_id": int(ann), "image_id": int(target["image_id"]),
                            "category_id": int(category_ids[label]), "label": int(label),
                            "score": round(float(value), 6), "iou": round(float(iou), 6),
                            "max_score": round(float(top), 6)})
    return records


def limit_heap_fragmentation() -> None:
    """Serve large allocations with mmap and trim freed heap memory (glibc only; a no-op elsewhere).

    Scoring allocates activation buffers of a different size for every padded batch; glibc keeps the freed
    ones fragmented on the heap, so the resident size crept up with the number of batches (1.10 -> 1.73 GiB
    over 100 batches of the large preset) although nothing is retained. With these two settings it stays
    flat (1.07 -> 1.10 GiB): the same effect as ``MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0``.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "mallopt"):
            libc.mallopt(-3, 65536)  # M_MMAP_THRESHOLD
            libc.mallopt(-1, 0)      # M_TRIM_THRESHOLD
    except OSError:
        pass


def score_dataset(cfg: Any, accelerator: Accelerator, out_path: Path) -> int:
    """Write ``scores.jsonl`` for the training set of ``cfg.data`` with the model, batch size and image limit
    of the stage's :class:`~stepwise.stage_settings.SelectSettings` (root ``checkpoint=`` else
    ``stage.checkpoint``; ``stage.batch_size`` a batch; first ``stage.max_images`` images when set); returns
    the number of images scored."""
    settings = SelectSettings.from_config(cfg)
    limit_heap_fragmentation()
    trained = load_trained_model(settings.source(), device=accelerator.device)
    dataset = build_dataset(cfg.data, "train", train_transforms=False, categories=trained.categories)
    loader = build_eval_loader(dataset, cfg.data, settings.batch_size, settings.max_images)
    matcher = build_matcher(cfg.loss)
    part = out_path.with_name(f"scores.part{accelerator.process_index}.jsonl")
    accelerator.print(f"stepwise: scoring {len(loader.dataset)} training images with {trained.path}")

    def score(model: torch.nn.Module, batch: Any) -> list[dict]:
        return score_batch(model, trained.detector, matcher, batch, trained.categories.ids)

    with atomic_path(part, "score part file") as tmp, open(tmp, "w") as f:  # complete, or not there at all
        for records in shard_predictions(accelerator, trained.model, loader, score, desc="select: scoring"):
            f.writelines(json.dumps(record) + "\n" for record in records)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        merge_parts([out_path.with_name(f"scores.part{r}.jsonl") for r in range(accelerator.num_processes)],
                    out_path)
    accelerator.wait_for_everyone()
    return len(loader.dataset)


def merge_parts(parts: list[Path], out_path: Path) -> None:
    """Concatenate the per-process score files sorted by annotation id into ``out_path`` (atomically)."""
    lines = []
    for part in parts:
        if not part.is_file():
            raise FileNotFoundError(f"score part file {part} not found: its process did not finish scoring")
        with open(part) as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        lines.append((json.loads(line)["ann_id"], line))
                    except (json.JSONDecodeError, KeyError, TypeError) as err:
                        raise ValueError(f"score part file {part}: line {number} is not a score record ({err!r}); "
                                         "delete it to score again") from None
    lines.sort(key=lambda item: item[0])
    with atomic_path(out_path) as tmp, open(tmp, "w") as f:
        f.writelines(line for _, line in lines)
    for part in parts:
        os.remove(part)


def build_replay_sets(cfg: Any, scores_path: Path, run_dir: Path) -> dict[str, Any]:
    """Select D_head / D_tail from ``scores.jsonl`` by the root ``stepwise:`` block
    (:class:`~stepwise.stage_settings.DivisionSettings`) and write them with ``summary.json``; returns the
    summary."""
    division = DivisionSettings.from_config(cfg)
    index = AnnotationIndex.read(cfg.data.train_ann, "training annotation file")
    categories = CategoryMap.from_index(index)
    table = ScoreTable.read_jsonl(scores_path)
    if division.score == "max":  # the public code's score: the matched prediction's top class probability
        if table.max_score is None:
            raise ValueError(f"{scores_path} has no max_score column (written by an older stepwise): delete it "
                             f"to re-score, or use stepwise.score=class")
        table.score = table.max_score
    quotas, min_images, threshold = division.quotas, division.min_images, division.score_threshold
    sets = select_replay_sets(table, categories.image_counts, min_images, quotas, threshold)
    is_head = head_classes(categories.image_counts, min_images)
    summary: dict[str, Any] = {"scored_instances": len(table), "min_images": min_images,
                               "head_classes": int(is_head.sum()), "tail_classes": int((~is_head).sum()),
                               "quotas": quotas.__dict__, "score_threshold": threshold, "score": division.score,
                               "keep_others_as_ignore": division.keep_others_as_ignore,
                               "mean_score": float(table.score.mean()) if len(table) else None,
                               "fraction_above_threshold": float((table.score > threshold).mean())
                               if len(table) else None}
    by_id = np.argsort(table.ann_id, kind="stable")
    for name, ann_ids in sets.items():
        counts = write_replay_set_file(cfg.data.train_ann, index, ann_ids, run_dir / f"{name}.json",
                                       division.keep_others_as_ignore)
        labels = table.label[by_id[np.searchsorted(table.ann_id[by_id], ann_ids)]]  # ann_ids come from the table
        per_class = np.bincount(labels, minlength=len(categories))
        summary[name] = {**counts, "head_instances": int(per_class[is_head].sum()),
                         "tail_instances": int(per_class[~is_head].sum()), "per_class": per_class.tolist()}
    atomic_write_json(run_dir / "summary.json", summary, indent=1)
    return summary


def run(cfg: Any) -> dict[str, Any] | None:
    """Score (unless ``scores.jsonl`` exists), select and write the replay sets; returns the summary (rank 0)."""
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    run_dir = Path(cfg.run_dir)
    ensure_data(cfg, accelerator)
    scores_path = run_dir / SCORES_NAME
    if scores_path.is_file():
        accelerator.print(f"stepwise: reusing {scores_path} (delete it to score again)")
    else:
        score_dataset(cfg, accelerator, scores_path)
    summary = None
    if accelerator.is_main_process:
        summary = build_replay_sets(cfg, scores_path, run_dir)
        for name in ("d_head", "d_tail"):
            s = summary[name]
            print(f"stepwise: {run_dir / (name + '.json')}: {s['images']} images, {s['annotations']} "
                  f"annotations ({s['head_instances']} of {summary['head_classes']} head classes, "
                  f"{s['tail_instances']} of {summary['tail_classes']} tail classes)"
                  + (f", {s['ignored']} ignore boxes" if s["ignored"] else ""))
    accelerator.wait_for_everyone()
    return summary
