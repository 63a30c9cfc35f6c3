"""The reward model R(source, edited, instruction) -> scalar, on any transformers CLIP backbone.

Both images go through the CLIP vision tower and the instruction through its text tower. The
head reads the edit as a change (`head_type="change"`, the default):
- global: the difference of the pooled image features (scaled), its direction times the text
  features, its size, and its cosine with the text (a learned "did the image move the way the
  text says");
- local: patch-difference tokens (edit patch tokens, edit - source, |edit - source|, at the
  vision layers `patch_layers`, with learned positions), pooled (mean and max of |edit - source|:
  how much changed, and where the most did) and read by cross-attention from the instruction's
  tokens (and one learned query): did the right place change?
`head_type="global"` is the first, pooled-only head. `ensemble` > 1 averages several heads.

A saved model is a folder that describes itself, loading offline with one call:

    reward/config.json        {"model_type": "hive-reward", backbone, head sizes, score scale, ...}
    reward/backbone/          the (fine-tuned) CLIPModel + tokenizer + image processor
    reward/head.safetensors   the head's weights
    reward/change_locator.safetensors   with `change_locator`: where the instruction should change the source
    reward/direction_predictor.safetensors   with `direction_predictor`: the caption direction it should move it in

`score()` returns rewards normalised by the training set's mean and std (the score scale), so
rewards from different runs are on comparable scales for the fine-tuning issue.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from hive.change_locator import ChangeLocator, cover_and_spill
from hive.direction_predictor import DirectionPredictor
from hive.train_clip import CLIP_MEAN, CLIP_STD

MODEL_TYPE = "hive-reward"


@dataclass
class RewardConfig:
    """What a reward folder records about itself."""

    backbone: str  # where the backbone came from (a folder or hub id); the weights live in backbone/
    head_type: str = "change"  # "change": global + patch-difference tokens + text cross-attention; "global"
    hidden: int = 256
    dropout: float = 0.1
    freeze_layers: int = 0  # lower encoder layers (and embeddings) of both towers kept frozen; -1: all
    delta_scale: float = 10.0  # the head's input scale for feature differences
    patch_layers: list[int] = field(default_factory=lambda: [-1])  # vision hidden states compared patchwise
    attn_heads: int = 4
    # which text hidden state the cross-attention reads: -1 the last; 0 the token + position
    # embeddings (the toy CLIP's layers wash out position and shape words, its embeddings do not)
    text_token_layer: int = -1
    token_dim: int = 32  # width of the change tokens and of the cross-attention
    residual: bool = True  # change head: also the token/attention/MLP branch beside the main term
    gate_l2: float = 0.3  # L2 penalty on the instruction's weights (G) of the main term
    # change head: the starting weight of a term for the backbone's directional similarity
    # cos(E(edit) - E(source), T(instruction)), standardised; 0: no such term
    direction_prior: float = 0.0
    residual_l2: float = 1e-3  # L2 penalty on the residual branch's weights
    # change head: a term comparing the edit's change with where a `hive.change_locator.ChangeLocator`
    # (fitted apart on edit triplets, frozen) expects it: the expected place's changed share and the rest's
    change_locator: bool = False
    # that locator also reads the source's pixels through a small conv stem (`hive.change_locator.
    # PixelStem`): the shapes and sizes the toy backbone's patch tokens carry too faintly
    locator_pixels: bool = False
    # change head: the direction prior's text side is the caption direction a `hive.direction_predictor.
    # DirectionPredictor` (fitted apart on captioned edit triplets, frozen) predicts from the source and
    # the instruction, instead of T(instruction); needs direction_prior != 0
    direction_predictor: bool = False
    # change head, != 0: a term for the share of specks, the changed pixels no 3x3 block of changed
    # pixels covers (isolated dots, one- or two-pixel rims and ghosts: what the annotators count as
    # stray pixels), standardised, with this starting weight; the share also joins each change token.
    # 0: no such term or column
    speck_prior: float = 0.0
    ensemble: int = 1  # heads whose scores are averaged
    score_mean: float = 0.0
    score_std: float = 1.0
    image_size: int = 0  # filled from the backbone
    max_length: int = 0  # filled from the tokenizer
    image_mean: list[float] = field(default_factory=lambda: list(CLIP_MEAN))
    image_std: list[float] = field(default_factory=lambda: list(CLIP_STD))
    model_type: str = MODEL_TYPE
    extra: dict = field(default_factory=dict)  # e.g. training metrics and data summary


# Below this size an image difference has no direction: a no-op edit's pooled difference is float
# noise (~1e-7, which varies with what else is in the batch), while real toy edits move a unit
# embedding by 0.15 and more. Dividing by at least this much keeps a no-op's cosine near 0.
MIN_DIRECTION_NORM = 1e-2


def unit_difference(src: torch.Tensor, edit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(edit - src as a unit vector, shrunk towards 0 below MIN_DIRECTION_NORM; its size), per row."""
    delta = edit - src
    size = delta.norm(dim=-1, keepdim=True)
    return delta / size.clamp(min=MIN_DIRECTION_NORM), size


