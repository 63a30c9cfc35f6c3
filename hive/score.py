"""Score a triplet dataset with a reward model: the rewards the fine-tuning issue conditions on.

Reads `DIR/metadata.jsonl` (`id`, `input_image`, `edit_prompt`, `edited_image`, paths relative
to DIR), scores every row in batches, and writes `DIR/rewards.jsonl` (or `out`): one object per
row, `id`, `reward` (normalised by the model's score scale) and `raw_reward`, in the rows'
order. The file is written to a temporary name and renamed, so it is never half written.
"""

from __future__ import annotations

from pathlib import Path

from tqdm.auto import tqdm

from hive.data import read_metadata
from hive.editor import load_image
from hive.files import write_jsonl_atomic
from hive.reward import RewardModel


def score_dataset(data: Path, reward: Path | str | RewardModel, out: Path | None = None, batch_size: int = 64,
                  column: str = "edited_image", progress: bool = True) -> Path:
    rows = read_metadata(Path(data))
    missing = [i for i, r in enumerate(rows) if column not in r or "id" not in r]
    if missing:
        raise ValueError(f"rows {missing[:5]} of {data}/metadata.jsonl lack 'id' or {column!r}")
    if isinstance(reward, RewardModel):
        model = reward
    else:
        from hive.editor import pick_device

        model = RewardModel.from_pretrained(reward).to(pick_device())
    out = Path(out) if out is not None else Path(data) / "rewards.jsonl"
    results = []
    for i in tqdm(range(0, len(rows), batch_size), desc="score", disable=not progress):
        chunk = rows[i:i + batch_size]
        src = [load_image(Path(data) / r["input_image"]) for r in chunk]
        edited = [load_image(Path(data) / r[column]) for r in chunk]
        raw = model.score(src, edited, [r["edit_prompt"] for r in chunk], batch_size=batch_size, normalise=False)
        for r, x in zip(chunk, raw):
            norm = (float(x) - model.config.score_mean) / max(model.config.score_std, 1e-8)
            results.append({"id": r["id"], "reward": norm, "raw_reward": float(x)})
    write_jsonl_atomic(out, results)
    return out
