"""The SFT trainer: it learns, it resumes exactly, and it starts from an SD-1.5-shaped UNet."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import UNet2DConditionModel

from hive import toy
from hive.data import FolderTriplets, ToyTriplets, parse_kind_weights
from hive.train_sft import (SFTConfig, add_text_layers, expand_conv_in, export_checkpoint, load_components,
                            sft_loss, train_sft)
from hive.zoo import sd15_unet


def fixed_loss(pipeline_dir, data, unet=None) -> float:
    vae, text_encoder, tokenizer, sched, loaded = load_components(pipeline_dir)
    unet = unet or loaded
    batch = data.batch(10_000, 8)
    losses = [sft_loss(unet, vae, text_encoder, tokenizer, sched, batch, torch.Generator().manual_seed(s), None).item()
              for s in range(4)]
    return sum(losses) / len(losses)


def test_loss_goes_down_on_tiny_data(tiny_pipeline, tmp_path):
    from hive import toy

    data_dir = tmp_path / "data"
    toy.write_dataset(data_dir, n=8, seed=0, progress=False)
    data = FolderTriplets(data_dir, resolution=32)
    before = fixed_loss(tiny_pipeline, data)
    out = train_sft(tiny_pipeline, data, tmp_path / "run",
                    SFTConfig(steps=60, batch_size=8, lr=2e-3, warmup_steps=1, ema_decay=None, checkpoint_every=1000))
    after = fixed_loss(out, data)
    assert after < 0.8 * before, (before, after)
    log = [json.loads(line) for line in (tmp_path / "run" / "loss.jsonl").read_text().splitlines()]
    assert log and log[-1]["step"] == 50


def test_resume_continues_exactly_where_it_stopped(tiny_pipeline, tmp_path):
    data = ToyTriplets(resolution=32)
    config = dict(batch_size=2, lr=1e-3, warmup_steps=1, checkpoint_every=2)
    straight = train_sft(tiny_pipeline, data, tmp_path / "a", SFTConfig(steps=4, **config))
    train_sft(tiny_pipeline, data, tmp_path / "b", SFTConfig(steps=2, **config))  # "crash" after step 2
    resumed = train_sft(tiny_pipeline, data, tmp_path / "b", SFTConfig(steps=4, **config))
    a = UNet2DConditionModel.from_pretrained(straight, subfolder="unet").state_dict()
    b = UNet2DConditionModel.from_pretrained(resumed, subfolder="unet").state_dict()
    base = UNet2DConditionModel.from_pretrained(tiny_pipeline, subfolder="unet").state_dict()
    assert any(not torch.equal(a[k], base[k]) for k in a)  # it trained
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_cross_attention_lr_scale_sets_how_fast_the_text_layers_learn(tiny_pipeline, tmp_path):
    data = ToyTriplets(resolution=32)
    base = UNet2DConditionModel.from_pretrained(tiny_pipeline, subfolder="unet").state_dict()

    def moved(scale: float, name: str) -> tuple[float, float]:
        """Mean absolute change of the cross-attention and of the other weights after 3 steps."""
        config = SFTConfig(steps=3, batch_size=2, lr=1e-3, warmup_steps=1, ema_decay=None, checkpoint_every=1000,
                           cross_attention_lr_scale=scale)
        out = UNet2DConditionModel.from_pretrained(train_sft(tiny_pipeline, data, tmp_path / name, config),
                                                   subfolder="unet").state_dict()
        change = {k: (out[k].float() - base[k].float()).abs().mean().item() for k in base
                  if out[k].shape == base[k].shape and k.endswith("weight")}
        cross = [v for k, v in change.items() if ".attn2." in k]
        rest = [v for k, v in change.items() if ".attn2." not in k]
        assert cross and rest
        return sum(cross) / len(cross), sum(rest) / len(rest)

    frozen_cross, rest_a = moved(0.0, "frozen")
    assert frozen_cross == 0.0 and rest_a > 0  # scale 0: the text layers stay put, the rest trains
    same_cross, _ = moved(1.0, "same")
    fast_cross, _ = moved(10.0, "fast")
    assert fast_cross > 3 * same_cross > 0


def test_added_text_layers_start_as_the_identity(tiny_pipeline):
    from transformers import CLIPTextModel, CLIPTokenizer

    text_encoder = CLIPTextModel.from_pretrained(tiny_pipeline, subfolder="text_encoder")
    tokenizer = CLIPTokenizer.from_pretrained(tiny_pipeline, subfolder="tokenizer")
    grown = add_text_layers(text_encoder, 2)
    assert grown.config.num_hidden_layers == text_encoder.config.num_hidden_layers + 2
    ids = tokenizer(["make the red circle blue", ""], padding="max_length", max_length=tokenizer.model_max_length,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(grown(ids)[0], text_encoder(ids)[0])
        layer = grown.encoder.layers[-1]
        torch.nn.init.normal_(layer.mlp.fc2.weight)  # once the new layer's output is not zero, it mixes the tokens
        assert not torch.allclose(grown(ids)[0], text_encoder(ids)[0])


def test_text_layers_train_with_the_unet_and_ship_in_the_pipeline(tiny_pipeline, tmp_path):
    from transformers import CLIPTextModel

    data = ToyTriplets(resolution=32)
    base = CLIPTextModel.from_pretrained(tiny_pipeline, subfolder="text_encoder").state_dict()
    config = SFTConfig(steps=3, batch_size=2, lr=1e-3, warmup_steps=1, ema_decay=0.9, checkpoint_every=3,
                       text_layers=1)
    pipeline = train_sft(tiny_pipeline, data, tmp_path / "run", config)
    trained = CLIPTextModel.from_pretrained(pipeline, subfolder="text_encoder")
    n = trained.config.num_hidden_layers - 1  # the added layer's index
    state = trained.state_dict()
    for k, v in base.items():  # the base encoder stays frozen
        torch.testing.assert_close(state[k], v)
    added = {k: v for k, v in state.items() if f"encoder.layers.{n}." in k}
    assert added and sum(v.abs().sum() for k, v in added.items() if k.endswith("mlp.fc2.weight")) > 0  # it learned
    # the checkpoint exports the same pipeline (EMA over the UNet and the text layer alike)
    exported = export_checkpoint(tmp_path / "run", tmp_path / "exported")
    again = CLIPTextModel.from_pretrained(exported, subfolder="text_encoder").state_dict()
    for k, v in state.items():
        torch.testing.assert_close(again[k], v)
    with pytest.raises(ValueError, match="text_layers"):
        train_sft(tiny_pipeline, data, tmp_path / "bad", SFTConfig(steps=1, text_layers=-1))
    assert not (tmp_path / "bad").exists()


def test_sd15_shaped_unet_gets_zeroed_source_channels():
    unet = sd15_unet(in_channels=4, tiny=True)
    before = unet.conv_in.weight.detach().clone()
    expand_conv_in(unet, 8)
    assert unet.conv_in.in_channels == 8 and unet.config.in_channels == 8
    assert torch.equal(unet.conv_in.weight[:, :4], before)
    assert torch.count_nonzero(unet.conv_in.weight[:, 4:]) == 0


def test_sft_trains_from_an_sd15_shaped_text_to_image_unet(tiny_pipeline, tmp_path):
    unet = sd15_unet(in_channels=4, tiny=True)
    out = train_sft(tiny_pipeline, ToyTriplets(resolution=32), tmp_path / "sd15",
                    SFTConfig(steps=2, batch_size=2, ema_decay=None, checkpoint_every=1000), unet_init=unet)
    loaded = UNet2DConditionModel.from_pretrained(out, subfolder="unet")
    assert loaded.config.in_channels == 8 and len(loaded.config.block_out_channels) == 4


def test_change_map_weights_changed_latent_cells_and_keeps_mean_one():
    from hive.data import TripletBatch
    from hive.train_sft import change_map

    source = -torch.ones(2, 3, 16, 16)
    edited = source.clone()
    edited[0, :, 0:4, 0:4] = 1.0  # example 0: one 4x4 patch changed; example 1: nothing changed
    w = change_map(TripletBatch(source, edited, ["a", "b"]), torch.Size((4, 4)), change_weight=4.0)
    assert w.shape == (2, 1, 4, 4)
    assert torch.allclose(w.mean(dim=(2, 3)), torch.ones(2, 1))
    assert w[0, 0, 0, 0] == w[0].max() and w[0, 0, 0, 0] > 4 * w[0, 0, 3, 3]
    assert torch.allclose(w[1], torch.ones(1, 4, 4))


def test_time_budget_stops_at_a_checkpoint_and_a_rerun_continues(tiny_pipeline, tmp_path):
    data = ToyTriplets(resolution=32)
    config = dict(batch_size=2, lr=1e-3, warmup_steps=1, checkpoint_every=100)
    out = tmp_path / "run"
    train_sft(tiny_pipeline, data, out, SFTConfig(steps=5, max_minutes=0.0, **config))  # budget spent after step 1
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-1"]
    assert (out / "pipeline" / "model_index.json").exists()
    train_sft(tiny_pipeline, data, out, SFTConfig(steps=5, **config))
    assert (out / "checkpoints" / "step-5").exists()


def test_high_noise_bias_draws_noisier_timesteps(tiny_pipeline):
    vae, text_encoder, tokenizer, scheduler, unet = load_components(tiny_pipeline)
    batch = ToyTriplets(resolution=32).batch(0, 64)
    seen = {}
    real_unet = unet

    def spy(x, t, text):
        seen["t"] = t
        return real_unet(x, t, text)

    for bias in (0.0, 3.0):
        sft_loss(spy, vae, text_encoder, tokenizer, scheduler, batch, torch.Generator().manual_seed(0), None,
                 high_noise_bias=bias)
        seen[bias] = seen["t"].float().mean().item()
    assert seen[0.0] < 650 < seen[3.0]  # uniform: mean ~500; bias 3: t = T * u**(1/4), mean ~800


def test_min_snr_weighting_stays_finite_on_a_zero_terminal_snr_schedule(tiny_pipeline):
    vae, text_encoder, tokenizer, scheduler, unet = load_components(tiny_pipeline)
    assert scheduler.config.rescale_betas_zero_snr  # the toy schedule: alpha_bar(T) = 0
    batch = ToyTriplets(resolution=32).batch(0, 8)
    for prediction_type in ("v_prediction", "epsilon"):
        scheduler.register_to_config(prediction_type=prediction_type)
        loss = sft_loss(unet, vae, text_encoder, tokenizer, scheduler, batch, torch.Generator().manual_seed(0), 5.0,
                        high_noise_bias=1e6)  # t = T * u ** 1e-6: every t is the last one, snr = 0
        assert torch.isfinite(loss)


def test_lr_decay_cools_linearly_to_zero_over_the_last_steps():
    from hive.train_sft import lr_factor

    flat = SFTConfig(steps=100, warmup_steps=10)
    assert lr_factor(0, flat) == pytest.approx(0.1) and lr_factor(99, flat) == 1.0
    cooled = SFTConfig(steps=100, warmup_steps=10, decay_steps=40)
    assert lr_factor(59, cooled) == 1.0  # still flat before the cooldown
    assert lr_factor(80, cooled) == pytest.approx(0.5)
    assert lr_factor(100, cooled) == 0.0
    assert lr_factor(5, cooled) == pytest.approx(0.6)  # warmup still rules early on


def test_kind_weights_draw_kinds_unevenly_and_deterministically():
    data = ToyTriplets(resolution=32, kind_weights={"resize": 5.0, "background": 0.0})
    kinds = [data.kind_for(s) for s in range(3000)]
    share = {k: kinds.count(k) / len(kinds) for k in toy.EDIT_KINDS}
    assert abs(share["resize"] - 5 / 9) < 0.04  # weights 5 + 4 x 1 + 0
    assert share["background"] == 0.0
    assert abs(share["add"] - 1 / 9) < 0.03
    a, b = data.batch(7, 6), data.batch(7, 6)
    assert a.prompts == b.prompts and torch.equal(a.edited, b.edited)
    assert a.prompts != ToyTriplets(resolution=32).batch(7, 6).prompts  # the plain stream differs
    assert ToyTriplets(resolution=32).kind_for(123) is None


def test_kind_weights_parse_and_refuse_bad_text():
    assert parse_kind_weights("resize=3, add=2") == {"resize": 3.0, "add": 2.0}
    assert parse_kind_weights("") == {}
    for bad in ("resize", "grow=2", "add=x", "add=-1", "add=nan", "add=inf",
                "add=0,remove=0,recolour=0,move=0,resize=0,background=0"):
        with pytest.raises(ValueError):
            parse_kind_weights(bad)


def test_pixel_loss_decodes_the_clean_latent_estimate_and_fades_with_noise(tiny_pipeline):
    from hive.train_sft import pixel_loss, training_target

    vae, text_encoder, tokenizer, scheduler, unet = load_components(tiny_pipeline)
    batch = ToyTriplets(resolution=32).batch(0, 4)
    with torch.no_grad():
        latents = vae.encode(batch.edited).latent_dist.mode() * vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
        changed = (batch.source - batch.edited).abs().amax(dim=1, keepdim=True) > 0.05
        region = torch.nn.functional.max_pool2d(changed.float(), 5, stride=1, padding=2)
        # the decoder's own error on the target, where the loss looks: what a perfect prediction leaves
        recon = vae.decode(latents / vae.config.scaling_factor).sample
        recon_err = ((recon - batch.edited).pow(2).mean(1, keepdim=True) * region).sum((1, 2, 3)) / region.sum((1, 2, 3))
        for t in (100, 600):
            timesteps = torch.full((4,), t)
            noisy = scheduler.add_noise(latents, noise, timesteps)
            perfect = training_target(scheduler, latents, noise, timesteps)  # the exact v
            alpha = scheduler.alphas_cumprod[t].item()
            assert torch.allclose(pixel_loss(vae, scheduler, batch, noisy, perfect, timesteps),
                                  alpha * recon_err, rtol=1e-3, atol=1e-5)
            # counted only where alpha_bar_t reaches min_signal
            gated = pixel_loss(vae, scheduler, batch, noisy, perfect, timesteps, min_signal=0.5)
            assert torch.allclose(gated, alpha * recon_err if alpha >= 0.5 else torch.zeros(4), rtol=1e-3, atol=1e-5)
        assert scheduler.alphas_cumprod[100] > 0.5 > scheduler.alphas_cumprod[600]  # both cases above ran
        last = torch.full((4,), scheduler.config.num_train_timesteps - 1)  # zero terminal SNR: alpha_bar = 0
        assert pixel_loss(vae, scheduler, batch, scheduler.add_noise(latents, noise, last),
                          torch.randn_like(latents), last).abs().max() < 1e-6
    # in the training loss: it adds to the latent loss, and its own gradient reaches the UNet
    vae.requires_grad_(False)  # as train_sft does
    with_pixels = sft_loss(unet, vae, text_encoder, tokenizer, scheduler, batch, torch.Generator().manual_seed(0),
                           None, pixel_loss_weight=2.0)
    without = sft_loss(unet, vae, text_encoder, tokenizer, scheduler, batch, torch.Generator().manual_seed(0), None)
    assert with_pixels.item() > without.item()
    (pixel_grad,) = torch.autograd.grad(with_pixels - without, unet.conv_out.weight)
    assert pixel_grad.abs().sum() > 0
