"""Two interchangeable evaluators of LVIS box AP: the reference LVIS API and faster-coco-eval's C++ LVIS mode.

Both take the same checked inputs (ground-truth dict, detections already cut to the top ``max_dets`` per
image) and return the same thing: the LVIS precision array (T=10 IoU thresholds x R=101 recall points x
K categories sorted by id x A=4 area ranges), from which ``stepwise.evaluation.metrics`` derives every metric.
Each run works on fresh copies of the annotation dicts, since both libraries write flags into them.
"""

from __future__ import annotations

import numpy as np
from faster_coco_eval import COCO, COCOeval_faster

from stepwise.evaluation.lvis_compat import LVISEval, LVISResults, Params, lvis_from_dict

EVALUATORS = ("lvis", "faster")
AREA_LABELS = ("all", "small", "medium", "large")  # the LVIS API's order of area ranges


def lvis_params(gt: dict) -> Params:
    """The LVIS API's evaluation parameters (IoU/recall thresholds, area ranges) for ``gt``'s categories."""
    params = Params(iou_type="bbox")
    params.cat_ids = sorted(cat["id"] for cat in gt["categories"])
    params.img_ids = sorted(img["id"] for img in gt["images"])
    return params


def _fresh(gt: dict) -> dict:
    return {**gt, "annotations": [dict(a) for a in gt["annotations"]]}


def empty_precision(gt: dict) -> np.ndarray:
    """What the LVIS API computes with no detections (it raises on an empty list instead).

    A category/area cell with at least one non-ignored GT box has precision 0, every other cell -1.
    """
    params = lvis_params(gt)
    cat_index = {cid: k for k, cid in enumerate(params.cat_ids)}
    has_gt = np.zeros((len(params.cat_ids), len(params.area_rng)), dtype=bool)
    for ann in gt["annotations"]:
        if ann.get("ignore", 0):
            continue
        for a, (lo, hi) in enumerate(params.area_rng):
            if lo <= ann["area"] <= hi:
                has_gt[cat_index[ann["category_id"]], a] = True
    precision = -np.ones((len(params.iou_thrs), len(params.rec_thrs), *has_gt.shape))
    precision[:, :, has_gt] = 0.0
    return precision


def run_lvis_api(gt: dict, detections: list[dict]) -> np.ndarray:
    """Precision (T, R, K, A) computed by the reference LVIS API (lvis 0.5.3)."""
    if not detections:
        return empty_precision(gt)
    lvis_gt = lvis_from_dict(_fresh(gt))
    lvis_dt = LVISResults(lvis_gt, [dict(d) for d in detections], max_dets=-1)  # already cut per image
    ev = LVISEval(lvis_gt, lvis_dt, iou_type="bbox")
    ev.evaluate()
    ev.accumulate()
    return ev.eval["precision"]


def run_faster(gt: dict, detections: list[dict], max_dets: int = 300) -> np.ndarray:
    """Precision (T, R, K, A) computed by faster-coco-eval's C++ evaluator with ``lvis_style=True``.

    faster-coco-eval applies ``max_dets`` per image *and category*; the detections are already cut to
    ``max_dets`` per image, so that limit never binds and the LVIS per-image rule is what counts.
    """
    if not detections:
        return empty_precision(gt)
    quiet = lambda *args, **kwargs: None  # noqa: E731
    coco_gt = COCO(_fresh(gt), print_function=quiet)
    coco_dt = coco_gt.loadRes([dict(d) for d in detections])
    ev = COCOeval_faster(coco_gt, coco_dt, iouType="bbox", lvis_style=True, print_function=quiet)
    ev.params.maxDets = [max(max_dets, 1)]
    ev.evaluate()
    ev.accumulate()
    return np.asarray(ev.eval["precision"])[..., -1]


def run_evaluator(name: str, gt: dict, detections: list[dict], max_dets: int = 300) -> np.ndarray:
    """Dispatch to ``run_lvis_api`` (``"lvis"``) or ``run_faster`` (``"faster"``)."""
    if name == "lvis":
        return run_lvis_api(gt, detections)
    if name == "faster":
        return run_faster(gt, detections, max_dets)
    raise ValueError(f"unknown evaluator {name!r}; choose one of {EVALUATORS} or 'auto'")
