"""The annotation index (stepwise.data.annotation_index) and its readers give what the json.load path gave:
dataset targets, category map, RFS factors and report, replay-set files, ground truth for evaluation; bad
input names the file, annotation, image and key and writes nothing; no polygon is kept.

The references below are the former json.load-based implementations, kept here verbatim in substance."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

from stepwise.data.annotation_index import AnnotationFileError, AnnotationIndex, PackedStrings, Ragged, clear_cache
from stepwise.data.categories import CategoryMap
from stepwise.data.lvis_dataset import DataWarning, LVISDetection
from stepwise.data.samplers import (GroupRule, ImageClasses, group_names, image_repeat_factors,
                                    repeat_factor_report, repeat_factors_from_dataset, stepwise_class_factors)
from stepwise.data.smooth_tail import subset_annotations, write_replay_set, write_replay_set_file


@pytest.fixture(scope="module")
def tiny_train(tmp_path_factory) -> dict:
    """The built-in ``tiny`` preset's training annotations (158 images, 531 boxes, 10 classes)."""
    from stepwise.data.synthetic import generate

    root = tmp_path_factory.mktemp("tiny")
    generate(root, "tiny", 0, workers=1, verbose=False)
    return json.loads((root / "annotations" / "train.json").read_text())


def edge_cases(data: dict, seed: int = 0) -> dict:
    """``data`` with what the readers treat specially: annotations shuffled (not grouped by image), crowd,
    ignore, degenerate and outside boxes, integer boxes, an image without size, one without boxes."""
    data = json.loads(json.dumps(data))
    rng = np.random.default_rng(seed)
    anns = [data["annotations"][k] for k in rng.permutation(len(data["annotations"]))]
    for k, ann in enumerate(anns):
        if k % 17 == 3:
            ann["iscrowd"] = 1
        elif k % 17 == 5:
            ann["iscrowd"] = 0
        if k % 13 == 7:
            ann["ignore"] = 1
        if k % 29 == 11:
            ann["bbox"][2] = 0.0  # degenerate
        if k % 31 == 2:
            ann["bbox"] = [int(v) for v in ann["bbox"]]
    sizes = {img["id"]: img for img in data["images"]}
    anns[1]["bbox"][0] = sizes[anns[1]["image_id"]]["width"] + 5.0  # entirely outside
    anns[2]["bbox"][:2] = [-anns[2]["bbox"][2], 1.0]  # ends at the left edge: outside
    del data["images"][3]["height"]  # no size: nothing is dropped as outside
    data["images"].append({**data["images"][0], "id": 99_999})  # no boxes
    data["annotations"] = anns
    return data


