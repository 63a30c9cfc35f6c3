"""Fine-tuning the editor with the reward: condition reward, weighted reward, cycle consistency.

HIVE's two offline ways of using a reward model R(source, edited, instruction), with no on-policy RL:

- *condition reward*: the rewards of the training examples are quantised into 5 levels by their
  quantiles, and each instruction gets `", image quality is <level> out of five"` appended. The
  model folder records the suffix of the top level in `hive.json` (`reward_suffix`), so
  `hive.editor.Editor` appends it by itself and people type plain instructions.
- *weighted reward*: each example's diffusion loss is multiplied by w = exp(R / eta), normalised
  to mean 1 over the training set and clipped at `clip` (see `reward_weights`).

Cycle consistency adds, for every invertible edit, the example with source and target swapped and
the inverse instruction: exact inverses for toy data (`inverse_prompt` in metadata.jsonl), a
rule-based inverter (`invert_instruction`) for common forms of real instructions.

Training runs on the same SFT trainer (`hive.train_sft.train_sft`: accelerate, checkpoints and
exact resume, progress bar). Examples come from triplet dataset folders and from ranked variants
in the feedback store (`export_rankings`), all scored by the same reward model.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from hive.files import write_json_atomic, write_jsonl_atomic

LEVEL_WORDS = ("one", "two", "three", "four", "five")
SUFFIX_TEMPLATE = ", image quality is {level} out of five"
# "plain": the same examples and trainer with no use of the reward (weights 1, plain prompts): the
# control that tells a gain from the reward apart from a gain from more training steps
METHODS = ("condition", "weighted", "plain")


# ---------------------------------------------------------------- condition reward: quantiser
def level_suffix(level: int) -> str:
    """The text appended to an instruction of quality `level` (1..5)."""
    if not 1 <= int(level) <= len(LEVEL_WORDS):
        raise ValueError(f"level must be between 1 and {len(LEVEL_WORDS)}, not {level}")
    return SUFFIX_TEMPLATE.format(level=LEVEL_WORDS[int(level) - 1])


@dataclass
class Quantiser:
    """Reward -> level 1..len(thresholds)+1: level k+1 for rewards at or above thresholds[k-1]
    (ties go to the higher level)."""

    thresholds: list[float]

    @property
    def levels(self) -> int:
        return len(self.thresholds) + 1

    def level(self, reward: float) -> int:
        return int(np.searchsorted(np.asarray(self.thresholds, dtype=float), float(reward), side="right")) + 1

    def levels_of(self, rewards: Iterable[float]) -> list[int]:
        r = np.asarray(list(rewards), dtype=float)
        return [int(x) + 1 for x in np.searchsorted(np.asarray(self.thresholds, dtype=float), r, side="right")]


def fit_quantiser(rewards: Iterable[float], levels: int = 5) -> Quantiser:
    """Thresholds at the 1/levels, 2/levels, ... quantiles, so each level holds about the same
    share of the training examples (the paper's equal-size bins)."""
    r = np.asarray(list(rewards), dtype=float)
    if r.size == 0:
        raise ValueError("no rewards to quantise")
    if not np.isfinite(r).all():
        raise ValueError("rewards must be finite numbers")
    if not 2 <= levels <= len(LEVEL_WORDS):
        raise ValueError(f"levels must be between 2 and {len(LEVEL_WORDS)}")
    qs = [k / levels for k in range(1, levels)]
    return Quantiser([float(x) for x in np.quantile(r, qs)])


# ---------------------------------------------------------------- weighted reward
def reward_weights(rewards: Iterable[float], eta: float = 1.0, clip: float = 4.0) -> np.ndarray:
    """Per-example loss weights w_i = c * exp(R_i / eta), capped at `clip`, with c chosen so that
    the weights have mean exactly 1 (so the learning rate keeps its meaning).

    Why this form: it is the closed-form solution of KL-regularised reward maximisation
    (reward-weighted regression), with eta the temperature: eta -> infinity is plain SFT,
    small eta trains on the best examples only. The cap bounds the effective batch an outlier
    reward can take; c is found by bisection, since capping and renormalising interact."""
    r = np.asarray(list(rewards), dtype=float)
    if r.size == 0:
        raise ValueError("no rewards to weight")
    if not np.isfinite(r).all():
        raise ValueError("rewards must be finite numbers")
    if not eta > 0:
        raise ValueError(f"eta must be > 0, not {eta}")
    if not clip >= 1:
        raise ValueError(f"clip must be >= 1 (weights have mean 1), not {clip}")
    base = np.exp(np.maximum((r - r.max()) / eta, -50.0))  # in [e^-50, 1]; the largest is 1
    lo, hi = 0.0, float(clip) / base.min()  # at hi every weight is capped: the mean is clip >= 1
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if np.minimum(mid * base, clip).mean() < 1.0:
            lo = mid
        else:
            hi = mid
    return np.minimum(hi * base, clip)


def effective_sample_size(weights: np.ndarray) -> float:
    """Kish's effective sample size, (sum w)^2 / sum w^2: how many examples the weights amount to."""
    w = np.asarray(weights, dtype=float)
    return float(w.sum() ** 2 / max((w ** 2).sum(), 1e-12))


# ---------------------------------------------------------------- cycle consistency
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "pink", "cyan", "black", "white", "gray",
           "grey", "brown", "violet", "magenta", "gold", "golden", "silver", "beige", "turquoise", "teal")
