"""LVIS evaluation: hand-computed metrics, federated rules, evaluator equivalence, CLI, bad input."""

from __future__ import annotations

import copy
import csv
import json
import math

import numpy as np
import pytest

from stepwise.evaluate import main
from stepwise.evaluation import EvalReport, choose_evaluator, evaluate_lvis, instance_bin
from stepwise.evaluation.backends import empty_precision, run_hotcoco, run_lvis_api
from stepwise.evaluation.detections import Detections
from stepwise.evaluation.lvis_compat import LVISEval, LVISResults, lvis_from_dict
from stepwise.evaluation.random_cases import make_eval_arrays, make_eval_case

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf", "AP1", "AP2", "AP3", "AP4")

# ---------------------------------------------------------------------------------------------------
# Hand-made case. Images are 100x100; every box is 40x40 (area 1600: "medium"), at P=[0,0,40,40] or
# Q=[50,50,40,40], so a detection's IoU with a GT box is exactly 1 or 0 and AP is the same at every
# IoU threshold: AP = AP50 = AP75 = APm, and APs = APl = None (no small or large GT anywhere).
#
# category  frequency  train instances (gt's instance_count)  BAGS bin
#   1 apple   f          1000                                  4   (1000 is the lower edge of bin 4)
#   2 bird    c           100                                  3   (100 -> bin 3)
#   3 cup     r             9                                  1
#   4 drum    c            10                                  2   (10 -> bin 2)
#   5 eel     r            99                                  2   (no GT in this set: AP -1 -> excluded)
#
# image  GT (cat: box)     neg_category_ids  not_exhaustive_category_ids
#   1     1:P, 3:Q          [2]               []
#   2     1:P, 4:Q          [3]               [4]
#   3     2:P               [1, 5]            []
P, Q = [0.0, 0.0, 40.0, 40.0], [50.0, 50.0, 40.0, 40.0]


def hand_gt() -> dict:
    cats = [(1, "apple", "f", 1000), (2, "bird", "c", 100), (3, "cup", "r", 9), (4, "drum", "c", 10), (5, "eel", "r", 99)]
    images = [
        {"id": 1, "width": 100, "height": 100, "neg_category_ids": [2], "not_exhaustive_category_ids": []},
        {"id": 2, "width": 100, "height": 100, "neg_category_ids": [3], "not_exhaustive_category_ids": [4]},
        {"id": 3, "width": 100, "height": 100, "neg_category_ids": [1, 5], "not_exhaustive_category_ids": []},
    ]
    gt_boxes = [(1, 1, P), (1, 3, Q), (2, 1, P), (2, 4, Q), (3, 2, P)]
    anns = [{"id": i + 1, "image_id": img, "category_id": cat, "bbox": list(box), "area": 1600.0}
            for i, (img, cat, box) in enumerate(gt_boxes)]
    return {
        "images": images,
        "annotations": anns,
        "categories": [{"id": i, "name": n, "frequency": f, "instance_count": c, "image_count": 1} for i, n, f, c in cats],
    }


def det(img, cat, box, score):
    return {"image_id": img, "category_id": cat, "bbox": list(box), "score": score}


# AP per category (LVIS: detections sorted by score, precision made non-increasing from the right,
# read at 101 recall points 0, 0.01, ..., 1 at the first detection reaching that recall, 0 if never):
HAND_DETS = [
    # cat 1 (2 GT): TP 0.9 (img1), FP 0.8 (img3 lists cat 1 as negative), TP 0.7 (img2).
    #   recall 0.5, 0.5, 1; precision 1, 1/2, 2/3 -> non-increasing 1, 2/3, 2/3.
    #   51 recall points (0..0.50) read 1, 50 points (0.51..1) read 2/3: AP = (51 + 50*2/3)/101 = 253/303.
    det(1, 1, P, 0.9), det(3, 1, Q, 0.8), det(2, 1, P, 0.7),
    # cat 2 (1 GT): FP 0.95 (img1 lists cat 2 as negative), then TP 0.6.
    #   recall 0, 1; precision 0, 1/2 -> 1/2, 1/2: AP = 0.5.
    det(1, 2, Q, 0.95), det(3, 2, P, 0.6),
    # cat 3 (1 GT): 0.99 on img3, where cat 3 is neither present nor negative -> dropped (federated);
    #   TP 0.5: AP = 1.0 (it would be 0.5 without the federated rule).
    det(3, 3, P, 0.99), det(1, 3, Q, 0.5),
    # cat 4 (1 GT): 0.95 on img1 (cat 4 unlisted there) -> dropped; 0.9 on img2 misses, but cat 4 is
    #   not exhaustively annotated in img2 -> that false positive is ignored; TP 0.4: AP = 1.0
    #   (0.5 without the not-exhaustive rule).
    det(1, 4, Q, 0.95), det(2, 4, P, 0.9), det(2, 4, Q, 0.4),
    # cat 5: no GT in the set, so only a false positive (img3 lists it as negative): AP -1 (no valid AP).
    det(3, 5, P, 0.3),
]
AP1 = 253 / 303


