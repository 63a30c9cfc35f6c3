"""Simulated annotators, and the reward commands end to end on a tiny editor and a tiny CLIP."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from db.engine import session_scope
from db.models import ModelVersion, User, Variant
from db.queries import pairwise_preferences
from hive.simulate import (
    SIM_SEED_BASE,
    calibrate_noise,
    expected_agreement,
    judged_quality,
    noisy_ranks,
    pair_agreement,
    quality,
    simulate,
    true_preference,
)
from hive import toy
from tests.db_fixtures import HiveEnv, hive, hive_factory  # noqa: F401  (fixtures)
from tests.test_reward_model import build_tiny_clip


def test_noise_free_annotator_follows_the_truth_and_ties_close_scores():
    rng = np.random.default_rng(0)
    assert noisy_ranks(np.array([0.2, 0.9, 0.5, 0.0]), 0.0, rng) == [3, 1, 2, 4]
    assert noisy_ranks(np.array([0.5, 0.51, 0.1]), 0.0, rng, tie_margin=0.02) == [1, 1, 2]  # dense, tied
    assert pair_agreement(np.array([0.2, 0.9, 0.5]), [3, 1, 2]) == (3.0, 3)
    assert pair_agreement(np.array([0.2, 0.9, 0.5]), [1, 1, 1]) == (1.5, 3)


def test_calibration_hits_the_target_agreement():
    rng = np.random.default_rng(1)
    qualities = [rng.random(4) for _ in range(80)]
    noise = calibrate_noise(qualities, target=0.72)
    assert expected_agreement(qualities, noise, seed=5) == pytest.approx(0.72, abs=0.02)  # fresh noise draws
    assert expected_agreement(qualities, noise / 3) > 0.8 > expected_agreement(qualities, noise) > expected_agreement(qualities, noise * 3)
    with pytest.raises(ValueError, match="cannot calibrate"):
        calibrate_noise([np.ones(4)])
    with pytest.raises(ValueError, match="cannot calibrate"):  # differences a person cannot see
        calibrate_noise([np.array([0.99, 0.995, 1.0, 0.985])])


def test_stray_pixels_lower_quality_as_the_judge_fails_them():
    ex = toy.sample_example(SIM_SEED_BASE, kind="resize")
    src, clean = np.asarray(ex.input_image).copy(), np.asarray(ex.clean_image).copy()
    unchanged = np.all(src == clean, axis=-1)
    unchanged[:, 1:] &= unchanged[:, :-1]  # away from every pixel that differs
    rows, cols = np.nonzero(unchanged[::2, ::2])  # specks two pixels apart: no region lost
    rows, cols = rows * 2, cols * 2

    def specks(n: int) -> np.ndarray:
        out = clean.copy()
        out[rows[:n], cols[:n]] = 255 - out[rows[:n], cols[:n]]
        return out

    perfect = toy.judge(src, clean, clean)
    assert perfect.success and quality(perfect) == 1.0
    at_limit = toy.judge(src, clean, specks(24))
    assert at_limit.stray_pixels == 24 and at_limit.success
    assert quality(at_limit) == pytest.approx(0.5 + 0.5 * toy.PRESERVE_MIN)  # the preservation bar
    ghost = toy.judge(src, clean, specks(48))
    assert not ghost.success and ghost.preservation > 0.95  # the regions alone would not show it
    assert quality(ghost) == pytest.approx(0.5 + 0.5 * (1 - 2 * (1 - toy.PRESERVE_MIN)))
    assert true_preference(quality(perfect), quality(ghost)) == 1  # a person ranks it lower
    rescaled = toy.Judgement(ghost.following, ghost.preservation, 48, False, stray_limit=96.0)  # 128 px
    assert quality(rescaled) == pytest.approx(quality(at_limit) + 0.5 * 0.05)


def test_the_noise_free_order_ties_qualities_a_person_cannot_tell_apart():
    # a good editor's variants: three all-good ones a few thousandths apart and one failure
    q = np.array([0.999, 0.994, 0.997, 0.6])
    assert true_preference(0.999, 0.994) == 0 and true_preference(0.999, 0.6) == 1 == -true_preference(0.6, 0.9)
    # a noiseless annotator ties the three good ones and agrees on every pair that counts
    ranks = noisy_ranks(q, 0.0, np.random.default_rng(0))
    assert ranks == [1, 1, 1, 2]
    assert pair_agreement(q, ranks) == (3.0, 3)
    # so calibration on such sets reaches the band (it could not when near-ties counted)
    rng = np.random.default_rng(2)
    qualities = [np.concatenate([1 - 0.01 * rng.random(3), rng.random(1) * 0.8]) for _ in range(60)]
    assert expected_agreement(qualities, 0.0) == 1.0
    noise = calibrate_noise(qualities, target=0.72)
    assert expected_agreement(qualities, noise, seed=5) == pytest.approx(0.72, abs=0.03)


def mirrored_in_cell(edit: toy.Edit, index: int) -> Image.Image:
    """The edit's target with object `index` at its offset mirrored on x: right, elsewhere in its cell."""
    import dataclasses

    placed = edit.target.objects[index]
    return edit.target.replace(index, dataclasses.replace(placed, jitter=(-placed.jitter[0], placed.jitter[1]))).render()