ADD_VERBS = ("add", "put", "draw", "insert", "place", "include")
REMOVE_VERBS = ("remove", "delete", "take away", "get rid of", "erase", "take out")
BIGGER = ("bigger", "larger")
SMALLER = ("smaller", "tinier")
SIZE_SWAP = {"small": "large", "large": "small", "big": "small", "tiny": "large", "little": "large"}
TOGGLES = {"day": "night", "night": "day", "daytime": "nighttime", "nighttime": "daytime", "open": "closed",
           "closed": "open"}
# phrases that name no object that could be added back (or taken away again)
NOT_OBJECTS = {"it", "them", "this", "that", "everything", "all", "the image", "the picture", "the photo", "image",
               "picture", "photo", "the background", "background", "the scene", "the painting", "the style"}
_PLACE = re.compile(r"\s+(to|into|onto|on|in|at|from|next to|beside|behind|under|above|near|off)\s+(the\s.+|a\s.+|an\s.+"
                    r"|his\s.+|her\s.+|their\s.+|its\s.+|top\b.*|bottom\b.*|left\b.*|right\b.*|center\b.*)$")


# amounts ("more clouds", "some of the trees"), lists ("a dog and a cat") and styles have no exact inverse in words
_NOT_PLAIN = re.compile(r"^(more|less|fewer|most|half|all|every|everything|some of|one of|part of)\b|\b(and|or|style)\b")


def _plain(np_: str) -> bool:
    return bool(np_) and np_ not in NOT_OBJECTS and not _NOT_PLAIN.search(np_)


def _VERB_RE(verbs: tuple[str, ...]) -> str:
    return "|".join(re.escape(v) for v in sorted(verbs, key=len, reverse=True))  # longest first


def _clean(text: str) -> str:
    return " ".join(text.strip().rstrip(".!").split()).lower()


def _is_plural(noun_phrase: str) -> bool:
    last = noun_phrase.split()[-1] if noun_phrase.split() else ""
    return last.endswith("s") and not last.endswith(("ss", "us", "is"))


def _definite(np_: str) -> str:
    """'a dog' -> 'the dog'; 'two dogs' -> 'the two dogs'; 'the dog' stays."""
    words = np_.split()
    if words[0] in ("a", "an", "some", "one"):
        words = words[1:]
    if words[0] in ("the", "his", "her", "their", "its", "my", "your"):
        return " ".join(words)
    return "the " + " ".join(words)


def _indefinite(np_: str) -> str:
    """'the dog' -> 'a dog'; 'the apple' -> 'an apple'; 'the dogs' -> 'dogs'."""
    words = np_.split()
    if words[0] in ("the", "his", "her", "their", "its", "my", "your", "a", "an", "some"):
        words = words[1:]
    rest = " ".join(words)
    if not rest:
        return rest
    if words[0].isdigit() or words[0] in ("two", "three", "four", "five", "several", "many") or _is_plural(rest):
        return rest
    return ("an " if rest[0] in "aeiou" else "a ") + rest