def test_hand_made_case_matches_hand_computed_values():
    report = evaluate_lvis(hand_gt(), copy.deepcopy(HAND_DETS))
    m = report.metrics
    expected_ap = (AP1 + 0.5 + 1.0 + 1.0) / 4  # cat 5 has no valid AP and is left out
    for key in ("AP", "AP50", "AP75", "APm"):
        assert m[key] == pytest.approx(expected_ap, abs=1e-12), key
    assert m["APs"] is None and m["APl"] is None
    assert m["APr"] == pytest.approx(1.0)  # cat 3 (cat 5 excluded)
    assert m["APc"] == pytest.approx((0.5 + 1.0) / 2)  # cats 2, 4
    assert m["APf"] == pytest.approx(AP1)  # cat 1
    # Bins from instance_count: bin1 = {3}, bin2 = {4, 5 (no AP)}, bin3 = {2}, bin4 = {1}.
    assert m["AP1"] == pytest.approx(1.0)
    assert m["AP2"] == pytest.approx(1.0)
    assert m["AP3"] == pytest.approx(0.5)
    assert m["AP4"] == pytest.approx(AP1)
    rows = {r.id: r for r in report.per_class}
    assert [rows[i].bin for i in range(1, 6)] == [4, 3, 1, 2, 2]
    assert rows[1].ap == pytest.approx(AP1) and rows[2].ap == pytest.approx(0.5)
    assert rows[3].ap == pytest.approx(1.0) and rows[4].ap == pytest.approx(1.0) and rows[5].ap is None
    assert (rows[1].name, rows[1].frequency, rows[1].train_instances) == ("apple", "f", 1000)
    assert report.meta["instance_counts_from"].startswith("'instance_count'")


def test_both_evaluators_agree_on_hand_case_and_with_lvis_api_summary():
    lvis = evaluate_lvis(hand_gt(), copy.deepcopy(HAND_DETS), evaluator="lvis")
    fast = evaluate_lvis(hand_gt(), copy.deepcopy(HAND_DETS), evaluator="hotcoco")
    for key in METRICS:
        assert (lvis.metrics[key] is None) == (fast.metrics[key] is None), key
        if lvis.metrics[key] is not None:
            assert fast.metrics[key] == pytest.approx(lvis.metrics[key], abs=1e-12), key


def test_federated_rules_change_the_result_when_removed():
    # Same detections, but every category listed as negative in every image and nothing marked
    # non-exhaustive: now the dropped/ignored false positives count. Cat 3: FP 0.99, TP 0.5 -> 1/2;
    # cat 4: FP 0.95 (img1), FP 0.9 (img2), TP 0.4 -> precision 1/3 at every recall point.
    gt = hand_gt()
    for img in gt["images"]:
        present = {a["category_id"] for a in gt["annotations"] if a["image_id"] == img["id"]}
        img["neg_category_ids"] = [c for c in range(1, 6) if c not in present]
        img["not_exhaustive_category_ids"] = []
    rows = {r.id: r.ap for r in evaluate_lvis(gt, copy.deepcopy(HAND_DETS)).per_class}
    assert rows[3] == pytest.approx(0.5) and rows[4] == pytest.approx(1 / 3)


