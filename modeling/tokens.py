"""Tokenizer fingerprints: a drafter records the tokenizer it was trained with.

>>> tokenizer_fingerprint("checkpoints/toy-target")   # 16 hex chars, or None without one
>>> folder_tokenizer_fingerprint(Path("checkpoints/toy-target"))  # local folders only
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


def fingerprint_vocab(vocab: dict[str, int]) -> str:
    """Order-independent hash of a token -> id map."""
    blob = json.dumps(sorted(vocab.items()), ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def folder_tokenizer_fingerprint(folder: Path) -> str | None:
    """Fingerprint of the tokenizer saved in a local folder, None if it holds none (no Hub)."""
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not any((Path(folder) / n).is_file() for n in names):
        return None
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError):
        return None
    return fingerprint_vocab(tok.get_vocab())


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
