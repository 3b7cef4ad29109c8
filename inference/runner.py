"""The speculative runner: exported target + drafter folders in, tokens and honest counters out.

    >>> runner = SpecRunner.from_folders("checkpoints/toy-target", "checkpoints/toy-drafter")
    >>> result = runner.generate(image, "Describe the image.", max_new_tokens=96,
    ...                          settings=DraftSettings(mode="tree", depth=6))
    >>> result.text, result.tau, result.acceptance_per_depth

One round: the drafter grows a chain or tree under the last bonus token, the target verifies
the whole tree in one forward (4D tree mask over its KV cache), the accepted path is kept in both
caches and the target's own next token is emitted as the bonus. Greedy verification gives exactly
the tokens of `generate(do_sample=False)`; sampling verification is lossless in distribution.
The target sees the image once, at prefill; the visual-token-free drafter never sees it.

Batch size is 1: a tree per sequence and per-sequence cache pruning are what make the round
lossless and cheap. Larger batches would pad every tree to the longest accepted path.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from covspec.inference.drafting import DrafterSide, keep_cache_positions
from covspec.inference.kernel import DrafterKernel
from covspec.inference.tree import (
    DraftSettings,
    DraftTree,
    grow,
    tree_attention_mask,
    verify_greedy,
    verify_sampling,
)
from covspec.modeling.adapters import TargetAdapter, TargetMismatchError, adapter_for
from covspec.modeling.drafter import Drafter
from covspec.modeling.tokens import fingerprint_vocab


@dataclass
class GenerationResult:
    tokens: list[int]
    text: str
    rounds: int = 0  # target forwards in the decode loop (prefill excluded)
    drafted: int = 0  # draft tokens verified, summed over rounds
    attempts_per_depth: list[int] = field(default_factory=list)
    accepted_per_depth: list[int] = field(default_factory=list)
    # wall seconds per phase: encode, prefill (target), drafter_prefill, draft, verify, commit
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def tau(self) -> float:
        """Tokens emitted per target forward in the decode loop, the bonus token included."""
        return (len(self.tokens) - 1) / self.rounds if self.rounds else float("nan")

    @property
    def acceptance_per_depth(self) -> list[float]:
        return [
            a / n if n else float("nan")
            for a, n in zip(self.accepted_per_depth, self.attempts_per_depth, strict=True)
        ]


def build_prompt(processor, prompt: str, has_image: bool = True) -> str:
    content = ([{"type": "image"}] if has_image else []) + [{"type": "text", "text": prompt}]
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


class PhaseClock:
    """Accumulates wall time per phase; synchronises CUDA so a phase owns its kernels' time."""

    def __init__(self, seconds: dict[str, float], device: torch.device) -> None:
        self.seconds = seconds
        self.cuda = device.type == "cuda"

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        if self.cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        yield
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start


