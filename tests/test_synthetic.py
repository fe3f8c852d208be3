"""The built-in long-tailed data set: determinism, LVIS v1 format, federated lists, bins, CLI, atomicity."""

from __future__ import annotations

import json
import math
import os
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stepwise.data import synthetic as syn
from stepwise.make_synthetic import main as cli_main

IMAGE_KEYS = {"id", "width", "height", "coco_url", "neg_category_ids", "not_exhaustive_category_ids"}
ANN_KEYS = {"id", "image_id", "category_id", "bbox", "area", "segmentation"}
CAT_KEYS = {"id", "name", "synset", "synonyms", "def", "frequency", "image_count", "instance_count"}


def lvis_frequency(image_count: int) -> str:
    """LVIS v1 thresholds, written out independently of the module."""
    return "r" if image_count <= 10 else ("c" if image_count <= 100 else "f")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return syn.generate(tmp_path_factory.mktemp("a") / "tiny", "tiny", seed=0, workers=1, verbose=False)


@pytest.fixture(scope="module")
def tiny_data(tiny) -> dict[str, dict]:
    return {split: json.loads((tiny / "annotations" / f"{split}.json").read_text()) for split in ("train", "val")}


def all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_differs(tiny, tmp_path):
    again = syn.generate(tmp_path / "again", "tiny", seed=0, workers=2, verbose=False)
    first, second = all_files(tiny), all_files(again)
    assert first.keys() == second.keys()
    assert sum(k.endswith(".png") for k in first) > 100
    assert [k for k in first if first[k] != second[k]] == []

    other = all_files(syn.generate(tmp_path / "other", "tiny", seed=1, workers=1, verbose=False))
    assert other["annotations/train.json"] != first["annotations/train.json"]
    shared_pngs = [k for k in first if k.endswith(".png") and k in other]
    assert shared_pngs and all(first[k] != other[k] for k in shared_pngs)


def test_lvis_v1_fields_and_lvis_api_loads(tiny, tiny_data):
    from lvis import LVIS

    for split, data in tiny_data.items():
        assert {"info", "licenses", "images", "annotations", "categories"} <= data.keys()
        for img in data["images"]:
            assert IMAGE_KEYS <= img.keys() and "file_name" not in img
            folder = "train2017" if split == "train" else "val2017"
            assert img["coco_url"] == f"http://synthetic.stepwise/{folder}/{img['id']:012d}.png"
        assert all(ANN_KEYS <= a.keys() for a in data["annotations"])
        assert all(CAT_KEYS <= c.keys() for c in data["categories"])
        assert [c["id"] for c in data["categories"]] == list(range(1, len(data["categories"]) + 1))
        api = LVIS(str(tiny / "annotations" / f"{split}.json"))
        assert len(api.get_img_ids()) == len(data["images"])
        assert len(api.get_ann_ids()) == len(data["annotations"])
    # As in LVIS, val.json carries the same categories block with train counts.
    assert tiny_data["val"]["categories"] == tiny_data["train"]["categories"]
    train_ids = {i["id"] for i in tiny_data["train"]["images"]}
    assert train_ids.isdisjoint(i["id"] for i in tiny_data["val"]["images"])


def test_frequency_and_counts_follow_train_annotations(tiny_data):
    images, instances = defaultdict(set), Counter()
    for a in tiny_data["train"]["annotations"]:
        images[a["category_id"]].add(a["image_id"])
        instances[a["category_id"]] += 1
    for c in tiny_data["train"]["categories"]:
        assert c["image_count"] == len(images[c["id"]]) >= 1
        assert c["instance_count"] == instances[c["id"]]
        assert c["frequency"] == lvis_frequency(c["image_count"])
    # tiny guarantees r, c and f, and a long tail: the head has >= 50x the rarest class.
    assert {c["frequency"] for c in tiny_data["train"]["categories"]} == {"r", "c", "f"}
    assert max(instances.values()) >= 50 * min(instances.values())
    # Val holds every class, enough of each to measure AP_r.
    val_counts = Counter(a["category_id"] for a in tiny_data["val"]["annotations"])
    assert set(val_counts) == set(instances) and min(val_counts.values()) >= 5


