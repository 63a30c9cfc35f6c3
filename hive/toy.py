"""The toy world: scenes of flat shapes, edits of the paper's six kinds, a training-noise model
and a ground-truth judge.

It is a miniature of real instruction-guided editing that the project can train end to end on a
CPU and judge exactly. Everything is deterministic from a seed. Rendering is aliased (no
anti-aliasing), so every pixel has one palette colour and the judge can compare images exactly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

from hive.files import save_png_atomic, write_jsonl_atomic

DEFAULT_SIZE = 64

SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
    "black": (25, 25, 25),
    "pink": (250, 185, 200),
    "cyan": (120, 215, 225),
}
SIZES = ("small", "large")
# Object radius as a fraction of the image side; a large object still fits its grid cell.
RADIUS = {"small": 5 / 64, "large": 8 / 64}
JITTER = 2 / 64

# Grid cells (row, col) and the words for them.
CELLS = [(r, c) for r in range(3) for c in range(3)]
CELL_NAMES = {
    (0, 0): "top left", (0, 1): "top", (0, 2): "top right",
    (1, 0): "left", (1, 1): "center", (1, 2): "right",
    (2, 0): "bottom left", (2, 1): "bottom", (2, 2): "bottom right",
}
# "at the top left" reads better than "in the top left"; "on the left" than "at the left".
CELL_PREPOSITION = {(1, 0): "on", (1, 2): "on", (1, 1): "in"}

EDIT_KINDS = ("add", "remove", "recolour", "move", "resize", "background")
CORRUPTIONS = ("wrong_object", "partial", "extra_change", "no_change")


def location_phrase(cell: tuple[int, int]) -> str:
    return f"{CELL_PREPOSITION.get(cell, 'at')} the {CELL_NAMES[cell]}"


@dataclass(frozen=True)
class ToyObject:
    shape: str
    colour: str
    size: str
    cell: tuple[int, int]
    jitter: tuple[float, float]  # offset from the cell centre, in fractions of the image side


@dataclass(frozen=True)
class Scene:
    objects: tuple[ToyObject, ...]
    background: str

    def caption(self) -> str:
        parts = [f"a {o.size} {o.colour} {o.shape} {location_phrase(o.cell)}" for o in self.objects]
        return ", ".join(parts) + f" on a {self.background} background"

    def render(self, size: int = DEFAULT_SIZE) -> Image.Image:
        img = Image.new("RGB", (size, size), BACKGROUNDS[self.background])
        draw = ImageDraw.Draw(img)
        for obj in self.objects:
            draw_object(draw, obj, size)
        return img

    def empty_cells(self) -> list[tuple[int, int]]:
        used = {o.cell for o in self.objects}
        return [c for c in CELLS if c not in used]

    def replace(self, index: int, obj: ToyObject | None) -> "Scene":
        objects = list(self.objects)
        if obj is None:
            objects.pop(index)
        else:
            objects[index] = obj
        return Scene(tuple(objects), self.background)

    def to_json(self) -> dict:
        return {"background": self.background, "objects": [dataclasses.asdict(o) for o in self.objects]}

    @staticmethod
    def from_json(data: dict) -> "Scene":
        objs = tuple(
            ToyObject(o["shape"], o["colour"], o["size"], tuple(o["cell"]), tuple(o["jitter"]))  # type: ignore[arg-type]
            for o in data["objects"]
        )
        return Scene(objs, data["background"])


def draw_object(draw: ImageDraw.ImageDraw, obj: ToyObject, size: int) -> None:
    cx = (obj.cell[1] + 0.5) / 3 * size + obj.jitter[0] * size
    cy = (obj.cell[0] + 0.5) / 3 * size + obj.jitter[1] * size
    r = RADIUS[obj.size] * size
    fill = COLOURS[obj.colour]
    if obj.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif obj.shape == "square":
        s = r * 0.9
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
    elif obj.shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}")


def random_object(rng: np.random.Generator, cell: tuple[int, int]) -> ToyObject:
    jitter = tuple(float(v) for v in rng.uniform(-JITTER, JITTER, size=2))
    return ToyObject(
        shape=SHAPES[rng.integers(len(SHAPES))],
        colour=list(COLOURS)[rng.integers(len(COLOURS))],
        size=SIZES[rng.integers(len(SIZES))],
        cell=cell,
        jitter=jitter,  # type: ignore[arg-type]
    )


def random_scene(rng: np.random.Generator, max_objects: int = 3) -> Scene:
    n = int(rng.integers(1, max_objects + 1))
    cells = [CELLS[i] for i in rng.choice(len(CELLS), size=n, replace=False)]
    objects = tuple(random_object(rng, c) for c in cells)
    return Scene(objects, list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))])


# ---------------------------------------------------------------- referring expressions
def referring_expressions(scene: Scene, index: int) -> list[str]:
    """Every description from our templates that picks object `index` and no other."""
    o = scene.objects[index]
    templates = [
        (lambda x: (x.shape,), f"the {o.shape}"),
        (lambda x: (x.colour, x.shape), f"the {o.colour} {o.shape}"),
        (lambda x: (x.size, x.shape), f"the {o.size} {o.shape}"),
        (lambda x: (x.shape, x.cell), f"the {o.shape} {location_phrase(o.cell)}"),
        (lambda x: (x.colour, x.shape, x.cell), f"the {o.colour} {o.shape} {location_phrase(o.cell)}"),
    ]
    found = []
    for key, text in templates:
        matches = [x for x in scene.objects if key(x) == key(o)]
        if len(matches) == 1:
            found.append(text)
    return found  # the last template is always unique: one object per cell


def refer(scene: Scene, index: int, rng: np.random.Generator) -> str:
    options = referring_expressions(scene, index)
    return options[int(rng.integers(len(options)))]


def describe_for_adding(o: ToyObject) -> str:
    return f"a {o.size} {o.colour} {o.shape} {location_phrase(o.cell)}"


# ---------------------------------------------------------------- edits
@dataclass(frozen=True)
class Edit:
    kind: str
    instruction: str
    inverse_instruction: str
    source: Scene
    target: Scene
    # which object indices of the source the edit touches (empty for add/background)
    touched: tuple[int, ...] = field(default=())


def _pick(rng: np.random.Generator, options: list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def resize_grows(edit: Edit) -> bool:
    """A resize that makes its object large (a grow), not small (a shrink)."""
    if edit.kind != "resize":
        raise ValueError(f"not a resize: {edit.kind}")
    return edit.target.objects[edit.touched[0]].size == "large"


def make_edit(scene: Scene, kind: str, rng: np.random.Generator) -> Edit | None:
    """One edit of `kind` on `scene`, or None when the scene does not allow it."""
    n = len(scene.objects)
    if kind == "add":
        empty = scene.empty_cells()
        if not empty or n >= 4:
            return None
        new = random_object(rng, empty[int(rng.integers(len(empty)))])
        target = Scene(scene.objects + (new,), scene.background)
        desc = describe_for_adding(new)
        instruction = _pick(rng, [f"add {desc}", f"put {desc}", f"draw {desc}"])
        inverse = f"remove {refer(target, n, rng)}"
        return Edit(kind, instruction, inverse, scene, target, ())
    if n == 0 and kind != "background":
        return None
    i = int(rng.integers(n)) if n else 0
    if kind == "remove":
        o = scene.objects[i]
        ref = refer(scene, i, rng)
        instruction = _pick(rng, [f"remove {ref}", f"delete {ref}", f"take away {ref}", f"get rid of {ref}"])
        return Edit(kind, instruction, f"add {describe_for_adding(o)}", scene, scene.replace(i, None), (i,))
    if kind == "recolour":
        o = scene.objects[i]
        colour = _pick(rng, [c for c in COLOURS if c != o.colour])
        target = scene.replace(i, dataclasses.replace(o, colour=colour))
        ref = refer(scene, i, rng)
        instruction = _pick(rng, [f"make {ref} {colour}", f"turn {ref} {colour}",
                                  f"change the colour of {ref} to {colour}", f"paint {ref} {colour}"])
        inverse = f"make {refer(target, i, rng)} {o.colour}"
        return Edit(kind, instruction, inverse, scene, target, (i,))
    if kind == "move":
        o = scene.objects[i]
        empty = scene.empty_cells()
        cell = empty[int(rng.integers(len(empty)))]
        target = scene.replace(i, dataclasses.replace(o, cell=cell))
        ref = refer(scene, i, rng)
        where = f"to the {CELL_NAMES[cell]}"
        instruction = _pick(rng, [f"move {ref} {where}", f"shift {ref} {where}", f"slide {ref} {where}"])
        inverse = f"move {refer(target, i, rng)} to the {CELL_NAMES[o.cell]}"
        return Edit(kind, instruction, inverse, scene, target, (i,))
    if kind == "resize":
        o = scene.objects[i]
        ref = refer(scene, i, rng)
        grow = o.size == "small"
        target = scene.replace(i, dataclasses.replace(o, size="large" if grow else "small"))
        ref_after = refer(target, i, rng)
        bigger = ["make {} bigger", "make {} larger", "enlarge {}", "increase the size of {}"]
        smaller = ["make {} smaller", "shrink {}", "reduce the size of {}"]
        instruction = _pick(rng, bigger if grow else smaller).format(ref)
        inverse = _pick(rng, smaller if grow else bigger).format(ref_after)
        return Edit(kind, instruction, inverse, scene, target, (i,))
    if kind == "background":
        bg = _pick(rng, [b for b in BACKGROUNDS if b != scene.background])
        target = Scene(scene.objects, bg)
        instruction = _pick(rng, [f"change the background to {bg}", f"make the background {bg}",
                                  f"turn the background {bg}", f"paint the background {bg}"])
        return Edit(kind, instruction, f"make the background {scene.background}", scene, target, ())
    raise ValueError(f"unknown edit kind {kind!r}")


def random_edit(rng: np.random.Generator, kind: str | None = None) -> Edit:
    while True:
        scene = random_scene(rng)
        k = kind if kind is not None else EDIT_KINDS[int(rng.integers(len(EDIT_KINDS)))]
        edit = make_edit(scene, k, rng)
        if edit is not None:
            return edit


# ---------------------------------------------------------------- training noise
def corrupt(edit: Edit, rng: np.random.Generator, size: int = DEFAULT_SIZE) -> tuple[Image.Image, str]:
    """A wrong target like those of automatically generated datasets, and the corruption's name."""
    kind = CORRUPTIONS[int(rng.integers(len(CORRUPTIONS)))]
    source = edit.source
    if kind == "no_change":
        return source.render(size), kind
    if kind == "partial":
        src = np.asarray(source.render(size))
        tgt = np.asarray(edit.target.render(size))
        changed = np.any(src != tgt, axis=-1)
        ys, xs = np.nonzero(changed)
        out = tgt.copy()
        if len(xs):
            # keep only the left (or top) half of the change
            if rng.random() < 0.5:
                keep = np.arange(size)[None, :] <= (xs.min() + xs.max()) / 2
            else:
                keep = np.arange(size)[:, None] <= (ys.min() + ys.max()) / 2
            out = np.where((changed & ~keep)[..., None], src, tgt)
        return Image.fromarray(out.astype(np.uint8)), kind
    if kind == "wrong_object":
        others = [j for j in range(len(source.objects)) if j not in edit.touched]
        if edit.kind in ("remove", "recolour", "move", "resize") and others:
            # same kind of edit, applied to another object
            j = others[int(rng.integers(len(others)))]
            wrong = _apply_like(edit, source, j, rng)
            if wrong is not None:
                return wrong.render(size), kind
        if edit.kind == "background":
            bg = _pick(rng, [b for b in BACKGROUNDS if b not in (source.background, edit.target.background)])
            return Scene(edit.target.objects, bg).render(size), kind
        if edit.kind == "add":
            new = edit.target.objects[-1]
            colour = _pick(rng, [c for c in COLOURS if c != new.colour])
            return Scene(source.objects + (dataclasses.replace(new, colour=colour),), source.background).render(size), kind
        kind = "extra_change"  # nothing else to pick: fall through
    # extra_change: the right edit plus an unwanted recolour of another object (or of the background)
    target = edit.target
    candidates = [j for j in range(len(target.objects)) if j not in edit.touched and
                  not (edit.kind == "add" and j == len(target.objects) - 1)]
    if candidates:
        j = candidates[int(rng.integers(len(candidates)))]
        o = target.objects[j]
        target = target.replace(j, dataclasses.replace(o, colour=_pick(rng, [c for c in COLOURS if c != o.colour])))
    else:
        target = Scene(target.objects, _pick(rng, [b for b in BACKGROUNDS if b != target.background]))
    return target.render(size), "extra_change"


