"""Train the reward model on rankings, evaluate it on held-out requests, compare with baselines.

Data: every ranking in the feedback store (or in an exported dataset), read through
`db.queries.pairwise_preferences` and regrouped into whole rankings. The split is by edit
request, so no request is in both train and test. One training example is one ranking: all its
pairs are scored together under Bradley-Terry, -log sigmoid(R_w - R_l), with ties as soft 0.5
labels (InstructGPT keeps the pairs of one ranking in one batch element), or, optionally, under
Plackett-Luce over the whole order (ties by Breslow's approximation).

Metrics on the held-out requests, for the reward model and two baselines (CLIP directional
similarity used as a reward, and a random scorer):
- `heldout_pair_accuracy`: pairs that the annotator ordered (ties excluded);
- `heldout_pair_accuracy_with_ties`: all pairs, a tie predicted when |dR| is under a threshold
  chosen on the training pairs;
- with simulated data, `true_pair_accuracy`: against the noise-free order, and
  `single_annotator_accuracy`: how often one annotator's ranking agrees with that order (a tie
  counts half). The reward model should beat it, as PickScore beat single human raters.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hive.files import write_json_atomic
from hive.reward import RewardModel, clip_directional


# ---------------------------------------------------------------- data
@dataclass
class Ranking:
    """One annotator's ranking of one request's variants (rank None: unranked, below the ranked)."""

    ranking_id: int
    request_id: int
    annotator_id: int
    is_simulated: bool
    instruction: str
    source_path: str
    variant_ids: list[int]
    variant_paths: list[str]
    ranks: list[int | None]
    true_quality: list[float] | None = None  # noise-free quality of simulated variants
    captions: tuple[str, str] | None = None  # (source caption, target caption) when known
    all_bad: bool = False  # the annotator also marked every variant as bad

    def pairs(self) -> list[tuple[int, int, float]]:
        """(i, j, label) with label = P(i beats j): 1, or 0.5 for a tie; unranked pairs are skipped."""
        out = []
        for i in range(len(self.ranks)):
            for j in range(i + 1, len(self.ranks)):
                ri, rj = self.ranks[i], self.ranks[j]
                if ri is None and rj is None:
                    continue
                ri = math.inf if ri is None else ri
                rj = math.inf if rj is None else rj
                out.append((i, j, 0.5 if ri == rj else float(ri < rj)))
        return out


def rankings_from_db(url: str | None = None, home: Path | None = None, include_simulated: bool = True,
                     consented_only: bool = True) -> list[Ranking]:
    """Regroup `pairwise_preferences` into whole rankings, with the simulated truth if there is one."""
    import pandas as pd
    from sqlalchemy import select

    from db.engine import session_scope
    from db.images import ImageStore
    from db.models import EditRequest, Variant
    from db.queries import pairwise_preferences

    store = ImageStore(home)
    with session_scope(url, write=False) as s:
        df = pairwise_preferences(s, store=store, consented_only=consented_only, include_simulated=include_simulated)
        if df.empty:
            return []
        req_ids = sorted(set(int(r) for r in df.request_id))
        params = dict(s.execute(select(EditRequest.id, EditRequest.params).where(EditRequest.id.in_(req_ids))).all())
        vparams = dict(s.execute(select(Variant.id, Variant.params).where(Variant.request_id.in_(req_ids))).all())
    groups: dict[int, dict] = {}
    for row in df.itertuples(index=False):
        g = groups.setdefault(int(row.ranking_id), {
            "request_id": int(row.request_id), "annotator_id": int(row.annotator_id),
            "is_simulated": bool(row.is_simulated), "instruction": row.instruction,
            "source_path": row.source_image_path, "all_bad": bool(row.all_bad), "variants": {}})
        for vid, path, rank in ((row.winner_variant_id, row.winner_image_path, row.winner_rank),
                                (row.loser_variant_id, row.loser_image_path, row.loser_rank)):
            g["variants"][int(vid)] = (path, None if pd.isna(rank) else int(rank))
    out = []
    for rid, g in sorted(groups.items()):
        vids = sorted(g["variants"])
        truth = [vparams.get(v, {}).get("sim_quality") for v in vids]
        p = params.get(g["request_id"]) or {}
        caps = (p["source_caption"], p["target_caption"]) if "source_caption" in p and "target_caption" in p else None
        out.append(Ranking(rid, g["request_id"], g["annotator_id"], g["is_simulated"], g["instruction"],
                           g["source_path"], vids, [g["variants"][v][0] for v in vids],
                           [g["variants"][v][1] for v in vids],
                           [float(t) for t in truth] if all(t is not None for t in truth) else None, caps,
                           g["all_bad"]))
    return out


@contextmanager
def imported_export(path: Path):
    """An exported dataset, imported into a throwaway SQLite home: yields (url, home)."""
    from db.engine import dispose_engine, session_scope
    from db.export import import_data
    from db.images import ImageStore

    tmp = Path(tempfile.mkdtemp(prefix="hive-reward-data-"))
    url = f"sqlite:///{tmp / 'hive.db'}"
    try:
        with session_scope(url) as s:
            import_data(s, ImageStore(tmp), path)
        yield url, tmp
    finally:
        dispose_engine(url)
        shutil.rmtree(tmp, ignore_errors=True)


def split_by_request(rankings: list[Ranking], test_fraction: float = 0.2, seed: int = 0
                     ) -> tuple[list[Ranking], list[Ranking]]:
    """Train and test rankings with disjoint request sets (a request's rankings stay together)."""
    reqs = sorted({r.request_id for r in rankings})
    rng = np.random.default_rng(seed)
    rng.shuffle(reqs)
    n_test = int(round(len(reqs) * test_fraction))
    if len(reqs) >= 2:
        n_test = min(max(n_test, 1), len(reqs) - 1)
    test = set(reqs[:n_test])
    return [r for r in rankings if r.request_id not in test], [r for r in rankings if r.request_id in test]


def first_requests(rankings: list[Ranking], n: int, seed: int = 0) -> list[Ranking]:
    """The rankings of `n` requests drawn at random (nested: a smaller n is a subset of a larger)."""
    reqs = sorted({r.request_id for r in rankings})
    np.random.default_rng(seed + 1).shuffle(reqs)
    keep = set(reqs[:n])
    return [r for r in rankings if r.request_id in keep]


class ImageCache:
    """Decoded images by path: the same source is shared by K variants and several annotators."""

    def __init__(self):
        self.images: dict[str, Image.Image] = {}

    def __call__(self, path: str) -> Image.Image:
        if path not in self.images:
            with Image.open(path) as im:
                self.images[path] = im.convert("RGB")
        return self.images[path]


# ---------------------------------------------------------------- losses
def bradley_terry_loss(scores: torch.Tensor, pairs: list[tuple[int, int, float]]) -> torch.Tensor:
    """Mean over the ranking's pairs of the BCE between sigmoid(s_i - s_j) and the label
    (1: i better, 0.5: tie). A tie pulls the two scores together."""
    if not pairs:
        return scores.sum() * 0
    i = torch.tensor([p[0] for p in pairs], device=scores.device)
    j = torch.tensor([p[1] for p in pairs], device=scores.device)
    y = torch.tensor([p[2] for p in pairs], device=scores.device, dtype=scores.dtype)
    return torch.nn.functional.binary_cross_entropy_with_logits(scores[i] - scores[j], y)


def plackett_luce_loss(scores: torch.Tensor, ranks: list[int | None]) -> torch.Tensor:
    """Negative log-likelihood of the whole order, normalised per ranked item. Tied items share a
    risk set (Breslow); unranked items (top-k) only sit in the denominators."""
    big = 10**9
    r = torch.tensor([big if x is None else x for x in ranks], device=scores.device)
    terms = []
    for k in range(len(ranks)):
        if ranks[k] is None:
            continue
        at_risk = r >= r[k]
        if at_risk.sum() <= 1:
            continue
        terms.append(torch.logsumexp(scores[at_risk], 0) - scores[k])
    if not terms:
        return scores.sum() * 0
    return torch.stack(terms).mean()


# ---------------------------------------------------------------- metrics
def pair_accuracy(rankings: list[Ranking], scores: list[np.ndarray], tie_threshold: float | None = None
                  ) -> dict[str, float | int | None]:
    """Against the annotators' labels: ties excluded, and (with a threshold) ties included."""
    right = n = 0
    right_t = n_t = 0
    for r, s in zip(rankings, scores):
        for i, j, y in r.pairs():
            d = float(s[i] - s[j])
            if y != 0.5:
                n += 1
                right += (d > 0) == (y == 1.0) if d != 0 else 0.5
            if tie_threshold is not None:
                n_t += 1
                pred = 0.5 if abs(d) <= tie_threshold else float(d > 0)
                right_t += float(pred == y)
    return {"accuracy": right / n if n else None, "pairs": n,
            "accuracy_with_ties": right_t / n_t if n_t else None, "pairs_with_ties": n_t}


def best_tie_threshold(rankings: list[Ranking], scores: list[np.ndarray]) -> float:
    """The |dR| under which predicting a tie maximises accuracy with ties on these rankings."""
    diffs = [(abs(float(s[i] - s[j])), y, float(s[i] - s[j])) for r, s in zip(rankings, scores) for i, j, y in r.pairs()]
    if not diffs or not any(y == 0.5 for _, y, _ in diffs):
        return 0.0
    best_t, best = 0.0, -1.0
    for t in sorted({0.0} | {a for a, _, _ in diffs}):
        acc = sum((0.5 if a <= t else float(d > 0)) == y for a, y, d in diffs)
        if acc > best:
            best, best_t = acc, t
    return best_t


def true_order_accuracy(rankings: list[Ranking], scores: list[np.ndarray]) -> dict[str, float | int | None]:
    """Against the noise-free order, once per request (its variants are the same in every ranking):
    pairs with distinct true quality; an equal score counts half."""
    seen: set[int] = set()
    right = n = 0.0
    for r, s in zip(rankings, scores):
        if r.true_quality is None or r.request_id in seen:
            continue
        seen.add(r.request_id)
        q = r.true_quality
        for i in range(len(q)):
            for j in range(i + 1, len(q)):
                if q[i] == q[j]:
                    continue
                n += 1
                d = s[i] - s[j]
                right += 0.5 if d == 0 else float((d > 0) == (q[i] > q[j]))
    return {"accuracy": right / n if n else None, "pairs": int(n)}


def single_annotator_accuracy(rankings: list[Ranking]) -> dict[str, float | int | None]:
    """How often one annotator's ranking agrees with the noise-free order (ties count half)."""
    right = n = 0.0
    for r in rankings:
        if r.true_quality is None:
            continue
        q = r.true_quality
        for i in range(len(q)):
            for j in range(i + 1, len(q)):
                if q[i] == q[j] or (r.ranks[i] is None and r.ranks[j] is None):
                    continue
                n += 1
                ri = math.inf if r.ranks[i] is None else r.ranks[i]
                rj = math.inf if r.ranks[j] is None else r.ranks[j]
                right += 0.5 if ri == rj else float((ri < rj) == (q[i] > q[j]))
    return {"accuracy": right / n if n else None, "pairs": int(n)}


# ---------------------------------------------------------------- training
@dataclass
class RewardTrainConfig:
    backbone: str | None = None  # CLIP folder or hub id (default: the toy CLIP)
    loss: str = "bt"  # "bt" (Bradley-Terry over all pairs) or "pl" (Plackett-Luce)
    steps: int = 600
    batch_size: int = 16  # rankings per step
    lr: float = 1e-4
    head_lr: float = 1e-3
    weight_decay: float = 0.01
    freeze_layers: int = 2
    hidden: int = 256
    test_fraction: float = 0.2
    seed: int = 0
    checkpoint_every: int = 200
    mixed_precision: str = "no"
    include_simulated: bool = True
    consented_only: bool = True
    skip_all_bad: bool = False
    extra: dict = field(default_factory=dict)


def _ranking_batch(model: RewardModel, batch: list[Ranking], cache: ImageCache, device) -> tuple:
    sources = model.pixel_values([cache(r.source_path) for r in batch]).to(device)
    edited = model.pixel_values([cache(p) for r in batch for p in r.variant_paths]).to(device)
    text = model.tokenize([r.instruction for r in batch])
    owner = torch.tensor([k for k, r in enumerate(batch) for _ in r.variant_paths], device=device)
    return sources, edited, text["input_ids"].to(device), text["attention_mask"].to(device), owner


@torch.no_grad()
def score_rankings(model: RewardModel, rankings: list[Ranking], cache: ImageCache, batch_size: int = 32
                   ) -> list[np.ndarray]:
    """Raw reward of every variant of every ranking (sources and text once per ranking)."""
    model.eval()
    device = next(model.parameters()).device
    out: list[np.ndarray] = []
    for i in range(0, len(rankings), batch_size):
        chunk = rankings[i:i + batch_size]
        s = model(*_ranking_batch(model, chunk, cache, device)).float().cpu().numpy()
        k = 0
        for r in chunk:
            out.append(s[k:k + len(r.variant_paths)])
            k += len(r.variant_paths)
    return out


def evaluate_scorer(train: list[Ranking], test: list[Ranking], train_scores: list[np.ndarray] | None,
                    test_scores: list[np.ndarray]) -> dict:
    t = best_tie_threshold(train, train_scores) if train_scores is not None else 0.0
    acc = pair_accuracy(test, test_scores, tie_threshold=t)
    return {"heldout_pair_accuracy": acc["accuracy"], "heldout_pair_accuracy_with_ties": acc["accuracy_with_ties"],
            "tie_threshold": t, "true_pair_accuracy": true_order_accuracy(test, test_scores)["accuracy"]}


def clip_direction_scores(clip, tokenizer, rankings: list[Ranking], cache: ImageCache,
                          use_captions: bool = True) -> list[np.ndarray]:
    """CLIP directional similarity of every variant, with captions when the request has them
    (and `use_captions`), else with the instruction as the text direction."""
    out = []
    for r in rankings:
        n = len(r.variant_paths)
        src = [cache(r.source_path)] * n
        if r.captions is not None and use_captions:
            s = clip_directional(clip, tokenizer, src, [cache(p) for p in r.variant_paths], [r.captions[0]] * n,
                                 [r.captions[1]] * n)
        else:
            s = clip_directional(clip, tokenizer, src, [cache(p) for p in r.variant_paths], [r.instruction] * n)
        out.append(s)
    return out


def _json_safe(x):
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return None if not math.isfinite(float(x)) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


def train_reward(rankings: list[Ranking], out: Path, config: RewardTrainConfig,
                 split: tuple[list[Ranking], list[Ranking]] | None = None, progress: bool = True) -> dict:
    """Train on the train split, save `out/model`, return the metrics report (also `out/metrics.json`).

    Resumes from `out/checkpoints` when a run was interrupted."""
    from tqdm.auto import tqdm

    from hive.training import LossLog, make_accelerator, resume_latest, save_checkpoint
    from hive.zoo import TOY_CLIP

    if config.loss not in ("bt", "pl"):
        raise ValueError(f"unknown loss {config.loss!r}: 'bt' (Bradley-Terry) or 'pl' (Plackett-Luce)")
    train, test = split if split is not None else split_by_request(rankings, config.test_fraction, config.seed)
    train = [r for r in train if r.pairs() and not (config.skip_all_bad and r.all_bad)]
    if not train:
        raise ValueError("no rankings with at least one judged pair to train on")
    if not test:
        raise ValueError("no held-out rankings: need rankings of at least two requests")
    leak = {r.request_id for r in train} & {r.request_id for r in test}
    assert not leak, f"requests in both train and test: {sorted(leak)[:5]}"
    backbone = config.backbone or str(TOY_CLIP)
    if backbone == str(TOY_CLIP) and not TOY_CLIP.exists():
        raise FileNotFoundError(f"the toy CLIP ({TOY_CLIP}) is not built yet: pass --backbone CLIP_FOLDER_OR_HUB_ID")
    out.mkdir(parents=True, exist_ok=True)
    accelerator = make_accelerator(config.mixed_precision, config.seed)
    model = RewardModel.from_backbone(backbone, hidden=config.hidden, freeze_layers=config.freeze_layers)
    head = list(model.head.parameters())
    body = [p for p in model.clip.parameters() if p.requires_grad]
    groups = [{"params": head, "lr": config.head_lr}] + ([{"params": body, "lr": config.lr}] if body else [])
    optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    start = resume_latest(accelerator, out)
    log = LossLog(out, accelerator.is_main_process)
    cache = ImageCache()
    rng = np.random.default_rng(config.seed)
    order: list[int] = []
    for _ in range(start):  # replay the batch order so a resumed run sees the same batches
        order = _next_batch(order, len(train), config.batch_size, rng)[1]
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, desc="train reward",
               disable=not (progress and accelerator.is_local_main_process))
    model.train()
    raw = accelerator.unwrap_model(model)
    loss_value = float("nan")
    for step in bar:
        idx, order = _next_batch(order, len(train), config.batch_size, rng)
        batch = [train[i] for i in idx]
        scores = model(*_ranking_batch(raw, batch, cache, accelerator.device))
        losses, k = [], 0
        for r in batch:
            s = scores[k:k + len(r.variant_paths)]
            k += len(r.variant_paths)
            losses.append(bradley_terry_loss(s, r.pairs()) if config.loss == "bt" else plackett_luce_loss(s, r.ranks))
        loss = torch.stack(losses).mean()
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        loss_value = loss.item()
        bar.set_postfix(loss=f"{loss_value:.3f}")
        if (step + 1) % 10 == 0 or step + 1 == config.steps:
            log.log(step + 1, loss=loss_value)
        if config.checkpoint_every and (step + 1) % config.checkpoint_every == 0 and step + 1 < config.steps:
            save_checkpoint(accelerator, out, step + 1)
    model = accelerator.unwrap_model(model)
    train_scores = score_rankings(model, train, cache)
    test_scores = score_rankings(model, test, cache)
    flat = np.concatenate(train_scores)
    model.config.score_mean = float(flat.mean())
    model.config.score_std = float(flat.std()) or 1.0
    report = _report(model, train, test, train_scores, test_scores, cache, config, backbone, loss_value)
    model.config.extra = {"metrics": report}
    if accelerator.is_main_process:
        model.save_pretrained(out / "model")
        write_json_atomic(out / "metrics.json", report)
    return report


