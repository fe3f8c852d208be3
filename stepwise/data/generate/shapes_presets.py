"""The shape data set's vocabulary and plan types: presets, class looks, planned images and the plan.

:mod:`stepwise.data.synthetic` describes the data set; :mod:`.shapes_plan` fills a :class:`DatasetPlan`,
:mod:`.shapes_render` draws it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from stepwise.data.generate.common import PlannedImage, count_classes, lvis_category, preset_named
from stepwise.utils.bins import instance_bin_index

# LVIS's density of verified-absent classes: an image's neg_category_ids hold this share of the classes it
# does not contain. Measured on the LVIS API's published val sample (github lvis-dataset/lvis-api,
# data/lvis_val_100.json: 100 randomly sampled LVIS v0.5 val images, 1,230 categories): 942 negative labels
# over 122,701 absent (image, class) pairs = 0.768 %; per image 9.42 negatives (median 8, range 0-15) next to
# 2.99 positive classes. docs/faithfulness.md, "Evaluation".
LVIS_NEG_SHARE = 942 / 122701
NEGATIVES = ("preset", "lvis")  # or a share in [0, 1]

SHAPES = ("circle", "square", "triangle", "ring", "cross", "star", "diamond", "frame", "halfdisk", "hourglass")
COLOURS = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 30),
    "lime": (150, 230, 40),
    "green": (20, 140, 50),
    "cyan": (30, 210, 220),
    "blue": (30, 80, 225),
    "purple": (130, 50, 200),
    "magenta": (230, 40, 200),
    "pink": (255, 150, 190),
    "brown": (125, 75, 25),
    "black": (20, 20, 20),
}
TEXTURES = ("solid", "striped", "dotted")

# The names of the BAGS instance-count bins (stepwise.utils.bins).
INSTANCE_BIN_NAMES = ("<10", "10-100", "100-1000", ">=1000")

Box = tuple[int, int, int, int]  # x, y, w, h in integer pixels


@dataclass(frozen=True)
class Preset:
    """Size and difficulty of a synthetic data set.

    The number of images follows from the instance counts: objects are dealt to images in groups of
    ``objects_per_image`` (uniform), so train images ~= sum(train counts) / mean objects per image.
    ``required_frequencies`` / ``required_instance_bins`` are what the preset guarantees to be
    non-empty; :func:`plan_dataset` raises if a plan breaks them.
    """

    name: str
    num_classes: int
    max_instances: int  # train instances of the most frequent class
    min_instances: int  # train instances of the rarest class
    zipf_offset: float  # b in n_k ~ (k + 1 + b)^-s; larger b flattens the head
    objects_per_image: tuple[int, int]  # inclusive range, annotated + unannotated
    image_size: tuple[int, int]  # inclusive range of width and of height, px
    object_size: tuple[int, int]  # range of an object's longer side, px (shrunk to fit crowded images)
    val_fraction: float  # val instances of a class = max(val_min_instances, round(val_fraction * train))
    val_min_instances: int
    neg_fraction: float  # share of the absent classes listed in neg_category_ids
    not_exhaustive_fraction: float  # share of images with one instance left unannotated
    twin_fraction: float  # share of classes that are tail twins of head classes
    required_frequencies: str  # subset of "rcf"
    required_instance_bins: tuple[int, ...]  # indices into INSTANCE_BIN_NAMES


PRESETS: dict[str, Preset] = {
    # For tests: ~150 train / ~30 val images of 64-96 px, 10 classes, generated in about a second. The
    # head class sits in >100 train images, so r, c and f are all non-empty; with ~500 train instances
    # no class reaches 1,000, so tiny guarantees the <10, 10-100 and 100-1000 instance bins only.
    "tiny": Preset(
        name="tiny", num_classes=10, max_instances=300, min_instances=2, zipf_offset=3.0,
        objects_per_image=(1, 6), image_size=(64, 96), object_size=(12, 40),
        val_fraction=0.1, val_min_instances=8, neg_fraction=0.5, not_exhaustive_fraction=0.05,
        twin_fraction=0.2, required_frequencies="rcf", required_instance_bins=(0, 1, 2),
    ),
    # The CPU demo: ~2,300 train / ~320 val images of 128-160 px, 40 classes, every bin non-empty.
    "small": Preset(
        name="small", num_classes=40, max_instances=1500, min_instances=4, zipf_offset=30.0,
        objects_per_image=(1, 6), image_size=(128, 160), object_size=(16, 72),
        val_fraction=0.12, val_min_instances=8, neg_fraction=0.5, not_exhaustive_fraction=0.03,
        twin_fraction=0.15, required_frequencies="rcf", required_instance_bins=(0, 1, 2, 3),
    ),
    # The ablation-study proxy (configs/data/synthetic_study.yaml, docs/study.md): ~1,800 train / ~870 val
    # images of 72-96 px, 80 classes (32 rare, 33 common, 15 frequent), so that a CPU epoch is short, APr
    # averages over many classes and the val split is large (>= 20 instances of every class).
    "study": Preset(
        name="study", num_classes=80, max_instances=600, min_instances=3, zipf_offset=20.0,
        objects_per_image=(1, 5), image_size=(72, 96), object_size=(14, 40),
        val_fraction=0.3, val_min_instances=20, neg_fraction=0.5, not_exhaustive_fraction=0.03,
        twin_fraction=0.15, required_frequencies="rcf", required_instance_bins=(0, 1, 2),
    ),
    # For GPU runs: ~30,000 train / ~3,500 val images of 160-224 px, 300 classes.
    "large": Preset(
        name="large", num_classes=300, max_instances=4000, min_instances=2, zipf_offset=150.0,
        objects_per_image=(1, 6), image_size=(160, 224), object_size=(16, 96),
        val_fraction=0.08, val_min_instances=8, neg_fraction=0.3, not_exhaustive_fraction=0.03,
        twin_fraction=0.15, required_frequencies="rcf", required_instance_bins=(0, 1, 2, 3),
    ),
}


@dataclass(frozen=True)
class ClassSpec:
    """One category: its LVIS id (1..C, alphabetical by name), frequency rank (0 = most instances) and look."""

    category_id: int
    rank: int
    name: str
    shape: str
    colour: str
    rgb: tuple[int, int, int]
    texture: str
    twin_of: str | None = None  # name of the head class this tail class imitates

    @property
    def definition(self) -> str:
        return f"a {self.colour.replace('_', ' ')} {self.shape} with a {self.texture} fill"


@dataclass
class ObjectPlan:
    """One drawn object; ``box`` is (x, y, w, h) in integer pixels. Unannotated objects are drawn only."""

    category_id: int
    box: Box
    annotated: bool = True


@dataclass
class ImagePlan(PlannedImage):
    """One image: (id, split, width, height,) objects in drawing order, and its federated category lists."""

    objects: list[ObjectPlan]
    neg_category_ids: list[int] = field(default_factory=list)
    not_exhaustive_category_ids: list[int] = field(default_factory=list)


@dataclass
class DatasetPlan:
    """Everything about a data set except its pixels."""

    preset: Preset
    seed: int
    classes: list[ClassSpec]  # ordered by category id
    splits: dict[str, list[ImagePlan]]

    def train_counts(self) -> tuple[dict[int, int], dict[int, int]]:
        """(image_count, instance_count) per category id over the annotated train objects."""
        images, instances = count_classes([o.category_id for o in img.objects if o.annotated]
                                          for img in self.splits["train"])
        return dict(images), dict(instances)

    def categories(self) -> list[dict]:
        """The LVIS ``categories`` block, with frequency and counts from the train split."""
        image_count, instance_count = self.train_counts()
        out = []
        for c in self.classes:
            n_img = image_count.get(c.category_id, 0)
            if n_img == 0:
                raise ValueError(f"synthetic category {c.category_id} ({c.name}) has no annotated train image")
            out.append(lvis_category(c.category_id, c.name, [c.name], c.definition, n_img,
                                     instance_count.get(c.category_id, 0)))
        return out

    def summary(self) -> dict:
        """Counts per split, classes per frequency bin and per training instance-count bin."""
        cats = self.categories()
        freq = Counter(c["frequency"] for c in cats)
        bins = Counter(instance_bin(c["instance_count"]) for c in cats)
        out = {
            "preset": self.preset.name,
            "seed": self.seed,
            "classes": len(cats),
            "frequency_bins": {k: freq.get(k, 0) for k in "rcf"},
            "instance_bins": {name: bins.get(i, 0) for i, name in enumerate(INSTANCE_BIN_NAMES)},
            "twins": sum(c.twin_of is not None for c in self.classes),
        }
        for split, images in self.splits.items():
            objs = [o for img in images for o in img.objects]
            out[split] = {
                "images": len(images),
                "instances": sum(o.annotated for o in objs),
                "unannotated": sum(not o.annotated for o in objs),
                "classes_present": len({o.category_id for o in objs if o.annotated}),
                "min_instances_per_class": min(Counter(o.category_id for o in objs if o.annotated).values()),
            }
        return out


def instance_bin(instance_count: int) -> int:
    """Index of the BAGS instance-count bin (<10, 10-100, 100-1000, >=1000) of a class (``INSTANCE_BIN_NAMES``)."""
    return instance_bin_index(instance_count)


def get_preset(preset: str | Preset) -> Preset:
    """Look a preset up by name (error lists the known ones) or pass a :class:`Preset` through."""
    return preset_named(preset, PRESETS, Preset, "synthetic")


def negatives_share(negatives: str | float) -> float | None:
    """The share of absent classes ``negatives`` lists: None for ``preset`` (the preset's ``neg_fraction``,
    an exact count per image), :data:`LVIS_NEG_SHARE` for ``lvis``, else the number itself (in [0, 1])."""
    if isinstance(negatives, str):
        if negatives == "preset":
            return None
        if negatives == "lvis":
            return LVIS_NEG_SHARE
        try:
            negatives = float(negatives)
        except ValueError:
            raise ValueError(f"negatives must be one of {NEGATIVES} or a share in [0, 1], got {negatives!r}") from None
    if isinstance(negatives, bool) or not isinstance(negatives, (int, float)) or not 0.0 <= float(negatives) <= 1.0:
        raise ValueError(f"negatives must be one of {NEGATIVES} or a share in [0, 1], got {negatives!r}")
    return float(negatives)


def val_file_name(negatives: str | float = "preset") -> str:
    """The val annotation file (under ``annotations/``) with ``negatives``: ``val.json`` for ``preset``,
    ``val_neg-lvis.json``, ``val_neg-0.05.json`` (a share, as ``%g``) otherwise."""
    share = negatives_share(negatives)
    if share is None:
        return "val.json"
    return "val_neg-lvis.json" if negatives == "lvis" else f"val_neg-{share:g}.json"

