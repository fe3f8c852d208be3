"""stepwise.analysis.confusion: who wins a rare class's boxes, on a hand-made GT and detections."""

import json

import numpy as np
import pytest

from stepwise.analysis import confusion as C
from stepwise.evaluation.detections import Detections


def _gt():
    cats = [{"id": 1, "name": "bird", "frequency": "f", "image_count": 200},
            {"id": 2, "name": "puffin", "frequency": "r", "image_count": 3},
            {"id": 3, "name": "penguin", "frequency": "c", "image_count": 40},
            {"id": 4, "name": "car", "frequency": "f", "image_count": 300},
            {"id": 5, "name": "kiwi", "frequency": "r", "image_count": 2}]
    box = [10.0, 10.0, 20.0, 20.0]
    anns = [{"id": k + 1, "image_id": k + 1, "category_id": 2, "bbox": box, "area": 400.0} for k in range(5)]
    anns.append({"id": 6, "image_id": 1, "category_id": 4, "bbox": [50.0, 50.0, 10.0, 10.0], "area": 100.0})
    images = [{"id": k + 1, "width": 100, "height": 100, "neg_category_ids": [], "not_exhaustive_category_ids": []}
              for k in range(5)]
    return {"images": images, "annotations": anns, "categories": cats}


FAMILY = {"bird": "birds", "puffin": "birds", "penguin": "birds", "kiwi": "birds", "car": "cars"}


def _dets(rows):
    """rows: (image_id, category_id, score, bbox)."""
    return Detections(image_id=np.array([r[0] for r in rows], np.int64),
                      category_id=np.array([r[1] for r in rows], np.int64),
                      bbox=np.array([r[3] for r in rows], np.float64).reshape(-1, 4),
                      score=np.array([r[2] for r in rows], np.float64))


def test_each_kind_of_winner_is_counted():
    on, off = [11.0, 10.0, 20.0, 20.0], [70.0, 70.0, 5.0, 5.0]
    dets = _dets([(1, 2, 0.9, on), (1, 1, 0.5, on),        # own wins over a weaker look-alike
                  (2, 1, 0.8, on), (2, 2, 0.7, on),        # frequent look-alike wins
                  (3, 3, 0.6, on),                          # common look-alike
                  (4, 4, 0.9, on), (4, 2, 0.95, off),       # another family (own class only off the box)
                  ])                                        # image 5: missed
    result = C.confusion(_gt(), dets, FAMILY, bins="r")
    assert result["totals"]["r"] == {"boxes": 5, "own": 1, "lookalike_f": 1, "lookalike_c": 1, "lookalike_r": 0,
                                     "other_f": 1, "other_c": 0, "other_r": 0, "missed": 1}
    rows = {r["name"]: r for r in result["classes"]}
    assert rows["puffin"]["boxes"] == 5 and rows["kiwi"]["boxes"] == 0  # a rare class without val boxes: a row of 0
    pairs = {(p["gt"], p["winner"]): p for p in result["pairs"]}
    assert pairs[("puffin", "bird")]["same_family"] and not pairs[("puffin", "car")]["same_family"]
    assert "all r" in C.format_report(result)


def test_cli_writes_json_and_names_a_bad_class_table(tmp_path, capsys):
    gt = tmp_path / "val.json"
    gt.write_text(json.dumps(_gt()))
    preds = tmp_path / "p.json"
    preds.write_text(json.dumps([{"image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "score": 0.9}]))
    table = tmp_path / "classes.tsv"
    table.write_text("id\tname\tfamily\n" + "".join(f"{i}\t{n}\t{FAMILY[n]}\n" for i, n in enumerate(FAMILY, 1)))
    out = tmp_path / "c.json"
    assert C.main([f"gt={gt}", f"predictions={preds}", f"classes={table}", f"out={out}"]) == 0
    assert json.loads(out.read_text())["totals"]["r"]["lookalike_f"] == 1
    bad = tmp_path / "bad.tsv"
    bad.write_text("name\tgroup\nbird\tbirds\n")
    assert C.main([f"gt={gt}", f"predictions={preds}", f"classes={bad}"]) == 1
    assert "bad.tsv" in capsys.readouterr().err
    assert C.main([f"gt={gt}", f"predictions={preds}"]) == 2


@pytest.mark.parametrize("bins", ["x", ""])
def test_bad_bins_are_a_usage_error(bins):
    with pytest.raises(C.UsageError):
        C.parse_args(["gt=a", "predictions=b", "classes=c", f"bins={bins}"])
