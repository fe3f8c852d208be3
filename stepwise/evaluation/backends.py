"""Two interchangeable evaluators of LVIS box AP: hotcoco's Rust LVIS mode (default) and the LVIS API (reference).

Both take the same checked inputs (ground-truth dict, ``Detections`` already cut to the top ``max_dets``
per image) and return the same thing: the LVIS precision array (T=10 IoU thresholds x R=101 recall
points x K categories sorted by id x A=4 area ranges), from which ``stepwise.evaluation.metrics``
derives every metric. ``tests/test_evaluation.py`` proves the two equal to 1e-9 on every metric and
per-class AP of a case that exercises every federated rule.

Where the libraries differ, and what stepwise does about it:

- ``iscrowd``: the LVIS API disregards it (every GT box is an ordinary box); hotcoco, like pycocotools,
  would treat a crowd box as a region that absorbs detections. ``run_hotcoco`` therefore hands hotcoco
  every GT box with ``iscrowd = 0``, which is exactly the LVIS API's semantics.
- ``ignore``: the LVIS API lets a detection match an ignored GT box and then ignores that detection;
  hotcoco has no such flag (pycocotools derives "ignore" from ``iscrowd`` and matches crowd boxes by
  intersection over the detection's area, a different rule). No exact translation exists, so
  ``lvis_eval.choose_evaluator`` sends ground truth with any ``ignore`` flag to the LVIS API.
"""

from __future__ import annotations

import hotcoco
import numpy as np

from stepwise.evaluation.detections import Detections

EVALUATORS = ("hotcoco", "lvis")
AREA_LABELS = ("all", "small", "medium", "large")  # the LVIS API's order of area ranges
# lvis.eval.Params for iou_type "bbox", value for value (tests/test_evaluation.py checks): IoU thresholds
# 0.50:0.05:0.95, 101 recall points, area ranges [0, 1e10], [0, 32^2], [32^2, 96^2], [96^2, 1e10].
IOU_THRS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
REC_THRS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)
AREA_RNG = ((0 ** 2, 1e5 ** 2), (0 ** 2, 32 ** 2), (32 ** 2, 96 ** 2), (96 ** 2, 1e5 ** 2))


def empty_precision(gt: dict) -> np.ndarray:
    """What the LVIS API computes with no detections (it raises on an empty list instead).

    A category/area cell with at least one non-ignored GT box has precision 0, every other cell -1.
    """
    cat_ids = sorted(cat["id"] for cat in gt["categories"])
    cat_index = {cid: k for k, cid in enumerate(cat_ids)}
    has_gt = np.zeros((len(cat_ids), len(AREA_RNG)), dtype=bool)
    for ann in gt["annotations"]:
        if ann.get("ignore", 0):
            continue
        for a, (lo, hi) in enumerate(AREA_RNG):
            if lo <= ann["area"] <= hi:
                has_gt[cat_index[ann["category_id"]], a] = True
    precision = -np.ones((len(IOU_THRS), len(REC_THRS), *has_gt.shape))
    precision[:, :, has_gt] = 0.0
    return precision


def run_lvis_api(gt: dict, dets: Detections) -> np.ndarray:
    """Precision (T, R, K, A) computed by the reference LVIS API (lvis 0.5.3).

    Works on dicts (one per detection) and fresh copies of the annotations, since it writes flags into
    them: use it on what fits in memory (it needs > 20 GB for LVIS v1 val with 300 detections per image).
    """
    from stepwise.evaluation.lvis_compat import LVISEval, LVISResults, lvis_from_dict  # 2 s of imports: only here

    if len(dets) == 0:
        return empty_precision(gt)
    lvis_gt = lvis_from_dict({**gt, "annotations": [dict(a) for a in gt["annotations"]]})
    lvis_dt = LVISResults(lvis_gt, dets.to_records(), max_dets=-1)  # already cut per image
    ev = LVISEval(lvis_gt, lvis_dt, iou_type="bbox")
    ev.evaluate()
    ev.accumulate()
    return ev.eval["precision"]


def hotcoco_gt(gt: dict) -> hotcoco.COCO:
    """``gt`` as a hotcoco dataset built from columns: boxes, areas and ids only (no segmentation
    polygons are copied), every box with ``iscrowd = 0`` (the LVIS API's semantics, see module docstring)."""
    anns = gt["annotations"]
    return hotcoco.COCO.from_arrays(
        gt["images"], gt["categories"],
        np.fromiter((a["image_id"] for a in anns), np.int64, len(anns)),
        np.fromiter((a["category_id"] for a in anns), np.int64, len(anns)),
        np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4),
        ids=np.fromiter((a["id"] for a in anns), np.int64, len(anns)),
        area=np.fromiter((a["area"] for a in anns), np.float64, len(anns)),
        iscrowd=np.zeros(len(anns), np.int64),
    )


def run_hotcoco(gt: dict, dets: Detections, max_dets: int = 300) -> np.ndarray:
    """Precision (T, R, K, A) computed by hotcoco's LVIS mode (``lvis_style=True``), from arrays.

    The detections are already cut to ``max_dets`` per image; ``LVISResults(max_dets=-1)`` keeps them all
    and the evaluator's own limit is set to ``max_dets`` so that it never binds either.
    """
    coco_gt = hotcoco_gt(gt)
    coco_dt = hotcoco.LVISResults(coco_gt, dets.hotcoco_array(), max_dets=-1)
    ev = hotcoco.COCOeval(coco_gt, coco_dt, "bbox", lvis_style=True)
    ev.params.max_dets = [max(max_dets, 1)]
    ev.evaluate()
    ev.accumulate()
    return np.asarray(ev.eval["precision"])[..., -1]


def run_evaluator(name: str, gt: dict, dets: Detections, max_dets: int = 300) -> np.ndarray:
    """Dispatch to ``run_hotcoco`` (``"hotcoco"``) or ``run_lvis_api`` (``"lvis"``)."""
    if name == "hotcoco":
        return run_hotcoco(gt, dets, max_dets)
    if name == "lvis":
        return run_lvis_api(gt, dets)
    raise ValueError(f"unknown evaluator {name!r}; choose one of {EVALUATORS} or 'auto'")
