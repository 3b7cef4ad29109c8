"""The speculative runner: exported target + drafter folders in, tokens and honest counters out.

    >>> runner = SpecRunner.from_folders("checkpoints/toy-target", "checkpoints/toy-drafter")
    >>> result = runner.generate(image, "Describe the image.", max_new_tokens=96,
    ...                          settings=DraftSettings(mode="tree", depth=6))
    >>> result.text, result.tau, result.acceptance_per_depth

One round: the drafter grows a chain or tree under the last bonus token, the target verifies
the whole tree in one forward (4D tree mask over its KV cache), the accepted path is kept in both
caches and the target's own next token is emitted as the bonus. Greedy verification gives exactly
the tokens of `generate(do_sample=False)`; sampling verification is lossless in distribution.
The target sees the image once, at prefill; the visual-token-free drafter never sees it. A prompt
may show several images, or a video's frames (`Media`, inference/media.py): as a video to
families whose processor takes one, else as a run of images.

`generate` is the `sync` protocol of inference/protocols.py over an in-process link: the same
edge and device roles and typed messages that `covspec simulate` prices over a simulated
wireless link, with no link cost. Batch size is 1: a tree per sequence and per-sequence cache
pruning are what make the round lossless and cheap.

An elastic drafter (a critic-gated compressor) runs at any price of a prefix row:
`for_drafter_folder(..., gate_cost_weight=W)`; `priced_drafters` expands a list of folders into
one run per price for the bench and the simulator.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from covspec.inference.features import FeatureEncoder
from covspec.inference.kernel import DrafterKernel
from covspec.inference.media import Encoded, Media, as_media
from covspec.inference.protocols import run_protocol
from covspec.inference.roles import Request
from covspec.inference.timeline import GenerationResult, Timeline
from covspec.inference.tree import DraftSettings
from covspec.inference.vlm_drafter import check_same_tokenizer, is_device_vlm, load_device_vlm
from covspec.modeling.adapters import TargetAdapter, TargetMismatchError, adapter_for
from covspec.modeling.drafter import Drafter, DrafterConfig
from covspec.modeling.drafter_inputs import target_layer_ids
from covspec.modeling.identity import resolve_source, target_identity
from covspec.modeling.tokens import fingerprint_vocab

__all__ = [
    "GenerationResult",
    "Media",
    "SpecRunner",
    "build_prompt",
    "eos_ids",
    "suppressed_tokens",
]


def build_prompt(processor, prompt: str, has_image: bool | int = True, video: bool = False) -> str:
    """The chat-templated user turn: `has_image` image slots (True: one), a video slot, then
    the text (visuals first, as lmms-eval places them for non-interleaved prompts)."""
    content = [{"type": "image"} for _ in range(int(has_image))]
    content += [{"type": "video"}] if video else []
    content += [{"type": "text", "text": prompt}]
    return processor.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )


def eos_ids(model) -> set[int]:
    eos = model.generation_config.eos_token_id
    eos = eos if eos is not None else model.config.get_text_config().eos_token_id
    return set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])


def suppressed_tokens(model, adapter: TargetAdapter) -> list[int]:
    """Ids the target must never emit: its configured suppress_tokens and its visual placeholders.

    HF baselines get the same list (`suppress_tokens=`), which also stops transformers' prompt
    lookup from proposing placeholder tokens copied out of the prompt (it crashes VLMs).
    """
    configured = model.generation_config.suppress_tokens or []
    return sorted(set(configured) | set(adapter.visual_token_ids()))


class SpecRunner:
    def __init__(self, model, processor, drafter: Drafter | None, device_vlm=None) -> None:
        """`drafter`: a feature-fed covspec drafter; or `device_vlm`: a small VLM drafting on
        the device with its own image encoding (inference/vlm_drafter.py). One of the two, or
        none (`edge_only`, scripted drafters in tests)."""
        if drafter is not None and device_vlm is not None:
            raise ValueError("give a covspec drafter or a small-VLM drafter, not both")
        self.model = model.eval()
        self.processor = processor
        self.adapter: TargetAdapter = adapter_for(model)
        if self.adapter.tree_decoding_blocker:
            raise TargetMismatchError(
                f"the runner does not support {model.config.model_type} targets yet: "
                f"{self.adapter.tree_decoding_blocker}"
            )
        self.drafter = drafter
        self.device_vlm = device_vlm.eval() if device_vlm is not None else None
        if device_vlm is not None and device_vlm.device != model.device:
            raise ValueError(
                f"device drafter is on {device_vlm.device}, target on {model.device}: load both on one device"
            )
        if drafter is not None:
            if drafter.device != model.device:
                raise ValueError(
                    f"drafter is on {drafter.device}, target on {model.device}: load both on one device"
                )
            fingerprint = fingerprint_vocab(processor.tokenizer.get_vocab())
            drafter.attach_target(self.adapter, fingerprint, target_identity(model))
            drafter.eval()
        self._kernel: DrafterKernel | None = None
        self.layers = self._layers()
        self.eos = eos_ids(model)
        self.suppress_tokens = suppressed_tokens(model, self.adapter)
        self._suppress_ids = torch.tensor(self.suppress_tokens, dtype=torch.long)
        self.visual_ids = torch.tensor(self.adapter.visual_token_ids(), dtype=torch.long)

    @classmethod
    def from_folders(
        cls,
        target: str,
        drafter: str | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> SpecRunner:
        """Load exported folders onto `device` (the drafter in the target's dtype)."""
        target = resolve_source(target, "target")  # a missing local folder never hits the Hub
        drafter = resolve_source(drafter, "drafter") if drafter else None
        model = AutoModelForImageTextToText.from_pretrained(target, dtype=dtype).to(device)
        processor = AutoProcessor.from_pretrained(target)
        if drafter and is_device_vlm(drafter):
            check_same_tokenizer(processor, drafter)
            return cls(model, processor, None, load_device_vlm(drafter, dtype).to(device))
        loaded = Drafter.from_pretrained(drafter).to(device, dtype) if drafter else None
        return cls(model, processor, loaded)

    @classmethod
    def for_drafter_folder(
        cls, model, processor, folder: str, gate_cost_weight: float | None = None
    ) -> SpecRunner:
        """A runner on a loaded target with the drafter at `folder`, either kind;
        `gate_cost_weight`: the price its critic gate puts on a prefix row (None: its own)."""
        if is_device_vlm(folder):
            if gate_cost_weight is not None:
                raise ValueError(f"{folder} is a small-VLM drafter: it has no gate to price")
            check_same_tokenizer(processor, folder)
            return cls(
                model, processor, None, load_device_vlm(folder, model.dtype).to(model.device)
            )
        drafter = Drafter.from_pretrained(folder).to(model.device, model.dtype)
        if gate_cost_weight is not None:
            if drafter.config.visual_prefix != "compressed":
                raise ValueError(f"{folder} has no visual compressor: it has no gate to price")
            drafter.set_cost_weight(gate_cost_weight)
        return cls(model, processor, drafter)

    @property
    def gate_cost_weight(self) -> float | None:
        """The price the drafter's gate puts on a prefix row; None without a gate."""
        d = self.drafter
        if d is None or d.config.visual_prefix != "compressed" or len(d.compressor.parsed) < 2:
            return None
        return d.compressor.config.cost_weight

    @property
    def has_drafter(self) -> bool:
        return self.drafter is not None or self.device_vlm is not None

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def takes_video(self) -> bool:
        """Whether video frames reach the processor as a video: the family has video tokens and
        the processor a video processor. Otherwise frames are shown as a run of images, the way
        lmms-eval feeds video benchmarks to image-only models."""
        has_processor = getattr(self.processor, "video_processor", None) is not None
        return self.adapter.video_token_field is not None and has_processor

    def encode(self, image, prompt: str) -> dict:
        """Processor inputs for one prompt, on the model's device. `image`: None, a PIL image,
        a list of them, a Media (images and one video's frames) or an already Encoded prompt."""
        if isinstance(image, Encoded):
            return image.inputs
        media = as_media(image)
        images = list(media.images) if media else []
        video = media.video if media else None
        if video is not None and not self.takes_video:
            images, video = images + list(video), None
        visuals = {"images": images} if images else {}
        if video is not None:
            visuals["videos"] = [video]
        inputs = self.processor(
            text=build_prompt(self.processor, prompt, len(images), video is not None),
            return_tensors="pt",
            **visuals,
        )
        return inputs.to(self.device)

    def check_length(self, prompt_len: int, max_new_tokens: int) -> None:
        limit = getattr(self.adapter.text_config, "max_position_embeddings", None)
        if limit is not None and prompt_len + max_new_tokens > limit:
            raise ValueError(
                f"prompt of {prompt_len} tokens + max_new_tokens {max_new_tokens} exceeds the target's context of {limit} tokens"
            )

    @torch.inference_mode()
    def greedy(self, image, prompt: str, max_new_tokens: int, **generate_kwargs) -> list[int]:
        """The target's own greedy answer through HF `generate` (the reference lossless
        decoding must equal, and the baseline it is timed against): the same prompt tokens
        and suppressed visual placeholders as `generate` below. `generate_kwargs`: e.g.
        `prompt_lookup_num_tokens` for transformers' prompt-lookup baseline."""
        if max_new_tokens <= 0:
            return []
        inputs = self.encode(image, prompt)
        out = self.model.generate(
            **inputs, do_sample=False, max_new_tokens=max_new_tokens,
            suppress_tokens=self.suppress_tokens, **generate_kwargs,
        )  # fmt: skip
        return out[0, inputs["input_ids"].shape[1] :].tolist()

    @torch.inference_mode()
    def generate(
        self,
        image,
        prompt: str,
        max_new_tokens: int = 128,
        settings: DraftSettings | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        source_factory=None,
        observers=(),
    ) -> GenerationResult:
        """Speculative decoding of one prompt (the `sync` protocol, in process).
        `source_factory(runner, downlink, capacity)` replaces the drafter (tests script one);
        `observers` receive one RoundRecord per target forward."""
        if isinstance(image, (list, tuple)):  # the link accounting saves the visual input
            image = as_media(image)
        req = Request(image, prompt, max_new_tokens, temperature, top_p, seed)
        return run_protocol(
            "sync",
            self,
            req,
            Timeline(None, vocab_size=self.adapter.vocab_size),
            settings or DraftSettings(),
            observers,
            source_factory,
        )

    # -- what the roles use -----------------------------------------------------------------
    def kernel(self) -> DrafterKernel:
        """The drafter's fused decode path, built once per runner (weights are frozen here)."""
        if self._kernel is None:
            if self.drafter is None:
                raise ValueError("this runner has no drafter")
            self._kernel = DrafterKernel(self.drafter)
        return self._kernel

    def feature_encoder(self, wire: bool = False) -> FeatureEncoder | None:
        """The edge half of the drafter's feature path; over a real link rows travel as
        float16 (`wire`), in process at the drafter's dtype."""
        if self.drafter is None:
            return None
        return FeatureEncoder(self.drafter, torch.float16 if wire else None)

    @property
    def fused_ids(self) -> list[int]:
        return self.drafter.config.fused_layer_ids

    def _layers(self) -> list[int]:
        """Target layers to capture: the drafter's fused ids (+ embeddings for a visual prefix)."""
        if self.drafter is None:
            return []
        return target_layer_ids(self.drafter.config)

    def suppress(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.index_fill(-1, self._suppress_ids.to(logits.device), float("-inf"))


def priced_drafters(
    drafters: list[str], weights: Sequence[float] = ()
) -> list[tuple[str, float | None, str]]:
    """(folder, price, run name) per drafter run: a critic-gated drafter once per price of a
    prefix row in `weights` (named `FOLDER_NAME@cwW`), every other drafter once as it is."""
    names = [(d, None, Path(d).name) for d in drafters]
    if not weights:
        return names
    if len(set(weights)) != len(weights):
        raise ValueError(f"gate cost weights repeat an entry: {list(weights)}")
    gated = {d for d in drafters if _is_gated(d)}
    if not gated:
        raise ValueError(
            f"gate cost weights {list(weights)} need a drafter with a gated compressor; "
            f"none of {drafters} has one"
        )
    return [
        (d, w, f"{name}@cw{w:g}") if d in gated else (d, None, name)
        for d, _, name in names
        for w in (weights if d in gated else [None])
    ]


def _is_gated(folder: str) -> bool:
    if is_device_vlm(folder):
        return False
    cfg = DrafterConfig.from_pretrained(folder)
    return cfg.visual_prefix == "compressed" and len(cfg.compressor_config().options) > 1