EDITOR_MISTAKES = ("named_change_on_other_object", "move_as_copy", "added_elsewhere")


def editor_mistake(edit: Edit, rng: np.random.Generator, size: int = DEFAULT_SIZE) -> tuple[Image.Image, str] | None:
    """The edit done wrong the way a diffusion editor gets it wrong, and the mistake's name; None
    when the edit allows none (a background). `corrupt` models a dataset's noise, whose wrong
    object gets a random colour or cell, so a model learns from it only that the named colour or
    place did not appear; an editor puts the *named* colour or place on the wrong object, or draws
    a moved object at its new place and leaves it at the old one (docs/reward.md, session 28)."""
    source, target = edit.source, edit.target
    if edit.kind == "add":
        new = target.objects[-1]
        other_cells = [c for c in source.empty_cells() if c != new.cell]
        if not other_cells:
            return None
        moved = dataclasses.replace(new, cell=other_cells[int(rng.integers(len(other_cells)))])
        return Scene(source.objects + (moved,), source.background).render(size), "added_elsewhere"
    if edit.kind not in ("remove", "recolour", "move", "resize"):
        return None
    i = edit.touched[0]
    others = [j for j in range(len(source.objects)) if j != i]
    if edit.kind == "move" and (not others or rng.random() < 0.5):
        # drawn at the new place, left at the old one
        return Scene(target.objects + (source.objects[i],), source.background).render(size), "move_as_copy"
    if edit.kind == "recolour":
        others = [j for j in others if source.objects[j].colour != target.objects[i].colour]
    if not others:
        return None
    j = others[int(rng.integers(len(others)))]
    if edit.kind in ("recolour", "move"):  # the named colour or cell, not a random one as in `corrupt`
        named = target.objects[i]
        o = source.objects[j]
        wrong = source.replace(j, dataclasses.replace(o, colour=named.colour) if edit.kind == "recolour"
                               else dataclasses.replace(o, cell=named.cell))
    else:  # a remove or a resize names no colour or place: `corrupt`'s wrong object is already the mistake
        wrong = _apply_like(edit, source, j, rng)
    return wrong.render(size), "named_change_on_other_object"


