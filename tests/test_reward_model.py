"""The reward model: losses, pairs of partial rankings, the split, save/reload, the ViT-L-shaped path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hive import toy
from hive.reward import RewardModel
from hive.train_reward import (Ranking, RewardTrainConfig, bootstrap_lead, bradley_terry_loss, head_lr_at,
                               lead_over_annotator, lead_over_scorer, noise_free, pair_accuracy, plackett_luce_loss, single_annotator_accuracy,
                               split_by_request, train_reward, true_order_accuracy)


def build_tiny_clip(dest: Path, vit_l_shaped: bool = False) -> Path:
    """A random CLIPModel folder with the toy tokenizer and an image processor.

    `vit_l_shaped`: the layout of openai/clip-vit-large-patch14 (224 px, 14 px patches, quick_gelu,
    77 text positions, separate projection width), with tiny widths and depths."""
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTokenizer, CLIPVisionConfig

    from hive.tokenizer import write_tokenizer
    from hive.train_clip import image_processor

    torch.manual_seed(0)
    tok = CLIPTokenizer.from_pretrained(write_tokenizer(dest.parent / f"{dest.name}-tokenizer"))
    act = "quick_gelu" if vit_l_shaped else "gelu"
    text = CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=77 if vit_l_shaped else tok.model_max_length,
                          projection_dim=24 if vit_l_shaped else 16, hidden_act=act, bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    vision = CLIPVisionConfig(image_size=224 if vit_l_shaped else 32, patch_size=14 if vit_l_shaped else 8,
                              hidden_size=48 if vit_l_shaped else 32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, projection_dim=24 if vit_l_shaped else 16, hidden_act=act)
    config = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                        projection_dim=24 if vit_l_shaped else 16)
    CLIPModel(config).save_pretrained(dest)
    tok.save_pretrained(dest)
    image_processor(vision.image_size).save_pretrained(dest)
    return dest


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    return build_tiny_clip(tmp_path_factory.mktemp("clip") / "clip")


def _ranking(ranks, request_id=1, ranking_id=1, truth=None) -> Ranking:
    n = len(ranks)
    return Ranking(ranking_id, request_id, 1, True, "make it red", "src.png", list(range(n)),
                   [f"v{i}.png" for i in range(n)], list(ranks), truth)


def test_bradley_terry_prefers_the_better_item():
    pairs = [(0, 1, 1.0)]  # item 0 beat item 1
    right = bradley_terry_loss(torch.tensor([2.0, 0.0]), pairs)
    wrong = bradley_terry_loss(torch.tensor([0.0, 2.0]), pairs)
    assert right < wrong
    s = torch.tensor([0.0, 0.0], requires_grad=True)
    bradley_terry_loss(s, pairs).backward()
    assert s.grad[0] < 0 < s.grad[1]  # a gradient step raises the winner and lowers the loser


def test_tie_pulls_scores_together():
    s = torch.tensor([1.0, 0.0], requires_grad=True)
    loss = bradley_terry_loss(s, [(0, 1, 0.5)])
    loss.backward()
    assert s.grad[0] > 0 > s.grad[1]  # descending moves the higher score down, the lower up
    equal = bradley_terry_loss(torch.tensor([0.3, 0.3]), [(0, 1, 0.5)])
    assert equal < loss  # a tie is best explained by equal scores


def test_pairs_of_ties_and_partial_rankings():
    r = _ranking([1, None, 2, None])  # a top-2 ranking: items 1 and 3 unranked
    pairs = {(i, j): y for i, j, y in r.pairs()}
    assert (1, 3) not in pairs  # two unranked items are not judged
    assert pairs[(0, 1)] == 1.0 and pairs[(0, 2)] == 1.0 and pairs[(1, 2)] == 0.0 and pairs[(2, 3)] == 1.0
    tied = {(i, j): y for i, j, y in _ranking([1, 1, 2]).pairs()}
    assert tied == {(0, 1): 0.5, (0, 2): 1.0, (1, 2): 1.0}


def test_plackett_luce_prefers_the_right_order_and_handles_ties_and_unranked():
    ranks = [1, 2, 3]
    assert plackett_luce_loss(torch.tensor([3.0, 2.0, 1.0]), ranks) < plackett_luce_loss(torch.tensor([1.0, 2.0, 3.0]), ranks)
    tie = [1, 1, 2]  # symmetric in the tied pair
    a = plackett_luce_loss(torch.tensor([2.0, 1.0, 0.0]), tie)
    b = plackett_luce_loss(torch.tensor([1.0, 2.0, 0.0]), tie)
    assert torch.isclose(a, b)
    s = torch.tensor([0.0, 0.0, 0.0], requires_grad=True)
    plackett_luce_loss(s, [1, None, None]).backward()  # top-1: the ranked item must rise
    assert s.grad[0] < 0 and s.grad[1] > 0 and s.grad[2] > 0


def test_split_by_request_leaks_no_request():
    rankings = [_ranking([1, 2, 3], request_id=q, ranking_id=10 * q + a) for q in range(40) for a in range(3)]
    train, test = split_by_request(rankings, test_fraction=0.25, seed=3)
    tr, te = {r.request_id for r in train}, {r.request_id for r in test}
    assert not tr & te and tr | te == set(range(40)) and len(te) == 10
    assert len(train) + len(test) == len(rankings)
    for q in te:  # all rankings of a held-out request are held out
        assert sum(r.request_id == q for r in test) == 3


def test_accuracies_against_labels_and_truth():
    r = _ranking([1, 2, 2], truth=[0.9, 0.1, 0.5])  # annotator tied 1 and 2, truth says 2 > 1
    perfect = [np.array([4.0, 1.0, 2.0])]  # |d| of the tied pair (1) is under 1.5, the others above
    assert pair_accuracy([r], perfect)["accuracy"] == 1.0
    assert pair_accuracy([r], perfect, tie_threshold=1.5)["accuracy_with_ties"] == 1.0
    assert true_order_accuracy([r], perfect)["accuracy"] == 1.0
    assert true_order_accuracy([r], [np.array([1.0, 3.0, 2.0])])["accuracy"] == 0.0
    assert single_annotator_accuracy([r])["accuracy"] == pytest.approx(2.5 / 3)


def test_noise_free_ranking_follows_the_true_quality_with_ties():
    r = _ranking([3, 1, 2, 4], truth=[0.9, 0.2, 0.5, 0.9])  # a noisy annotator's order
    clean = noise_free(r)
    assert clean.ranks == [1, 3, 2, 1] and r.ranks == [3, 1, 2, 4]  # the original is left alone
    assert single_annotator_accuracy([clean])["accuracy"] == 1.0
    with pytest.raises(ValueError, match="no true quality"):
        noise_free(_ranking([1, 2]))


def _toy_images(n: int, size: int = 32):
    ex = toy.sample_example(n)
    return ex.input_image.resize((size, size)), ex.clean_image.resize((size, size)), ex.edit.instruction


def test_saved_model_reloads_to_the_same_scores(tiny_clip, tmp_path):
    torch.manual_seed(1)
    model = RewardModel.from_backbone(tiny_clip, hidden=16, freeze_layers=1)
    model.config.score_mean, model.config.score_std = 0.25, 2.0
    src, tgt, instr = _toy_images(3)
    before = model.score([src, src], [tgt, src], [instr, instr])
    path = model.save_pretrained(tmp_path / "reward")
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == "hive-reward" and cfg["backbone"] == str(tiny_clip)
    assert cfg["score_mean"] == 0.25 and cfg["score_std"] == 2.0 and cfg["freeze_layers"] == 1
    again = RewardModel.from_pretrained(path)
    after = again.score([src, src], [tgt, src], [instr, instr])
    np.testing.assert_allclose(before, after, rtol=1e-5, atol=1e-6)
    raw = again.score([src], [tgt], [instr], normalise=False)
    np.testing.assert_allclose((raw - 0.25) / 2.0, after[:1], rtol=1e-5, atol=1e-6)


def test_freeze_lower_layers(tiny_clip):
    m = RewardModel.from_backbone(tiny_clip, freeze_layers=1)
    for tower in (m.clip.vision_model, m.clip.text_model):
        assert not any(p.requires_grad for p in tower.embeddings.parameters())
        assert not any(p.requires_grad for p in tower.encoder.layers[0].parameters())
        assert all(p.requires_grad for p in tower.encoder.layers[1].parameters())
    assert all(p.requires_grad for p in m.head.parameters())
    m.apply_freeze(-1)
    assert not any(p.requires_grad for p in m.clip.parameters())


def _write_rankings(tmp: Path, n_requests: int, size: int) -> list[Ranking]:
    """Rankings on disk without a database: variant 0 is the clean target, then the source."""
    out = []
    for q in range(n_requests):
        ex = toy.sample_example(q)
        paths = []
        for name, img in (("src", ex.input_image), ("v0", ex.clean_image), ("v1", ex.input_image),
                          ("v2", toy.corrupt(ex.edit, np.random.default_rng(q))[0])):
            p = tmp / f"{q}_{name}.png"
            img.resize((size, size)).save(p)
            paths.append(str(p))
        out.append(Ranking(q, q, 1, True, ex.edit.instruction, paths[0], [0, 1, 2], paths[1:], [1, 2, 2],
                           [1.0, 0.5, 0.6]))
    return out


def test_vit_l_shaped_backbone_trains_saves_and_reloads(tmp_path):
    """The real-photo path (CLIP ViT-L/14 layout), tiny widths: a few steps, save, reload."""
    clip = build_tiny_clip(tmp_path / "vitl", vit_l_shaped=True)
    rankings = _write_rankings(tmp_path, 4, 48)
    cfg = RewardTrainConfig(backbone=str(clip), steps=3, batch_size=2, hidden=16, freeze_layers=1,
                            test_fraction=0.5, checkpoint_every=2, loss="pl")
    report = train_reward(rankings, tmp_path / "run", cfg, progress=False)
    for key in ("heldout_pair_accuracy", "single_annotator_accuracy", "clip_direction_accuracy", "random_accuracy"):
        assert key in report
    assert report["train_requests"] == 2 and report["test_requests"] == 2
    # the leads over the CLIP baselines are differences on the same held-out pairs
    for lead, baseline in (("lead_over_clip_direction", "clip_direction_accuracy"),
                           ("lead_over_clip_instruction_direction", "clip_instruction_direction_accuracy")):
        assert report[lead]["requests"] == 2
        assert report[lead]["lead"] == pytest.approx(report["true_pair_accuracy"] - report[baseline])
    model = RewardModel.from_pretrained(tmp_path / "run" / "model")
    assert model.config.image_size == 224 and model.clip.config.vision_config.patch_size == 14
    src = Image.open(rankings[0].source_path)
    s = model.score([src], [Image.open(rankings[0].variant_paths[0])], [rankings[0].instruction])
    assert np.isfinite(s).all()
    lines = (tmp_path / "run" / "loss.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["step"] == 3


def test_training_learns_a_simple_preference(tiny_clip, tmp_path):
    """Clean targets ranked above unchanged sources: the trained head must order held-out pairs."""
    rankings = _write_rankings(tmp_path, 12, 32)
    for r in rankings:
        r.ranks = [1, 3, 2]
        r.true_quality = [1.0, 0.0, 0.5]
    cfg = RewardTrainConfig(backbone=str(tiny_clip), steps=60, batch_size=4, hidden=32, freeze_layers=-1,
                            head_lr=3e-3, test_fraction=0.25, checkpoint_every=0)
    report = train_reward(rankings, tmp_path / "run", cfg, progress=False)
    assert report["true_pair_accuracy"] >= 0.75, report


def test_cosine_head_rate_reaches_the_optimizer_and_falls_to_zero(tiny_clip, tmp_path, monkeypatch):
    """The heads' optimizer steps at the scheduled rate: head_lr at the start, half at mid-way, ~0 at the end."""
    rankings = _write_rankings(tmp_path, 8, 32)
    cfg = RewardTrainConfig(backbone=str(tiny_clip), steps=20, batch_size=4, hidden=32, ensemble=1, head_lr=1e-2,
                            head_lr_decay="cosine", test_fraction=0.25, checkpoint_every=0, dataset_rankings=0)
    assert head_lr_at(0, cfg) == pytest.approx(1e-2)
    assert head_lr_at(10, cfg) == pytest.approx(5e-3)
    assert head_lr_at(20, cfg) == pytest.approx(0.0, abs=1e-12)
    assert head_lr_at(7, RewardTrainConfig(head_lr=2e-3, head_lr_decay="constant")) == 2e-3
    with pytest.raises(ValueError, match="head_lr_decay"):
        head_lr_at(0, RewardTrainConfig(head_lr_decay="linear"))
    seen: list[float] = []
    step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    train_reward(rankings, tmp_path / "run", cfg, progress=False)
    assert len(seen) == 20
    assert seen[0] == pytest.approx(1e-2) and seen[10] == pytest.approx(5e-3) and seen[-1] < 1e-4
    assert all(a >= b for a, b in zip(seen, seen[1:]))


