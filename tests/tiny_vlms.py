"""Tiny, randomly initialised models of every supported VLM family, with matching inputs.

Each builder returns (model, inputs) where `inputs` holds input_ids with exactly as many visual
placeholder tokens as the family's own token arithmetic gives, plus the pixel tensors. The HF
models themselves refuse a forward whose placeholder count disagrees with their features.
"""

from __future__ import annotations

import torch
import transformers as T

V = 96  # vocab; the top ids are the families' special tokens
IMAGE, VIDEO, START, END = 95, 94, 93, 92
TEXT = dict(
    vocab_size=V,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=2,
    num_key_value_heads=2,
)
CLIP = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=16,
    patch_size=4,
)
PINPOINTS = [[16, 32], [32, 16], [32, 32]]


def _ids(*parts: list[int]) -> torch.Tensor:
    return torch.tensor([[t for p in parts for t in p]])


def _text(n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 90, (n,), generator=g).tolist()


def llava():
    cfg = T.LlavaConfig(
        text_config=T.LlamaConfig(**TEXT),
        vision_config=T.CLIPVisionConfig(**CLIP),
        image_token_index=IMAGE,
        vision_feature_layer=-1,
    )
    n = (16 // 4) ** 2  # patches; the "default" strategy drops CLS
    return T.LlavaForConditionalGeneration(cfg), {
        "input_ids": _ids(_text(3), [IMAGE] * n, _text(5, 1)),
        "pixel_values": torch.randn(1, 3, 16, 16),
    }


def llava_next():
    cfg = T.LlavaNextConfig(
        text_config=T.LlamaConfig(**TEXT),
        vision_config=T.CLIPVisionConfig(**CLIP),
        image_token_index=IMAGE,
        vision_feature_layer=-1,
        image_grid_pinpoints=PINPOINTS,
    )
    # 32x32 image -> 2x2 tiles of 4x4 patches = 8x8 grid, +1 newline per row, + 16 base patches
    n = 8 * 8 + 8 + 16
    inputs = {
        "input_ids": _ids(_text(3), [IMAGE] * n, _text(4, 1)),
        "pixel_values": torch.randn(1, 5, 3, 16, 16),
        "image_sizes": torch.tensor([[32, 32]]),
    }
    return T.LlavaNextForConditionalGeneration(cfg), inputs


def llava_onevision():
    cfg = T.LlavaOnevisionConfig(
        text_config=T.Qwen2Config(**TEXT),
        vision_config=T.SiglipVisionConfig(**CLIP),
        image_token_index=IMAGE,
        video_token_index=VIDEO,
        vision_feature_layer=-1,
        image_grid_pinpoints=PINPOINTS,
    )
    n_img = 8 * 8 + 8 + 16
    n_vid = 4 * (2 * 2) + 1  # 4 frames pooled 2x2, one newline token for the clip
    inputs = {
        "input_ids": _ids(_text(2), [IMAGE] * n_img, _text(2, 1), [VIDEO] * n_vid, _text(3, 2)),
        "pixel_values": torch.randn(1, 5, 3, 16, 16),
        "image_sizes": torch.tensor([[32, 32]]),
        "pixel_values_videos": torch.randn(1, 4, 3, 16, 16),
    }
    return T.LlavaOnevisionForConditionalGeneration(cfg), inputs


def _qwen(config_cls, model_cls, vision: dict):
    text = dict(
        TEXT,
        rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
    )
    cfg = config_cls(
        text_config=text,
        vision_config=vision,
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        vision_start_token_id=START,
        vision_end_token_id=END,
    )
    patch = 3 * 2 * 4 * 4  # channels * temporal_patch * patch * patch
    inputs = {
        # image grid 1x4x4 patches, merged 2x2 -> 4 tokens; video grid 2x4x4 -> 8 tokens
        "input_ids": _ids(
            _text(2),
            [START],
            [IMAGE] * 4,
            [END],
            _text(2, 1),
            [START],
            [VIDEO] * 8,
            [END],
            _text(3, 2),
        ),
        "pixel_values": torch.randn(16, patch),
        "image_grid_thw": torch.tensor([[1, 4, 4]]),
        "pixel_values_videos": torch.randn(32, patch),
        "video_grid_thw": torch.tensor([[2, 4, 4]]),
    }
    return model_cls(cfg), inputs


def qwen2_vl():
    vision = dict(
        depth=2,
        embed_dim=32,
        hidden_size=32,
        num_heads=2,
        mlp_ratio=2,
        patch_size=4,
        spatial_merge_size=2,
        temporal_patch_size=2,
    )
    return _qwen(T.Qwen2VLConfig, T.Qwen2VLForConditionalGeneration, vision)


def qwen2_5_vl():
    vision = dict(
        depth=2,
        hidden_size=32,
        out_hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        patch_size=4,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=16,
        fullatt_block_indexes=[1],
    )
    return _qwen(T.Qwen2_5_VLConfig, T.Qwen2_5_VLForConditionalGeneration, vision)


def _idefics(config_cls, model_cls):
    cfg = config_cls(
        text_config=T.LlamaConfig(**TEXT),
        vision_config=dict(CLIP),
        image_token_id=IMAGE,
        scale_factor=2,
    )
    n = 2 * (16 // 4) ** 2 // 4  # two tiles, pixel shuffle by 2 in each direction
    return model_cls(cfg), {
        "input_ids": _ids(_text(3), [IMAGE] * n, _text(3, 1)),
        "pixel_values": torch.randn(1, 2, 3, 16, 16),
    }


def idefics3():
    return _idefics(T.Idefics3Config, T.Idefics3ForConditionalGeneration)


def smolvlm():
    return _idefics(T.SmolVLMConfig, T.SmolVLMForConditionalGeneration)


def gemma3():
    text = T.Gemma3TextConfig(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        sliding_window=8,
    )
    cfg = T.Gemma3Config(
        text_config=text,
        vision_config=T.SiglipVisionConfig(**CLIP),
        mm_tokens_per_image=4,
        image_token_index=IMAGE,
        boi_token_index=START,
        eoi_token_index=END,
    )
    return T.Gemma3ForConditionalGeneration(cfg), {
        "input_ids": _ids(_text(3), [START], [IMAGE] * 4, [END], _text(3, 1)),
        "pixel_values": torch.randn(1, 3, 16, 16),
    }


FAMILIES = {
    "llava": llava,
    "llava_next": llava_next,
    "llava_onevision": llava_onevision,
    "qwen2_vl": qwen2_vl,
    "qwen2_5_vl": qwen2_5_vl,
    "idefics3": idefics3,
    "smolvlm": smolvlm,
    "gemma3": gemma3,
}
