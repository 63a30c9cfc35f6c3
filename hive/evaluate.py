"""Evaluation on the toy world: judge success per edit kind on fresh edits, and picture grids."""

from __future__ import annotations

import time
from pathlib import Path

from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from hive import toy
from hive.editor import DEFAULT_GUIDANCE, DEFAULT_IMAGE_GUIDANCE, DEFAULT_STEPS, Editor
from hive.files import write_json_atomic, write_jsonl_atomic

EVAL_SEED_BASE = 900_000_000  # far from the training seeds (hive.data.TOY_TRAIN_SEED_BASE)


def evaluate_toy(model: str | None = None, n: int = 300, seed: int = EVAL_SEED_BASE, steps: int = DEFAULT_STEPS,
                 guidance: float = DEFAULT_GUIDANCE, image_guidance: float = DEFAULT_IMAGE_GUIDANCE,
                 batch: int = 32, out: Path | None = None, editor: Editor | None = None) -> dict:
    """Edit `n` fresh noise-free toy examples (one variant each, variant seed = example seed) and
    judge them. Returns overall and per-kind success, following and preservation."""
    editor = editor or Editor(model)
    examples = [toy.sample_example(seed + k) for k in range(n)]
    rows = []
    if out is not None:
        (out / "outputs").mkdir(parents=True, exist_ok=True)
    started = time.time()
    for start in tqdm(range(0, n, batch), desc="evaluate"):
        chunk = examples[start:start + batch]
        outs = editor.sample([e.input_image for e in chunk], [editor.prompt_for(e.edit.instruction) for e in chunk],
                             [[seed + start + j] for j in range(len(chunk))], steps, guidance, image_guidance)
        for e, imgs in zip(chunk, outs):
            j = toy.judge(e.input_image, e.clean_image, imgs[0])
            rows.append({"id": e.id, "kind": e.edit.kind, "instruction": e.edit.instruction, **j.to_json()})
            if out is not None:
                imgs[0].save(out / "outputs" / f"{e.id}.png")
    per_kind = {}
    for kind in toy.EDIT_KINDS:
        ks = [r for r in rows if r["kind"] == kind]
        if ks:
            per_kind[kind] = {
                "n": len(ks),
                "success": sum(r["success"] for r in ks) / len(ks),
                "following": sum(r["following"] for r in ks) / len(ks),
                "preservation": sum(r["preservation"] for r in ks) / len(ks),
            }
    report = {
        "model": editor.model, "n": n, "first_seed": seed, "steps": steps, "guidance": guidance,
        "image_guidance": image_guidance, "success": sum(r["success"] for r in rows) / max(1, len(rows)),
        "per_kind": per_kind, "seconds": round(time.time() - started, 1),
    }
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_jsonl_atomic(out / "judgements.jsonl", rows)
        write_json_atomic(out / "report.json", report)
    return report


def grid_by_kind(editor: Editor, out_png: Path, seed: int = EVAL_SEED_BASE + 50_000, variants: int = 4,
                 per_kind: int = 1, scale: int = 2, steps: int = DEFAULT_STEPS) -> Path:
    """A picture grid: for each edit kind, source | instruction | K variants (judge verdict under each)."""
    rows = []
    k = 0
    for kind in toy.EDIT_KINDS:
        for i in range(per_kind):
            ex = toy.sample_example(seed + k, kind=kind)
            k += 1
            imgs = editor.sample([ex.input_image], [editor.prompt_for(ex.edit.instruction)],
                                 [[seed + 100 * k + v for v in range(variants)]], steps,
                                 DEFAULT_GUIDANCE, DEFAULT_IMAGE_GUIDANCE)[0]
            verdicts = [toy.judge(ex.input_image, ex.clean_image, im).success for im in imgs]
            rows.append((ex, imgs, verdicts))
    cell = toy.DEFAULT_SIZE * scale
    text_w = 230
    pad = 6
    header = 22
    width = pad + cell + pad + text_w + (cell + pad) * (variants + 1)
    height = header + (cell + 18 + pad) * len(rows) + pad
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    x0 = pad + cell + pad + text_w
    titles = ["source", "instruction", "target (judge)"] + [f"variant {v + 1}" for v in range(variants)]
    xs = [pad, pad + cell + pad, x0] + [x0 + (cell + pad) * (v + 1) for v in range(variants)]
    for t, x in zip(titles, xs):
        draw.text((x, 5), t, fill=(0, 0, 0))
    for r, (ex, imgs, verdicts) in enumerate(rows):
        y = header + r * (cell + 18 + pad)
        canvas.paste(ex.input_image.resize((cell, cell), Image.Resampling.NEAREST), (pad, y))
        words, lines, line = ex.edit.instruction.split(), [], ""
        for w in words:
            if len(line) + len(w) + 1 > 34:
                lines.append(line)
                line = w
            else:
                line = f"{line} {w}".strip()
        lines.append(line)
        draw.text((pad + cell + pad, y + 4), f"[{ex.edit.kind}]", fill=(90, 90, 90))
        for li, text in enumerate(lines):
            draw.text((pad + cell + pad, y + 20 + 12 * li), text, fill=(0, 0, 0))
        canvas.paste(ex.clean_image.resize((cell, cell), Image.Resampling.NEAREST), (x0, y))
        for v, (im, ok) in enumerate(zip(imgs, verdicts)):
            x = x0 + (cell + pad) * (v + 1)
            canvas.paste(im.resize((cell, cell), Image.Resampling.NEAREST), (x, y))
            draw.text((x + 2, y + cell + 3), "pass" if ok else "fail", fill=(0, 140, 0) if ok else (200, 0, 0))
    out_png.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out_png)
    return out_png