def test_text_token_layer_picks_the_hidden_state_the_cross_attention_reads(tiny_clip, tmp_path):
    last = RewardModel.from_backbone(tiny_clip, hidden=16)
    embedded = RewardModel.from_backbone(tiny_clip, hidden=16, text_token_layer=0)
    t = last.tokenize(["add a red circle at the top left"])
    with torch.no_grad():
        reference = last.clip.text_model.embeddings(input_ids=t["input_ids"])
        tokens0 = embedded.encode_text(t["input_ids"], t["attention_mask"])["tokens"]
        tokens_last = last.encode_text(t["input_ids"], t["attention_mask"])["tokens"]
    torch.testing.assert_close(tokens0, reference)
    assert not torch.allclose(tokens_last, reference)
    again = RewardModel.from_pretrained(embedded.save_pretrained(tmp_path / "reward"))
    assert again.config.text_token_layer == 0


def test_text_token_layer_defaults_to_the_embeddings_on_the_toy_backbone_only(tiny_clip, tmp_path):
    """The toy CLIP's text layers ignore position and shape words, so its reward models read the
    embeddings (0); any other backbone reads its last layer (-1); an explicit value wins."""
    from hive.zoo import TOY_EDIT_CLIP

    rankings = _write_rankings(tmp_path, 6, 32)
    base = dict(steps=2, batch_size=2, hidden=16, ensemble=1, test_fraction=0.34, checkpoint_every=0,
                dataset_rankings=0, locator_examples=0)
    for backbone, layer, expected in ((TOY_EDIT_CLIP, None, 0), (tiny_clip, None, -1), (tiny_clip, 0, 0)):
        cfg = RewardTrainConfig(backbone=str(backbone), text_token_layer=layer, **base)
        out = tmp_path / f"run-{expected}-{layer}-{Path(backbone).name}"
        train_reward(rankings, out, cfg, progress=False)
        assert RewardModel.from_pretrained(out / "model").config.text_token_layer == expected, backbone


