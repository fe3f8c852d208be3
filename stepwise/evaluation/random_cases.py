"""Random LVIS-format ground truth and detections for checking and timing evaluators (no images needed).

Generated with numpy over whole columns, so an LVIS-val-size case (19,809 images, 1,203 categories,
300 detections per image = 5.9M detections) takes seconds and stays arrays; ``write_eval_case`` puts it
on disk as a ground-truth file and a results file.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from stepwise.evaluation.detections import Detections
from stepwise.evaluation.results_file import write_results
from stepwise.utils.io import atomic_write_json


def _ground_truth(rng: np.random.Generator, num_images: int, cat_ids: np.ndarray, max_boxes: int = 12) -> tuple[dict, dict]:
    """GT dict plus its columns (for the detection generator): per-annotation image index, category,
    box, and per image the first annotation, annotation count and listed (positive + negative) categories."""
    num_categories = len(cat_ids)
    popularity = 1.0 / np.arange(1, num_categories + 1) ** 1.1
    popularity /= popularity.sum()
    width = rng.integers(320, 1024, num_images)
    height = rng.integers(320, 1024, num_images)
    count = rng.integers(1, max_boxes + 1, num_images)  # GT boxes per image
    first = np.r_[0, np.cumsum(count)[:-1]]
    img_of = np.repeat(np.arange(num_images), count)
    cat_of = cat_ids[rng.choice(num_categories, len(img_of), p=popularity)]
    W, H = width[img_of].astype(float), height[img_of].astype(float)
    side = np.exp(rng.uniform(np.log(8), np.log(np.minimum(W, H) * 0.9)))  # log-uniform: small/medium/large
    w = np.minimum(side * rng.uniform(0.6, 1.4, len(img_of)), W - 1.0)
    h = np.minimum(side * rng.uniform(0.6, 1.4, len(img_of)), H - 1.0)
    x, y = rng.uniform(0, W - w), rng.uniform(0, H - h)
    boxes = np.round(np.stack([x, y, w, h], 1), 2)
    area = np.round(w * h, 2)

    images, listed = [], []
    for i in range(num_images):
        present = np.unique(cat_of[first[i]:first[i] + count[i]])
        absent = np.setdiff1d(cat_ids, present, assume_unique=True)
        neg = rng.choice(absent, min(len(absent), int(rng.integers(0, 8))), replace=False)
        not_exh = present[rng.random(len(present)) < 0.2]
        images.append({"id": i + 1, "width": int(width[i]), "height": int(height[i]),
                       "neg_category_ids": neg.tolist(), "not_exhaustive_category_ids": not_exh.tolist(),
                       "coco_url": f"http://x/val2017/{i + 1:012d}.jpg"})
        listed.append(np.concatenate([cat_of[first[i]:first[i] + count[i]], neg]))
    annotations = [{"id": k + 1, "image_id": int(i) + 1, "category_id": int(c), "bbox": b, "area": a}
                   for k, (i, c, b, a) in enumerate(zip(img_of.tolist(), cat_of.tolist(), boxes.tolist(), area.tolist()))]

    # Training-set statistics: log-uniform in popularity rank from 10^4 instances down to 1, so every
    # frequency (r/c/f, LVIS's image-count thresholds 10/100) and every instance bin (10/100/1000) is filled.
    categories = []
    for rank, c in enumerate(cat_ids.tolist()):
        train_instances = int(round(10 ** (4 * (1 - rank / max(1, num_categories - 1)))))
        train_images = max(1, int(round(train_instances * 0.6)))
        freq = "r" if train_images <= 10 else "c" if train_images <= 100 else "f"
        categories.append({"id": c, "name": f"class_{c}", "synset": f"class_{c}.n.01", "frequency": freq,
                           "image_count": train_images, "instance_count": train_instances})
    categories.sort(key=lambda cat: cat["id"])
    gt = {"info": {}, "licenses": [], "images": images, "annotations": annotations, "categories": categories}
    listed_len = np.array([len(v) for v in listed])
    columns = {"width": width, "height": height, "first": first, "count": count, "cat_of": cat_of, "boxes": boxes,
               "listed": np.concatenate(listed), "listed_first": np.r_[0, np.cumsum(listed_len)[:-1]],
               "listed_len": listed_len}
    return gt, columns


def make_eval_arrays(num_images: int = 200, num_categories: int = 50, dets_per_image: int = 300,
                     seed: int = 0, max_boxes: int = 12) -> tuple[dict, Detections]:
    """A long-tailed LVIS-format GT dict and ``dets_per_image`` detections per image as ``Detections``.

    GT: Zipf-like category popularity, 1-``max_boxes`` boxes per image of all sizes (small/medium/large), every
    frequency r/c/f present, per-image ``neg_category_ids`` and ``not_exhaustive_category_ids``,
    categories with ``instance_count``. Detections of image i (with n GT boxes), row j: for j < 3n a
    noisy copy of GT box j mod n (noise growing with j // n; 20% with a random category), else a random
    box whose category is one of the image's positive or negative categories (70%) or any category (so
    also unlisted ones, which the federated rules drop). Scores are rounded to 3 decimals: ties occur.
    """
    rng = np.random.default_rng(seed)
    cat_ids = rng.choice(np.arange(1, 4 * num_categories), num_categories, replace=False).astype(np.int64)
    gt, col = _ground_truth(rng, num_images, cat_ids, max_boxes)
    n_img, D = num_images, dets_per_image
    img = np.repeat(np.arange(n_img), D)
    j = np.tile(np.arange(D), n_img)
    n = col["count"][img]
    copy = j < 3 * n

    ann = col["first"][img] + j % n
    gx, gy, gw, gh = col["boxes"][ann].T
    jitter = rng.normal(0.0, 1.0, (len(img), 4)) * (0.08 * (j // n + 1))[:, None]
    copied = np.stack([gx + jitter[:, 0] * gw, gy + jitter[:, 1] * gh, gw * np.exp(jitter[:, 2]), gh * np.exp(jitter[:, 3])], 1)
    W, H = col["width"][img].astype(float), col["height"][img].astype(float)
    rw, rh = rng.uniform(4, W / 2), rng.uniform(4, H / 2)
    random_box = np.stack([rng.uniform(0, W - rw), rng.uniform(0, H - rh), rw, rh], 1)
    box = np.round(np.where(copy[:, None], copied, random_box), 2)

    any_cat = cat_ids[rng.integers(0, len(cat_ids), len(img))]
    own_cat = np.where(rng.random(len(img)) < 0.8, col["cat_of"][ann], any_cat)
    pick = col["listed_first"][img] + (rng.random(len(img)) * col["listed_len"][img]).astype(np.int64)
    listed_cat = np.where(rng.random(len(img)) < 0.7, col["listed"][np.minimum(pick, len(col["listed"]) - 1)], any_cat)
    cat = np.where(copy, own_cat, listed_cat)
    score = np.round(np.where(copy, rng.beta(5, 2, len(img)), rng.beta(2, 5, len(img))), 3)
    return gt, Detections.from_columns(img + 1, cat, box, score)


def make_eval_case(num_images: int = 200, num_categories: int = 50, dets_per_image: int = 300,
                   seed: int = 0) -> tuple[dict, list[dict]]:
    """``make_eval_arrays`` with the detections as LVIS results dicts (for small cases and the LVIS API)."""
    gt, dets = make_eval_arrays(num_images, num_categories, dets_per_image, seed)
    return gt, dets.to_records()


def add_polygons(gt: dict, points: int, seed: int = 0) -> None:
    """Give every annotation of ``gt`` a ``segmentation``: one polygon of ``points`` vertices on a noisy
    ellipse inscribed in its box, coordinates rounded to 2 decimals (LVIS v1 files spend most of their
    bytes on polygons: about 800 bytes per annotation, i.e. ~40 vertices)."""
    anns = gt["annotations"]
    if not anns or points < 3:
        return
    rng = np.random.default_rng(seed)
    box = np.array([a["bbox"] for a in anns])
    angle = np.linspace(0, 2 * np.pi, points, endpoint=False)
    radius = rng.uniform(0.8, 1.0, (len(anns), points)) / 2
    x = box[:, :1] + box[:, 2:3] * (0.5 + radius * np.cos(angle))
    y = box[:, 1:2] + box[:, 3:4] * (0.5 + radius * np.sin(angle))
    coords = np.round(np.stack([x, y], 2).reshape(len(anns), 2 * points), 2).tolist()
    for ann, poly in zip(anns, coords):
        ann["segmentation"] = [poly]


def write_eval_case(out_dir: str | os.PathLike, num_images: int, num_categories: int, dets_per_image: int = 300,
                    seed: int = 0, max_boxes: int = 12, polygon_points: int = 0) -> tuple[Path, Path]:
    """Write ``make_eval_arrays``'s case as ``out_dir/gt.json`` and ``out_dir/predictions.json``; returns both.

    ``polygon_points`` > 0 adds a segmentation polygon of that many vertices to every GT annotation
    (``add_polygons``), for files of LVIS's size in bytes; box evaluation ignores them.
    """
    out_dir = Path(out_dir)
    gt, dets = make_eval_arrays(num_images, num_categories, dets_per_image, seed, max_boxes)
    add_polygons(gt, polygon_points, seed)
    atomic_write_json(out_dir / "gt.json", gt)
    return out_dir / "gt.json", write_results(out_dir / "predictions.json", dets)
