"""Simulated annotators: rank editor variants of toy edits by the ground-truth judge plus noise.

A simulated annotator sees the noise-free quality q of each variant (from `toy.judge`, against
the best of the targets the instruction describes equally well: `judged_quality`), adds
Gaussian noise of scale `noise`, and ranks by the noisy score; variants whose noisy scores are
within `tie_margin` share a rank. The noise-free order has the same resolution: two variants
whose qualities differ by at most TRUE_ORDER_RESOLUTION are equally good to a person (a faint
difference in a few pixels is no preference), so only pairs further apart count in any agreement.
The noise is calibrated so that one annotator agrees with the noise-free order on about `target`
of those pairs (people agree with each other on roughly 65-80% of pairs in published preference
data), so the reward model meets the same problem people pose: each ranking is a noisy view of a
true order.

Rankings are written through `db/` into the same tables as people's, by users marked simulated;
the noise-free quality is kept in each variant's params (`sim_quality`) so evaluation can score
against the true order.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

from hive import toy

DEFAULT_TARGET_AGREEMENT = 0.72
DEFAULT_TIE_MARGIN = 0.02
# The noise-free order ties what a noiseless annotator ties. Without it, a 65%-successful editor's
# variants are mostly all-good with qualities a few thousandths apart, and a noiseless annotator
# "agrees" with that order on only ~60% of pairs, so no noise level reaches the 65-80% band.
TRUE_ORDER_RESOLUTION = DEFAULT_TIE_MARGIN
# How the noise-free quality is judged; a simulated store made under another rule is not reused.
QUALITY_RULE = "admissible-targets"  # since session 27: an unnamed offset within a cell orders nothing
SIM_SEED_BASE = 500_000_000  # away from training (hive.data) and evaluation (hive.evaluate) seeds
REQUESTER = "sim-requester"


def quality(j: toy.Judgement) -> float:
    """Noise-free quality in [0, 1]: instruction following and preservation count alike.

    Stray pixels (specks, the ghost a shrunken object leaves) count against preservation, reaching
    the judge's preservation bar at the judge's stray limit, so a person ranks lower what the judge
    fails for them. Without it, a resize the judge failed for its ghost scored as nearly perfect.
    """
    stray_preservation = 1.0 - (1.0 - toy.PRESERVE_MIN) * j.stray_pixels / j.stray_limit
    return 0.5 * float(j.following) + 0.5 * max(0.0, min(float(j.preservation), stray_preservation))


def judged_quality(example: toy.ToyExample, output: Image.Image,
                   targets: Sequence[Image.Image] | None = None) -> float:
    """What a simulated annotator sees of `output`: its `quality` against the best of the
    targets the instruction describes equally well (`toy.admissible_targets`, or `targets` when
    the caller rendered them once for several outputs of the same example), so that where an
    added or moved object sits within its cell, which no instruction names, orders nothing."""
    if targets is None:
        targets = toy.admissible_targets(example.edit, example.clean_image.size[0])
    best = 0.0
    for target in targets:
        best = max(best, quality(toy.judge(example.input_image, target, output)))
        if best == 1.0:
            break
    return best


def true_preference(qa: float, qb: float) -> int:
    """+1 if quality `qa` is truly better than `qb`, -1 if worse, 0 if a person cannot tell."""
    if abs(qa - qb) <= TRUE_ORDER_RESOLUTION:
        return 0
    return 1 if qa > qb else -1


def truly_ordered_pairs(q: Sequence[float]) -> Iterator[tuple[int, int, int]]:
    """(a, b, true_preference) for every pair a < b of `q` that the noise-free order does not tie:
    the pairs every agreement with that order counts."""
    for a in range(len(q)):
        for b in range(a + 1, len(q)):
            truth = true_preference(q[a], q[b])
            if truth:
                yield a, b, truth


def score_agreement(q: Sequence[float], scores: Sequence[float]) -> tuple[float, int]:
    """Agreement of `scores` (higher is better) with the noise-free order of `q`: over
    `truly_ordered_pairs`, 1 for the right order, 0.5 for equal scores, 0 for the wrong order.
    Returns (sum, n pairs)."""
    total, n = 0.0, 0
    for a, b, truth in truly_ordered_pairs(q):
        n += 1
        d = scores[a] - scores[b]
        total += 0.5 if d == 0 else float((d > 0) == (truth > 0))
    return total, n


def noisy_ranks(q: np.ndarray, noise: float, rng: np.random.Generator,
                tie_margin: float = DEFAULT_TIE_MARGIN) -> list[int]:
    """Dense ranks (1 = best) from noisy scores; neighbours closer than `tie_margin` tie."""
    s = np.asarray(q, dtype=float) + rng.normal(0.0, noise, size=len(q))
    order = np.argsort(-s, kind="stable")
    ranks = [0] * len(q)
    rank = 1
    for pos, i in enumerate(order):
        if pos > 0 and s[order[pos - 1]] - s[i] > tie_margin:
            rank += 1
        ranks[i] = rank
    return ranks


def pair_agreement(q: np.ndarray, ranks: list[int]) -> tuple[float, int]:
    """Agreement of one ranking (1 = best) with the noise-free order (`score_agreement`; a tie
    counts half). Returns (sum, n pairs)."""
    return score_agreement(q, [-r for r in ranks])


def expected_agreement(qualities: list[np.ndarray], noise: float, tie_margin: float = DEFAULT_TIE_MARGIN,
                       repeats: int = 20, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    total, n = 0.0, 0
    for _ in range(repeats):
        for q in qualities:
            t, k = pair_agreement(q, noisy_ranks(q, noise, rng, tie_margin))
            total += t
            n += k
    return total / n if n else float("nan")


def calibrate_noise(qualities: list[np.ndarray], target: float = DEFAULT_TARGET_AGREEMENT,
                    tie_margin: float = DEFAULT_TIE_MARGIN, seed: int = 0) -> float:
    """The noise scale at which one annotator agrees with the true order on `target` of the pairs
    (bisection; agreement falls as noise grows, with common random numbers for smoothness)."""
    if not any(next(truly_ordered_pairs(q), None) for q in qualities):
        raise ValueError(f"cannot calibrate: no two variants of a request differ in quality by more than "
                         f"{TRUE_ORDER_RESOLUTION}")
    lo, hi = 1e-4, 10.0
    for _ in range(30):
        mid = (lo * hi) ** 0.5
        if expected_agreement(qualities, mid, tie_margin, seed=seed) > target:
            lo = mid
        else:
            hi = mid
    return (lo * hi) ** 0.5


def stand_in_variants(ex: toy.ToyExample, variants: int, seed: int) -> list[Image.Image]:
    """`variants` distinct picks (when there are enough) from the clean target, the unchanged
    source and three corrupted targets of the toy noise model: what an editor of mixed quality
    might produce, without running one."""
    rng = np.random.default_rng([seed, 2])
    pool = [ex.clean_image, ex.input_image]
    pool += [toy.corrupt(ex.edit, np.random.default_rng([seed, c]))[0] for c in range(3)]
    picks = rng.choice(len(pool), size=variants, replace=len(pool) < variants)
    return [pool[i] for i in picks]


def toy_variant_qualities(n: int = 200, variants: int = 4, seed: int = SIM_SEED_BASE) -> list[np.ndarray]:
    """Quality sets of stand-in variants made without the editor: per toy edit, `variants` picks
    from the clean target, corrupted targets (the toy noise model) and the unchanged source."""
    out = []
    for k in range(n):
        ex = toy.sample_example(seed + k)
        imgs = stand_in_variants(ex, variants, seed + k)
        targets = toy.admissible_targets(ex.edit)
        out.append(np.array([judged_quality(ex, im, targets) for im in imgs]))
    return out


@dataclass
class SimulationReport:
    requests: int
    variants: int
    rankings: int
    annotators: int
    noise: float
    tie_margin: float
    calibrated: bool
    target_agreement: float | None
    single_annotator_agreement: float  # measured on the written rankings vs the noise-free order
    pairs_compared: int
    tie_rate: float
    seconds: float
    request_ids: list[int]


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def simulate(editor, requests: int, variants: int = 4, annotators: int = 1, per_request: int = 1,
             noise: float | None = None, target: float = DEFAULT_TARGET_AGREEMENT,
             tie_margin: float = DEFAULT_TIE_MARGIN, seed: int = SIM_SEED_BASE, steps: int | None = None,
             guidance: float | None = None, image_guidance: float | None = None, batch: int = 8, url: str | None = None,
             progress: bool = True, variant_image_guidance: Sequence[float] | None = None,
             variant_mask_threshold: Sequence[float] | None = None) -> SimulationReport:
    """Make `requests` toy edit requests, sample `variants` per request with `editor` (None:
    editor-free stand-ins, see `stand_in_variants`), rank each
    by `per_request` of `annotators` simulated annotators, and write it all to the database.

    `variant_image_guidance` (one value per variant) samples variant v of every request at its own
    image guidance instead of one setting for all: variants that keep more or less of the source,
    as a demo whose visitors move the slider would collect, rather than four seeds of one setting
    that mostly differ by a few pixels (docs/reward.md, session 8). `variant_mask_threshold` does
    the same with the local blend's threshold (0: the raw output): with the blend, four seeds of
    one setting are mostly equally good, and their rankings carry little (docs/reward.md, session 12).

    With `noise=None` the noise is calibrated on the sampled variants' own qualities to `target`.
    Sampling happens first and every row is written in one transaction at the end: a failure
    writes nothing."""
    from tqdm.auto import tqdm

    from db import feedback as fb
    from db.engine import session_scope
    from db.images import ImageStore, get_or_create_image

    if requests < 1 or not 2 <= variants <= 8 or annotators < 1 or not 1 <= per_request <= annotators:
        raise ValueError("need requests >= 1, 2 <= variants <= 8, annotators >= 1 and 1 <= per-request <= annotators")
    if noise is not None and noise < 0:
        raise ValueError("noise must be >= 0")
    if variant_mask_threshold is not None:
        from hive.editor import checked_mask_threshold

        if len(variant_mask_threshold) != variants:
            raise ValueError(f"variant mask threshold needs {variants} values (one per variant)")
        variant_mask_threshold = [checked_mask_threshold(t, "variant mask threshold") for t in variant_mask_threshold]
    if variant_image_guidance is not None and (len(variant_image_guidance) != variants
                                               or min(variant_image_guidance) < 1.0):
        raise ValueError(f"variant image guidance needs {variants} values (one per variant), each >= 1")
    started = time.time()
    examples = [toy.sample_example(seed + k) for k in range(requests)]
    outputs: list[list[Image.Image]] = []
    if editor is None:  # editor-free stand-ins, to test the reward model before an editor exists
        outputs = [stand_in_variants(e, variants, seed + k) for k, e in enumerate(examples)]
    else:  # settings left None: the editor's defaults
        steps, guidance, image_guidance = editor.settings(steps, guidance, image_guidance)
    per_variant = list(variant_image_guidance) if variant_image_guidance is not None else [image_guidance] * variants
    default_threshold = editor.mask_threshold if editor is not None else None
    per_threshold = list(variant_mask_threshold) if variant_mask_threshold is not None else [default_threshold] * variants
    for i in tqdm(range(0, requests if editor is not None else 0, batch), desc="sample variants",
                  disable=not progress):
        chunk = examples[i:i + batch]
        sources = [e.input_image for e in chunk]
        prompts = [editor.prompt_for(e.edit.instruction) for e in chunk]
        outs: list[list] = [[None] * variants for _ in chunk]
        # one pipeline call per distinct (image guidance, mask threshold): one call by default
        for g, threshold in dict.fromkeys(zip(per_variant, per_threshold)):
            vs = [v for v in range(variants) if (per_variant[v], per_threshold[v]) == (g, threshold)]
            images = editor.sample(sources, prompts, [[(seed + i + j) * 16 + v for v in vs] for j in range(len(chunk))],
                                   steps, guidance, g, threshold)
            for row, imgs in zip(outs, images):
                for v, img in zip(vs, imgs):
                    row[v] = img
        outputs += outs
    qualities = []
    for e, outs in zip(examples, outputs):
        targets = toy.admissible_targets(e.edit)  # rendered once for the request's variants
        qualities.append(np.array([judged_quality(e, o, targets) for o in outs]))
    calibrated = noise is None
    if noise is None:
        noise = calibrate_noise(qualities, target, tie_margin, seed=seed)
    rng = np.random.default_rng([seed, 1])
    plans = []
    for q in qualities:
        who = rng.choice(annotators, size=per_request, replace=False)
        plans.append([(int(a), noisy_ranks(q, noise, rng, tie_margin)) for a in who])
    agree, n_pairs, ties, n_all = 0.0, 0, 0, 0
    for q, plan in zip(qualities, plans):
        for _, ranks in plan:
            t, k = pair_agreement(q, ranks)
            agree, n_pairs = agree + t, n_pairs + k
            m = len(ranks)
            n_all += m * (m - 1) // 2
            ties += sum(ranks[a] == ranks[b] for a in range(m) for b in range(a + 1, m))

    params = {"steps": steps, "guidance": guidance,
              "image_guidance": image_guidance if variant_image_guidance is None else per_variant,
              "model": editor.model if editor is not None else "stand-in",
              "mask_threshold": default_threshold if variant_mask_threshold is None else per_threshold}
    store = ImageStore()
    request_ids = []
    with session_scope(url) as s:
        requester = fb.get_user_by_name(s, REQUESTER) or fb.create_user(s, REQUESTER, "visitor", simulated=True)
        users = []
        for a in range(annotators):
            name = f"sim-annotator-{a}"
            users.append(fb.get_user_by_name(s, name) or fb.create_user(s, name, "annotator", simulated=True))
        for e, outs, q, plan in zip(examples, outputs, qualities, plans):
            src = get_or_create_image(s, store, _png(e.input_image))
            req = fb.create_edit_request(
                s, requester.id, src.id, e.edit.instruction, None,
                {**params, "simulated": True, "toy_seed": int(e.id.split("-")[1]), "kind": e.edit.kind,
                 "source_caption": e.edit.source.caption(), "target_caption": e.edit.target.caption(),
                 "noise": noise, "tie_margin": tie_margin}, consent=True)
            imgs = [get_or_create_image(s, store, _png(o)) for o in outs]
            vs = fb.add_variants(s, req.id, [(img.id, (int(e.id.split("-")[1])) * 16 + v,
                                              {**params, "image_guidance": per_variant[v],
                                               "mask_threshold": per_threshold[v], "sim_quality": float(q[v])})
                                             for v, img in enumerate(imgs)])
            for a, ranks in plan:
                fb.submit_ranking(s, req.id, users[a].id, {v.id: r for v, r in zip(vs, ranks)})
            request_ids.append(req.id)
    return SimulationReport(
        requests=requests, variants=variants, rankings=sum(len(p) for p in plans), annotators=annotators,
        noise=float(noise), tie_margin=tie_margin, calibrated=calibrated, target_agreement=target if calibrated else None,
        single_annotator_agreement=agree / n_pairs if n_pairs else float("nan"), pairs_compared=n_pairs,
        tie_rate=ties / n_all if n_all else 0.0, seconds=round(time.time() - started, 1), request_ids=request_ids)


def calibration_report(n: int = 200, variants: int = 4, target: float = DEFAULT_TARGET_AGREEMENT,
                       tie_margin: float = DEFAULT_TIE_MARGIN, seed: int = SIM_SEED_BASE) -> dict:
    """Calibrate on editor-free stand-in variants (clean, corrupted, unchanged) and report."""
    qs = toy_variant_qualities(n, variants, seed)
    noise = calibrate_noise(qs, target, tie_margin)
    return {"n": n, "variants": variants, "target_agreement": target, "noise": noise, "tie_margin": tie_margin,
            "agreement": expected_agreement(qs, noise, tie_margin, seed=seed + 1)}

