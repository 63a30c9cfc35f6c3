"""The paper's experiment at --scale tiny: every step runs and the report has what it promises."""

from __future__ import annotations

import json

import pytest

from tests.test_reward_model import build_tiny_clip


def test_paper_experiment_tiny_end_to_end(tiny_pipeline, tmp_path, capsys, monkeypatch):
    from hive.cli import main

    clip = build_tiny_clip(tmp_path / "clip")
    out, docs = tmp_path / "exp", tmp_path / "docs"
    argv = ["experiment", "paper", "--scale", "tiny", "--base", str(tiny_pipeline), "--clip", str(clip),
            "--out", str(out), "--docs", str(docs), "--json"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    models = {"baseline (noisy SFT)", "clean SFT (upper bound)", "hive-condition", "hive-weighted",
              "no-reward", "condition-no-cycle", "condition-10pct", "condition-50pct", "condition-text-layer",
              "condition-triplets-text-layer", "no-reward-triplets-text-layer"}
    assert set(summary["success"]) == models
    assert set(summary["pairwise_vs_baseline"]) == models - {"baseline (noisy SFT)"}
    report = json.loads((out / "report.json").read_text())
    assert set(report["tradeoff"]) == {"baseline (noisy SFT)", "clean SFT (upper bound)", "hive-condition",
                                       "hive-weighted"}
    runs = report["runs"]
    assert runs["condition-no-cycle"]["by_origin"].keys() == {"data", "db"}  # no inverses without cycle
    assert runs["hive-condition"]["examples"] > runs["condition-50pct"]["examples"] > runs["condition-10pct"]["examples"]
    assert runs["no-reward"]["examples"] == runs["hive-condition"]["examples"]  # the control: same data
    triplets = runs["condition-triplets-text-layer"]  # the scored triplets and their inverses only
    assert triplets["by_origin"].keys() == {"data", "data-inverse"}
    assert triplets["by_origin"] == {k: v for k, v in runs["hive-condition"]["by_origin"].items() if k.startswith("data")}
    assert runs["no-reward-triplets-text-layer"]["by_origin"] == triplets["by_origin"]
    plain = json.loads((out / "no-reward" / "pipeline" / "hive.json").read_text())
    assert "reward_suffix" not in plain and plain["finetune"]["method"] == "plain"
    cond = json.loads((out / "hive-condition" / "pipeline" / "hive.json").read_text())
    assert cond["reward_suffix"] == ", image quality is five out of five"
    for name in ("report.md", "tradeoff.png", "grid.png"):
        assert (docs / name).exists(), name
    assert "Blind pairwise" in (docs / "report.md").read_text()
    ablations = (out / "report.md").read_text().split("## Ablations")[1].split("##")[0]
    rows = [line.split(" | ")[0].strip("| ") for line in ablations.splitlines() if line.startswith("| ")][1:]
    assert rows == ["hive-condition", "condition-text-layer", "condition-triplets-text-layer", "condition-50pct",
                    "condition-10pct", "condition-no-cycle", "no-reward", "no-reward-triplets-text-layer"]
    assert "| condition-triplets-text-layer | condition | on | 100.0% | triplets | 1 |" in ablations
    assert "| hive-condition | condition | on | 100.0% | triplets + ranked | 0 |" in ablations
    layered = json.loads((out / "condition-text-layer" / "pipeline" / "text_encoder" / "config.json").read_text())
    plain_text = json.loads((out / "hive-condition" / "pipeline" / "text_encoder" / "config.json").read_text())
    assert layered["num_hidden_layers"] == plain_text["num_hidden_layers"] + 1
    assert f"| {runs['condition-10pct']['examples']} |" in ablations
    paired = report["paired_vs_baseline"]
    assert paired.keys() == report["pairwise_vs_baseline"].keys()
    assert all(p["wins"] + p["ties"] + p["losses"] == p["n"] == report["scale"]["eval_n"] for p in paired.values())
    ceiling = report["pairwise_ceiling"]  # the clean target against the baseline's judged edits
    assert ceiling["n"] == report["scale"]["eval_n"]
    assert ceiling["win_rate"] + ceiling["tie_rate"] + ceiling["loss_rate"] == pytest.approx(1.0)
    assert "| the clean target (ceiling; expected" in (out / "report.md").read_text()
    # a rerun skips every finished step (nothing is trained again)
    import hive.train_sft as sft

    monkeypatch.setattr(sft, "train_sft", lambda *a, **k: (_ for _ in ()).throw(AssertionError("retrained")))
    assert main(argv) == 0

    # the experiment's editors ship into one folder with one copy of the shared components
    dest = tmp_path / "models" / "toy-paper"
    assert main(["experiment", "ship", "--out", str(out), "--dest", str(dest)]) == 0
    assert sorted(p.name for p in dest.iterdir()) == ["hive-condition", "hive-weighted", "noisy-sft", "shared"]
    import torch
    from diffusers import StableDiffusionInstructPix2PixPipeline

    unets = {}
    trained_as = {"noisy-sft": "baseline (noisy SFT)", "hive-condition": "condition-triplets-text-layer"}
    for name in ("noisy-sft", "hive-condition", "hive-weighted"):
        for component in ("vae", "tokenizer", "scheduler"):
            assert (dest / name / component).is_symlink(), (name, component)
        # the condition editor's text encoder has its trained layer: its own copy, not the shared one
        assert (dest / name / "text_encoder").is_symlink() == (name != "hive-condition"), name
        pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(dest / name, dtype=torch.float32)
        trained = StableDiffusionInstructPix2PixPipeline.from_pretrained(
            report["models"][trained_as.get(name, name)], dtype=torch.float32)
        for part in ("unet", "text_encoder"):  # the shipped fp16 weights are the trained ones
            for mine, theirs in zip(getattr(pipe, part).parameters(), getattr(trained, part).parameters(), strict=True):
                torch.testing.assert_close(mine, theirs.half().float())
        unets[name] = torch.cat([p.flatten() for p in pipe.unet.parameters()])
    assert not torch.equal(unets["noisy-sft"], unets["hive-condition"])
    assert json.loads((dest / "hive-condition" / "hive.json").read_text())["reward_suffix"] == cond["reward_suffix"]


def test_ship_keeps_a_component_that_differs_in_the_editors_folder(tiny_pipeline, tmp_path):
    import torch
    from diffusers import StableDiffusionInstructPix2PixPipeline

    from hive.zoo import ship_editors

    other = StableDiffusionInstructPix2PixPipeline.from_pretrained(tiny_pipeline, dtype=torch.float32)
    with torch.no_grad():
        next(other.text_encoder.parameters()).add_(1.0)  # as trained text layers would change it
    other.save_pretrained(tmp_path / "other")
    dest = tmp_path / "models" / "toy-paper"
    ship_editors({"a": tiny_pipeline, "b": tmp_path / "other"}, dest)
    assert (dest / "a" / "text_encoder").is_symlink() and (dest / "b" / "vae").is_symlink()
    assert (dest / "b" / "text_encoder").is_dir() and not (dest / "b" / "text_encoder").is_symlink()
    shipped = StableDiffusionInstructPix2PixPipeline.from_pretrained(dest / "b", dtype=torch.float32)
    torch.testing.assert_close(next(shipped.text_encoder.parameters()),
                               next(other.text_encoder.parameters()).half().float())
    # a failed ship leaves the installed folder as it was
    before = sorted(str(p.relative_to(dest)) for p in dest.rglob("*"))
    (tmp_path / "not-a-pipeline").mkdir()
    with pytest.raises(OSError, match="model_index.json"):
        ship_editors({"a": tiny_pipeline, "broken": tmp_path / "not-a-pipeline"}, dest)
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*")) == before
    assert sorted(p.name for p in dest.parent.iterdir()) == ["toy-paper"]


def test_fresh_unet_base_keeps_the_sampling_settings_and_only_resets_the_unet(tiny_pipeline, tmp_path):
    import shutil

    import torch
    from diffusers import StableDiffusionInstructPix2PixPipeline

    from hive.experiment import fresh_unet_base

    base = tmp_path / "base"
    shutil.copytree(tiny_pipeline, base)
    (base / "hive.json").write_text(json.dumps({"sampling": {"guidance": 2.5, "mask_threshold": 0.35}}))
    fresh = fresh_unet_base(base, tmp_path / "fresh", seed=1)
    assert json.loads((fresh / "hive.json").read_text()) == json.loads((base / "hive.json").read_text())
    a = StableDiffusionInstructPix2PixPipeline.from_pretrained(base, dtype=torch.float32)
    b = StableDiffusionInstructPix2PixPipeline.from_pretrained(fresh, dtype=torch.float32)
    assert all(torch.equal(x, y) for x, y in zip(a.vae.parameters(), b.vae.parameters()))
    assert not all(torch.equal(x, y) for x, y in zip(a.unet.parameters(), b.unet.parameters()))