def _apply_like(edit: Edit, scene: Scene, j: int, rng: np.random.Generator) -> Scene | None:
    o = scene.objects[j]
    if edit.kind == "remove":
        return scene.replace(j, None)
    if edit.kind == "recolour":
        return scene.replace(j, dataclasses.replace(o, colour=_pick(rng, [c for c in COLOURS if c != o.colour])))
    if edit.kind == "move":
        empty = scene.empty_cells()
        return scene.replace(j, dataclasses.replace(o, cell=empty[int(rng.integers(len(empty)))]))
    if edit.kind == "resize":
        return scene.replace(j, dataclasses.replace(o, size="large" if o.size == "small" else "small"))
    return None


# ---------------------------------------------------------------- samples and datasets
@dataclass
class ToyExample:
    id: str
    edit: Edit
    input_image: Image.Image
    edited_image: Image.Image  # what the dataset says; may be corrupted
    clean_image: Image.Image
    corruption: str | None


def admissible_targets(edit: Edit, size: int = DEFAULT_SIZE) -> list[Image.Image]:
    """Every target image the instruction describes as well as the dataset's own.

    An added or moved object lands at a random offset within its cell (`JITTER`), and no
    instruction names that offset ("add a small red circle at the top left"): a person reading
    it accepts the object anywhere in that range, so judging against the one offset the dataset
    drew would order two equally right edits by luck. The first image is the dataset's target;
    the others put the placed object at every whole-pixel offset in the range.
    """
    targets = [edit.target.render(size)]
    if edit.kind == "add":
        index = len(edit.target.objects) - 1
    elif edit.kind == "move":
        index = edit.touched[0]
    else:
        return targets
    steps = np.linspace(-JITTER, JITTER, 2 * round(JITTER * size) + 1)
    placed = edit.target.objects[index]
    for jx in steps:
        for jy in steps:
            moved = dataclasses.replace(placed, jitter=(float(jx), float(jy)))
            targets.append(edit.target.replace(index, moved).render(size))
    return targets


