"""The toy zoo trainers run, checkpoint, resume and save folders that load with from_pretrained."""

from __future__ import annotations

import json
import types

import torch
from diffusers import AutoencoderKL
from transformers import CLIPModel, CLIPTokenizer

from hive.tokenizer import write_tokenizer
from hive import toy
from hive.train_clip import WORD_SWAPS, caption_batch, direction_loss, edit_groups, train_clip, twin_scenes
from hive.train_vae import object_weight, random_crops, train_vae


def test_vae_trainer_saves_a_loadable_autoencoder_with_a_scaling_factor(tmp_path):
    path = train_vae(tmp_path / "vae", steps=2, batch_size=4, checkpoint_every=1)
    vae = AutoencoderKL.from_pretrained(path)
    assert vae.config.scaling_factor != 0.18215  # measured on toy latents, not SD's constant
    assert json.loads((path / "metrics.json").read_text())["steps"] == 2
    # run again with more steps: it resumes from the newest checkpoint instead of starting over
    train_vae(tmp_path / "vae", steps=3, batch_size=4, checkpoint_every=1)
    assert (tmp_path / "vae" / "checkpoints" / "step-2").exists()


def test_object_weight_boosts_objects_not_background():
    x = -torch.ones(1, 3, 8, 8)
    x[:, :, 2:4, 2:4] = 1.0
    w = object_weight(x)
    assert w[0, 0, 2, 2] == 10.0 and w[0, 0, 0, 0] == 1.0
    crops = random_crops(torch.cat([x, w], 1), 4, step=0)
    assert crops.shape == (1, 4, 4, 4)


def test_clip_trainer_saves_model_tokenizer_and_processor(tmp_path):
    tok = write_tokenizer(tmp_path / "tok")
    path = train_clip(tmp_path / "clip", tok, steps=2, batch_size=4, twins=True)
    model = CLIPModel.from_pretrained(path)
    tokenizer = CLIPTokenizer.from_pretrained(path)
    assert model.config.text_config.vocab_size == len(tokenizer)
    assert (path / "preprocessor_config.json").exists()
    metrics = json.loads((path / "metrics.json").read_text())
    assert metrics["twins"] is True and set(metrics["word_sensitivity"]) == set(WORD_SWAPS)
    assert all(v > 0 for v in metrics["word_sensitivity"].values())
    # continuing from a trained folder starts from its weights, not from a fresh model
    again = train_clip(tmp_path / "clip2", tok, steps=1, batch_size=4, lr=0.0, base=path)
    assert torch.equal(CLIPModel.from_pretrained(again).text_projection.weight, model.text_projection.weight)


def test_twin_scenes_differ_from_the_scene_in_one_attribute_of_one_object():
    import numpy as np

    rng = np.random.default_rng(0)
    for _ in range(50):
        scene = toy.random_scene(rng)
        twins = twin_scenes(scene, rng)
        assert len(twins) == 3  # moved, reshaped, resized (toy scenes leave empty cells)
        for twin in twins:
            assert twin.background == scene.background and twin.caption() != scene.caption()
            changed = [(a, b) for a, b in zip(scene.objects, twin.objects) if a != b]
            assert len(changed) == 1
            a, b = changed[0]
            assert sum(getattr(a, f) != getattr(b, f) for f in ("cell", "shape", "size", "colour")) == 1
    images, captions, groups = caption_batch(step=3, batch_size=10, twins=True)
    assert len(images) == len(captions) == 10 and captions == caption_batch(step=3, batch_size=10, twins=True)[1]
    assert groups == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]


def test_twin_loss_only_compares_inside_a_group():
    from hive.train_clip import twin_loss

    logits = torch.eye(4) * 10
    logits[0, 1] = logits[1, 0] = 15.0  # a confusion inside group 0
    logits[2, 0] = logits[0, 2] = 50.0  # across groups: must not count
    bad = twin_loss(logits, [0, 0, 1, 1])
    logits[0, 1] = logits[1, 0] = 0.0
    good = twin_loss(logits, [0, 0, 1, 1])
    assert good < 0.1 < bad
    assert twin_loss(torch.zeros(3, 3), [0, 1, 2]) == 0  # singletons: nothing to tell apart