def write(tmp_path: Path, data: dict, name: str = "ann.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


# ------------------------------------------------------------------- references: the json.load code
def reference_targets(data: dict, categories: CategoryMap) -> list[tuple[list, list]]:
    """Per image (real, ignored) lists of (ann_id, label, [x, y, w, h]) as LVISDetection kept them."""
    sizes = {img["id"]: (int(img["height"]), int(img["width"])) for img in data["images"]
             if "height" in img and "width" in img}
    real, ignored = defaultdict(list), defaultdict(list)
    for ann in data["annotations"]:
        bbox = ann["bbox"]
        if ann.get("iscrowd", 0) or bbox[2] <= 0 or bbox[3] <= 0:
            continue
        size = sizes.get(ann["image_id"])
        if size is not None and (bbox[0] >= size[1] or bbox[1] >= size[0] or bbox[0] + bbox[2] <= 0
                                 or bbox[1] + bbox[3] <= 0):
            continue
        entry = (int(ann["id"]), categories.index(ann["category_id"]), [float(v) for v in bbox])
        (ignored if ann.get("ignore", 0) else real)[ann["image_id"]].append(entry)
    return [(real[img["id"]], ignored[img["id"]]) for img in data["images"]]


def reference_generic_factors(classes: list[set[int]], threshold: float) -> torch.Tensor:
    images_with: dict[int, int] = {}
    for cs in classes:
        for c in cs:
            images_with[c] = images_with.get(c, 0) + 1
    factor = {c: max(1.0, math.sqrt(threshold / (n / len(classes)))) for c, n in images_with.items()}
    return torch.tensor([max((factor[c] for c in cs), default=1.0) for cs in classes], dtype=torch.float64)


def reference_report(classes, factors, r, group, names, epoch_length=None) -> list[dict]:
    """The per-group part of repeat_factor_report, image by image."""
    factors = factors.double().numpy()
    repeated = float(factors.sum())
    epoch = repeated if epoch_length is None else float(epoch_length)
    groups = [{"group": name, "classes": int((group == g).sum()), "images": 0, "repeated_images": 0,
               "samples_per_epoch": 0.0, "uniform_samples_per_epoch": 0.0} for g, name in enumerate(names)]
    for cs, factor in zip(classes, factors):
        cs = sorted(set(cs))
        if not cs:
            continue
        g = groups[int(group[cs[int(np.argmax([r[c] for c in cs]))]])]
        g["images"] += 1
        g["repeated_images"] += int(factor > 1)
        g["samples_per_epoch"] += float(factor) * epoch / max(repeated, 1e-12)
        g["uniform_samples_per_epoch"] += epoch / max(len(factors), 1)
    for g in groups:
        g["samples_per_epoch"] = round(g["samples_per_epoch"], 3)
        g["uniform_samples_per_epoch"] = round(g["uniform_samples_per_epoch"], 3)
    return groups


# ------------------------------------------------------------------------------- equality with json.load
def test_dataset_targets_equal_the_json_load_path(tiny_train, tmp_path):
    data = edge_cases(tiny_train)
    with pytest.warns(DataWarning):
        ds = LVISDetection(write(tmp_path, data), tmp_path / "images")
    categories = CategoryMap.from_annotations(data)
    assert ds.categories == categories
    expected = reference_targets(data, categories)
    assert ds.image_ids == [img["id"] for img in data["images"]]
    assert ds.num_boxes == sum(len(real) for real, _ in expected)
    assert ds.num_ignored == sum(len(ign) for _, ign in expected) > 0
    assert ds.num_crowd_skipped == sum(1 for a in data["annotations"] if a.get("iscrowd")) > 0
    assert ds.num_outside_dropped >= 2 and ds.num_degenerate_dropped > 0
    for k, (real, ignored) in enumerate(expected):
        target = ds.raw_target(k, (50, 60))
        entries = real + ignored
        xywh = torch.tensor([b for _, _, b in entries], dtype=torch.float32).reshape(-1, 4)
        assert torch.equal(target["boxes"].as_subclass(torch.Tensor),
                           torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1))
        assert target["labels"].tolist() == [label for _, label, _ in entries]
        assert target["ann_ids"].tolist() == [a for a, _, _ in entries]
        assert target["labels"].dtype == target["ann_ids"].dtype == torch.long
        assert target["ignore"].tolist() == [False] * len(real) + [True] * len(ignored)
        assert target["image_id"] == data["images"][k]["id"]
        assert ds.image_classes(k) == {label for _, label, _ in real}
    assert ds.expected_size(3) is None and ds.expected_size(0) == (data["images"][0]["height"],
                                                                   data["images"][0]["width"])


@pytest.mark.parametrize("counted", [False, True])
def test_category_map_equals_the_json_load_path(tiny_train, tmp_path, counted):
    data = edge_cases(tiny_train)
    if counted:  # one category without counts: every count comes from the (non-crowd) annotations
        del data["categories"][4]["image_count"]
        data["categories"] = data["categories"][::-1]
    index = AnnotationIndex.read(write(tmp_path, data))
    assert CategoryMap.from_index(index) == CategoryMap.from_annotations(data)
    if counted:
        assert CategoryMap.from_index(index).image_counts != tuple(
            c["image_count"] for c in sorted(tiny_train["categories"], key=lambda c: c["id"]))


def test_repeat_factors_and_report_equal_the_image_by_image_code(tiny_train, tmp_path):
    data = edge_cases(tiny_train)
    with pytest.warns(DataWarning):
        ds = LVISDetection(write(tmp_path, data), tmp_path / "images")
    classes = [ds.image_classes(i) for i in range(len(ds))]
    table = ds.class_table()
    assert isinstance(table, ImageClasses) and [set(table.labels[a:b].tolist()) for a, b in
                                                zip(table.offsets[:-1], table.offsets[1:])] == classes
    assert torch.equal(repeat_factors_from_dataset(ds, 0.05), reference_generic_factors(classes, 0.05))
    rules = GroupRule.parse([{"max_images": 20, "threshold": 0.3, "power": 0.5},
                             {"max_images": 40, "threshold": 0.2, "power": 0.3}])
    counts = ds.categories.image_counts
    f, r, group = stepwise_class_factors(table, counts, rules)
    f_ref, r_ref, group_ref = stepwise_class_factors(classes, counts, rules)
    assert np.array_equal(f, f_ref) and np.array_equal(r, r_ref) and np.array_equal(group, group_ref)
    for rounding in ("ceil", "stochastic"):
        factors = image_repeat_factors(table, r, rounding)
        assert torch.equal(factors, image_repeat_factors(classes, r, rounding))
        assert torch.equal(factors, torch.tensor([max((r[c] for c in cs), default=1.0) if rounding != "ceil" else
                                                  math.ceil(max((r[c] for c in cs), default=1.0) - 1e-12)
                                                  for cs in classes], dtype=torch.float64))
    assert factors.max() > 1  # the rules over-sample something here
    factors = image_repeat_factors(table, r, "ceil")
    for epoch_length in (None, len(ds)):
        report = repeat_factor_report(table, factors, f, r, group, group_names(rules), ds.categories.ids, counts,
                                      epoch_length)
        assert report["groups"] == reference_report(classes, factors, r, group, group_names(rules), epoch_length)


