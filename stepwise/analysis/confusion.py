"""Entry point: which class wins the boxes of the rare classes (or any bin): their own, a look-alike, another.

    python -m stepwise.analysis.confusion gt=VAL.json predictions=P.json classes=CLASSES.tsv
        [bins=r] [iou=0.5] [pairs=15] [out=confusion.json]

For every GT box of a class in ``bins`` (LVIS frequency letters of the GT's categories), the detections of
*any* class overlapping it at IoU >= ``iou`` are its candidates (the federated filter of the LVIS
evaluation is not applied: the question is what the model calls the object). The highest-scoring candidate
wins the box:

* ``own``: the box's class;
* ``lookalike_f`` / ``lookalike_c`` / ``lookalike_r``: another class of the same look-alike family, by that
  class's frequency bin (a rare ``puffin`` lost to a frequent ``bird`` is ``lookalike_f``);
* ``other_f`` / ``other_c`` / ``other_r``: a class of another family, by its frequency bin;
* ``missed``: no detection overlaps the box.

``classes`` is a tab-separated class table with a header naming at least the columns ``name`` and
``family`` (the emoji benchmark writes one as ``classes.tsv``; for other data, any grouping of look-alikes,
e.g. WordNet parents). Prints the totals per bin, one row per class and the most frequent (class -> winner)
pairs; ``out=`` writes them as JSON. Exit codes: 0 success, 1 bad input, 2 bad arguments.
"""

from __future__ import annotations

import csv
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from stepwise import cli
from stepwise.analysis.errors import image_rows, box_iou_xywh
from stepwise.cli import UsageError
from stepwise.evaluation.inputs import load_gt, load_predictions
from stepwise.utils.io import atomic_write_json

USAGE = ("usage: python -m stepwise.analysis.confusion gt=VAL.json predictions=P.json classes=CLASSES.tsv "
         "[bins=r] [iou=0.5] [pairs=15] [out=confusion.json]")
KINDS = ("own", "lookalike_f", "lookalike_c", "lookalike_r", "other_f", "other_c", "other_r", "missed")


