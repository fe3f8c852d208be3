"""What the built-in generators share: the output directory, the rendering pool and the LVIS v1 records.

* :func:`write_atomically`: everything is written into a temporary sibling of the output directory that is
  renamed onto it at the end, so an interrupted run leaves no output; the temporary directory and the
  rendering workers go away on any exit (an exception, Ctrl-C, SIGTERM or SIGHUP; after a SIGKILL the
  workers die with their parent on Linux and :func:`remove_stale_temporaries` removes the directory on the
  next call);
* :func:`ensure_generated`: reuse a complete data set, generate it otherwise, safe when several processes
  call it at once;
* :func:`render_batches`: render jobs in this process or a pool of :func:`default_workers` processes;
* :func:`lvis_image`, :func:`lvis_annotation`, :func:`lvis_category`, :func:`lvis_document`: the LVIS v1
  records both generators write (same keys in the same order);
* :func:`frequency_of` (LVIS's r/c/f from training image counts) and :func:`leave_one_unannotated` (the
  ``not_exhaustive_category_ids`` images);
* :func:`preset_named` (a preset by name), :class:`PlannedImage` (what every planned image has) and
  :func:`write_plan` (plan, then render into a fresh output directory).
"""

from __future__ import annotations

import ctypes
import glob
import multiprocessing
import os
import re
import shutil
import signal
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, TypeVar

import numpy as np
from tqdm.auto import tqdm

from stepwise.utils.io import read_json
from stepwise.utils.signals import exit_on_signals, raise_for_signal

SPLIT_FOLDERS = {"train": "train2017", "val": "val2017"}
# LVIS frequency thresholds on training image counts.
RARE_MAX_IMAGES = 10
COMMON_MAX_IMAGES = 100

T = TypeVar("T")
P = TypeVar("P")


def frequency_of(image_count: int) -> str:
    """LVIS frequency letter from a training image count: r (1-10), c (11-100), f (>100)."""
    if image_count < 1:
        raise ValueError(f"a category needs at least one training image, got {image_count}")
    if image_count <= RARE_MAX_IMAGES:
        return "r"
    return "c" if image_count <= COMMON_MAX_IMAGES else "f"


def image_path(split: str, image_id: int) -> str:
    """An image's path under ``images/`` (the last two parts of its ``coco_url``)."""
    return f"{SPLIT_FOLDERS[split]}/{image_id:012d}.png"


def preset_named(preset: Any, presets: dict[str, P], kind: type, what: str) -> P:
    """``preset`` itself when it is a ``kind``, else the preset of that name; a ValueError naming ``what`` and
    listing the known names otherwise."""
    if isinstance(preset, kind):
        return preset
    if preset not in presets:
        raise ValueError(f"unknown {what} preset {preset!r}; known: {', '.join(presets)}")
    return presets[preset]


@dataclass
class PlannedImage:
    """What every generator's planned image has (the fields :func:`lvis_image` reads besides the federated
    lists, which each subclass declares after its own fields)."""

    id: int
    split: str
    width: int
    height: int

    @property
    def relative_path(self) -> str:
        """Path under ``images/``, i.e. the last two parts of ``coco_url``."""
        return image_path(self.split, self.id)


# ----------------------------------------------------------------------------------------------------
# LVIS v1 records


def lvis_image(img: Any, url_root: str, date_captured: str) -> dict:
    """The ``images`` entry of a planned image (``id``, ``width``, ``height``, ``relative_path`` and the two
    federated lists)."""
    url = f"{url_root}/{img.relative_path}"
    return {"id": img.id, "width": img.width, "height": img.height, "license": 1,
            "coco_url": url, "flickr_url": url, "date_captured": date_captured,
            "neg_category_ids": img.neg_category_ids,
            "not_exhaustive_category_ids": img.not_exhaustive_category_ids}


def lvis_annotation(ann_id: int, image_id: int, category_id: int, bbox: list[float], area: float) -> dict:
    """An ``annotations`` entry; the segmentation is the box's polygon."""
    x, y, w, h = bbox
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox, "area": area,
            "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]}


def lvis_category(category_id: int, name: str, synonyms: list[str], definition: str, image_count: int,
                  instance_count: int) -> dict:
    """A ``categories`` entry with its LVIS frequency from the training image count."""
    return {"id": category_id, "name": name, "synset": f"{name}.n.01", "synonyms": synonyms, "def": definition,
            "frequency": frequency_of(image_count), "image_count": image_count, "instance_count": instance_count}


def lvis_document(description: str, url_root: str, version: int, date: str, licence: dict, images: list[dict],
                  annotations: list[dict], categories: list[dict]) -> dict:
    """The LVIS v1 dict of one split; ``date`` (``YYYY-MM-DD``) gives the creation date and year."""
    return {
        "info": {"description": description, "url": url_root, "version": str(version), "year": int(date[:4]),
                 "contributor": "stepwise", "date_created": date},
        "licenses": [{"id": 1, **licence}],
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }


def count_classes(images: Iterable[Sequence[int]]) -> tuple[Counter, Counter]:
    """(images, instances) per category id over the annotated category ids of each image."""
    image_count: Counter[int] = Counter()
    instance_count: Counter[int] = Counter()
    for cats in images:
        instance_count.update(cats)
        image_count.update(set(cats))
    return image_count, instance_count