def _split_place(np_: str) -> tuple[str, str | None, str | None]:
    """'a dog on the sofa' -> ('a dog', 'on', 'the sofa')."""
    m = _PLACE.search(np_)
    if not m:
        return np_, None, None
    return np_[:m.start()], m.group(1), m.group(2)


def _colour_in(words: list[str]) -> str | None:
    found = [w for w in words if w in COLOURS]
    return found[0] if len(found) == 1 else None


def invert_instruction(instruction: str, source_caption: str | None = None) -> str | None:
    """The instruction that undoes `instruction`, for the common invertible forms; None when it
    cannot be inverted from the text (and the source caption, when one is known).

    add X <-> remove X; make X bigger <-> smaller (and enlarge/shrink); make the C X Y -> make the
    Y X C (recolour; the old colour from the reference or from the caption); background colour
    (old colour from the caption); turn/change X into Y, replace X with Y; day <-> night,
    open <-> closed. Moves, styles and anything about "it"/"the image" are left out."""
    text = _clean(instruction)
    caption = _clean(source_caption) if source_caption else None
    if not text:
        return None
    m = re.fullmatch(rf"({_VERB_RE(ADD_VERBS)})\s+(.+)", text)
    if m:
        obj, prep, place = _split_place(m.group(2))
        if not _plain(obj):
            return None
        back = {"to": "from", "into": "from", "onto": "from"}.get(prep, prep)
        return f"remove {_definite(obj)}" + (f" {back} {place}" if prep else "")
    m = re.fullmatch(rf"({_VERB_RE(REMOVE_VERBS)})\s+(.+)", text)
    if m:
        obj, prep, place = _split_place(m.group(2))
        if not _plain(obj):
            return None
        thing = _indefinite(obj)
        back = {"from": "to", "off": "to"}.get(prep, prep)
        return f"add {thing}" + (f" {back} {place}" if prep else "") if thing else None
    # resize
    m = re.fullmatch(r"make\s+(the\s.+?)\s+(bigger|larger|smaller|tinier)", text)
    grow = None
    if m:
        ref, grow = m.group(1), m.group(2) in BIGGER
    else:
        m = re.fullmatch(r"(enlarge|increase the size of|shrink|reduce the size of)\s+(the\s.+)", text)
        if m:
            ref, grow = m.group(2), m.group(1) in ("enlarge", "increase the size of")
    if grow is not None:
        after = " ".join(SIZE_SWAP.get(w, w) for w in ref.split())
        return f"make {after} {'smaller' if grow else 'bigger'}"
    # background colour
    m = re.fullmatch(r"(?:make|turn|paint|change)\s+the\s+background\s+(?:to\s+|into\s+)?(?:a\s+|an\s+)?(\w+)", text)
    if m:
        old = re.search(rf"\b({'|'.join(COLOURS)})\s+background\b", caption) if caption else None
        if m.group(1) in COLOURS and old and old.group(1) != m.group(1):
            return f"make the background {old.group(1)}"
        return None
    # recolour: "make/turn/paint the X Y", "change the colour of the X to Y"
    m = (re.fullmatch(r"(?:make|turn|paint|colou?r)\s+(the\s.+?)\s+(\w+)", text)
         or re.fullmatch(r"change\s+the\s+colou?r\s+of\s+(the\s.+?)\s+to\s+(\w+)", text))
    if m and m.group(2) in COLOURS:
        ref, new = m.group(1), m.group(2)
        if not _plain(ref):
            return None
        words = ref.split()
        old = _colour_in(words)
        if old is not None:
            if old == new:
                return None
            return f"make {' '.join(new if w == old else w for w in words)} {old}"
        if caption:  # the object's colour from the caption: "... a blue car ..."
            noun = _split_place(ref)[0].split()[-1]
            hits = re.findall(rf"\b({'|'.join(COLOURS)})\s+(?:\w+\s+)?{re.escape(noun)}\b", caption)
            if len(set(hits)) == 1 and hits[0] != new:
                return f"make {words[0]} {new} {' '.join(words[1:])} {hits[0]}"
        return None
    # day <-> night, open <-> closed
    m = re.fullmatch(r"make\s+(it|the\s.+?)\s+(\w+)", text)
    if m and m.group(2) in TOGGLES:
        return f"make {m.group(1)} {TOGGLES[m.group(2)]}"
    # object replacement
    m = (re.fullmatch(r"(?:turn|change|transform)\s+(the\s.+?)\s+into\s+(.+)", text)
         or re.fullmatch(r"change\s+(the\s.+?)\s+to\s+(a\s.+|an\s.+)", text))
    if m:
        a, b = m.group(1), m.group(2)
        if not (_plain(a) and _plain(b) and _indefinite(a)):
            return None
        return f"turn {_definite(b)} into {_indefinite(a)}"
    m = re.fullmatch(r"replace\s+(the\s.+?)\s+with\s+(.+)", text)
    if m and _plain(m.group(1)) and _plain(m.group(2)):
        return f"replace {_definite(m.group(2))} with {_indefinite(m.group(1))}"
    return None


