"""Turn a chat conversation + images into model inputs with an assistant-token loss mask.

Works through the target's own processor and chat template, for any family whose template
renders prefixes consistently (every HF chat template we know does):

    >>> enc = encode_conversation(processor, messages, images=[img])
    >>> enc["input_ids"].shape, enc["loss_mask"].sum()      # (1, T), number of answer tokens

The mask covers each assistant message's content plus the template's end-of-turn text, so the
model learns to stop. Image placeholders are expanded by the processor; the char spans are mapped
through its replacement offsets, so no family-specific token arithmetic lives here.
"""

from __future__ import annotations

from typing import Any

import torch


class ConversationError(ValueError):
    """A conversation that cannot be encoded (empty, no assistant turn, bad roles)."""


def validate_messages(messages: Any, where: str = "") -> list[dict]:
    """Check the LLaVA-style messages schema; `where` names the source in the error."""
    prefix = f"{where}: " if where else ""
    if not isinstance(messages, list) or not messages:
        raise ConversationError(f"{prefix}empty conversation (got {messages!r})")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise ConversationError(
                f"{prefix}message {i} needs a role system/user/assistant: {m!r}"
            )
        if not isinstance(m.get("content"), (str, list)):
            raise ConversationError(f"{prefix}message {i} has no content: {m!r}")
        if isinstance(m["content"], str) and not m["content"].strip():
            raise ConversationError(f"{prefix}message {i} ({m['role']}) is empty or whitespace")
    if not any(m["role"] == "assistant" for m in messages):
        raise ConversationError(f"{prefix}conversation has no assistant turn")
    return messages


def to_content_items(messages: list[dict], placeholder: str = "<image>") -> list[dict]:
    """LLaVA-style string content with literal `<image>` -> transformers' typed content items.

    Every family's chat template understands {"type": "image"} items, while only LLaVA's own
    would pass a literal placeholder through. The newline LLaVA puts after the placeholder is
    dropped, as templates add their own separators.
    """
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, str):
            items: list[dict] = []
            for i, piece in enumerate(content.split(placeholder)):
                if i:
                    items.append({"type": "image"})
                    piece = piece[1:] if piece.startswith("\n") else piece
                if piece:
                    items.append({"type": "text", "text": piece})
            content = items
        out.append({**m, "content": content})
    return out


