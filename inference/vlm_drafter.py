"""The device-side small-VLM drafter (CoVSpec's device model): a whole small VLM drafts.

    >>> small = load_device_vlm("checkpoints/toy-device-vlm")          # merged folder or a LoRA adapter
    >>> runner = SpecRunner(target, processor, drafter=None, device_vlm=small)
    >>> runner.generate(image, "Describe the image.", 96, DraftSettings(mode="tree"))

Unlike the feature-fed drafter, the small VLM sees the image itself and needs nothing from the
edge between rounds: no feature downlink, only the verdict. It keeps its own KV cache over the
whole prompt (visual tokens included); each round it runs the root (the last bonus token) and
then one forward per tree level with a tree mask over its cache, and after the verdict it keeps
the accepted path and drops the rest, as the target does. It must share the target's tokenizer
(checked at load) so its token ids are the target's.

A LoRA adapter folder (peft format, `adapter_config.json`) is loaded on its base model and merged
for inference; a merged folder loads directly.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText

from covspec.inference.drafting import keep_cache_positions
from covspec.inference.tree import DraftTree, additive_mask
from covspec.modeling.adapters import TargetMismatchError, adapter_for


def is_device_vlm(folder: str | Path) -> bool:
    """Whether a drafter folder holds a small VLM (merged) or a LoRA adapter for one."""
    folder = Path(folder)
    if (folder / "adapter_config.json").is_file():
        return True
    config = folder / "config.json"
    if not config.is_file():
        return False
    return json.loads(config.read_text()).get("model_type") != "covspec_drafter"


def load_device_vlm(folder: str | Path, dtype: torch.dtype = torch.float32):
    """A small VLM ready to draft: a merged HF folder, or a peft LoRA adapter merged into the
    base model named in its `adapter_config.json`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"device drafter folder {folder} does not exist")
    if (folder / "adapter_config.json").is_file():
        from peft import PeftModel

        base_path = json.loads((folder / "adapter_config.json").read_text())[
            "base_model_name_or_path"
        ]
        base = AutoModelForImageTextToText.from_pretrained(base_path, dtype=dtype)
        model = PeftModel.from_pretrained(base, folder).merge_and_unload()
    else:
        model = AutoModelForImageTextToText.from_pretrained(folder, dtype=dtype)
    return model.eval()


def check_same_tokenizer(target_processor, vlm_folder: str | Path) -> None:
    """Refuse a small VLM whose tokenizer is not the target's: its ids would mean other text."""
    from transformers import AutoTokenizer

    from covspec.modeling.tokens import fingerprint_vocab

    folder = Path(vlm_folder)
    if (folder / "adapter_config.json").is_file():
        folder = Path(
            json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
        )
    mine = fingerprint_vocab(AutoTokenizer.from_pretrained(folder).get_vocab())
    theirs = fingerprint_vocab(target_processor.tokenizer.get_vocab())
    if mine != theirs:
        raise TargetMismatchError(
            f"the device drafter at {vlm_folder} has another tokenizer than the target "
            f"(fingerprints {mine} vs {theirs}); a small-VLM drafter must share it"
        )


class VLMDrafterSide:
    """One request's small-VLM drafter state: its KV cache and the round's tree slots.

    Tokens the target emitted that this model has not run yet (the bonus, and accepted nodes of
    the tree's last level, which were drafted but never fed back) are `pending`: the next root
    forward runs them together, the last one being the root of the new tree."""

    def __init__(self, model, inputs: dict, first_token: int) -> None:
        self.model, self.adapter = model, adapter_for(model)
        self.device, self.dtype = model.device, model.dtype
        with torch.inference_mode():
            out = self.adapter.forward(inputs, (), use_cache=True, logits_to_keep=1)
        self.cache, self.past = out.cache, inputs["input_ids"].shape[1]
        self.prefill_tokens = self.past
        self.rope_offset = self.adapter.rope_offset(inputs)
        self.pending = [first_token]
        self.slots: dict[int, int] = {}  # tree node -> cache position, this round
        self.tree: DraftTree | None = None

    def _run(self, tokens: list[int], positions: list[int], mask: torch.Tensor) -> torch.Tensor:
        ids = torch.tensor([tokens], device=self.device)
        pos = torch.tensor([positions], device=self.device)
        out = self.adapter.text_forward(
            ids, (), cache=self.cache, use_cache=True, attention_mask=mask,
            position_ids=self.adapter.text_position_ids(pos, self.rope_offset),
        )  # fmt: skip
        return out.logits[0].float()  # (n, V)

    def root_logits(self) -> torch.Tensor:
        """Run the pending tokens (causally) after the committed context; the last is the root."""
        n = len(self.pending)
        rows = [i for i in range(n) for _ in range(i + 1)]
        cols = [self.past + j for i in range(n) for j in range(i + 1)]
        mask = additive_mask(n, self.past + n, self.past, rows, cols, self.dtype, self.device)
        logits = self._run(self.pending, list(range(self.past, self.past + n)), mask)
        self.past += n - 1  # all but the root are committed now
        self.slots, self.tree, self.pending = {0: self.past}, None, []
        return logits[-1]

    def expand(self, tree: DraftTree, nodes: list[int]) -> torch.Tensor:
        """One tree level: each node sees the context, the root and its ancestors."""
        self.tree = tree
        start = self.past + len(self.slots)
        for i, n in enumerate(nodes):
            self.slots[n] = start + i
        rows, cols = [], []
        for i, n in enumerate(nodes):
            while n >= 0:
                rows.append(i)
                cols.append(self.slots[n])
                n = tree.parents[n]
        mask = additive_mask(
            len(nodes), start + len(nodes), self.past, rows, cols, self.dtype, self.device
        )
        positions = [self.past + tree.depths[n] for n in nodes]
        return self._run([tree.tokens[n] for n in nodes], positions, mask)

    def commit(self, features, emitted: list[int]) -> None:
        """Keep the root and the accepted nodes this model already ran; the accepted tokens it
        did not run and the bonus become pending for the next root forward."""
        if 0 not in self.slots:  # a verdict on a subtree drafted earlier: nothing new ran
            self.pending += list(emitted)
            return
        kept, node, ran = [0], 0, 0
        for token in emitted[:-1]:
            child = None
            if self.tree is not None:
                child = next(
                    (c for c in self.tree.children.get(node, []) if self.tree.tokens[c] == token),
                    None,
                )
            if child is None or child not in self.slots:
                break
            kept.append(child)
            node, ran = child, ran + 1
        keep_cache_positions(self.cache, self.past, [self.slots[n] - self.past for n in kept])
        self.past += len(kept)
        self.pending = list(emitted[ran:])
        self.slots, self.tree = {}, None