@pytest.mark.parametrize("kind", ["add", "move"])
def test_an_added_or_moved_object_anywhere_in_its_cell_is_as_right(kind: str):
    """The instruction names the cell, not the random offset the dataset drew within it."""
    import dataclasses

    for k in range(40):  # an example whose object is at least a pixel off the cell centre on x
        ex = toy.sample_example(SIM_SEED_BASE + k, kind=kind)
        index = len(ex.edit.target.objects) - 1 if kind == "add" else ex.edit.touched[0]
        placed = ex.edit.target.objects[index]
        if abs(placed.jitter[0]) * toy.DEFAULT_SIZE >= 1:
            break
    elsewhere_in_cell = mirrored_in_cell(ex.edit, index)
    against_the_dataset = quality(toy.judge(ex.input_image, ex.clean_image, elsewhere_in_cell))
    assert against_the_dataset < 1.0 - 0.02  # the one drawn offset would rank it below the target
    assert judged_quality(ex, elsewhere_in_cell) == 1.0 == judged_quality(ex, ex.clean_image)
    # what the instruction does name still counts: nothing done, or the object in another cell
    assert judged_quality(ex, ex.input_image) < 0.8
    other_cell = next(c for c in toy.CELLS if c not in {o.cell for o in ex.edit.target.objects})
    wrong_place = ex.edit.target.replace(index, dataclasses.replace(placed, cell=other_cell)).render()
    assert judged_quality(ex, wrong_place) < 0.8
    targets = toy.admissible_targets(ex.edit)
    assert len(targets) == 26 and np.array_equal(np.asarray(targets[0]), np.asarray(ex.clean_image))


def test_edits_that_name_everything_have_one_target():
    for kind in ("remove", "recolour", "resize", "background"):
        ex = toy.sample_example(SIM_SEED_BASE, kind=kind)
        (only,) = toy.admissible_targets(ex.edit)
        assert np.array_equal(np.asarray(only), np.asarray(ex.clean_image))
        assert judged_quality(ex, ex.input_image) == quality(toy.judge(ex.input_image, ex.clean_image, ex.input_image))


def test_simulate_writes_simulated_rankings(tiny_editor, hive: HiveEnv):
    rep = simulate(tiny_editor, 3, variants=3, annotators=2, per_request=2, steps=2, batch=2, url=hive.url,
                   progress=False)
    assert rep.rankings == 6 and rep.calibrated and 0 <= rep.single_annotator_agreement <= 1
    with session_scope(hive.url, write=False) as s:
        users = s.query(User).all()
        assert users and all(u.is_simulated for u in users)
        qualities = [v.params["sim_quality"] for v in s.query(Variant).all()]
        assert len(qualities) == 9 and all(0 <= q <= 1 for q in qualities)
        pairs = pairwise_preferences(s, store=hive.store)
    assert len(pairs) == 6 * 3 and pairs.is_simulated.all()
    before = hive.counts()
    with pytest.raises(ValueError):
        simulate(tiny_editor, 2, variants=1, url=hive.url, progress=False)  # bad input writes nothing
    assert hive.counts() == before


