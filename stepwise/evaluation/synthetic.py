"""Random LVIS-format ground truth and detections for checking and timing evaluators (no images needed)."""

from __future__ import annotations

import numpy as np


def make_eval_case(
    num_images: int = 200, num_categories: int = 50, dets_per_image: int = 300, seed: int = 0
) -> tuple[dict, list[dict]]:
    """A long-tailed LVIS-format GT dict and detections in the LVIS results format.

    GT: Zipf-like category popularity, 1-12 boxes per image of all sizes (small/medium/large),
    every frequency r/c/f present, per-image ``neg_category_ids`` and ``not_exhaustive_category_ids``,
    categories with ``instance_count``. Detections: noisy copies of GT boxes (some right, some off,
    some with the wrong category), plus random boxes with categories from the positive, negative and
    unlisted sets, so every federated rule is exercised; ``dets_per_image`` per image, ties in scores included.
    """
    rng = np.random.default_rng(seed)
    cat_ids = [int(c) for c in rng.choice(np.arange(1, 4 * num_categories), num_categories, replace=False)]
    popularity = 1.0 / np.arange(1, num_categories + 1) ** 1.1
    popularity /= popularity.sum()

    images, annotations = [], []
    for img_id in range(1, num_images + 1):
        width, height = int(rng.integers(320, 1024)), int(rng.integers(320, 1024))
        n = int(rng.integers(1, 13))
        pos = rng.choice(num_categories, n, p=popularity)
        for k in pos:
            side = float(np.exp(rng.uniform(np.log(8), np.log(min(width, height) * 0.9))))
            w, h = side * rng.uniform(0.6, 1.4), side * rng.uniform(0.6, 1.4)
            w, h = min(w, width - 1.0), min(h, height - 1.0)
            x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
            annotations.append({
                "id": len(annotations) + 1, "image_id": img_id, "category_id": cat_ids[k],
                "bbox": [round(x, 2), round(y, 2), round(w, 2), round(h, 2)], "area": round(w * h, 2),
            })
        present = {cat_ids[k] for k in pos}
        absent = [c for c in cat_ids if c not in present]
        neg = [int(c) for c in rng.choice(absent, min(len(absent), int(rng.integers(0, 8))), replace=False)]
        not_exh = [c for c in present if rng.random() < 0.2]
        images.append({"id": img_id, "width": width, "height": height, "neg_category_ids": neg,
                       "not_exhaustive_category_ids": not_exh, "coco_url": f"http://x/val2017/{img_id:012d}.jpg"})

    # Training-set statistics: log-uniform in popularity rank from 10^4 instances down to 1, so every
    # frequency (r/c/f, LVIS's image-count thresholds 10/100) and every instance bin (10/100/1000) is filled.
    categories = []
    for rank, c in enumerate(cat_ids):
        train_instances = int(round(10 ** (4 * (1 - rank / max(1, num_categories - 1)))))
        train_images = max(1, int(round(train_instances * 0.6)))
        freq = "r" if train_images <= 10 else "c" if train_images <= 100 else "f"
        categories.append({"id": c, "name": f"class_{c}", "synset": f"class_{c}.n.01", "frequency": freq,
                           "image_count": train_images, "instance_count": train_instances})
    categories.sort(key=lambda cat: cat["id"])
    gt = {"info": {}, "licenses": [], "images": images, "annotations": annotations, "categories": categories}

    by_image: dict[int, list[dict]] = {}
    for ann in annotations:
        by_image.setdefault(ann["image_id"], []).append(ann)
    detections = []
    for img in images:
        anns = by_image.get(img["id"], [])
        listed = [a["category_id"] for a in anns] + img["neg_category_ids"]
        for j in range(dets_per_image):
            if anns and j < 3 * len(anns):
                ann = anns[j % len(anns)]
                x, y, w, h = ann["bbox"]
                jitter = rng.normal(0, 0.08 * (j // len(anns) + 1), 4)
                box = [x + jitter[0] * w, y + jitter[1] * h, w * np.exp(jitter[2]), h * np.exp(jitter[3])]
                cat = ann["category_id"] if rng.random() < 0.8 else int(rng.choice(cat_ids))
            else:
                w, h = rng.uniform(4, img["width"] / 2), rng.uniform(4, img["height"] / 2)
                box = [rng.uniform(0, img["width"] - w), rng.uniform(0, img["height"] - h), w, h]
                cat = int(rng.choice(listed)) if listed and rng.random() < 0.7 else int(rng.choice(cat_ids))
            score = round(float(rng.beta(2, 5) if j >= 3 * len(anns) else rng.beta(5, 2)), 3)  # rounded: ties occur
            detections.append({"image_id": img["id"], "category_id": cat,
                               "bbox": [round(float(v), 2) for v in box], "score": score})
    return gt, detections