def test_train_gt_counts_and_empty_bin_printed_as_dash(tmp_path):
    # Training counts from train_gt: cat1 12 (bin 2), cat2 2 (bin 1), cat3 0 (bin 1), cat4 150 (bin 3),
    # cat5 0 (bin 1, no AP). AP1 = mean(cat2 0.5, cat3 1.0), AP2 = cat1, AP3 = cat4, AP4 = empty -> None.
    train = {"annotations": [{"id": i, "category_id": c} for i, c in enumerate([1] * 12 + [2] * 2 + [4] * 150)]}
    report = evaluate_lvis(hand_gt(), copy.deepcopy(HAND_DETS), train_gt=train)
    m = report.metrics
    assert m["AP1"] == pytest.approx(0.75) and m["AP2"] == pytest.approx(AP1) and m["AP3"] == pytest.approx(1.0)
    assert m["AP4"] is None
    last_value = report.table().splitlines()[1].split()[-1]
    assert last_value == "-"
    report.save(tmp_path)
    assert json.loads((tmp_path / "metrics.json").read_text())["AP4"] is None


def test_instance_bin_boundaries_follow_bags():
    # BAGS eq. 3: s_n^l <= N < s_n^h with edges 0, 10, 100, 1000, inf.
    assert [instance_bin(n) for n in (0, 9, 10, 99, 100, 999, 1000, 10**6)] == [1, 1, 2, 2, 3, 3, 4, 4]


def test_perfect_predictions_score_one():
    gt, _ = make_eval_case(num_images=60, num_categories=30, dets_per_image=1, seed=3)
    dets = [det(a["image_id"], a["category_id"], a["bbox"], 1.0) for a in gt["annotations"]]
    report = evaluate_lvis(gt, dets)
    for key in METRICS:
        assert report.metrics[key] is None or report.metrics[key] == pytest.approx(1.0), key
    assert report.metrics["AP"] == pytest.approx(1.0)
    assert all(r.ap is None or r.ap == pytest.approx(1.0) for r in report.per_class)


def federated_case(max_dets: int) -> tuple[dict, Detections]:
    """A synthetic case with every rule the LVIS API applies, each checked to be present below.

    150 images x 80 detections (``make_eval_arrays``: noisy copies of GT, wrong classes, random boxes of
    positive, negative and unlisted categories, non-exhaustive categories, scores rounded to 3 decimals)
    plus 5 images without any GT box (only negative categories: every detection there is dropped or a
    false positive) and 3 categories without GT: one nobody detects, one detected only on images that
    list it as negative or not at all, one without GT or detections whose frequency is "f".
    """
    gt, dets = make_eval_arrays(num_images=150, num_categories=40, dets_per_image=80, seed=11)
    base_cats = [c["id"] for c in gt["categories"]]
    e1, e2, e3 = (max(base_cats) + k for k in (1, 2, 3))
    gt["categories"] += [{"id": e, "name": f"empty_{e}", "frequency": f, "instance_count": n, "image_count": 1}
                         for e, f, n in ((e1, "r", 3), (e2, "c", 40), (e3, "f", 5000))]
    rng = np.random.default_rng(5)
    extra_img, extra_cat, extra_box, extra_score = [], [], [], []
    for img_id in range(151, 156):
        neg = [e2, *map(int, rng.choice(base_cats, 3, replace=False))]
        gt["images"].append({"id": img_id, "width": 640, "height": 480, "neg_category_ids": neg,
                             "not_exhaustive_category_ids": []})
        for _ in range(30):  # negatives (false positives) and unlisted categories (dropped)
            extra_img.append(img_id)
            extra_cat.append(int(rng.choice(neg)) if rng.random() < 0.5 else int(rng.choice(base_cats)))
            extra_box.append([float(v) for v in np.round(rng.uniform([0, 0, 5, 5], [300, 200, 300, 250]), 2)])
            extra_score.append(round(float(rng.random()), 2))
    on_gt_images = rng.choice(150, 40) + 1  # e2 detected where it is unlisted: dropped
    extra_img += on_gt_images.tolist()
    extra_cat += [e2] * 40
    extra_box += [[10.0, 10.0, 50.0, 50.0]] * 40
    extra_score += [0.9] * 40
    dets = Detections.concat([dets, Detections.from_columns(extra_img, extra_cat, extra_box, extra_score)])
    return gt, dets


