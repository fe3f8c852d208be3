"""Entry point: draw a trained detector's predictions on images, one PNG per image.

    python -m stepwise.visualize checkpoint=PATH images=DIR|FILE|GLOB [out=DIR] [score_threshold=0.3]
        [max_dets=50] [gt=ANN_FILE] [min_side=384] [device=auto|cpu|cuda] [config overrides, e.g. data.eval_scale=320]

The checkpoint's saved config and category map say how to build the model, which eval transform to use
and what the classes are called. Each image is run alone (no batch padding), post-processed to its top
``max_dets`` detections, those scoring at least ``score_threshold`` are drawn (solid, ``name score``) and,
with ``gt=``, the image's ground truth from that LVIS/COCO file too (dashed, matched by file name). Images
whose short side is below ``min_side`` are enlarged by an integer factor first so the labels are legible
(``min_side=0``: original size). ``out`` defaults to ``<run dir of the checkpoint>/visualize``.
Exit codes: 0 all written, 1 a missing/bad checkpoint or any unreadable image (the others are still
written), 2 bad arguments.
"""

from __future__ import annotations

import glob
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image, UnidentifiedImageError

from stepwise.analysis.draw import class_color, display_scale, draw_boxes, enlarge
from stepwise import cli
from stepwise.cli import UsageError, parse_args, parse_int, parse_number
from stepwise.config import ConfigError
from stepwise.data.annotation_index import AnnotationIndex
from stepwise.data.lvis_dataset import image_path
from stepwise.predictor import ImageDetections, Predictor
from stepwise.trained import TrainedModel, load_trained_model, run_dir_of
from stepwise.utils.io import atomic_path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
OPTIONS = {"checkpoint": None, "images": None, "out": None, "score_threshold": "0.3", "max_dets": "50",
           "gt": None, "min_side": "384", "device": "auto"}
USAGE = ("usage: python -m stepwise.visualize checkpoint=PATH images=DIR|FILE|GLOB [out=DIR] "
         "[score_threshold=0.3] [max_dets=50] [gt=ANN_FILE] [min_side=384] [device=auto] [config overrides]")


class ImageReadError(ValueError):
    """An input image is missing or cannot be decoded (the message names the file)."""