def test_edit_groups_share_a_source_and_hold_distinct_clean_edits():
    sources, edited, instructions, captions, groups = edit_groups(step=5, batch_size=20)
    assert len(sources) == len(edited) == len(instructions) == len(captions) == len(groups) == 20
    assert instructions == edit_groups(step=5, batch_size=20)[2]  # deterministic per step
    for g in set(groups):
        rows = [i for i, x in enumerate(groups) if x == g]
        assert len(rows) >= 2 or rows[-1] == 19  # only the batch's last group may be cut short
        assert all(sources[i].tobytes() == sources[rows[0]].tobytes() for i in rows)
        assert len({instructions[i] for i in rows}) == len(rows) and len({captions[i] for i in rows}) == len(rows)
        assert all(edited[i].tobytes() != sources[i].tobytes() for i in rows)


def test_direction_loss_rewards_changes_that_point_at_their_instruction():
    torch.manual_seed(0)
    src = torch.randn(4, 8)
    text = torch.randn(4, 8)
    aligned = direction_loss(src, src + 3 * torch.nn.functional.normalize(text, dim=-1) * src.norm(dim=-1, keepdim=True),
                             text, [0, 0, 1, 1])
    shuffled = direction_loss(src, src + 3 * torch.nn.functional.normalize(text[[1, 0, 3, 2]], dim=-1)
                              * src.norm(dim=-1, keepdim=True), text, [0, 0, 1, 1])
    assert aligned < shuffled


def test_clip_trainer_on_edit_groups(tmp_path):
    tok = write_tokenizer(tmp_path / "tok")
    path = train_clip(tmp_path / "clip", tok, steps=2, batch_size=6, edits=True)
    metrics = json.loads((path / "metrics.json").read_text())
    assert metrics["edits"] is True and metrics["steps"] == 2
    assert CLIPModel.from_pretrained(path).config.projection_dim == 128


def test_decoder_only_training_keeps_the_latent_space(tmp_path):
    first = train_vae(tmp_path / "vae", steps=1, batch_size=4)
    tuned = train_vae(tmp_path / "dec", steps=2, batch_size=4, init=first, decoder_only=True)
    a, b = AutoencoderKL.from_pretrained(first), AutoencoderKL.from_pretrained(tuned)
    assert a.config.scaling_factor == b.config.scaling_factor
    for (name, p), q in zip(a.encoder.named_parameters(), b.encoder.parameters()):
        assert torch.equal(p, q), name
    assert any(not torch.equal(p, q) for p, q in zip(a.decoder.parameters(), b.decoder.parameters()))


class _IdentityAutoencoder:
    """Stands in for a perfect autoencoder (or, with `shift`, one that tints every colour)."""

    device = torch.device("cpu")

    def __init__(self, shift: float = 0.0):
        self.shift = shift

    def encode(self, x):
        mode = lambda: x  # noqa: E731
        return types.SimpleNamespace(latent_dist=types.SimpleNamespace(mode=mode))

    def decode(self, z):
        return types.SimpleNamespace(sample=z + self.shift)


def test_recon_judge_pass_is_one_for_a_perfect_autoencoder_and_zero_for_a_tinted_one():
    from hive.train_vae import recon_judge_pass

    assert recon_judge_pass(_IdentityAutoencoder(), n=20) == 1.0
    assert recon_judge_pass(_IdentityAutoencoder(shift=0.6), n=20) == 0.0  # ~75 RGB units off everywhere