def source_caption_of(row: dict) -> str | None:
    """A caption of the source image, if the row has one under a common column name."""
    for key in ("source_caption", "input_caption", "original_caption", "caption"):
        if isinstance(row.get(key), str) and row[key].strip():
            return row[key]
    return None


# ---------------------------------------------------------------- examples
@dataclass
class Example:
    """One fine-tuning example: absolute image paths, the plain instruction and what the reward
    made of it (`prompt` is the text the model is trained on)."""

    id: str
    source: str
    target: str
    instruction: str
    origin: str  # "data" (a triplet folder) or "db" (a ranked variant)
    inverse: bool = False
    kind: str | None = None
    reward: float | None = None
    level: int | None = None
    weight: float = 1.0
    prompt: str | None = None


def examples_from_folder(folder: Path, origin: str = "data") -> list[Example]:
    """Forward examples of a triplet folder (metadata.jsonl; paths relative to it or absolute)."""
    from hive.data import read_metadata

    folder = Path(folder).resolve()
    out = []
    for n, row in enumerate(read_metadata(folder)):
        out.append(Example(str(row.get("id", f"row-{n}")), str(folder / row["input_image"]),
                           str(folder / row["edited_image"]), row["edit_prompt"], origin, kind=row.get("kind")))
    return out


def inverse_examples(folder: Path, origin: str = "data") -> tuple[list[Example], int]:
    """The cycle-consistency examples of a triplet folder: target -> source under the inverse
    instruction. A row's `inverse_prompt` (toy data) is used as is; otherwise the rule-based
    inverter tries. Returns (examples, number of rows left out as not invertible)."""
    from hive.data import read_metadata

    folder = Path(folder).resolve()
    out, skipped = [], 0
    for n, row in enumerate(read_metadata(folder)):
        inverse = row.get("inverse_prompt") or invert_instruction(row["edit_prompt"], source_caption_of(row))
        if not inverse:
            skipped += 1
            continue
        out.append(Example(f"{row.get('id', f'row-{n}')}~inverse", str(folder / row["edited_image"]),
                           str(folder / row["input_image"]), inverse, origin, inverse=True, kind=row.get("kind")))
    return out, skipped


def examples_to_jsonl(examples: list[Example], path: Path) -> None:
    write_jsonl_atomic(path, [asdict(e) for e in examples])


def examples_from_jsonl(path: Path) -> list[Example]:
    names = {f.name for f in fields(Example)}
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [Example(**{k: v for k, v in r.items() if k in names}) for r in rows]


def read_rewards(path: Path) -> dict[str, float]:
    """id -> reward from a rewards.jsonl written by `python -m hive score`."""
    out = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            out[str(row["id"])] = float(row["reward"])
    return out


