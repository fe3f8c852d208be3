"""Entry point: what a detector's confident detections are: correct, duplicates, wrong class, background.

    python -m stepwise.analysis.errors gt=VAL.json predictions=A.json [predictions=B.json ...] [label=NAME ...]
        [train_gt=TRAIN.json] [edges=10,100,1000] [iou=0.5] [top=1] [out=errors.json]

Two views of each prediction file, both over the detections the LVIS evaluation scores (a category neither
present in the image nor in its ``neg_category_ids`` is skipped, as the federated evaluation ignores it):

* **Top detections.** In each image the ``top`` x (number of GT boxes) highest-scoring detections, the
  operating point where a perfect detector has found every object, are matched greedily by score:
  ``correct`` (IoU >= ``iou`` with a not yet matched GT box of its class), ``duplicate`` (only with an
  already matched one), ``wrong_class`` (IoU >= ``iou`` with a GT box of another class), ``background``
  (none of these).
* **Localized objects.** For every GT box some detection overlaps at IoU >= ``iou``: is the
  highest-scoring of those of the box's class (``top_correct``)? If not, the winning class is in the box's
  class group (``top_wrong_same_group``) or another one (``top_wrong_other_group``). Of the boxes won by
  their class, ``close_wrong_class`` counts those where a detection of another class on the same box
  (IoU >= ``iou``) scores at least half as high: a second, confident and wrong label.

Wrong classes are split by group: classes grouped by training instance count with the BAGS ``edges``
(counts from ``train_gt``'s annotations, else the ``instance_count`` of the GT's categories). A grouped
classifier (BAGS) scores each group with its own softmax, so a wrong class from another group is the
error its "others" slots exist to prevent. Counts and fractions are printed as one column per file and,
with ``out=``, written as JSON. Exit codes: 0 success, 1 bad input, 2 bad arguments.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from stepwise import cli
from stepwise.cli import UsageError
from stepwise.evaluation.inputs import load_gt, load_predictions, training_instance_counts
from stepwise.utils.io import atomic_write_json

USAGE = ("usage: python -m stepwise.analysis.errors gt=VAL.json predictions=A.json [predictions=B.json ...] "
         "[label=NAME ...] [train_gt=TRAIN.json] [edges=10,100,1000] [iou=0.5] [top=1] [out=errors.json]")
DETECTION_KINDS = ("correct", "duplicate", "wrong_class_same_group", "wrong_class_other_group", "background")
OBJECT_KINDS = ("top_correct", "top_wrong_same_group", "top_wrong_other_group")
CLOSE_SCORE_RATIO = 0.5  # close_wrong_class: a wrong class scoring at least this fraction of the winner's score


@dataclass
class ErrorCounts:
    """The two views of one prediction file (see the module docstring); ``fractions`` of each view's total
    (``close_wrong_class`` as a fraction of ``top_correct``)."""

    label: str
    detections: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DETECTION_KINDS, 0))
    objects: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OBJECT_KINDS, 0))
    close_wrong_class: int = 0
    num_gt: int = 0

    def fractions(self) -> dict[str, float]:
        out = {}
        for counts in (self.detections, self.objects):
            total = sum(counts.values())
            out.update({k: v / total if total else math.nan for k, v in counts.items()})
        correct = self.objects["top_correct"]
        out["close_wrong_class"] = self.close_wrong_class / correct if correct else math.nan
        return out


def box_iou_xywh(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(A, 4), (B, 4) boxes ``[x, y, w, h]`` -> (A, B) IoU (0 where the union is empty)."""
    a0, a1 = a[:, None, :2], a[:, None, :2] + a[:, None, 2:]
    b0, b1 = b[None, :, :2], b[None, :, :2] + b[None, :, 2:]
    inter = np.clip(np.minimum(a1, b1) - np.maximum(a0, b0), 0, None).prod(-1)
    union = a[:, None, 2:].prod(-1) + b[None, :, 2:].prod(-1) - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def count_errors(gt: dict, dets, group_of: dict[int, int], label: str, iou: float = 0.5,
                 top: float = 1.0) -> ErrorCounts:
    """Both views for ``dets`` (``stepwise.evaluation.detections.Detections``) against the checked ``gt``.

    ``group_of`` maps category id -> group; ``iou`` the match threshold; ``top`` the top-detection budget
    per GT box of the image.
    """
    counts = ErrorCounts(label)
    ann_img = np.array([a["image_id"] for a in gt["annotations"]], dtype=np.int64)
    ann_cat = np.array([a["category_id"] for a in gt["annotations"]], dtype=np.int64)
    ann_box = np.array([a["bbox"] for a in gt["annotations"]], dtype=np.float64).reshape(-1, 4)
    ann_order = np.argsort(ann_img, kind="stable")
    det_order = np.lexsort((np.arange(len(dets)), -dets.score, dets.image_id))  # by image, score desc
    ann_img, det_img = ann_img[ann_order], dets.image_id[det_order]  # both sorted by image: one slice per image
    for img in gt["images"]:
        g = ann_order[image_rows(ann_img, img["id"])]
        g_cat, g_box = ann_cat[g], ann_box[g]
        counts.num_gt += len(g)
        d = det_order[image_rows(det_img, img["id"])]
        d = d[np.isin(dets.category_id[d], np.concatenate([g_cat, np.asarray(img["neg_category_ids"], np.int64)]))]
        if len(d) == 0:
            continue
        d_cat = dets.category_id[d]
        ious = box_iou_xywh(dets.bbox[d], g_box) if len(g) else np.zeros((len(d), 0))
        same = d_cat[:, None] == g_cat[None, :]
        _top_detections(counts.detections, ious[: math.ceil(top * len(g))], same, d_cat, g_cat, group_of, iou)
        score = dets.score[d]
        for j in np.flatnonzero((ious >= iou).any(0)):
            on_box = ious[:, j] >= iou
            winner = int(np.argmax(on_box))  # detections are in descending score order
            if same[winner, j]:
                counts.objects["top_correct"] += 1
                wrong = on_box & ~same[:, j]
                counts.close_wrong_class += bool(wrong.any() and score[wrong].max() >= CLOSE_SCORE_RATIO * score[winner])
            else:
                same_group = group_of[int(d_cat[winner])] == group_of[int(g_cat[j])]
                counts.objects["top_wrong_same_group" if same_group else "top_wrong_other_group"] += 1
    return counts


