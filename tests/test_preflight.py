"""Preflight checks before training: the val file as the evaluator loads it, every image (exists, header,
size; decoded for small sets), an empty training set, and ``python -m stepwise.check``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from stepwise.config import load_config
from stepwise.data.preflight import check_images
from stepwise.stages.parts import PreflightError, build_datasets, build_loaders, preflight


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory) -> Path:
    from stepwise.data.synthetic import generate

    return generate(tmp_path_factory.mktemp("tiny") / "data", "tiny", 0, workers=1, verbose=False)


@pytest.fixture
def tiny(tiny_source, tmp_path) -> Path:
    """A private copy of the tiny synthetic set (tests plant problems in it)."""
    return Path(shutil.copytree(tiny_source, tmp_path / "data"))


def config(root: Path, *extra: str):
    return load_config(["data.preset=tiny", f"data.root={root}", *extra])


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def image_file(root: Path, split: str, k: int) -> tuple[int, Path]:
    image = json.loads((root / "annotations" / f"{split}.json").read_text())["images"][k]
    return image["id"], root / "images" / Path(image["coco_url"]).parent.name / Path(image["coco_url"]).name


def plant_bad_images(root: Path) -> dict[str, int]:
    """A missing and a truncated train image and a val image of the wrong size; returns their ids."""
    missing, path = image_file(root, "train", 3)
    path.unlink()
    truncated, path = image_file(root, "train", 20)
    path.write_bytes(path.read_bytes()[:200])
    resized, path = image_file(root, "val", 2)
    with Image.open(path) as im:
        im.resize((im.width + 5, im.height)).save(path)
    return {"missing": missing, "truncated": truncated, "resized": resized}


def test_val_category_without_frequency_stops_the_stage_before_training(tiny, tmp_path, capsys):
    # Before: the run trained, then failed in evaluation with "ground-truth dict: category 1 ... frequency
    # None" (no file named). Now the stage stops before any checkpoint or metrics line is written, with the
    # message alone (no traceback) and exit status 1.
    import re

    from stepwise.run import main

    edit_json(tiny / "annotations" / "val.json", lambda d: d["categories"][0].pop("frequency"))
    with pytest.raises(SystemExit) as exit_info:
        main(["stage=pretrain", "data.preset=tiny", f"data.root={tiny}", f"output_root={tmp_path / 'runs'}",
              "exp=pf", "stage.max_steps=2", "stage.trackers=[]"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "Traceback" not in err
    assert re.search(r"stepwise: pretrain: preflight found problems .*validation annotation file .*val.json cannot be "
                     r"evaluated: .*val.json: category 1 .*frequency None.*training file .*train.json gives every "
                     r"category a frequency", err, re.S), err
    run_dir = tmp_path / "runs" / "pf" / "pretrain"
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "metrics.jsonl").exists()


def test_every_bad_image_is_named_in_one_report(tiny):
    bad = plant_bad_images(tiny)
    cfg = config(tiny)
    train, val = build_datasets(cfg)
    with pytest.raises(PreflightError) as err:
        preflight(cfg, train, val)  # tiny: ~180 images, under preflight_decode_max, so decoded
    text = str(err.value)
    assert "2 bad train image(s)" in text and "1 bad val image(s)" in text
    assert f"image {bad['missing']}: file " in text and "not found" in text
    assert f"image {bad['truncated']}: cannot decode" in text
    assert f"image {bad['resized']}: " in text and "but the annotation file says" in text
    # headers only (large sets): the missing and the resized image, not the truncated one
    header_problems = check_images(train, decode=False, progress=False) + check_images(val, progress=False)
    assert sorted(p.image_id for p in header_problems) == sorted([bad["missing"], bad["resized"]])


def test_preflight_switch_and_val_limit(tiny):
    bad = plant_bad_images(tiny)
    cfg = config(tiny, "data.preflight=false")
    train, val = build_datasets(cfg)
    build_loaders(cfg, train, val)  # skipped: no error
    limited = config(tiny, f"stage.max_eval_images={2}", "data.preflight_decode_max=0")
    with pytest.raises(PreflightError) as err:
        build_loaders(limited, train, val)
    assert f"image {bad['missing']}" in str(err.value) and "val image" not in str(err.value)  # val image 2 unused


def test_training_set_without_boxes_is_an_error(tiny):
    edit_json(tiny / "annotations" / "train.json", lambda d: d.update(annotations=[]))
    cfg = config(tiny, "data.preflight=false")
    train, val = build_datasets(cfg)
    with pytest.raises(ValueError, match=r"training annotation file .*train.json has no usable boxes in its "
                                         r"\d+ images: nothing to train on"):
        build_loaders(cfg, train, val)


def test_check_cli_lists_every_bad_image(tiny, capsys):
    from stepwise.check import main

    assert main([f"data.root={tiny}", "data.preset=tiny"]) == 0
    assert "train and" in capsys.readouterr().out
    bad = plant_bad_images(tiny)
    assert main([f"data.root={tiny}", "data.preset=tiny", "decode=true", "workers=2"]) == 1
    err = capsys.readouterr().err
    assert all(f"image {i}: " in err for i in bad.values())
    assert main([f"data.root={tiny}", "decode=maybe"]) == 2
