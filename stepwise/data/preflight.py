"""Preflight image checks: every image a data set references exists, opens, and has the annotated size.

A missing, unreadable, truncated or wrongly sized image otherwise stops training only when its batch comes
up (on LVIS, possibly hours in). :func:`check_images` looks at all of them first and reports every bad
one at once:

* ``decode=False`` (headers): the file exists, PIL reads its header, its pixel mode can be converted, and
  its (height, width) equals the annotation's. Only the first bytes of each file are read, so this takes
  seconds for thousands of images (threads; file system latency, not CPU, is the limit).
* ``decode=True``: every image is fully decoded with the data set's own loader
  (:meth:`LVISDetection.load_image`), so exactly what training would fail on is found, truncation included.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Sequence

from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from stepwise.data.lvis_dataset import exif_rotation_hint

_CONVERTIBLE_MODES = {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV",
                      "I", "I;16", "I;16L", "I;16B", "I;16N"}


@dataclass(frozen=True)
class ImageProblem:
    """One bad image: its id, file and what is wrong (``problem`` names the file too)."""

    image_id: int
    path: str
    problem: str

    def __str__(self) -> str:
        return f"image {self.image_id}: {self.problem}"


def default_workers() -> int:
    """Threads for header reads: I/O bound, so several per CPU (at most 32)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(32, 4 * cpus))


def check_header(image_id: int, path: os.PathLike | str, expected: tuple[int, int] | None) -> ImageProblem | None:
    """Check one image from its header: exists, opens, convertible mode, (h, w) == ``expected`` when given."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        return ImageProblem(image_id, path, f"file {path} not found")
    try:
        with Image.open(path) as pil:
            if pil.mode not in _CONVERTIBLE_MODES:
                return ImageProblem(image_id, path, f"{path} has pixel mode {pil.mode}, which cannot be converted "
                                                    f"to 8-bit RGB")
            if expected is not None and (pil.height, pil.width) != tuple(expected):
                return ImageProblem(image_id, path, f"{path} is {pil.height}x{pil.width} (h x w) but the annotation "
                                                    f"file says {expected[0]}x{expected[1]}"
                                                    f"{exif_rotation_hint(pil, tuple(expected))}")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        return ImageProblem(image_id, path, f"cannot read the image header of {path}: {err}")
    return None


def check_decode(dataset: Any, index: int) -> ImageProblem | None:
    """Decode image ``index`` with ``dataset.load_image`` (its size check included); the problem or None."""
    try:
        dataset.load_image(index)
    except (OSError, ValueError) as err:
        message = str(err)
        prefix = f"image {dataset.image_ids[index]}: "
        return ImageProblem(dataset.image_ids[index], str(dataset.path(index)),
                            message[len(prefix):] if message.startswith(prefix) else message)
    return None


def check_images(dataset: Any, indices: Sequence[int] | None = None, decode: bool = False,
                 workers: int | None = None, progress: bool = True, desc: str = "images") -> list[ImageProblem]:
    """Check the images of an :class:`~stepwise.data.LVISDetection` (all, or ``indices``).

    Args:
        dataset: needs ``image_ids``, ``path(i)``, ``expected_size(i)`` and (for ``decode``) ``load_image(i)``.
        decode: decode every image fully instead of reading headers only.
        workers: threads (default :func:`default_workers`).
        progress: show a progress bar.

    Returns:
        Every problem found, in data set order (empty when all images are fine).
    """
    indices = range(len(dataset)) if indices is None else indices
    if decode:
        def check(i: int) -> ImageProblem | None:
            return check_decode(dataset, i)
    else:
        def check(i: int) -> ImageProblem | None:
            return check_header(dataset.image_ids[i], dataset.path(i), dataset.expected_size(i))
    problems: list[ImageProblem] = []
    with ThreadPoolExecutor(max_workers=workers or default_workers()) as pool, \
            tqdm(total=len(indices), desc=f"preflight {desc}", unit="img", disable=not progress,
                 dynamic_ncols=True, mininterval=0.5) as bar:
        for problem in pool.map(check, indices, chunksize=64):
            bar.update(1)
            if problem is not None:
                problems.append(problem)
    return problems


def format_problems(problems: Sequence[ImageProblem], limit: int = 50) -> str:
    """One line per problem (the first ``limit``), plus a count of the rest."""
    lines = [f"  {p}" for p in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"  ... and {len(problems) - limit} more")
    return "\n".join(lines)
