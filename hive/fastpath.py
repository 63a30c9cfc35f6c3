"""The fast path: every speed trick of the editor and of the trainers, in one module.

Sampling. `FastSampler` is the math of diffusers' `StableDiffusionInstructPix2PixPipeline.__call__`
(same UNet, VAE, text encoder, a copy of the same scheduler, the same noise from the same
generators, the three guidance branches in one UNet batch) without the per-call work that is
provably the same for every variant:
  * each distinct prompt, and the empty prompt, go through the text encoder once (the pipeline
    encodes every variant's prompt and negative prompt);
  * each distinct source image goes through the VAE encoder once (the pipeline encodes one copy
    per variant when it is given one image per variant, as the editor does);
  * scaling the model input once instead of once per guidance branch.
On top, where it pays (see `FastOptions.for_device` and docs/speed.md for the measurements):
channels-last weights, fused QKV projections, and `torch.compile` of the UNet and the VAE
decoder with inductor's caches in a folder on disk, so that a restarted process finds the
compiled kernels instead of compiling again (`compile_cache_dir`).

Training. `adamw`, `prepare_unet_for_training` and `step_loader` are the trainers' fast-path
pieces: fused AdamW, channels-last, `torch.compile`, gradient checkpointing, and a DataLoader
that builds the next batches in worker processes while the current one trains.
"""

from __future__ import annotations

import inspect
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from PIL import Image

DEFAULT_HOME = "./data"  # same default as db.config (hive does not import db here)


# ---------------------------------------------------------------- options
@dataclass(frozen=True)
class FastOptions:
    """Which speed tricks the editor uses. `for_device` gives the defaults that pay on a device."""

    channels_last: bool = False  # NHWC weights for the UNet and VAE (tensor cores, oneDNN)
    fuse_qkv: bool = False  # one matmul for Q, K and V (self-attention), K and V (cross-attention)
    compile: bool = False  # torch.compile the UNet and the VAE decoder (in process; kernels cached on disk)
    compile_mode: str | None = None  # inductor mode ("max-autotune-no-cudagraphs", "reduce-overhead", ...)
    freeze: bool = False  # inductor freezing: weights become constants, prepacked for oneDNN (CPU)
    compile_vae: bool = True  # with `compile`: also the VAE decoder
    # AOTInductor package of the UNet on disk (a shared library with the weights frozen in; loads
    # in about a second, no tracing): True builds it if missing (minutes, once per model), None
    # uses it only if it is there, False never
    aot: bool | None = False
    cudnn_benchmark: bool = False  # let cuDNN pick the fastest convolution for the fixed shapes

    @classmethod
    def for_device(cls, device: torch.device | str) -> "FastOptions":
        """What pays on this device (docs/speed.md). Environment: HIVE_COMPILE=0 compiles nothing,
        HIVE_COMPILE=1 compiles where it is opt-in (the CPU's UNet package), HIVE_COMPILE_MODE sets
        the inductor mode."""
        device = torch.device(device)
        env = os.environ.get("HIVE_COMPILE")
        wanted = None if env is None else env.strip().lower() not in ("", "0", "false", "no", "off")
        if device.type == "cuda":
            # inductor's default mode: the anchor compiled SD-1.5's UNet in 78 s on an H200;
            # max-autotune takes minutes more (HIVE_COMPILE_MODE to try it, or reduce-overhead)
            opts = cls(channels_last=True, fuse_qkv=True, compile=wanted is not False, cudnn_benchmark=True)
        else:
            # 2-core AVX-512 Xeon (docs/speed.md): the lean loop pays 1.1x; inductor with freezing
            # about 1.3x more, but compiling costs minutes of CPU, so the UNet is compiled ahead of
            # time into a package on disk when asked (HIVE_COMPILE=1, bench edit --compile), and
            # every later process loads that package if it is there.
            opts = cls(freeze=True, aot=None if wanted is None else wanted)
        if os.environ.get("HIVE_COMPILE_MODE"):
            opts = replace(opts, compile_mode=os.environ["HIVE_COMPILE_MODE"])
        return opts

    def with_compile(self, on: bool, device: torch.device | str) -> "FastOptions":
        """Compile, or not, the way that pays on the device: on a GPU torch.compile in process, on
        the CPU the UNet's ahead-of-time package (built if missing)."""
        if torch.device(device).type == "cuda":
            return replace(self, compile=on, aot=self.aot if on else False)
        return replace(self, compile=False, aot=on)


def fast_default() -> bool:
    """`Editor(fast=None)`: the fast path unless HIVE_FAST=0."""
    return os.environ.get("HIVE_FAST", "1").strip().lower() not in ("0", "false", "no", "off")