def record_sample_calls(editor, monkeypatch, setting: str) -> list[tuple]:
    """Wrap `editor.sample` so each call appends (its `setting` argument, its seeds) to the list returned."""
    calls: list[tuple] = []
    sample = editor.sample

    def recording(sources, prompts, seeds, steps=None, guidance=None, image_guidance=None, mask_threshold=None):
        calls.append(({"image_guidance": image_guidance, "mask_threshold": mask_threshold}[setting], seeds))
        return sample(sources, prompts, seeds, steps, guidance, image_guidance, mask_threshold)

    monkeypatch.setattr(editor, "sample", recording)
    return calls


def test_simulate_samples_each_variant_at_its_own_image_guidance(tiny_editor, hive: HiveEnv, monkeypatch):
    calls = record_sample_calls(tiny_editor, monkeypatch, "image_guidance")
    simulate(tiny_editor, 2, variants=3, steps=2, batch=2, noise=0.1, url=hive.url, progress=False,
             variant_image_guidance=[1.0, 1.5, 3.0])
    assert [g for g, _ in calls] == [1.0, 1.5, 3.0]  # one call per variant position, at its own setting
    assert calls[1][1] == [[SIM_SEED_BASE * 16 + 1], [(SIM_SEED_BASE + 1) * 16 + 1]]  # the seeds of one setting's run
    with session_scope(hive.url, write=False) as s:
        variants = s.query(Variant).order_by(Variant.request_id, Variant.position).all()
        assert [v.params["image_guidance"] for v in variants] == [1.0, 1.5, 3.0] * 2
        assert [v.seed for v in variants[:3]] == [SIM_SEED_BASE * 16 + v for v in range(3)]
    before = hive.counts()
    for bad in ([1.0, 2.0], [0.5, 1.0, 2.0]):  # not one per variant; below 1
        with pytest.raises(ValueError, match="one per variant"):
            simulate(tiny_editor, 2, variants=3, url=hive.url, progress=False, variant_image_guidance=bad)
    assert hive.counts() == before


def test_simulate_samples_each_variant_at_its_own_mask_threshold(tiny_editor, hive: HiveEnv, monkeypatch):
    calls = record_sample_calls(tiny_editor, monkeypatch, "mask_threshold")
    default = tiny_editor.mask_threshold
    simulate(tiny_editor, 2, variants=3, steps=2, batch=2, noise=0.1, url=hive.url, progress=False,
             variant_mask_threshold=[0.0, 0.3, 0.0])
    assert [t for t, _ in calls] == [0.0, 0.3]  # one call per distinct threshold, variants 0 and 2 together
    assert calls[0][1] == [[SIM_SEED_BASE * 16, SIM_SEED_BASE * 16 + 2], [(SIM_SEED_BASE + 1) * 16,
                                                                          (SIM_SEED_BASE + 1) * 16 + 2]]
    assert tiny_editor.mask_threshold == default  # the editor's own setting is back
    with session_scope(hive.url, write=False) as s:
        variants = s.query(Variant).order_by(Variant.request_id, Variant.position).all()
        assert [v.params["mask_threshold"] for v in variants] == [0.0, 0.3, 0.0] * 2
    before = hive.counts()
    with pytest.raises(ValueError, match="one per variant"):
        simulate(tiny_editor, 2, variants=3, url=hive.url, progress=False, variant_mask_threshold=[0.0, 0.3])
    with pytest.raises(ValueError, match="mask_threshold must be in"):
        simulate(tiny_editor, 2, variants=3, url=hive.url, progress=False, variant_mask_threshold=[0.0, 0.3, 1.5])
    assert hive.counts() == before


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    return build_tiny_clip(tmp_path_factory.mktemp("clip") / "clip")