def leave_one_unannotated(rng: np.random.Generator, images: list, objects_of: Callable[[Any], list],
                          fraction: float, pick: Callable[[np.random.Generator, list[int]], int]) -> None:
    """Not exhaustive: in ``round(fraction x images)`` of the images that hold a class twice or more, one
    instance of such a class (``pick(rng, sorted classes)``) is left unannotated, and the image's
    ``not_exhaustive_category_ids`` is that class. ``objects_of(img)``: its objects, in drawing order, with
    ``category_id`` (0 for an unannotated distractor) and ``annotated``."""
    def repeated(img: Any) -> Counter:
        return Counter(o.category_id for o in objects_of(img) if o.category_id)

    candidates = [img for img in images if any(n >= 2 for n in repeated(img).values())]
    n_pick = min(len(candidates), round(fraction * len(images)))
    for i in sorted(rng.choice(len(candidates), size=n_pick, replace=False).tolist()):
        img = candidates[i]
        cid = pick(rng, sorted(c for c, n in repeated(img).items() if n >= 2))
        objects = objects_of(img)
        which = [j for j, o in enumerate(objects) if o.category_id == cid]
        objects[which[int(rng.integers(len(which)))]].annotated = False
        img.not_exhaustive_category_ids = [cid]


# ----------------------------------------------------------------------------------------------------
# Rendering processes


def default_workers() -> int:
    """Rendering processes: the CPUs this process may use, at most 8."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cpus))


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def init_worker() -> None:
    """Rendering worker: leave Ctrl-C to the parent (which terminates the pool), and on Linux die with the
    parent even when it is killed with SIGKILL (a worker would otherwise block forever on its queue)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        except (OSError, AttributeError):  # no libc prctl: the parent's terminate() still covers other exits
            pass
        if os.getppid() == 1:  # the parent died before prctl took effect
            os._exit(1)


def render_batches(jobs: list, render: Callable[[Any], T], size: Callable[[T], int], workers: int, total: int,
                   desc: str, verbose: bool, context: Any = None) -> list[T]:
    """``render(job)`` for every job, in order with ``workers <= 1``, else in any order in a pool of
    ``workers`` processes (``context``'s, default ``multiprocessing``'s); a progress bar counts
    ``size(result)`` of ``total``."""
    results = []
    with tqdm(total=total, unit="img", desc=desc, disable=not verbose) as bar:
        if workers <= 1:
            for job in jobs:
                results.append(render(job))
                bar.update(size(results[-1]))
        else:
            # Pool: leaving the with-block (normally or by any exception, a signal turned into SystemExit
            # included) terminates the workers at once instead of letting queued jobs finish.
            with (context or multiprocessing).Pool(workers, initializer=init_worker) as pool:
                for result in pool.imap_unordered(render, jobs):
                    results.append(result)
                    bar.update(size(result))
    return results


def make_split_folders(root: Path) -> None:
    """``root/images/train2017`` and ``val2017``."""
    for folder in SPLIT_FOLDERS.values():
        (root / "images" / folder).mkdir(parents=True, exist_ok=True)


# ----------------------------------------------------------------------------------------------------
# The output directory


def check_output_free(out_dir: str | os.PathLike, what: str) -> Path:
    """``out_dir`` as a Path; ``FileExistsError`` unless it is absent or an empty directory."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{what} {out} already exists and is not empty")
    return out


def write_plan(out_dir: str | os.PathLike, what: str, plan_dataset: Callable[[], P],
               write: Callable[[Path, P, int, bool], T], workers: int | None, verbose: bool) -> tuple[Path, P, T]:
    """A generator's ``generate``: check that ``out_dir`` is free (:func:`check_output_free`), plan, then
    ``write(tmp, plan, workers, verbose)`` atomically (:func:`write_atomically`; ``workers`` None: the
    :func:`default_workers`). Returns (``out_dir`` as a Path, the plan, what ``write`` returned)."""
    out = check_output_free(out_dir, what)
    plan = plan_dataset()
    written = write_atomically(out, lambda tmp: write(tmp, plan, default_workers() if workers is None else workers,
                                                      verbose))
    return out, plan, written


def write_atomically(out: Path, write: Callable[[Path], T]) -> T:
    """``write(tmp)`` into a temporary sibling of ``out`` (absent or empty), then rename it onto ``out``;
    returns what ``write`` returned. See the module docstring for interrupts."""
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    with exit_on_signals() as received:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
        try:
            result = write(tmp)
            if received:  # interrupted, but the handler's exception was dropped (see exit_on_signals)
                raise_for_signal(received[0])
            if out.exists():
                out.rmdir()  # empty, checked by the caller
            os.rename(tmp, out)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return result


_TEMP_PID = re.compile(r"\.tmp-(\d+)-")


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Delete the temporary siblings of ``out`` left by generating processes that no longer exist."""
    removed = []
    for tmp in out.parent.glob(f".{glob.escape(out.name)}.tmp-*"):
        match = _TEMP_PID.search(tmp.name[len(out.name) + 1:])
        if match and tmp.is_dir() and not _process_alive(int(match.group(1))):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def read_meta_file(root: str | os.PathLike, name: str, what: str) -> dict | None:
    """The description file ``name`` of a complete data set (written last), or None when ``root`` holds none."""
    path = Path(root) / name
    return read_json(path, what) if path.is_file() else None


def ensure_generated(root: Path, read_meta: Callable[[Path], dict | None], check: Callable[[dict], Path],
                     generate: Callable[[], Path]) -> Path:
    """``check(meta)`` of a complete data set in ``root``, else ``generate()``; when that fails because another
    process got there first (``FileExistsError``/``OSError`` and a complete data set now), ``check`` that."""
    meta = read_meta(root)
    if meta is not None:
        return check(meta)
    try:
        return generate()
    except (FileExistsError, OSError):
        meta = read_meta(root)  # another process may have finished first
        if meta is None:
            raise
        return check(meta)
