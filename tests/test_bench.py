"""The benchmarks run end to end on tiny models and report what they promise: the keys scripts
read (device, reference_s, ours_s, speedup, ...), the output agreement, and a recorded JSON."""

from __future__ import annotations

import json

import pytest

EDIT_KEYS = ("device", "reference_s", "ours_s", "speedup", "date", "commit", "dirty", "config", "threads",
             "load_avg_start", "outputs_agree", "max_abs_pixel_diff", "ours_first_call_s", "unet_gflop_per_eval",
             "ours_unet_tflops", "matmul_peak_tflops", "ours_share_of_peak", "peak_rss_GiB", "fast_options")


@pytest.fixture()
def results_dir(tmp_path, monkeypatch):
    import hive.bench

    monkeypatch.setattr(hive.bench, "RESULTS_DIR", tmp_path / "results")
    return tmp_path / "results"


def test_bench_edit_on_a_tiny_pipeline(tiny_pipeline, results_dir):
    from hive.bench import bench_edit

    result = bench_edit(str(tiny_pipeline), variants=2, steps=2, repeats=1)
    for key in EDIT_KEYS:
        assert key in result, key
    assert result["outputs_agree"] and result["max_abs_pixel_diff"] <= 2 / 255 + 1e-6
    assert result["speedup"] == pytest.approx(result["reference_s"] / result["ours_s"], rel=1e-2)
    assert result["unet_gflop_per_eval"] > 0 and result["matmul_peak_tflops"] > 0
    recorded = json.loads(open(result["recorded"]).read())
    assert recorded["speedup"] == result["speedup"] and recorded["commit"] == result["commit"]
    assert result["recorded"].startswith(str(results_dir))


def test_bench_edit_sd15_layout_and_train(results_dir):
    from hive.bench import bench_edit, bench_train

    edit = bench_edit(config="sd15-tiny", variants=1, steps=1, repeats=1, record_result=False)
    assert edit["config"] == "sd15-tiny" and edit["resolution"] == 64 and edit["outputs_agree"]
    train = bench_train(config="sd15-tiny", batch=2, repeats=1)
    for key in ("device", "reference_s", "ours_s", "speedup", "reference_samples_per_s", "ours_samples_per_s",
                "tflop_per_step", "ours_share_of_peak", "first_loss_rel_diff"):
        assert key in train, key
    assert train["losses_agree"] and train["tflop_per_step"] > 0
    assert "train-sd15-tiny-" in train["recorded"]


def test_bench_refuses_an_unknown_config():
    from hive.bench import bench_edit

    with pytest.raises(ValueError, match="unknown benchmark config"):
        bench_edit(config="sdxl", record_result=False)


def test_cli_bench_train_json(capsys, results_dir):
    from hive.cli import main

    assert main(["bench", "train", "--config", "sd15-tiny", "--batch", "2", "--repeats", "1", "--no-record",
                 "--json"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    result = json.loads(last)
    assert result["benchmark"] == "train" and result["speedup"] > 0
    assert not list(results_dir.glob("*.json"))  # --no-record


def test_bench_edit_compares_like_for_like_and_times_the_local_blend(tiny_pipeline, tmp_path, results_dir):
    import shutil

    from hive.bench import bench_edit

    folder = tmp_path / "blended"
    shutil.copytree(tiny_pipeline, folder)
    (folder / "hive.json").write_text(json.dumps({"sampling": {"mask_threshold": 0.5}}))
    result = bench_edit(str(folder), variants=2, steps=2, repeats=1, record_result=False)
    assert result["mask_threshold"] == 0.5
    assert result["outputs_agree"]  # the compared call has no blend: same math as the pipeline
    assert result["ours_blend_s"] > 0 and len(result["ours_all_s"]) == 1
