"""One sampled latent, two decoders: source | clean target | old decoder | new decoder.

The editor samples each edit's final latent once (seed = the edit's seed, no local blend); the same
latent is decoded by an older VAE and by the editor's own, with the judge's verdict under each.
Why: session 24 fine-tuned the toy editor's decoder on the latents it samples
(`python -m hive train decoder`), and this shows what that changed on fresh validation resizes.

Usage: python scripts/decoder_figure.py --old-vae DIR OUT_PNG [--model models/toy-editor] [--kind resize] [--rows 6]
An older decoder of the shipped editor: `git archive 6f30ce6 models/toy-editor/vae | tar -x -C /tmp/old`.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from PIL import Image, ImageDraw

from hive import toy
from hive.editor import Editor
from hive.files import save_png_atomic
from hive.train_decoder import editor_final_latents
from hive.train_vae import decode_to_uint8

VALIDATION_SEED = 800_000_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_png", type=Path)
    parser.add_argument("--old-vae", type=Path, required=True, help="the AutoencoderKL folder to compare with")
    parser.add_argument("--model", default="models/toy-editor")
    parser.add_argument("--kind", default="resize")
    parser.add_argument("--rows", type=int, default=6)
    args = parser.parse_args()
    editor = Editor(args.model, device="cpu", dtype=torch.float32, fast=False, mask_threshold=0)
    old_vae = AutoencoderKL.from_pretrained(args.old_vae, dtype=torch.float32)
    examples = []
    seed = VALIDATION_SEED
    while len(examples) < args.rows:
        example = toy.sample_example(seed)
        if example.edit.kind == args.kind:
            examples.append((seed, example))
        seed += 1
    scale, pad, label_h = 3, 8, 40
    cell = toy.DEFAULT_SIZE * scale
    canvas = Image.new("RGB", (4 * cell + 5 * pad, len(examples) * (cell + label_h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (seed, example) in enumerate(examples):
        latent = editor_final_latents(editor, [example], [seed])
        y = pad + r * (cell + label_h + pad)
        draw.text((pad, y), example.edit.instruction, fill="black")
        columns = [(example.input_image, "source"), (example.clean_image, "clean target")]
        for name, vae in (("old decoder", old_vae), ("new decoder", editor.pipe.vae)):
            image = Image.fromarray(decode_to_uint8(vae, latent)[0])
            verdict = "pass" if toy.judge(example.input_image, example.clean_image, image).success else "fail"
            columns.append((image, f"{name}: {verdict}"))
        for c, (image, label) in enumerate(columns):
            x = pad + c * (cell + pad)
            draw.text((x, y + 14), label, fill="black")
            canvas.paste(image.resize((cell, cell), Image.Resampling.NEAREST), (x, y + label_h - 12))
    args.out_png.parent.mkdir(parents=True, exist_ok=True)
    save_png_atomic(canvas, args.out_png)
    print(f"wrote {args.out_png} ({len(examples)} {args.kind} edits)")


if __name__ == "__main__":
    main()