@pytest.mark.parametrize("keep_others", [False, True])
def test_replay_set_file_equals_the_dict_writer(tiny_train, tmp_path, keep_others):
    data = edge_cases(tiny_train)
    data["annotations"][0]["ignore"] = 1  # selected and already an ignore box in the source
    data["annotations"][0]["segmentation"] = [[0.1, 2e-7, 1e300, 3.0]]  # numbers copied byte for byte
    source = write(tmp_path, data)
    index = AnnotationIndex.read(source)
    chosen = [a["id"] for a in data["annotations"][::7]]
    counts = write_replay_set_file(source, index, chosen, tmp_path / "new.json", keep_others)
    assert counts == write_replay_set(data, chosen, tmp_path / "old.json", keep_others)
    new = json.loads((tmp_path / "new.json").read_text())
    assert new == subset_annotations(data, chosen, keep_others) == json.loads((tmp_path / "old.json").read_text())
    assert list(new) == list(json.loads((tmp_path / "old.json").read_text()))  # key order too
    assert counts["ignored"] > (0 if keep_others else 0) and counts["images"] < len(data["images"])
    with pytest.raises(ValueError, match=r"1 selected annotation ids are not in the training file .*\[123456789\]"):
        write_replay_set_file(source, index, chosen + [123456789], tmp_path / "x.json", keep_others)
    assert not (tmp_path / "x.json").exists()


def test_ground_truth_for_evaluation_equals_the_box_reader(tiny_train, tmp_path):
    from stepwise.evaluation import evaluate_lvis
    from stepwise.evaluation.gt_file import read_box_annotations
    from stepwise.evaluation.inputs import read_gt_file, training_instance_counts

    data = edge_cases(tiny_train)
    data["images"][5]["not_exhaustive_category_ids"] = [3, 1]
    path = write(tmp_path, data)
    from_index, from_msgspec = read_gt_file(path), read_box_annotations(path)
    assert from_index["annotations"] == from_msgspec["annotations"]
    assert from_index["categories"] == from_msgspec["categories"]
    keys = ("id", "height", "width", "coco_url", "neg_category_ids", "not_exhaustive_category_ids")
    sized = [{k: img[k] for k in keys if k in img and (k not in ("height", "width") or "height" in img)}
             for img in from_msgspec["images"]]  # height and width kept when both are given
    assert from_index["images"] == sized and "width" not in from_index["images"][3]
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "score": 0.5 + (k % 5) / 10,
             "bbox": [v + (k % 3) for v in a["bbox"]]} for k, a in enumerate(data["annotations"][::3])]
    assert evaluate_lvis(path, dets, evaluator="lvis").metrics == evaluate_lvis(data, dets, evaluator="lvis").metrics
    # the training counts come from the index this process holds (no second read of the file)
    counts, _ = training_instance_counts(from_index, path)
    assert counts == {c["id"]: sum(a["category_id"] == c["id"] for a in data["annotations"]) for c in data["categories"]}


# ------------------------------------------------------------------------------- memory and the cache
def test_no_polygon_and_no_python_object_per_annotation(tiny_train, tmp_path):
    data = edge_cases(tiny_train)
    for ann in data["annotations"]:
        ann["segmentation"] = [[float(v) for v in range(400)]]  # ~2 KB of polygon per box
    path = write(tmp_path, data)
    index = AnnotationIndex.read(path)
    with pytest.warns(DataWarning):
        ds = LVISDetection(path, tmp_path / "images")
    n = len(data["annotations"])
    arrays = 0
    for value in list(vars(index).values()) + list(vars(ds).values()):
        if isinstance(value, (PackedStrings, Ragged)):
            value = vars(value)
        if isinstance(value, dict) and all(isinstance(v, np.ndarray) for v in value.values()):
            arrays += sum(v.nbytes for v in value.values())
        elif isinstance(value, np.ndarray):
            arrays += value.nbytes
        elif isinstance(value, (list, tuple, dict)):  # Python containers: per image or per category only
            assert len(value) <= len(data["images"]), type(value)
            assert "segmentation" not in json.dumps(value, default=str)
    assert arrays < 200 * n < path.stat().st_size / 10  # ~170 bytes per box (images included), ~3 KB in the file
    assert all("segmentation" not in a for a in read_gt_annotations(path))


def read_gt_annotations(path):
    from stepwise.evaluation.inputs import read_gt_file

    return read_gt_file(path)["annotations"]