def image_rows(sorted_ids: np.ndarray, image_id: int) -> slice:
    """The slice of ``sorted_ids`` (ascending) equal to ``image_id``."""
    return slice(*np.searchsorted(sorted_ids, [image_id, image_id + 1]))


def _top_detections(out: dict[str, int], ious: np.ndarray, same: np.ndarray, d_cat: np.ndarray,
                    g_cat: np.ndarray, group_of: dict[int, int], iou: float) -> None:
    """Greedy COCO-style matching of the (k, G) ``ious`` rows (descending score) into ``out``'s kinds."""
    matched = np.zeros(ious.shape[1], dtype=bool)
    for i, row in enumerate(ious):
        own = np.where(same[i] & ~matched, row, -1.0)
        if own.size and own.max() >= iou:
            matched[int(own.argmax())] = True
            out["correct"] += 1
        elif np.where(same[i], row, -1.0).max(initial=-1.0) >= iou:
            out["duplicate"] += 1
        elif (other := np.where(same[i], -1.0, row)).max(initial=-1.0) >= iou:
            same_group = group_of[int(d_cat[i])] == group_of[int(g_cat[int(other.argmax())])]
            out["wrong_class_same_group" if same_group else "wrong_class_other_group"] += 1
        else:
            out["background"] += 1


def class_groups(gt: dict, train_gt: str | None, edges: Sequence[float]) -> dict[int, int]:
    """Category id -> BAGS group (0 = rarest) by training instance count."""
    from stepwise.heads.grouping import groups_from_edges  # here: stepwise.heads imports torch

    counts, _ = training_instance_counts(gt, train_gt)
    ids = sorted(counts)
    return dict(zip(ids, groups_from_edges([counts[i] for i in ids], edges).tolist()))


def format_table(results: Sequence[ErrorCounts]) -> str:
    """One row per kind (fraction of its view, in %), one column per file."""
    width = max(12, *(len(r.label) for r in results))
    lines = [f"{'':<26}" + "".join(f"{r.label:>{width + 2}}" for r in results)]
    fractions = [r.fractions() for r in results]
    for title, kinds in (("top detections (% of them)", DETECTION_KINDS), ("localized GT boxes (%)", OBJECT_KINDS)):
        lines.append(title)
        lines += [f"  {kind:<24}" + "".join(f"{100 * f[kind]:>{width + 2}.1f}" for f in fractions) for kind in kinds]
    lines.append(f"  {'close_wrong_class':<24}" + "".join(f"{100 * f['close_wrong_class']:>{width + 2}.1f}" for f in fractions)
                 + "   (% of top_correct)")
    return "\n".join(lines)


def parse_args(argv: Sequence[str]) -> dict:
    """Checked arguments: gt, predictions (list), labels (list), train_gt, edges, iou, top, out."""
    args = cli.parse_args(argv, repeatable=("predictions", "label"))
    known = {"gt", "predictions", "label", "train_gt", "edges", "iou", "top", "out"}
    if unknown := sorted(set(args) - known):
        raise UsageError(f"unknown key(s) {unknown}; known: {', '.join(sorted(known))}")
    if "gt" not in args or not args.get("predictions"):
        raise UsageError("need gt= and at least one predictions=")
    labels = args.get("label") or [str(p) for p in args["predictions"]]
    if len(labels) != len(args["predictions"]):
        raise UsageError(f"{len(labels)} label= for {len(args['predictions'])} predictions=: one per file or none")
    edges = [cli.parse_number("edges", e) for e in args.get("edges", "10,100,1000").split(",")]
    iou, top = cli.parse_number("iou", args.get("iou", "0.5")), cli.parse_number("top", args.get("top", "1"))
    if not 0 < iou <= 1 or top <= 0:
        raise UsageError(f"need 0 < iou <= 1 and top > 0, got iou={iou}, top={top}")
    return {"gt": args["gt"], "predictions": args["predictions"], "labels": labels, "train_gt": args.get("train_gt"),
            "edges": edges, "iou": iou, "top": top, "out": args.get("out")}


def _run(argv: list[str]) -> tuple[dict, list]:
    """The arguments and one error count per predictions file (``main``'s work before any output)."""
    a = parse_args(argv)
    gt, _, _ = load_gt(a["gt"])
    groups = class_groups(gt, a["train_gt"], a["edges"])
    return a, [count_errors(gt, load_predictions(p, gt, gt_source=a["gt"]).detections, groups, label,
                            a["iou"], a["top"]) for p, label in zip(a["predictions"], a["labels"])]


def _finish(done: tuple[dict, list]) -> int:
    a, results = done
    print(format_table(results))
    if a["out"]:
        atomic_write_json(a["out"], {"gt": a["gt"], "iou": a["iou"], "top": a["top"], "edges": a["edges"],
                                     "results": [{**asdict(r), "fractions": r.fractions()} for r in results]})
        print(f"wrote {a['out']}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m stepwise.analysis.errors`` on ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    return cli.main(argv, USAGE, _run, _finish)


if __name__ == "__main__":
    sys.exit(main())