# ---------------------------------------------------------------- compile cache
def compile_cache_dir() -> Path:
    """Where torch.compile keeps what it compiled (FX graphs, kernels, autotuning results):
    $HIVE_COMPILE_CACHE, else $TORCHINDUCTOR_CACHE_DIR if the user set it, else
    $HIVE_HOME/cache/torch-compile."""
    if os.environ.get("HIVE_COMPILE_CACHE"):
        return Path(os.environ["HIVE_COMPILE_CACHE"]).expanduser().resolve()
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"]).expanduser().resolve()
    return (Path(os.environ.get("HIVE_HOME") or DEFAULT_HOME) / "cache" / "torch-compile").expanduser().resolve()


def use_compile_cache(path: Path | None = None) -> Path:
    """Point inductor's caches at `path` (default `compile_cache_dir()`) and make sure they are
    on. Inductor reads TORCHINDUCTOR_CACHE_DIR when it first needs the folder, so call this before
    the first compile of the process."""
    path = Path(path) if path is not None else compile_cache_dir()
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    inductor_config.autotune_local_cache = True
    return path


def compile_module(fn: Callable, options: FastOptions, device: torch.device) -> Callable:
    """torch.compile with the options' mode; freezing (CPU inference) through inductor options,
    so the process-wide inductor config stays as it was."""
    use_compile_cache()
    inductor_options: dict[str, Any] = {}
    if options.freeze:
        inductor_options["freezing"] = True
    kwargs: dict[str, Any] = {"fullgraph": True, "dynamic": False}
    if inductor_options and options.compile_mode not in (None, "default"):
        # torch.compile takes either a mode or options; the mode's settings plus ours
        from torch._inductor import list_mode_options

        inductor_options = {**list_mode_options(options.compile_mode), **inductor_options}
        return torch.compile(fn, options=inductor_options, **kwargs)
    if inductor_options:
        return torch.compile(fn, options=inductor_options, **kwargs)
    return torch.compile(fn, mode=options.compile_mode, **kwargs)


# ---------------------------------------------------------------- ahead-of-time UNet packages
AOT_MIN_BATCH, AOT_MAX_BATCH = 2, 63  # diffusers' upsampler branches at batch 64; larger batches go in chunks


def weights_fingerprint(module: torch.nn.Module) -> str:
    """A hash of a module's weights (frozen into a package, so the package is only valid for them)."""
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    for name, tensor in module.state_dict().items():
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def unet_package_path(unet, latent_hw: tuple[int, int], text_shape: tuple[int, int], options: FastOptions,
                      device: torch.device) -> Path:
    """Where the package for this UNet (weights, dtype, layout), input shapes, device and torch
    version lives in the compile cache."""
    import hashlib
    import json

    p = next(unet.parameters())
    config = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}  # not where it was loaded from
    key = json.dumps({"weights": weights_fingerprint(unet), "config": config, "dtype": str(p.dtype),
                      "device": device.type, "torch": torch.__version__, "latent": list(latent_hw),
                      "text": list(text_shape), "channels_last": options.channels_last, "freeze": options.freeze,
                      "mode": options.compile_mode}, sort_keys=True, default=str)
    return compile_cache_dir() / "aot" / f"unet-{hashlib.blake2b(key.encode(), digest_size=12).hexdigest()}.pt2"


class _UNetForExport(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor):
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]