def sample_example(seed: int, size: int = DEFAULT_SIZE, noise: float = 0.0, kind: str | None = None) -> ToyExample:
    """The example for `seed`: the same seed always gives the same example."""
    rng = np.random.default_rng([seed, 7919])
    edit = random_edit(rng, kind)
    clean = edit.target.render(size)
    edited, corruption = clean, None
    if noise > 0 and rng.random() < noise:
        edited, corruption = corrupt(edit, rng, size)
    return ToyExample(f"toy-{seed:08d}", edit, edit.source.render(size), edited, clean, corruption)


def write_dataset(out: Path, n: int, seed: int, noise: float = 0.0, size: int = DEFAULT_SIZE,
                  progress: bool = True) -> Path:
    """Write `n` examples as `out/metadata.jsonl` + PNGs (the InstructPix2Pix column format)."""
    from tqdm.auto import tqdm

    out.mkdir(parents=True, exist_ok=True)
    (out / "images").mkdir(exist_ok=True)
    rows = []
    for k in tqdm(range(n), desc="toy sample", disable=not progress):
        ex = sample_example(seed + k, size=size, noise=noise)
        paths = {}
        for name, img in (("input", ex.input_image), ("edited", ex.edited_image), ("clean", ex.clean_image)):
            rel = f"images/{ex.id}_{name}.png"
            save_png_atomic(img, out / rel)
            paths[name] = rel
        rows.append({
            "id": ex.id,
            "input_image": paths["input"],
            "edit_prompt": ex.edit.instruction,
            "edited_image": paths["edited"],
            "clean_image": paths["clean"],
            "kind": ex.edit.kind,
            "inverse_prompt": ex.edit.inverse_instruction,
            "corruption": ex.corruption,
            "seed": seed + k,
            "source_scene": ex.edit.source.to_json(),
        })
    write_jsonl_atomic(out / "metadata.jsonl", rows)
    return out / "metadata.jsonl"


