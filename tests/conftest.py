"""Shared fixtures: tiny random pipelines built on the fly (tests never download anything)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))


def build_tiny_pipeline(dest: Path, sd15_shaped: bool = False) -> Path:
    """A random InstructPix2Pix pipeline folder with the toy tokenizer; SD-1.5 block layout if asked."""
    from diffusers import AutoencoderKL, StableDiffusionInstructPix2PixPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from hive.tokenizer import write_tokenizer
    from hive.train_sft import expand_conv_in
    from hive.zoo import sd15_unet, toy_scheduler

    torch.manual_seed(0)
    tok_dir = write_tokenizer(dest / "_tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=32,
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=4,
                        mid_block_add_attention=False)
    if sd15_shaped:
        unet = expand_conv_in(sd15_unet(in_channels=4, tiny=True))
    else:
        unet = UNet2DConditionModel(sample_size=8, in_channels=8, out_channels=4,
                                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), block_out_channels=(16, 32),
                                    layers_per_block=1, cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
    pipe = StableDiffusionInstructPix2PixPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                                  scheduler=toy_scheduler(), safety_checker=None,
                                                  feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(dest)
    return dest


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory) -> Path:
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny_pipeline"))


@pytest.fixture(scope="session")
def tiny_editor(tiny_pipeline):
    from hive.editor import Editor

    return Editor(tiny_pipeline, device="cpu")
