"""``python -m stepwise.analysis.errors``: the kinds of top detections and the winners on GT boxes, by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest

from stepwise.analysis.errors import box_iou_xywh, main

A, B, C = [0, 0, 10, 10], [20, 20, 10, 10], [0, 0, 10, 10]
FAR = [60, 60, 5, 5]


def write_inputs(tmp_path):
    """Image 1: A (class 1, group 0), B (class 2, group 1); image 2: C (class 3, group 1). Edges [10]."""
    counts = {1: 5, 2: 50, 3: 60, 4: 0}  # groups with edges [10]: 0, 1, 1, 0
    gt = {"images": [{"id": 1, "neg_category_ids": [3], "not_exhaustive_category_ids": []},
                     {"id": 2, "neg_category_ids": [1], "not_exhaustive_category_ids": []}],
          "categories": [{"id": c, "name": f"c{c}", "frequency": "r", "instance_count": n} for c, n in counts.items()],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": A, "area": 100},
                          {"id": 2, "image_id": 1, "category_id": 2, "bbox": B, "area": 100},
                          {"id": 3, "image_id": 2, "category_id": 3, "bbox": C, "area": 100}]}
    dets = [  # image 1, top 2 x 2 GT = 4 detections: correct, background, wrong (same group), wrong (other group)
        {"image_id": 1, "category_id": 4, "bbox": A, "score": 0.95},  # class 4 not verified in image 1: skipped
        {"image_id": 1, "category_id": 1, "bbox": A, "score": 0.9},
        {"image_id": 1, "category_id": 2, "bbox": FAR, "score": 0.87},
        {"image_id": 1, "category_id": 3, "bbox": B, "score": 0.85},
        {"image_id": 1, "category_id": 2, "bbox": A, "score": 0.8},  # on A at 0.8 >= 0.5 x 0.9: close wrong class
        {"image_id": 1, "category_id": 2, "bbox": B, "score": 0.3},  # beyond the top 4
        # image 2, top 2: correct, duplicate
        {"image_id": 2, "category_id": 3, "bbox": C, "score": 0.7},
        {"image_id": 2, "category_id": 3, "bbox": [0, 0, 10, 9.5], "score": 0.68},
        {"image_id": 2, "category_id": 1, "bbox": FAR, "score": 0.65}]
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "pred.json").write_text(json.dumps(dets))
    return tmp_path / "gt.json", tmp_path / "pred.json"


def test_counts_by_hand(tmp_path, capsys):
    gt, pred = write_inputs(tmp_path)
    out = tmp_path / "errors.json"
    assert main([f"gt={gt}", f"predictions={pred}", "label=hand", "edges=10", "top=2", f"out={out}"]) == 0
    result = json.loads(out.read_text())["results"][0]
    assert result["label"] == "hand" and result["num_gt"] == 3
    assert result["detections"] == {"correct": 2, "duplicate": 1, "wrong_class_same_group": 1,
                                    "wrong_class_other_group": 1, "background": 1}
    # A: class 1 wins (class 2 close behind); B: class 3 wins (same group as 2); C: class 3 wins alone
    assert result["objects"] == {"top_correct": 2, "top_wrong_same_group": 1, "top_wrong_other_group": 0}
    assert result["close_wrong_class"] == 1 and result["fractions"]["close_wrong_class"] == 0.5
    assert result["fractions"]["correct"] == pytest.approx(2 / 6)
    printed = capsys.readouterr().out
    assert "hand" in printed and "wrong_class_other_group" in printed


def test_top_budget_and_iou_threshold_change_the_counts(tmp_path):
    gt, pred = write_inputs(tmp_path)
    out = tmp_path / "e.json"
    assert main([f"gt={gt}", f"predictions={pred}", "edges=10", "top=1", f"out={out}"]) == 0
    detections = json.loads(out.read_text())["results"][0]["detections"]
    assert detections == {"correct": 2, "duplicate": 0, "wrong_class_same_group": 0,
                          "wrong_class_other_group": 0, "background": 1}  # image 1: 0.9, 0.87; image 2: 0.7
    assert main([f"gt={gt}", f"predictions={pred}", "edges=10", "top=2", "iou=0.99", f"out={out}"]) == 0
    assert json.loads(out.read_text())["results"][0]["detections"]["duplicate"] == 0  # 0.95 IoU: now background


def test_iou_of_xywh_boxes():
    iou = box_iou_xywh(np.array([A, [5, 0, 10, 10], [0, 0, 0, 0]], float), np.array([A, [0, 0, 0, 0]], float))
    np.testing.assert_allclose(iou, [[1.0, 0.0], [50 / 150, 0.0], [0.0, 0.0]])


def test_bad_arguments_and_inputs(tmp_path, capsys):
    gt, pred = write_inputs(tmp_path)
    assert main([f"gt={gt}"]) == 2
    assert main([f"gt={gt}", f"predictions={pred}", "iou=2"]) == 2
    assert main([f"gt={gt}", f"predictions={pred}", "label=a", "label=b"]) == 2
    assert main([f"gt={gt}", f"predictions={pred}", "colour=red"]) == 2
    assert main([f"gt={gt}", f"predictions={tmp_path / 'missing.json'}"]) == 1
    (tmp_path / "bad.json").write_text(json.dumps([{"image_id": 9, "category_id": 1, "bbox": A, "score": 0.5}]))
    assert main([f"gt={gt}", f"predictions={tmp_path / 'bad.json'}"]) == 1
    assert "image" in capsys.readouterr().err