@pytest.mark.parametrize("max_dets", [300, 20])
def test_default_evaluator_equals_lvis_api_on_every_federated_rule(max_dets):
    gt, dets = federated_case(max_dets)
    # The case holds every rule (so that this test would catch an evaluator that got one wrong):
    img = {im["id"]: im for im in gt["images"]}
    gt_cats = {(a["image_id"], a["category_id"]) for a in gt["annotations"]}
    pairs = list(zip(dets.image_id.tolist(), dets.category_id.tolist()))
    neg = [c in img[i]["neg_category_ids"] for i, c in pairs]
    not_exh = [c in img[i]["not_exhaustive_category_ids"] for i, c in pairs]
    unlisted = [(i, c) not in gt_cats and c not in img[i]["neg_category_ids"] for i, c in pairs]
    assert sum(neg) > 100 and sum(not_exh) > 100 and sum(unlisted) > 100
    keys = np.stack([dets.image_id, dets.category_id, np.round(dets.score * 1000)], 1)
    assert len(np.unique(keys, axis=0)) < len(keys)  # tied scores within an (image, category)
    areas = np.array([a["area"] for a in gt["annotations"]])
    assert (areas < 32**2).any() and ((areas >= 32**2) & (areas < 96**2)).any() and (areas >= 96**2).any()
    per_image = np.bincount(dets.image_id)
    if max_dets < 80:
        assert (per_image > max_dets).any()  # the per-image cut, with ties at the cut

    ref = evaluate_lvis(gt, dets, max_dets=max_dets, evaluator="lvis")
    new = evaluate_lvis(gt, dets, max_dets=max_dets)
    assert new.meta["evaluator"] == "hotcoco" and ref.meta["evaluator"] == "lvis"
    for key in METRICS:
        assert ref.metrics[key] is not None, key  # every area range, frequency and instance bin populated
        assert abs(new.metrics[key] - ref.metrics[key]) <= 1e-9, key
    assert [r.id for r in new.per_class] == [r.id for r in ref.per_class]
    for a, b in zip(new.per_class, ref.per_class):
        assert (a.ap is None) == (b.ap is None), a.id
        if a.ap is not None:
            assert abs(a.ap - b.ap) <= 1e-9, a.id
    empty = [r for r in ref.per_class if r.name.startswith("empty_")]
    assert len(empty) == 3 and all(r.ap is None for r in empty)
    assert sum(r.ap is not None for r in ref.per_class) >= 35

    if max_dets == 300:
        # Our summary of the precision array is the LVIS API's own summarize(), value for value.
        lvis_gt = lvis_from_dict(copy.deepcopy(gt))
        ev = LVISEval(lvis_gt, LVISResults(lvis_gt, dets.to_records()), iou_type="bbox")
        ev.run()
        for key in METRICS[:9]:
            assert ref.metrics[key] == pytest.approx(float(ev.results[key]), abs=1e-12), key


def test_crowd_flag_is_disregarded_as_the_lvis_api_does():
    # The LVIS API evaluates an ``iscrowd`` box as an ordinary box; hotcoco gets every box with
    # iscrowd = 0 and must give the same numbers (left to itself it would treat them as crowd regions).
    gt, dets = make_eval_arrays(num_images=60, num_categories=20, dets_per_image=40, seed=2)
    for ann in gt["annotations"][::4]:
        ann["iscrowd"] = 1
    assert choose_evaluator(gt) == "hotcoco"
    np.testing.assert_allclose(run_hotcoco(gt, dets), run_lvis_api(gt, dets), rtol=0, atol=1e-12)


def test_top_k_per_image_keeps_highest_scores():
    dets = Detections.from_records([det(1, 1, P, s) for s in (0.1, 0.9, 0.5)] + [det(2, 1, P, 0.2)])
    kept = dets.top_k(2)
    assert list(zip(kept.image_id.tolist(), kept.score.tolist())) == [(1, 0.9), (1, 0.5), (2, 0.2)]  # file order


def test_top_k_keeps_what_lvis_results_keeps_with_ties():
    # Image 1: six detections with tied scores, cut to 3; the earlier row wins a tie, as in LVISResults.
    scores = [0.5, 0.7, 0.5, 0.7, 0.5, 0.9]
    records = [det(1, 1 + k % 2, [k, k, 10.0, 10.0], s) for k, s in enumerate(scores)] + [det(2, 1, P, 0.1)]
    lvis_gt = lvis_from_dict(hand_gt())
    expected = LVISResults(lvis_gt, copy.deepcopy(records), max_dets=3).dataset["annotations"]
    kept = Detections.from_records(records).top_k(3)
    assert sorted((d["image_id"], d["bbox"][0], d["score"]) for d in expected) == sorted(
        zip(kept.image_id.tolist(), kept.bbox[:, 0].tolist(), kept.score.tolist()))
    assert kept.bbox[:, 0].tolist() == [1.0, 3.0, 5.0, 0.0]  # 0.7, 0.7, 0.9 of image 1 in file order, then image 2