def test_ship_installs_the_editor_with_its_default_sampling(tiny_pipeline, tmp_path):
    import pytest

    from hive.editor import Editor
    from hive.zoo import ship
    from tests.test_reward_model import build_tiny_clip

    clip = build_tiny_clip(tmp_path / "clip")
    models = tmp_path / "models"
    models.mkdir()
    with pytest.raises(ValueError, match="guidanse"):
        ship(tiny_pipeline, clip, models, sampling={"guidanse": 3.0})
    assert not any(models.iterdir())  # a bad setting writes nothing
    written = ship(tiny_pipeline, clip, models, sampling={"guidance": 3.0})
    info = json.loads((written["toy-editor"] / "hive.json").read_text())
    assert info["sampling"] == {"guidance": 3.0}
    assert Editor(written["toy-editor"], device="cpu").settings()[1] == 3.0
    assert CLIPModel.from_pretrained(written["toy-clip"]) is not None


def test_swap_text_encoder_keeps_the_unet_and_takes_the_clip_text_tower(tiny_pipeline, tmp_path):
    from diffusers import StableDiffusionInstructPix2PixPipeline
    from transformers import CLIPTextModel

    from hive.zoo import swap_text_encoder
    from tests.test_reward_model import build_tiny_clip

    clip = build_tiny_clip(tmp_path / "clip")
    model = CLIPModel.from_pretrained(clip)
    with torch.no_grad():  # the tiny pipeline's text encoder has the same seed and shape: make them differ
        model.text_model.embeddings.token_embedding.weight.mul_(2)
    model.save_pretrained(clip)
    dest = swap_text_encoder(tiny_pipeline, clip, tmp_path / "swapped")
    old = StableDiffusionInstructPix2PixPipeline.from_pretrained(tiny_pipeline)
    new = StableDiffusionInstructPix2PixPipeline.from_pretrained(dest)
    tower = CLIPTextModel.from_pretrained(clip)
    for name, p in new.text_encoder.state_dict().items():
        assert torch.equal(p, tower.state_dict()[name]), name
    assert not torch.equal(new.text_encoder.get_input_embeddings().weight, old.text_encoder.get_input_embeddings().weight)
    for name, p in new.unet.state_dict().items():
        assert torch.equal(p, old.unet.state_dict()[name]), name


def test_finest_attention_starts_as_the_same_unet_and_loads_as_a_pipeline(tiny_pipeline, tmp_path):
    import pytest
    from diffusers import StableDiffusionInstructPix2PixPipeline

    from hive.zoo import add_finest_attention, with_finest_attention

    old = StableDiffusionInstructPix2PixPipeline.from_pretrained(tiny_pipeline).unet.eval()
    torch.manual_seed(1)
    x, t, text = torch.randn(2, 8, 8, 8), torch.tensor(700), torch.randn(2, 7, 32)
    with torch.no_grad():
        expected = old(x, t, text).sample
    for place, cross_only in (("down", False), ("up", True), ("both", False)):
        new = add_finest_attention(old, place, cross_only).eval()
        assert new.down_blocks[0].attentions if place != "up" else not hasattr(new.down_blocks[0], "attentions")
        assert new.up_blocks[-1].attentions if place != "down" else not hasattr(new.up_blocks[-1], "attentions")
        assert sum(p.numel() for p in new.parameters()) > sum(p.numel() for p in old.parameters())
        with torch.no_grad():
            assert torch.allclose(new(x, t, text).sample, expected, atol=1e-6), place
            # the new blocks are real: once their output projection moves, so does the output
            block = new.down_blocks[0] if place != "up" else new.up_blocks[-1]
            block.attentions[0].proj_out.weight.normal_()
            assert not torch.allclose(new(x, t, text).sample, expected, atol=1e-3), place
        if cross_only:
            assert new.up_blocks[-1].attentions[0].transformer_blocks[0].only_cross_attention
    with pytest.raises(ValueError, match="already has attention"):
        add_finest_attention(add_finest_attention(old, "down"), "down")
    dest = with_finest_attention(tiny_pipeline, tmp_path / "wider", "down")
    reloaded = StableDiffusionInstructPix2PixPipeline.from_pretrained(dest).unet.eval()
    assert reloaded.config.down_block_types[0] == "CrossAttnDownBlock2D"
    with torch.no_grad():
        assert torch.allclose(reloaded(x, t, text).sample, expected, atol=1e-6)
