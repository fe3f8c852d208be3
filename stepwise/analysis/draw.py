"""Boxes with class names and scores drawn on images (PIL), readable on 128 px thumbnails and large photos.

Small images are first enlarged by an integer factor (:func:`display_scale`) so that labels of a legible
size fit; line width and font size then follow the drawn image's short side (:class:`Style`). Each class
has one colour (:func:`class_color`); predictions are solid boxes with ``name score`` labels above them,
ground truth dashed boxes with the name at the bottom.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

RGB = tuple[int, int, int]

# Kelly's colours of maximum contrast (white and black left out), then golden-ratio hue steps.
_KELLY = ("F3C300", "875692", "F38400", "A1CAF1", "BE0032", "C2B280", "848482", "008856", "E68FAC", "0067A5",
          "F99379", "604E97", "F6A600", "B3446C", "DCD300", "882D17", "8DB600", "654522", "E25822", "2B3D26")
_GOLDEN = 0.618033988749895


def class_color(index: int) -> RGB:
    """The colour of contiguous class ``index``: distinct for the first 20 classes, then hues spread by the
    golden ratio (with thousands of classes some colours are necessarily close)."""
    if index < len(_KELLY):
        code = _KELLY[index]
        return int(code[0:2], 16), int(code[2:4], 16), int(code[4:6], 16)
    hue = (0.11 + index * _GOLDEN) % 1.0
    value = 0.95 if index % 2 == 0 else 0.75  # second cue for classes whose hues end up close
    r, g, b = colorsys.hsv_to_rgb(hue, 0.8, value)
    return round(r * 255), round(g * 255), round(b * 255)


def text_color(background: RGB) -> RGB:
    """Black or white, whichever reads better on ``background`` (relative luminance)."""
    r, g, b = background
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (255, 255, 255)


def display_scale(width: int, height: int, min_side: int) -> int:
    """Integer enlargement factor that brings the short side to at least ``min_side`` (1 when it is already,
    or when ``min_side <= 0``)."""
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    short = min(width, height)
    return 1 if min_side <= 0 or short >= min_side else math.ceil(min_side / short)


@dataclass(frozen=True)
class Style:
    """Line width, font size and dash pattern (pixels) for an image whose short side is ``short_side``."""

    line_width: int
    font_size: int
    dash: int

    @classmethod
    def for_size(cls, width: int, height: int) -> "Style":
        short = min(width, height)
        line = max(2, round(short / 200))
        return cls(line_width=line, font_size=max(12, round(short / 36)), dash=4 * line)


def load_font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """PIL's built-in font at ``size`` px (scalable with FreeType, Pillow >= 10.1), else its fixed bitmap."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # old Pillow or no FreeType: fixed-size bitmap font
        return ImageFont.load_default()


def dashed_rectangle(draw: ImageDraw.ImageDraw, box: Sequence[float], color: RGB, width: int, dash: int) -> None:
    """Outline of ``box`` (x0, y0, x1, y1) as dashes of length ``dash`` with equal gaps."""
    x0, y0, x1, y1 = box
    for (ax, ay), (bx, by) in (((x0, y0), (x1, y0)), ((x1, y0), (x1, y1)),
                               ((x1, y1), (x0, y1)), ((x0, y1), (x0, y0))):
        length = math.hypot(bx - ax, by - ay)
        steps = max(1, int(length // (2 * dash)))
        for k in range(steps + 1):
            t0, t1 = 2 * k * dash / max(length, 1e-6), (2 * k + 1) * dash / max(length, 1e-6)
            if t0 >= 1:
                break
            t1 = min(t1, 1.0)
            draw.line([(ax + (bx - ax) * t0, ay + (by - ay) * t0), (ax + (bx - ax) * t1, ay + (by - ay) * t1)],
                      fill=color, width=width)


def draw_boxes(image: Image.Image, boxes: Sequence[Sequence[float]], texts: Sequence[str],
               colors: Sequence[RGB], *, dashed: bool = False, style: Style | None = None) -> Image.Image:
    """Draw boxes and their labels onto ``image`` (RGB, modified in place and returned).

    Args:
        image: the picture to draw on, in the coordinate frame of ``boxes``.
        boxes: (K, 4) x0, y0, x1, y1 in pixels of ``image`` (a tensor, array or nested list).
        texts: K labels; solid boxes put theirs above the box, dashed ones at its bottom edge.
        colors: K RGB colours (one per class: :func:`class_color`).
        dashed: dashed outlines (ground truth) instead of solid ones (predictions).
        style: sizes; by default :meth:`Style.for_size` of ``image``.
    """
    boxes = [[float(v) for v in box] for box in (boxes.tolist() if hasattr(boxes, "tolist") else boxes)]
    if not len(boxes) == len(texts) == len(colors):
        raise ValueError(f"draw_boxes: {len(boxes)} boxes, {len(texts)} texts and {len(colors)} colours")
    style = style or Style.for_size(*image.size)
    font = load_font(style.font_size)
    draw = ImageDraw.Draw(image)
    width, height = image.size
    for box, color in zip(boxes, colors):
        if dashed:
            dashed_rectangle(draw, box, color, style.line_width, style.dash)
        else:
            draw.rectangle(box, outline=color, width=style.line_width)
    # Labels after all outlines, so no outline crosses a label; the last box's label ends on top.
    pad = max(1, style.line_width // 2)
    for (x0, y0, _x1, y1), text, color in zip(boxes, texts, colors):
        if not text:
            continue
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        w, h = right - left + 2 * pad, bottom - top + 2 * pad
        x = min(max(0.0, x0), max(0.0, width - w))
        if dashed:
            y = min(y1 - h, height - h)
        else:
            y = y0 - h if y0 - h >= 0 else y0  # above the box, or inside it at the top edge
        y = max(0.0, y)
        draw.rectangle([x, y, x + w, y + h], fill=color)
        draw.text((x + pad - left, y + pad - top), text, fill=text_color(color), font=font)
    return image


def enlarge(image: Image.Image, factor: int) -> Image.Image:
    """``image`` resized by an integer ``factor`` (Lanczos; the same image when ``factor`` is 1)."""
    if factor == 1:
        return image
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.LANCZOS)
