"""The toy world: determinism, edits and their inverses, the noise model, the judge, the dataset format."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from hive import toy


def arrays_equal(a: Image.Image, b: Image.Image) -> bool:
    return np.array_equal(np.asarray(a), np.asarray(b))


def test_same_seed_same_example_and_different_seeds_differ():
    a, b, c = toy.sample_example(42), toy.sample_example(42), toy.sample_example(43)
    assert a.edit.instruction == b.edit.instruction
    assert arrays_equal(a.input_image, b.input_image) and arrays_equal(a.clean_image, b.clean_image)
    assert not (a.edit.instruction == c.edit.instruction and arrays_equal(a.input_image, c.input_image))


def test_scene_vocabulary_meets_the_spec():
    assert len(toy.SHAPES) >= 3 and len(toy.COLOURS) >= 6 and len(toy.SIZES) == 2 and len(toy.BACKGROUNDS) >= 4
    rng = np.random.default_rng(0)
    counts = {len(toy.random_scene(rng).objects) for _ in range(200)}
    assert counts == {1, 2, 3}


def test_scene_size_is_configurable():
    ex = toy.sample_example(5, size=96)
    assert ex.input_image.size == (96, 96)


@pytest.mark.parametrize("kind", toy.EDIT_KINDS)
def test_every_kind_has_three_phrasings_or_more(kind):
    verbs = set()
    for seed in range(300):
        ex = toy.sample_example(seed, kind=kind)
        assert ex.edit.kind == kind
        verbs.add(" ".join(ex.edit.instruction.split()[:2]))
    assert len(verbs) >= 3, verbs


def test_referring_expressions_pick_exactly_one_object():
    rng = np.random.default_rng(1)
    for _ in range(200):
        scene = toy.random_scene(rng)
        for i, obj in enumerate(scene.objects):
            for expr in toy.referring_expressions(scene, i):
                matches = [o for o in scene.objects if _fits(expr, o)]
                assert matches == [obj], (expr, scene)


def _fits(expr: str, o: toy.ToyObject) -> bool:
    words = expr.split()
    if o.shape not in words:
        return False
    if any(c in words and c != o.colour for c in toy.COLOURS):
        return False
    if any(s in words and s != o.size for s in toy.SIZES):
        return False
    cells = [c for c in toy.CELLS if expr.endswith(" " + toy.location_phrase(c))]
    if cells:  # the longest phrase wins: "at the top left" over "at the top"... which it ends with only if equal
        return o.cell == max(cells, key=lambda c: len(toy.location_phrase(c)))
    return True


@pytest.mark.parametrize("kind", toy.EDIT_KINDS)
def test_instruction_and_inverse_say_what_was_done(kind):
    """An independent reading of the words: the instruction turns source into target, and the
    inverse instruction turns target back into source (up to the jitter, which words cannot say)."""
    for seed in range(60):
        ex = toy.sample_example(seed, kind=kind)
        assert _layout(_apply(ex.edit.source, ex.edit.instruction)) == _layout(ex.edit.target), ex.edit.instruction
        assert _layout(_apply(ex.edit.target, ex.edit.inverse_instruction)) == _layout(ex.edit.source), \
            (ex.edit.instruction, ex.edit.inverse_instruction)


def _layout(scene: toy.Scene) -> tuple:
    return scene.background, tuple(sorted((o.cell, o.shape, o.colour, o.size) for o in scene.objects))


def _resolve(scene: toy.Scene, expr: str) -> int:
    matches = [i for i, o in enumerate(scene.objects) if _fits(expr, o)]
    assert len(matches) == 1, (expr, scene)
    return matches[0]


def _cell_named(name: str) -> tuple[int, int]:
    return next(c for c, n in toy.CELL_NAMES.items() if n == name)


def _apply(scene: toy.Scene, text: str) -> toy.Scene:
    import dataclasses
    import re

    w = text.split()
    if "background" in w:
        return toy.Scene(scene.objects, w[-1])
    m = re.fullmatch(r"(add|put|draw) a (\w+) (\w+) (\w+) (at|on|in) the (.+)", text)
    if m:
        new = toy.ToyObject(m[4], m[3], m[2], _cell_named(m[6]), (0.0, 0.0))
        return toy.Scene(scene.objects + (new,), scene.background)
    m = re.fullmatch(r"(remove|delete|take away|get rid of) (the .+)", text)
    if m:
        return scene.replace(_resolve(scene, m[2]), None)
    m = re.fullmatch(r"(move|shift|slide) (the .+) to the (.+)", text)
    if m:
        i = _resolve(scene, m[2])
        return scene.replace(i, dataclasses.replace(scene.objects[i], cell=_cell_named(m[3])))
    for pattern, size in ((r"make (the .+) (bigger|larger)", "large"), (r"(enlarge|increase the size of) (the .+)", "large"),
                          (r"make (the .+) smaller", "small"), (r"(shrink|reduce the size of) (the .+)", "small")):
        m = re.fullmatch(pattern, text)
        if m:
            i = _resolve(scene, m[1] if m[1].startswith("the ") else m[2])
            return scene.replace(i, dataclasses.replace(scene.objects[i], size=size))
    m = re.fullmatch(r"change the colour of (the .+) to (\w+)", text) or re.fullmatch(r"(?:make|turn|paint) (the .+) (\w+)", text)
    if m:
        i = _resolve(scene, m[1])
        return scene.replace(i, dataclasses.replace(scene.objects[i], colour=m[2]))
    raise AssertionError(f"cannot read {text!r}")


def test_judge_passes_clean_target_and_fails_source_for_every_kind():
    for seed in range(120):
        ex = toy.sample_example(seed)
        assert toy.judge(ex.input_image, ex.clean_image, ex.clean_image).success, ex.edit.instruction
        assert not toy.judge(ex.input_image, ex.clean_image, ex.input_image).success, ex.edit.instruction


def test_judge_fails_every_corruption_kind():
    seen = set()
    for seed in range(300):
        ex = toy.sample_example(seed, noise=1.0)
        assert ex.corruption in toy.CORRUPTIONS
        seen.add(ex.corruption)
        if arrays_equal(ex.edited_image, ex.clean_image):
            continue  # a corruption can coincide with the clean target only if it changed nothing visible
        assert not toy.judge(ex.input_image, ex.clean_image, ex.edited_image).success, (ex.corruption, ex.edit.instruction)
    assert seen == set(toy.CORRUPTIONS)


def test_judge_tolerates_blur_at_edges_but_not_a_wrong_colour():
    ex = toy.sample_example(7, kind="recolour")
    blurred = ex.clean_image.resize((32, 32), Image.Resampling.BILINEAR).resize((64, 64), Image.Resampling.BILINEAR)
    assert toy.judge(ex.input_image, ex.clean_image, blurred).following > 0.6
    wrong = np.asarray(ex.clean_image).copy()
    changed = np.any(np.asarray(ex.input_image) != np.asarray(ex.clean_image), axis=-1)
    wrong[changed] = (0, 0, 0)
    assert not toy.judge(ex.input_image, ex.clean_image, Image.fromarray(wrong)).success


def test_noise_rate_is_respected():
    n = 400
    corrupted = sum(toy.sample_example(s, noise=0.3).corruption is not None for s in range(n))
    assert 0.22 * n < corrupted < 0.38 * n


def test_write_dataset_format(tmp_path):
    path = toy.write_dataset(tmp_path, n=6, seed=10, noise=0.5, progress=False)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 6
    for row in rows:
        for key in ("id", "input_image", "edit_prompt", "edited_image", "clean_image", "kind", "inverse_prompt",
                    "corruption"):
            assert key in row
        for key in ("input_image", "edited_image", "clean_image"):
            assert not row[key].startswith("/")
            assert Image.open(tmp_path / row[key]).size == (64, 64)
        assert row["kind"] in toy.EDIT_KINDS
    again = toy.write_dataset(tmp_path / "again", n=6, seed=10, noise=0.5, progress=False)
    assert again.read_text() == path.read_text()


def test_generated_tokenizer_keeps_toy_words_whole(tmp_path):
    from transformers import CLIPTokenizer

    from hive.tokenizer import write_tokenizer

    tok = CLIPTokenizer.from_pretrained(write_tokenizer(tmp_path / "tok"))
    for word in toy.vocabulary():
        ids = tok(word, add_special_tokens=False).input_ids
        assert len(ids) == 1, word
    # text outside the toy vocabulary still tokenizes, byte by byte
    assert len(tok("zebra!", add_special_tokens=False).input_ids) > 1


def test_following_pixels_are_what_the_judge_reads():
    for seed in range(40):
        ex = toy.sample_example(seed)
        for output in (ex.clean_image, ex.input_image):
            read, right = toy.following_pixels(ex.input_image, ex.clean_image, output)
            judgement = toy.judge(ex.input_image, ex.clean_image, output)
            assert read.any()
            assert judgement.following == pytest.approx(float(right[read].mean()))
        read, right = toy.following_pixels(ex.input_image, ex.clean_image, ex.input_image)
        assert not right[read].all()  # the unedited source is wrong somewhere the edit should change


def test_editor_mistakes_put_the_named_change_in_the_wrong_place_and_the_judge_fails_them():
    """Each mistake keeps the instruction's colour or place (what `corrupt` randomises) and is
    still a failed edit; a move as a copy keeps the object at its old place too."""
    seen = set()
    for seed in range(200):
        ex = toy.sample_example(seed)
        mistake = toy.editor_mistake(ex.edit, np.random.default_rng(seed))
        if ex.edit.kind == "background":
            assert mistake is None
        if mistake is None:
            continue
        image, name = mistake
        assert name in toy.EDITOR_MISTAKES
        seen.add((ex.edit.kind, name))
        assert not toy.judge(ex.input_image, ex.clean_image, image).success, (name, ex.edit.instruction)
        pixels = np.asarray(image).reshape(-1, 3)
        if ex.edit.kind in ("recolour", "add"):  # the named colour is there
            named = ex.edit.target.objects[-1 if ex.edit.kind == "add" else ex.edit.touched[0]].colour
            assert (pixels == toy.COLOURS[named]).all(-1).any()
        if name == "move_as_copy":  # the object drawn at both places: more of its colour than the target
            colour = toy.COLOURS[ex.edit.source.objects[ex.edit.touched[0]].colour]
            target = np.asarray(ex.clean_image).reshape(-1, 3)
            assert (pixels == colour).all(-1).sum() > (target == colour).all(-1).sum()
    assert {name for _, name in seen} == set(toy.EDITOR_MISTAKES)
    assert {kind for kind, _ in seen} == {"add", "remove", "recolour", "move", "resize"}
