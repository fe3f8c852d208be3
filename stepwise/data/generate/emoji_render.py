"""Drawing the emoji benchmark: backgrounds, one instance's picture, a planned image with its visible boxes,
a batch of images to PNG files, and a sample sheet of a generated split."""

from __future__ import annotations

import io
import math
import os
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from stepwise.analysis.draw import class_color, draw_boxes, enlarge
from stepwise.data.generate.emoji_artwork import Artwork, get_artwork
from stepwise.data.generate.emoji_plan import ImagePlan, Instance
from stepwise.data.generate.emoji_vocabulary import EmojiPreset
from stepwise.utils.io import atomic_path, read_json

VISIBLE_ALPHA = 0.25  # a pixel belongs to the topmost object drawn there with at least this opacity


def _background(width: int, height: int, seed: int) -> np.ndarray:
    """(H, W, 3) float32 background: a smooth colour field with low-contrast clutter shapes and noise."""
    rng = np.random.default_rng([seed, 7])
    field_ = rng.integers(40, 230, size=(3, 3, 3), dtype=np.uint8)
    im = Image.fromarray(field_, "RGB").resize((width, height), Image.BICUBIC)
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = rng.uniform(-0.2, 1.0) * width, rng.uniform(-0.2, 1.0) * height
        x1, y1 = x0 + rng.uniform(0.1, 0.6) * width, y0 + rng.uniform(0.1, 0.6) * height
        colour = tuple(int(v) for v in rng.integers(30, 240, size=3))
        kind = int(rng.integers(3))
        if kind == 0:
            draw.ellipse([x0, y0, x1, y1], fill=colour)
        elif kind == 1:
            draw.rectangle([x0, y0, x1, y1], fill=colour)
        else:
            draw.line([x0, y0, x1, y1], fill=colour, width=int(rng.integers(1, 4)))
    im = im.filter(ImageFilter.GaussianBlur(1.0))
    return np.asarray(im, dtype=np.float32) + rng.normal(0, 4.0, size=(height, width, 3)).astype(np.float32)


SPRITE_SIZES = (16, 24, 32, 48, 64, 96, 128, 160)  # font sizes the sprites are drawn at


def _instance_image(art: Artwork, inst: Instance, sprite_size: int) -> Image.Image:
    """The RGBA picture of one instance: sized, stretched, rotated, tinted and blurred. The sprite comes
    from the smallest font size of at least 1.5 x the instance's side (at most ``sprite_size``)."""
    size = next((s for s in SPRITE_SIZES if s >= 1.5 * inst.side), SPRITE_SIZES[-1])
    sprite = art.sprite(inst.hexcode, min(size, sprite_size))
    sw, sh = sprite.size
    scale = inst.side / max(sw * max(1.0, inst.aspect), sh * max(1.0, 1.0 / inst.aspect))
    w = max(2, round(sw * scale * max(1.0, inst.aspect)))
    h = max(2, round(sh * scale * max(1.0, 1.0 / inst.aspect)))
    im = sprite.resize((w, h), Image.Resampling.LANCZOS)
    if abs(inst.angle) > 0.5:
        im = im.rotate(inst.angle, resample=Image.Resampling.BICUBIC, expand=True)
    if inst.blur:
        im = im.filter(ImageFilter.GaussianBlur(inst.blur))
    return im


def render_image(img: ImagePlan, sprite_size: int, art: Artwork | None = None) -> tuple[Image.Image, list[dict]]:
    """Draw one planned image; returns (RGB image, [{category_id, bbox, area}] of its annotated instances,
    boxes = visible extent after occlusion and truncation, area = visible pixels)."""
    art = art or get_artwork()
    canvas = _background(img.width, img.height, img.background)
    owner = np.full((img.height, img.width), -1, dtype=np.int32)
    for k, inst in enumerate(img.instances):
        im = _instance_image(art, inst, sprite_size)
        rgba = np.asarray(im, dtype=np.float32)
        x0, y0 = round(inst.cx - im.width / 2), round(inst.cy - im.height / 2)
        cx0, cy0 = max(0, x0), max(0, y0)
        cx1, cy1 = min(img.width, x0 + im.width), min(img.height, y0 + im.height)
        if cx1 <= cx0 or cy1 <= cy0:
            continue
        part = rgba[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]
        alpha = part[..., 3:4] / 255.0
        colour = part[..., :3] * inst.brightness * np.asarray(inst.balance, dtype=np.float32)
        region = canvas[cy0:cy1, cx0:cx1]
        region[...] = region * (1 - alpha) + np.clip(colour, 0, 255) * alpha
        owner[cy0:cy1, cx0:cx1][alpha[..., 0] >= VISIBLE_ALPHA] = k
    anns = []
    for k, inst in enumerate(img.instances):
        if not inst.category_id or not inst.annotated:
            continue
        ys, xs = np.nonzero(owner == k)
        if len(xs) == 0:
            continue
        x, y = int(xs.min()), int(ys.min())
        anns.append({"category_id": inst.category_id,
                     "bbox": [float(x), float(y), float(xs.max() + 1 - x), float(ys.max() + 1 - y)],
                     "area": float(len(xs))})
    pixels = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB"), anns


def sprite_size_of(p: EmojiPreset) -> int:
    """Font size the sprites are drawn at: about twice the largest object, so resizing only shrinks."""
    return int(max(32, 2 * p.object_size[1]))


def render_batch(args: tuple[str, list[ImagePlan], int]) -> list[tuple[int, list[dict]]]:
    image_dir, images, sprite_size = args
    out = []
    for img in images:
        im, anns = render_image(img, sprite_size)
        im.save(Path(image_dir) / img.relative_path, format="PNG", compress_level=1)
        out.append((img.id, anns))
    return out


def draw_samples(root: str | os.PathLike, out: str | os.PathLike, split: str = "train", count: int = 8,
                 columns: int = 4, scale: int = 4) -> Path:
    """A PNG grid of ``count`` images of ``split`` with their ground-truth boxes and class names (frequency in
    brackets), each enlarged ``scale`` times; returns ``out``."""
    root = Path(root)
    data = read_json(root / "annotations" / f"{split}.json", f"emoji {split} annotations")
    cats = {c["id"]: c for c in data["categories"]}
    by_image: dict[int, list[dict]] = defaultdict(list)
    for a in data["annotations"]:
        by_image[a["image_id"]].append(a)
    tiles = []
    for img in data["images"][:count]:
        im = Image.open(root / "images" / "/".join(img["coco_url"].split("/")[-2:])).convert("RGB")
        im = enlarge(im, scale)
        anns = by_image[img["id"]]
        boxes = [[a["bbox"][0] * scale, a["bbox"][1] * scale, (a["bbox"][0] + a["bbox"][2]) * scale,
                  (a["bbox"][1] + a["bbox"][3]) * scale] for a in anns]
        texts = [f"{cats[a['category_id']]['name'][:22]} ({cats[a['category_id']]['frequency']})" for a in anns]
        tiles.append(draw_boxes(im, boxes, texts, [class_color(a["category_id"]) for a in anns], dashed=True))
    w, h = max(t.width for t in tiles), max(t.height for t in tiles)
    rows = math.ceil(len(tiles) / columns)
    sheet = Image.new("RGB", (columns * (w + 8), rows * (h + 8)), (255, 255, 255))
    for i, t in enumerate(tiles):
        sheet.paste(t, ((i % columns) * (w + 8), (i // columns) * (h + 8)))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    sheet.save(buf, format="PNG", optimize=True)
    with atomic_path(out, "sample figure") as tmp:
        Path(tmp).write_bytes(buf.getvalue())
    return out
