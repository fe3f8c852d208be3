"""LVIS/COCO-format dataset, category map, transforms and collate on hand-written files in tmp_path."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from torchvision import tv_tensors
from PIL import Image
from torchvision.transforms import v2

from stepwise.data import (CategoryMap, DataWarning, ImageBatch, LVISDetection, build_eval_loader,
                           build_train_loader, build_transforms, collate, image_path)
from stepwise.data.transforms import IMAGENET_MEAN, IMAGENET_STD, RandomSizeCrop, finishing_transforms, \
    sanitize_boxes

SMALL = {"train_scales": [48, 56, 64], "max_size": 128, "crop_resize_scales": [40, 48], "crop_min": 24,
         "crop_max": 40, "eval_scale": 50, "batch_size": 2, "num_workers": 0, "rfs_threshold": 0.5}

CATEGORIES = [  # ids deliberately not contiguous
    {"id": 3, "name": "cat", "frequency": "f", "image_count": 2, "instance_count": 3},
    {"id": 7, "name": "dog", "frequency": "r", "image_count": 1, "instance_count": 1},
    {"id": 12, "name": "yak", "frequency": "c", "image_count": 0, "instance_count": 0},
]


def _png(path, h, w, color=(255, 0, 0)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (w, h), color).save(path)


def _lvis_v1(tmp_path):
    """Two images (40x80, 60x30) in train2017 (one a 'val' image, still under train2017) + one with no boxes."""
    _png(tmp_path / "img" / "train2017" / "000000000001.png", 40, 80)
    _png(tmp_path / "img" / "train2017" / "000000000002.png", 60, 30, (0, 255, 0))
    _png(tmp_path / "img" / "train2017" / "000000000005.png", 20, 20)
    images = [
        {"id": 1, "height": 40, "width": 80, "coco_url": "http://images.cocodataset.org/train2017/000000000001.png"},
        {"id": 2, "height": 60, "width": 30, "coco_url": "http://images.cocodataset.org/train2017/000000000002.png"},
        {"id": 5, "height": 20, "width": 20, "coco_url": "http://images.cocodataset.org/train2017/000000000005.png"},
    ]
    annotations = [
        {"id": 10, "image_id": 1, "category_id": 3, "bbox": [8, 4, 16, 20], "area": 320},
        {"id": 11, "image_id": 1, "category_id": 7, "bbox": [40, 10, 30, 20], "area": 600},
        {"id": 12, "image_id": 2, "category_id": 3, "bbox": [0, 0, 10, 10], "area": 100},
        {"id": 13, "image_id": 2, "category_id": 3, "bbox": [5, 30, 20, 25], "area": 500},
    ]
    return {"images": images, "annotations": annotations, "categories": CATEGORIES}


def _write(tmp_path, data, name="ann.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def lvis_v1(tmp_path):
    return _write(tmp_path, _lvis_v1(tmp_path)), tmp_path / "img"


# ---------------------------------------------------------------- paths and categories

def test_image_path_rules():
    v1 = {"id": 1, "coco_url": "http://images.cocodataset.org/train2017/000000391895.jpg"}
    v1_val = {"id": 2, "coco_url": "http://images.cocodataset.org/train2017/000000000139.jpg"}
    v05 = {"id": 3, "file_name": "COCO_val2014_000000397133.jpg", "coco_url": "http://x/val2017/000000397133.jpg"}
    coco = {"id": 4, "file_name": "000000000632.jpg"}
    assert str(image_path(v1, "/r")) == "/r/train2017/000000391895.jpg"
    assert str(image_path(v1_val, "/r")) == "/r/train2017/000000000139.jpg"
    assert str(image_path(v05, "/r/val2017")) == "/r/val2017/000000397133.jpg"
    assert str(image_path(coco, "/r/val2017")) == "/r/val2017/000000000632.jpg"
    with pytest.raises(ValueError, match="image 9: has neither"):
        image_path({"id": 9}, "/r")


@pytest.mark.parametrize("entry,message", [
    ({"id": 7, "file_name": "../outside.png"},
     r"image 7: file_name '../outside.png' leads outside the image root .*\.\. part"),
    ({"id": 8, "file_name": "a/../../outside.png"}, r"image 8: file_name 'a/../../outside.png' leads outside"),
    ({"id": 9, "file_name": "/etc/outside.png"}, r"image 9: file_name '/etc/outside.png' leads outside .*absolute"),
    ({"id": 10, "coco_url": "http://x/train2017/../outside.png"},
     r"image 10: coco_url 'http://x/train2017/../outside.png' leads outside"),
])
def test_image_paths_outside_the_root_are_refused_without_opening(tmp_path, monkeypatch, entry, message):
    _png(tmp_path / "outside.png", 5, 5)  # it exists: the check is on the name, before any file access
    data = {"images": [{**entry, "height": 5, "width": 5}], "annotations": [], "categories": CATEGORIES}
    root = tmp_path / "root" / "images"
    root.mkdir(parents=True)

    def no_open(*args, **kwargs):
        raise AssertionError("an image was opened")

    monkeypatch.setattr(Image, "open", no_open)
    with pytest.raises(ValueError, match=r"ann.json: " + message):
        LVISDetection(_write(tmp_path, data), root)
    with pytest.raises(ValueError, match=message):
        image_path(entry, root)
    assert image_path(entry, root, allow_outside_root=True).name == "outside.png"  # the explicit opt-out


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    import numpy as np

    grey = (np.arange(12 * 20, dtype=np.uint32).reshape(12, 20) * 270).astype(np.uint16)  # 0..64530
    path = tmp_path / "img" / "g16.png"
    path.parent.mkdir()
    Image.fromarray(grey).save(path)
    assert Image.open(path).mode == "I;16"
    data = {"images": [{"id": 1, "file_name": "g16.png", "height": 12, "width": 20}], "annotations": [],
            "categories": CATEGORIES}
    image = LVISDetection(_write(tmp_path, data), tmp_path / "img").load_image(0)
    assert image.shape == (3, 12, 20) and image.dtype == torch.uint8
    expected = torch.from_numpy(((grey.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8))
    assert torch.equal(image[0], expected) and torch.equal(image[1], expected) and torch.equal(image[2], expected)
    assert image[0, 0, 0] == 0 and image[0, 0, 1] == 1 and image[0, -1, -1] == 251  # 270 -> 1, 64530 -> 251


def test_other_pixel_modes(tmp_path):
    import numpy as np

    from stepwise.data.lvis_dataset import to_rgb

    wide = Image.fromarray(np.array([[0, 65535], [257, 70000]], dtype=np.int32))  # mode I
    assert wide.mode == "I"
    with pytest.raises(ValueError, match=r"x.tif has 32-bit integer pixels outside 0..65535 .*0..70000"):
        to_rgb(wide, "x.tif")
    ok = to_rgb(Image.fromarray(np.array([[0, 65535], [257, 32896]], dtype=np.int32)), "y")
    assert np.asarray(ok)[..., 0].tolist() == [[0, 255], [1, 128]]
    with pytest.raises(ValueError, match=r"z.tif has 32-bit float pixels \(mode F\)"):
        to_rgb(Image.fromarray(np.zeros((2, 2), dtype=np.float32)), "z.tif")
    palette = Image.new("P", (2, 2))
    palette.putpalette([10, 20, 30] * 256)
    assert np.asarray(to_rgb(palette, "p"))[0, 0].tolist() == [10, 20, 30]


def test_category_map_from_fields_and_round_trip(lvis_v1):
    ds = LVISDetection(*lvis_v1)
    cats = ds.categories
    assert cats.ids == (3, 7, 12) and cats.names == ("cat", "dog", "yak")
    assert cats.frequencies == ("f", "r", "c") and cats.has_frequency
    assert cats.index(7) == 1 and cats.category_id(2) == 12
    restored = CategoryMap.from_dict(json.loads(json.dumps(cats.to_dict())))
    assert restored == cats and restored.index(12) == 2
    with pytest.raises(KeyError, match="category id 99"):
        cats.index(99)


def test_category_counts_counted_when_absent():
    data = {"categories": [{"id": 2, "name": "b"}, {"id": 1, "name": "a"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1}, {"id": 2, "image_id": 1, "category_id": 1},
                            {"id": 3, "image_id": 2, "category_id": 1},
                            {"id": 4, "image_id": 2, "category_id": 2, "iscrowd": 1}]}
    cats = CategoryMap.from_annotations(data)
    assert cats.ids == (1, 2) and cats.frequencies == (None, None) and not cats.has_frequency
    assert cats.image_counts == (2, 0) and cats.instance_counts == (3, 0)  # the crowd box is not counted


# ---------------------------------------------------------------- targets and transforms

def test_target_format_after_eval_transform(lvis_v1):
    ds = LVISDetection(*lvis_v1, transforms=build_transforms(False, SMALL))
    assert len(ds) == 3 and ds.image_ids == [1, 2, 5]
    image, target = ds[0]
    # 40x80 -> short side 50 -> 50x100 (long side 100 <= max 128)
    assert image.dtype == torch.float32 and tuple(image.shape) == (3, 50, 100) and type(image) is torch.Tensor
    red = torch.tensor([(1 - IMAGENET_MEAN[0]) / IMAGENET_STD[0], -IMAGENET_MEAN[1] / IMAGENET_STD[1],
                        -IMAGENET_MEAN[2] / IMAGENET_STD[2]])
    assert torch.allclose(image[:, 10, 10], red, atol=1e-5)
    # bbox [8, 4, 16, 20] in a 80x40 image: cx=(8+8)/80, cy=(4+10)/40, w=16/80, h=20/40 (scale invariant)
    expected = torch.tensor([[16 / 80, 14 / 40, 16 / 80, 20 / 40], [55 / 80, 20 / 40, 30 / 80, 20 / 40]])
    assert type(target["boxes"]) is torch.Tensor and target["boxes"].dtype == torch.float32
    assert torch.allclose(target["boxes"], expected, atol=1e-5)
    assert target["labels"].tolist() == [0, 1] and target["labels"].dtype == torch.long
    assert target["ann_ids"].tolist() == [10, 11] and target["image_id"] == 1
    assert target["orig_size"].tolist() == [40, 80] and target["size"].tolist() == [50, 100]
    _, empty = ds[2]
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)


def test_image_classes_from_json(lvis_v1):
    ds = LVISDetection(*lvis_v1)
    assert [ds.image_classes(i) for i in range(len(ds))] == [{0, 1}, {0}, set()]


def test_no_transforms_still_normalised_cxcywh(lvis_v1):
    image, target = LVISDetection(*lvis_v1)[1]
    assert tuple(image.shape) == (3, 60, 30)
    assert torch.allclose(target["boxes"][0], torch.tensor([5 / 30, 5 / 60, 10 / 30, 10 / 60]))


def _raw(h=100, w=100, boxes=((0, 0, 10, 10), (90, 0, 100, 10), (0, 90, 10, 100), (90, 90, 100, 100))):
    image = tv_tensors.Image(torch.zeros(3, h, w, dtype=torch.uint8))
    n = len(boxes)
    target = {"boxes": tv_tensors.BoundingBoxes(torch.tensor(boxes, dtype=torch.float32), format="XYXY",
                                                canvas_size=(h, w)),
              "labels": torch.arange(n) + 20, "ann_ids": torch.arange(n) + 100, "image_id": 1,
              "orig_size": torch.tensor([h, w])}
    return image, target


def test_flip_moves_boxes():
    pipeline = v2.Compose([v2.RandomHorizontalFlip(p=1.0), *finishing_transforms()])
    image, target = _raw(boxes=((10, 20, 30, 60),))
    _, out = pipeline(image, target)
    # x in [10, 30] -> [70, 90]: cx = 0.8, cy = 0.4, w = 0.2, h = 0.4
    assert torch.allclose(out["boxes"], torch.tensor([[0.8, 0.4, 0.2, 0.4]]))


@pytest.mark.parametrize("seed", range(6))
def test_crop_drops_vanished_boxes_keeping_labels_aligned(seed):
    crop = RandomSizeCrop(60, 60)
    pipeline = v2.Compose([crop, v2.ClampBoundingBoxes(), sanitize_boxes(), *finishing_transforms()])
    # 30x30 boxes in the corners (kept or not depending on the window) and one always-kept centre box
    image, target = _raw(boxes=((0, 0, 30, 30), (70, 0, 100, 30), (0, 70, 30, 100), (70, 70, 100, 100),
                                (40, 40, 60, 60)))
    torch.manual_seed(seed)
    p = crop.make_params([image])
    torch.manual_seed(seed)
    out_image, out = pipeline(image, target)
    assert tuple(out_image.shape[-2:]) == (60, 60)
    kept = []
    for k, (x0, y0, x1, y1) in enumerate(target["boxes"].tolist()):
        w = min(x1, p["left"] + 60) - max(x0, p["left"])
        h = min(y1, p["top"] + 60) - max(y0, p["top"])
        if w >= 1 and h >= 1:
            kept.append(k)
    assert out["ann_ids"].tolist() == [100 + k for k in kept]
    assert out["labels"].tolist() == [20 + k for k in kept]
    assert 4 in kept
    assert out["boxes"].shape == (len(kept), 4) and (out["boxes"][:, 2:] > 0).all()


def test_train_transform_sizes_and_alignment(lvis_v1):
    ds = LVISDetection(*lvis_v1, transforms=build_transforms(True, SMALL))
    torch.manual_seed(0)
    for _ in range(8):
        image, target = ds[0]
        h, w = target["size"].tolist()
        assert (h, w) == tuple(image.shape[-2:]) and max(h, w) <= SMALL["max_size"]
        assert min(h, w) in SMALL["train_scales"] or max(h, w) == SMALL["max_size"]
        assert len(target["labels"]) == len(target["ann_ids"]) == len(target["boxes"])
        for label, ann_id in zip(target["labels"].tolist(), target["ann_ids"].tolist()):
            assert (ann_id, label) in {(10, 0), (11, 1)}
        assert ((target["boxes"] >= 0) & (target["boxes"] <= 1)).all()


# ---------------------------------------------------------------- collate and loaders

def test_collate_pads_and_masks():
    a = (torch.ones(3, 4, 6), {"image_id": 1, "boxes": torch.zeros(0, 4)})
    b = (torch.full((3, 5, 3), 2.0), {"image_id": 2, "boxes": torch.zeros(1, 4)})
    batch = collate([a, b])
    assert isinstance(batch, ImageBatch) and batch.images.shape == (2, 3, 5, 6) and batch.masks.shape == (2, 5, 6)
    assert not batch.masks[0, :4, :6].any() and batch.masks[0, 4].all()
    assert not batch.masks[1, :, :3].any() and batch.masks[1, :, 3:].all()
    assert (batch.images[0, :, 4] == 0).all() and (batch.images[1, :, :, 3:] == 0).all()
    assert (batch.images[1, :, :, :3] == 2).all()
    assert [t["image_id"] for t in batch.targets] == [1, 2]
    padded = collate([a, b], size_divisibility=4)
    assert padded.images.shape[-2:] == (8, 8) and padded.masks[:, 5:].all()
    moved = batch.to("cpu")
    assert moved.targets[1]["boxes"].shape == (1, 4) and moved.masks.dtype == torch.bool


def test_loaders_from_config(lvis_v1):
    ds = LVISDetection(*lvis_v1, transforms=build_transforms(True, SMALL))
    loader_cfg = {**SMALL, "batch_size": 2, "num_workers": 0, "rfs_threshold": None, "size_divisibility": 1}
    train = build_train_loader(ds, loader_cfg, seed=3)
    train.sampler.set_epoch(1)
    seen = [t["image_id"] for batch in train for t in batch.targets]
    assert len(seen) == len(train.sampler) and set(seen) <= {1, 2, 5}
    evl = build_eval_loader(LVISDetection(*lvis_v1, transforms=build_transforms(False, SMALL)), loader_cfg)
    assert [t["image_id"] for batch in evl for t in batch.targets] == [1, 2, 5]


# ---------------------------------------------------------------- bad input

def test_missing_and_invalid_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        LVISDetection(tmp_path / "nope.json", tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json is not valid JSON"):
        LVISDetection(bad, tmp_path)
    with pytest.raises(ValueError, match="'annotations'"):
        LVISDetection(_write(tmp_path, {"images": [], "categories": []}, "partial.json"), tmp_path)


@pytest.mark.parametrize("field,value,message", [
    ("category_id", 99, "annotation 12 refers to category_id 99"),
    ("image_id", 42, "annotation 12 refers to image_id 42"),
    ("bbox", [1, 2, "x", 4], "annotation 12 has an invalid bbox"),
])
def test_bad_annotation_is_named(tmp_path, field, value, message):
    data = _lvis_v1(tmp_path)
    data["annotations"][2][field] = value
    with pytest.raises(ValueError, match=message):
        LVISDetection(_write(tmp_path, data), tmp_path / "img")


def test_degenerate_boxes_one_counted_warning(tmp_path):
    data = _lvis_v1(tmp_path)
    data["annotations"][0]["bbox"][2] = 0
    data["annotations"][3]["bbox"][3] = -5
    with pytest.warns(DataWarning, match=r"dropped 2 boxes .*annotation ids \[10, 13\]") as record:
        ds = LVISDetection(_write(tmp_path, data), tmp_path / "img")
    assert len([w for w in record if issubclass(w.category, DataWarning)]) == 1
    assert ds.num_degenerate_dropped == 2 and ds[0][1]["ann_ids"].tolist() == [11]


def test_boxes_outside_the_image_one_counted_warning(tmp_path):
    data = _lvis_v1(tmp_path)  # image 1 is 40 (h) x 80 (w)
    data["annotations"][0]["bbox"] = [80, 4, 16, 20]  # starts at the right edge
    data["annotations"][1]["bbox"] = [-30, 10, 30, 20]  # ends at the left edge
    data["annotations"][2]["bbox"] = [-5, -5, 10, 10]  # partly inside: kept (the transforms clip it)
    with pytest.warns(DataWarning, match=r"dropped 2 boxes entirely outside their image .*\[10, 11\]") as record:
        ds = LVISDetection(_write(tmp_path, data), tmp_path / "img")
    assert len([w for w in record if issubclass(w.category, DataWarning)]) == 1
    assert ds.num_outside_dropped == 2 and ds.num_boxes == 2 and ds[1][1]["ann_ids"].tolist() == [12, 13]


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d["images"].append("000000000009.png"), r"image entry #3 is not an object: '000000000009.png'"),
    (lambda d: d["images"][0].update(id="1"), r"image entry #0 has a non-integer id '1'"),
    (lambda d: d["images"].append(dict(d["images"][0])), r"image id 1 appears more than once"),
    (lambda d: d["annotations"][0].update(bbox=[1, 2, True, 4]), r"annotation 10 has an invalid bbox"),
    (lambda d: d["images"][1].update(height="tall"), r"image 2 has a non-integer height or width \('tall', 30\)"),
])
def test_bad_image_entries_are_named(tmp_path, mutate, message):
    data = _lvis_v1(tmp_path)
    mutate(data)
    with pytest.raises(ValueError, match=r"ann.json: " + message):
        LVISDetection(_write(tmp_path, data), tmp_path / "img")


def test_missing_and_undecodable_images(lvis_v1):
    ann, root = lvis_v1
    (root / "train2017" / "000000000002.png").unlink()
    (root / "train2017" / "000000000005.png").write_bytes(b"not a png at all")
    ds = LVISDetection(ann, root)
    with pytest.raises(FileNotFoundError, match="image 2: file .*000000000002.png not found"):
        ds[1]
    with pytest.raises(ValueError, match="image 5: cannot decode .*000000000005.png"):
        ds[2]


def test_val_reuses_train_categories(tmp_path, lvis_v1):
    train = LVISDetection(*lvis_v1)
    val_data = _lvis_v1(tmp_path)
    val_data["categories"] = [dict(CATEGORIES[1], image_count=5, instance_count=9)]  # only 'dog', other counts
    val_data["annotations"] = [a for a in val_data["annotations"] if a["category_id"] == 7]
    val = LVISDetection(_write(tmp_path, val_data, "val.json"), lvis_v1[1], categories=train.categories)
    assert val.categories is train.categories and val[0][1]["labels"].tolist() == [1]
    val_data["categories"].append({"id": 50, "name": "emu"})
    with pytest.raises(ValueError, match=r"val2?.json: 1 categories are not in the given category map.*\[50\]"):
        LVISDetection(_write(tmp_path, val_data, "val2.json"), lvis_v1[1], categories=train.categories)


def test_coco_file_name_and_crowd(tmp_path, caplog):
    _png(tmp_path / "val2017" / "000000000632.png", 30, 40)
    data = {"images": [{"id": 632, "file_name": "000000000632.png", "height": 30, "width": 40}],
            "categories": [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}],
            "annotations": [{"id": 1, "image_id": 632, "category_id": 1, "bbox": [0, 0, 4, 4], "iscrowd": 0},
                            {"id": 2, "image_id": 632, "category_id": 18, "bbox": [0, 0, 40, 30], "iscrowd": 1}]}
    with caplog.at_level(logging.INFO, logger="stepwise.data.lvis_dataset"):
        ds = LVISDetection(_write(tmp_path, data), tmp_path / "val2017")
    assert ds.num_crowd_skipped == 1 and "skipped 1 crowd boxes" in caplog.text
    _, target = ds[0]
    assert target["ann_ids"].tolist() == [1] and ds.categories.frequencies == (None, None)