class SpecRunner:
    def __init__(self, model, processor, drafter: Drafter | None) -> None:
        self.model = model.eval()
        self.processor = processor
        self.adapter: TargetAdapter = adapter_for(model)
        if self.adapter.tree_decoding_blocker:
            raise TargetMismatchError(
                f"the runner does not support {model.config.model_type} targets yet: "
                f"{self.adapter.tree_decoding_blocker}"
            )
        self.drafter = drafter
        if drafter is not None:
            drafter.attach_target(self.adapter, fingerprint_vocab(processor.tokenizer.get_vocab()))
            drafter.eval()
        self._kernel: DrafterKernel | None = None
        self.layers = self._layers()
        self.eos = eos_ids(model)
        self.suppress_tokens = suppressed_tokens(model, self.adapter)
        self._suppress_ids = torch.tensor(self.suppress_tokens, dtype=torch.long)

    @classmethod
    def from_folders(
        cls, target: str, drafter: str | None = None, dtype: torch.dtype = torch.float32
    ) -> SpecRunner:
        model = AutoModelForImageTextToText.from_pretrained(target, dtype=dtype)
        processor = AutoProcessor.from_pretrained(target)
        return cls(model, processor, Drafter.from_pretrained(drafter) if drafter else None)

    def encode(self, image, prompt: str) -> dict:
        return self.processor(
            images=[image] if image is not None else None,
            text=build_prompt(self.processor, prompt, image is not None),
            return_tensors="pt",
        )

    def check_length(self, prompt_len: int, max_new_tokens: int) -> None:
        limit = getattr(self.adapter.text_config, "max_position_embeddings", None)
        if limit is not None and prompt_len + max_new_tokens > limit:
            raise ValueError(
                f"prompt of {prompt_len} tokens + max_new_tokens {max_new_tokens} exceeds the target's context of {limit} tokens"
            )

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
    ) -> GenerationResult:
        """Speculative decoding of one prompt. `source_factory(runner, inputs, target_out, bonus, capacity)`
        replaces the drafter (tests script one)."""
        if self.drafter is None and source_factory is None:
            raise ValueError("this runner has no drafter; load one or pass source_factory")
        settings = settings or DraftSettings()
        result = GenerationResult(
            [], "", attempts_per_depth=[0] * settings.depth, accepted_per_depth=[0] * settings.depth
        )
        clock = PhaseClock(result.seconds, self.model.device)
        with clock("encode"):
            inputs = self.encode(image, prompt)
        if inputs["input_ids"].shape[0] != 1:
            raise ValueError(f"batch size must be 1, got {inputs['input_ids'].shape[0]}")
        self.check_length(inputs["input_ids"].shape[1], max_new_tokens)
        if max_new_tokens <= 0:
            return result
        gen = torch.Generator().manual_seed(seed)
        with clock("prefill"):
            out = self.adapter.forward(inputs, self.layers, use_cache=True, logits_to_keep=1)
            bonus = self._pick(self._suppress(out.logits[0, -1:]), temperature, top_p, gen)
        past = inputs["input_ids"].shape[1]
        # drafter cache: the prompt, every new token, and the nodes one round's tree can add
        capacity = past + max_new_tokens + settings.depth * settings.beam + 1
        with clock("drafter_prefill"):
            source = (source_factory or DrafterSide.prefill)(self, inputs, out, bonus, capacity)
        tokens = [bonus]
        while len(tokens) < max_new_tokens and tokens[-1] not in self.eos:
            emitted = self._round(
                tokens[-1],
                source,
                out.cache,
                past,
                settings,
                temperature,
                top_p,
                gen,
                result,
                clock,
            )
            past += len(emitted)
            tokens += emitted
            stop = next((i for i, t in enumerate(tokens) if t in self.eos), None)
            if stop is not None:
                tokens = tokens[: stop + 1]
        result.tokens = tokens[:max_new_tokens]
        result.text = self.processor.tokenizer.decode(result.tokens, skip_special_tokens=True)
        return result

    def _round(
        self, root, source, cache, past, settings, temperature, top_p, gen, result, clock
    ) -> list[int]:
        """Draft, verify in one target forward, keep the accepted path. Returns the new tokens
        (accepted drafts, then the target's bonus token)."""
        sampling = temperature > 0
        with clock("draft"):
            tree = DraftTree(root_token=root)
            grow(tree, source, settings, temperature, gen if sampling else None)
            order = tree.select(
                None if sampling else settings.max_nodes, keep_sibling_prefix=sampling
            )
            ids = torch.tensor([[tree.tokens[n] for n in order]])
            pos = torch.tensor([[past + tree.depths[n] for n in order]])
            mask = tree_attention_mask(tree, order, past, self.model.dtype)
        with clock("verify"):
            out = self.adapter.text_forward(
                ids,
                self.layers,
                cache=cache,
                position_ids=pos,
                attention_mask=mask,
                use_cache=True,
            )
            logits = self._suppress(out.logits[0])  # (n, V)
            if sampling:
                probs = self._probs(logits, temperature, top_p)
                path, bonus = verify_sampling(tree, order, probs, gen)
            else:
                path, bonus = verify_greedy(tree, order, logits)
        self._count(result, tree, order, path)
        with clock("commit"):
            rows = [0] + [order.index(n) for n in path]
            keep_cache_positions(cache, past, rows)
            emitted = [tree.tokens[n] for n in path] + [bonus]
            source.commit(out, rows, emitted)
        return emitted

    # -- helpers ------------------------------------------------------------------------------
    def kernel(self) -> DrafterKernel:
        """The drafter's fused decode path, built once per runner (weights are frozen here)."""
        if self._kernel is None:
            if self.drafter is None:
                raise ValueError("this runner has no drafter")
            self._kernel = DrafterKernel(self.drafter)
        return self._kernel

    def _layers(self) -> list[int]:
        """Target layers to capture: the drafter's fused ids (+ embeddings for full_visual)."""
        if self.drafter is None:
            return []
        cfg = self.drafter.config
        return sorted(set(cfg.fused_layer_ids) | ({0} if cfg.variant == "full_visual" else set()))

    def _suppress(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.index_fill(-1, self._suppress_ids.to(logits.device), float("-inf"))

    @staticmethod
    def _probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
        probs = (logits.float() / temperature).softmax(-1)
        if top_p < 1.0:
            sorted_p, idx = probs.sort(-1, descending=True)
            drop = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest set reaching top_p
            sorted_p = sorted_p.masked_fill(drop, 0)
            probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
            probs = probs / probs.sum(-1, keepdim=True)
        return probs

    def _pick(
        self, logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator
    ) -> int:
        if temperature <= 0:
            return int(logits[-1].argmax())
        return int(
            torch.multinomial(self._probs(logits[-1:], temperature, top_p)[0], 1, generator=gen)
        )

    @staticmethod
    def _count(
        result: GenerationResult, tree: DraftTree, order: list[int], path: list[int]
    ) -> None:
        """Depth d counts as attempted when the node accepted at depth d-1 had a verified child."""
        result.rounds += 1
        result.drafted += len(order) - 1
        kept, node = set(order), 0
        for d in range(1, len(result.attempts_per_depth) + 1):
            if not any(c in kept for c in tree.children.get(node, [])):
                break
            result.attempts_per_depth[d - 1] += 1
            if len(path) < d:
                break
            result.accepted_per_depth[d - 1] += 1
            node = path[d - 1]