def iter_captions(seed: int, n: int) -> Iterator[tuple[Image.Image, str]]:
    rng = np.random.default_rng([seed, 104729])
    for _ in range(n):
        scene = random_scene(rng)
        yield scene.render(), scene.caption()


def vocabulary() -> list[str]:
    """Every word the toy world writes, for the generated tokenizer."""
    words: set[str] = set()
    for k in range(3000):
        ex = sample_example(k, noise=0.0)
        for text in (ex.edit.instruction, ex.edit.inverse_instruction, ex.edit.source.caption()):
            words.update(text.replace(",", " , ").split())
    words.update(SHAPES, COLOURS, BACKGROUNDS, SIZES, ["image", "quality", "is", "out", "of",
                 "one", "two", "three", "four", "five"])
    return sorted(words)


# ---------------------------------------------------------------- the judge
FOLLOW_MIN = 0.8
PRESERVE_MIN = 0.9
STRAY_MAX_AT_64 = 24  # about half the area of the smallest object
COLOUR_TOL = 60.0  # Euclidean RGB distance; palette colours are at least ~100 apart


@dataclass
class Judgement:
    following: float  # share of the region that should change that matches the clean target
    preservation: float  # worst share, over the regions that should stay, that matches the source
    stray_pixels: int  # pixels outside the edit that changed
    success: bool
    stray_limit: float = STRAY_MAX_AT_64  # the most stray pixels a success allows (at 64 pixels)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)



