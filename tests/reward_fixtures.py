"""Tiny random CLIP backbones for the reward tests (toy-shaped and ViT-L/14-shaped), never downloaded."""

from __future__ import annotations

from pathlib import Path

import torch


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