def test_direction_prior_starts_as_clip_directional_similarity_and_reloads(tiny_clip, tmp_path):
    from transformers import CLIPModel, CLIPTokenizer

    from hive.reward import clip_directional

    torch.manual_seed(2)
    model = RewardModel.from_backbone(tiny_clip, hidden=16, ensemble=1, direction_prior=1.0)
    pairs = [_toy_images(k) for k in range(6)]
    src, tgt, instr = [p[0] for p in pairs], [p[1] for p in pairs], [p[2] for p in pairs]
    raw = model.score(src, tgt, instr, normalise=False)
    cos = clip_directional(CLIPModel.from_pretrained(tiny_clip), CLIPTokenizer.from_pretrained(tiny_clip),
                           src, tgt, instr)
    # untrained, every other term is zero: the score is the directional similarity itself
    np.testing.assert_allclose(raw, cos, rtol=1e-3, atol=1e-5)
    without = RewardModel.from_backbone(tiny_clip, hidden=16, ensemble=1)
    assert np.allclose(without.score(src, tgt, instr, normalise=False), 0.0)
    again = RewardModel.from_pretrained(model.save_pretrained(tmp_path / "reward"))
    np.testing.assert_allclose(again.score(src, tgt, instr, normalise=False), raw, rtol=1e-5, atol=1e-6)


def test_speck_map_keeps_dots_and_thin_rims_and_drops_solid_changes():
    from hive.reward import speck_map

    changed = torch.zeros(1, 1, 20, 20)
    changed[0, 0, 2:8, 2:8] = 1  # a recoloured 6x6 object: survives the opening
    changed[0, 0, 15, 3] = changed[0, 0, 17, 12] = 1  # two stray dots
    changed[0, 0, 12, 8:18] = 1  # a one-pixel rim, 10 long
    specks = speck_map(changed)
    assert specks.sum() == 12
    assert specks[0, 0, 2:8, 2:8].sum() == 0 and specks[0, 0, 12, 8:18].sum() == 10


def test_speck_prior_scores_specks_down_and_reloads(tiny_clip, tmp_path):
    from PIL import Image

    torch.manual_seed(3)
    model = RewardModel.from_backbone(tiny_clip, hidden=16, ensemble=1, speck_prior=-1.0)
    size = model.config.image_size
    clean = Image.new("RGB", (size, size), (40, 40, 40))
    block = clean.copy()
    block.paste((250, 30, 30), (4, 4, 12, 12))  # a solid change: no specks
    dotted = block.copy()
    for x, y in ((20, 3), (25, 20), (5, 25), (14, 28)):
        dotted.putpixel((x, y), (250, 250, 250))
    instr = ["add a red square", "add a red square"]
    raw = model.score([clean, clean], [block, dotted], instr, normalise=False)
    # untrained, every other term is zero: the score is -1 x the speck share (its running statistics
    # start at mean 0, variance 1), 0 for the solid change, the dots' share of the image for the dots
    np.testing.assert_allclose(raw, [0.0, -4 / size**2], atol=1e-4)
    without = RewardModel.from_backbone(tiny_clip, hidden=16, ensemble=1)
    pix = model.pixel_change(model.pixel_values([clean]), model.pixel_values([dotted]))
    assert pix.shape[-1] == without.pixel_change(model.pixel_values([clean]), model.pixel_values([dotted])).shape[-1] + 1
    again = RewardModel.from_pretrained(model.save_pretrained(tmp_path / "reward"))
    assert again.config.speck_prior == -1.0
    np.testing.assert_allclose(again.score([clean, clean], [block, dotted], instr, normalise=False),
                               model.score([clean, clean], [block, dotted], instr, normalise=False), rtol=1e-5, atol=1e-6)


def test_shipped_reward_backbone_matches_edits_to_their_instructions():
    """models/toy-clip-edits (train clip --edits) loads offline, and its directional similarity
    picks each clean toy edit's own instruction over the other edits' instructions."""
    from transformers import CLIPModel, CLIPTokenizer

    from hive.reward import clip_directional
    from hive.zoo import TOY_EDIT_CLIP

    clip, tok = CLIPModel.from_pretrained(TOY_EDIT_CLIP), CLIPTokenizer.from_pretrained(TOY_EDIT_CLIP)
    examples = [toy.sample_example(910_000_000 + k) for k in range(12)]
    right = 0
    for i, ex in enumerate(examples):
        others = [e.edit.instruction for j, e in enumerate(examples) if j != i]
        n = len(others) + 1
        cos = clip_directional(clip, tok, [ex.input_image] * n, [ex.clean_image] * n, [ex.edit.instruction] + others)
        right += int(np.argmax(cos) == 0)
    assert right >= 8, right  # chance: 1 in 12


