"""Failed resizes of an evaluation run, side by side: source | clean target | output | judge.

The judge column is the output with the pixels the judge's `following` reads painted green where
the output has the target's colour and magenta where it has not (hive.toy.following_pixels).

Usage: python scripts/resize_failures_figure.py EVAL_DIR OUT_PNG [--rows N]
EVAL_DIR is the --out folder of `python -m hive evaluate` (judgements.jsonl and outputs/). Why: the
toy editor's resizes fail on shrinks (docs/toy-zoo-training.md, session 22), and a picture shows how.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from hive import toy
from hive.evaluate import read_judgements
from hive.files import save_png_atomic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("eval_dir", type=Path)
    parser.add_argument("out_png", type=Path)
    parser.add_argument("--rows", type=int, default=6)
    args = parser.parse_args()
    rows = [j for j in read_judgements(args.eval_dir / "judgements.jsonl").values()
            if j["kind"] == "resize" and not j["success"]]
    if not rows:
        raise SystemExit(f"no failed resizes in {args.eval_dir}")
    rows = rows[: args.rows]
    scale, pad, label_h = 3, 8, 28
    cell = toy.DEFAULT_SIZE * scale
    canvas = Image.new("RGB", (4 * cell + 5 * pad, len(rows) * (cell + label_h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for r, judgement in enumerate(rows):
        example = toy.sample_example(int(judgement["id"].rsplit("-", 1)[1]))
        output = Image.open(args.eval_dir / "outputs" / f"{judgement['id']}.png").convert("RGB")
        y = pad + r * (cell + label_h + pad)
        direction = "grow" if toy.resize_grows(example.edit) else "shrink"
        draw.text((pad, y), f"{judgement['instruction']}  ({direction}, following {judgement['following']:.2f})",
                  fill="black")
        read, right = toy.following_pixels(example.input_image, example.clean_image, output)
        marked = np.asarray(output.resize(example.clean_image.size, Image.Resampling.BILINEAR)).copy()
        marked[read & right], marked[read & ~right] = (0, 200, 0), (255, 0, 255)
        judged = Image.fromarray(marked)
        for c, image in enumerate((example.input_image, example.edited_image, output, judged)):
            canvas.paste(image.resize((cell, cell), Image.Resampling.NEAREST), (pad + c * (cell + pad), y + label_h - 12))
    args.out_png.parent.mkdir(parents=True, exist_ok=True)
    save_png_atomic(canvas, args.out_png)
    print(f"wrote {args.out_png} ({len(rows)} failed resizes)")


if __name__ == "__main__":
    main()