def test_read_once_per_file_and_again_when_it_changes(tiny_train, tmp_path):
    path = write(tmp_path, tiny_train)
    first = AnnotationIndex.read(path)
    assert AnnotationIndex.read(str(path)) is first and AnnotationIndex.cached(path) is first
    assert LVISDetection(path, tmp_path).index is first
    changed = dict(tiny_train, annotations=tiny_train["annotations"][:10])
    write(tmp_path, changed)
    again = AnnotationIndex.read(path)
    assert again is not first and again.num_annotations == 10
    clear_cache()
    assert AnnotationIndex.cached(path) is None


# ----------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("break_it,message", [
    (lambda a: a["bbox"].__setitem__(2, "12.5"), r"annotation {id} has an invalid bbox \[.*'12.5'.*\] \(expected 4 finite "
                                                 r"numbers x, y, w, h\) in image {image}$"),
    (lambda a: a.pop("category_id"), r"annotation {id} lacks one of 'id', 'image_id', 'category_id', 'bbox' in "
                                     r"image {image}$"),
    (lambda a: a.__setitem__("category_id", 4242), r"annotation {id} refers to category_id 4242, which does not "
                                                   r"exist in image {image}$"),
    (lambda a: a.__setitem__("id", "x7"), r"annotation x7 has a non-integer id 'x7' in image {image}$"),
])
def test_one_broken_annotation_in_the_middle_is_named_and_nothing_is_written(tiny_train, tmp_path, break_it,
                                                                             message):
    from stepwise.config import load_config
    from stepwise.stages.select import build_replay_sets

    data = json.loads(json.dumps(tiny_train))
    broken = data["annotations"][len(data["annotations"]) // 2]
    ann_id, image_id = broken["id"], broken["image_id"]
    break_it(broken)
    path = write(tmp_path, data, "train.json")
    expected = f"annotation file {path}: " + message.format(id=ann_id, image=image_id)
    with pytest.raises(AnnotationFileError, match=expected.replace("/", "\\/")):
        AnnotationIndex.read(path)
    with pytest.raises(ValueError, match=expected.replace("/", "\\/")):
        LVISDetection(path, tmp_path)
    out = tmp_path / "select"
    out.mkdir()
    (out / "d_head.json").write_text("previous")
    scores = tmp_path / "scores.jsonl"
    scores.write_text("".join(json.dumps({"ann_id": a["id"], "image_id": a["image_id"], "label": 0, "score": 0.9,
                                          "iou": 0.5}) + "\n" for a in tiny_train["annotations"]))
    with pytest.raises(ValueError, match=expected.replace("/", "\\/")):
        build_replay_sets(load_config([f"data.train_ann={path}"]), scores, out)
    assert [p.name for p in out.iterdir()] == ["d_head.json"] and (out / "d_head.json").read_text() == "previous"


@pytest.mark.parametrize("text,error,message", [
    ('{"images": [], "annotations": [', ValueError, r"ann.json is not valid JSON"),
    ('{"images": [], "annotations": {}, "categories": []}', AnnotationFileError, r"missing or non-list key 'annotations'"),
    ('{"images": [{"id": 1}, {"id": 1}], "annotations": [], "categories": []}', AnnotationFileError,
     r"image id 1 appears more than once"),
    ('{"images": [], "annotations": [], "categories": [{"id": 2}, {"id": 2}]}', AnnotationFileError,
     r"category id 2 appears more than once"),
    ('{"images": [{"id": 1, "neg_category_ids": [1, "a"]}], "annotations": [], "categories": []}',
     AnnotationFileError, r"image 1 has a non-integer entry in 'neg_category_ids'"),
    ('{"images": [{"id": 1}], "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, NaN, 1]}], '
     '"categories": [{"id": 1}]}', AnnotationFileError, r"annotation 1 has an invalid bbox \[0, 0, nan, 1\]"),
])
def test_bad_files_are_named(tmp_path, text, error, message):
    path = tmp_path / "ann.json"
    path.write_text(text)
    with pytest.raises(error, match=message):
        AnnotationIndex.read(path)


def test_from_dict_and_empty_file(tmp_path):
    index = AnnotationIndex.from_dict({"images": [{"id": 5, "file_name": "a.jpg"}], "annotations": [],
                                       "categories": [{"id": 3, "name": "x"}]})
    assert index.image_entry(0) == {"id": 5, "file_name": "a.jpg"} and index.num_annotations == 0
    assert index.image_rows(0).tolist() == [] and index.category_ids.tolist() == [3]
    (tmp_path / "empty.json").write_text("")
    with pytest.raises(ValueError, match="empty.json is not valid JSON"):
        AnnotationIndex.read(tmp_path / "empty.json")
