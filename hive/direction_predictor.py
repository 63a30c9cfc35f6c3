"""What an instruction should do to its source, as a direction in the backbone's CLIP text space.

CLIP directional similarity scores an edit by cos(E(edit) - E(source), T(target caption) -
T(source caption)). With both captions it orders the toy simulations' held-out pairs well, but
people type an instruction, not two captions, and with T(instruction) as the direction it is much
weaker (docs/reward.md): "make the square blue" names a change, not the scene it leads to, and
says nothing of what the square looked like before. An edit dataset with captions shows the caption
direction for every (source, instruction) (InstructPix2Pix's dataset has input and output captions;
a toy scene captions itself), so a small transformer over the source's pooled image features and
the instruction's word embeddings learns to predict it. The reward model's change head then
compares the edit's image direction with the predicted caption direction (`RewardConfig.
direction_predictor`, the direction prior's text side) instead of with T(instruction).

Off by default (`--direction-examples 0`): on held-out toy edits the predicted direction has cosine
0.886 with the true caption direction (T(instruction): 0.486), but in one run beside the defaults
the reward model with it orders both toy simulations' held-out pairs slightly worse (0.829 against
0.842 on the one command's, 0.631 against 0.639 at the editor's defaults; docs/reward.md, session 31).
Toy edits only for now: for real photos the same fit would run on an edit dataset's captioned
triplets (`fit_direction_predictor` takes any), which is not built.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from hive import toy
from hive.data import TOY_TRAIN_SEED_BASE

# toy training seeds apart from the editor's (under 101M), the dataset rankings' (150M+) and the
# change locator's (160M+)
PREDICTOR_SEED_BASE = TOY_TRAIN_SEED_BASE + 70_000_000
DEFAULT_STEPS = 2_000


class DirectionPredictor(nn.Module):
    """Pooled source features + instruction word embeddings -> a unit vector: the caption direction."""

    def __init__(self, image_dim: int, word_dim: int, out_dim: int, width: int = 128, layers: int = 2,
                 heads: int = 4):
        super().__init__()
        self.source_in = nn.Linear(image_dim, width)
        self.word_in = nn.Linear(word_dim, width)
        self.query = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.kind = nn.Parameter(torch.randn(2, width) * 0.02)  # source token / word token
        layer = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.out = nn.Linear(width, out_dim)

    def forward(self, source: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor) -> torch.Tensor:
        """(B, out_dim) unit vectors; `source` (B, image_dim), `words` (B, T, word_dim), `word_mask` (B, T)."""
        b = source.shape[0]
        x = torch.cat([self.query.expand(b, -1, -1), (self.source_in(source) + self.kind[0])[:, None],
                       self.word_in(words) + self.kind[1]], dim=1)
        pad = torch.cat([torch.zeros(b, 2, dtype=torch.bool, device=source.device), word_mask == 0], dim=1)
        return nn.functional.normalize(self.out(self.encoder(x, src_key_padding_mask=pad)[:, 0]), dim=-1)


@torch.no_grad()
def predictor_inputs(model, sources: list[Image.Image], instructions: list[str], batch_size: int = 256
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pooled source features, instruction word embeddings, word mask), as `RewardModel` encodes them
    (`model` must carry a direction predictor, so that it returns the word embeddings)."""
    device = next(model.parameters()).device
    model.eval()
    pooled, words, masks = [], [], []
    for i in range(0, len(sources), batch_size):
        pooled.append(model.encode_images(model.pixel_values(sources[i:i + batch_size]).to(device))["pooled"])
        t = {k: v.to(device) for k, v in model.tokenize(instructions[i:i + batch_size]).items()}
        text = model.encode_text(t["input_ids"], t["attention_mask"])
        words.append(text["words"])
        masks.append(text["mask"])
    return torch.cat(pooled), torch.cat(words), torch.cat(masks)


