"""Draw what the local blend does, for the docs: per row, the source, the instruction, the raw
model output, the instruction's effect map with the mask outline, the blended output, and the
clean target, with the judge's verdict on the raw and the blended output.

    python scripts/local_blend_figure.py docs/images/local-blend.png [--model M] [--per-kind 2]

Rows are validation edits (seeds 800,000,000+, never the evaluation seeds) of the kinds where
the blend matters most; the variant seed is the example's seed, as in `evaluate`.
"""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from hive import toy
from hive.editor import Editor
from hive.local_blend import composite, instruction_effect

VALIDATION_SEED = 800_000_000


def effect_picture(effect: np.ndarray, mask: np.ndarray, size: int) -> Image.Image:
    """The effect map in grey, the cells of the mask outlined in red."""
    grey = Image.fromarray((effect * 255).astype(np.uint8), "L").resize((size, size), Image.Resampling.NEAREST)
    pic = grey.convert("RGB")
    draw = ImageDraw.Draw(pic)
    cell = size / mask.shape[0]
    for (i, j), on in np.ndenumerate(mask):
        if on:
            draw.rectangle([j * cell, i * cell, (j + 1) * cell - 1, (i + 1) * cell - 1], outline=(220, 30, 30))
    return pic


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--model", default=None)
    ap.add_argument("--kinds", default="add,move,recolour,resize")
    ap.add_argument("--per-kind", type=int, default=2)
    ap.add_argument("--scale", type=int, default=2)
    args = ap.parse_args()
    editor = Editor(args.model)
    threshold = editor.mask_threshold
    if threshold <= 0:
        raise SystemExit(f"{editor.model} has no local blend (hive.json sampling.mask_threshold); nothing to draw")
    rows = []
    for kind in args.kinds.split(","):
        seed, found = VALIDATION_SEED, 0
        while found < args.per_kind:
            ex = toy.sample_example(seed)
            if ex.edit.kind == kind:
                prompt = editor.prompt_for(ex.edit.instruction)
                # the raw output (threshold 0); the blend is applied below, as Editor.sample does
                raw = editor.sample([ex.input_image], [prompt], [[seed]], mask_threshold=0.0)[0][0]
                effect = instruction_effect(editor.pipe, [ex.input_image], [prompt])[0].cpu().numpy()
                mask = effect > threshold
                blended = composite(ex.input_image, raw, mask)
                verdicts = [toy.judge(ex.input_image, ex.clean_image, im).success for im in (raw, blended)]
                rows.append((ex, raw, effect, mask, blended, verdicts))
                found += 1
            seed += 1
    cell = toy.DEFAULT_SIZE * args.scale
    pad, text_w, header = 6, 200, 22
    titles = ["source", "instruction", "raw output", f"effect > {threshold:g}", "blended", "target"]
    xs = [pad, pad + cell + pad]
    for _ in range(4):
        xs.append(xs[-1] + (text_w if len(xs) == 2 else cell) + pad)
    canvas = Image.new("RGB", (xs[-1] + cell + pad, header + (cell + 18 + pad) * len(rows) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for t, x in zip(titles, xs):
        draw.text((x, 5), t, fill=(0, 0, 0))
    for r, (ex, raw, effect, mask, blended, (raw_ok, blend_ok)) in enumerate(rows):
        y = header + r * (cell + 18 + pad)
        big = lambda im: im.resize((cell, cell), Image.Resampling.NEAREST)  # noqa: E731
        canvas.paste(big(ex.input_image), (xs[0], y))
        draw.text((xs[1], y + 4), f"[{ex.edit.kind}]", fill=(90, 90, 90))
        for li, text in enumerate(textwrap.wrap(ex.edit.instruction, 30)):
            draw.text((xs[1], y + 20 + 12 * li), text, fill=(0, 0, 0))
        canvas.paste(big(raw), (xs[2], y))
        canvas.paste(effect_picture(effect, mask, cell), (xs[3], y))
        canvas.paste(big(blended), (xs[4], y))
        canvas.paste(big(ex.clean_image), (xs[5], y))
        for x, ok in ((xs[2], raw_ok), (xs[4], blend_ok)):
            draw.text((x + 2, y + cell + 3), "pass" if ok else "fail", fill=(0, 140, 0) if ok else (200, 0, 0))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(args.out)
    print(f"wrote {args.out} ({len(rows)} rows)")


if __name__ == "__main__":
    main()