def test_no_detections_gives_zero_like_lvis_api():
    # A lone detection of an unlisted category is dropped by the LVIS API, which then evaluates nothing.
    gt = hand_gt()
    lone = Detections.from_records([det(3, 3, P, 0.5)])
    np.testing.assert_array_equal(run_lvis_api(gt, lone), empty_precision(gt))
    np.testing.assert_array_equal(run_hotcoco(gt, lone), empty_precision(gt))
    np.testing.assert_array_equal(run_hotcoco(gt, Detections.empty()), empty_precision(gt))
    m = evaluate_lvis(gt, []).metrics
    assert m["AP"] == 0.0 and m["APr"] == 0.0 and m["APs"] is None


def test_auto_falls_back_to_lvis_api_for_ignored_annotations():
    gt = hand_gt()
    gt["annotations"][0]["iscrowd"] = 1
    assert choose_evaluator(gt) == "hotcoco"  # handled exactly (see the crowd test above)
    gt["annotations"][2]["ignore"] = 1
    assert choose_evaluator(gt) == "lvis"
    with pytest.raises(ValueError, match="id 3.*'ignore'"):
        choose_evaluator(gt, "hotcoco")
    with pytest.raises(ValueError, match="replaced by hotcoco"):
        choose_evaluator(gt, "faster")


def test_evaluation_parameters_are_the_lvis_apis():
    from stepwise.evaluation.backends import AREA_LABELS, AREA_RNG, IOU_THRS, REC_THRS
    from stepwise.evaluation.lvis_compat import Params

    params = Params(iou_type="bbox")
    np.testing.assert_array_equal(IOU_THRS, params.iou_thrs)  # bit for bit: summarize() looks 0.5 and 0.75 up by ==
    np.testing.assert_array_equal(REC_THRS, params.rec_thrs)
    assert [list(r) for r in AREA_RNG] == params.area_rng and list(AREA_LABELS) == params.area_rng_lbl


def test_numpy_aliases_restored_only_for_lvis():
    import lvis.eval

    assert lvis.eval.np.float is float
    if tuple(int(v) for v in np.__version__.split(".")[:2]) >= (1, 24):
        assert "float" not in np.__dict__


# --- bad input ----------------------------------------------------------------------------------


def test_unknown_image_or_category_is_an_error_naming_it():
    with pytest.raises(ValueError, match="image_id 99"):
        evaluate_lvis(hand_gt(), [det(99, 1, P, 0.5)])
    with pytest.raises(ValueError, match="category_id 77"):
        evaluate_lvis(hand_gt(), [det(1, 77, P, 0.5)])


@pytest.mark.parametrize("score", ["0.9", True, None])
def test_prediction_score_that_is_not_a_number_is_refused(score):
    with pytest.raises(ValueError, match=r"1 invalid prediction\(s\): prediction #1 \(image 1\): bbox must be 4 "
                                         r"numbers and score a number"):
        evaluate_lvis(hand_gt(), [det(1, 1, P, 0.9), det(1, 1, P, score)])
    with pytest.raises(ValueError, match=r"prediction #0 \(image 1\): bbox must be"):
        evaluate_lvis(hand_gt(), [det(1, 1, [0.0, "1", 40.0, 40.0], 0.5)])


@pytest.mark.parametrize("mutate,message", [
    (lambda gt: gt["images"].append(dict(gt["images"][0])), r"image id 1 appears more than once"),
    (lambda gt: gt["images"].append(7), r"image entry #3 is not an object: 7"),
    (lambda gt: gt["annotations"][0].update(bbox=[0, 0, "40", 40]),
     r"annotation 1: bbox \[0, 0, '40', 40\] is not 4 finite"),
    (lambda gt: gt["annotations"].append([1, 2]), r"annotation entry #5 is not an object"),
    (lambda gt: gt["categories"].append(dict(gt["categories"][0])), r"category id 1 appears more than once"),
])
def test_ground_truth_schema_errors_name_the_item(mutate, message):
    gt = hand_gt()
    mutate(gt)
    with pytest.raises(ValueError, match=message):
        evaluate_lvis(gt, [])


