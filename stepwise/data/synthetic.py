"""The built-in long-tailed detection data set: deterministic, LVIS v1 format, no download.

Every class is a learnable visual pattern (shape x colour x texture) drawn on a mildly textured, noisy
background. Training instance counts follow a Zipf-Mandelbrot law n_k ~ (k + 1 + b)^-s over the frequency
rank k, pinned so the head class has ``max_instances`` and the rarest ``min_instances``; a few tail
classes are "twins" of head classes (same shape and colour with another texture, or the same pattern in
a near hue). The val split holds every class (at least ``val_min_instances`` each) so AP_r is measurable.

Annotation is federated like LVIS on both splits: ``neg_category_ids`` lists a random subset of the
classes verified absent from the image; for a small fraction of images one instance of a class present
twice or more is drawn but left unannotated, and that class goes into ``not_exhaustive_category_ids``.

How many absent classes the val split lists (``negatives``, ``data.negatives``): ``preset`` (the default,
what every recorded run was scored with) lists the preset's ``neg_fraction`` of them (half, on every preset
but ``large``: ~39 of 80 classes per image on ``study``); ``lvis`` lists each absent class with probability
:data:`LVIS_NEG_SHARE` = 0.77 %, the density of LVIS's val annotation; a number in [0, 1] is such a share.
The density decides how a confident detection of an absent class is scored: federated evaluation counts
it as a false positive only where the class is listed. With ``negatives`` other than ``preset`` the data
directory is unchanged and an extra file ``annotations/val_neg-<lvis|share>.json`` holds the val split with
those negatives (same images, boxes and ids; :func:`val_file_name`, written by :func:`ensure_synthetic`).

Generation has two steps: :func:`plan_dataset` decides everything (classes, counts, boxes, federated
ids) without drawing a pixel; :func:`generate` renders the plan to PNG files and writes
``annotations/{train,val}.json``. The same seed gives the same bytes.

The parts: :mod:`stepwise.data.generate.shapes_presets` (presets, class looks, plan types),
:mod:`~stepwise.data.generate.shapes_plan` (planning), :mod:`~stepwise.data.generate.shapes_render` (drawing)
and :mod:`~stepwise.data.generate.common` (what the emoji generator shares: the output directory, the
rendering pool, the LVIS records); this module writes a data set and re-exports their public names.

Layout of a generated directory::

    DIR/images/train2017/000000000001.png   (train images; val images under val2017/)
    DIR/annotations/train.json, val.json     (LVIS v1; images have coco_url, no file_name)
    DIR/synthetic.json                        (preset, seed, class designs, summary; written last)
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

from stepwise.data.generate.common import (
    SPLIT_FOLDERS,
    ensure_generated,
    frequency_of,
    lvis_annotation,
    lvis_document,
    lvis_image,
    make_split_folders,
    read_meta_file,
    remove_stale_temporaries,
    render_batches,
    write_plan,
)
from stepwise.data.generate.shapes_plan import design_classes, plan_dataset, plan_instance_counts
from stepwise.data.generate.shapes_presets import (
    COLOURS,
    INSTANCE_BIN_NAMES,
    LVIS_NEG_SHARE,
    NEGATIVES,
    PRESETS,
    SHAPES,
    TEXTURES,
    ClassSpec,
    DatasetPlan,
    ImagePlan,
    ObjectPlan,
    Preset,
    get_preset,
    instance_bin,
    negatives_share,
    val_file_name,
)
from stepwise.data.generate.shapes_render import render_batch, render_image, shape_mask, texture_mask
from stepwise.utils.io import atomic_write_json, read_json

FORMAT_VERSION = 1
URL_ROOT = "http://synthetic.stepwise"
META_FILE = "synthetic.json"


# ----------------------------------------------------------------------------------------------------
# Writing


def lvis_json(plan: DatasetPlan, split: str, annotation_id_start: int = 1) -> dict:
    """The LVIS v1 dict of one split (categories with train counts in both splits, as LVIS does)."""
    images, annotations = [], []
    ann_id = annotation_id_start
    for img in plan.splits[split]:
        images.append(lvis_image(img, URL_ROOT, "2024-01-01 00:00:00"))
        for o in img.objects:
            if not o.annotated:
                continue
            x, y, w, h = (float(v) for v in o.box)
            annotations.append(lvis_annotation(ann_id, img.id, o.category_id, [x, y, w, h], w * h))
            ann_id += 1
    return lvis_document(f"stepwise synthetic long-tailed set, preset {plan.preset.name}, seed {plan.seed}",
                         URL_ROOT, FORMAT_VERSION, "2024-01-01",
                         {"name": "CC0 1.0", "url": "https://creativecommons.org/publicdomain/zero/1.0/"},
                         images, annotations, plan.categories())


def format_summary(summary: dict) -> str:
    """A few human-readable lines from :meth:`DatasetPlan.summary`."""
    f, b = summary["frequency_bins"], summary["instance_bins"]
    lines = [f"synthetic preset={summary['preset']} seed={summary['seed']}: {summary['classes']} classes "
             f"({summary['twins']} look-alike tail twins)",
             f"  classes per frequency bin (train images): r={f['r']} c={f['c']} f={f['f']}",
             "  classes per train instance bin: " + " ".join(f"{k}:{v}" for k, v in b.items())]
    for split in ("train", "val"):
        s = summary[split]
        lines.append(f"  {split}: {s['images']} images, {s['instances']} instances "
                     f"(+{s['unannotated']} drawn unannotated), {s['classes_present']} classes, "
                     f">= {s['min_instances_per_class']} instances per class")
    return "\n".join(lines)



def _write_dataset(root: Path, plan: DatasetPlan, workers: int, verbose: bool = True) -> None:
    make_split_folders(root)
    classes = {c.category_id: c for c in plan.classes}
    images = plan.splits["train"] + plan.splits["val"]
    chunk = 64
    jobs = [(str(root / "images"), images[i:i + chunk], classes, plan.seed) for i in range(0, len(images), chunk)]
    render_batches(jobs, render_batch, lambda n: n, workers, len(images), f"render {plan.preset.name}", verbose)
    train = lvis_json(plan, "train")
    atomic_write_json(root / "annotations" / "train.json", train)
    atomic_write_json(root / "annotations" / "val.json", lvis_json(plan, "val", len(train["annotations"]) + 1))
    meta = {"format_version": FORMAT_VERSION, "preset": plan.preset.name, "seed": plan.seed,
            "preset_params": asdict(plan.preset), "summary": plan.summary(),
            "classes": [asdict(c) for c in plan.classes]}
    atomic_write_json(root / META_FILE, meta, indent=1)


def generate(out_dir: str | os.PathLike, preset: str | Preset = "small", seed: int = 0,
             workers: int | None = None, verbose: bool = True) -> Path:
    """Render the (preset, seed) data set into ``out_dir``, which must not exist yet (or be empty).

    Everything is written into a temporary sibling directory that is renamed onto ``out_dir`` at the
    end, so an interrupted run leaves no ``out_dir``. The temporary directory and the rendering workers go
    away on any exit: an exception, Ctrl-C, SIGTERM or SIGHUP (turned into exceptions while this runs
    in the main thread with the default handlers); after a SIGKILL the workers die with their parent
    (Linux) and the next call removes the dead process's temporary directory. ``workers`` processes
    render images (default: up to 8 CPUs); the bytes do not depend on it. Returns ``out_dir``.
    """
    out, plan, _ = write_plan(out_dir, "synthetic data output", lambda: plan_dataset(preset, seed), _write_dataset,
                              workers, verbose)
    if verbose:
        print(f"wrote {out}\n{format_summary(plan.summary())}", flush=True)
    return out


def read_meta(root: str | os.PathLike) -> dict | None:
    """The ``synthetic.json`` of a complete data set, or None when ``root`` holds none."""
    return read_meta_file(root, META_FILE, "synthetic data description")


def ensure_synthetic(root: str | os.PathLike, preset: str | Preset = "small", seed: int = 0,
                     workers: int | None = None, verbose: bool = True, negatives: str | float = "preset") -> Path:
    """Return ``root`` holding the (preset, seed) data set, generating it on first use.

    A no-op when ``root`` is complete for the same preset and seed. Raises ``FileExistsError`` when
    ``root`` holds something else (another preset/seed, or files that are not a complete data set), so
    nothing the user made is overwritten. Safe when several processes call it at once. With ``negatives``
    other than ``preset`` the val file of that density (:func:`write_val_negatives`) is written too, once.
    """
    p = get_preset(preset)
    root = Path(root)
    negatives_share(negatives)  # a bad value fails before anything is rendered
    made = _ensure_base(root, p, seed, workers, verbose)
    if negatives_share(negatives) is not None:
        write_val_negatives(made, p, seed, negatives, verbose)
    return made


def write_val_negatives(root: str | os.PathLike, preset: str | Preset, seed: int, negatives: str | float,
                        verbose: bool = True) -> Path:
    """Write ``annotations/<val_file_name(negatives)>`` of a generated data set unless it exists: the val
    split of (preset, seed) with that density of ``neg_category_ids``, everything else as ``val.json``
    (annotation ids included). Returns its path."""
    path = Path(root) / "annotations" / val_file_name(negatives)
    if path.is_file():
        return path
    plan = plan_dataset(preset, seed, negatives)
    train_annotations = sum(o.annotated for img in plan.splits["train"] for o in img.objects)
    data = lvis_json(plan, "val", train_annotations + 1)
    atomic_write_json(path, data)
    if verbose:
        n = sum(len(i["neg_category_ids"]) for i in data["images"])
        print(f"wrote {path}: {n / max(len(data['images']), 1):.2f} verified-absent classes per val image", flush=True)
    return path


def _ensure_base(root: Path, p: Preset, seed: int, workers: int | None, verbose: bool) -> Path:
    """:func:`ensure_synthetic` without the extra val file."""

    def check(meta: dict) -> Path:
        found = (meta.get("preset"), meta.get("seed"), meta.get("format_version"))
        if found != (p.name, int(seed), FORMAT_VERSION):
            raise FileExistsError(
                f"{root} holds synthetic data preset={meta.get('preset')} seed={meta.get('seed')} "
                f"format={meta.get('format_version')}, not preset={p.name} seed={seed} format={FORMAT_VERSION}; "
                "use another root or delete it")
        return root

    return ensure_generated(root, read_meta, check, lambda: generate(root, p, seed, workers=workers, verbose=verbose))


def load_split(root: str | os.PathLike, split: str) -> dict:
    """Read ``annotations/<split>.json`` of a generated data set."""
    return read_json(Path(root) / "annotations" / f"{split}.json", f"synthetic {split} annotations")


__all__ = [
    "PRESETS", "Preset", "ClassSpec", "ObjectPlan", "ImagePlan", "DatasetPlan", "plan_instance_counts",
    "design_classes", "plan_dataset", "render_image", "shape_mask", "texture_mask", "lvis_json",
    "generate", "ensure_synthetic", "read_meta", "load_split", "format_summary", "frequency_of",
    "instance_bin", "LVIS_NEG_SHARE", "NEGATIVES", "negatives_share", "val_file_name", "write_val_negatives",
]

# Names of the parts, importable from here as before.
_REEXPORTED = (SPLIT_FOLDERS, COLOURS, SHAPES, TEXTURES, INSTANCE_BIN_NAMES, ClassSpec, ImagePlan, ObjectPlan,
               design_classes, plan_instance_counts, render_image, shape_mask, texture_mask, frequency_of,
               instance_bin, get_preset, remove_stale_temporaries, read_json, LVIS_NEG_SHARE, NEGATIVES, PRESETS,
               negatives_share, val_file_name)