def read_families(path: str | Path, names: Sequence[str]) -> dict[str, str]:
    """Class name -> family from the TSV at ``path``; every name in ``names`` must be in it."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if not rows or not {"name", "family"} <= set(rows[0]):
        raise ValueError(f"{path}: a class table needs a header with the columns 'name' and 'family'")
    family = {r["name"]: r["family"] for r in rows}
    if missing := [n for n in names if n not in family]:
        raise ValueError(f"{path}: no family for {len(missing)} GT categories, e.g. {missing[:3]}")
    return family


def box_winners(gt: dict, dets, cat_ids: set[int], iou: float) -> list[tuple[int, int]]:
    """(GT category, winning detection category or 0 when missed) for every GT box of ``cat_ids``.

    ``dets``: ``stepwise.evaluation.detections.Detections`` (image_id, category_id, bbox (N, 4) xywh, score).
    """
    anns = [a for a in gt["annotations"] if a["category_id"] in cat_ids]
    ann_img = np.array([a["image_id"] for a in anns], dtype=np.int64)
    order = np.argsort(ann_img, kind="stable")
    ann_img = ann_img[order]
    det_order = np.lexsort((np.arange(len(dets)), -dets.score, dets.image_id))  # by image, score desc
    det_img = dets.image_id[det_order]
    out = []
    for image_id in np.unique(ann_img).tolist():
        g = [anns[i] for i in order[image_rows(ann_img, image_id)]]
        d = det_order[image_rows(det_img, image_id)]
        boxes = np.array([a["bbox"] for a in g], dtype=np.float64).reshape(-1, 4)
        ious = box_iou_xywh(dets.bbox[d], boxes) if len(d) else np.zeros((0, len(g)))
        for j, a in enumerate(g):
            hit = np.flatnonzero(ious[:, j] >= iou)  # in descending score order: the first one wins
            out.append((a["category_id"], int(dets.category_id[d[hit[0]]]) if len(hit) else 0))
    return out


def confusion(gt: dict, dets, family: dict[str, str], bins: str = "r", iou: float = 0.5) -> dict:
    """Per-class and per-bin counts of ``KINDS`` and the (class, winner) pair counts (see the module doc)."""
    cats = {c["id"]: c for c in gt["categories"]}
    chosen = {i for i, c in cats.items() if c["frequency"] in bins}
    per_class: dict[int, Counter] = {i: Counter() for i in sorted(chosen)}
    pairs: Counter = Counter()
    for cid, winner in box_winners(gt, dets, chosen, iou):
        if winner == 0:
            kind = "missed"
        elif winner == cid:
            kind = "own"
        elif family[cats[winner]["name"]] == family[cats[cid]["name"]]:
            kind = f"lookalike_{cats[winner]['frequency']}"
        else:
            kind = f"other_{cats[winner]['frequency']}"
        per_class[cid][kind] += 1
        if kind != "own" and winner:
            pairs[(cid, winner)] += 1
    rows = [{"id": i, "name": cats[i]["name"], "family": family[cats[i]["name"]], "frequency": cats[i]["frequency"],
             "train_images": cats[i].get("image_count"), "boxes": sum(c.values()), **{k: c[k] for k in KINDS}}
            for i, c in per_class.items()]
    totals = {b: {k: sum(r[k] for r in rows if r["frequency"] == b) for k in ("boxes", *KINDS)} for b in bins}
    pair_rows = [{"gt": cats[a]["name"], "winner": cats[w]["name"], "winner_frequency": cats[w]["frequency"],
                  "same_family": family[cats[a]["name"]] == family[cats[w]["name"]], "boxes": n}
                 for (a, w), n in pairs.most_common()]
    return {"iou": iou, "bins": bins, "totals": totals, "classes": rows, "pairs": pair_rows}


def format_report(result: dict, pairs: int = 15) -> str:
    """Totals per bin (% of boxes), the class rows and the ``pairs`` most frequent (class -> winner) pairs."""
    head = f"{'':<28}{'boxes':>7}" + "".join(f"{k:>13}" for k in KINDS)
    lines = ["box won by (% of the GT boxes)", head]
    for b, t in result["totals"].items():
        n = max(t["boxes"], 1)
        lines.append(f"{'all ' + b:<28}{t['boxes']:>7}" + "".join(f"{100 * t[k] / n:>13.1f}" for k in KINDS))
    lines += ["", "per class (boxes)", f"{'':<28}{'train':>7}" + "".join(f"{k:>13}" for k in KINDS)]
    for r in sorted(result["classes"], key=lambda r: (r["frequency"], r["name"])):
        lines.append(f"{r['name'][:27]:<28}{r['train_images'] or 0:>7}" + "".join(f"{r[k]:>13}" for k in KINDS))
    lines += ["", f"most frequent confusions (top {pairs})"]
    lines += [f"  {p['gt']} -> {p['winner']} ({p['winner_frequency']}, "
              f"{'same family' if p['same_family'] else 'other family'}): {p['boxes']}"
              for p in result["pairs"][:pairs]]
    return "\n".join(lines)


def parse_args(argv: Sequence[str]) -> dict:
    """Checked arguments: gt, predictions, classes, bins, iou, pairs, out."""
    args = cli.parse_args(argv)
    known = {"gt", "predictions", "classes", "bins", "iou", "pairs", "out"}
    if unknown := sorted(set(args) - known):
        raise UsageError(f"unknown key(s) {unknown}; known: {', '.join(sorted(known))}")
    if missing := [k for k in ("gt", "predictions", "classes") if k not in args]:
        raise UsageError(f"missing {', '.join(k + '=' for k in missing)}")
    bins = args.get("bins", "r")
    if not bins or set(bins) - set("rcf"):
        raise UsageError(f"bins= takes letters of r, c, f (e.g. r or rc), got {bins!r}")
    iou = cli.parse_number("iou", args.get("iou", "0.5"))
    if not 0 < iou <= 1:
        raise UsageError(f"need 0 < iou <= 1, got {iou}")
    return {**args, "bins": bins, "iou": iou, "pairs": int(cli.parse_number("pairs", args.get("pairs", "15")))}


def _run(argv: list[str]) -> tuple[dict, dict]:
    """The arguments and the confusion result (``main``'s work before any output)."""
    a = parse_args(argv)
    gt, _, _ = load_gt(a["gt"])
    family = read_families(a["classes"], [c["name"] for c in gt["categories"]])
    dets = load_predictions(a["predictions"], gt, gt_source=a["gt"]).detections
    return a, confusion(gt, dets, family, a["bins"], a["iou"])


def _finish(done: tuple[dict, dict]) -> int:
    a, result = done
    print(format_report(result, a["pairs"]))
    if a.get("out"):
        atomic_write_json(a["out"], {"gt": a["gt"], "predictions": a["predictions"], **result})
        print(f"wrote {a['out']}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m stepwise.analysis.confusion`` on ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    return cli.main(argv, USAGE, _run, _finish)


if __name__ == "__main__":
    sys.exit(main())