def build_unet_package(unet, latent_hw: tuple[int, int], text_shape: tuple[int, int], options: FastOptions,
                       path: Path) -> Path:
    """torch.export the UNet (batch dynamic within AOT_MIN_BATCH..AOT_MAX_BATCH) and compile it with
    AOTInductor into `path` (written beside it and renamed: a crash leaves no broken package)."""
    from torch.export import Dim

    use_compile_cache()
    p = next(unet.parameters())
    batch = Dim("batch", min=AOT_MIN_BATCH, max=AOT_MAX_BATCH)
    example = (torch.randn(6, unet.config.in_channels, *latent_hw, device=p.device, dtype=p.dtype),
               torch.tensor(500.0, device=p.device),
               torch.randn(6, *text_shape, device=p.device, dtype=p.dtype))
    configs: dict[str, Any] = {"freezing": options.freeze}
    if options.compile_mode not in (None, "default"):
        from torch._inductor import list_mode_options

        configs.update(list_mode_options(options.compile_mode))
    with torch.no_grad():
        exported = torch.export.export(_UNetForExport(unet).eval(), example,
                                       dynamic_shapes=({0: batch}, None, {0: batch}), strict=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.pt2")
        torch._inductor.aoti_compile_and_package(exported, package_path=str(tmp), inductor_configs=configs)
    os.replace(tmp, path)
    return path


class PackagedUNet:
    """Calls a UNet package like the UNet itself (`unet(sample, t, encoder_hidden_states=...,
    return_dict=False)[0]`); batches outside the package's range go in chunks, or to the UNet."""

    def __init__(self, package, unet, latent_hw: tuple[int, int]):
        self.package, self.unet, self.latent_hw = package, unet, tuple(latent_hw)

    def __call__(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor, return_dict: bool = False,
                 **kwargs) -> tuple[torch.Tensor]:
        t = torch.as_tensor(timestep, device=sample.device)
        if (kwargs and any(v is not None for v in kwargs.values())) or t.numel() != 1 \
                or tuple(sample.shape[-2:]) != self.latent_hw or sample.shape[0] < AOT_MIN_BATCH:
            return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False, **kwargs)
        t = t.reshape(()).to(torch.float32)
        outs = []
        for start in range(0, sample.shape[0], AOT_MAX_BATCH):
            x, e = sample[start:start + AOT_MAX_BATCH], encoder_hidden_states[start:start + AOT_MAX_BATCH]
            if x.shape[0] < AOT_MIN_BATCH:  # a last chunk of one row
                outs.append(self.unet(x, timestep, encoder_hidden_states=e, return_dict=False)[0])
                continue
            out = self.package(x.contiguous(), t, e.contiguous())
            out = out[0] if isinstance(out, (list, tuple)) else out
            if out.shape[1] != self.unet.config.out_channels:  # a package of other weights, renamed by hand
                raise RuntimeError(f"the compiled UNet package does not fit this UNet ({out.shape[1]} output "
                                   f"channels, not {self.unet.config.out_channels}); delete {compile_cache_dir()}/aot")
            outs.append(out)
        return (torch.cat(outs) if len(outs) > 1 else outs[0],)


def load_unet_package(pipe, options: FastOptions, device: torch.device, build: bool) -> PackagedUNet | None:
    """The UNet package for this pipeline from the compile cache: built first if `build` and missing;
    None if it is missing and not to be built."""
    import logging

    if not build and not any((compile_cache_dir() / "aot").glob("unet-*.pt2")):
        return None  # nothing built yet: skip hashing the weights
    unet = pipe.unet
    latent_hw = (int(unet.config.sample_size),) * 2 if isinstance(unet.config.sample_size, int) \
        else tuple(int(v) for v in unet.config.sample_size)
    text_shape = (int(pipe.tokenizer.model_max_length), int(pipe.text_encoder.config.hidden_size))
    path = unet_package_path(unet, latent_hw, text_shape, options, device)
    if not path.exists():
        if not build:
            return None
        logging.getLogger("hive.fastpath").warning(
            "compiling the UNet ahead of time (once for these weights; minutes on a small CPU) into %s", path)
        build_unet_package(unet, latent_hw, text_shape, options, path)
    return PackagedUNet(torch._inductor.aoti_load_package(str(path)), unet, latent_hw)