def test_images_exist_with_declared_size_and_boxes_inside(tiny, tiny_data):
    for data in tiny_data.values():
        sizes = {}
        for img in data["images"]:
            path = tiny / "images" / Path(*img["coco_url"].split("/")[-2:])
            with Image.open(path) as im:
                assert im.format == "PNG" and im.mode == "RGB"
                assert im.size == (img["width"], img["height"]), path
            sizes[img["id"]] = (img["width"], img["height"])
        for a in data["annotations"]:
            x, y, w, h = a["bbox"]
            width, height = sizes[a["image_id"]]
            assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= width and y + h <= height, a
            assert a["area"] == pytest.approx(w * h)
            assert a["segmentation"] == [[x, y, x + w, y, x + w, y + h, x, y + h]]
        per_image = Counter(a["image_id"] for a in data["annotations"])
        assert set(per_image) == set(sizes) and max(per_image.values()) <= 6


def test_federated_lists_are_truthful():
    plan = syn.plan_dataset("tiny", seed=0)
    n_not_exhaustive = 0
    for img in plan.splits["train"] + plan.splits["val"]:
        drawn = {o.category_id for o in img.objects}
        annotated = Counter(o.category_id for o in img.objects if o.annotated)
        assert drawn.isdisjoint(img.neg_category_ids)  # negatives verified absent, even undrawn-annotated ones
        assert img.neg_category_ids == sorted(set(img.neg_category_ids))
        unannotated = [o.category_id for o in img.objects if not o.annotated]
        assert img.not_exhaustive_category_ids == unannotated  # exactly the class left unannotated
        for cid in unannotated:
            assert annotated[cid] >= 1  # still present (annotated) in the image
        n_not_exhaustive += bool(unannotated)
    assert n_not_exhaustive >= 1
    assert np.mean([len(i.neg_category_ids) > 0 for i in plan.splits["val"]]) > 0.9