def _next_batch(order: list[int], n: int, batch_size: int, rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """Epochs of shuffled rankings, `batch_size` at a time."""
    if len(order) < batch_size:
        order = order + [int(i) for i in rng.permutation(n)]
        while len(order) < batch_size:
            order += [int(i) for i in rng.permutation(n)]
    return order[:batch_size], order[batch_size:]


def _report(model: RewardModel, train, test, train_scores, test_scores, cache, config, backbone, final_loss) -> dict:
    from transformers import CLIPModel

    ours = evaluate_scorer(train, test, train_scores, test_scores)
    # the baseline uses the backbone as it was before training, not the fine-tuned towers
    base_clip = CLIPModel.from_pretrained(backbone, dtype=torch.float32).to(next(model.parameters()).device)
    clip_test = clip_direction_scores(base_clip, model.tokenizer, test, cache)
    clip_train = clip_direction_scores(base_clip, model.tokenizer, train, cache)
    clip = evaluate_scorer(train, test, clip_train, clip_test)
    has_captions = any(r.captions is not None for r in test)
    if has_captions:  # captions are privileged (a reward model sees only the instruction): also without
        clip_instr = evaluate_scorer(train, test, clip_direction_scores(base_clip, model.tokenizer, train, cache, False),
                                     clip_direction_scores(base_clip, model.tokenizer, test, cache, False))
    else:
        clip_instr = clip
    rng = np.random.default_rng(config.seed + 12345)
    rand_test = [rng.random(len(r.variant_paths)) for r in test]
    rand = evaluate_scorer(train, test, None, rand_test)
    single = single_annotator_accuracy(test)
    true_pairs = true_order_accuracy(test, test_scores)["pairs"]
    simulated = any(r.true_quality is not None for r in test)
    report = {
        "heldout_pair_accuracy": ours["heldout_pair_accuracy"],
        "heldout_pair_accuracy_with_ties": ours["heldout_pair_accuracy_with_ties"],
        "true_pair_accuracy": ours["true_pair_accuracy"],
        "single_annotator_accuracy": single["accuracy"],
        "clip_direction_accuracy": clip["true_pair_accuracy"] if simulated else clip["heldout_pair_accuracy"],
        "clip_direction_uses_captions": has_captions,
        "clip_instruction_direction_accuracy": (clip_instr["true_pair_accuracy"] if simulated
                                                else clip_instr["heldout_pair_accuracy"]),
        "random_accuracy": rand["true_pair_accuracy"] if simulated else rand["heldout_pair_accuracy"],
        "accuracy_reference": "noise-free order" if simulated else "annotator labels",
        "baselines": {"clip_direction": clip, "clip_instruction_direction": clip_instr, "random": rand},
        "tie_threshold": ours["tie_threshold"],
        "train_requests": len({r.request_id for r in train}), "test_requests": len({r.request_id for r in test}),
        "train_rankings": len(train), "test_rankings": len(test),
        "test_pairs": pair_accuracy(test, test_scores)["pairs"], "test_true_pairs": true_pairs,
        "loss": config.loss, "steps": config.steps, "final_loss": final_loss, "backbone": backbone,
        "freeze_layers": config.freeze_layers, "score_mean": model.config.score_mean,
        "score_std": model.config.score_std,
    }
    return _json_safe(report)


def register(path: Path, metrics: dict, name: str | None = None, url: str | None = None) -> int:
    """Record the trained model as a reward model version (a candidate) with its metrics."""
    from db import feedback as fb
    from db.engine import session_scope

    name = name or f"reward-{time.strftime('%Y%m%d-%H%M%S')}"
    with session_scope(url) as s:
        mv = fb.register_model_version(s, "reward", name, str(Path(path).resolve()), metrics=_json_safe(metrics))
        return int(mv.id)


# ---------------------------------------------------------------- the toy experiment
def run_experiment(out: Path, editor, requests: int = 300, test_requests: int = 100, variants: int = 4,
                   annotators: int = 5, curve: list[int] | None = None, config: RewardTrainConfig | None = None,
                   steps: int = 20, batch: int = 8, progress: bool = True) -> dict:
    """The must-show experiment in one call: simulate `requests + test_requests` toy requests
    (calibrated noise) into a fresh store under `out/home`, hold out `test_requests` requests,
    train one reward model per learning-curve size on nested subsets of the rest, and write
    `out/report.json`, `out/report.md` and `out/learning_curve.png`."""
    from db.engine import dispose_engine
    from hive.simulate import simulate

    config = config or RewardTrainConfig()
    curve = sorted({min(c, requests) for c in (curve or [50, 100, 200, 300])})
    home = out / "home"
    if home.exists():
        raise FileExistsError(f"{home} exists: the experiment starts from an empty store; remove it or pick --out")
    home.mkdir(parents=True)
    url = f"sqlite:///{home / 'hive.db'}"
    old = {k: os.environ.get(k) for k in ("HIVE_HOME", "HIVE_DB_URL")}
    os.environ["HIVE_HOME"], os.environ["HIVE_DB_URL"] = str(home), url
    try:
        sim = simulate(editor, requests + test_requests, variants, annotators=annotators, url=url, steps=steps,
                       batch=batch, progress=progress)
        rankings = rankings_from_db(url, home)
    finally:
        dispose_engine(url)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    test_ids = set(sim.request_ids[requests:])
    train_all = [r for r in rankings if r.request_id not in test_ids]
    test = [r for r in rankings if r.request_id in test_ids]
    points = []
    for n in curve:
        sub = first_requests(train_all, n, config.seed)
        rep = train_reward(rankings, out / f"n{n}", config, split=(sub, test), progress=progress)
        points.append({"requests": n, **{k: rep[k] for k in (
            "heldout_pair_accuracy", "heldout_pair_accuracy_with_ties", "true_pair_accuracy",
            "single_annotator_accuracy", "clip_direction_accuracy", "clip_instruction_direction_accuracy",
            "random_accuracy", "train_rankings")}})
    report = _json_safe({"simulation": asdict(sim) | {"request_ids": None}, "curve": points,
                         "config": asdict(config), "test_requests": test_requests, "variants": variants})
    write_json_atomic(out / "report.json", report)
    _plot_curve(points, out / "learning_curve.png")
    (out / "report.md").write_text(_markdown(report))
    return report


def _plot_curve(points: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [p["requests"] for p in points]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for key, label, style, marker in (("true_pair_accuracy", "reward model", "-", "o"),
                                      ("single_annotator_accuracy", "one simulated annotator", "--", ""),
                                      ("clip_direction_accuracy", "CLIP direction (captions)", ":", ""),
                                      ("clip_instruction_direction_accuracy", "CLIP direction (instruction)",
                                       (0, (1, 1)), ""),
                                      ("random_accuracy", "random scorer", "-.", "")):
        ys = [p[key] if p.get(key) is not None else float("nan") for p in points]
        ax.plot(xs, ys, linestyle=style, marker=marker or None, label=label)
    ax.set_xlabel("training requests (rankings)")
    ax.set_ylabel("held-out pair accuracy vs noise-free order")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _markdown(report: dict) -> str:
    sim = report["simulation"]
    lines = ["# Reward model toy experiment\n",
             f"{sim['requests'] - report['test_requests']} training + {report['test_requests']} held-out requests x "
             f"{sim['variants']} variants; noise {sim['noise']:.3f} "
             f"(one annotator agrees with the noise-free order on {sim['single_annotator_agreement']:.1%} of pairs).\n",
             "Accuracy on held-out requests against the noise-free order (CLIP direction with captions uses the "
             "target caption, which a reward model never sees):\n",
             "| train requests | reward model | one annotator | CLIP direction (captions) | CLIP direction "
             "(instruction) | random | reward vs labels (no ties) |",
             "|---|---|---|---|---|---|---|"]

    def f(x):
        return "n/a" if x is None else f"{x:.3f}"

    for p in report["curve"]:
        lines.append(f"| {p['requests']} | {f(p['true_pair_accuracy'])} | {f(p['single_annotator_accuracy'])} | "
                     f"{f(p['clip_direction_accuracy'])} | {f(p['clip_instruction_direction_accuracy'])} | "
                     f"{f(p['random_accuracy'])} | {f(p['heldout_pair_accuracy'])} |")
    lines.append("\n![learning curve](learning_curve.png)\n")
    return "\n".join(lines)
