"""What identifies a target model, and where a model argument lives (a folder or the Hub).

    >>> target_identity(model)     # {"target_config_digest": "3f..", "target_weights_digest": "a1.."}
    >>> weights_digest("checkpoints/toy-target")        # 16 hex chars, None without safetensors
    >>> resolve_source("checkpoints/toy-targte", "target")   # FileNotFoundError: folder not found

A drafter records its target's identity (drafter.py) and the runner and a resumed run refuse
another one. Three parts, each named in a refusal: the architecture (`config_digest`: the
fields that shape the network, read the same way by every transformers version), the tokenizer
(modeling/tokens.py) and the weights (`weights_digest`): every tensor's name, dtype and shape
from the safetensors headers plus three 64-byte samples of its data (start, middle, end), read
with seeks. That costs milliseconds for a 7B target, does not depend on sharding or on the dtype
the model is loaded in, and changes when the target is retrained or fine-tuned.

Model arguments that look like local paths (an existing first folder, several slashes, `./`,
`~`, ...) never fall back to the Hub: a missing one is "folder not found", not a Hub error
after a minute of retries.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

from covspec.modeling.adapters import TargetMismatchError

_TEXT_KEYS = (
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps",
    "max_position_embeddings", "tie_word_embeddings",
)  # fmt: skip
_TOP_KEYS = (
    "model_type", "image_token_id", "video_token_id", "vision_feature_layer",
    "vision_feature_select_strategy", "projector_hidden_act",
)  # fmt: skip
_VISION_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "image_size", "patch_size")
_SAMPLE = 64  # bytes read at each of three places in every tensor


def looks_local(source: str) -> bool:
    """Whether a model argument is meant as a local path rather than a Hub id `org/name`."""
    path = Path(source).expanduser()
    if source.startswith(("/", "./", "../", "~", ".\\")) or "\\" in source:
        return True
    parts = source.strip("/").split("/")
    return len(parts) != 2 or source.endswith("/") or Path(parts[0]).is_dir() or path.exists()


def resolve_source(source: str, what: str = "model") -> str:
    """`source` as given when it exists locally or reads as a Hub id; a path-like argument that
    does not exist is a FileNotFoundError naming it (never a Hub lookup)."""
    path = Path(str(source)).expanduser()
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(f"{what} {source} is a file, expected a model folder")
        return str(path)
    if looks_local(str(source)):
        raise FileNotFoundError(f"{what} folder not found: {source}")
    return str(source)


def model_folder(source: str | None) -> Path | None:
    """The local folder of a model: `source` itself, or a Hub id's cached snapshot (never
    downloaded here); None when there is none."""
    if not source:
        return None
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if looks_local(source):
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, local_files_only=True))
    except Exception:  # not cached, or not a valid id: no digest rather than a network call
        return None


def _tensor_samples(path: Path) -> list[tuple[str, str, list[int], bytes]]:
    """(name, dtype, shape, sampled bytes) of every tensor in a safetensors file."""
    out = []
    with path.open("rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
        base = 8 + size
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            n = min(_SAMPLE, end - begin)
            chunks = []
            for at in (begin, begin + (end - begin - n) // 2, end - n):
                f.seek(base + at)
                chunks.append(f.read(n))
            out.append((name, info["dtype"], list(info["shape"]), b"".join(chunks)))
    return out


def weights_digest(source: str | Path | None) -> str | None:
    """16 hex chars identifying a model's weights (see module doc); None without safetensors."""
    folder = model_folder(str(source)) if source else None
    files = sorted(folder.glob("*.safetensors")) if folder else []
    if not files:
        return None
    h = hashlib.sha256()
    for name, dtype, shape, data in sorted(t for f in files for t in _tensor_samples(f)):
        h.update(json.dumps([name, dtype, shape]).encode())
        h.update(data)
    return h.hexdigest()[:16]


def config_digest(config) -> str:
    """16 hex chars over the config fields that shape the network (text, vision, top level)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    rope = getattr(text, "rope_parameters", None)
    theta = rope.get("rope_theta") if isinstance(rope, dict) else getattr(text, "rope_theta", None)
    vision = getattr(config, "vision_config", None)
    fields = {
        "top": {k: getattr(config, k, None) for k in _TOP_KEYS},
        "text": {k: getattr(text, k, None) for k in _TEXT_KEYS},
        "rope_theta": theta,
        "vision": {k: getattr(vision, k, None) for k in _VISION_KEYS} if vision else None,
    }
    blob = json.dumps(fields, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def target_identity(model) -> dict[str, str | None]:
    """The identity fields a drafter records for `model` (a loaded HF model)."""
    return {
        "target_config_digest": config_digest(model.config),
        "target_weights_digest": weights_digest(getattr(model, "name_or_path", None) or None),
    }


IDENTITY_FIELDS = ("target_config_digest", "target_weights_digest", "tokenizer_fingerprint")


def check_identity(recorded: dict, actual: dict, what: str = "drafter") -> None:
    """Refuse when `recorded` (a drafter config or checkpoint) names another target than
    `actual`, naming the field. A field the target has and the record lacks is refused too:
    a missing (or nulled) value would switch its check off."""
    for field, got in actual.items():
        want, label = recorded.get(field), field.removeprefix("target_").replace("_", " ")
        if got is None:
            continue
        if want is None:
            raise TargetMismatchError(
                f"{what} records no {label} ({field}: edited, or made before covspec recorded its "
                "target's identity), so it cannot be checked against this target: retrain it, "
                "or re-export it from its Lightning checkpoint with `covspec export-checkpoint`"
            )
        if want != got:
            raise TargetMismatchError(
                f"{what} was trained for a target with {label} {want!r}, this target has "
                f"{got!r} (another or a retrained target; field {field})"
            )
