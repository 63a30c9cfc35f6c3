"""The fast path computes the pipeline's function: same images as the plain diffusers call on a
tiny random pipeline, repeated work done once, the compile cache plumbing, and the trainers'
pieces (ordered prefetching loader, fused AdamW)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hive.fastpath import FastOptions, FastSampler, adamw, compile_module, step_loader, use_compile_cache


@pytest.fixture(scope="module")
def pipes(tiny_pipeline):
    """Two independent copies of the tiny pipeline: the reference and the one the fast path changes."""
    from diffusers import StableDiffusionInstructPix2PixPipeline

    def load():
        pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(
            tiny_pipeline, dtype=torch.float32, safety_checker=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    return load(), load()


def _scene_images():
    from hive import toy

    return [toy.sample_example(s).input_image.resize((32, 32)) for s in (1, 2)]


def _gens(seeds):
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


@pytest.mark.parametrize("guidance,image_guidance", [(7.5, 1.5), (1.0, 1.5)])
def test_fast_sampler_equals_the_pipeline_call(pipes, guidance, image_guidance):
    reference, ours = pipes
    a, b = _scene_images()
    # two sources, two prompts, three variants of the first and one of the second, as Editor.sample batches them
    images, prompts, seeds = [a, a, a, b], ["make the red circle blue"] * 3 + ["remove the square"], [5, 6, 7, 9]
    expected = reference(prompt=prompts, image=images, num_inference_steps=4, guidance_scale=guidance,
                         image_guidance_scale=image_guidance, generator=_gens(seeds), output_type="np").images
    sampler = FastSampler(ours, FastOptions(channels_last=True))
    got = sampler(images, prompts, _gens(seeds), 4, guidance, image_guidance, output_type="np")
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() < 1e-4
    # and the variants really differ (the test would pass trivially on constant outputs)
    assert np.abs(got[0] - got[1]).max() > 1e-2


def test_repeated_work_is_done_once(pipes):
    _, ours = pipes
    sampler = FastSampler(ours, FastOptions())
    calls = {"vae": [], "text": []}
    vae_encode, text_forward = ours.vae.encode, ours.text_encoder.forward
    ours.vae.encode = lambda x, *a, **k: (calls["vae"].append(x.shape[0]), vae_encode(x, *a, **k))[1]
    ours.text_encoder.forward = lambda ids, *a, **k: (calls["text"].append(ids.shape[0]), text_forward(ids, *a, **k))[1]
    try:
        a, _ = _scene_images()
        sampler([a] * 4, ["make it blue"] * 4, _gens(range(4)), 1, 7.5, 1.5)
    finally:
        del ours.vae.encode, ours.text_encoder.forward
    assert calls["vae"] == [1]  # one source image, encoded once for four variants
    assert calls["text"] == [2]  # the prompt and the empty prompt, once each


def test_fast_sampler_refuses_mismatched_rows(pipes):
    _, ours = pipes
    with pytest.raises(ValueError, match="one image, prompt and generator per row"):
        FastSampler(ours, FastOptions())(_scene_images(), ["x"], _gens([0, 1]), 1, 7.5, 1.5)


def test_editor_fast_and_plain_agree(tiny_pipeline, monkeypatch):
    from hive import toy
    from hive.editor import Editor

    scene = toy.sample_example(3)
    plain = Editor(tiny_pipeline, device="cpu", fast=False)
    fast = Editor(tiny_pipeline, device="cpu", fast=True)
    assert plain.fast is None and fast.fast is not None
    x = plain.edit(scene.input_image, scene.edit.instruction, variants=2, seed=4, steps=3)
    y = fast.edit(scene.input_image, scene.edit.instruction, variants=2, seed=4, steps=3)
    for p, q in zip(x.images, y.images):
        assert np.abs(np.asarray(p, dtype=int) - np.asarray(q, dtype=int)).max() <= 1
    monkeypatch.setenv("HIVE_FAST", "0")
    assert Editor(tiny_pipeline, device="cpu").fast is None


def test_options_per_device_and_environment(monkeypatch):
    monkeypatch.delenv("HIVE_COMPILE", raising=False)
    monkeypatch.delenv("HIVE_COMPILE_MODE", raising=False)
    gpu = FastOptions.for_device("cuda")
    assert gpu.compile and gpu.channels_last and gpu.fuse_qkv
    assert not FastOptions.for_device("cpu").compile
    assert FastOptions.for_device("cpu").aot is None  # a UNet package is used if one was built
    monkeypatch.setenv("HIVE_COMPILE", "1")
    monkeypatch.setenv("HIVE_COMPILE_MODE", "reduce-overhead")
    cpu = FastOptions.for_device("cpu")
    assert cpu.aot is True and cpu.compile_mode == "reduce-overhead"  # on the CPU: build the package
    monkeypatch.setenv("HIVE_COMPILE", "0")
    assert FastOptions.for_device("cpu").aot is False and not FastOptions.for_device("cuda").compile


def test_packaged_unet_chunks_and_falls_back(pipes, tmp_path, monkeypatch):
    """The package wrapper: batches above the package's range go in chunks, a single row and other
    shapes to the UNet; no package is looked for when none was built."""
    from hive import fastpath

    _, ours = pipes
    unet = ours.unet
    calls = []

    def fake_package(x, t, e):  # stands in for the compiled library: records the batch sizes it gets
        calls.append(x.shape[0])
        assert t.dim() == 0 and t.dtype == torch.float32
        return [unet(x, t, encoder_hidden_states=e, return_dict=False)[0]]

    monkeypatch.setattr(fastpath, "AOT_MAX_BATCH", 4)
    packaged = fastpath.PackagedUNet(fake_package, unet, (8, 8))
    x, e = torch.randn(9, 8, 8, 8), torch.randn(9, 77, 32)
    with torch.no_grad():
        got = packaged(x, torch.tensor(321), encoder_hidden_states=e, return_dict=False)[0]
        want = unet(x, torch.tensor(321), encoder_hidden_states=e, return_dict=False)[0]
        assert calls == [4, 4]  # 9 rows: two chunks of 4 in the package, the last row through the UNet
        assert torch.allclose(got, want, atol=1e-5)
        packaged(torch.randn(3, 8, 16, 16), torch.tensor(1), encoder_hidden_states=e[:3])  # other size: UNet
        assert calls == [4, 4]
    monkeypatch.setenv("HIVE_COMPILE_CACHE", str(tmp_path / "empty"))
    assert fastpath.load_unet_package(ours, FastOptions(aot=None), torch.device("cpu"), build=False) is None


def test_package_key_follows_the_weights(pipes, tmp_path, monkeypatch):
    from hive.fastpath import unet_package_path

    monkeypatch.setenv("HIVE_COMPILE_CACHE", str(tmp_path))
    reference, ours = pipes
    key = lambda unet: unet_package_path(unet, (8, 8), (77, 32), FastOptions(freeze=True), torch.device("cpu"))  # noqa: E731
    assert key(reference.unet) == key(reference.unet)
    import copy

    changed = copy.deepcopy(reference.unet)
    with torch.no_grad():
        changed.conv_out.bias += 1e-3
    assert key(changed) != key(reference.unet) and key(changed).parent == tmp_path / "aot"


def test_compile_with_an_on_disk_cache_runs_on_cpu(tmp_path, monkeypatch):
    """The compile path (inductor, freezing, cache folder) works on the CPU and writes its cache."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "elsewhere"))  # restored afterwards
    monkeypatch.setenv("HIVE_COMPILE_CACHE", str(tmp_path / "cache"))
    assert use_compile_cache() == tmp_path / "cache"
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.SiLU()).eval()
    x = torch.randn(2, 3, 8, 8)
    compiled = compile_module(net, FastOptions(compile=True, freeze=True), torch.device("cpu"))
    with torch.no_grad():
        assert torch.allclose(compiled(x), net(x), atol=1e-5)
    assert any((tmp_path / "cache").rglob("*")), "nothing written to the compile cache"


def test_step_loader_keeps_the_order_with_workers():
    from hive.data import ToyTriplets

    source = ToyTriplets(resolution=16, seed=3)
    expected = [source.batch(s, 2) for s in range(1, 4)]
    for workers in (0, 1):
        got = list(step_loader(source, 1, 4, 2, workers=workers))
        assert len(got) == 3
        for g, e in zip(got, expected):
            assert g.prompts == e.prompts and torch.equal(g.source, e.source) and torch.equal(g.edited, e.edited)


def test_fused_adamw_takes_the_same_step():
    torch.manual_seed(0)
    a = torch.nn.Linear(8, 4)
    b = torch.nn.Linear(8, 4)
    b.load_state_dict(a.state_dict())
    plain = torch.optim.AdamW(a.parameters(), lr=1e-2, weight_decay=0.01)
    fused = adamw(b.parameters(), lr=1e-2, weight_decay=0.01)
    assert fused.defaults["fused"]
    x = torch.randn(5, 8)
    for opt, m in ((plain, a), (fused, b)):
        m(x).square().mean().backward()
        opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-6)