def test_solid_object_centre_has_its_class_colour(tiny, tiny_data):
    cats = {c.category_id: c for c in syn.plan_dataset("tiny", 0).classes}
    checked = 0
    by_image = defaultdict(list)
    for a in tiny_data["train"]["annotations"]:
        by_image[a["image_id"]].append(a)
    for img in tiny_data["train"]["images"][:40]:
        pixels = np.asarray(Image.open(tiny / "images" / "train2017" / f"{img['id']:012d}.png"), dtype=float)
        for a in by_image[img["id"]]:
            spec = cats[a["category_id"]]
            x, y, w, h = (int(v) for v in a["bbox"])
            overlapped = any(b is not a and not (b["bbox"][0] >= x + w or b["bbox"][0] + b["bbox"][2] <= x or
                                                 b["bbox"][1] >= y + h or b["bbox"][1] + b["bbox"][3] <= y)
                             for b in by_image[img["id"]])
            if spec.texture == "solid" and spec.shape in ("circle", "square", "diamond") and not overlapped:
                centre = pixels[y + h // 2 - 1:y + h // 2 + 2, x + w // 2 - 1:x + w // 2 + 2].reshape(-1, 3).mean(0)
                assert np.abs(centre - np.asarray(spec.rgb)).max() < 20, (img["id"], spec.name)
                checked += 1
    assert checked > 0


@pytest.mark.parametrize("shape", syn.SHAPES)
def test_shapes_fill_their_box_tightly(shape):
    mask = syn.shape_mask(shape, 23, 17)
    assert mask.shape == (17, 23)
    assert mask[0].any() and mask[-1].any() and mask[:, 0].any() and mask[:, -1].any()
    assert 0.25 < mask.mean() < 1.0 or shape == "square"


def test_small_plan_has_every_bin_without_rendering():
    plan = syn.plan_dataset("small", seed=0)
    s = plan.summary()
    assert 30 <= s["classes"] <= 50 and s["twins"] >= 2
    assert all(s["frequency_bins"][f] > 0 for f in "rcf"), s
    assert all(v > 0 for v in s["instance_bins"].values()), s
    assert 2000 <= s["train"]["images"] <= 3000 and 200 <= s["val"]["images"] <= 600
    assert s["val"]["classes_present"] == s["classes"] and s["val"]["min_instances_per_class"] >= 5
    p = syn.PRESETS["small"]
    for img in plan.splits["train"]:
        assert p.image_size[0] <= img.width <= p.image_size[1] and p.image_size[0] <= img.height <= p.image_size[1]
        assert p.objects_per_image[0] <= len(img.objects) <= p.objects_per_image[1]
    # Twins imitate a head class: same shape and colour family, tail rank.
    by_name = {c.name: c for c in plan.classes}
    for c in plan.classes:
        if c.twin_of:
            head = by_name[c.twin_of]
            assert c.shape == head.shape and c.colour.removeprefix("near_") == head.colour and c.rank > head.rank
            assert c.texture != head.texture or c.colour != head.colour
    assert len({(c.shape, c.colour, c.texture) for c in plan.classes}) == len(plan.classes)


def test_large_counts_plan():
    counts = syn.plan_instance_counts("large")
    assert len(counts) == syn.PRESETS["large"].num_classes >= 200
    assert np.all(np.diff(counts) <= 0)
    assert {syn.instance_bin(int(n)) for n in counts} == {0, 1, 2, 3}
    assert 10_000 <= counts.sum() / np.mean(syn.PRESETS["large"].objects_per_image) <= 100_000  # train images


def test_ensure_synthetic_reuses_and_refuses(tmp_path):
    root = tmp_path / "data"
    assert syn.ensure_synthetic(root, "tiny", 3, workers=1, verbose=False) == root
    stamp = (root / "annotations" / "train.json").stat().st_mtime_ns
    assert syn.ensure_synthetic(root, "tiny", 3, workers=1, verbose=False) == root
    assert (root / "annotations" / "train.json").stat().st_mtime_ns == stamp
    with pytest.raises(FileExistsError, match="seed=3"):
        syn.ensure_synthetic(root, "tiny", 4, workers=1, verbose=False)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="mine"):
        syn.ensure_synthetic(tmp_path / "mine", "tiny", 0, workers=1, verbose=False)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    def fail(root, plan, workers, verbose=True):
        (root / "images").mkdir()
        raise KeyboardInterrupt

    monkeypatch.setattr(syn, "_write_dataset", fail)
    with pytest.raises(KeyboardInterrupt):
        syn.generate(tmp_path / "out", "tiny", 0, verbose=False)
    assert list(tmp_path.iterdir()) == []


