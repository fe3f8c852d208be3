"""``evaluate_lvis``: official LVIS box metrics plus AP by training-instance bin and per-class AP.

Default evaluator ("auto"): hotcoco's Rust LVIS mode, which ``tests/test_evaluation.py`` proves equal
to the LVIS API to 1e-9 on every metric and every per-class AP (all federated rules, score ties, every
area range and frequency, empty categories). It evaluates LVIS v1 val with 300 detections per image
(5.9M) in seconds and a few GB, where the LVIS API needs > 20 GB (``bench/RESULTS.md``).
``iscrowd`` is handled exactly (see ``backends``); ground truth with an ``ignore`` flag, which hotcoco
cannot express, goes to the LVIS API under "auto" (LVIS files carry neither flag).
"""

from __future__ import annotations

import logging
import sys
import time

from stepwise.evaluation.backends import EVALUATORS, run_evaluator
from stepwise.evaluation.detections import Detections
from stepwise.evaluation.inputs import PathOrDict, PathOrList, load_gt, load_predictions, training_instance_counts
from stepwise.evaluation.metrics import INSTANCE_BIN_EDGES, bin_means, instance_bin, per_class_ap, summarize
from stepwise.evaluation.report import ClassRow, EvalReport

logger = logging.getLogger(__name__)


def _ignored_annotations(gt: dict) -> list:
    return [ann.get("id", "?") for ann in gt["annotations"] if ann.get("ignore", 0)]


def choose_evaluator(gt: dict, evaluator: str = "auto") -> str:
    """Resolve ``"auto"`` to ``"hotcoco"`` unless ``gt`` has annotations flagged ``ignore`` (then ``"lvis"``).

    Asking for ``"hotcoco"`` on such ground truth is an error naming an annotation: its numbers would
    differ from the LVIS API's.
    """
    if evaluator not in ("auto", *EVALUATORS):
        raise ValueError(f"unknown evaluator {evaluator!r}; choose auto, {', '.join(EVALUATORS)}"
                         + (" (faster-coco-eval was replaced by hotcoco)" if evaluator == "faster" else ""))
    if evaluator == "lvis":
        return evaluator
    ignored = _ignored_annotations(gt)
    if ignored and evaluator == "hotcoco":
        raise ValueError(f"{len(ignored)} GT annotation(s) (e.g. id {ignored[0]}) carry an 'ignore' flag, which "
                         "hotcoco cannot apply as the LVIS API does; use evaluator=lvis or auto")
    return "lvis" if ignored else "hotcoco"


class _Progress:
    """Timed progress lines on stderr (``enabled``), e.g. ``[  3.1 s] read 5,942,700 predictions``."""

    def __init__(self, enabled: bool) -> None:
        self.enabled, self.start = enabled, time.perf_counter()

    def __call__(self, msg: str) -> None:
        if self.enabled:
            print(f"[{time.perf_counter() - self.start:6.1f} s] {msg}", file=sys.stderr, flush=True)


def evaluate_lvis(
    gt: PathOrDict,
    predictions: PathOrList | Detections,
    train_gt: PathOrDict | None = None,
    max_dets: int = 300,
    evaluator: str = "auto",
    progress: bool = False,
) -> EvalReport:
    """Evaluate box detections with the LVIS API's semantics.

    Args:
        gt: LVIS-format annotation file or dict (images with ``neg_category_ids`` and
            ``not_exhaustive_category_ids``, categories with ``frequency``).
        predictions: LVIS results file, list ``[{image_id, category_id, bbox [x, y, w, h], score}]`` or
            ``Detections`` (columns); only the ``max_dets`` highest-scoring detections of each image are
            evaluated (LVIS: 300). A file is read piece by piece into arrays, never as one dict per detection.
        train_gt: training annotation file or dict whose annotations give each category's training
            instance count for AP1..AP4; when omitted, the ``instance_count`` field of ``gt``'s categories.
        max_dets: detections kept per image (>= 1).
        evaluator: "auto" (see module docstring), "hotcoco" or "lvis" (the reference LVIS API).
        progress: print timed progress lines (and a bar while reading a predictions file) to stderr.

    Returns:
        EvalReport with AP, AP50, AP75, APs, APm, APl, APr, APc, APf (``None`` where the LVIS API says -1),
        AP1..AP4 over bins [0,10), [10,100), [100,1000), [1000,inf) of training instances (categories
        without a valid AP left out, an empty bin ``None``), and one row per category.
    """
    if not isinstance(max_dets, int) or max_dets < 1:
        raise ValueError(f"max_dets must be a positive integer, got {max_dets!r}")
    say = _Progress(progress)
    gt_dict, gt_src, gt_warnings = load_gt(gt)
    say(f"ground truth {gt_src}: {len(gt_dict['images']):,} images, {len(gt_dict['annotations']):,} boxes, "
        f"{len(gt_dict['categories']):,} categories")
    name = choose_evaluator(gt_dict, evaluator)
    preds = load_predictions(predictions, gt_dict, max_dets=max_dets, gt_source=gt_src, progress=progress)
    say(f"read {preds.num_input:,} predictions ({len(preds.detections):,} kept, at most {max_dets} per image)")
    counts, counts_src = training_instance_counts(gt_dict, train_gt, gt_source=gt_src)

    say(f"evaluating with {name}")
    precision = run_evaluator(name, gt_dict, preds.detections, max_dets)
    cats = sorted(gt_dict["categories"], key=lambda c: c["id"])
    aps = per_class_ap(precision)
    cat_counts = [counts[c["id"]] for c in cats]
    metrics = {**summarize(precision, gt_dict), **bin_means(aps, cat_counts, INSTANCE_BIN_EDGES)}
    rows = _class_rows(cats, cat_counts, aps)
    say("done")
    meta = {"evaluator": name, "max_dets": max_dets, "bin_edges": list(INSTANCE_BIN_EDGES),
            "instance_counts_from": counts_src, "gt": gt_src, "num_images": len(gt_dict["images"]),
            "num_predictions": preds.num_input, "num_evaluated": len(preds.detections),
            "num_degenerate_boxes": preds.num_degenerate}
    return EvalReport(metrics=metrics, per_class=rows, meta=meta, warnings=gt_warnings + preds.warnings)


def _class_rows(cats: list[dict], cat_counts: list[int], aps: list) -> list[ClassRow]:
    """One report row per category (sorted by id): name, frequency, training instances, their bin and AP."""
    return [
        ClassRow(id=c["id"], name=str(c.get("name", c["id"])), frequency=c["frequency"], train_instances=n,
                 bin=instance_bin(n, INSTANCE_BIN_EDGES), ap=ap)
        for c, n, ap in zip(cats, cat_counts, aps)
    ]