# ------------------------------------------------------------------------------------------- inputs
def find_images(spec: str | Path) -> list[Path]:
    """The image files ``spec`` names: a file, a directory (its image files, not recursive) or a glob
    pattern (``**`` recurses); sorted. Raises FileNotFoundError naming ``spec`` when it matches nothing."""
    text = str(spec)
    path = Path(text)
    if path.is_file():
        return [path]
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise FileNotFoundError(f"images: directory {path} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
        return found
    if any(c in text for c in "*?["):
        found = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
        if not found:
            raise FileNotFoundError(f"images: pattern {text!r} matches no file")
        return found
    raise FileNotFoundError(f"images: {text} is not a file, a directory or a glob pattern that matches files")


def output_names(paths: Sequence[Path]) -> list[str]:
    """A distinct PNG file name per input: the stem, or the path below the common folder when stems clash
    (``a/x.jpg``, ``b/x.jpg`` -> ``a__x.png``, ``b__x.png``)."""
    stems = [p.stem for p in paths]
    if len(set(stems)) == len(stems):
        return [f"{s}.png" for s in stems]
    resolved = [p.resolve() for p in paths]
    root = Path(*_common_parts([r.parent.parts for r in resolved]))
    return ["__".join(r.relative_to(root).with_suffix("").parts) + ".png" for r in resolved]


def _common_parts(parts: list[tuple[str, ...]]) -> tuple[str, ...]:
    common: list[str] = []
    for items in zip(*parts):
        if len(set(items)) != 1:
            break
        common.append(items[0])
    return tuple(common)


def read_image(path: Path) -> Image.Image:
    """The file as an RGB PIL image; ImageReadError naming it when missing or undecodable."""
    if not path.is_file():
        raise ImageReadError(f"image {path} not found")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise ImageReadError(f"image {path} cannot be read: {err}") from err


# ------------------------------------------------------------------------------------- ground truth
@dataclass
class GroundTruth:
    """Boxes of an LVIS/COCO annotation file (its :class:`AnnotationIndex`), looked up by image file name.

    ``boxes(path, size) -> [(x0, y0, x1, y1, category_id)]`` or None when the file has no such image.
    ``by_file``: image file name -> rows of the index's images with that name.
    """

    source: Path
    names: dict[int, str]
    index: AnnotationIndex
    by_file: dict[str, list[int]] = field(default_factory=dict)

    @classmethod
    def load(cls, ann_file: str | Path) -> "GroundTruth":
        index = AnnotationIndex.read(ann_file, "ground-truth annotation file")
        gt = cls(Path(ann_file), {int(c["id"]): str(c.get("name", c["id"])) for c in index.categories}, index)
        for k in range(index.num_images):
            gt.by_file.setdefault(image_path(index.image_entry(k), "").name, []).append(k)
        return gt

    def boxes(self, path: Path, size: tuple[int, int]) -> list[tuple[float, float, float, float, int]] | None:
        """Ground truth of the image file ``path`` whose (width, height) is ``size``; None when unknown."""
        candidates = self.by_file.get(path.name, [])
        if len(candidates) > 1:  # same file name in several folders: the one whose relative path matches
            candidates = [k for k in candidates
                          if path.as_posix().endswith(image_path(self.index.image_entry(k), "").as_posix())]
        if len(candidates) != 1:
            return None
        k = candidates[0]
        if self.index.has_size[k] and (int(self.index.width[k]), int(self.index.height[k])) != size:
            raise ValueError(f"ground-truth annotation file {self.source}: image {int(self.index.image_id[k])} is "
                             f"{int(self.index.width[k])}x{int(self.index.height[k])} but {path} is "
                             f"{size[0]}x{size[1]}")
        rows = self.index.image_rows(k)
        return [(x, y, x + w, y + h, cid) for (x, y, w, h), cid in
                zip(self.index.bbox[rows].tolist(), self.index.category_id[rows].tolist())]


# ------------------------------------------------------------------------------------------ drawing
def render(image: Image.Image, detections: ImageDetections, trained: TrainedModel,
           score_threshold: float = 0.3, gt: list[tuple[float, float, float, float, int]] | None = None,
           gt_names: dict[int, str] | None = None, min_side: int = 384) -> Image.Image:
    """A new image: ``image`` enlarged for legibility (:func:`display_scale`), the detections scoring at
    least ``score_threshold`` drawn solid and the ground truth ``gt`` (x0, y0, x1, y1, category id) dashed.

    ``detections``: a :class:`~stepwise.predictor.Predictor`'s for ``image`` (xyxy pixels of ``image``).
    """
    categories = trained.categories
    factor = display_scale(image.width, image.height, min_side)
    canvas = enlarge(image.copy(), factor)
    if gt:
        names = gt_names or {}

        def color_of(cid: int) -> tuple[int, int, int]:
            return class_color(categories.index(cid) if cid in categories else len(categories) + cid)

        draw_boxes(canvas, [[v * factor for v in g[:4]] for g in gt],
                   [names.get(g[4], str(g[4])) for g in gt], [color_of(g[4]) for g in gt], dashed=True)
    keep = detections.scores >= score_threshold
    order = detections.scores[keep].argsort()  # ascending: the best detection's label is drawn last
    scores, labels = detections.scores[keep][order], detections.labels[keep][order]
    boxes = detections.boxes[keep][order] * factor
    texts = [f"{categories.names[int(c)]} {float(s):.2f}" for c, s in zip(labels, scores)]
    draw_boxes(canvas, boxes, texts, [class_color(int(c)) for c in labels])
    return canvas


# -------------------------------------------------------------------------------------------- driver
@dataclass
class VisualizeResult:
    """What :func:`visualize` did: PNG files written, and ``(input, error message)`` of images it skipped."""

    written: list[Path]
    failed: list[tuple[Path, str]]


def default_out(checkpoint: str | Path) -> Path:
    """``<run dir of the checkpoint>/visualize``."""
    return run_dir_of(checkpoint) / "visualize"


def visualize(checkpoint: str | Path, images: str | Path | Sequence[Path], out: str | Path | None = None,
              score_threshold: float = 0.3, max_dets: int = 50, gt: str | Path | None = None,
              min_side: int = 384, overrides: Sequence[str] = (), device: str | None = None) -> VisualizeResult:
    """Draw the checkpoint's predictions on ``images`` (see the module docstring) into ``out``.

    An unreadable image is reported in ``failed`` and the others are still drawn; a bad checkpoint raises
    ``CheckpointError`` naming it.
    """
    paths = find_images(images) if isinstance(images, (str, Path)) else [Path(p) for p in images]
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    trained = load_trained_model(checkpoint, overrides, device=device)
    predictor = Predictor.from_trained(trained, max_dets=max_dets)
    truth = GroundTruth.load(gt) if gt is not None else None
    out = Path(out) if out is not None else default_out(trained.path)
    written, failed = [], []
    for path, name in zip(paths, output_names(paths)):
        try:
            image = read_image(path)
            boxes = truth.boxes(path, image.size) if truth is not None else None
            if truth is not None and boxes is None:
                print(f"stepwise: no ground truth for {path} in {truth.source}")
            drawn = render(image, predictor(image), trained, score_threshold, boxes,
                           truth.names if truth is not None else None, min_side)
        except ValueError as err:  # ImageReadError, or ground truth that does not fit the image
            failed.append((path, str(err)))
            print(f"error: {err}", file=sys.stderr)
            continue
        with atomic_path(out / name) as tmp:
            drawn.save(tmp, format="PNG")
        written.append(out / name)
    return VisualizeResult(written, failed)


def _run(argv: list[str]) -> VisualizeResult:
    given = parse_args(argv)
    missing = [k for k in ("checkpoint", "images") if k not in given]
    if missing:
        raise UsageError(f"missing key(s): {', '.join(missing)}")
    args = {**{k: v for k, v in OPTIONS.items() if v is not None}, **given}
    overrides = [f"{k}={v}" for k, v in given.items() if k not in OPTIONS]
    score_threshold = parse_number("score_threshold", args["score_threshold"])
    max_dets, min_side = parse_int("max_dets", args["max_dets"], minimum=1), parse_int("min_side", args["min_side"])
    device = None if args["device"] == "auto" else args["device"]
    try:
        return visualize(args["checkpoint"], args["images"], args.get("out"), score_threshold, max_dets,
                         args.get("gt"), min_side, overrides, device)
    except ConfigError as err:  # exit code 2, naming this command's own keys
        raise ConfigError(f"{err} (keys of this command: {', '.join(OPTIONS)})") from err


def _finish(result: VisualizeResult) -> int:
    for path in result.written:
        print(f"wrote {path}")
    if result.failed:
        print(f"error: {len(result.failed)} of {len(result.failed) + len(result.written)} images failed: "
              + "; ".join(str(p) for p, _ in result.failed), file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI on ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    return cli.main(argv, USAGE, _run, _finish, refused=(ConfigError,))  # CheckpointError is a ValueError


if __name__ == "__main__":
    sys.exit(main())