def test_early_stopping_keeps_the_untrained_head_when_training_only_hurts(tiny_clip, tmp_path):
    """A learning rate so large that every step only raises the validation loss of a head that
    starts as the direction prior: the untrained head (the prior itself) is what comes back."""
    from transformers import CLIPModel, CLIPTokenizer

    from hive.reward import clip_directional

    rankings = _write_rankings(tmp_path, 12, 32)
    cfg = RewardTrainConfig(backbone=str(tiny_clip), steps=40, batch_size=4, hidden=16, ensemble=1,
                            head_lr=5.0, eval_every=5, patience=3, val_fraction=0.2, test_fraction=0.25,
                            direction_prior=1.0, checkpoint_every=0)
    train_reward(rankings, tmp_path / "run", cfg, progress=False)
    model = RewardModel.from_pretrained(tmp_path / "run" / "model")
    src, variants, texts = [], [], []
    for r in rankings[:4]:
        src += [Image.open(r.source_path)] * len(r.variant_paths)
        variants += [Image.open(p) for p in r.variant_paths]
        texts += [r.instruction] * len(r.variant_paths)
    raw = model.score(src, variants, texts, normalise=False)
    cos = clip_directional(CLIPModel.from_pretrained(tiny_clip), CLIPTokenizer.from_pretrained(tiny_clip),
                           src, variants, texts)
    # the prior standardised with the training rankings' statistics (`_calibrate_norms`): a * (cos - m) / s.
    # A variant equal to its source has a change of float noise only, whose direction (and so its
    # cosine) differs between two feature computations; those are left out.
    changed = np.array([not np.array_equal(np.asarray(s), np.asarray(v)) for s, v in zip(src, variants)])
    assert changed.sum() >= 4
    raw, cos = np.asarray(raw)[changed], np.asarray(cos)[changed]
    slope, intercept = np.polyfit(cos, raw, 1)
    assert slope > 1.0  # standardised: the raw cosines spread far less than one unit
    np.testing.assert_allclose(raw, slope * cos + intercept, rtol=1e-3, atol=1e-4)


def test_one_standard_error_rule_keeps_the_earliest_state_the_best_does_not_clearly_beat():
    from hive.train_reward import EarlyStopping

    rng = np.random.default_rng(0)
    base = rng.uniform(0.5, 0.9, size=60)  # per-ranking validation losses of the untrained head
    noise = rng.normal(0, 0.05, size=60)

    def run(later_losses: list[np.ndarray], one_se: bool) -> tuple[float, int | None]:
        module = torch.nn.Linear(1, 1, bias=False)
        stopper = EarlyStopping(patience=5, one_se=one_se)
        for k, losses in enumerate([base, *later_losses]):
            module.weight.data.fill_(float(k))  # state k is told apart by its weight
            stopper.should_stop(losses, module, step=20 * k)
        stopper.restore_best(module)
        return module.weight.item(), stopper.chosen_step

    # slightly lower on average than the untrained head, within noise: the rule keeps step 0
    marginal = [base + noise - 0.004, base + noise - 0.006]
    assert run(marginal, one_se=True) == (0.0, 0)
    assert run(marginal, one_se=False) == (2.0, 40)  # the plain minimum takes the lucky draw
    # clearly better (by many standard errors) from step 20 on: step 20, within 1 SE of the best (step 40)
    wobble = rng.normal(0, 0.005, size=60)
    step20 = base - 0.1 + noise / 10
    clear = [step20, step20 - 0.0005 + wobble - wobble.mean()]  # step 40: 0.0005 lower, SE ~0.0007
    assert run(clear, one_se=True) == (1.0, 20)
    assert run(clear, one_se=False) == (2.0, 40)


def test_dataset_rankings_rank_the_dataset_target_above_its_corruptions():
    from hive.dataset_rankings import KEY_PREFIX, dataset_rankings, resolve_count
    from hive.train_reward import ImageCache
    from hive.zoo import DEFAULT_EDITOR

    cache = ImageCache()
    rankings = dataset_rankings(3, cache, DEFAULT_EDITOR / "vae")
    assert len({r.request_id for r in rankings}) == 3 and all(r.request_id < 0 for r in rankings)
    for r in rankings:
        assert r.from_dataset and r.ranks == [1, 2, 2, 2] and r.pairs() == [(0, 1, 1.0), (0, 2, 1.0), (0, 3, 1.0),
                                                                             (1, 2, 0.5), (1, 3, 0.5), (2, 3, 0.5)]
        seed = int(r.source_path[len(KEY_PREFIX):].split(":")[0])
        ex = toy.sample_example(seed)
        assert r.instruction == ex.edit.instruction
        assert np.array_equal(np.asarray(cache(r.source_path)), np.asarray(ex.input_image))
        target = np.asarray(cache(r.variant_paths[0]), dtype=float)
        clean = np.asarray(ex.clean_image, dtype=float)
        # through the editor's VAE: near the dataset's target, not a copy of the crisp render
        assert 0 < np.abs(target - clean).mean() < 12
        # every corruption is another image (the same VAE error on both cannot hide the change)
        for p in r.variant_paths[1:]:
            assert np.abs(np.asarray(cache(p), dtype=float) - target).mean() > 0.3
    assert resolve_count(None, toy_backbone=True) == 1000 and resolve_count(None, toy_backbone=False) == 0
    assert resolve_count(5, toy_backbone=False) == 5
    with pytest.raises(ValueError, match=">= 0"):
        resolve_count(-1, toy_backbone=True)


def test_dataset_mistakes_replace_only_the_last_corruption():
    from hive.cli import _reward_config, build_parser
    from hive.dataset_rankings import dataset_examples
    from hive.zoo import DEFAULT_EDITOR

    plain = dataset_examples(6, str(DEFAULT_EDITOR / "vae"))
    mistaken = dataset_examples(6, str(DEFAULT_EDITOR / "vae"), mistakes=True)
    replaced = changed = 0
    for (seed, _, _, a), (_, _, _, b) in zip(plain, mistaken):
        for k in range(3):  # the target and the first two corruptions are the same images
            assert np.array_equal(np.asarray(a[k]), np.asarray(b[k]))
        mistake = toy.editor_mistake(toy.sample_example(seed).edit, np.random.default_rng([seed, 12]))
        if mistake is None:
            assert np.array_equal(np.asarray(a[3]), np.asarray(b[3]))
        else:  # the last is the mistake, through the VAE (a remove's may be the corruption it replaced)
            replaced += 1
            assert np.abs(np.asarray(b[3], dtype=float) - np.asarray(mistake[0], dtype=float)).mean() < 12
            changed += not np.array_equal(np.asarray(a[3]), np.asarray(b[3]))
    assert replaced >= 3 and changed >= 2
    assert _reward_config(build_parser().parse_args(["train-reward", "--dataset-mistakes"])).dataset_mistakes
    assert not _reward_config(build_parser().parse_args(["train-reward"])).dataset_mistakes


