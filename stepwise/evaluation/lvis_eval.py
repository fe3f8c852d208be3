"""``evaluate_lvis``: official LVIS box metrics plus AP by training-instance bin and per-class AP.

Default evaluator ("auto"): faster-coco-eval's C++ LVIS mode, which ``tests/test_evaluation.py`` proves
equal to the LVIS API to 1e-6 on every metric and every per-class AP (thousands of random detections,
all federated rules, score ties). One case is known to differ: faster-coco-eval treats ``iscrowd`` boxes
as crowd regions and overwrites ``ignore`` from ``iscrowd``, while the LVIS API ignores ``iscrowd`` and
honours ``ignore``; "auto" therefore falls back to the LVIS API when any GT annotation carries either flag
(LVIS files never do).
"""

from __future__ import annotations

import logging

from stepwise.evaluation.backends import run_evaluator
from stepwise.evaluation.inputs import PathOrDict, PathOrList, load_gt, load_predictions, training_instance_counts
from stepwise.evaluation.metrics import INSTANCE_BIN_EDGES, bin_means, instance_bin, per_class_ap, summarize
from stepwise.evaluation.report import ClassRow, EvalReport

logger = logging.getLogger(__name__)


def choose_evaluator(gt: dict, evaluator: str = "auto") -> str:
    """Resolve ``"auto"`` to ``"faster"`` unless ``gt`` uses ``iscrowd``/``ignore`` (then ``"lvis"``)."""
    if evaluator != "auto":
        return evaluator
    flagged = any(ann.get("iscrowd", 0) or ann.get("ignore", 0) for ann in gt["annotations"])
    return "lvis" if flagged else "faster"


def evaluate_lvis(
    gt: PathOrDict,
    predictions: PathOrList,
    train_gt: PathOrDict | None = None,
    max_dets: int = 300,
    evaluator: str = "auto",
) -> EvalReport:
    """Evaluate box detections with the LVIS API's semantics.

    Args:
        gt: LVIS-format annotation file or dict (images with ``neg_category_ids`` and
            ``not_exhaustive_category_ids``, categories with ``frequency``).
        predictions: LVIS results file or list ``[{image_id, category_id, bbox [x, y, w, h], score}]``;
            only the ``max_dets`` highest-scoring detections of each image are evaluated (LVIS: 300).
        train_gt: training annotation file or dict whose annotations give each category's training
            instance count for AP1..AP4; when omitted, the ``instance_count`` field of ``gt``'s categories.
        max_dets: detections kept per image (>= 1).
        evaluator: "auto" (see module docstring), "lvis" (reference LVIS API) or "faster" (faster-coco-eval).

    Returns:
        EvalReport with AP, AP50, AP75, APs, APm, APl, APr, APc, APf (``None`` where the LVIS API says -1),
        AP1..AP4 over bins [0,10), [10,100), [100,1000), [1000,inf) of training instances (categories
        without a valid AP left out, an empty bin ``None``), and one row per category.
    """
    if not isinstance(max_dets, int) or max_dets < 1:
        raise ValueError(f"max_dets must be a positive integer, got {max_dets!r}")
    gt_dict, gt_src, gt_warnings = load_gt(gt)
    preds = load_predictions(predictions, gt_dict, max_dets=max_dets, gt_source=gt_src)
    counts, counts_src = training_instance_counts(gt_dict, train_gt, gt_source=gt_src)
    name = choose_evaluator(gt_dict, evaluator)

    precision = run_evaluator(name, gt_dict, preds.detections, max_dets)
    cats = sorted(gt_dict["categories"], key=lambda c: c["id"])
    aps = per_class_ap(precision)
    cat_counts = [counts[c["id"]] for c in cats]
    metrics = {**summarize(precision, gt_dict), **bin_means(aps, cat_counts, INSTANCE_BIN_EDGES)}
    rows = [
        ClassRow(id=c["id"], name=str(c.get("name", c["id"])), frequency=c["frequency"], train_instances=n,
                 bin=instance_bin(n, INSTANCE_BIN_EDGES), ap=ap)
        for c, n, ap in zip(cats, cat_counts, aps)
    ]
    meta = {
        "evaluator": name,
        "max_dets": max_dets,
        "bin_edges": list(INSTANCE_BIN_EDGES),
        "instance_counts_from": counts_src,
        "gt": gt_src,
        "num_images": len(gt_dict["images"]),
        "num_predictions": preds.num_input,
        "num_evaluated": len(preds.detections),
        "num_degenerate_boxes": preds.num_degenerate,
    }
    return EvalReport(metrics=metrics, per_class=rows, meta=meta, warnings=gt_warnings + preds.warnings)
