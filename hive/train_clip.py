"""Train the tiny CLIP contrastively on toy scenes and their captions.

Its text tower becomes the editor's (frozen) text encoder; the whole model is the backbone of
the toy reward model and of the toy CLIP metrics.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from transformers import CLIPImageProcessor, CLIPTokenizer

from hive import toy
from hive.training import cooldown, make_accelerator, resume_with_progress, save_checkpoint
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


def twin_scenes(scene: toy.Scene, rng: np.random.Generator) -> list[toy.Scene]:
    """The scene with one object moved, one reshaped and one resized (when the scene allows).

    With random scenes alone, colours tell almost every caption in a batch apart, so the first toy
    CLIP learned colours and next to nothing of positions and shapes: its text tower gave "add a
    purple square at the top right" and "... at the bottom left" token states 3% apart (colour
    words: 113%; `word_sensitivity`), and the editor on it never learned to add or move. Twins
    whose captions differ in one position or shape word make the contrastive loss read those words."""
    twins = []
    i = int(rng.integers(len(scene.objects)))
    o = scene.objects[i]
    empty = scene.empty_cells()
    if empty:
        twins.append(scene.replace(i, dataclasses.replace(o, cell=empty[int(rng.integers(len(empty)))])))
    shapes = [s for s in toy.SHAPES if s != o.shape]
    twins.append(scene.replace(i, dataclasses.replace(o, shape=shapes[int(rng.integers(len(shapes)))])))
    twins.append(scene.replace(i, dataclasses.replace(o, size="large" if o.size == "small" else "small")))
    return twins


def caption_batch(step: int, batch_size: int, twins: bool = False) -> tuple[list, list[str], list[int]]:
    """Toy scenes, their captions and each one's group. With `twins`, each scene comes with its
    `twin_scenes` (groups of up to four in the batch), so that the batch's hard negatives differ in
    one word; without, every scene is its own group."""
    if not twins:
        pairs = list(toy.iter_captions(seed=step, n=batch_size))
        return [p[0] for p in pairs], [p[1] for p in pairs], list(range(len(pairs)))
    rng = np.random.default_rng([step, 104729, 2])
    scenes: list[toy.Scene] = []
    groups: list[int] = []
    group = 0
    while len(scenes) < batch_size:
        scene = toy.random_scene(rng)
        members = [scene, *twin_scenes(scene, rng)][:batch_size - len(scenes)]
        scenes += members
        groups += [group] * len(members)
        group += 1
    return [sc.render() for sc in scenes], [sc.caption() for sc in scenes], groups


def symmetric_cross_entropy(logits: torch.Tensor) -> torch.Tensor:
    """CLIP's loss on a square logit matrix whose diagonal holds the matching pairs (both directions)."""
    target = torch.arange(len(logits), device=logits.device)
    ce = torch.nn.functional.cross_entropy
    return (ce(logits, target) + ce(logits.T, target)) / 2


def twin_loss(logits_per_image: torch.Tensor, groups: list[int]) -> torch.Tensor:
    """The contrastive loss inside each group of twins alone (both directions): in the batch-wide
    loss the easy negatives of other groups drown the one-word differences out."""
    g = torch.tensor(groups, device=logits_per_image.device)
    same = g[:, None] == g[None, :]
    return symmetric_cross_entropy(logits_per_image.masked_fill(~same, float("-inf")))


def edit_groups(step: int, batch_size: int, per_group: int = 8) -> tuple[list, list, list[str], list[str], list[int]]:
    """Clean toy edits in groups that share a source scene: sources, edited images, instructions,
    the edited scenes' captions, and each edit's group. In a group the instructions differ in what
    is done to which object and where ("move the circle to the top left" / "... bottom right",
    "make the red square bigger" / "add a small blue ..."), so matching them to their changes needs
    the positions, shapes and sizes that captions of random scenes never asked for. Only clean
    edits: no judge, no noise model."""
    rng = np.random.default_rng([step, 104729, 3])
    sources, edited, instructions, captions, groups = [], [], [], [], []
    group = 0
    while len(edited) < batch_size:
        scene = toy.random_scene(rng)
        seen = {scene.caption()}  # an edit must change the caption, and no two may share one or an instruction
        members: list[tuple[toy.Edit, str]] = []
        for _ in range(3):
            for kind in rng.permutation(toy.EDIT_KINDS):
                edit = toy.make_edit(scene, str(kind), rng)
                if edit is None:
                    continue
                caption = edit.target.caption()
                if caption in seen or edit.instruction in seen:
                    continue
                seen.update((caption, edit.instruction))
                members.append((edit, caption))
        members = members[:min(per_group, batch_size - len(edited))]
        if len(members) < 2:
            continue
        source = scene.render()
        for edit, caption in members:
            sources.append(source)
            edited.append(edit.target.render())
            instructions.append(edit.instruction)
            captions.append(caption)
            groups.append(group)
        group += 1
    return sources, edited, instructions, captions, groups