def test_noisy_dataset_rankings_put_the_noisy_datasets_target_first():
    from hive.dataset_rankings import KEY_PREFIX, dataset_rankings
    from hive.train_reward import ImageCache
    from hive.zoo import DEFAULT_EDITOR

    cache = ImageCache()
    rankings = dataset_rankings(12, cache, DEFAULT_EDITOR / "vae", noise=0.5)
    corrupted = 0
    for r in rankings:
        ex = toy.sample_example(int(r.source_path[len(KEY_PREFIX):].split(":")[0]), noise=0.5)
        first = np.asarray(cache(r.variant_paths[0]), dtype=float)
        # rank 1 is near what the noisy dataset holds (its corruption, when it has one), not the clean target
        assert np.abs(first - np.asarray(ex.edited_image, dtype=float)).mean() < 12
        if ex.corruption is not None and ex.corruption != "no_change":
            corrupted += 1
            assert np.abs(first - np.asarray(ex.edited_image, dtype=float)).mean() < \
                np.abs(first - np.asarray(ex.clean_image, dtype=float)).mean()
    assert corrupted >= 2  # the check above ran


def test_dataset_rankings_are_fitted_but_never_validated_or_tested(tiny_clip, tmp_path, monkeypatch):
    import dataclasses

    import hive.train_reward as tr

    rankings = _write_rankings(tmp_path, 12, 32)
    seen: dict[str, list] = {"val": []}
    real_split = tr.member_split

    def spy(train, member, config):
        fit, val = real_split(train, member, config)
        seen["val"] += val
        return fit, val
    monkeypatch.setattr(tr, "member_split", spy)
    cfg = RewardTrainConfig(backbone=str(tiny_clip), steps=6, batch_size=4, hidden=16, ensemble=2, eval_every=2,
                            val_fraction=0.5, test_fraction=0.25, checkpoint_every=0, dataset_rankings=4)
    with_data = train_reward(rankings, tmp_path / "with", cfg, progress=False)
    without = train_reward(rankings, tmp_path / "without", dataclasses.replace(cfg, dataset_rankings=0), progress=False)
    assert with_data["dataset_rankings"] == 4 and without["dataset_rankings"] == 0
    assert seen["val"] and not any(r.from_dataset for r in seen["val"])
    # the report counts and scores people's (here simulated) rankings only
    assert with_data["train_rankings"] == without["train_rankings"] < len(rankings)
    assert with_data["test_rankings"] == without["test_rankings"]
    # and the dataset rankings were fitted: the same seed without them trains another head
    a = RewardModel.from_pretrained(tmp_path / "with" / "model")
    b = RewardModel.from_pretrained(tmp_path / "without" / "model")
    r = rankings[0]
    imgs = [Image.open(p) for p in r.variant_paths]
    src = [Image.open(r.source_path)] * len(imgs)
    assert not np.allclose(a.score(src, imgs, [r.instruction] * len(imgs), normalise=False),
                           b.score(src, imgs, [r.instruction] * len(imgs), normalise=False))


def _assert_cached_features_score_as_the_model(model: RewardModel, rankings: list[Ranking]) -> None:
    """The features `train_reward` caches once and trains the heads on give the model's own scores
    (`RewardModel.score`, the forward pass), for the first two rankings."""
    from hive.train_reward import FeatureCache, ImageCache

    feats = FeatureCache(model, rankings, ImageCache(), "cpu", progress=False)
    with torch.no_grad():
        cached = model.head[0](*feats.batch(rankings[:2])).numpy()
    direct = np.concatenate([model.score([Image.open(r.source_path)] * len(r.variant_paths),
                                         [Image.open(p) for p in r.variant_paths],
                                         [r.instruction] * len(r.variant_paths), normalise=False)
                             for r in rankings[:2]])
    np.testing.assert_allclose(cached, direct, rtol=1e-4, atol=1e-5)


def test_change_locator_learns_where_edits_change_and_feeds_the_head(tmp_path):
    """Fitted on toy edits, the locator puts more of its expected change on the patches the edit
    changes than their share of the grid; the head's locator term (cover - 2 spill, untrained)
    scores the named object's removal above a wrong object's when the locator knows the place;
    a model carrying a locator reloads to the same scores."""
    from hive.change_locator import changed_share, fit_change_locator, toy_triplets
    from hive.zoo import TOY_EDIT_CLIP

    model = RewardModel.from_backbone(TOY_EDIT_CLIP, hidden=16, ensemble=1, residual=False, change_locator=True)
    locator, metrics = fit_change_locator(model, *toy_triplets(2000), steps=300, progress=False)
    # an unfitted map spreads its mass like the changed patches' share of the grid
    assert metrics["val_mass_on_changed"] > metrics["val_changed_share"] + 0.15, metrics
    model.change_locator.load_state_dict(locator.state_dict())
    right, wrong, sources, instructions = [], [], [], []
    for seed in range(930_000_000, 930_002_000):
        edit = toy.random_edit(np.random.default_rng(seed), "remove")
        if len(edit.source.objects) >= 2:
            other = next(j for j in range(len(edit.source.objects)) if j not in edit.touched)
            sources.append(edit.source.render())
            instructions.append(edit.instruction)
            right.append(edit.target.render())
            wrong.append(edit.source.replace(other, None).render())
        if len(sources) == 12:
            break
    fitted = model.score(sources, right, instructions, normalise=False)
    again = RewardModel.from_pretrained(model.save_pretrained(tmp_path / "reward"))
    assert again.change_locator is not None
    np.testing.assert_allclose(again.score(sources, right, instructions, normalise=False), fitted, rtol=1e-5, atol=1e-6)
    # an oracle locator (the true change map) in place of the fitted one: only the locator term speaks
    truth = changed_share(model, sources, right)
    with torch.no_grad():
        model.head[0].w.zero_()

    def score_with_map(k: int, edited: Image.Image) -> float:
        model.with_expected_change = lambda src, text: {**text, "expected_change": truth[k:k + 1]}
        return float(model.score([sources[k]], [edited], [instructions[k]], normalise=False)[0])
    good = np.array([score_with_map(k, im) for k, im in enumerate(right)])
    bad = np.array([score_with_map(k, im) for k, im in enumerate(wrong)])
    assert (good > bad).all(), (good, bad)


