"""``python -m stepwise.visualize``: a checkpoint's predictions drawn to PNG files; the drawing helpers."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from stepwise.analysis.draw import Style, class_color, display_scale, draw_boxes
from stepwise.visualize import Predictor, find_images, main, output_names, read_image


@pytest.fixture(scope="module")
def trained(tmp_path_factory, make_untrained_checkpoint):
    root = tmp_path_factory.mktemp("vis")
    path, cfg = make_untrained_checkpoint(root)
    images = root / "some_images"
    images.mkdir()
    for src in sorted((root / "data" / "images" / "val2017").iterdir())[:2]:
        shutil.copy(src, images / src.name)
    return {"checkpoint": path, "cfg": cfg, "images": images}


# ------------------------------------------------------------------------------------------- drawing
def test_class_colors_are_distinct_and_stable():
    colors = [class_color(k) for k in range(40)]
    assert len(set(colors)) == 40 and colors == [class_color(k) for k in range(40)]
    close = [(a, b) for a in range(10) for b in range(a + 1, 10)
             if sum(abs(x - y) for x, y in zip(colors[a], colors[b])) < 60]
    assert not close


def test_small_images_are_enlarged_and_styles_grow_with_size():
    assert display_scale(128, 96, 384) == 4 and display_scale(160, 192, 384) == 3
    assert display_scale(1024, 768, 384) == 1 and display_scale(100, 80, 0) == 1
    small, large = Style.for_size(384, 384), Style.for_size(1333, 800)
    assert small.font_size >= 12 and small.line_width >= 2
    assert large.font_size > small.font_size and large.line_width > small.line_width
    with pytest.raises(ValueError, match="size"):
        display_scale(0, 10, 384)


def test_draw_boxes_solid_and_dashed():
    image = Image.new("RGB", (200, 200), (0, 0, 0))
    red, green = (255, 0, 0), (0, 255, 0)
    style = Style(line_width=2, font_size=12, dash=6)
    draw_boxes(image, torch.tensor([[50.0, 60.0, 150.0, 160.0]]), ["cat 0.90"], [red], style=style)
    draw_boxes(image, [[10, 170, 190, 195]], ["dog"], [green], dashed=True, style=style)
    # solid outline: every pixel of the left edge below the label is the class colour
    assert all(image.getpixel((50, y)) == red for y in range(80, 160))
    # label above the box, filled with the class colour
    assert image.getpixel((52, 50)) == red
    # dashed outline: the bottom edge alternates colour and gaps
    bottom = [image.getpixel((x, 195)) for x in range(100, 190)]
    assert green in bottom and (0, 0, 0) in bottom
    with pytest.raises(ValueError, match="2 texts"):
        draw_boxes(image, [[0, 0, 1, 1]], ["a", "b"], [red])


# -------------------------------------------------------------------------------------------- inputs
def test_find_images_dir_file_glob(tmp_path):
    for name in ("b.png", "a.jpg", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert find_images(tmp_path) == [tmp_path / "a.jpg", tmp_path / "b.png"]
    assert find_images(tmp_path / "b.png") == [tmp_path / "b.png"]
    assert find_images(str(tmp_path / "*.png")) == [tmp_path / "b.png"]
    with pytest.raises(FileNotFoundError, match="nothing.png"):
        find_images(tmp_path / "nothing.png")
    with pytest.raises(FileNotFoundError, match=r"\*\.gif"):
        find_images(str(tmp_path / "*.gif"))


def test_output_names_stay_distinct(tmp_path):
    paths = [tmp_path / "a" / "x.jpg", tmp_path / "b" / "x.jpg", tmp_path / "a" / "y.png"]
    assert output_names(paths) == ["a__x.png", "b__x.png", "a__y.png"]
    assert output_names(paths[1:]) == ["x.png", "y.png"]


def test_unreadable_image_names_the_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png"):
        read_image(bad)


# ---------------------------------------------------------------------------------------------- CLI
def test_writes_one_png_per_image_of_the_enlarged_size(trained, tmp_path):
    out = tmp_path / "out"
    rc = main([f"checkpoint={trained['checkpoint']}", f"images={trained['images']}", f"out={out}",
               "score_threshold=0", "max_dets=5", f"gt={trained['cfg'].data.val_ann}"])
    assert rc == 0
    for src in sorted(trained["images"].iterdir()):
        drawn = Image.open(out / f"{src.stem}.png")
        original = Image.open(src)
        factor = display_scale(*original.size, 384)
        assert factor > 1 and drawn.size == (original.width * factor, original.height * factor)
        plain = original.convert("RGB").resize(drawn.size, Image.Resampling.LANCZOS)
        assert not np.array_equal(np.asarray(drawn.convert("RGB")), np.asarray(plain))  # boxes were drawn


def test_original_size_default_out_and_threshold(trained):
    image = sorted(trained["images"].iterdir())[0]
    # random weights score ~0.01: a threshold of 0.99 draws nothing, min_side=0 keeps the size
    assert main([f"checkpoint={trained['checkpoint'].parent}", f"images={image}", "min_side=0",
                 "score_threshold=0.99"]) == 0
    drawn = trained["checkpoint"].parent / "visualize" / f"{image.stem}.png"
    original = Image.open(image).convert("RGB")
    assert np.array_equal(np.asarray(Image.open(drawn).convert("RGB")), np.asarray(original))


def test_predictions_match_the_evaluation_pipeline(trained):
    """Visualize's single-image path gives the detections the evaluation's predictor gives."""
    from stepwise.trained import load_trained_model
    from stepwise.data import build_dataset, collate

    model = load_trained_model(trained["checkpoint"])
    dataset = build_dataset(model.config.data, "val", categories=model.categories)
    predictor = Predictor.from_trained(model, max_dets=5)
    with torch.no_grad():
        records = predictor.predict_batch(model.model, collate([dataset[0]]))
    ours = predictor(read_image(dataset.path(0)))
    expected = records[0]  # per-image columns: score, category_id, bbox (x, y, w, h)
    assert np.asarray(expected["score"]).tolist() == pytest.approx(ours.scores.tolist(), abs=1e-5)
    assert np.asarray(expected["category_id"]).tolist() == [model.categories.ids[int(c)] for c in ours.labels]
    assert ours.category_ids == np.asarray(expected["category_id"]).tolist()
    assert ours.names == [model.categories.names[int(c)] for c in ours.labels]
    x0, y0, x1, y1 = ours.boxes[0].tolist()
    assert np.asarray(expected["bbox"]).reshape(-1, 4)[0].tolist() == pytest.approx([x0, y0, x1 - x0, y1 - y0],
                                                                                    abs=1e-3)


def test_bad_checkpoint_image_and_arguments(trained, tmp_path, capsys):
    missing = tmp_path / "nope.pt"
    assert main([f"checkpoint={missing}", f"images={trained['images']}"]) == 1
    assert f"checkpoint not found: {missing}" in capsys.readouterr().err

    not_a_checkpoint = tmp_path / "junk.pt"
    not_a_checkpoint.write_bytes(b"junk")
    assert main([f"checkpoint={not_a_checkpoint}", f"images={trained['images']}"]) == 1
    assert "junk.pt cannot be read" in capsys.readouterr().err

    images = tmp_path / "mixed"
    images.mkdir()
    good = sorted(trained["images"].iterdir())[0]
    shutil.copy(good, images / good.name)
    (images / "zzz_broken.png").write_bytes(b"garbage")
    out = tmp_path / "out"
    assert main([f"checkpoint={trained['checkpoint']}", f"images={images}", f"out={out}"]) == 1
    assert "zzz_broken.png" in capsys.readouterr().err
    assert (out / f"{good.stem}.png").is_file() and not (out / "zzz_broken.png").exists()

    assert main([f"checkpoint={trained['checkpoint']}", f"images={images}", "data.no_such_key=1"]) == 2
    assert "data.no_such_key" in capsys.readouterr().err
    assert main([f"images={images}"]) == 2
    assert main([f"checkpoint={trained['checkpoint']}", f"images={images}", "max_dets=many"]) == 2