def _as_array(img: Image.Image | np.ndarray, size: int) -> np.ndarray:
    if isinstance(img, Image.Image):
        img = img.convert("RGB")
        if img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.BILINEAR)
        img = np.asarray(img)
    return img.astype(np.float32)


def _edges(a: np.ndarray) -> np.ndarray:
    diff = np.zeros(a.shape[:2], dtype=bool)
    d_x = np.any(a[:, 1:] != a[:, :-1], axis=-1)
    d_y = np.any(a[1:] != a[:-1], axis=-1)
    diff[:, 1:] |= d_x
    diff[:, :-1] |= d_x
    diff[1:] |= d_y
    diff[:-1] |= d_y
    return diff


def _dilate(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    out[:, 1:] |= mask[:, :-1]
    out[:, :-1] |= mask[:, 1:]
    return out


def _regions(a: np.ndarray, allowed: np.ndarray) -> list[np.ndarray]:
    """Connected regions of one colour inside `allowed` (4-connectivity)."""
    from scipy import ndimage

    regions: list[np.ndarray] = []
    colours = np.unique(a[allowed].reshape(-1, a.shape[-1]), axis=0)
    for colour in colours:
        labels, n = ndimage.label(allowed & np.all(a == colour, axis=-1))
        regions.extend(labels == k for k in range(1, n + 1))
    return regions


def _following_pixels(src: np.ndarray, tgt: np.ndarray, out: np.ndarray, band: np.ndarray,
                      change: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The pixels `following` reads (the change off the edge band; all of it when that leaves
    almost nothing, as in a resize's thin ring) and where the output has the target's colour."""
    inner_change = change & ~band
    if inner_change.sum() < 4:  # a tiny change lies almost wholly on edges
        inner_change = change
    return inner_change, np.linalg.norm(out - tgt, axis=-1) < COLOUR_TOL


def following_pixels(source: Image.Image | np.ndarray, clean_target: Image.Image | np.ndarray,
                     output: Image.Image | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(read, right): the boolean maps of the pixels the judge's `following` reads and of the pixels
    where `output` has the clean target's colour; following = right[read].mean(). For pictures of
    why an edit failed."""
    size = clean_target.size[0] if isinstance(clean_target, Image.Image) else clean_target.shape[0]
    src, tgt, out = (_as_array(x, size) for x in (source, clean_target, output))
    return _following_pixels(src, tgt, out, _dilate(_edges(src) | _edges(tgt)), np.any(src != tgt, axis=-1))


def judge(source: Image.Image | np.ndarray, clean_target: Image.Image | np.ndarray,
          output: Image.Image | np.ndarray) -> Judgement:
    """Did `output` make the edit that turns `source` into `clean_target`, and only that edit?

    Works on images alone: the region that should change is where source and clean target
    differ. A one-pixel band around every colour edge is left out, so blur at edges is not
    punished, but a wrong colour, a missing or extra object, or a change elsewhere is.
    """
    size = clean_target.size[0] if isinstance(clean_target, Image.Image) else clean_target.shape[0]
    src, tgt, out = (_as_array(x, size) for x in (source, clean_target, output))
    band = _dilate(_edges(src) | _edges(tgt))
    change = np.any(src != tgt, axis=-1)
    inner_change, close_tgt = _following_pixels(src, tgt, out, band, change)
    close_src = np.linalg.norm(out - src, axis=-1) < COLOUR_TOL
    following = float(close_tgt[inner_change].mean()) if inner_change.any() else 1.0
    keep = ~change & ~band
    stray = int((keep & ~close_src).sum())
    preservation = 1.0
    for region in _regions(src, keep):
        if region.sum() >= 6:
            preservation = min(preservation, float(close_src[region].mean()))
    stray_max = STRAY_MAX_AT_64 * (size / 64) ** 2
    success = following >= FOLLOW_MIN and preservation >= PRESERVE_MIN and stray <= stray_max
    return Judgement(following, preservation, stray, bool(success), stray_max)