def test_locator_pixel_stem_reads_the_source_and_reloads(tmp_path):
    """With `locator_pixels` the locator's map depends on the source's pixels, not only on its patch
    tokens (the stem sees each object's outline); fitted a few steps, it is saved with the reward
    model and reloads to the same scores; called without the pixels it is an error, not a guess."""
    from hive.change_locator import PixelStem, fit_change_locator, locator_inputs, toy_triplets
    from hive.zoo import TOY_EDIT_CLIP

    model = RewardModel.from_backbone(TOY_EDIT_CLIP, hidden=16, ensemble=1, residual=False, change_locator=True,
                                      locator_pixels=True)
    locator, metrics = fit_change_locator(model, *toy_triplets(200), steps=40, progress=False)
    assert metrics["pixel_stem"] is True and locator.stem is not None
    model.change_locator.load_state_dict(locator.state_dict())
    sources, instructions, targets = toy_triplets(6, seed_base=931_000_000)
    patches, words, mask, pixels = locator_inputs(model, sources, instructions)
    assert pixels is not None and pixels.shape == (6, 3, 64, 64)
    with torch.no_grad():
        straight = model.change_locator(patches, words, mask, pixels)
        mirrored = model.change_locator(patches, words, mask, pixels.flip(-1))  # same tokens, other pixels
        assert straight.shape == (6, 64) and not torch.allclose(straight, mirrored)
        with pytest.raises(ValueError, match="pixels"):
            model.change_locator(patches, words, mask)
        # another backbone's grid (224 px, 14 px patches: 16 x 16) is pooled to it
        assert PixelStem(8, 16)(torch.zeros(2, 3, 224, 224)).shape == (2, 256, 8)
    fitted = model.score(sources, targets, instructions, normalise=False)
    again = RewardModel.from_pretrained(model.save_pretrained(tmp_path / "reward"))
    assert again.config.locator_pixels and again.change_locator.stem is not None
    np.testing.assert_allclose(again.score(sources, targets, instructions, normalise=False), fitted,
                               rtol=1e-5, atol=1e-6)
    # without the stem the locator reads no pixels, and its inputs carry none
    plain = RewardModel.from_backbone(TOY_EDIT_CLIP, hidden=16, ensemble=1, residual=False, change_locator=True)
    assert plain.change_locator.stem is None and locator_inputs(plain, sources, instructions)[3] is None


def test_locator_pixels_reach_the_fit_and_need_a_locator(tmp_path, monkeypatch):
    from hive import change_locator
    from hive.cli import _reward_config, build_parser
    from hive.zoo import TOY_EDIT_CLIP

    assert _reward_config(build_parser().parse_args(["train-reward", "--locator-pixels"])).locator_pixels is True
    assert _reward_config(build_parser().parse_args(["train-reward", "--no-locator-pixels"])).locator_pixels is False
    monkeypatch.setenv("HIVE_HOME", str(tmp_path / "home"))
    seen = []
    real = change_locator.toy_change_locator
    monkeypatch.setattr(change_locator, "toy_change_locator",  # the same shapes, fitted for a moment
                        lambda backbone, n, steps, pixels: seen.append(pixels)
                        or real(backbone, 12, steps=2, pixels=pixels))
    rankings = _write_rankings(tmp_path, 4, 32)
    base = dict(backbone=str(TOY_EDIT_CLIP), steps=2, batch_size=2, hidden=16, ensemble=1, test_fraction=0.5,
                checkpoint_every=0, dataset_rankings=0)
    report = train_reward(rankings, tmp_path / "run", RewardTrainConfig(locator_pixels=True, **base), progress=False)
    assert seen == [True] and report["change_locator"]["pixel_stem"] is True
    model = RewardModel.from_pretrained(tmp_path / "run" / "model")
    assert model.change_locator.stem is not None
    # the cached features the heads trained on (the locator's map computed once, from the sources'
    # pixels) give the saved model's own scores, where two variants share one source row (`owner`)
    _assert_cached_features_score_as_the_model(model, rankings)
    with pytest.raises(ValueError, match="locator-pixels"):
        train_reward(rankings, tmp_path / "run0", RewardTrainConfig(locator_pixels=True, locator_examples=0, **base),
                     progress=False)
    assert not (tmp_path / "run0").exists()
    with pytest.raises(ValueError, match="change_locator"):
        RewardModel.from_backbone(TOY_EDIT_CLIP, hidden=16, locator_pixels=True)


def test_change_locator_is_refused_off_the_toy_backbone(tiny_clip, tmp_path):
    rankings = _write_rankings(tmp_path, 4, 32)
    cfg = RewardTrainConfig(backbone=str(tiny_clip), steps=2, batch_size=2, hidden=16, test_fraction=0.5,
                            checkpoint_every=0, locator_examples=10)
    with pytest.raises(ValueError, match="toy backbone"):
        train_reward(rankings, tmp_path / "run", cfg, progress=False)
    assert not (tmp_path / "run").exists()


def test_change_locator_needs_the_change_head_and_a_frozen_backbone(tmp_path):
    from hive.zoo import TOY_EDIT_CLIP

    rankings = _write_rankings(tmp_path, 4, 32)
    for bad in ({"head_type": "global"}, {"freeze_layers": 1}):
        cfg = RewardTrainConfig(backbone=str(TOY_EDIT_CLIP), steps=2, batch_size=2, hidden=16, test_fraction=0.5,
                                checkpoint_every=0, locator_examples=10, **bad)
        with pytest.raises(ValueError, match="frozen backbone"):
            train_reward(rankings, tmp_path / "run", cfg, progress=False)
        assert not (tmp_path / "run").exists()


def test_locator_steps_reach_the_locator_fit(tmp_path, monkeypatch):
    """--locator-steps sets how long the change locator is fitted (session 29: 4,000 binds better)."""
    from hive import change_locator
    from hive.cli import _reward_config, build_parser
    from hive.zoo import TOY_EDIT_CLIP

    args = build_parser().parse_args(["train-reward", "--locator-examples", "10", "--locator-steps", "7"])
    assert _reward_config(args).locator_steps == 7
    assert _reward_config(build_parser().parse_args(["train-reward"])).locator_steps == change_locator.DEFAULT_STEPS
    monkeypatch.setenv("HIVE_HOME", str(tmp_path / "home"))  # the fit's disk cache
    seen = []
    real = change_locator.toy_change_locator
    monkeypatch.setattr(change_locator, "toy_change_locator",
                        lambda backbone, n, steps, pixels: seen.append(steps) or real(backbone, n, steps=steps))
    rankings = _write_rankings(tmp_path, 4, 32)
    cfg = RewardTrainConfig(backbone=str(TOY_EDIT_CLIP), steps=2, batch_size=2, hidden=16, ensemble=1,
                            test_fraction=0.5, checkpoint_every=0, dataset_rankings=0, locator_examples=10,
                            locator_steps=7)
    train_reward(rankings, tmp_path / "run", cfg, progress=False)
    assert seen == [7]
    with pytest.raises(ValueError, match="locator_steps"):
        train_reward(rankings, tmp_path / "run0", RewardTrainConfig(**{**cfg.__dict__, "locator_steps": 0}),
                     progress=False)


