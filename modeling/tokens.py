"""Tokenizer fingerprints: a drafter records the tokenizer it was trained with.

>>> tokenizer_fingerprint("checkpoints/toy-target")   # 16 hex chars, or None without one
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


def fingerprint_vocab(vocab: dict[str, int]) -> str:
    """Order-independent hash of a token -> id map."""
    blob = json.dumps(sorted(vocab.items()), ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def tokenizer_fingerprint(target: str) -> str | None:
    """Fingerprint of the tokenizer saved with `target` (a folder or hub id), None if it has none."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(target)
    except (OSError, ValueError):
        if Path(target).is_dir():
            return None
        raise
    return fingerprint_vocab(tok.get_vocab())
