"""Evaluation: the Wilson interval, blind pairwise comparisons (sides shuffled and mapped back),
the CLIP trade-off metrics on known outputs, and the trade-off plot."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from PIL import Image

from hive import toy
from hive.evaluate import (
    EVAL_SEED_BASE, PAIRWISE_NOISE, PAIRWISE_SEED_BASE, ClipEmbedder, blind_pairwise, evaluate_toy,
    expected_blind_pairwise, judged_qualities, paired_judgements, pairwise_ceiling, plot_tradeoff, tradeoff_curve,
    wilson_interval,
)
from tests.test_reward_model import build_tiny_clip


@pytest.fixture(scope="module")
def tiny_clip_embedder(tmp_path_factory) -> ClipEmbedder:
    return ClipEmbedder(build_tiny_clip(tmp_path_factory.mktemp("eval_clip") / "clip"), device="cpu")


def fake_editor(base, name: str, answer: str, seed: int, n: int):
    """A copy of the tiny editor whose `sample` returns each example's clean target ("clean") or its
    unchanged source ("source") instead of running the pipeline."""
    lookup = {}
    for k in range(n):
        e = toy.sample_example(seed + k)
        lookup[(e.input_image.tobytes(), e.edit.instruction)] = e
    editor = copy.copy(base)
    editor.model = name

    def sample(sources, prompts, seeds, steps, guidance, image_guidance):
        out = []
        for src, prompt, ss in zip(sources, prompts, seeds):
            e = lookup[(src.tobytes(), prompt)]
            out.append([(e.clean_image if answer == "clean" else e.input_image).copy() for _ in ss])
        return out

    editor.sample = sample
    return editor


# ---------------------------------------------------------------- confidence intervals
@pytest.mark.parametrize("k, n, lo, hi", [
    (0, 10, 0.0, 0.2775), (5, 10, 0.2366, 0.7634), (10, 10, 0.7225, 1.0), (50, 100, 0.4038, 0.5962),
    (1, 20, 0.0089, 0.2361),
])
def test_wilson_interval_matches_published_values(k, n, lo, hi):
    a, b = wilson_interval(k, n)
    assert a == pytest.approx(lo, abs=1e-4) and b == pytest.approx(hi, abs=1e-4)


def test_wilson_interval_refuses_impossible_counts():
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


# ---------------------------------------------------------------- blind pairwise
def test_clean_target_beats_the_unchanged_source_from_either_side(tiny_editor):
    n = 60
    clean = fake_editor(tiny_editor, "clean", "clean", PAIRWISE_SEED_BASE, n)
    source = fake_editor(tiny_editor, "source", "source", PAIRWISE_SEED_BASE, n)
    r = blind_pairwise(clean, source, n=n, annotators=3, noise=0.3, progress=False)
    assert r["model_a"] == "clean" and r["model_b"] == "source"
    assert r["wins"] + r["ties"] + r["losses"] == n
    assert r["wins"] >= 0.8 * n and r["losses"] <= 0.15 * n
    assert r["votes"]["a"] > 5 * r["votes"]["b"]
    lo, hi = r["win_ci"]
    assert lo <= r["win_rate"] <= hi and r["ci_method"] == "wilson"
    assert 0.3 * n <= r["a_shown_left"] <= 0.7 * n  # both sides used
    mirrored = blind_pairwise(source, clean, n=n, annotators=3, noise=0.3, progress=False)
    assert mirrored["losses"] >= 0.8 * n and mirrored["wins"] <= 0.15 * n


def test_paired_judgements_count_each_edit_once_and_refuse_different_edits(tiny_editor, tmp_path):
    n = 12
    clean = fake_editor(tiny_editor, "clean", "clean", EVAL_SEED_BASE, n)
    source = fake_editor(tiny_editor, "source", "source", EVAL_SEED_BASE, n)
    evaluate_toy(n=n, editor=clean, out=tmp_path / "clean")
    evaluate_toy(n=n, editor=source, out=tmp_path / "source")
    evaluate_toy(n=n, editor=clean, out=tmp_path / "clean2")
    rows = [json.loads(line) for line in (tmp_path / "clean" / "judgements.jsonl").read_text().splitlines()]
    assert [row["annotator_quality"] for row in rows] == [1.0] * n  # what the simulated annotators see
    r = paired_judgements(tmp_path / "clean" / "judgements.jsonl", tmp_path / "source" / "judgements.jsonl")
    # the clean target follows every instruction; the unchanged source follows none
    assert (r["wins"], r["ties"], r["losses"]) == (n, 0, 0)
    assert r["only_a_succeeds"] == n and r["only_b_succeeds"] == 0
    mirrored = paired_judgements(tmp_path / "source" / "judgements.jsonl", tmp_path / "clean" / "judgements.jsonl")
    assert (mirrored["wins"], mirrored["losses"], mirrored["only_b_succeeds"]) == (0, n, n)
    same = paired_judgements(tmp_path / "clean" / "judgements.jsonl", tmp_path / "clean2" / "judgements.jsonl")
    assert same["ties"] == n and same["tie_ci"][0] > 0.7
    evaluate_toy(n=n - 1, editor=clean, out=tmp_path / "fewer")
    with pytest.raises(ValueError, match="different edits"):
        paired_judgements(tmp_path / "fewer" / "judgements.jsonl", tmp_path / "source" / "judgements.jsonl")


def test_annotator_quality_reads_the_row_and_falls_back_for_rows_from_before_it():
    from hive.evaluate import annotator_quality, judgement_of
    from hive.simulate import quality

    row = {"following": 0.5, "preservation": 1.0, "stray_pixels": 0, "success": False, "stray_limit": 24.0}
    assert annotator_quality(row) == quality(judgement_of(row)) == 0.75
    assert annotator_quality({**row, "annotator_quality": 1.0}) == 1.0  # an added object elsewhere in its cell


def test_annotators_see_shuffled_sides(tiny_editor, monkeypatch):
    """What the simulated annotator is shown: the clean image sits left about half the time."""
    import hive.simulate

    n = 40
    seen = []
    real = hive.simulate.noisy_ranks

    def spy(q, noise, rng, tie_margin=0.02):
        seen.append(tuple(q))
        return real(q, noise, rng, tie_margin)

    monkeypatch.setattr(hive.simulate, "noisy_ranks", spy)
    clean = fake_editor(tiny_editor, "clean", "clean", PAIRWISE_SEED_BASE, n)
    source = fake_editor(tiny_editor, "source", "source", PAIRWISE_SEED_BASE, n)
    r = blind_pairwise(clean, source, n=n, annotators=1, noise=0.0, progress=False)
    assert len(seen) == n
    clean_left = sum(q[0] > q[1] for q in seen)
    assert clean_left == r["a_shown_left"]
    assert 0.25 * n <= clean_left <= 0.75 * n
    assert r["wins"] == n  # without noise the clean target always wins, whichever side it was on


def test_an_editor_against_itself_is_even(tiny_editor):
    n = 100
    same_a = fake_editor(tiny_editor, "same", "source", PAIRWISE_SEED_BASE, n)
    # identical outputs and no noise: every input is a tie
    r0 = blind_pairwise(same_a, same_a, n=20, annotators=3, noise=0.0, progress=False)
    assert (r0["wins"], r0["ties"], r0["losses"]) == (0, 20, 0)
    # with noise: wins and losses balance (within three standard deviations)
    r = blind_pairwise(same_a, same_a, n=n, annotators=3, noise=0.3, progress=False)
    decided = r["wins"] + r["losses"]
    assert decided > 0.5 * n
    assert abs(r["wins"] - r["losses"]) <= 3 * np.sqrt(decided)


def test_expected_blind_pairwise_counts_and_its_ceiling():
    # without noise each edit goes to the better quality, a tie within the margin
    r = expected_blind_pairwise([1.0, 0.5, 0.7], [0.5, 0.51, 0.9], noise=0.0, repeats=3)
    assert (r["win_rate"], r["tie_rate"], r["loss_rate"]) == pytest.approx((1 / 3, 1 / 3, 1 / 3))
    assert r["wins_per_loss"] == pytest.approx(1.0)
    # with noise, equal editors are even, and a better editor wins more (and loses less)
    same = expected_blind_pairwise([0.7] * 50, [0.7] * 50, repeats=40)
    assert abs(same["win_rate"] - same["loss_rate"]) < 0.05
    baseline = [0.6] * 50
    better = expected_blind_pairwise([0.8] * 50, baseline, repeats=40)
    clean = expected_blind_pairwise([1.0] * 50, baseline, repeats=40)
    assert same["win_rate"] < better["win_rate"] < clean["win_rate"]
    assert clean["loss_rate"] < better["loss_rate"] < same["loss_rate"]
    assert clean["noise"] == PAIRWISE_NOISE and clean["annotators"] == 3
    # more annotators per edit, fewer of their mistakes survive the majority
    assert expected_blind_pairwise([1.0] * 50, baseline, annotators=9, repeats=40)["wins_per_loss"] > clean["wins_per_loss"]
    with pytest.raises(ValueError, match="same edits"):
        expected_blind_pairwise([1.0], [0.5, 0.5])


def test_pairwise_ceiling_predicts_the_clean_editors_blind_comparison(tiny_editor, tmp_path):
    """The ceiling from judged qualities matches what blind_pairwise measures for an editor that
    returns the clean target, on the same edits."""
    n = 60
    clean = fake_editor(tiny_editor, "clean", "clean", PAIRWISE_SEED_BASE, n)
    source = fake_editor(tiny_editor, "source", "source", PAIRWISE_SEED_BASE, n)
    evaluate_toy(n=n, seed=PAIRWISE_SEED_BASE, editor=clean, out=tmp_path / "clean")
    evaluate_toy(n=n, seed=PAIRWISE_SEED_BASE, editor=source, out=tmp_path / "source")
    assert set(judged_qualities(tmp_path / "clean" / "judgements.jsonl").values()) == {1.0}
    predicted = pairwise_ceiling(tmp_path / "source" / "judgements.jsonl", noise=0.6, repeats=50)
    measured = blind_pairwise(clean, source, n=n, annotators=3, noise=0.6, progress=False)
    sd = np.sqrt(predicted["win_rate"] * (1 - predicted["win_rate"]) / n)
    assert abs(measured["win_rate"] - predicted["win_rate"]) <= 3 * sd
    assert 0.5 < predicted["win_rate"] < 0.95  # noisy annotators: not every clean target wins


def test_blind_pairwise_runs_the_real_pipeline(tiny_editor, tmp_path):
    import json

    r = blind_pairwise(tiny_editor, tiny_editor, n=3, annotators=2, steps=1, noise=0.1, out=tmp_path, progress=False)
    assert r["wins"] + r["ties"] + r["losses"] == 3
    trials = [json.loads(line) for line in (tmp_path / "trials.jsonl").read_text().splitlines()]
    assert len(trials) == 3 and sum(t["votes_a"] + t["votes_b"] + t["votes_tie"] for t in trials) == 6
    assert json.loads((tmp_path / "report.json").read_text())["wins"] == r["wins"]
    assert r["model_a"] == r["model_b"] == tiny_editor.model
    with pytest.raises(ValueError):
        blind_pairwise(tiny_editor, tiny_editor, n=0, noise=0.1)


# ---------------------------------------------------------------- trade-off
def test_tradeoff_metrics_on_known_outputs(tiny_editor, tiny_clip_embedder):
    n, seed = 6, 123
    clean = fake_editor(tiny_editor, "clean", "clean", seed, n)
    curve = tradeoff_curve(clean, n=n, image_guidances=(1.0, 1.6), seed=seed, clip=tiny_clip_embedder,
                           progress=False)
    assert [p["image_guidance"] for p in curve["points"]] == [1.0, 1.6]
    ref = curve["reference"]
    for p in curve["points"]:  # the clean targets score exactly the reference values
        assert p["image_similarity"] == pytest.approx(ref["image_similarity"], abs=1e-5)
        assert p["directional_similarity"] == pytest.approx(ref["directional_similarity"], abs=1e-5)
        assert p["success"] == 1.0
    source = fake_editor(tiny_editor, "source", "source", seed, n)
    unchanged = tradeoff_curve(source, n=n, image_guidances=(1.2,), seed=seed, clip=tiny_clip_embedder, progress=False)
    p = unchanged["points"][0]
    assert p["image_similarity"] == pytest.approx(1.0, abs=1e-5)  # output is the source
    assert p["directional_similarity"] == pytest.approx(0.0, abs=1e-5)  # no change, no direction
    assert p["success"] == 0.0
    assert ref["image_similarity"] < 1.0


def test_tradeoff_on_the_real_pipeline(tiny_editor, tiny_clip_embedder):
    curve = tradeoff_curve(tiny_editor, n=2, image_guidances=(1.0, 2.2), steps=1, clip=tiny_clip_embedder,
                           progress=False)
    assert curve["model"] == tiny_editor.model and curve["guidance"] == 7.5
    for p in curve["points"]:
        assert -1.0 <= p["image_similarity"] <= 1.0 and -1.0 <= p["directional_similarity"] <= 1.0


def _curve(offset: float) -> dict:
    return {"n": 10, "guidance": 7.5, "reference": {"name": "clean targets", "image_similarity": 0.8,
                                                    "directional_similarity": 0.3},
            "points": [{"image_guidance": g, "image_similarity": 0.95 - 0.05 * i + offset,
                        "directional_similarity": 0.05 + 0.03 * i + offset} for i, g in enumerate((1.0, 1.2, 1.4))]}


def test_plot_has_both_models(tmp_path):
    out = plot_tradeoff({"baseline": _curve(0.0), "hive": _curve(0.05)}, tmp_path / "sub" / "tradeoff.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = np.asarray(Image.open(out).convert("RGB")).astype(int)
    for colour in ((0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)):  # matplotlib's first two line colours
        near = (np.abs(img - np.array(colour)).sum(-1) < 30).sum()
        assert near > 50, f"no line drawn in colour {colour}"
    assert not list((tmp_path / "sub").glob(".*.tmp"))
    with pytest.raises(ValueError):
        plot_tradeoff({}, tmp_path / "empty.png")


def test_plot_single_model_has_only_one_line_colour(tmp_path):
    out = plot_tradeoff({"baseline": _curve(0.0)}, tmp_path / "one.png")
    img = np.asarray(Image.open(out).convert("RGB")).astype(int)
    assert (np.abs(img - np.array((0xFF, 0x7F, 0x0E))).sum(-1) < 30).sum() == 0


def test_cli_evaluate_tradeoff_and_against(tiny_pipeline, tiny_clip_embedder, tmp_path, capsys):
    import json

    from hive.cli import main

    png = tmp_path / "tradeoff.png"
    rc = main(["evaluate", "--model", str(tiny_pipeline), "--n", "2", "--steps", "1", "--tradeoff", str(png),
               "--tradeoff-n", "1", "--clip", tiny_clip_embedder.path, "--against", str(tiny_pipeline),
               "--annotator-noise", "0.1", "--out", str(tmp_path / "eval"), "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["n"] == 2 and "per_kind" in report
    assert report["pairwise"]["wins"] + report["pairwise"]["ties"] + report["pairwise"]["losses"] == 2
    assert (tmp_path / "eval" / "pairwise" / "trials.jsonl").exists()
    assert png.read_bytes()[:4] == b"\x89PNG"
    curves = json.loads(png.with_suffix(".json").read_text())
    assert len(curves) == 2  # the same folder twice gets two labels
    assert all(len(c["points"]) == 7 for c in curves.values())


def test_cli_evaluate_grid(tiny_pipeline, tmp_path, capsys):
    from PIL import Image

    from hive import toy
    from hive.cli import main

    png = tmp_path / "grid.png"
    assert main(["evaluate", "--model", str(tiny_pipeline), "--no-judge", "--steps", "1", "--grid", str(png)]) == 0
    assert f"wrote {png}" in capsys.readouterr().out
    grid = Image.open(png)
    cell = 2 * toy.DEFAULT_SIZE  # one row per edit kind, seven picture columns (source, target, 4 variants)
    assert grid.height > len(toy.EDIT_KINDS) * cell and grid.width > 6 * cell
    assert not list(tmp_path.glob(".*"))  # no temporary file left beside it


def test_cli_evaluate_refuses_a_missing_model(tmp_path, capsys):
    from hive.cli import main

    assert main(["evaluate", "--model", str(tmp_path / "nope"), "--n", "1", "--json"]) == 2
    assert "error" in capsys.readouterr().err


def test_default_annotator_noise_gives_about_72_percent_agreement():
    """PAIRWISE_NOISE is a stored calibration: check it on a fresh, smaller set of stand-in pairs."""
    from hive.evaluate import PAIRWISE_NOISE
    from hive.simulate import expected_agreement, toy_variant_qualities

    qualities = toy_variant_qualities(40, 2, seed=77_000)
    assert expected_agreement(qualities, PAIRWISE_NOISE, repeats=50) == pytest.approx(0.72, abs=0.04)


def test_cli_evaluate_ceiling(tiny_pipeline, tmp_path, capsys):
    import json

    from hive.cli import main

    assert main(["evaluate", "--model", str(tiny_pipeline), "--n", "2", "--steps", "1", "--ceiling"]) == 2
    assert "--ceiling" in capsys.readouterr().err
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(tiny_pipeline), "--n", "2", "--steps", "1", "--ceiling",
                 "--out", str(out)]) == 0
    assert "ceiling of a blind comparison" in capsys.readouterr().out
    ceiling = json.loads((out / "report.json").read_text())["pairwise_ceiling"]
    assert ceiling["n"] == 2 and ceiling["repeats"] == 100


def test_cli_evaluate_prints_the_pairwise_table(tiny_pipeline, capsys):
    from hive.cli import main

    assert main(["evaluate", "--model", str(tiny_pipeline), "--no-judge", "--steps", "1", "--against",
                 str(tiny_pipeline), "--pairwise-n", "2", "--annotator-noise", "0.1"]) == 0
    out = capsys.readouterr().out
    assert "blind pairwise" in out and "95% Wilson" in out
    assert [line.split()[0] for line in out.splitlines()[-3:]] == ["win", "tie", "loss"]