def direction_loss(source_features: torch.Tensor, edited_features: torch.Tensor, instruction_features: torch.Tensor,
                   groups: list[int], scale: float = 20.0) -> torch.Tensor:
    """Contrastive loss on CLIP's directional similarity, the quantity the reward model and the
    `clip_directional` baseline read: cos(norm(E(edit)) - norm(E(source)), norm(T(instruction))),
    against the other instructions of the batch and, separately, of the same source."""
    f = torch.nn.functional
    d = f.normalize(f.normalize(edited_features, dim=-1) - f.normalize(source_features, dim=-1), dim=-1)
    logits = scale * d @ f.normalize(instruction_features, dim=-1).T
    return symmetric_cross_entropy(logits) + twin_loss(logits, groups)


WORD_SWAPS = {  # one instruction, and the same with one word (class) swapped
    "position": ("add a large purple square at the top right", "add a large purple square at the bottom left"),
    "shape": ("add a large purple square at the top right", "add a large purple circle at the top right"),
    "colour": ("add a large purple square at the top right", "add a large red square at the top right"),
    "size": ("add a large purple square at the top right", "add a small purple square at the top right"),
}


def word_sensitivity(text_model, tokenizer) -> dict[str, float]:
    """How far the text tower's token states (what the editor's UNet reads) move when one word of
    an instruction changes: ||h(a) - h(b)|| / ||h(a)|| per word class of `WORD_SWAPS`. A class
    near 0 is one the editor cannot be told apart, whatever it is trained on."""
    out = {}
    with torch.no_grad():
        for name, (a, b) in WORD_SWAPS.items():
            ids = tokenizer([a, b], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt")
            h = text_model(input_ids=ids.input_ids.to(text_model.device)).last_hidden_state.float()
            out[name] = round(float((h[0] - h[1]).norm() / h[0].norm()), 4)
    return out


def train_clip(out: Path, tokenizer_dir: Path, steps: int = 2000, batch_size: int = 64, lr: float = 5e-4,
               checkpoint_every: int = 500, twins: bool = False, base: Path | None = None,
               edits: bool = False, decay_steps: int = 0) -> Path:
    """Contrastive training from scratch, or from the CLIPModel folder `base`. `twins` adds the
    hard negatives of `twin_scenes` and `twin_loss` (off by default: the shipped CLIP was made
    without; docs/toy-zoo-training.md has what they did and did not teach it). `edits` trains on
    groups of clean edits of one scene (`edit_groups`): the caption loss on the edited images (with
    `twin_loss` inside each group) plus `direction_loss`, for a backbone that sees changes
    (docs/reward.md). `decay_steps` > 0: the learning rate falls linearly to 0 over the last
    `decay_steps` steps (computed from the step, so a resumed run follows the same schedule)."""
    from transformers import CLIPModel

    accelerator = make_accelerator()
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    if base is not None:
        model = CLIPModel.from_pretrained(base, dtype=torch.float32)
    else:
        model = toy_clip(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    model, optimizer = accelerator.prepare(model, optimizer)
    clip = accelerator.unwrap_model(model)
    device = accelerator.device

    def tokens(texts: list[str]) -> dict[str, torch.Tensor]:
        t = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                      return_tensors="pt")
        return {"input_ids": t.input_ids.to(device), "attention_mask": t.attention_mask.to(device)}

    def image_features(images: list) -> torch.Tensor:
        return clip.visual_projection(clip.vision_model(pixel_values=to_pixel_values(images).to(device)).pooler_output)

    def text_features(texts: list[str]) -> torch.Tensor:
        return clip.text_projection(clip.text_model(**tokens(texts)).pooler_output)

    bar, log = resume_with_progress(accelerator, out, steps, "train clip")
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr * cooldown(step, steps, decay_steps)
        if edits:
            sources, images, instructions, captions, groups = edit_groups(step, batch_size)
        else:
            images, captions, groups = caption_batch(step, batch_size, twins)
        # CLIP's own loss on (image, caption); with edits the images are the edited ones
        outputs = model(**tokens(captions), pixel_values=to_pixel_values(images).to(device), return_loss=True)
        loss = outputs.loss + (twin_loss(outputs.logits_per_image, groups) if twins or edits else 0)
        extra = {}
        if edits:
            # a group's edits share one source render: encode it once per group
            firsts = [groups.index(g) for g in range(groups[-1] + 1)]
            source_features = image_features([sources[k] for k in firsts])[torch.tensor(groups, device=device)]
            dir_loss = direction_loss(source_features, outputs.image_embeds, text_features(instructions), groups)
            loss = loss + dir_loss
            extra["direction_loss"] = dir_loss.item()
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            acc = (outputs.logits_per_image.argmax(-1) == torch.arange(len(captions), device=device)).float().mean()
        bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{acc.item():.2f}")
        if (step + 1) % 50 == 0:
            log.log(step + 1, loss=loss.item(), retrieval_acc=acc.item(), **extra)
        if (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            save_checkpoint(accelerator, out, step + 1)
    model = accelerator.unwrap_model(model)
    if accelerator.is_main_process:
        model.save_pretrained(out / "model")
        tokenizer.save_pretrained(out / "model")
        image_processor().save_pretrained(out / "model")
        sensitivity = word_sensitivity(model.text_model, tokenizer)
        (out / "model" / "metrics.json").write_text(json.dumps({"final_loss": loss.item(),
                                                                "batch_retrieval_acc": acc.item(), "steps": steps,
                                                                "twins": twins, "edits": edits,
                                                                "word_sensitivity": sensitivity}))
    return out / "model"