def test_degenerate_box_is_a_counted_warning_and_a_false_positive(caplog):
    dets = copy.deepcopy(HAND_DETS) + [det(3, 2, [5.0, 5.0, 0.0, 10.0], 0.99), det(3, 2, [5.0, 5.0, -3.0, 10.0], 0.98)]
    report = evaluate_lvis(hand_gt(), dets)
    assert report.meta["num_degenerate_boxes"] == 2
    assert any("2 prediction(s) with width or height <= 0" in w and "image 3" in w for w in report.warnings)
    assert "width or height <= 0" in caplog.text
    # cat 2 now has FP 0.99, FP 0.98, FP 0.95, TP 0.6: AP = 1/4 at every recall point.
    assert {r.id: r.ap for r in report.per_class}[2] == pytest.approx(0.25)


def test_degenerate_gt_box_is_a_counted_warning():
    gt = hand_gt()
    gt["annotations"][4]["bbox"] = [0.0, 0.0, 40.0, 0.0]  # cat 2's only GT box: no detection can match it
    report = evaluate_lvis(gt, copy.deepcopy(HAND_DETS))
    assert any("1 GT box(es)" in w and "annotation 5" in w for w in report.warnings)
    assert {r.id: r.ap for r in report.per_class}[2] == 0.0


def test_missing_and_invalid_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        evaluate_lvis(tmp_path / "nope.json", [])
    bad = tmp_path / "preds.json"
    bad.write_text("[{not json")
    with pytest.raises(ValueError, match="preds.json"):
        evaluate_lvis(hand_gt(), bad)


def test_results_file_round_trip_is_exact_and_read_in_pieces(tmp_path, monkeypatch):
    import stepwise.evaluation.inputs as inputs
    from stepwise.evaluation.results_file import write_results

    gt, dets = make_eval_arrays(num_images=40, num_categories=10, dets_per_image=50, seed=4)
    # float32 model outputs: written as the float64 numbers they are, read back bit for bit
    dets = Detections.from_columns(dets.image_id, dets.category_id, (dets.bbox * 1.37).astype(np.float32),
                                   np.float32(dets.score) / 3)
    path = write_results(tmp_path / "predictions.json", dets)
    assert json.loads(path.read_text()) == dets.to_records()  # what json.dump of the dicts would hold
    monkeypatch.setattr(inputs, "READ_BLOCK_BYTES", 4096)  # ~40 pieces
    back = inputs.load_predictions(path, gt, max_dets=300).detections
    for key in ("image_id", "category_id", "bbox", "score"):
        np.testing.assert_array_equal(getattr(back, key), getattr(dets, key))
    # a diverged model's NaN is written as json.dump writes it, and the reader names that prediction
    nan = Detections.from_columns(dets.image_id, dets.category_id, dets.bbox, np.where(np.arange(len(dets)) == 1500, np.nan, dets.score))
    with pytest.raises(ValueError, match=r"1 invalid prediction\(s\): prediction #1500 .*non-finite"):
        inputs.load_predictions(write_results(tmp_path / "nan.json", nan), gt)


def test_default_path_never_builds_a_dict_per_detection(tmp_path, monkeypatch):
    # From a results file to the report, the detections stay columns (only the LVIS API gets dicts).
    from stepwise.evaluation import results_file
    from stepwise.evaluation.results_file import write_results

    gt, dets = make_eval_arrays(num_images=20, num_categories=8, dets_per_image=30, seed=9)
    path = write_results(tmp_path / "predictions.json", dets)
    expected = evaluate_lvis(gt, dets)

    def no_dicts(*args, **kwargs):
        raise AssertionError("per-detection dicts built")

    monkeypatch.setattr(Detections, "to_records", no_dicts)
    monkeypatch.setattr(results_file.json, "loads", no_dicts)  # the typed decoder, never the dict fallback
    report = evaluate_lvis(gt, path)
    assert report.meta["evaluator"] == "hotcoco" and report.metrics == expected.metrics


def test_bad_prediction_deep_in_a_file_is_named_by_its_index(tmp_path, monkeypatch):
    import stepwise.evaluation.inputs as inputs

    gt, dets = make_eval_arrays(num_images=40, num_categories=10, dets_per_image=50, seed=4)
    records = dets.to_records()
    records[1234]["image_id"] = 99999
    records[1500] = {"image_id": 1, "bbox": [0, 0, 1, 1], "score": 0.5}
    records[1700]["score"] = float("nan")
    records[1800]["category_id"] = "cat"
    (tmp_path / "preds.json").write_text(json.dumps(records, indent=1))
    monkeypatch.setattr(inputs, "READ_BLOCK_BYTES", 4096)
    with pytest.raises(ValueError, match="4 invalid") as err:
        evaluate_lvis(gt, tmp_path / "preds.json")
    text = str(err.value)
    assert "preds.json" in text and text.index("#1234") < text.index("#1500") < text.index("#1700") < text.index("#1800")
    assert "image_id 99999" in text and "needs image_id, category_id" in text and "non-finite" in text