@torch.no_grad()
def caption_directions(model, source_captions: list[str], target_captions: list[str], batch_size: int = 256
                       ) -> torch.Tensor:
    """(N, proj_dim) unit vectors T(target caption) - T(source caption), normalised."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(source_captions), batch_size):
        feats = []
        for texts in (source_captions[i:i + batch_size], target_captions[i:i + batch_size]):
            t = {k: v.to(device) for k, v in model.tokenize(texts).items()}
            feats.append(model.encode_text(t["input_ids"], t["attention_mask"])["pooled"])
        out.append(nn.functional.normalize(feats[1] - feats[0], dim=-1))
    return torch.cat(out)


def fit_direction_predictor(model, sources: list[Image.Image], instructions: list[str], source_captions: list[str],
                            target_captions: list[str], steps: int = DEFAULT_STEPS, seed: int = 0,
                            val_fraction: float = 0.1, progress: bool = True) -> tuple[DirectionPredictor, dict]:
    """Fit a predictor on a captioned edit dataset, by the cosine with the caption direction; returns
    it (frozen) with the held-out mean cosine, and that of T(instruction), the direction it replaces."""
    from tqdm.auto import tqdm

    n = len(sources)
    if not n == len(instructions) == len(source_captions) == len(target_captions):
        raise ValueError("sources, instructions and both captions lists must have the same length")
    if n < 10:
        raise ValueError(f"{n} examples: the direction predictor needs at least 10")
    source, words, mask = predictor_inputs(model, sources, instructions)
    target = caption_directions(model, source_captions, target_captions)
    n_val = max(1, int(n * val_fraction))
    n_fit = n - n_val
    with torch.random.fork_rng(devices=[]):  # the caller's random state is left as it was
        torch.manual_seed(seed)
        predictor = DirectionPredictor(source.shape[-1], words.shape[-1], target.shape[-1]).to(source.device)
    opt = torch.optim.AdamW(predictor.parameters(), lr=1e-3, weight_decay=1e-4)
    # warm up over 5% of the steps, and over at least two (OneCycleLR divides by the warm-up's length)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 1e-3, total_steps=max(steps, 4), pct_start=max(0.05, 2 / max(steps, 4)))
    gen = torch.Generator().manual_seed(seed)
    predictor.train()
    for _ in tqdm(range(steps), desc="fit direction predictor", disable=not progress):
        idx = torch.randint(0, n_fit, (min(128, n_fit),), generator=gen).to(source.device)
        loss = (1 - (predictor(source[idx], words[idx], mask[idx]) * target[idx]).sum(-1)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    predictor.eval().requires_grad_(False)
    with torch.no_grad():
        predicted = predictor(source[n_fit:], words[n_fit:], mask[n_fit:])
        t = {k: v.to(source.device) for k, v in model.tokenize(instructions[n_fit:]).items()}
        plain = model.encode_text(t["input_ids"], t["attention_mask"])["pooled"]
    return predictor, {"examples": n, "steps": steps,
                       "val_cosine": float((predicted * target[n_fit:]).sum(-1).mean()),
                       "val_cosine_instruction": float((plain * target[n_fit:]).sum(-1).mean())}


def toy_captioned_triplets(n: int, seed_base: int = PREDICTOR_SEED_BASE) -> tuple[list, list, list, list]:
    """(sources, instructions, source captions, target captions) of `n` toy training edits."""
    sources, instructions, source_captions, target_captions = [], [], [], []
    for k in range(n):
        edit = toy.sample_example(seed_base + k).edit
        sources.append(edit.source.render())
        instructions.append(edit.instruction)
        source_captions.append(edit.source.caption())
        target_captions.append(edit.target.caption())
    return sources, instructions, source_captions, target_captions


@functools.lru_cache(maxsize=2)
def _toy_fit(backbone: str, n: int, steps: int, seed: int) -> tuple[dict, dict]:
    from hive.reward import RewardModel

    model = RewardModel.from_backbone(backbone, direction_prior=1.0, direction_predictor=True)
    predictor, metrics = fit_direction_predictor(model, *toy_captioned_triplets(n), steps=steps, seed=seed)
    return {k: v.detach().cpu() for k, v in predictor.state_dict().items()}, metrics


def toy_direction_predictor(backbone: str | Path, n: int, steps: int = DEFAULT_STEPS, seed: int = 0
                            ) -> tuple[dict, dict]:
    """(state dict, metrics) of a predictor fitted on `n` toy edits for `backbone`; kept for the
    process, since an experiment trains several reward models on one backbone."""
    state, metrics = _toy_fit(str(Path(backbone).resolve()), n, steps, seed)
    return state, dict(metrics)
