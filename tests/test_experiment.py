"""The paper's experiment at --scale tiny: every step runs and the report has what it promises."""

from __future__ import annotations

import json

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
              "condition-no-cycle", "condition-10pct", "condition-50pct"}
    assert set(summary["success"]) == models
    assert set(summary["pairwise_vs_baseline"]) == models - {"baseline (noisy SFT)"}
    report = json.loads((out / "report.json").read_text())
    assert set(report["tradeoff"]) == {"baseline (noisy SFT)", "clean SFT (upper bound)", "hive-condition",
                                       "hive-weighted"}
    runs = report["runs"]
    assert runs["condition-no-cycle"]["by_origin"].keys() == {"data", "db"}  # no inverses without cycle
    assert runs["hive-condition"]["examples"] > runs["condition-50pct"]["examples"] > runs["condition-10pct"]["examples"]
    cond = json.loads((out / "hive-condition" / "pipeline" / "hive.json").read_text())
    assert cond["reward_suffix"] == ", image quality is five out of five"
    for name in ("report.md", "tradeoff.png", "grid.png"):
        assert (docs / name).exists(), name
    assert "Blind pairwise" in (docs / "report.md").read_text()
    # a rerun skips every finished step (nothing is trained again)
    import hive.train_sft as sft

    monkeypatch.setattr(sft, "train_sft", lambda *a, **k: (_ for _ in ()).throw(AssertionError("retrained")))
    assert main(argv) == 0