def _run(argv: list[str], capsys) -> dict:
    from hive.cli import main

    assert main(argv) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_cli_simulate_train_register_export_and_score(tiny_pipeline, tiny_clip, hive: HiveEnv, tmp_path, capsys):
    sim = _run(["simulate", "--requests", "4", "--variants", "3", "--annotators", "2", "--per-request", "2",
                "--model", str(tiny_pipeline), "--steps", "2", "--json"], capsys)
    assert sim["rankings"] == 8 and "single_annotator_agreement" in sim
    train_args = ["--backbone", str(tiny_clip), "--steps", "2", "--batch-size", "2", "--test-fraction", "0.5",
                  "--checkpoint-every", "0", "--json"]
    rep = _run(["train-reward", "--out", str(tmp_path / "run"), "--name", "r1", *train_args], capsys)
    for key in ("heldout_pair_accuracy", "single_annotator_accuracy", "clip_direction_accuracy",
                "clip_instruction_direction_accuracy", "random_accuracy", "lead_over_annotator",
                "lead_over_clip_direction", "lead_over_clip_instruction_direction"):
        assert key in rep
    assert rep["clip_direction_uses_captions"]  # simulated requests carry their captions
    assert rep["train_requests"] == 2 and rep["test_requests"] == 2
    assert rep["accuracy_reference"] == "noise-free order"  # simulated data is scored against the truth
    with session_scope(hive.url, write=False) as s:
        mv = s.get(ModelVersion, rep["model_version_id"])
        assert mv.kind == "reward" and mv.name == "r1" and mv.metrics["heldout_pair_accuracy"] == rep["heldout_pair_accuracy"]
    # from an exported dataset instead of the database: the same requests, the same split
    _run(["export", "--format", "jsonl", "--out", str(tmp_path / "export"), "--json"], capsys)
    rep2 = _run(["train-reward", "--out", str(tmp_path / "run2"), "--data", str(tmp_path / "export"),
                 "--no-register", *train_args], capsys)
    assert rep2["test_rankings"] == rep["test_rankings"] and "model_version_id" not in rep2
    # scoring a triplet dataset, written beside it
    from hive.toy import write_dataset

    write_dataset(tmp_path / "data", n=3, seed=0)
    out = _run(["score", "--data", str(tmp_path / "data"), "--reward", str(tmp_path / "run" / "model"),
                "--batch", "2", "--json"], capsys)
    rows = [json.loads(line) for line in Path(out["rewards"]).read_text().splitlines()]
    assert Path(out["rewards"]) == tmp_path / "data" / "rewards.jsonl"
    assert [r["id"] for r in rows] == ["toy-00000000", "toy-00000001", "toy-00000002"]
    assert all(np.isfinite(r["reward"]) for r in rows)


def test_reward_experiment_end_to_end_tiny(tiny_pipeline, tiny_clip, tmp_path, capsys):
    out = tmp_path / "exp"
    rep = _run(["reward-experiment", "--out", str(out), "--requests", "4", "--test-requests", "2",
                "--variants", "3", "--annotators", "2", "--curve", "2,4", "--model", str(tiny_pipeline),
                "--sample-steps", "2", "--backbone", str(tiny_clip), "--steps", "2", "--batch-size", "2",
                "--checkpoint-every", "0", "--noise-free-bound", "--json"], capsys)
    assert [p["requests"] for p in rep["curve"]] == [2, 4]
    assert rep["noise_free_labels"]["requests"] == 4 and (out / "n4-noise-free/model/config.json").exists()
    assert "noise-free order of the same 4 requests" in (out / "report.md").read_text()
    assert all(p["single_annotator_accuracy"] is not None or p["true_pair_accuracy"] is None for p in rep["curve"])
    for name in ("report.json", "report.md", "learning_curve.png", "n2/model/config.json", "n4/model/config.json"):
        assert (out / name).exists(), name
    from hive.cli import main

    assert main(["reward-experiment", "--out", str(out), "--model", str(tiny_pipeline), "--requests", "2"]) == 2


def test_stand_in_variants_without_an_editor(hive: HiveEnv):
    rep = simulate(None, 3, variants=4, annotators=1, url=hive.url, progress=False)
    assert rep.rankings == 3 and rep.requests == 3
    with session_scope(hive.url, write=False) as s:
        variants = s.query(Variant).all()
    assert len(variants) == 12 and {v.params["model"] for v in variants} == {"stand-in"}
    # four distinct picks of five (clean, unchanged, three corruptions): the clean target or the
    # unchanged source is always among them, and the clean target has quality 1
    assert max(v.params["sim_quality"] for v in variants) == 1.0