def test_gt_file_is_read_without_polygons_and_scores_as_the_dict(tmp_path):
    from stepwise.evaluation.gt_file import read_box_annotations
    from stepwise.evaluation.random_cases import add_polygons

    gt, dets = make_eval_arrays(num_images=30, num_categories=10, dets_per_image=20, seed=6)
    add_polygons(gt, 12)
    gt["annotations"][3]["iscrowd"] = 1
    gt["annotations"][4]["ignore"] = 0
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    read = read_box_annotations(tmp_path / "gt.json")
    assert read["images"] == gt["images"] and read["categories"] == gt["categories"]
    assert read["annotations"] == [{k: v for k, v in a.items() if k != "segmentation"} for a in gt["annotations"]]
    train = {"annotations": [{"id": i, "category_id": c, "segmentation": [[0, 0, 1, 1, 1, 0]]}
                             for i, c in enumerate([gt["categories"][0]["id"]] * 12 + [gt["categories"][2]["id"]] * 3)]}
    (tmp_path / "train.json").write_text(json.dumps(train))
    from_files = evaluate_lvis(tmp_path / "gt.json", dets, train_gt=tmp_path / "train.json")
    from_dicts = evaluate_lvis(gt, dets, train_gt=train)
    assert from_files.metrics == from_dicts.metrics and from_files.per_class == from_dicts.per_class
    assert [r.train_instances for r in from_files.per_class][:3] == [12, 0, 3]


def test_gt_file_of_another_shape_is_named_by_the_full_checks(tmp_path):
    gt = hand_gt()
    del gt["annotations"][2]["bbox"]
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    with pytest.raises(ValueError, match=r"gt.json: 1 invalid annotation\(s\): annotation 3: needs 'id', 'bbox'"):
        evaluate_lvis(tmp_path / "gt.json", [])
    (tmp_path / "train.json").write_text(json.dumps({"annotations": [{"id": 7}]}))
    with pytest.raises(ValueError, match="train.json: annotation 7 has no category_id"):
        evaluate_lvis(hand_gt(), [], train_gt=tmp_path / "train.json")


def test_gt_without_federated_fields_is_an_error_naming_the_image():
    gt = hand_gt()
    del gt["images"][1]["neg_category_ids"]
    with pytest.raises(ValueError, match="image 2 .*neg_category_ids"):
        evaluate_lvis(gt, [])


# --- CLI ----------------------------------------------------------------------------------------


def test_cli_writes_metrics_and_per_class(tmp_path, capsys):
    (tmp_path / "gt.json").write_text(json.dumps(hand_gt()))
    (tmp_path / "preds.json").write_text(json.dumps(HAND_DETS))
    out = tmp_path / "out"
    rc = main([f"gt={tmp_path / 'gt.json'}", f"predictions={tmp_path / 'preds.json'}", f"out={out}"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "APr" in printed and "AP4" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["AP3"] == pytest.approx(0.5) and metrics["meta"]["evaluator"] == "hotcoco"
    with open(out / "per_class.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == ["apple", "bird", "cup", "drum", "eel"]
    assert float(rows[0]["ap"]) == pytest.approx(AP1) and rows[4]["ap"] == ""
    assert rows[0]["train_instances"] == "1000" and rows[0]["frequency"] == "f"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_cli_bad_arguments_and_files(tmp_path, capsys):
    assert main(["gt=a.json", "predictions=b.json", "colour=red"]) == 2
    assert "colour" in capsys.readouterr().err
    assert main(["gt=a.json"]) == 2
    assert main(["predictions"]) == 2
    assert main([f"gt={tmp_path / 'missing_gt.json'}", "predictions=b.json"]) == 1
    assert "missing_gt.json" in capsys.readouterr().err


def test_report_table_formats_none_and_nan():
    report = EvalReport(metrics={"AP": 0.5, "AP1": None, "AP2": math.nan}, per_class=[])
    assert report.table().splitlines()[1].split() == ["50.0", "-", "-"]
