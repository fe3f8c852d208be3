"""``stepwise.predictor.Predictor``: checkpoint -> images -> detections with class names, the same
detections ``stepwise.evaluate`` writes."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch
from torchvision.ops import box_convert

from stepwise.data import image_path
from stepwise.evaluate import evaluate_checkpoint
from stepwise.predictor import ImageDetections, Predictor
from stepwise.utils.io import atomic_write_json, read_json

N_IMAGES = 4


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, make_untrained_checkpoint):
    """A tiny checkpoint (random weights, synthetic ``tiny`` preset) evaluated by ``stepwise.evaluate`` on the
    first ``N_IMAGES`` val images, two per batch, 50 detections per image."""
    root = tmp_path_factory.mktemp("predictor")
    path, cfg = make_untrained_checkpoint(root)
    val = read_json(cfg.data.val_ann)
    images = val["images"][:N_IMAGES]
    keep = {im["id"] for im in images}
    small = dict(val, images=images, annotations=[a for a in val["annotations"] if a["image_id"] in keep])
    atomic_write_json(root / "val_small.json", small)
    out = root / "eval"
    evaluate_checkpoint(path, out=out, gt=root / "val_small.json", max_dets=50,
                        overrides=["stage.eval_batch_size=2"])
    by_image = defaultdict(list)
    for p in read_json(out / "predictions.json"):  # ordered by image id, then as predicted (score order)
        by_image[p["image_id"]].append(p)
    files = [image_path(im, cfg.data.val_image_root) for im in images]  # file_name, else coco_url's tail
    names = {c["id"]: c["name"] for c in val["categories"]}
    return {"checkpoint": path, "images": images, "files": files, "by_image": by_image, "names": names}


def test_predictor_gives_the_detections_evaluate_writes(evaluated):
    predictor = Predictor.from_checkpoint(evaluated["checkpoint"], device="cpu", max_dets=50, batch_size=2)
    found = predictor(evaluated["files"])
    assert len(found) == N_IMAGES and all(isinstance(f, ImageDetections) for f in found)
    for image, dets in zip(evaluated["images"], found):
        written = evaluated["by_image"][image["id"]]
        assert len(dets) == len(written) == 50
        assert dets.category_ids == [p["category_id"] for p in written]
        assert dets.names == [evaluated["names"][p["category_id"]] for p in written]
        # bit for bit: the results file holds the float32 values the model computed
        assert dets.scores.tolist() == [p["score"] for p in written]
        assert box_convert(dets.boxes, "xyxy", "xywh").tolist() == [p["bbox"] for p in written]


def test_one_image_path_or_pil_and_a_variant(evaluated):
    from PIL import Image

    predictor = Predictor.from_checkpoint(evaluated["checkpoint"], device="cpu", max_dets=7)
    one = predictor(evaluated["files"][0])
    assert isinstance(one, ImageDetections) and len(one) == 7
    assert torch.all(one.scores[:-1] >= one.scores[1:])  # highest score first
    with Image.open(evaluated["files"][0]) as pil:
        same = predictor(pil)
    assert torch.equal(same.scores, one.scores) and torch.equal(same.boxes, one.boxes)
    again = predictor.variant(predictor.model)(evaluated["files"][0])
    assert torch.equal(again.scores, one.scores) and again.names == one.names
    with pytest.raises(ValueError, match="batch_size"):
        Predictor(predictor.detector, predictor.categories, batch_size=0)
