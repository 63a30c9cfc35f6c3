"""The decoder fine-tune: latents sampled by the editor, resumable, and a decoder that changes
while the encoder (the latent space the UNet was trained on) stays exactly as it was."""

from __future__ import annotations

import json
import shutil

import numpy as np
import torch
from diffusers import AutoencoderKL, StableDiffusionInstructPix2PixPipeline

from hive import toy
from hive.train_decoder import finetune_decoder, load_latents, sample_editor_latents


def test_sampled_latents_are_the_editors_and_resume(tiny_pipeline, tmp_path):
    folder = tmp_path / "latents"
    paths = sample_editor_latents(tiny_pipeline, folder, n=5, seed=123, batch=2, device="cpu")
    data = load_latents(folder)
    assert data["seeds"] == [123, 124, 125, 126, 127]
    assert data["latents"].shape == (5, 4, 16, 16) and data["targets"].shape == (5, 64, 64, 3)
    assert torch.equal(data["targets"][2], torch.from_numpy(np.asarray(toy.sample_example(125).clean_image)))
    assert data["kinds"][0] == toy.sample_example(123).edit.kind
    # a chunk on disk is not sampled again
    before = paths[0].stat().st_mtime_ns
    sample_editor_latents(tiny_pipeline, folder, n=5, seed=123, batch=2, device="cpu")
    assert paths[0].stat().st_mtime_ns == before
    # the latents are the pipeline's own final latents, scaled back for the decoder (stored in fp16)
    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(tiny_pipeline, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    example = toy.sample_example(124)
    z = pipe(prompt=[example.edit.instruction], image=[example.input_image], num_inference_steps=20,
             guidance_scale=7.5, image_guidance_scale=1.5, generator=[torch.Generator().manual_seed(124)],
             output_type="latent").images
    expected = z[0] / pipe.vae.config.scaling_factor
    assert torch.allclose(data["latents"][1].float(), expected, rtol=2e-3, atol=2e-3)


def test_finetune_changes_the_decoder_keeps_the_encoder_and_resumes(tiny_pipeline, tmp_path):
    folder = tmp_path / "latents"
    sample_editor_latents(tiny_pipeline, folder, n=6, seed=7, batch=3, device="cpu")
    kwargs = dict(steps=4, batch_size=4, lr=1e-3, crop=None, held_out=1, checkpoint_every=2)
    path = finetune_decoder(tiny_pipeline, folder, tmp_path / "run", **kwargs)
    old = AutoencoderKL.from_pretrained(tiny_pipeline / "vae")
    new = AutoencoderKL.from_pretrained(path)
    for (name, p), q in zip(old.encoder.named_parameters(), new.encoder.parameters()):
        assert torch.equal(p, q), name
    assert any(not torch.equal(p, q) for p, q in zip(old.decoder.parameters(), new.decoder.parameters()))
    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(tmp_path / "run" / "pipeline")
    assert all(torch.equal(p, q) for p, q in zip(pipe.vae.decoder.parameters(), new.decoder.parameters()))
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["held_out_edits"] == 1 and metrics["held_out_judge_after"]["n"] == 1

    # stopped after the checkpoint at step 2 and started again: the same decoder as one whole run
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "run" / "checkpoints", resumed / "checkpoints")
    assert [p.name for p in (resumed / "checkpoints").iterdir()] == ["step-2"]
    again = AutoencoderKL.from_pretrained(finetune_decoder(tiny_pipeline, folder, resumed, **kwargs))
    for (name, p), q in zip(new.decoder.named_parameters(), again.decoder.parameters()):
        assert torch.allclose(p, q, atol=1e-6), name