def score_examples(examples: list[Example], reward, workdir: Path, batch_size: int = 64,
                   progress: bool = True) -> list[float]:
    """Score every example with one reward model (a folder or a loaded RewardModel), through
    `hive.score.score_dataset` on a throwaway triplet folder (absolute paths)."""
    from hive.score import score_dataset

    workdir.mkdir(parents=True, exist_ok=True)
    ids = [f"{k}:{e.id}" for k, e in enumerate(examples)]  # unique even if two sources share an id
    write_jsonl_atomic(workdir / "metadata.jsonl", [
        {"id": i, "input_image": e.source, "edit_prompt": e.instruction, "edited_image": e.target}
        for i, e in zip(ids, examples)])
    path = score_dataset(workdir, reward, workdir / "rewards.jsonl", batch_size=batch_size, progress=progress)
    got = read_rewards(path)
    return [got[i] for i in ids]


# ---------------------------------------------------------------- ranked variants from the store
def export_rankings(dest: Path, url: str | None = None, home: Path | None = None, include_simulated: bool = True,
                    consented_only: bool = True) -> dict:
    """Snapshot the feedback store's rankings for one training round, self-contained under `dest`:
    `images/` (copies), `rankings.jsonl` (one ranking a line, paths relative to dest; the reward
    trainer's `Ranking` fields) and `metadata.jsonl` (one triplet per ranked variant: request's
    source, instruction, the variant; `inverse_prompt` when the request is a toy edit).

    Written to a temporary folder and renamed, so `dest` is complete or absent."""
    from sqlalchemy import select

    from db.engine import session_scope
    from db.models import EditRequest
    from hive import toy
    from hive.train_reward import rankings_from_db

    dest = Path(dest)
    if dest.exists():
        raise FileExistsError(f"{dest} exists: a ranking snapshot is written once")
    rankings = rankings_from_db(url, home, include_simulated=include_simulated, consented_only=consented_only)
    req_ids = sorted({r.request_id for r in rankings})
    params: dict[int, dict] = {}
    if req_ids:
        with session_scope(url, write=False) as s:
            params = {int(i): (p or {}) for i, p in
                      s.execute(select(EditRequest.id, EditRequest.params).where(EditRequest.id.in_(req_ids))).all()}
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)

    def copy(path: str) -> str:
        rel = f"images/{Path(path).name}"  # store files are named by their sha256
        if not (tmp / rel).exists():
            shutil.copyfile(path, tmp / rel)
        return rel

    ranking_rows, variants = [], {}
    for r in rankings:
        row = asdict(r)
        row["source_path"] = copy(r.source_path)
        row["variant_paths"] = [copy(p) for p in r.variant_paths]
        ranking_rows.append(row)
        p = params.get(r.request_id, {})
        inverse = None
        if "toy_seed" in p:  # a toy request: its exact inverse, if the instruction is the toy one
            ex = toy.sample_example(int(p["toy_seed"]))
            if ex.edit.instruction == r.instruction:
                inverse = ex.edit.inverse_instruction
        for vid, rel, rank in zip(r.variant_ids, row["variant_paths"], r.ranks):
            v = variants.setdefault(vid, {
                "id": f"variant-{vid}", "input_image": row["source_path"], "edit_prompt": r.instruction,
                "edited_image": rel, "request_id": r.request_id, "kind": p.get("kind"), "ranks": [],
                "inverse_prompt": inverse, "source_caption": p.get("source_caption")})
            v["ranks"].append(rank)
    write_jsonl_atomic(tmp / "rankings.jsonl", ranking_rows)
    write_jsonl_atomic(tmp / "metadata.jsonl", [variants[k] for k in sorted(variants)])
    summary = {"rankings": len(rankings), "requests": len(req_ids), "variants": len(variants),
               "simulated_rankings": sum(r.is_simulated for r in rankings)}
    write_json_atomic(tmp / "summary.json", summary)
    os.replace(tmp, dest)
    return summary


def load_rankings(folder: Path) -> list:
    """The reward trainer's rankings from an `export_rankings` snapshot (paths made absolute)."""
    from hive.train_reward import Ranking

    folder = Path(folder).resolve()
    out = []
    for line in (folder / "rankings.jsonl").read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        row["source_path"] = str(folder / row["source_path"])
        row["variant_paths"] = [str(folder / p) for p in row["variant_paths"]]
        if row.get("captions") is not None:
            row["captions"] = tuple(row["captions"])
        out.append(Ranking(**row))
    return out


