"""Tiny, randomly initialised models of every supported VLM family, with matching inputs.

Each builder returns (model, inputs) where `inputs` holds input_ids with exactly as many visual
placeholder tokens as the family's own token arithmetic gives, plus the pixel tensors. The HF
models themselves refuse a forward whose placeholder count disagrees with their features.

`qwen_with_processor(family)` builds a Qwen2-VL / Qwen2.5-VL target together with a real
processor (byte-level BPE tokenizer trained on the toy world, PIL image processor), so the
runner's whole path, prompt to tokens, runs on it.
"""

from __future__ import annotations

import torch
import transformers as T
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers.processing_utils import ProcessorMixin

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


def _qwen_config(
    config_cls, vision: dict, vocab: int = V, ids=(IMAGE, VIDEO, START, END), **special: int
):
    """ids: the image, video, vision-start and vision-end token ids; `special`: bos/eos/pad."""
    text = dict(
        TEXT,
        **special,
        vocab_size=vocab,
        rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
    )
    image, video, start, end = ids
    return config_cls(
        text_config=text,
        vision_config=vision,
        image_token_id=image,
        video_token_id=video,
        vision_start_token_id=start,
        vision_end_token_id=end,
    )


def _qwen(config_cls, model_cls, vision: dict):
    cfg = _qwen_config(config_cls, vision)
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


QWEN2_VL_VISION = dict(
    depth=2,
    embed_dim=32,
    hidden_size=32,
    num_heads=2,
    mlp_ratio=2,
    patch_size=4,
    spatial_merge_size=2,
    temporal_patch_size=2,
)
QWEN2_5_VL_VISION = dict(
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
QWEN_CLASSES = {
    "qwen2_vl": (T.Qwen2VLConfig, T.Qwen2VLForConditionalGeneration, QWEN2_VL_VISION),
    "qwen2_5_vl": (T.Qwen2_5_VLConfig, T.Qwen2_5_VLForConditionalGeneration, QWEN2_5_VL_VISION),
}


def qwen2_vl():
    return _qwen(*QWEN_CLASSES["qwen2_vl"])


def qwen2_5_vl():
    return _qwen(*QWEN_CLASSES["qwen2_5_vl"])


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


QWEN_SPECIAL = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
# ChatML with Qwen's vision blocks, the layout of the real Qwen2(.5)-VL chat template
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif item['type'] == 'video' %}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class QwenImageProcessor(T.Qwen2VLProcessor):
    """Qwen2-VL's processor without its video processor: that one needs torchvision, which the
    project does not depend on. Images and text behave exactly as in the full processor."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


def qwen_with_processor(family: str, vocab_size: int = 320):
    """(model, processor) of a tiny random Qwen2-VL / Qwen2.5-VL that reads real prompts.

    The image processor resizes to at most 32x32 pixels: 8x8 patches of 4, merged 2x2 into 16
    visual tokens per image, so M-RoPE's rope delta is nonzero and tests stay fast.
    """
    from covspec.data.toy_world import corpus_text

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=QWEN_SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus_text(0, 200), trainer=trainer)
    tok = T.PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=QWEN_CHAT_TEMPLATE,
    )
    images = T.Qwen2VLImageProcessorPil(
        patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=16 * 16, max_pixels=32 * 32
    )
    processor = QwenImageProcessor(images, tok, chat_template=QWEN_CHAT_TEMPLATE)
    config_cls, model_cls, vision = QWEN_CLASSES[family]
    ids = [
        tok.convert_tokens_to_ids(t)
        for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
    ]
    pad, eos = tok.pad_token_id, tok.eos_token_id
    cfg = _qwen_config(
        config_cls, vision, len(tok), ids, bos_token_id=pad, eos_token_id=eos, pad_token_id=pad
    )
    return model_cls(cfg).eval(), processor