def test_locator_is_on_by_default_only_where_it_can_work(tmp_path, monkeypatch):
    """Default: 20,000 toy edits and 4,000 steps with the toy backbone, the change head and a frozen
    backbone (session 33); 0 with another backbone, the global head or trained tower layers."""
    from hive import change_locator
    from hive.zoo import TOY_EDIT_CLIP

    resolve = change_locator.resolve_examples
    assert resolve(None, True, "change", True) == 20_000
    assert resolve(None, False, "change", True) == resolve(None, True, "global", True) == 0
    assert resolve(None, True, "change", False) == 0 and resolve(7, True, "change", True) == 7
    with pytest.raises(ValueError, match="locator_examples"):
        resolve(-1, True, "change", True)
    seen = []
    real = change_locator.toy_change_locator
    monkeypatch.setenv("HIVE_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(change_locator, "toy_change_locator",  # the same shapes, fitted for a moment
                        lambda backbone, n, steps, pixels: seen.append((n, steps, pixels))
                        or real(backbone, 12, steps=2))
    rankings = _write_rankings(tmp_path, 4, 32)
    base = dict(steps=2, batch_size=2, hidden=16, ensemble=1, test_fraction=0.5, checkpoint_every=0,
                dataset_rankings=0)
    report = train_reward(rankings, tmp_path / "run", RewardTrainConfig(backbone=str(TOY_EDIT_CLIP), **base),
                          progress=False)
    assert seen == [(20_000, 4_000, False)] and report["change_locator"]["examples"] == 12
    assert RewardModel.from_pretrained(tmp_path / "run" / "model").change_locator is not None
    report = train_reward(rankings, tmp_path / "run1", RewardTrainConfig(backbone=str(TOY_EDIT_CLIP),
                                                                         freeze_layers=1, **base), progress=False)
    assert seen == [(20_000, 4_000, False)] and report["change_locator"] is None


def test_the_default_locator_fit_ships_for_the_embedded_backbone(monkeypatch, tmp_path):
    """A fresh checkout reads the default fit from the backbone folder instead of fitting ~20 minutes; it
    matches the backbone's current weights (the cache key hashes them)."""
    from hive import change_locator
    from hive.zoo import TOY_EDIT_CLIP

    monkeypatch.setenv("HIVE_HOME", str(tmp_path / "home"))  # an empty cache
    change_locator._toy_fit.cache_clear()

    def no_fit(*a, **k):
        raise AssertionError("fitted instead of reading the shipped fit")

    monkeypatch.setattr(change_locator, "fit_change_locator", no_fit)
    state, metrics = change_locator.toy_change_locator(TOY_EDIT_CLIP, change_locator.DEFAULT_EXAMPLES)
    change_locator._toy_fit.cache_clear()
    assert metrics["examples"] == 20_000 and metrics["steps"] == 4_000
    assert metrics["val_mass_on_changed"] > 0.85, metrics  # where it expects change, the toy edits changed
    model = RewardModel.from_backbone(TOY_EDIT_CLIP, hidden=16, ensemble=1, change_locator=True)
    model.change_locator.load_state_dict(state)


def test_toy_locator_fit_is_kept_on_disk_and_reused(tmp_path, monkeypatch):
    """A second process (lru cache cleared) loads the fit from $HIVE_HOME/cache instead of fitting
    again; other settings or another backbone are another entry."""
    from hive import change_locator
    from hive.zoo import TOY_CLIP, TOY_EDIT_CLIP

    monkeypatch.setenv("HIVE_HOME", str(tmp_path / "home"))
    change_locator._toy_fit.cache_clear()
    state, metrics = change_locator.toy_change_locator(TOY_EDIT_CLIP, 12, steps=3, seed=5)
    path = change_locator.fit_cache_path(TOY_EDIT_CLIP.resolve(), 12, 3, 5)
    assert path.exists() and path.is_relative_to(tmp_path / "home" / "cache")
    assert not list(path.parent.glob(".*tmp*"))  # written atomically, no leftovers
    change_locator._toy_fit.cache_clear()

    def no_fit(*a, **k):
        raise AssertionError("fitted again instead of reading the cache")

    monkeypatch.setattr(change_locator, "fit_change_locator", no_fit)
    again, metrics_again = change_locator.toy_change_locator(TOY_EDIT_CLIP, 12, steps=3, seed=5)
    assert metrics_again == metrics and metrics["steps"] == 3
    assert state.keys() == again.keys() and all(torch.equal(state[k], again[k]) for k in state)
    others = {change_locator.fit_cache_path(TOY_EDIT_CLIP.resolve(), 12, 4, 5),
              change_locator.fit_cache_path(TOY_EDIT_CLIP.resolve(), 13, 3, 5),
              change_locator.fit_cache_path(TOY_EDIT_CLIP.resolve(), 12, 3, 6),
              change_locator.fit_cache_path(TOY_CLIP.resolve(), 12, 3, 5),
              change_locator.fit_cache_path(TOY_EDIT_CLIP.resolve(), 12, 3, 5, pixels=True)}
    assert path not in others and len(others) == 5
    change_locator._toy_fit.cache_clear()


