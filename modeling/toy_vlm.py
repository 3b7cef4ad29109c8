"""Factory for the toy target: a real, tiny HF LLaVA (CLIP vision tower + Llama text model).

Everything here is plain transformers: the folder `save_toy_target` writes loads with
`AutoProcessor` / `AutoModelForImageTextToText` and no project code.

    >>> spec = ToyVLMSpec()
    >>> tok = train_tokenizer(["There is a red circle in the top left."], spec.vocab_size)
    >>> processor = build_processor(tok, spec)
    >>> model = LlavaForConditionalGeneration(build_config(spec, tok))
    >>> inputs = processor(images=[image], text=processor.apply_chat_template(msgs), ...)

Vision geometry: a 72x72 image in 8x8 patches gives 81 visual tokens; the toy world's 3x3 grid
cells are exactly 3x3 patches each. `vision_feature_layer=-1` because LLaVA's default (-2) would
skip a whole layer of a shallow tower.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

IMAGE_TOKEN = "<image>"
BOS_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<pad>"
SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, IMAGE_TOKEN]

# ChatML. Content may be a string (LLaVA style, with a literal "<image>") or a list of
# {"type": "image"} / {"type": "text"} items (the transformers convention).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class ToyVLMSpec:
    """Sizes of the toy target. Defaults: ~4.6M parameters, 8 text layers, 81 visual tokens."""

    image_size: int = 72
    patch_size: int = 8
    vision_hidden: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    text_hidden: int = 192
    text_layers: int = 8
    text_heads: int = 4
    text_intermediate: int = 512
    vocab_size: int = 640
    max_position_embeddings: int = 512

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        if self.text_layers < 1 or self.vision_layers < 1:
            raise ValueError(f"need at least one layer per tower, got {asdict(self)}")

    @property
    def num_image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def train_tokenizer(
    texts: list[str], vocab_size: int, max_length: int = 512
) -> PreTrainedTokenizerFast:
    """Byte-level BPE on the given corpus: any UTF-8 text tokenizes, no unknown token exists.
    `max_length`: the model's context, what the tokenizer warns beyond."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        model_max_length=max_length,
        padding_side="right",
        chat_template=CHAT_TEMPLATE,
    )


def build_processor(tokenizer: PreTrainedTokenizerFast, spec: ToyVLMSpec) -> LlavaProcessor:
    # The PIL processor so the folder works without torchvision; the exact-size resize is a no-op
    # for toy images and makes any user image valid input.
    image_processor = CLIPImageProcessorPil(
        size={"height": spec.image_size, "width": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
        do_center_crop=False,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's class token, dropped by the "default" strategy
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
    )


def build_vision_config(spec: ToyVLMSpec) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_hidden * 4,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        projection_dim=spec.vision_hidden,
    )


def build_config(spec: ToyVLMSpec, tokenizer: PreTrainedTokenizerFast) -> LlavaConfig:
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_intermediate,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_heads,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=build_vision_config(spec),
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=spec.num_image_tokens,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )
