"""Target adapters: one small class per HF VLM family, one interface for everything else.

From a single target forward an adapter returns the logits, the hidden states of the requested
layers and the mask of visual (image or video) positions; it also exposes the input embeddings,
the LM head and the decoder layers. Nothing outside this file cares which family it talks to.

    >>> adapter = adapter_for(model)                   # picks by config.model_type
    >>> out = adapter.forward(inputs, layer_ids=(2, 4, 7))
    >>> out.logits.shape, out.hidden_states[4].shape, out.visual_mask.sum()
    ((B, T, V), (B, T, D), number of visual tokens)

Layer ids follow HF's `output_hidden_states` indexing, which EAGLE-3 style drafters use too:
0 is the embedding output (image features already merged in), i in 1..L-1 the output of decoder
layer i-1, and L the final normed state that feeds the LM head. The states are captured with
hooks, so only the requested layers are kept, never all L+1 of them.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

Grid = tuple[int, int]  # (rows, cols) of one visual block's patches


def visual_runs(visual_row: torch.Tensor) -> list[tuple[int, int]]:
    """(T,) bool -> [(start, length)] of each contiguous run of visual positions."""
    pos = visual_row.nonzero()[:, 0].tolist()
    if not pos:
        return []
    starts = [i for i in range(len(pos)) if i == 0 or pos[i] != pos[i - 1] + 1]
    ends = starts[1:] + [len(pos)]
    return [(pos[a], b - a) for a, b in zip(starts, ends, strict=True)]


class TargetMismatchError(ValueError):
    """A request the target cannot serve (unknown family, missing layer ids, wrong inputs)."""


@dataclass
class TargetOutput:
    logits: torch.Tensor  # (B, T, V)
    hidden_states: dict[int, torch.Tensor]  # layer id -> (B, T, D)
    visual_mask: torch.Tensor  # (B, T) bool
    cache: Any = None  # the model's KV cache when use_cache=True


def _first_tensor(x: Any) -> torch.Tensor:
    return x[0] if isinstance(x, (tuple, list)) else x


def _flatten_features(x: Any) -> Iterable[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for item in x:
            yield from _flatten_features(item)


class TargetAdapter:
    """Family-independent behaviour; subclasses name their config fields and input quirks."""

    model_types: ClassVar[tuple[str, ...]] = ()
    # Why the speculative runner cannot verify trees on this family yet (None: it can). Tree
    # verification passes 1D rotary positions and a 4D mask through the model's own forward.
    tree_decoding_blocker: ClassVar[str | None] = None
    image_token_field: ClassVar[str] = "image_token_index"
    video_token_field: ClassVar[str | None] = None

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.config = model.config

    # -- structure --------------------------------------------------------------------------
    @functools.cached_property
    def text_config(self):
        # cached: HF config attribute access is slow and the runner asks every round
        return self.config.get_text_config()

    @property
    def num_layers(self) -> int:
        return self.text_config.num_hidden_layers

    @property
    def hidden_size(self) -> int:
        return self.text_config.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.text_config.vocab_size

    def language_model(self) -> nn.Module:
        return self.model.get_decoder()

    def decoder_layers(self) -> nn.ModuleList:
        return self.language_model().layers

    def input_embeddings(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    def lm_head(self) -> nn.Module:
        return self.model.get_output_embeddings()

    def logits_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., D) final normed states (layer id L) -> (..., V), exactly the model's logits.
        Lets a caller compute logits at a few positions instead of the whole sequence."""
        head = self.lm_head()
        return head(hidden.to(head.weight.dtype))

    def visual_token_ids(self) -> list[int]:
        fields = [self.image_token_field, self.video_token_field]
        return [
            getattr(self.config, f)
            for f in fields
            if f and getattr(self.config, f, None) is not None
        ]

    def visual_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        return torch.isin(input_ids, self._visual_ids.to(input_ids.device))  # (B, T)

    @functools.cached_property
    def _visual_ids(self) -> torch.Tensor:
        return torch.tensor(self.visual_token_ids())

    def visual_grids(self, inputs: Mapping[str, Any]) -> list[list[Grid]] | None:
        """Per sample, the (rows, cols) patch grid of every visual block in sequence order (an
        image, a video frame, an any-res base view or its unpadded tiles, a lone newline token
        as (1, 1)); a block's tokens are rows x cols consecutive positions, and the blocks tile
        the sample's visual tokens. None: every contiguous run of visual tokens is one square
        image (LLaVA-1.5, Gemma 3, Idefics3 crops), so its length tells its grid."""
        return None

    def _blocks_per_run(self, inputs, per_image, per_video) -> list[list[Grid]]:
        """Assign each sample's runs, in order, the next image's or video's blocks (by the
        run's token id) from the batch-ordered lists `per_image` and `per_video`."""
        image, video = (
            getattr(self.config, f, None) if f else None
            for f in (self.image_token_field, self.video_token_field)
        )
        queues = {image: list(per_image), video: list(per_video)}
        out = []
        ids = inputs["input_ids"]
        for row, mask in zip(ids, self.visual_mask(ids), strict=True):
            grids: list[Grid] = []
            for start, n in visual_runs(mask):
                end = start + n
                while start < end:  # a run may hold several images / videos back to back
                    queue = queues.get(int(row[start]))
                    if not queue:
                        raise ValueError(
                            "more visual blocks in input_ids than the processor outputs "
                            f"describe (token id {int(row[start])} at position {start})"
                        )
                    blocks = queue.pop(0)
                    grids += blocks
                    start += sum(h * w for h, w in blocks)
            out.append(grids)
        return out

    def check_layer_ids(self, layer_ids: Sequence[int]) -> None:
        bad = [i for i in layer_ids if not 0 <= i <= self.num_layers]
        if bad:
            raise TargetMismatchError(
                f"layer ids {bad} are outside 0..{self.num_layers} for this "
                f"{self.config.model_type} target with {self.num_layers} decoder layers"
            )

    # -- forward ----------------------------------------------------------------------------
    def model_inputs(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        """Family-specific completion of processor outputs (e.g. Qwen's mm_token_type_ids)."""
        return dict(inputs)

    def _hooks(self, layer_ids: Sequence[int], store: dict[int, torch.Tensor]) -> list:
        lm, layers, handles = self.language_model(), self.decoder_layers(), []
        for i in sorted(set(layer_ids)):
            if i == 0:

                def pre(_m, args, kwargs, i=i):
                    store[i] = args[0] if args else kwargs["hidden_states"]

                handles.append(layers[0].register_forward_pre_hook(pre, with_kwargs=True))
            else:
                module = lm.norm if i == self.num_layers else layers[i - 1]
                handles.append(
                    module.register_forward_hook(
                        lambda _m, _a, out, i=i: store.__setitem__(i, _first_tensor(out))
                    )
                )
        return handles

    def forward(
        self, inputs: Mapping[str, Any], layer_ids: Sequence[int] = (), **kwargs: Any
    ) -> TargetOutput:
        """One target forward; `kwargs` (cache, use_cache, position_ids, ...) go to the model."""
        self.check_layer_ids(layer_ids)
        store: dict[int, torch.Tensor] = {}
        handles = self._hooks(layer_ids, store)
        try:
            out = self.model(**self.model_inputs(inputs), **kwargs)
        finally:
            for h in handles:
                h.remove()
        return TargetOutput(
            logits=out.logits,
            hidden_states={i: store[i] for i in layer_ids},
            visual_mask=self.visual_mask(inputs["input_ids"]),
            cache=out.get("cache", out.get("past_key_values")),
        )

    def text_forward(
        self, input_ids: torch.Tensor, layer_ids: Sequence[int] = (), **kwargs: Any
    ) -> TargetOutput:
        """Continue a cached sequence with text tokens only: the language model and LM head
        directly, without the multimodal wrapper or hooks (its `output_hidden_states` holds the
        same states). This is the runner's per-round verification, so it stays lean."""
        out = self.language_model()(
            inputs_embeds=self.input_embeddings()(input_ids),
            output_hidden_states=bool(layer_ids),
            **kwargs,
        )
        return TargetOutput(
            logits=self.lm_head()(out.last_hidden_state),
            hidden_states={i: out.hidden_states[i] for i in layer_ids},
            visual_mask=torch.zeros_like(input_ids, dtype=torch.bool),
            cache=out.get("cache", out.get("past_key_values")),
        )

    # -- positions of text after the prompt --------------------------------------------------
    def rope_offset(self, inputs: Mapping[str, Any]) -> int:
        """How far the rotary position of a text token after this prompt is from its index in
        the sequence: 0 for 1D RoPE. Computed once per request, at prefill (batch size 1)."""
        return 0

    def text_position_ids(self, positions: torch.Tensor, offset: int) -> torch.Tensor:
        """(B, T) sequence indices of text tokens after the prompt (tree nodes: past + depth)
        -> the `position_ids` the language model takes for them."""
        return positions + offset

    # -- visual features --------------------------------------------------------------------
    def _feature_calls(self, inputs: Mapping[str, Any]) -> list[tuple[str, dict]]:
        calls = []
        if inputs.get("pixel_values") is not None:
            calls.append(("get_image_features", {"pixel_values": inputs["pixel_values"]}))
        if inputs.get("pixel_values_videos") is not None:
            calls.append(
                ("get_video_features", {"pixel_values_videos": inputs["pixel_values_videos"]})
            )
        return calls

    @torch.no_grad()
    def count_visual_features(self, inputs: Mapping[str, Any]) -> int:
        """How many visual feature vectors the model merges into the text sequence."""
        total = 0
        for method, kwargs in self._feature_calls(inputs):
            feats = getattr(self.model.model, method)(**kwargs).pooler_output
            total += sum(t.reshape(-1, t.shape[-1]).shape[0] for t in _flatten_features(feats))
        return total


class LlavaAdapter(TargetAdapter):
    """LLaVA-1.5 (`LlavaForConditionalGeneration`)."""

    model_types = ("llava",)


class LlavaNextAdapter(TargetAdapter):
    """LLaVA-NeXT / 1.6: any-resolution tiles, features need `image_sizes`."""

    model_types = ("llava_next",)

    def _feature_calls(self, inputs):
        calls = super()._feature_calls(inputs)
        return [
            (m, {**kw, "image_sizes": inputs["image_sizes"]})
            if m == "get_image_features"
            else (m, kw)
            for m, kw in calls
        ]

    max_patches: int | None = None  # OneVision: "anyres_max_N" shrinks larger tile grids

    def visual_grids(self, inputs):
        """An image is its base view (side x side) then its unpadded tiles with one newline
        column, rows x (cols + 1), as HF's `pack_image_features` lays them out."""
        sizes = inputs.get("image_sizes")
        sizes = [] if sizes is None else list(sizes)
        images = [
            self._anyres_blocks(size) if tiled else self._single_view_blocks()
            for size, tiled in zip(sizes, self._tiled(inputs, len(sizes)), strict=True)
        ]
        return self._blocks_per_run(inputs, images, self._video_blocks(inputs))

    def _tiled(self, inputs, num_images: int) -> list[bool]:
        """Which images are laid out any-res (all, for LLaVA-NeXT)."""
        return [True] * num_images

    def _single_view_blocks(self) -> list[Grid]:
        vc = self.config.vision_config
        side = vc.image_size // vc.patch_size
        return [(side, side), (1, 1)]  # the base view and its newline token

    def _video_blocks(self, inputs) -> list[list[Grid]]:
        return []

    def _anyres_blocks(self, size) -> list[Grid]:
        from transformers.models.llava_next.modeling_llava_next import (
            get_anyres_image_grid_shape,
        )

        vc = self.config.vision_config
        side = vc.image_size // vc.patch_size
        tiles_h, tiles_w = get_anyres_image_grid_shape(
            [int(x) for x in size], self.config.image_grid_pinpoints, vc.image_size
        )
        h, w = tiles_h * side, tiles_w * side
        oh, ow = (int(x) for x in size)
        if ow / oh > w / h:  # HF's unpad_image: the padding the resize added is cut off
            h -= 2 * ((h - int(round(oh * (w / ow), 7))) // 2)
        else:
            w -= 2 * ((w - int(round(ow * (h / oh), 7))) // 2)
        if self.max_patches:
            ratio = math.sqrt(h * w / (self.max_patches * side**2))
            if ratio > 1.1:
                h, w = int(h // ratio), int(w // ratio)
        return [(side, side), (h, w + 1)]


class LlavaOnevisionAdapter(LlavaNextAdapter):
    """LLaVA-OneVision: images (any-res) and video frames."""

    model_types = ("llava_onevision",)
    video_token_field = "video_token_index"

    @property
    def max_patches(self) -> int | None:  # type: ignore[override]
        ratio = getattr(self.config, "vision_aspect_ratio", "anyres_max_9")
        return int(ratio.removeprefix("anyres_max_")) if ratio.startswith("anyres_max_") else None

    def _tiled(self, inputs, num_images: int) -> list[bool]:
        """OneVision tiles only an image alone in its sample (HF's `batch_num_images`); with
        several, each is its base view and a newline token."""
        counts = inputs.get("batch_num_images")
        if counts is None:
            return [True] * num_images
        return [int(n) == 1 for n in counts for _ in range(int(n))]

    def _video_blocks(self, inputs) -> list[list[Grid]]:
        """A clip: every frame pooled to ceil(side/2) x ceil(side/2), then one newline token."""
        videos = inputs.get("pixel_values_videos")
        if videos is None:
            return []
        vc = self.config.vision_config
        pooled = math.ceil(vc.image_size // vc.patch_size / 2)
        return [[(pooled, pooled)] * videos.shape[1] + [(1, 1)] for _ in range(videos.shape[0])]


class Qwen2VLAdapter(TargetAdapter):
    """Qwen2-VL and Qwen2.5-VL: M-RoPE positions need `mm_token_type_ids`.

    M-RoPE gives every token a (temporal, height, width) position. Text advances all three
    together; an image or video block advances them by its grid extent, not by its token count,
    so after the prompt a text token at sequence index i sits at i + delta on every axis, where
    delta (<= 0, HF's `rope_deltas`) comes from the prompt's grids. `generate` adds the same
    delta while decoding; a tree node at depth d gets past + d + delta.
    """

    model_types = ("qwen2_vl", "qwen2_5_vl")
    image_token_field = "image_token_id"
    video_token_field = "video_token_id"

    def visual_grids(self, inputs):
        """Each image its (h, w) grid after the spatial merge; a video one such grid per
        temporal patch (`*_grid_thw` counts patches before the merge)."""
        merge = self.config.vision_config.spatial_merge_size

        def blocks(thw) -> list[list[Grid]]:
            rows = [] if thw is None else thw.tolist()
            return [[(h // merge, w // merge)] * t for t, h, w in rows]

        images, videos = blocks(inputs.get("image_grid_thw")), blocks(inputs.get("video_grid_thw"))
        return self._blocks_per_run(inputs, images, videos)

    def model_inputs(self, inputs):
        inputs = dict(inputs)
        if inputs.get("mm_token_type_ids") is None:
            ids = inputs["input_ids"]
            types = torch.zeros_like(ids, dtype=torch.int32)
            types[ids == self.config.image_token_id] = 1
            types[ids == self.config.video_token_id] = 2
            inputs["mm_token_type_ids"] = types
        return inputs

    def rope_offset(self, inputs):
        inputs = self.model_inputs(inputs)
        grids = {
            k: inputs[k]
            for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")
            if inputs.get(k) is not None
        }
        if not grids:  # a text-only prompt has plain 1D positions on all three axes
            return 0
        ids = inputs["input_ids"]
        if ids.shape[0] != 1:
            raise TargetMismatchError(f"rope_offset needs batch size 1, got {ids.shape[0]}")
        _, deltas = self.model.model.get_rope_index(
            ids,
            mm_token_type_ids=inputs["mm_token_type_ids"],
            attention_mask=inputs.get("attention_mask"),
            **grids,
        )  # deltas: (B, 1)
        return int(deltas.reshape(-1)[0])

    def text_position_ids(self, positions, offset):
        # (B, T) -> (3, B, T): temporal, height and width advance together for text
        return (positions + offset).unsqueeze(0).expand(3, -1, -1)

    def _feature_calls(self, inputs):
        calls = []
        if inputs.get("pixel_values") is not None:
            calls.append(
                (
                    "get_image_features",
                    {
                        "pixel_values": inputs["pixel_values"],
                        "image_grid_thw": inputs["image_grid_thw"],
                    },
                )
            )
        if inputs.get("pixel_values_videos") is not None:
            calls.append(
                (
                    "get_video_features",
                    {
                        "pixel_values_videos": inputs["pixel_values_videos"],
                        "video_grid_thw": inputs["video_grid_thw"],
                    },
                )
            )
        return calls


class Idefics3Adapter(TargetAdapter):
    """Idefics3 and SmolVLM: pixel-shuffled SigLIP tiles, optional `pixel_attention_mask`."""

    model_types = ("idefics3", "smolvlm")
    image_token_field = "image_token_id"

    def _feature_calls(self, inputs):
        calls = super()._feature_calls(inputs)
        mask = inputs.get("pixel_attention_mask")
        return [(m, {**kw, "pixel_attention_mask": mask}) for m, kw in calls]


class Gemma3Adapter(TargetAdapter):
    """Gemma3: fixed `mm_tokens_per_image` soft tokens per image."""

    model_types = ("gemma3",)
    tree_decoding_blocker = "sliding-window layers with a custom 4D tree mask are unverified"


ADAPTERS: tuple[type[TargetAdapter], ...] = (
    LlavaAdapter,
    LlavaNextAdapter,
    LlavaOnevisionAdapter,
    Qwen2VLAdapter,
    Idefics3Adapter,
    Gemma3Adapter,
)


def adapter_for(model: nn.Module) -> TargetAdapter:
    """The adapter for `model`'s family, chosen by `config.model_type`."""
    model_type = model.config.model_type
    for cls in ADAPTERS:
        if model_type in cls.model_types:
            return cls(model)
    known = sorted(t for cls in ADAPTERS for t in cls.model_types)
    raise TargetMismatchError(f"no target adapter for model_type {model_type!r}; known: {known}")