def test_direction_predictor_learns_caption_directions_and_feeds_the_direction_prior(tmp_path):
    """Fitted on captioned toy edits, the predicted direction is closer to the caption direction
    T(target caption) - T(source caption) than T(instruction) is; the head's direction prior reads
    it (another direction, other scores); a model carrying a predictor reloads to the same scores."""
    from hive.direction_predictor import fit_direction_predictor, toy_captioned_triplets
    from hive.zoo import TOY_EDIT_CLIP

    model = RewardModel.from_backbone(TOY_EDIT_CLIP, hidden=16, ensemble=1, residual=False, direction_prior=1.0,
                                      direction_predictor=True)
    predictor, metrics = fit_direction_predictor(model, *toy_captioned_triplets(2000), steps=300, progress=False)
    assert metrics["val_cosine"] > metrics["val_cosine_instruction"] + 0.2, metrics
    model.direction_predictor.load_state_dict(predictor.state_dict())
    sources, edited, instructions = [], [], []
    for seed in range(931_000_000, 931_000_012):
        ex = toy.sample_example(seed)
        sources.append(ex.input_image)
        edited.append(ex.clean_image)
        instructions.append(ex.edit.instruction)
    fitted = model.score(sources, edited, instructions, normalise=False)
    again = RewardModel.from_pretrained(model.save_pretrained(tmp_path / "reward"))
    assert again.direction_predictor is not None
    np.testing.assert_allclose(again.score(sources, edited, instructions, normalise=False), fitted, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        model.direction_predictor.out.weight.neg_()
        model.direction_predictor.out.bias.neg_()
    flipped = model.score(sources, edited, instructions, normalise=False)
    assert not np.allclose(flipped, fitted)
    with pytest.raises(ValueError, match="direction_prior"):
        RewardModel.from_backbone(TOY_EDIT_CLIP, hidden=16, direction_prior=0.0, direction_predictor=True)


def test_reward_training_with_a_direction_predictor_scores_as_it_trained(tmp_path, monkeypatch):
    """Through `train_reward` (frozen backbone, features cached once): the report carries the
    predictor's fit, the saved folder carries the predictor, and the cached features the heads
    trained on give the saved model's own scores (the cache computes the predicted direction the
    way the forward pass does)."""
    from hive import direction_predictor
    from hive.zoo import TOY_EDIT_CLIP

    fit = direction_predictor.toy_direction_predictor
    monkeypatch.setattr(direction_predictor, "toy_direction_predictor", lambda backbone, n: fit(backbone, n, steps=20))
    rankings = _write_rankings(tmp_path, 6, 64)
    cfg = RewardTrainConfig(backbone=str(TOY_EDIT_CLIP), steps=5, batch_size=2, hidden=16, ensemble=1,
                            test_fraction=0.5, checkpoint_every=0, dataset_rankings=0, direction_examples=50,
                            locator_examples=0)
    report = train_reward(rankings, tmp_path / "run", cfg, progress=False)
    assert report["direction_predictor"]["examples"] == 50 and report["direction_predictor"]["steps"] == 20
    model = RewardModel.from_pretrained(tmp_path / "run" / "model")
    assert model.direction_predictor is not None
    _assert_cached_features_score_as_the_model(model, rankings)


def test_direction_predictor_is_refused_off_the_toy_backbone_or_without_its_prior(tiny_clip, tmp_path):
    from hive.zoo import TOY_EDIT_CLIP

    rankings = _write_rankings(tmp_path, 4, 32)
    for backbone, bad, match in ((tiny_clip, {}, "toy backbone"), (TOY_EDIT_CLIP, {"direction_prior": 0.0}, "prior"),
                                 (TOY_EDIT_CLIP, {"freeze_layers": 1}, "frozen backbone")):
        cfg = RewardTrainConfig(backbone=str(backbone), steps=2, batch_size=2, hidden=16, test_fraction=0.5,
                                checkpoint_every=0, direction_examples=10, **bad)
        with pytest.raises(ValueError, match=match):
            train_reward(rankings, tmp_path / "run", cfg, progress=False)
        assert not (tmp_path / "run").exists()


def test_lead_over_annotator_counts_requests_not_pairs():
    truth = [0.9, 0.5, 0.2, 0.1]  # six pairs the noise-free order does not tie
    right = np.array([4.0, 3.0, 2.0, 1.0])
    # request 1: the annotator has it right, the scorer wrong; requests 2-4: the other way round
    rankings = [_ranking([1, 2, 3, 4], 1, 1, truth)] + [_ranking([4, 3, 2, 1], k, k, truth) for k in (2, 3, 4)]
    scores = [right[::-1]] + [right] * 3
    lead = lead_over_annotator(rankings, scores)
    assert lead["requests"] == 4
    assert lead["lead"] == pytest.approx((3 * 6 - 6) / 24)  # scorer 18 of 24 pairs, annotator 6 of 24
    assert lead["low"] < lead["lead"] < lead["high"] <= 1.0
    # two annotators on one request: their mean agreement counts once
    both = [_ranking([1, 2, 3, 4], 1, 1, truth), _ranking([4, 3, 2, 1], 1, 2, truth)]
    assert lead_over_annotator(both, [right, right])["lead"] == pytest.approx(0.5)


def test_lead_over_another_scorer_counts_each_request_once():
    truth = [0.9, 0.5, 0.2, 0.1]
    right, wrong = np.array([4.0, 3.0, 2.0, 1.0]), np.array([1.0, 2.0, 3.0, 4.0])
    # request 1 twice (two annotators, the same variants and scores): it counts once
    rankings = [_ranking([1, 2, 3, 4], 1, 1, truth), _ranking([1, 2, 3, 4], 1, 2, truth),
                _ranking([1, 2, 3, 4], 2, 3, truth)]
    lead = lead_over_scorer(rankings, [right, right, wrong], [wrong, wrong, wrong])
    assert lead["requests"] == 2
    assert lead["lead"] == pytest.approx(0.5)  # 6 of 12 pairs against 0 of 12
    assert lead_over_scorer(rankings, [right] * 3, [right] * 3)["lead"] == 0.0
    assert lead_over_scorer(rankings, [wrong] * 3, [right] * 3)["lead"] == pytest.approx(-1.0)


def test_bootstrap_lead_interval_widens_when_pairs_cluster():
    spread = np.array([[1.0, 0.0, 1.0]] * 60 + [[0.0, 1.0, 1.0]] * 40)  # 100 requests of one pair
    clustered = np.array([[10.0, 0.0, 10.0]] * 6 + [[0.0, 10.0, 10.0]] * 4)  # the same pairs in 10 requests
    a, b = bootstrap_lead(spread), bootstrap_lead(clustered)
    assert a["lead"] == pytest.approx(b["lead"]) == pytest.approx(0.2)
    assert b["high"] - b["low"] > 2 * (a["high"] - a["low"])


def test_regularisation_options_reach_the_heads(tiny_clip):
    """--dropout, --gate-l2 and --residual-l2 set the heads' dropout and L2 penalties; the defaults
    (none, session 13) leave the penalty at zero however large the weights."""
    from hive.cli import _reward_config, build_parser
    from hive.train_reward import head_settings

    old = _reward_config(build_parser().parse_args(
        ["train-reward", "--dropout", "0.1", "--gate-l2", "0.3", "--residual-l2", "0.001"]))
    new = _reward_config(build_parser().parse_args(["train-reward"]))
    assert (old.dropout, old.gate_l2, old.residual_l2) == (0.1, 0.3, 0.001)
    assert (new.dropout, new.gate_l2, new.residual_l2) == (0.0, 0.0, 0.0)
    heads = {}
    for name, cfg in (("old", old), ("new", new)):
        model = RewardModel.from_backbone(tiny_clip, **{**head_settings(cfg), "hidden": 16, "ensemble": 1})
        head = model.head[0]
        with torch.no_grad():
            head.gate.weight.fill_(1.0)
            head.mlp[0].weight.fill_(1.0)
        heads[name] = head
    assert heads["old"].mlp[2].p == 0.1 and heads["old"].attn.dropout == 0.1
    assert heads["new"].mlp[2].p == 0.0 and heads["new"].attn.dropout == 0.0
    gate_part = 0.3 * heads["old"].gate.weight.pow(2).sum()
    assert float(heads["old"].penalty()) > float(gate_part) > 0  # the residual's L2 adds to the gate's
    assert float(heads["new"].penalty()) == 0.0
