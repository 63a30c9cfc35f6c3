"""Does a condition-reward editor read its quality suffix? Three measurements on a fine-tune run.

    python scripts/condition_check.py RUN [--n 96] [--judge 150] [--levels 1,5]

RUN is a `python -m hive finetune --method condition` folder (RUN/pipeline, RUN/examples.jsonl).

1. attention: the share of the UNet's cross-attention (mean over attn2 layers, heads and pixels, at
   t = 500) that each prompt token receives, for the first examples' prompts;
2. loss: the training loss of examples of the lowest and the top level, each under both levels'
   prompts, with the same noise and timesteps. An editor that reads the suffix fits top-level
   examples better under the top-level prompt, and lowest-level ones under the lowest;
3. judge (with --judge N): judge success on N fresh toy edits with each level's suffix. This is what
   matters: a suffix the loss reads but the samples ignore buys nothing.

docs/paper.md ("Why the condition reward gains little here") gives the figures of the paper run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hive.data import TripletBatch, image_to_tensor
from hive.finetune import LEVEL_WORDS, level_suffix, pipeline_resolution
from hive.train_sft import change_map, encode_prompts, load_components, training_target

LOSS_REPEATS = 4  # noise draws per example
CHANGE_WEIGHT = 4.0  # the toy recipe's loss (hive.train_sft.SFTConfig.change_weight)


class AttentionShare:
    """An attn2 processor that computes attention as diffusers' default does and keeps the mean
    probability each text token receives."""

    def __init__(self, sink: list[torch.Tensor]):
        self.sink = sink

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        v = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probs = attn.get_attention_scores(q, k, None)
        self.sink.append(probs.mean(dim=1))  # (batch * heads, tokens)
        return attn.to_out[1](attn.to_out[0](attn.batch_to_head_dim(torch.bmm(probs, v))))


def load_examples(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "examples.jsonl").read_text().splitlines()]
    if not rows or rows[0].get("level") is None:
        raise SystemExit(f"{run} is not a condition-reward run (its examples carry no levels)")
    return rows


def images(rows: list[dict], resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    def load(path: str) -> torch.Tensor:
        with Image.open(path) as im:
            return image_to_tensor(im, resolution)

    return torch.stack([load(r["source"]) for r in rows]), torch.stack([load(r["target"]) for r in rows])


def load_eval_components(pipeline: Path) -> tuple:
    """(vae, text encoder, tokenizer, scheduler, UNet in eval mode) of a pipeline folder."""
    components = load_components(pipeline)
    components[-1].eval()
    return components


@torch.no_grad()
def attention_table(components: tuple, rows: list[dict], resolution: int) -> list[tuple[str, float]]:
    vae, text_encoder, tokenizer, scheduler, unet = components
    sink: list[torch.Tensor] = []
    processors = unet.attn_processors
    unet.set_attn_processor({name: AttentionShare(sink) if ".attn2." in name else proc
                             for name, proc in processors.items()})
    rows = rows[:16]
    source, target = images(rows, resolution)
    target_latents = vae.encode(target).latent_dist.mode() * vae.config.scaling_factor
    source_latents = vae.encode(source).latent_dist.mode()
    text = encode_prompts(tokenizer, text_encoder, [r["prompt"] for r in rows], torch.device("cpu"))
    t = torch.full((len(rows),), 500)
    noisy = scheduler.add_noise(target_latents, torch.randn(target_latents.shape, generator=torch.Generator().manual_seed(0)), t)
    unet(torch.cat([noisy, source_latents], dim=1), t, text)
    unet.set_attn_processor(processors)  # the UNet computes as before for whatever runs next
    heads = sink[0].shape[0] // len(rows)
    per_example = torch.stack([s.view(len(rows), heads, -1).mean(dim=1) for s in sink]).mean(dim=0)  # (rows, tokens)
    ids = tokenizer(rows[0]["prompt"]).input_ids
    share = per_example[0]
    table = list(zip(tokenizer.convert_ids_to_tokens(ids), share[:len(ids)].tolist()))
    table.append(("(padding)", float(share[len(ids):].sum())))
    return table


@torch.no_grad()
def loss_table(components: tuple, rows: list[dict], n: int, resolution: int, levels: tuple[int, int]) -> dict:
    """{example level: {prompt level: mean loss}} and the paired differences' standard errors."""
    vae, text_encoder, tokenizer, scheduler, unet = components
    generator = torch.Generator()
    result: dict = {}
    for example_level in levels:
        chosen = [r for r in rows if r["level"] == example_level and not r.get("inverse")][:n]
        if not chosen:
            continue
        source, target = images(chosen, resolution)
        batch = TripletBatch(source, target, [], None)
        target_latents = vae.encode(target).latent_dist.mode() * vae.config.scaling_factor
        source_latents = vae.encode(source).latent_dist.mode()
        losses = {}
        for prompt_level in levels:
            text = encode_prompts(tokenizer, text_encoder, [r["instruction"] + level_suffix(prompt_level) for r in chosen],
                                  torch.device("cpu"))
            generator.manual_seed(1)  # the same noise and timesteps for every prompt level
            per_repeat = []
            for _ in range(LOSS_REPEATS):
                noise = torch.randn(target_latents.shape, generator=generator)
                t = torch.randint(0, scheduler.config.num_train_timesteps, (len(chosen),), generator=generator)
                pred = unet(torch.cat([scheduler.add_noise(target_latents, noise, t), source_latents], dim=1), t, text).sample
                err = (pred - training_target(scheduler, target_latents, noise, t)) ** 2
                per_repeat.append((err * change_map(batch, err.shape[-2:], CHANGE_WEIGHT)).mean(dim=(1, 2, 3)))
            losses[prompt_level] = torch.stack(per_repeat).mean(dim=0)
        low, top = levels
        diff = losses[low] - losses[top]
        result[example_level] = {"n": len(chosen), **{f"prompt_level_{k}": float(v.mean()) for k, v in losses.items()},
                                 "low_minus_top": float(diff.mean()),
                                 "sem": float(diff.std() / np.sqrt(len(chosen))) if len(chosen) > 1 else None}
    return result