def frames_as_images(
    messages: list[dict], num_frames: int, placeholder: str = "<video>"
) -> list[dict]:
    """A video placeholder -> `num_frames` image placeholders, one per line: how a clip is
    shown to a target without a video processor (the runner and lmms-eval do the same)."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    images = "\n".join(["<image>"] * num_frames)
    return [
        {**m, "content": m["content"].replace(placeholder, images)}
        if isinstance(m["content"], str)
        else m
        for m in messages
    ]


def assistant_char_spans(processor, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the (start, end) char span of every assistant turn."""
    render = processor.apply_chat_template
    text = render(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head = render(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        full = render(messages[: i + 1], tokenize=False)
        if not text.startswith(full) or not full.startswith(head):
            raise ConversationError("the chat template does not render prefixes consistently")
        spans.append((len(head), len(full)))
    return text, spans


def _shift(pos: int, replacements: list[dict]) -> int:
    """Map a char position of the unexpanded text into the placeholder-expanded text."""
    delta = 0
    for r in replacements:
        (s0, s1), (n0, n1) = r["span"], r["new_span"]
        if s1 <= pos:
            delta += (n1 - n0) - (s1 - s0)
    return pos + delta


def encode_conversation(
    processor, messages: list[dict], images: list | None = None, max_length: int | None = None
) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask, loss_mask (all (1, T)) plus the processor's vision tensors."""
    text, spans = assistant_char_spans(processor, to_content_items(validate_messages(messages)))
    out = processor(
        images=images or None,
        text=text,
        return_tensors="pt",
        return_offsets_mapping=True,
        return_text_replacement_offsets=True,
    )
    replacements = out.pop("text_replacement_offsets")[0]
    out["loss_mask"] = _loss_mask(out.pop("offset_mapping")[0], spans, replacements)
    if max_length is not None and out["input_ids"].shape[1] > max_length:
        raise ConversationError(
            f"conversation is {out['input_ids'].shape[1]} tokens, over max_length={max_length}"
        )
    return dict(out)


def _loss_mask(offsets: torch.Tensor, spans: list, replacements: list[dict]) -> torch.Tensor:
    """(1, T): tokens whose text starts inside an assistant span of the unexpanded text."""
    starts = offsets[:, 0]  # offsets: (T, 2)
    loss_mask = torch.zeros_like(starts, dtype=torch.bool)
    for s, e in spans:
        loss_mask |= (starts >= _shift(s, replacements)) & (starts < _shift(e, replacements))
    # Zero-width tokens (none in byte-level BPE, some in sentencepiece) carry no answer text.
    loss_mask &= offsets[:, 1] > offsets[:, 0]
    return loss_mask[None]


def encode_image_slots(
    processor, messages: list[dict], tokens_per_image: int
) -> dict[str, torch.Tensor]:
    """What `encode_conversation` gives for `messages` with images of `tokens_per_image` tokens
    each (input_ids, attention_mask, loss_mask), without any image: every image placeholder is
    expanded as the processor expands it, for a caller that fills the slots with embeddings of
    its own. Nothing is drawn or preprocessed, which is the point on long clips."""
    if tokens_per_image < 1:
        raise ValueError(f"tokens_per_image must be >= 1, got {tokens_per_image}")
    text, spans = assistant_char_spans(processor, to_content_items(validate_messages(messages)))
    token = processor.image_token
    pieces, replacements, pos, new_pos = [], [], 0, 0
    while (hit := text.find(token, pos)) >= 0:
        pieces.append(text[pos:hit] + token * tokens_per_image)
        new_pos += hit - pos
        end = new_pos + len(token) * tokens_per_image
        replacements.append({"span": (hit, hit + len(token)), "new_span": (new_pos, end)})
        pos, new_pos = hit + len(token), end
    expanded = "".join(pieces) + text[pos:]
    enc = processor.tokenizer(expanded, return_offsets_mapping=True, return_tensors="pt")
    return {
        "input_ids": enc["input_ids"],
        "attention_mask": enc["attention_mask"],
        "loss_mask": _loss_mask(enc["offset_mapping"][0], spans, replacements),
    }


def truncate_encoding(
    enc: dict[str, torch.Tensor], max_length: int, visual_ids: list[int]
) -> dict[str, torch.Tensor] | None:
    """Cut a single-sample encoding to `max_length` tokens, or None when that is impossible
    without losing visual placeholders (the model would refuse the image) or every answer token.
    Per-token tensors, shaped (1, T) like input_ids, are cut alongside; vision tensors are kept."""
    ids = enc["input_ids"][0]
    t = ids.shape[0]
    if t <= max_length:
        return enc
    visual = torch.isin(ids, torch.tensor(visual_ids, dtype=ids.dtype)).nonzero()
    if len(visual) and int(visual[-1]) >= max_length:
        return None
    if not enc["loss_mask"][0, :max_length].any():
        return None
    return {
        k: v[:, :max_length] if v.dim() == 2 and v.shape == (1, t) else v for k, v in enc.items()
    }


def pad_batch(encodings: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of single-sample encodings into a batch; vision tensors are concatenated."""
    length = max(e["input_ids"].shape[1] for e in encodings)
    batch: dict[str, torch.Tensor] = {}
    for key, fill in (("input_ids", pad_id), ("attention_mask", 0), ("loss_mask", False)):
        rows = []
        for e in encodings:
            row = e[key][0]
            rows.append(torch.cat([row, row.new_full((length - row.shape[0],), fill)]))
        batch[key] = torch.stack(rows)
    for key in {k for e in encodings for k in e} - set(
        batch
    ):  # vision tensors; text-only rows have none
        batch[key] = torch.cat([e[key] for e in encodings if key in e])
    return batch
