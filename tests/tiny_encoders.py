"""Tiny random CLIP and DINO-style ViT models saved as ordinary transformers folders (no network), for the
metric arithmetic and for `sdtune compare --clip-model/--dino-model` in tests."""

from __future__ import annotations

from pathlib import Path

WORDS = ["a", "photo", "of", "dog", "toy", "red", "on", "the", "beach", "in", "snow", "jungle", "wooden", "floor",
         "top"]


def make_clip(folder: Path, image_size: int = 32) -> Path:
    """A 2-layer CLIP (text and vision width 32, projection 16) with a CLIPProcessor, saved to `folder`."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    from sdtune.tokenizer_build import write_clip_tokenizer

    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(folder / "tokenizer-src", WORDS))
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = CLIPConfig(text_config={**small, "vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
                                     "eos_token_id": tokenizer.eos_token_id, "pad_token_id": 1},
                        vision_config={**small, "image_size": image_size, "patch_size": 8}, projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                   crop_size={"height": image_size, "width": image_size})
    CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def make_dino(folder: Path, image_size: int = 32) -> Path:
    """A 2-layer ViT (width 32, patch 8) with its image processor, standing in for DINO ViT-S/16."""
    import torch
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       image_size=image_size, patch_size=8)
    ViTModel(config).save_pretrained(folder)
    ViTImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(folder)
    return folder
