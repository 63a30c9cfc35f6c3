"""Train the tiny CLIP contrastively on toy scenes and their captions.

Its text tower becomes the editor's (frozen) text encoder; the whole model is the backbone of
the toy reward model and of the toy CLIP metrics.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from transformers import CLIPImageProcessor, CLIPTokenizer

from hive import toy
from hive.training import make_accelerator, resume_with_progress, save_checkpoint
from hive.zoo import TOY_RESOLUTION, toy_clip

# CLIP's own normalisation constants, so the toy and the real backbone take images alike.
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def image_processor(size: int = TOY_RESOLUTION) -> CLIPImageProcessor:
    return CLIPImageProcessor(
        do_resize=True, size={"shortest_edge": size}, do_center_crop=True,
        crop_size={"height": size, "width": size}, image_mean=CLIP_MEAN, image_std=CLIP_STD,
    )


def to_pixel_values(images: list, size: int = TOY_RESOLUTION) -> torch.Tensor:
    """Toy images (already `size` square) to CLIP-normalised tensors, without PIL round trips."""
    x = torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images])).permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def caption_batch(step: int, batch_size: int) -> tuple[list, list[str]]:
    """Scenes with captions, plus edited scenes described by their captions too."""
    pairs = list(toy.iter_captions(seed=step, n=batch_size))
    return [p[0] for p in pairs], [p[1] for p in pairs]


def train_clip(out: Path, tokenizer_dir: Path, steps: int = 2000, batch_size: int = 64, lr: float = 5e-4,
               checkpoint_every: int = 500) -> Path:
    accelerator = make_accelerator()
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    model = toy_clip(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    model, optimizer = accelerator.prepare(model, optimizer)
    bar, log = resume_with_progress(accelerator, out, steps, "train clip")
    for step in bar:
        images, captions = caption_batch(step, batch_size)
        text = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                         truncation=True, return_tensors="pt")
        outputs = model(input_ids=text.input_ids.to(accelerator.device),
                        attention_mask=text.attention_mask.to(accelerator.device),
                        pixel_values=to_pixel_values(images).to(accelerator.device), return_loss=True)
        accelerator.backward(outputs.loss)
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            acc = (outputs.logits_per_image.argmax(-1) == torch.arange(len(captions), device=accelerator.device)).float().mean()
        bar.set_postfix(loss=f"{outputs.loss.item():.3f}", acc=f"{acc.item():.2f}")
        if (step + 1) % 50 == 0:
            log.log(step + 1, loss=outputs.loss.item(), retrieval_acc=acc.item())
        if (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            save_checkpoint(accelerator, out, step + 1)
    model = accelerator.unwrap_model(model)
    if accelerator.is_main_process:
        model.save_pretrained(out / "model")
        tokenizer.save_pretrained(out / "model")
        image_processor().save_pretrained(out / "model")
        (out / "model" / "metrics.json").write_text(json.dumps({"final_loss": outputs.loss.item(),
                                                                "batch_retrieval_acc": acc.item(), "steps": steps}))
    return out / "model"
