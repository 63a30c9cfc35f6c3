"""The editor: one batched call for K variants, reproducible seeds, every image a user may bring,
clear refusals, the reward suffix, and the SD-1.5-shaped path."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from hive.editor import Editor, EditorInputError, load_image


def png_bytes(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture()
def scene():
    from hive import toy

    return toy.sample_example(3)


def test_k_variants_with_per_variant_seeds_and_records(tiny_editor, scene):
    result = tiny_editor.edit(scene.input_image, scene.edit.instruction, variants=3, seed=10, steps=2)
    assert len(result.images) == 3
    assert [r.seed for r in result.records] == [10, 11, 12]
    rec = result.records_json()[0]
    for key in ("seed", "steps", "guidance", "image_guidance", "instruction", "prompt", "model", "resolution", "scheduler"):
        assert key in rec
    assert all(im.size == scene.input_image.size for im in result.images)
    # variants differ from one another (different noise)
    assert not np.array_equal(np.asarray(result.images[0]), np.asarray(result.images[1]))


def test_seeds_reproduce_also_with_another_k(tiny_editor, scene):
    a = tiny_editor.edit(scene.input_image, scene.edit.instruction, variants=3, seed=5, steps=3)
    b = tiny_editor.edit(scene.input_image, scene.edit.instruction, variants=3, seed=5, steps=3)
    c = tiny_editor.edit(scene.input_image, scene.edit.instruction, variants=1, seed=6, steps=3)
    for x, y in zip(a.images, b.images):
        assert np.array_equal(np.asarray(x), np.asarray(y))
    diff = np.abs(np.asarray(a.images[1], dtype=int) - np.asarray(c.images[0], dtype=int)).max()
    assert diff <= 2  # same seed alone or in a batch: same variant up to float rounding


def _modes():
    rgb = Image.new("RGB", (50, 30), (200, 30, 30))
    rgba = Image.new("RGBA", (40, 40), (0, 0, 255, 0))
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE)
    gray = rgb.convert("L")
    sixteen = Image.fromarray((np.arange(40 * 40).reshape(40, 40) * 40).astype(np.uint16))
    la = gray.convert("LA")
    cmyk = rgb.convert("CMYK")
    return {"rgb": rgb, "rgba": rgba, "palette": palette, "gray": gray, "16-bit": sixteen, "la": la, "cmyk": cmyk}


@pytest.mark.parametrize("mode", list(_modes()))
def test_every_image_mode_edits_back_to_its_own_size(tiny_editor, mode):
    img = _modes()[mode]
    fmt = "JPEG" if mode == "cmyk" else "PNG"
    result = tiny_editor.edit(png_bytes(img, fmt), "make the red circle blue", variants=1, seed=0, steps=1)
    assert result.images[0].mode == "RGB"
    assert result.images[0].size == img.size


def test_rgba_transparency_is_composited_on_white():
    img = load_image(png_bytes(Image.new("RGBA", (8, 8), (0, 0, 255, 0))))
    assert img.getpixel((0, 0)) == (255, 255, 255)


def test_sixteen_bit_is_scaled_not_clipped():
    arr = np.full((4, 4), 65535, dtype=np.uint16)
    arr[0, 0] = 0
    img = load_image(png_bytes(Image.fromarray(arr)))
    assert img.getpixel((1, 1)) == (255, 255, 255) and img.getpixel((0, 0)) == (0, 0, 0)


def test_exif_rotation_is_applied():
    img = Image.new("RGB", (60, 20), (10, 200, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = png_bytes(img, "JPEG", exif=exif.tobytes())
    assert load_image(data).size == (20, 60)


def test_any_aspect_ratio(tiny_editor):
    img = Image.new("RGB", (300, 17), (30, 30, 200))
    result = tiny_editor.edit(img, "make the background white", variants=2, seed=1, steps=1)
    assert [im.size for im in result.images] == [(300, 17), (300, 17)]


@pytest.mark.parametrize("data, message", [
    (b"this is not an image", "not an image"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "not an image"),
])
def test_non_images_are_refused(tiny_editor, data, message):
    with pytest.raises(EditorInputError, match=message):
        tiny_editor.edit(data, "make it blue", variants=1, steps=1)


def test_huge_image_is_refused_before_decoding():
    big = png_bytes(Image.new("L", (10_000, 10_000)))
    with pytest.raises(EditorInputError, match="too large"):
        load_image(big)


@pytest.mark.parametrize("instruction, message", [
    ("", "empty"), ("   \n\t", "empty"), ("x" * 60_000, "too long"), ("red " * 40, "too long"),
])
def test_bad_instructions_are_refused(tiny_editor, scene, instruction, message):
    with pytest.raises(EditorInputError, match=message):
        tiny_editor.edit(scene.input_image, instruction, variants=1, steps=1)


def test_bad_variant_count_is_refused(tiny_editor, scene):
    with pytest.raises(EditorInputError, match="variants"):
        tiny_editor.edit(scene.input_image, "make the background white", variants=9, steps=1)


def test_reward_suffix_is_appended_by_the_model_folder(tiny_pipeline, tmp_path, scene):
    import shutil

    folder = tmp_path / "conditioned"
    shutil.copytree(tiny_pipeline, folder)
    (folder / "hive.json").write_text(json.dumps({"reward_suffix": ", image quality is five out of five"}))
    editor = Editor(folder, device="cpu")
    result = editor.edit(scene.input_image, "make the background white", variants=1, seed=0, steps=1)
    assert result.records[0].prompt == "make the background white, image quality is five out of five"
    assert result.records[0].instruction == "make the background white"


def test_model_folder_sets_its_default_sampling(tiny_pipeline, tmp_path, scene):
    import shutil

    from hive.defaults import DEFAULT_GUIDANCE, DEFAULT_IMAGE_GUIDANCE

    plain = Editor(tiny_pipeline, device="cpu")
    assert plain.settings() == (20, DEFAULT_GUIDANCE, DEFAULT_IMAGE_GUIDANCE)
    folder = tmp_path / "tuned"
    shutil.copytree(tiny_pipeline, folder)
    (folder / "hive.json").write_text(json.dumps({"sampling": {"guidance": 3.0, "steps": 2}}))
    editor = Editor(folder, device="cpu")
    assert editor.settings() == (2, 3.0, DEFAULT_IMAGE_GUIDANCE)
    assert editor.settings(5, 6.0, 1.2) == (5, 6.0, 1.2)  # a caller's values win
    rec = editor.edit(scene.input_image, "make the background white", variants=1, seed=0).records[0]
    assert (rec.steps, rec.guidance, rec.image_guidance) == (2, 3.0, DEFAULT_IMAGE_GUIDANCE)
    # the defaults are the same function as passing the values: identical pixels
    same = editor.edit(scene.input_image, "make the background white", variants=1, seed=0, steps=2, guidance=3.0,
                       image_guidance=DEFAULT_IMAGE_GUIDANCE).images[0]
    default = editor.edit(scene.input_image, "make the background white", variants=1, seed=0).images[0]
    assert np.array_equal(np.asarray(same), np.asarray(default))
    (folder / "hive.json").write_text(json.dumps({"sampling": {"guidanse": 3.0}}))
    with pytest.raises(ValueError, match="guidanse"):
        Editor(folder, device="cpu")


def test_sd15_shaped_pipeline_loads_and_edits_through_the_same_path(tmp_path, scene):
    from tests.conftest import build_tiny_pipeline

    folder = build_tiny_pipeline(tmp_path / "sd15", sd15_shaped=True)
    editor = Editor(folder, device="cpu")
    assert editor.pipe.unet.config.in_channels == 8
    assert len(editor.pipe.unet.down_blocks) == 4
    result = editor.edit(scene.input_image, "make the background white", variants=2, seed=0, steps=1)
    assert len(result.images) == 2


def test_cli_edit_single_and_dataset(tiny_pipeline, tmp_path):
    from hive import toy
    from hive.cli import main

    ex = toy.sample_example(11)
    src = tmp_path / "in.png"
    ex.input_image.save(src)
    out = tmp_path / "out"
    assert main(["edit", "--model", str(tiny_pipeline), "--image", str(src), "--instruction", ex.edit.instruction,
                 "--variants", "2", "--seed", "4", "--steps", "1", "--out", str(out)]) == 0
    meta = json.loads((out / "variants.json").read_text())
    assert [v["seed"] for v in meta["variants"]] == [4, 5]
    assert all((out / v["file"]).exists() for v in meta["variants"])

    data = tmp_path / "data"
    toy.write_dataset(data, n=3, seed=0, progress=False)
    out2 = tmp_path / "out2"
    assert main(["edit", "--model", str(tiny_pipeline), "--data", str(data), "--variants", "2", "--steps", "1",
                 "--out", str(out2)]) == 0
    rows = [json.loads(line) for line in (out2 / "metadata.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["toy-00000000", "toy-00000001", "toy-00000002"]
    assert all(len(r["output_images"]) == 2 and (out2 / r["output_images"][0]).exists() for r in rows)


def test_cli_edit_refuses_bad_input_and_writes_nothing(tiny_pipeline, tmp_path, capsys):
    from hive.cli import main

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    out = tmp_path / "out"
    assert main(["edit", "--model", str(tiny_pipeline), "--image", str(bad), "--instruction", "make it red",
                 "--out", str(out)]) == 2
    assert "not an image" in capsys.readouterr().err
    assert not out.exists()
