"""Fine-tuning with the reward: the quantiser's levels, the weights' normalisation, inverse
instructions (toy and rule-based), condition and weighted training on a tiny pipeline, and a
condition-reward folder that samples with the top-level suffix by itself."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from hive import toy
from hive.finetune import (
    Example,
    ExampleTriplets,
    FinetuneConfig,
    fit_quantiser,
    inverse_examples,
    invert_instruction,
    level_suffix,
    prepare,
    reward_weights,
    run_finetune,
)
from tests.db_fixtures import HiveEnv, hive, hive_factory  # noqa: F401  (fixtures)

TOP = ", image quality is five out of five"


# ---------------------------------------------------------------- quantiser
def test_quantiser_levels_are_equal_quantile_bins():
    rewards = np.random.default_rng(0).permutation(np.arange(100.0))
    q = fit_quantiser(rewards)
    assert q.levels == 5 and len(q.thresholds) == 4
    levels = q.levels_of(rewards)
    assert np.bincount(levels, minlength=6)[1:].tolist() == [20, 20, 20, 20, 20]
    assert levels == [q.level(r) for r in rewards]
    order = np.argsort(rewards)
    assert all(a <= b for a, b in zip(np.array(levels)[order], np.array(levels)[order][1:]))  # monotone
    assert q.level(-1e9) == 1 and q.level(1e9) == 5
    assert q.level(q.thresholds[0]) == 2  # a reward on a threshold goes to the higher level
    assert level_suffix(1) == ", image quality is one out of five" and level_suffix(5) == TOP
    for bad in (0, 6):
        with pytest.raises(ValueError):
            level_suffix(bad)
    with pytest.raises(ValueError):
        fit_quantiser([])
    with pytest.raises(ValueError):
        fit_quantiser([0.1, float("nan")])


def test_condition_prompts_carry_their_level():
    ex = [Example(str(i), "s.png", "t.png", f"make the circle red {i}", "data") for i in range(10)]
    out, info = prepare(ex, [float(i) for i in range(10)], FinetuneConfig(method="condition"))
    assert [e.level for e in out] == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert out[0].prompt == "make the circle red 0, image quality is one out of five"
    assert out[9].prompt == "make the circle red 9" + TOP
    assert all(e.weight == 1.0 for e in out)
    assert info["condition"]["level_counts"] == [2, 2, 2, 2, 2] and len(info["condition"]["thresholds"]) == 4


# ---------------------------------------------------------------- weights
def test_weights_have_mean_one_are_clipped_and_grow_with_the_reward():
    r = np.random.default_rng(1).normal(size=400)
    w = reward_weights(r, eta=0.5, clip=3.0)
    assert w.mean() == pytest.approx(1.0, abs=1e-9)
    assert w.max() <= 3.0 + 1e-12 and (np.isclose(w, 3.0)).sum() > 0  # the clip binds here
    order = np.argsort(r)
    assert np.all(np.diff(w[order]) >= -1e-12)  # more reward, more weight
    free = np.where(w < 2.9)[0][:2]  # below the clip the ratio is exactly exp(dR / eta)
    assert w[free[0]] / w[free[1]] == pytest.approx(math.exp((r[free[0]] - r[free[1]]) / 0.5), rel=1e-9)
    np.testing.assert_allclose(reward_weights(r + 7.0, 0.5, 3.0), w, rtol=1e-9)  # only differences matter
    np.testing.assert_allclose(reward_weights(r, eta=1e6, clip=3.0), 1.0, atol=1e-4)  # eta -> inf: plain SFT
    np.testing.assert_allclose(reward_weights(r, eta=0.1, clip=1.0), 1.0)  # clip 1: uniform
    for kwargs in ({"eta": 0.0}, {"eta": -1.0}, {"clip": 0.5}):
        with pytest.raises(ValueError):
            reward_weights(r, **kwargs)


def test_plain_prepare_ignores_the_reward():
    ex = [Example(str(i), "s.png", "t.png", f"instruction {i}", "data") for i in range(4)]
    out, info = prepare(ex, [-3.0, 0.0, 1.0, 9.0], FinetuneConfig(method="plain"))
    assert [e.prompt for e in out] == [f"instruction {i}" for i in range(4)]
    assert all(e.weight == 1.0 and e.level is None for e in out)
    assert "condition" not in info and "weights" not in info
    with pytest.raises(ValueError, match="plain"):
        FinetuneConfig(method="unknown").check()


def test_weighted_prepare_keeps_the_base_suffix_and_batches_carry_the_weights(tmp_path):
    from PIL import Image

    img = tmp_path / "x.png"
    Image.new("RGB", (8, 8), (10, 20, 30)).save(img)
    ex = [Example(str(i), str(img), str(img), f"instruction {i}", "data") for i in range(6)]
    out, info = prepare(ex, [0.0, 1.0, 2.0, 3.0, 4.0, 5.0], FinetuneConfig(method="weighted", eta=2.0, clip=4.0),
                        base_suffix=", image quality is five out of five")
    assert all(e.prompt == e.instruction + TOP for e in out)  # a conditioned base keeps seeing its suffix
    assert info["weights"]["mean"] == pytest.approx(1.0) and info["weights"]["effective_sample_size"] < 6
    src = ExampleTriplets(out, resolution=8, seed=3, weighted=True)
    batch = src.batch(0, 5)
    by_prompt = {e.prompt: e.weight for e in out}
    assert batch.weights is not None and batch.weights.shape == (5,)
    assert [float(x) for x in batch.weights] == pytest.approx([by_prompt[p] for p in batch.prompts])
    again = src.batch(0, 5)
    assert again.prompts == batch.prompts  # a pure function of (seed, step): resume sees the same batches
    assert ExampleTriplets(out, resolution=8).batch(0, 2).weights is None


def test_sft_trainer_applies_the_batch_weights(tiny_pipeline, tmp_path, monkeypatch):
    import hive.train_sft as sft

    seen = []
    real = sft.sft_loss

    def spy(*args, **kwargs):
        seen.append(args[8] if len(args) > 8 else kwargs.get("weights"))
        return real(*args, **kwargs)

    monkeypatch.setattr(sft, "sft_loss", spy)
    data = tmp_path / "data"
    toy.write_dataset(data, n=3, seed=0, progress=False)
    ex = [Example(str(i), str(data / f"images/toy-0000000{i}_input.png"), str(data / f"images/toy-0000000{i}_edited.png"),
                  "make it", "data") for i in range(3)]
    out, _ = prepare(ex, [0.0, 1.0, 2.0], FinetuneConfig(method="weighted", eta=0.5))
    sft.train_sft(tiny_pipeline, ExampleTriplets(out, 32, weighted=True), tmp_path / "run",
                  sft.SFTConfig(steps=1, batch_size=3, ema_decay=None, checkpoint_every=100))
    assert seen and seen[0] is not None  # the batch of 3 holds all 3 examples: exactly their weights reach the loss
    assert sorted(float(x) for x in seen[0]) == pytest.approx(sorted(e.weight for e in out))
    assert len({round(e.weight, 6) for e in out}) == 3


# ---------------------------------------------------------------- inverse instructions
def test_toy_inverse_examples_swap_the_images_and_use_the_exact_inverse(tmp_path):
    toy.write_dataset(tmp_path, n=8, seed=0, noise=0.5, progress=False)
    inv, skipped = inverse_examples(tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metadata.jsonl").read_text().splitlines()]
    assert skipped == 0 and len(inv) == 8
    for e, row in zip(inv, rows):
        assert e.inverse and e.instruction == row["inverse_prompt"] == toy.sample_example(row["seed"]).edit.inverse_instruction
        assert e.source == str(tmp_path.resolve() / row["edited_image"])
        assert e.target == str(tmp_path.resolve() / row["input_image"])


@pytest.mark.parametrize("instruction, caption, inverse", [
    ("add a dog", None, "remove the dog"),
    ("Add an apple to the table.", None, "remove the apple from the table"),
    ("add fireworks to the sky", None, "remove the fireworks from the sky"),
    ("add a small red circle at the top left", None, "remove the small red circle at the top left"),
    ("remove the red circle", None, "add a red circle"),
    ("get rid of the umbrella", None, "add an umbrella"),
    ("remove the trees", None, "add trees"),
    ("delete the dog from the sofa", None, "add a dog to the sofa"),
    ("make the small circle bigger", None, "make the large circle smaller"),
    ("shrink the square at the top", None, "make the square at the top bigger"),
    ("make the red circle blue", None, "make the blue circle red"),
    ("change the colour of the red square to green", None, "make the green square red"),
    ("turn the circle green", "a small red circle at the top on a gray background", "make the green circle red"),
    ("make the background pink", "a large blue square in the center on a white background", "make the background white"),
    ("turn the cat into a dog", None, "turn the dog into a cat"),
    ("replace the car with a bicycle", None, "replace the bicycle with a car"),
    ("make it night", None, "make it day"),
])
def test_rule_based_inverter(instruction, caption, inverse):
    assert invert_instruction(instruction, caption) == inverse


@pytest.mark.parametrize("instruction, caption", [
    ("make it look like a van gogh painting", None),
    ("move the circle to the top", None),  # where it was is not in the text
    ("turn the circle green", None),  # its old colour is unknown
    ("turn the circle green", "a red circle and a blue circle"),  # ambiguous
    ("make the background pink", None),
    ("remove the background", None),
    ("add it", None),
    ("make the red circle red", None),
    ("", None),
    ("add more clouds", None),  # amounts: "remove the more clouds" would be wrong
    ("remove some of the trees", None),
    ("remove all the people", None),
    ("add a dog and a cat", None),  # lists
    ("make the cat black and white", None),
    ("turn the dog into a cat in the style of picasso", None),
])
def test_rule_based_inverter_leaves_out_what_it_cannot_invert(instruction, caption):
    assert invert_instruction(instruction, caption) is None


def test_rule_based_inverter_agrees_with_the_toy_world():
    """Background changes invert exactly; resizes invert in the right direction."""
    for seed in range(40):
        ex = toy.sample_example(seed, kind="background")
        assert invert_instruction(ex.edit.instruction, ex.edit.source.caption()) == ex.edit.inverse_instruction
        ex = toy.sample_example(seed, kind="resize")
        ours = invert_instruction(ex.edit.instruction)
        smaller = any(w in ex.edit.inverse_instruction for w in ("smaller", "shrink", "reduce"))
        assert ours is not None and ours.endswith("smaller") == smaller, (ex.edit.instruction, ours)


# ---------------------------------------------------------------- training end to end
def _write_rewards(folder: Path) -> dict[str, float]:
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    rewards = {r["id"]: float(k) for k, r in enumerate(rows)}
    (folder / "rewards.jsonl").write_text("".join(json.dumps({"id": i, "reward": x}) + "\n" for i, x in rewards.items()))
    return rewards


def test_condition_reward_folder_samples_with_the_top_level_suffix(tiny_pipeline, tmp_path):
    from diffusers import StableDiffusionInstructPix2PixPipeline

    from hive.editor import Editor
    from hive.finetune import examples_from_jsonl

    data = tmp_path / "data"
    toy.write_dataset(data, n=5, seed=0, noise=0.5, progress=False)
    rewards = _write_rewards(data)  # from `python -m hive score`: no reward model needed here
    out = tmp_path / "ft"
    res = run_finetune(tiny_pipeline, [data], out, FinetuneConfig(method="condition", cycle=True, steps=2, batch_size=2,
                                                                   warmup_steps=1, ema_decay=None, checkpoint_every=100))
    assert res["by_origin"] == {"data": 5, "data-inverse": 5}
    examples = examples_from_jsonl(out / "examples.jsonl")
    for e in examples:  # inverse examples take their forward example's reward
        assert e.reward == rewards[e.id.removesuffix("~inverse")]
        assert e.prompt == e.instruction + level_suffix(e.level)
    assert {e.level for e in examples} == {1, 2, 3, 4, 5}
    info = json.loads((out / "pipeline" / "hive.json").read_text())
    assert info["reward_suffix"] == TOP
    assert info["reward_condition"]["level"] == 5 and len(info["reward_condition"]["thresholds"]) == 4
    assert info["finetune"]["method"] == "condition" and info["finetune"]["cycle"] is True
    StableDiffusionInstructPix2PixPipeline.from_pretrained(out / "pipeline")  # a standard diffusers folder
    editor = Editor(out / "pipeline", device="cpu")
    ex = toy.sample_example(1)
    result = editor.edit(ex.input_image, "make the background white", variants=1, seed=0, steps=1)
    assert result.records[0].instruction == "make the background white"
    assert result.records[0].prompt == "make the background white" + TOP

    # scripts/condition_check.py reads such a folder: attention shares over the prompt's tokens and
    # padding add up to 1 (the processor computes diffusers' attention), and the loss table pairs levels
    from tests.script_loader import load_script

    check = load_script("condition_check")
    rows = check.load_examples(out)
    components = check.load_eval_components(out / "pipeline")
    shares = check.attention_table(components, rows, 32)
    assert shares[-1][0] == "(padding)" and sum(x for _, x in shares) == pytest.approx(1.0, abs=1e-4)
    assert shares[0][0] == "<|startoftext|>" and any(tok.startswith(",") for tok, _ in shares)
    table = check.loss_table(components, rows, 2, 32, (1, 5))
    assert set(table) == {1, 5} and all(r["n"] >= 1 and np.isfinite(r["low_minus_top"]) for r in table.values())
    assert table[1]["low_minus_top"] == pytest.approx(table[1]["prompt_level_1"] - table[1]["prompt_level_5"])


def test_cli_weighted_from_db_and_data_with_a_reward_model(tiny_pipeline, hive: HiveEnv, tmp_path, capsys):
    from hive.cli import main
    from hive.finetune import examples_from_jsonl
    from hive.reward import RewardModel
    from hive.simulate import simulate
    from tests.test_reward_model import build_tiny_clip

    simulate(None, 3, variants=3, annotators=1, url=hive.url, progress=False)  # stand-in ranked variants
    clip = build_tiny_clip(tmp_path / "clip")
    reward = RewardModel.from_backbone(clip, hidden=8).save_pretrained(tmp_path / "reward")
    data = tmp_path / "data"
    toy.write_dataset(data, n=3, seed=0, progress=False)
    out = tmp_path / "ft"
    argv = ["finetune", "--method", "weighted", "--cycle", "--base", str(tiny_pipeline), "--data", str(data),
            "--from-db", "--reward", str(reward), "--out", str(out), "--steps", "2", "--batch-size", "2",
            "--no-ema", "--eta", "0.5", "--change-weight", "4", "--high-noise-bias", "1", "--min-snr-gamma", "0",
            "--cross-attention-lr-scale", "3", "--text-layers", "1", "--json"]
    assert main(argv) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["by_origin"] == {"data": 3, "data-inverse": 3, "db": 9, "db-inverse": 9}  # toy requests invert exactly
    examples = examples_from_jsonl(out / "examples.jsonl")
    assert np.mean([e.weight for e in examples]) == pytest.approx(1.0)
    assert all(e.reward is not None and e.prompt == e.instruction for e in examples)
    info = json.loads((out / "pipeline" / "hive.json").read_text())
    assert "reward_suffix" not in info and info["finetune"]["method"] == "weighted"
    assert info["finetune"]["weights"]["eta"] == 0.5
    trained = info["finetune"]["config"]  # the toy recipe's loss options reach the trainer's config
    assert trained["sft"] == {"change_weight": 4.0, "high_noise_bias": 1.0, "cross_attention_lr_scale": 3.0,
                              "text_layers": 1}
    assert trained["min_snr_gamma"] is None
    sft_config = json.loads((out / "config.json").read_text())  # the SFT trainer's
    assert sft_config["cross_attention_lr_scale"] == 3.0 and sft_config["text_layers"] == 1
    grown = json.loads((out / "pipeline" / "text_encoder" / "config.json").read_text())["num_hidden_layers"]
    assert grown == json.loads((tiny_pipeline / "text_encoder" / "config.json").read_text())["num_hidden_layers"] + 1
    assert (out / "rankings" / "summary.json").exists()  # the store snapshot a resumed run reuses
    # bad input: a clear error, exit status 2
    assert main(["finetune", "--method", "weighted", "--base", str(tiny_pipeline), "--from-db",
                 "--out", str(tmp_path / "x")]) == 2
    assert "--reward" in capsys.readouterr().err
    assert main(["finetune", "--method", "condition", "--base", str(tiny_pipeline), "--data", str(data),
                 "--out", str(tiny_pipeline / "sub")]) == 2
    assert "overlaps the base" in capsys.readouterr().err
    # a bad data folder: a clear error, and no half-made run folder (no ranking snapshot a rerun would reuse)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metadata.jsonl").write_text(json.dumps({"input_image": "a.png", "edit_prompt": "add a dog"}) + "\n")
    fresh, existing = tmp_path / "fresh", tmp_path / "existing"
    existing.mkdir()
    for run_dir in (fresh, existing):
        argv_bad = [*argv[:argv.index("--data") + 1], str(bad), *argv[argv.index("--data") + 2:]]
        argv_bad[argv_bad.index("--out") + 1] = str(run_dir)
        assert main(argv_bad) == 2
        assert "missing columns ['edited_image']" in capsys.readouterr().err
    assert not fresh.exists() and list(existing.iterdir()) == []
    # the finished run's pipeline, once registered (served), is never written again by a rerun
    from hive import registry

    before = {p.name: p.read_bytes() for p in (out / "pipeline").rglob("*") if p.is_file()}
    registry.ensure_registered(out / "pipeline", "editor", promote_if_none=True)
    assert main(argv) == 2
    assert "would overwrite the" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (out / "pipeline").rglob("*") if p.is_file()} == before