def judge_table(pipeline: Path, n: int, levels: tuple[int, ...]) -> dict:
    from hive import evaluate
    from hive.editor import Editor

    editor = Editor(str(pipeline))
    out = {}
    for level in levels:
        editor.info["reward_suffix"] = level_suffix(level)
        report = evaluate.evaluate_toy(n=n, steps=20, editor=editor)
        out[level] = {"success": report["success"], **{k: v["success"] for k, v in report["per_kind"].items()}}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a condition-reward fine-tune folder")
    parser.add_argument("--n", type=int, default=96, help="examples per level for the loss table")
    parser.add_argument("--judge", type=int, default=0, help="fresh toy edits to judge per suffix level (0: skip)")
    parser.add_argument("--levels", default=f"1,{len(LEVEL_WORDS)}", help="the lowest and the top level to compare")
    args = parser.parse_args()
    levels = tuple(int(x) for x in args.levels.split(","))
    if len(levels) != 2:
        raise SystemExit("--levels takes two levels, e.g. 1,5")
    torch.manual_seed(0)
    pipeline = args.run / "pipeline"
    rows = load_examples(args.run)
    resolution = pipeline_resolution(pipeline)
    components = load_eval_components(pipeline)
    print("attention share per token (first example's prompt):")
    print("  " + "  ".join(f"{tok.replace('</w>', '')}:{share:.3f}" for tok, share in attention_table(components, rows, resolution)))
    print("loss by example level (rows) under each level's prompt:")
    for level, r in loss_table(components, rows, args.n, resolution, levels).items():
        print(f"  level {level} ({r['n']} examples): " + ", ".join(f"{k} {v:.4f}" for k, v in r.items() if k.startswith("prompt"))
              + f", low - top {r['low_minus_top']:+.4f} +- {r['sem']:.4f}")
    if args.judge:
        for level, r in judge_table(pipeline, args.judge, levels).items():
            print(f"judge success with the level-{level} suffix on {args.judge} edits: {r['success']:.3f}  "
                  + " ".join(f"{k} {v:.2f}" for k, v in r.items() if k != "success"))


if __name__ == "__main__":
    main()