# ---------------------------------------------------------------- preparing the training set
@dataclass
class FinetuneConfig:
    method: str = "condition"  # "condition", "weighted" or "plain" (the control: no reward)
    cycle: bool = False
    steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-4
    warmup_steps: int = 50
    eta: float = 1.0  # weighted reward: temperature of exp(R / eta) (rewards are z-scores)
    clip: float = 4.0  # weighted reward: largest weight (the weights have mean 1)
    ema_decay: float | None = 0.999
    min_snr_gamma: float | None = 5.0
    checkpoint_every: int = 250
    mixed_precision: str = "no"
    seed: int = 0
    sft: dict = field(default_factory=dict)  # any further `SFTConfig` field (e.g. speed flags)

    def check(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch size must be >= 1")
        if not self.eta > 0 or not self.clip >= 1:
            raise ValueError("eta must be > 0 and clip >= 1")

    def sft_config(self):
        from hive.train_sft import SFTConfig

        known = {f.name for f in fields(SFTConfig)}
        unknown = sorted(set(self.sft) - known)
        if unknown:
            raise ValueError(f"unknown SFT options {unknown}; the SFT trainer has {sorted(known)}")
        mine = {k: getattr(self, k) for k in ("steps", "batch_size", "lr", "warmup_steps", "ema_decay",
                                              "min_snr_gamma", "checkpoint_every", "mixed_precision", "seed")}
        return SFTConfig(**{**mine, **self.sft})


def prepare(examples: list[Example], rewards: list[float], config: FinetuneConfig,
            base_suffix: str = "") -> tuple[list[Example], dict]:
    """Attach rewards, then levels and prompts (condition) or weights (weighted). Returns the
    examples and what the model folder should record about them."""
    config.check()
    if len(examples) != len(rewards):
        raise ValueError("one reward per example")
    if not examples:
        raise ValueError("no training examples")
    r = np.asarray(rewards, dtype=float)
    info: dict[str, Any] = {"examples": len(examples), "reward_mean": float(r.mean()), "reward_std": float(r.std()),
                            "by_origin": {}}
    for e in examples:
        key = f"{e.origin}{'-inverse' if e.inverse else ''}"
        info["by_origin"][key] = info["by_origin"].get(key, 0) + 1
    for e, x in zip(examples, r):
        e.reward = float(x)
    if config.method == "condition":
        q = fit_quantiser(r, len(LEVEL_WORDS))
        for e, lv in zip(examples, q.levels_of(r)):
            e.level, e.weight = lv, 1.0
            e.prompt = e.instruction + level_suffix(lv)
        counts = [sum(e.level == k for e in examples) for k in range(1, q.levels + 1)]
        info["condition"] = {"template": SUFFIX_TEMPLATE, "levels": q.levels, "thresholds": q.thresholds,
                             "quantiles": [k / q.levels for k in range(1, q.levels)], "level_counts": counts}
    elif config.method == "plain":
        for e in examples:
            e.weight, e.level = 1.0, None
            e.prompt = e.instruction + base_suffix
    else:
        w = reward_weights(r, config.eta, config.clip)
        for e, x in zip(examples, w):
            e.weight, e.level = float(x), None
            e.prompt = e.instruction + base_suffix
        info["weights"] = {"eta": config.eta, "clip": config.clip, "min": float(w.min()), "max": float(w.max()),
                           "mean": float(w.mean()), "effective_sample_size": effective_sample_size(w),
                           "corr_with_reward": float(np.corrcoef(r, w)[0, 1]) if r.std() > 0 and w.std() > 0 else None}
    return examples, info


# ---------------------------------------------------------------- the triplet source
class ExampleTriplets:
    """A `hive.data.TripletSource` over prepared examples: prompts as prepared, and per-example
    loss weights carried in the batch (weighted reward). Batch `step` is a pure function of
    (seed, step), so a resumed run sees the batches it would have seen."""

    def __init__(self, examples: list[Example], resolution: int, seed: int = 0, weighted: bool = False):
        if not examples:
            raise ValueError("no training examples")
        if any(e.prompt is None for e in examples):
            raise ValueError("examples must be prepared (see hive.finetune.prepare) before training")
        self.examples = examples
        self.resolution = resolution
        self.seed = seed
        self.weighted = weighted

    def __len__(self) -> int:
        return len(self.examples)

    def batch(self, step: int, batch_size: int):
        import torch
        from PIL import Image

        from hive.data import TripletBatch, image_to_tensor

        rng = np.random.default_rng([self.seed, step])
        idx = rng.choice(len(self.examples), size=batch_size, replace=len(self.examples) < batch_size)
        chosen = [self.examples[i] for i in idx]

        def load(path: str):
            with Image.open(path) as im:
                return image_to_tensor(im, self.resolution)

        weights = torch.tensor([e.weight for e in chosen], dtype=torch.float32) if self.weighted else None
        return TripletBatch(torch.stack([load(e.source) for e in chosen]), torch.stack([load(e.target) for e in chosen]),
                            [e.prompt for e in chosen], weights)


def pipeline_resolution(base: str | Path) -> int:
    """The square image size a pipeline works at: UNet sample size times the VAE's factor."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet = UNet2DConditionModel.load_config(base, subfolder="unet")
    vae = AutoencoderKL.load_config(base, subfolder="vae")
    return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)


def read_model_info(base: str | Path) -> dict:
    path = Path(base) / "hive.json"
    return json.loads(path.read_text()) if path.exists() else {}


def finetune(base: str | Path, examples: list[Example], out: Path, config: FinetuneConfig,
             extra_info: dict | None = None) -> Path:
    """Fine-tune pipeline `base` on prepared examples; write OUT/pipeline (a
    StableDiffusionInstructPix2PixPipeline folder) with its hive.json. Resumes from
    OUT/checkpoints. OUT/examples.jsonl keeps every example with its reward, level, weight, prompt."""
    from hive.train_sft import train_sft

    config.check()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    examples_to_jsonl(examples, out / "examples.jsonl")
    data = ExampleTriplets(examples, pipeline_resolution(base), seed=config.seed,
                           weighted=config.method == "weighted")
    pipeline = train_sft(base, data, out, config.sft_config())
    base_info = read_model_info(base)
    info = {k: v for k, v in base_info.items() if k not in ("finetune",)}
    meta = {"method": config.method, "cycle": config.cycle, "base": str(base), "config": asdict(config),
            **(extra_info or {})}
    if config.method == "condition":
        top = len(LEVEL_WORDS)
        info["reward_suffix"] = level_suffix(top)
        info["reward_condition"] = {"template": SUFFIX_TEMPLATE, "level": top, "level_word": LEVEL_WORDS[top - 1],
                                    **(extra_info or {}).get("condition", {})}
    meta.pop("condition", None)
    info["finetune"] = meta
    write_json_atomic(Path(pipeline) / "hive.json", _json_safe(info))
    return Path(pipeline)


def _json_safe(x):
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return None if not math.isfinite(float(x)) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


# ---------------------------------------------------------------- one call: data -> model
def build_examples(data: list[Path], rankings: Path | None, cycle: bool) -> tuple[list[Example], dict]:
    """Forward examples of every triplet folder and of a ranking snapshot (its metadata.jsonl),
    plus their inverses with `cycle`."""
    examples: list[Example] = []
    stats = {"not_invertible": 0}
    sources = [(Path(d), "data") for d in data] + ([(Path(rankings), "db")] if rankings is not None else [])
    for folder, origin in sources:
        meta = folder / "metadata.jsonl"
        if origin == "db" and (not meta.exists() or not meta.read_text().strip()):
            continue  # a snapshot without ranked variants
        examples += examples_from_folder(folder, origin)
        if cycle:
            inv, skipped = inverse_examples(folder, origin)
            examples += inv
            stats["not_invertible"] += skipped
    return examples, stats


def rewards_for(examples: list[Example], data: list[Path], reward: str | Path | None, workdir: Path,
                batch_size: int = 64, progress: bool = True) -> tuple[list[float], str]:
    """Rewards of the examples: scored with `reward` when given (every example, one scale);
    otherwise read from each folder's rewards.jsonl (`python -m hive score`), an inverse example
    taking its forward example's reward (an edit done right is undone right by its inverse)."""
    if reward is not None:
        return score_examples(examples, reward, workdir, batch_size, progress), f"scored with {reward}"
    if any(e.origin == "db" for e in examples):
        raise ValueError("ranked variants from the database need a reward model to score them: pass --reward")
    by_source: dict[str, float] = {}
    for d in data:
        d = Path(d).resolve()
        path = d / "rewards.jsonl"
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: score the data first (python -m hive score --data {d} "
                                    "--reward REWARD) or pass --reward")
        got = read_rewards(path)
        for e in examples_from_folder(d):
            if e.id not in got:
                raise ValueError(f"{path} has no reward for row {e.id!r}: score the data again")
            by_source[e.source + "|" + e.target] = got[e.id]
    out = []
    for e in examples:
        key = (e.target + "|" + e.source) if e.inverse else (e.source + "|" + e.target)
        out.append(by_source[key])
    return out, "read from rewards.jsonl (inverse examples take their forward example's reward)"


def run_finetune(base: str | Path, data: list[Path], out: Path, config: FinetuneConfig,
                 reward: str | Path | None = None, from_db: bool = False, include_simulated: bool = True,
                 score_batch: int = 64, progress: bool = True) -> dict:
    """`python -m hive finetune`: examples from triplet folders (and the store's ranked variants
    with `from_db`, snapshot once into OUT/rankings so a resumed run sees the same data),
    rewards, then condition or weighted fine-tuning of `base` into OUT/pipeline."""
    config.check()
    out = Path(out).resolve()
    base_path = Path(base).resolve() if Path(base).exists() else None
    if base_path is not None and (out == base_path or base_path in out.parents or out in base_path.parents):
        raise ValueError(f"--out {out} overlaps the base model {base_path}: write the new model to a fresh folder")
    if not data and not from_db:
        raise ValueError("no data: give --data DIR (a triplet folder) and/or --from-db")
    data = [Path(d).resolve() for d in data]
    for d in data:
        if not (d / "metadata.jsonl").exists():
            raise FileNotFoundError(f"{d / 'metadata.jsonl'} not found: --data needs a triplet dataset folder")
    if reward is not None and not (Path(reward) / "config.json").exists():
        raise FileNotFoundError(f"{reward} is not a reward model folder (no config.json)")
    if from_db and reward is None:
        raise ValueError("--from-db needs --reward: the ranked variants are scored by the reward model")
    from hive.registry import assert_fresh

    assert_fresh(out)  # OUT/pipeline is written again on every run (a finished one too): never a registered model
    created = not out.exists()
    rankings = out / "rankings" if from_db else None
    snapshot_now = from_db and not (rankings / "summary.json").exists()
    try:
        if snapshot_now:
            export_rankings(rankings, include_simulated=include_simulated)
        examples, stats = build_examples(data, rankings, config.cycle)
        if not examples:
            raise ValueError("no training examples: the data folders and the store's rankings are empty")
        rewards, how = rewards_for(examples, data, reward, out / "scores", score_batch, progress)
        examples, info = prepare(examples, rewards, config, read_model_info(base).get("reward_suffix", ""))
    except BaseException:  # nothing trained yet: leave no snapshot that a rerun would take for its data
        if created:
            shutil.rmtree(out, ignore_errors=True)
        elif snapshot_now:
            shutil.rmtree(rankings, ignore_errors=True)
        raise
    extra = {**info, **stats, "rewards": how, "reward_model": str(reward) if reward else None,
             "data": [str(d) for d in data], "from_db": from_db}
    pipeline = finetune(base, examples, out, config, extra_info=extra)
    return {"model": str(pipeline), **{k: v for k, v in extra.items() if k != "data"}}