# ---------------------------------------------------------------- encoding (the sampler, the local blend)
def encode_prompts(pipe, prompts: Sequence[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeddings of each prompt, embedding of the empty prompt), each distinct prompt once."""
    distinct = list(dict.fromkeys(prompts))
    tok = pipe.tokenizer
    ids = tok(distinct + [""], padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt")
    mask = None
    if getattr(pipe.text_encoder.config, "use_attention_mask", False):
        mask = ids.attention_mask.to(device)
    embeds = pipe.text_encoder(ids.input_ids.to(device), attention_mask=mask)[0]
    embeds = embeds.to(dtype=pipe.text_encoder.dtype, device=device)
    index = torch.tensor([distinct.index(p) for p in prompts], device=device)
    return embeds[:-1][index], embeds[-1:]


def encode_images(pipe, images: Sequence[Image.Image], device: torch.device, channels_last: bool = False
                  ) -> torch.Tensor:
    """VAE latents (the distribution's mode, unscaled, as the pipeline uses them) of each image;
    an image object passed several times is encoded once."""
    order: dict[int, int] = {}
    distinct: list[Image.Image] = []
    for im in images:
        if id(im) not in order:
            order[id(im)] = len(distinct)
            distinct.append(im)
    pixels = pipe.image_processor.preprocess(distinct).to(device=device, dtype=pipe.text_encoder.dtype)
    if channels_last:
        pixels = pixels.contiguous(memory_format=torch.channels_last)
    latents = pipe.vae.encode(pixels).latent_dist.mode()
    index = torch.tensor([order[id(im)] for im in images], device=device)
    return latents[index].contiguous()


# ---------------------------------------------------------------- the sampler
class FastSampler:
    """InstructPix2Pix sampling with the pipeline's math and the fast path's tricks.

    `pipe` is a loaded `StableDiffusionInstructPix2PixPipeline`; its modules are changed in place
    where the options say so (channels-last, fused QKV), which leaves their function unchanged."""

    def __init__(self, pipe, options: FastOptions | None = None):
        self.pipe = pipe
        self.device = pipe._execution_device
        self.options = options if options is not None else FastOptions.for_device(self.device)
        opts = self.options
        if opts.cudnn_benchmark and self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        if opts.channels_last:
            pipe.unet.to(memory_format=torch.channels_last)
            pipe.vae.to(memory_format=torch.channels_last)
        if opts.fuse_qkv:
            pipe.unet.fuse_qkv_projections()
        self.unet: Callable = pipe.unet
        self.vae_decode: Callable = pipe.vae.decode
        self.packaged = None
        if opts.aot is not False:  # an ahead-of-time package: loaded if there, built if asked
            self.packaged = load_unet_package(pipe, opts, self.device, build=opts.aot is True)
            if self.packaged is not None:
                self.unet = self.packaged
        if opts.compile:
            if self.packaged is None:
                self.unet = compile_module(pipe.unet, opts, self.device)
            if opts.compile_vae:
                self.vae_decode = compile_module(pipe.vae.decode, opts, self.device)
        step_params = set(inspect.signature(pipe.scheduler.step).parameters)
        self._step_takes_generator = "generator" in step_params
        self._step_takes_eta = "eta" in step_params

    # -- the loop ----------------------------------------------------------------------------
    @torch.inference_mode()
    def __call__(self, images: Sequence[Image.Image], prompts: Sequence[str], generators: list[torch.Generator],
                 steps: int, guidance: float, image_guidance: float, output_type: str = "pil") -> Any:
        """One output per row: row i edits images[i] by prompts[i] with noise from generators[i].
        Returns PIL images (output_type "pil") or a float array in [0, 1] of shape (B, H, W, 3)."""
        from diffusers.utils.torch_utils import randn_tensor

        pipe = self.pipe
        if not (len(images) == len(prompts) == len(generators)):
            raise ValueError(f"one image, prompt and generator per row: got {len(images)}, {len(prompts)}, "
                             f"{len(generators)}")
        batch = len(prompts)
        cfg = guidance > 1.0 and image_guidance >= 1.0  # the pipeline's do_classifier_free_guidance
        text, null_text = encode_prompts(pipe, prompts, self.device)
        image_latents = encode_images(pipe, images, self.device, channels_last=self.options.channels_last)
        dtype = text.dtype
        if cfg:  # branches: (text, image), (no text, image), (no text, no image), as the pipeline orders them
            null = null_text.expand(batch, -1, -1)
            text = torch.cat([text, null, null])
            image_latents = torch.cat([image_latents, image_latents, torch.zeros_like(image_latents)])
        latent_channels = pipe.vae.config.latent_channels
        if latent_channels + image_latents.shape[1] != pipe.unet.config.in_channels:
            raise ValueError(f"the UNet takes {pipe.unet.config.in_channels} input channels, not the "
                             f"{latent_channels} + {image_latents.shape[1]} of this VAE's latents")
        # a fresh scheduler per call: the pipeline's is stateful (step index), so calls could not overlap
        scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
        scheduler.set_timesteps(steps, device=self.device)
        height, width = image_latents.shape[-2:]
        latents = randn_tensor((batch, latent_channels, height, width), generator=generators, device=self.device,
                               dtype=dtype)
        latents = latents * scheduler.init_noise_sigma
        step_kwargs: dict[str, Any] = {}
        if self._step_takes_generator:
            step_kwargs["generator"] = generators
        if self._step_takes_eta:
            step_kwargs["eta"] = 0.0
        for t in scheduler.timesteps:
            scaled = scheduler.scale_model_input(latents, t)
            if cfg:
                scaled = torch.cat([scaled] * 3)
            model_input = torch.cat([scaled, image_latents], dim=1)
            noise_pred = self.unet(model_input, t, encoder_hidden_states=text, return_dict=False)[0]
            if cfg:
                pred_text, pred_image, pred_uncond = noise_pred.chunk(3)
                noise_pred = (pred_uncond + guidance * (pred_text - pred_image)
                              + image_guidance * (pred_image - pred_uncond))
            latents = scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]
        decoded = self.vae_decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
        return pipe.image_processor.postprocess(decoded.float() if output_type == "np" else decoded,
                                                output_type=output_type, do_denormalize=[True] * batch)


# ---------------------------------------------------------------- measuring
def unet_flops(unet, batch: int, latent_hw: tuple[int, int], text_len: int, text_dim: int) -> int:
    """FLOPs of one UNet evaluation at this batch (torch.utils.flop_counter, on the meta device
    where possible so that counting SD-1.5 sizes costs no memory)."""
    from torch.utils.flop_counter import FlopCounterMode

    p = next(unet.parameters())
    x = torch.zeros(batch, unet.config.in_channels, *latent_hw, device=p.device, dtype=p.dtype)
    e = torch.zeros(batch, text_len, text_dim, device=p.device, dtype=p.dtype)
    t = torch.tensor(500.0, device=p.device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(x, t, encoder_hidden_states=e, return_dict=False)
    return int(counter.get_total_flops())


def matmul_peak_tflops(device: torch.device | str, dtype: torch.dtype | None = None, seconds: float = 0.5,
                       clock: str = "wall") -> float:
    """The chip's matrix rate as measured here (large square matmuls): the ceiling against which
    the benchmarks report their share. bf16 on CUDA, fp32 on the CPU, unless `dtype` says.
    clock="cpu" (CPU only): per second of process CPU time, i.e. what the cores give when they
    are ours, also on a machine that other jobs share."""
    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    now = time.process_time if clock == "cpu" and device.type == "cpu" else time.perf_counter
    for _ in range(3):
        a @ b
    sync()
    reps, start = 0, now()
    while True:
        a @ b
        reps += 1
        if reps % 5 == 0:
            sync()
            if now() - start > seconds:
                break
    return 2 * n**3 * reps / (now() - start) / 1e12


# ---------------------------------------------------------------- training
def adamw(params, lr: float, weight_decay: float = 0.01, fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW, fused (one kernel for all parameters) where the parameters' device supports it.
    `fused=None`: fused on CUDA and CPU (torch >= 2.4 has both)."""
    params = list(params)
    if fused is None:
        fused = bool(params) and all(p.device.type in ("cuda", "cpu") for p in params if isinstance(p, torch.Tensor))
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused)


def prepare_unet_for_training(unet, channels_last: bool = False, compile: bool = False,
                              gradient_checkpointing: bool = False, compile_mode: str | None = None):
    """The UNet as the trainer's fast path wants it. Returns the module to call (compiled or not);
    the parameters stay those of `unet`, so optimizers, EMA and checkpoints see the same tensors."""
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    if compile:
        use_compile_cache()
        return torch.compile(unet, mode=compile_mode)
    return unet


class StepBatches(torch.utils.data.Dataset):
    """Batch i is source.batch(start + i, batch_size): the trainers' batches as a map-style dataset,
    so a DataLoader can build the next ones in worker processes, in order, and a resumed run still
    sees exactly the batches it would have seen."""

    def __init__(self, source, start: int, steps: int, batch_size: int):
        self.source, self.start, self.steps, self.batch_size = source, start, steps, batch_size

    def __len__(self) -> int:
        return max(0, self.steps - self.start)

    def __getitem__(self, i: int):
        return self.source.batch(self.start + i, self.batch_size)


def _collate_one(batch):
    return batch


def step_loader(source, start: int, steps: int, batch_size: int, workers: int = 0,
                pin_memory: bool = False) -> Iterator:
    """Yield source.batch(step) for step in [start, steps); with `workers` > 0 the batches are
    built ahead in that many processes (prefetching two each), with `pin_memory` in page-locked
    memory for fast, asynchronous copies to the GPU."""
    if workers <= 0:
        for step in range(start, steps):
            batch = source.batch(step, batch_size)
            yield _pin(batch) if pin_memory else batch
        return
    loader = torch.utils.data.DataLoader(StepBatches(source, start, steps, batch_size), batch_size=None,
                                         shuffle=False, num_workers=workers, collate_fn=_collate_one,
                                         prefetch_factor=2, persistent_workers=False)
    for batch in loader:
        yield _pin(batch) if pin_memory else batch


def _pin(batch):
    """Page-locked copies of a TripletBatch's tensors (only when CUDA is there to use them)."""
    if not torch.cuda.is_available():
        return batch
    from dataclasses import fields, is_dataclass

    if is_dataclass(batch):
        return type(batch)(**{f.name: (getattr(batch, f.name).pin_memory()
                                       if isinstance(getattr(batch, f.name), torch.Tensor)
                                       else getattr(batch, f.name)) for f in fields(batch)})
    return batch
