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
from diffusers import AutoencoderKL, StableDiffusionInstructPix2PixPipeline
from PIL import Image, ImageDraw

from hive import toy
from hive.editor import read_model_info, sampling_defaults
from hive.files import save_png_atomic

VALIDATION_SEED = 800_000_000


def decode(vae: AutoencoderKL, latent: torch.Tensor) -> Image.Image:
    with torch.no_grad():
        x = vae.decode(latent[None]).sample[0].clamp(-1, 1)
    return Image.fromarray(((x + 1) * 127.5).round().byte().permute(1, 2, 0).numpy())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_png", type=Path)
    parser.add_argument("--old-vae", type=Path, required=True, help="the AutoencoderKL folder to compare with")
    parser.add_argument("--model", default="models/toy-editor")
    parser.add_argument("--kind", default="resize")
    parser.add_argument("--rows", type=int, default=6)
    args = parser.parse_args()
    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(args.model, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    old_vae = AutoencoderKL.from_pretrained(args.old_vae, dtype=torch.float32)
    settings = sampling_defaults(read_model_info(args.model))
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
        with torch.inference_mode():
            latent = pipe(prompt=[example.edit.instruction], image=[example.input_image],
                          num_inference_steps=int(settings["steps"]), guidance_scale=settings["guidance"],
                          image_guidance_scale=settings["image_guidance"],
                          generator=[torch.Generator().manual_seed(seed)], output_type="latent").images[0]
        latent = latent / pipe.vae.config.scaling_factor
        y = pad + r * (cell + label_h + pad)
        draw.text((pad, y), example.edit.instruction, fill="black")
        columns = [(example.input_image, "source"), (example.clean_image, "clean target")]
        for name, vae in (("old decoder", old_vae), ("new decoder", pipe.vae)):
            image = decode(vae, latent)
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
