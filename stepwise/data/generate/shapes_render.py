"""Drawing the shape data set: shape and texture masks, one planned image, a batch of images to PNG files."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from stepwise.data.generate.shapes_presets import SHAPES, TEXTURES, ClassSpec, ImagePlan


def _unit_polygon(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Scale a polygon so its bounding box is exactly [0, 1]^2 (tight boxes for every shape)."""
    xs, ys = zip(*points)
    return [((x - min(xs)) / (max(xs) - min(xs)), (y - min(ys)) / (max(ys) - min(ys))) for x, y in points]


_STAR = _unit_polygon([((1.0 if i % 2 == 0 else 0.45) * math.cos(math.radians(-90 + 36 * i)),
                        (1.0 if i % 2 == 0 else 0.45) * math.sin(math.radians(-90 + 36 * i))) for i in range(10)])
_POLYGONS = {
    "triangle": [[(0.5, 0), (1, 1), (0, 1)]],
    "diamond": [[(0.5, 0), (1, 0.5), (0.5, 1), (0, 0.5)]],
    "star": [_STAR],
    "cross": [[(0.33, 0), (0.67, 0), (0.67, 1), (0.33, 1)], [(0, 0.33), (1, 0.33), (1, 0.67), (0, 0.67)]],
    "hourglass": [[(0, 0), (1, 0), (0.5, 0.5)], [(0.5, 0.5), (1, 1), (0, 1)]],
}


def shape_mask(shape: str, w: int, h: int) -> np.ndarray:
    """Boolean (h, w) mask of ``shape`` filling a w x h box."""
    im = Image.new("L", (w, h), 0)
    d = ImageDraw.Draw(im)
    wm, hm = w - 1, h - 1
    inner = [0.28 * wm, 0.28 * hm, 0.72 * wm, 0.72 * hm]
    if shape in ("circle", "ring"):
        d.ellipse([0, 0, wm, hm], fill=255)
        if shape == "ring":
            d.ellipse(inner, fill=0)
    elif shape in ("square", "frame"):
        d.rectangle([0, 0, wm, hm], fill=255)
        if shape == "frame":
            d.rectangle(inner, fill=0)
    elif shape == "halfdisk":
        d.pieslice([0, 0, wm, 2 * hm], 180, 360, fill=255)
    elif shape in _POLYGONS:
        for poly in _POLYGONS[shape]:
            d.polygon([(x * wm, y * hm) for x, y in poly], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    return np.asarray(im) > 127


def texture_mask(texture: str, w: int, h: int) -> np.ndarray:
    """Boolean (h, w) mask of the pixels drawn in the secondary colour: none, diagonal stripes or dots."""
    if texture == "solid":
        return np.zeros((h, w), dtype=bool)
    yy, xx = np.mgrid[0:h, 0:w]
    period = max(4, round(min(w, h) / 4))
    if texture == "striped":
        return (xx + yy) % period < period // 2
    if texture == "dotted":
        period = max(5, period)
        c = (period - 1) / 2
        return (xx % period - c) ** 2 + (yy % period - c) ** 2 <= (0.32 * period) ** 2
    raise ValueError(f"unknown texture {texture!r}; known: {', '.join(TEXTURES)}")


def _secondary(rgb: tuple[int, int, int]) -> np.ndarray:
    """Stripe/dot colour: a dark shade of the class colour, or light grey for very dark colours."""
    lum = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    return np.full(3, 215.0) if lum < 80 else np.asarray(rgb, dtype=float) * 0.35


def render_image(img: ImagePlan, classes: dict[int, ClassSpec], seed: int) -> Image.Image:
    """Draw one planned image: tinted grey background with soft blotches, the objects, pixel noise."""
    rng = np.random.default_rng([int(seed), 2, img.id])
    w, h = img.width, img.height
    base = rng.uniform(110, 170) + rng.uniform(-10, 10, size=3)
    blotch = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    blotch = np.asarray(Image.fromarray(blotch, "RGB").resize((w, h), Image.BICUBIC), dtype=np.float32)
    canvas = (base + 0.12 * (blotch - 128)).astype(np.float32)
    for obj in img.objects:
        spec = classes[obj.category_id]
        x, y, bw, bh = obj.box
        colour = np.asarray(spec.rgb, dtype=float) + rng.integers(-8, 9, size=3)
        region = canvas[y:y + bh, x:x + bw]
        mask = shape_mask(spec.shape, bw, bh)
        pixels = np.where(texture_mask(spec.texture, bw, bh)[..., None], _secondary(spec.rgb), colour)
        region[mask] = pixels[mask]
    canvas += rng.normal(0.0, 3.0, size=canvas.shape)
    return Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8), "RGB")


def render_batch(args: tuple[str, list[ImagePlan], dict[int, ClassSpec], int]) -> int:
    image_dir, images, classes, seed = args
    for img in images:
        render_image(img, classes, seed).save(Path(image_dir) / img.relative_path, format="PNG", compress_level=1)
    return len(images)