def test_a_cached_simulation_is_reused_only_for_the_same_settings(tmp_path):
    import json

    from hive.train_reward import prepare_simulation

    sim = tmp_path / "sim"
    first = prepare_simulation(sim, None, True, 3, 4, 1, 20, 8, progress=False)
    assert prepare_simulation(sim, None, True, 3, 4, 1, 20, 8, progress=False) == first  # reused
    with pytest.raises(ValueError, match="requests: 3 there, 4 asked"):
        prepare_simulation(sim, None, True, 4, 4, 1, 20, 8, progress=False)
    # a store judged under an older quality rule (before the key existed) is not reused either
    meta = json.loads((sim / "simulation.json").read_text())
    del meta["settings"]["quality_rule"]
    (sim / "simulation.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="quality_rule: None there, admissible-targets asked"):
        prepare_simulation(sim, None, True, 3, 4, 1, 20, 8, progress=False)
    meta["settings"]["quality_rule"] = "admissible-targets"
    (sim / "simulation.json").write_text(json.dumps(meta))
    # a setting only the store has (e.g. variants at several mask thresholds) is a difference too
    meta = json.loads((sim / "simulation.json").read_text())
    meta["settings"]["variant_mask_threshold"] = [0.0, 0.2, 0.35, 0.5]
    (sim / "simulation.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"variant_mask_threshold: \[0.0, 0.2, 0.35, 0.5\] there, None asked"):
        prepare_simulation(sim, None, True, 3, 4, 1, 20, 8, progress=False)


def test_reward_errors_reference_scorers_put_the_clean_target_first_and_the_odd_variant_last():
    """scripts/reward_errors.py's two reference columns: distance to the clean toy target, and to the
    request's other variants."""
    from hive.train_reward import ImageCache, Ranking
    from tests.script_loader import load_script

    module = load_script("reward_errors")
    ex = toy.sample_example(SIM_SEED_BASE + 3)
    cache = ImageCache()
    cache.images.update({"source": ex.input_image, "target": ex.clean_image})
    ranking = Ranking(ranking_id=1, request_id=1, annotator_id=1, is_simulated=True, instruction=ex.edit.instruction,
                      source_path="source", variant_ids=[0, 1, 2], variant_paths=["source", "target", "target"],
                      ranks=[2, 1, 1], toy_seed=SIM_SEED_BASE + 3)
    to_target, to_others = module.reference_scores(ranking, cache)
    assert to_target[1] == to_target[2] == 0.0 and to_target[0] < 0  # the unedited source is the one off target
    assert to_others[0] < to_others[1] == to_others[2]  # and the one unlike the others


def test_reward_reverse_split_trains_on_the_experiments_held_out_requests():
    """scripts/reward_reverse_split.py: the experiment's held-out requests become the training set and its
    training requests the test set; a setting's flags reach the config as train-reward would set them."""
    from hive.train_reward import Ranking, RewardTrainConfig, split_experiment
    from tests.script_loader import load_script

    module = load_script("reward_reverse_split")
    rankings = [Ranking(ranking_id=k, request_id=k, annotator_id=1, is_simulated=True, instruction="x",
                        source_path="s", variant_ids=[0, 1], variant_paths=["a", "b"], ranks=[1, 2],
                        toy_seed=SIM_SEED_BASE + (7 - k)) for k in range(8)]
    first, last = split_experiment(rankings, 4)
    train, test = module.reverse_split(rankings, 4)
    assert [r.request_id for r in train] == [r.request_id for r in last]
    assert [r.request_id for r in test] == [r.request_id for r in first]
    assert {r.request_id for r in train} == {0, 1, 2, 3}  # the highest toy seeds, held out by the experiment
    with pytest.raises(ValueError, match="as many training requests"):
        module.reverse_split(rankings, 3)
    assert module.setting_config("") == RewardTrainConfig()
    config = module.setting_config("--no-residual --steps 5")
    assert config.residual is False and config.steps == 5


def test_reward_two_folds_counts_each_request_once_over_both_halves():
    """scripts/reward_two_folds.py: accuracy against the noise-free order over all the requests of
    both halves, a request ranked by two annotators counted once, its tied pairs left out."""
    from hive.train_reward import Ranking, true_order_accuracy
    from tests.script_loader import load_script

    module = load_script("reward_two_folds")

    def ranking(rid: int, q: list[float]) -> Ranking:
        return Ranking(ranking_id=rid * 10 + len(q), request_id=rid, annotator_id=1, is_simulated=True,
                       instruction="x", source_path="s", variant_ids=list(range(len(q))),
                       variant_paths=[str(k) for k in range(len(q))], ranks=[1] * len(q), true_quality=q)

    rankings = [ranking(1, [0.9, 0.5, 0.1]), ranking(1, [0.9, 0.5, 0.1]), ranking(2, [0.8, 0.8, 0.2])]
    scores = [np.array([3.0, 2.0, 1.0]), np.array([3.0, 2.0, 1.0]), np.array([0.0, 1.0, 2.0])]
    # request 1: 3 pairs, all right; request 2: the 0.8/0.8 pair tied by the truth, the other two wrong
    assert module.true_order_accuracy is true_order_accuracy  # the experiment's own measure
    result = module.true_order_accuracy(rankings, scores)
    assert (result["accuracy"], result["pairs"]) == (3 / 5, 5)
    assert module.label(Path("runs/x/n300/model")) == "n300" and module.label(Path("runs/m")) == "m"


def test_quality_rule_pairs_counts_the_pairs_only_the_drawn_offset_ordered():
    """scripts/quality_rule_pairs.py: an add drawn right but elsewhere in its cell ties the dataset's
    target under the new rule, and the unchanged source stays ordered under both."""
    from hive.train_reward import ImageCache, Ranking
    from tests.script_loader import load_script

    module = load_script("quality_rule_pairs")

    def elsewhere_in_cell(ex: toy.ToyExample):  # the added object at its mirrored offset
        return mirrored_in_cell(ex.edit, len(ex.edit.target.objects) - 1)

    def old_rule_orders_it(seed: int) -> bool:  # the script reads the request's example by seed alone
        ex = toy.sample_example(seed)
        return ex.edit.kind == "add" and quality(toy.judge(ex.input_image, ex.clean_image, elsewhere_in_cell(ex))) < 0.97

    seed = next(SIM_SEED_BASE + k for k in range(300) if old_rule_orders_it(SIM_SEED_BASE + k))
    ex = toy.sample_example(seed)
    elsewhere = elsewhere_in_cell(ex)
    cache = ImageCache()
    cache.images.update({"source": ex.input_image, "target": ex.clean_image, "elsewhere": elsewhere})
    paths = ["target", "elsewhere", "source"]
    ranking = Ranking(ranking_id=1, request_id=1, annotator_id=1, is_simulated=True, instruction=ex.edit.instruction,
                      source_path="source", variant_ids=[0, 1, 2], variant_paths=paths, ranks=[1, 1, 2],
                      toy_seed=seed, true_quality=[judged_quality(ex, cache(p)) for p in paths])
    counts = module.untied_pairs_by_kind([ranking, ranking], cache)  # a request counts once
    # old rule: target > elsewhere > source, 3 pairs; new: target = elsewhere > source, 2 pairs
    assert counts == {"add": (3, 2, 2)}


def test_flaw_map_pilot_attempts_flaw_only_near_the_change_and_the_labels_mark_them():
    """scripts/flaw_map_pilot.py: a synthetic attempt moves the edit's outline by a few pixels, so far
    from the change it keeps the source (up to specks and pixel noise), and its flaw labels are the
    pixels off the clean target by more than the judge's tolerance."""
    from scipy import ndimage

    from tests.script_loader import load_script

    module = load_script("flaw_map_pilot")
    rng = np.random.default_rng(0)
    for k in range(20):
        ex = toy.sample_example(SIM_SEED_BASE + k)
        source, target = np.asarray(ex.input_image), np.asarray(ex.clean_image)
        change = np.any(source != target, axis=-1)
        attempt = module.attempt(source, target, rng)
        assert attempt.shape == source.shape and attempt.dtype == np.uint8
        far = ndimage.distance_transform_edt(~change) > 5 if change.any() else np.ones(change.shape, bool)
        moved = np.linalg.norm(attempt.astype(np.float32) - source.astype(np.float32), axis=-1) > toy.COLOUR_TOL
        assert (moved & far).sum() <= 3 * 4 * 9  # at most three 2x2 specks, each softened into its 3x3 neighbourhood
        assert not module.flaws(target[None], target[None]).any()
        assert module.flaws(source[None], target[None])[0].sum() == (
            np.linalg.norm(source.astype(np.float32) - target.astype(np.float32), axis=-1) > toy.COLOUR_TOL).sum()
    net = module.FlawMap(len(module.vocabulary()), width=8)
    logits = net(torch.zeros(2, 3, 64, 64), torch.zeros(2, 3, 64, 64), module.word_ids([toy.sample_example(SIM_SEED_BASE + k).edit.instruction for k in range(2)]))
    assert logits.shape == (2, 64, 64)