def direction_cosine(src: torch.Tensor, edit: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """CLIP directional similarity of pooled, normalised features: cos(edit - src, text), (B, 1)."""
    return (unit_difference(src, edit)[0] * text).sum(-1, keepdim=True)


def _global_inputs(src: torch.Tensor, edit: torch.Tensor, text: torch.Tensor, k: float) -> torch.Tensor:
    """The pooled change: difference (scaled, as one edit moves a unit CLIP embedding by ~0.1-0.5),
    its direction times the text, its size, and its cosine with the text. Absolute source/edit
    features were tried too and let the head memorise scenes (toy stand-in data: 59% vs 64%)."""
    delta = edit - src
    unit, size = unit_difference(src, edit)
    return torch.cat([delta * k, text, unit * text, size * k, direction_cosine(src, edit, text) * k], dim=-1)


class GlobalHead(nn.Module):
    """The first head: an MLP over the pooled change only."""

    def __init__(self, proj_dim: int, config: "RewardConfig"):
        super().__init__()
        self.k = config.delta_scale
        self.mlp = nn.Sequential(
            nn.Linear(3 * proj_dim + 2, config.hidden), nn.GELU(), nn.Dropout(config.dropout),
            nn.Linear(config.hidden, config.hidden), nn.GELU(), nn.Linear(config.hidden, 1))

    def forward(self, src: dict, edit: dict, text: dict) -> torch.Tensor:
        return self.mlp(_global_inputs(src["pooled"], edit["pooled"], text["pooled"], self.k)).squeeze(-1)


PIXEL_EDGES = (0.06, 0.12, 0.24, 0.4, 0.6)  # RGB distances (0-1 channels, at most 3**0.5), faint to large
KEEP_TOLERANCE = 0.24  # a pixel "kept its colour" when it moved less than this (~60 of 255)
KEEP_COLUMN = PIXEL_EDGES.index(KEEP_TOLERANCE)  # the column of `pixel_change` for KEEP_TOLERANCE
PROFILE_QUANTILES = (0.0, 0.1, 0.25, 0.5)  # of the patches' share of unchanged pixels: the worst-kept patches


def speck_map(changed: torch.Tensor) -> torch.Tensor:
    """The changed pixels (B, 1, H, W; 0 or 1) that no 3x3 block of changed pixels covers: what a
    morphological opening removes. A recoloured, added or moved object survives the opening; a
    dot, a thin rim or a one-pixel ghost outline does not."""
    eroded = -nn.functional.max_pool2d(-changed, 3, stride=1, padding=1)
    opened = nn.functional.max_pool2d(eroded, 3, stride=1, padding=1)
    return changed * (1 - opened)


def pixel_change(source: torch.Tensor, edited: torch.Tensor, mean, std, patch: int,
                 specks: bool = False) -> torch.Tensor:
    """Per patch of the vision tower's grid: the share of pixels whose colour moved less than each
    of `PIXEL_EDGES`, then the patch's mean colour in the source and in the edit, and with `specks`
    the share of `speck_map` pixels. (B, patches, len(PIXEL_EDGES) + 6 [+ 1]), from normalised pixel
    tensors. Not learned, so it needs no data: how much each place changed, and to what colour, is
    what a few hundred rankings cannot teach a head to read out of pooled CLIP features."""
    m = torch.as_tensor(mean, dtype=source.dtype, device=source.device).view(1, 3, 1, 1)
    sd = torch.as_tensor(std, dtype=source.dtype, device=source.device).view(1, 3, 1, 1)
    s, e = source * sd + m, edited * sd + m
    d = (e - s).norm(dim=1, keepdim=True)
    close = torch.cat([(d < t).to(s.dtype) for t in PIXEL_EDGES], dim=1)
    maps = [close, s, e]
    if specks:
        maps.append(speck_map((d >= KEEP_TOLERANCE).to(s.dtype)))
    parts = [nn.functional.avg_pool2d(x, patch) for x in maps]
    return torch.cat(parts, dim=1).flatten(2).transpose(1, 2)


class ChangeHead(nn.Module):
    """Reads the edit as a change, with the priors that learning from a few hundred noisy
    rankings needs (measured in docs/reward.md).

    What makes an edit good is local: the named thing changed as asked and nothing else did.
    - direction prior (`direction_prior` > 0): the backbone's CLIP directional similarity
      against the instruction (with `direction_predictor`: against the caption direction
      `hive.direction_predictor` predicts from the source and the instruction), standardised,
      times a learned weight that starts at `direction_prior`: with a backbone trained on edits
      (`train clip --edits`) that score orders variants before any ranking is seen, and the
      rankings then correct it instead of having to find it among all the features;
    - locator prior (`change_locator`): the share of the patches the instruction should change
      (`hive.change_locator`) that changed (cover), and the share of the others (spill),
      standardised, times learned weights that start at +1 and -2 (picked on one simulation's
      held-out pairs, docs/reward.md; on by default with the toy backbone since session 33): "get rid of
      the square" must remove the square, not the circle beside it;
    - main term: the share of the image's pixels that kept their colour (`KEEP_TOLERANCE`),
      standardised, times a weight that the instruction sets (w + G t, t the standardised text
      features, G under an L2 penalty): the same amount of change is good for "make the
      background black" and bad for "add a dot";
    - residual (`residual=True`): change tokens, one per patch (the pixel change of
      `pixel_change`, the size of the CLIP patch-token difference edit - source at each of
      `patch_layers` and a low-rank projection of it, learned positions) read by cross-attention
      from the instruction's tokens and one learned query (did the place the text names change),
      with change statistics (unchanged shares at every tolerance, the worst-kept patches, mean
      patch-token change per layer, size and text-cosine of the pooled CLIP change) and a
      projection of the pooled CLIP change features, into an MLP whose output layer starts at
      zero, so training starts from the main term and the residual grows only as the data
      supports (L2 penalty, early stopping).
    """

    def __init__(self, proj_dim: int, patch_dim: int, text_dim: int, n_patches: int, n_layers: int,
                 config: "RewardConfig"):
        super().__init__()
        h, ht = config.hidden, config.token_dim
        self.k = config.delta_scale
        self.n_layers = n_layers
        self.gate_l2, self.residual_l2 = config.gate_l2, config.residual_l2
        self.text_norm = nn.BatchNorm1d(proj_dim, affine=False)
        self.kept_norm = nn.BatchNorm1d(1, affine=False)
        self.w = nn.Parameter(torch.zeros(1))
        self.gate = nn.Linear(proj_dim, 1, bias=False)
        nn.init.zeros_(self.gate.weight)
        self.direction_prior = config.direction_prior
        if self.direction_prior:
            self.cos_norm = nn.BatchNorm1d(1, affine=False)
            self.a = nn.Parameter(torch.tensor([float(config.direction_prior)]))
        self.locator_term = config.change_locator
        if self.locator_term:
            self.locator_norm = nn.BatchNorm1d(2, affine=False)
            self.b = nn.Parameter(torch.tensor([1.0, -2.0]))
        self.speck_prior = config.speck_prior
        if self.speck_prior:
            self.speck_norm = nn.BatchNorm1d(1, affine=False)
            self.c = nn.Parameter(torch.tensor([float(config.speck_prior)]))
        self.residual = config.residual
        if not self.residual:
            return
        n_pix = len(PIXEL_EDGES) + 6 + (1 if self.speck_prior else 0)
        self.diff_proj = nn.Linear(patch_dim, 8)
        self.tokens_in = nn.Sequential(nn.Linear(n_pix + n_layers + 8, ht), nn.GELU(), nn.Linear(ht, ht),
                                       nn.LayerNorm(ht))
        self.pos = nn.Parameter(torch.randn(1, n_patches, ht) * 0.02)
        self.text_in = nn.Sequential(nn.Linear(text_dim, ht), nn.LayerNorm(ht))
        self.query = nn.Parameter(torch.randn(1, 1, ht) * 0.02)
        self.attn = nn.MultiheadAttention(ht, config.attn_heads, dropout=config.dropout, batch_first=True)
        n_stats = len(PIXEL_EDGES) + len(PROFILE_QUANTILES) + n_layers + 2
        self.stats_norm = nn.BatchNorm1d(n_stats, affine=False)
        self.global_in = nn.Linear(3 * proj_dim + 2, 16)
        self.mlp = nn.Sequential(
            nn.Linear(n_stats + ht + 16, h), nn.GELU(), nn.Dropout(config.dropout),
            nn.Linear(h, h), nn.GELU(), nn.Linear(h, 1))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def penalty(self) -> torch.Tensor:
        """L2 on the instruction's weights and on the residual branch (added to the ranking loss)."""
        out = self.gate_l2 * self.gate.weight.pow(2).sum()
        if self.residual and self.residual_l2:
            out = out + self.residual_l2 * sum(p.pow(2).sum() for n, p in self.named_parameters()
                                               if p.ndim > 1 and n not in ("gate.weight",))
        return out

    def forward(self, src: dict, edit: dict, text: dict) -> torch.Tensor:
        pix = edit["pixel_change"]
        kept = pix[..., KEEP_COLUMN].mean(1, keepdim=True)
        t = self.text_norm(text["pooled"])
        out = self.kept_norm(kept)[:, 0] * (self.w + self.gate(t)[:, 0])
        if self.direction_prior:  # against the predicted caption direction when there is one
            direction = text.get("expected_direction", text["pooled"])
            out = out + self.a * self.cos_norm(direction_cosine(src["pooled"], edit["pooled"], direction))[:, 0]
        if self.locator_term:
            expected = text["expected_change"]  # RewardModel.with_expected_change, or FeatureCache
            changed = 1 - pix[..., KEEP_COLUMN]
            cover, spill = cover_and_spill(changed, expected)
            out = out + (self.locator_norm(torch.stack([cover, spill], dim=1)) * self.b).sum(1)
        if self.speck_prior:  # the speck share is pixel_change's last column
            out = out + self.c * self.speck_norm(pix[..., -1].mean(1, keepdim=True))[:, 0]
        if not self.residual:
            return out
        diff = edit["patches"] - src["patches"]
        b, n, _ = diff.shape
        size = diff.abs().view(b, n, self.n_layers, -1).mean(-1)  # (B, patches, layers)
        tokens = self.tokens_in(torch.cat([pix, size, self.diff_proj(diff)], dim=-1)) + self.pos
        queries = torch.cat([self.query.expand(b, -1, -1), self.text_in(text["tokens"])], dim=1)
        valid = torch.cat([torch.ones_like(text["mask"][:, :1]), text["mask"]], dim=1).to(tokens.dtype)
        read, _ = self.attn(queries, tokens, tokens, need_weights=False)
        read = (read * valid.unsqueeze(-1)).sum(1) / valid.sum(1, keepdim=True)
        n_edges = len(PIXEL_EDGES)
        q = torch.tensor(PROFILE_QUANTILES, dtype=pix.dtype, device=pix.device)
        profile = torch.quantile(pix[..., KEEP_COLUMN], q, dim=1).T
        g = _global_inputs(src["pooled"], edit["pooled"], text["pooled"], self.k)
        stats = self.stats_norm(torch.cat([pix[..., :n_edges].mean(1), profile, size.mean(1), g[:, -2:]], dim=-1))
        return out + self.mlp(torch.cat([stats, read, self.global_in(g)], dim=-1)).squeeze(-1)


class RewardModel(nn.Module):
    """CLIP towers + MLP head. `forward` gives raw scores; `score` gives normalised rewards."""

    def __init__(self, clip, tokenizer, config: RewardConfig):
        super().__init__()
        self.clip = clip
        self.tokenizer = tokenizer
        vision = clip.config.vision_config
        config.image_size = config.image_size or int(vision.image_size)
        config.max_length = config.max_length or int(min(tokenizer.model_max_length,
                                                          clip.config.text_config.max_position_embeddings))
        self.config = config
        if config.head_type not in ("change", "global"):
            raise ValueError(f"unknown head_type {config.head_type!r}: 'change' or 'global'")
        if config.ensemble < 1:
            raise ValueError("ensemble must be >= 1")
        d = int(clip.config.projection_dim)
        n_layers = int(vision.num_hidden_layers)
        bad = [l for l in config.patch_layers if not -(n_layers + 1) <= l <= n_layers]
        if bad or not config.patch_layers:
            raise ValueError(f"patch_layers {config.patch_layers} must name hidden states between "
                             f"{-(n_layers + 1)} and {n_layers} (0: the patch embeddings)")
        n_patches = (int(vision.image_size) // int(vision.patch_size)) ** 2
        patch_dim = int(vision.hidden_size) * len(config.patch_layers)
        text_dim = int(clip.config.text_config.hidden_size)

        def make() -> nn.Module:
            if config.head_type == "global":
                return GlobalHead(d, config)
            return ChangeHead(d, patch_dim, text_dim, n_patches, len(config.patch_layers), config)

        self.head = nn.ModuleList([make() for _ in range(config.ensemble)])
        self.change_locator: ChangeLocator | None = None
        if config.locator_pixels and not config.change_locator:
            raise ValueError("locator_pixels is a part of the change locator: it needs change_locator=True")
        if config.change_locator:  # fitted apart (hive.change_locator), then frozen
            self.change_locator = ChangeLocator(int(vision.hidden_size), text_dim, n_patches,
                                                pixel_stem=config.locator_pixels).requires_grad_(False)
        self.direction_predictor: DirectionPredictor | None = None
        if config.direction_predictor:  # fitted apart (hive.direction_predictor), then frozen
            if config.head_type != "change" or not config.direction_prior:
                raise ValueError("direction_predictor feeds the change head's direction prior: it needs "
                                 "head_type='change' and direction_prior != 0")
            self.direction_predictor = DirectionPredictor(d, text_dim, d).requires_grad_(False)
        self.apply_freeze(config.freeze_layers)

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_backbone(cls, backbone: str | Path, **kwargs) -> "RewardModel":
        """A fresh head on a CLIP folder or hub id (needs its tokenizer beside it)."""
        from transformers import CLIPModel, CLIPTokenizer

        clip = CLIPModel.from_pretrained(backbone, dtype=torch.float32)
        tokenizer = CLIPTokenizer.from_pretrained(backbone)
        config = RewardConfig(backbone=str(backbone), **kwargs)
        proc = Path(backbone) / "preprocessor_config.json"
        if proc.exists():
            p = json.loads(proc.read_text())
            config.image_mean = list(p.get("image_mean", config.image_mean))
            config.image_std = list(p.get("image_std", config.image_std))
        return cls(clip, tokenizer, config)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "RewardModel":
        """Load a folder written by `save_pretrained` (offline: everything is inside it)."""
        from safetensors.torch import load_file
        from transformers import CLIPModel, CLIPTokenizer

        path = Path(path)
        cfg_path = path / "config.json"
        if not cfg_path.exists():
            raise FileNotFoundError(f"{cfg_path} not found: not a reward model folder")
        raw = json.loads(cfg_path.read_text())
        if raw.get("model_type") != MODEL_TYPE:
            raise ValueError(f"{path} is not a HIVE reward model (model_type={raw.get('model_type')!r})")
        raw.setdefault("head_type", "global")  # folders from before the change head
        config = RewardConfig(**raw)
        clip = CLIPModel.from_pretrained(path / "backbone", dtype=torch.float32)
        tokenizer = CLIPTokenizer.from_pretrained(path / "backbone")
        model = cls(clip, tokenizer, config)
        state = load_file(str(path / "head.safetensors"))
        if config.head_type == "global" and not any(".mlp." in k for k in state):
            # the first head was a bare Sequential ("0.weight", "3.weight", ...): member 0's MLP
            state = {f"0.mlp.{k}": v for k, v in state.items()}
        model.head.load_state_dict(state)
        if model.change_locator is not None:
            model.change_locator.load_state_dict(load_file(str(path / "change_locator.safetensors")))
        if model.direction_predictor is not None:
            model.direction_predictor.load_state_dict(load_file(str(path / "direction_predictor.safetensors")))
        model.eval()
        return model

    def save_pretrained(self, path: str | Path) -> Path:
        """Write the folder beside its place and rename it in, so a crash leaves no half folder."""
        from safetensors.torch import save_file
        from transformers import CLIPImageProcessor

        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        self.clip.save_pretrained(tmp / "backbone")
        self.tokenizer.save_pretrained(tmp / "backbone")
        size = self.config.image_size
        CLIPImageProcessor(do_resize=True, size={"shortest_edge": size}, do_center_crop=True,
                           crop_size={"height": size, "width": size}, image_mean=self.config.image_mean,
                           image_std=self.config.image_std).save_pretrained(tmp / "backbone")
        save_file({k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()},
                  str(tmp / "head.safetensors"))
        if self.change_locator is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in self.change_locator.state_dict().items()},
                      str(tmp / "change_locator.safetensors"))
        if self.direction_predictor is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in self.direction_predictor.state_dict().items()},
                      str(tmp / "direction_predictor.safetensors"))
        (tmp / "config.json").write_text(json.dumps(asdict(self.config), indent=2))
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
        return path

    def apply_freeze(self, n: int) -> None:
        """Freeze embeddings and the lowest `n` encoder layers of both towers (-1: whole backbone).

        With a few hundred rankings, fine-tuning all of ViT-L overfits; the top layers and the
        head are what must adapt."""
        for p in self.clip.parameters():
            p.requires_grad_(True)
        if n == 0:
            return
        if n < 0:
            for p in self.clip.parameters():
                p.requires_grad_(False)
            return
        for tower in (self.clip.vision_model, self.clip.text_model):
            for p in tower.embeddings.parameters():
                p.requires_grad_(False)
            for layer in tower.encoder.layers[:n]:
                for p in layer.parameters():
                    p.requires_grad_(False)
        if hasattr(self.clip.vision_model, "pre_layrnorm"):
            for p in self.clip.vision_model.pre_layrnorm.parameters():
                p.requires_grad_(False)

    # -- inputs ---------------------------------------------------------------------------------
    def pixel_values(self, images: list[Image.Image]) -> torch.Tensor:
        """Images -> normalised (N, 3, S, S) at the backbone's resolution (a plain square resize:
        edits may change the borders, so nothing is cropped away)."""
        s = self.config.image_size
        arrs = []
        for im in images:
            im = im.convert("RGB")
            if im.size != (s, s):
                im = im.resize((s, s), Image.Resampling.BICUBIC)
            arrs.append(np.asarray(im))
        x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float() / 255
        mean = torch.tensor(self.config.image_mean).view(1, 3, 1, 1)
        std = torch.tensor(self.config.image_std).view(1, 3, 1, 1)
        return (x - mean) / std

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        t = self.tokenizer(list(texts), padding="max_length", max_length=self.config.max_length, truncation=True,
                           return_tensors="pt")
        return {"input_ids": t.input_ids, "attention_mask": t.attention_mask}

    # -- features and scores -------------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        """`pooled`: projected, L2-normalised image features; `patches` (the change head's
        residual branch only): the patch tokens of the `patch_layers` hidden states, side by side;
        `last_patches` (with a change locator): the last layer's patch tokens, what it reads;
        `source_pixels` (with a locator's pixel stem): the pixel values themselves, what the stem reads."""
        want = self.config.head_type == "change" and self.config.residual
        out = self.clip.vision_model(pixel_values=pixel_values, output_hidden_states=want, return_dict=True)
        feats = {"pooled": nn.functional.normalize(self.clip.visual_projection(out.pooler_output), dim=-1)}
        if want:
            feats["patches"] = torch.cat([out.hidden_states[l][:, 1:] for l in self.config.patch_layers], dim=-1)
        if self.change_locator is not None:
            feats["last_patches"] = out.last_hidden_state[:, 1:]
            if self.change_locator.stem is not None:
                feats["source_pixels"] = pixel_values
        return feats

    def pixel_change(self, source_pixels: torch.Tensor, edited_pixels: torch.Tensor) -> torch.Tensor:
        """`pixel_change` of (source, edit) rows on the vision tower's patch grid."""
        return pixel_change(source_pixels, edited_pixels, self.config.image_mean, self.config.image_std,
                            int(self.clip.config.vision_config.patch_size), specks=bool(self.config.speck_prior))

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """`pooled`: projected, L2-normalised text features; `tokens` and `mask`: the text tower's
        hidden states at `text_token_layer`, for the change head's cross-attention; `words` (with a
        change locator or a direction predictor): the token + position embeddings, what they read (the
        toy CLIP's layers wash out shape and position words)."""
        layer = self.config.text_token_layer
        words = self.change_locator is not None or self.direction_predictor is not None
        out = self.clip.text_model(input_ids=input_ids, attention_mask=attention_mask,
                                   output_hidden_states=layer != -1 or words, return_dict=True)
        tokens = out.last_hidden_state if layer == -1 else out.hidden_states[layer]
        feats = {"pooled": nn.functional.normalize(self.clip.text_projection(out.pooler_output), dim=-1),
                 "tokens": tokens, "mask": attention_mask}
        if words:
            feats["words"] = out.hidden_states[0]
        return feats

    def with_expected_change(self, src: dict, text: dict) -> dict:
        """`text` plus, with a change locator, `expected_change`: (rows, patches) in [0, 1], where
        the instruction should change the source; with a direction predictor, `expected_direction`:
        (rows, proj_dim) unit vectors, the caption direction it should move the source in."""
        out = dict(text)
        if self.change_locator is not None:
            out["expected_change"] = torch.sigmoid(self.change_locator(src["last_patches"], text["words"], text["mask"],
                                                                       src.get("source_pixels")))
        if self.direction_predictor is not None:
            out["expected_direction"] = self.direction_predictor(src["pooled"], text["words"], text["mask"])
        return out

    def head_forward(self, src: dict, edit: dict, text: dict, members: bool = False) -> torch.Tensor:
        """Raw scores from features (one row per edit): the mean over the ensemble's heads, or
        with `members` each head's, (heads, edits), which is how the members are trained apart."""
        text = self.with_expected_change(src, text)
        each = torch.stack([h(src, edit, text) for h in self.head])
        return each if members else each.mean(0)

    def forward(self, source_pixels: torch.Tensor, edited_pixels: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor, owner: torch.Tensor, members: bool = False) -> torch.Tensor:
        """Raw scores of edited images; `owner[i]` is the row of source/text that edit i belongs to,
        so a source and instruction shared by K variants go through the towers once."""
        feats = self.encode_images(torch.cat([source_pixels, edited_pixels]))
        n = len(source_pixels)
        src = {k: v[:n][owner] for k, v in feats.items()}
        edit = {k: v[n:] for k, v in feats.items()}
        if self.config.head_type == "change":
            edit["pixel_change"] = self.pixel_change(source_pixels[owner], edited_pixels)
        text = {k: v[owner] for k, v in self.encode_text(input_ids, attention_mask).items()}
        return self.head_forward(src, edit, text, members)

    @torch.no_grad()
    def score(self, sources: list[Image.Image], edited: list[Image.Image], instructions: list[str],
              batch_size: int = 32, normalise: bool = True) -> np.ndarray:
        """Rewards of (source, edited, instruction) rows, in batches; normalised by the score scale."""
        if not (len(sources) == len(edited) == len(instructions)):
            raise ValueError("sources, edited and instructions must have the same length")
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        out = []
        for i in range(0, len(edited), batch_size):
            sl = slice(i, i + batch_size)
            text = self.tokenize(instructions[sl])
            n = len(edited[sl])
            raw = self(self.pixel_values(sources[sl]).to(device), self.pixel_values(edited[sl]).to(device),
                       text["input_ids"].to(device), text["attention_mask"].to(device),
                       torch.arange(n, device=device))
            out.append(raw.float().cpu().numpy())
        self.train(was_training)
        scores = np.concatenate(out) if out else np.zeros(0, dtype=np.float32)
        if normalise:
            scores = (scores - self.config.score_mean) / max(self.config.score_std, 1e-8)
        return scores


@torch.no_grad()
def clip_directional(clip, tokenizer, sources: list[Image.Image], edited: list[Image.Image],
                     source_texts: list[str], target_texts: list[str] | None = None,
                     image_size: int | None = None, batch_size: int = 32) -> np.ndarray:
    """CLIP directional similarity as a reward baseline: cos(E(edit) - E(source), direction of the
    text), where the text direction is E(target caption) - E(source caption) when captions are
    known, else E(instruction) (`target_texts=None`, `source_texts` = instructions)."""
    size = image_size or int(clip.config.vision_config.image_size)
    cfg = RewardConfig(backbone="", image_size=size,
                       max_length=int(min(tokenizer.model_max_length, clip.config.text_config.max_position_embeddings)))
    helper = RewardModel.__new__(RewardModel)  # only for its preprocessing helpers
    helper.config, helper.tokenizer = cfg, tokenizer
    clip.eval()
    device = next(clip.parameters()).device
    out = []
    for i in range(0, len(sources), batch_size):
        sl = slice(i, i + batch_size)
        px = torch.cat([helper.pixel_values(sources[sl]), helper.pixel_values(edited[sl])]).to(device)
        img = clip.get_image_features(pixel_values=px)
        img = img if isinstance(img, torch.Tensor) else img.pooler_output
        img = nn.functional.normalize(img, dim=-1)
        n = len(sources[sl])
        d_img = img[n:] - img[:n]

        def txt(texts: list[str]) -> torch.Tensor:
            t = {k: v.to(device) for k, v in helper.tokenize(texts).items()}
            f = clip.get_text_features(**t)
            f = f if isinstance(f, torch.Tensor) else f.pooler_output
            return nn.functional.normalize(f, dim=-1)

        d_txt = txt(source_texts[sl]) if target_texts is None else txt(target_texts[sl]) - txt(source_texts[sl])
        out.append(nn.functional.cosine_similarity(d_img, d_txt, dim=-1, eps=1e-8).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)