def _children(pid: int) -> list[int]:
    """PIDs whose parent is ``pid`` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _start_rendering(out: Path):
    """``make_synthetic`` of the small preset with 2 workers, returned once its workers render images."""
    import signal
    import subprocess
    import sys
    import time

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    # SIGINT as in a terminal even when the test run itself ignores it (a shell's background job: `cmd &`)
    proc = subprocess.Popen([sys.executable, "-m", "stepwise.make_synthetic", f"out={out}", "preset=small",
                             "workers=2"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        temps = list(out.parent.glob(f".{out.name}.tmp-*"))
        if temps and any((temps[0] / "images").rglob("*.png")) and len(_children(proc.pid)) >= 2:
            return proc, _children(proc.pid), temps[0]
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("make_synthetic did not start rendering within 120 s")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_killed_make_synthetic_leaves_no_workers_and_no_temporary(tmp_path, sig):
    # Before: SIGTERM left the pool workers blocked forever and the temporary directory (49 MB) behind.
    import signal
    import time

    out = tmp_path / "synthetic"
    proc, workers, temp = _start_rendering(out)
    proc.send_signal(getattr(signal, sig))
    assert proc.wait(timeout=60) != 0
    deadline = time.monotonic() + 10
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(w) for w in workers), "a rendering worker outlived make_synthetic"
    assert not temp.exists() and not out.exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigkilled_make_synthetic_workers_die_and_next_run_cleans_up(tmp_path):
    import signal
    import time

    out = tmp_path / "synthetic"
    proc, workers, temp = _start_rendering(out)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 10
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(w) for w in workers), "a worker outlived its SIGKILLed parent"
    assert temp.exists()  # nothing can clean up in the killed process itself ...
    assert syn.remove_stale_temporaries(out) == [temp]  # ... the next generate() does it first
    assert list(tmp_path.iterdir()) == []


def test_unknown_preset_is_named():
    with pytest.raises(ValueError, match="'huge'"):
        syn.plan_dataset("huge")


def test_cli_rejects_unknown_key_and_generates(tmp_path, capsys):
    assert cli_main([f"out={tmp_path / 'x'}", "colour=red"]) == 2
    assert "'colour'" in capsys.readouterr().err
    assert cli_main(["preset=tiny"]) == 2  # out is required
    assert cli_main([f"out={tmp_path / 'x'}", "seed=abc"]) == 2
    assert not (tmp_path / "x").exists()
    assert cli_main([f"out={tmp_path / 'x'}", "preset=tiny", "seed=0", "workers=1"]) == 0
    out = capsys.readouterr().out
    assert "r=" in out and "train:" in out and (tmp_path / "x" / "annotations" / "val.json").is_file()


def test_study_plan_is_lvis_like_and_has_a_large_val_split():
    """The ablation proxy: LVIS-like r/c/f shares, many rare classes, >= 19 val instances of every class."""
    s = syn.plan_dataset("study", seed=0).summary()
    bins = s["frequency_bins"]
    assert s["classes"] == 80 and bins["r"] >= 25 and bins["c"] >= 25 and bins["f"] >= 10, bins
    assert 1500 <= s["train"]["images"] <= 2200 and s["val"]["images"] >= 700, s
    assert s["val"]["classes_present"] == 80 and s["val"]["min_instances_per_class"] >= 19


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the dropped exception
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_interrupt_dropped_inside_a_finalizer_still_stops_generate(tmp_path, monkeypatch, sig):
    # Python drops an exception raised while the main thread runs a __del__ (here, a collected object
    # receiving the signal); before, the rendering then went on to the end and the data set was written.
    import signal

    class SignalsOnCollection:
        def __del__(self):
            os.kill(os.getpid(), getattr(signal, sig))

    def write(root, plan, workers, verbose=True):
        (root / "partial.png").write_bytes(b"")
        SignalsOnCollection()  # collected at once: the handler's exception is printed and dropped

    monkeypatch.setattr(syn, "_write_dataset", write)
    out = tmp_path / "synthetic"
    # Python's own SIGINT handler, as in a terminal (a background job of a shell starts with SIGINT ignored)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt if sig == "SIGINT" else SystemExit):
            syn.generate(out, "tiny", workers=1, verbose=False)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------- val negatives' density
def _neg_share(images, num_classes: int) -> float:
    absent = sum(num_classes - len({o.category_id for o in img.objects}) for img in images)
    return sum(len(img.neg_category_ids) for img in images) / absent


def test_preset_negatives_keep_the_recorded_bytes():
    """negatives=preset (the default) is what every recorded run was scored with: the val split's
    neg_category_ids are those of the generator before the option existed (hash of the study preset's,
    seed 0, computed with that generator), half of the absent classes (38.6 of 80 classes per image)."""
    import hashlib
    import json

    plan = syn.plan_dataset("study", 0)
    lists = [img.neg_category_ids for img in plan.splits["val"]]
    assert hashlib.sha256(json.dumps(lists).encode()).hexdigest()[:16] == "ed08b76b4e83794f"
    assert np.mean([len(x) for x in lists]) == pytest.approx(38.64, abs=0.01)
    assert _neg_share(plan.splits["val"], 80) == pytest.approx(0.5, abs=0.01)
    assert syn.val_file_name() == syn.val_file_name("preset") == "val.json"


@pytest.mark.parametrize("negatives, share", [("lvis", syn.LVIS_NEG_SHARE), (0.05, 0.05)])
def test_negatives_density_of_a_generated_val_split(negatives, share):
    """negatives=lvis lists each absent class with LVIS's probability (0.77 %: 942 negative labels over
    122,701 absent pairs in the LVIS API's val sample); a number is such a share. Only the val split's
    negatives change: the train split, every image, box and id stay the same."""
    assert syn.LVIS_NEG_SHARE == pytest.approx(942 / 122701) and 0.0076 < syn.LVIS_NEG_SHARE < 0.0078
    base, plan = syn.plan_dataset("study", 0), syn.plan_dataset("study", 0, negatives)
    val = plan.splits["val"]
    absent = sum(80 - len({o.category_id for o in img.objects}) for img in val)  # ~67,000 (image, class) pairs
    got = _neg_share(val, 80)
    assert abs(got - share) < 4 * math.sqrt(share * (1 - share) / absent)  # binomial, 4 standard deviations
    for a, b in zip(base.splits["val"], val):
        drawn = {o.category_id for o in b.objects}
        assert drawn.isdisjoint(b.neg_category_ids) and b.neg_category_ids == sorted(set(b.neg_category_ids))
        assert (a.id, a.width, a.height, a.objects, a.not_exhaustive_category_ids) == (
            b.id, b.width, b.height, b.objects, b.not_exhaustive_category_ids)
    assert [i.neg_category_ids for i in base.splits["train"]] == [i.neg_category_ids for i in plan.splits["train"]]
    assert syn.lvis_json(base, "train") == syn.lvis_json(plan, "train")


def test_ensure_synthetic_writes_the_val_file_of_a_density_once(tmp_path):
    root = tmp_path / "data"
    syn.ensure_synthetic(root, "tiny", 0, workers=1, verbose=False, negatives="lvis")
    files = sorted(p.name for p in (root / "annotations").iterdir())
    assert files == ["train.json", "val.json", "val_neg-lvis.json"]
    val, lvis = syn.load_split(root, "val"), json.loads((root / "annotations" / "val_neg-lvis.json").read_text())
    assert lvis["annotations"] == val["annotations"] and lvis["categories"] == val["categories"]
    assert [{k: v for k, v in i.items() if k != "neg_category_ids"} for i in lvis["images"]] == \
        [{k: v for k, v in i.items() if k != "neg_category_ids"} for i in val["images"]]
    stamp = (root / "annotations" / "val_neg-lvis.json").stat().st_mtime_ns
    syn.ensure_synthetic(root, "tiny", 0, workers=1, verbose=False, negatives="lvis")
    assert (root / "annotations" / "val_neg-lvis.json").stat().st_mtime_ns == stamp
    assert syn.val_file_name(0.05) == "val_neg-0.05.json"
    for bad in ("bogus", 1.5, -0.1, True):
        with pytest.raises(ValueError, match="negatives"):
            syn.negatives_share(bad)


def test_config_selects_the_val_file_of_the_density():
    from stepwise.config import ConfigError, load_config, validate_config

    assert load_config([]).data.val_ann.endswith("synthetic_small_seed0/annotations/val.json")
    assert load_config(["data.negatives=lvis"]).data.val_ann.endswith("/annotations/val_neg-lvis.json")
    assert load_config(["data.negatives=0.05"]).data.val_ann.endswith("/annotations/val_neg-0.05.json")
    with pytest.raises(ConfigError, match="data.negatives"):
        validate_config(load_config(["data.negatives=bogus"]))
