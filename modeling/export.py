"""Export a trained drafter as an EAGLE-3 checkpoint that serving engines load.

    >>> target = AutoModelForImageTextToText.from_pretrained(TARGET_DIR)
    >>> drafter = Drafter.from_pretrained(DRAFTER_DIR).attach_target(adapter_for(target))
    >>> export_drafter(drafter, "out/eagle3-speculators", format="speculators",
    ...                target_architectures=target.config.architectures)
    >>> # then: Eagle3DraftModel.from_pretrained("out/eagle3-speculators"), or
    >>> # vllm serve TARGET --speculative-config '{"model": "out/eagle3-speculators"}'

Two layouts, one folder each (config.json + model.safetensors + README.md):

- `speculators`: the `speculators` library's EAGLE-3 format (v0.9), which vLLM reads directly
  (`speculators_model_type: eagle3`, the drafter layer as `transformer_layer_config`,
  weights `layers.N.*`, `fc`, `norm`, `lm_head`, `embed_tokens`, and `d2t`/`t2d` only for a
  pruned draft vocabulary, since speculators keeps no mapping when draft == target vocabulary).
- `eagle3`: the original EAGLE-3 (SafeAILab) naming, `LlamaForCausalLMEagle3` with the single
  layer as `midlayer.*` and `d2t`/`t2d` always present (identity for a full vocabulary), as
  SGLang and vLLM also load it.

Our drafter's layer already is EAGLE-3's (`norm_before_residual=False`, 2D-wide q/k/v, pre-norm
output fed back from step 2 on), so the export only renames tensors and adds the pieces the
drafter borrows from its target: the token embeddings and, for a full vocabulary, the LM head.
HiViS step biases and the text-only baseline have no EAGLE-3 equivalent and are refused.
The folder is written under a temporary sibling name and swapped in at the end
(covspec.modeling.outputs), so a failed export never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file

from covspec.modeling.drafter import Drafter
from covspec.modeling.outputs import write_folder

FORMATS = ("speculators", "eagle3")
SPECULATORS_VERSION = "0.9.0"  # the speculators release whose loader this layout follows
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class ExportError(ValueError):
    """A drafter that the requested EAGLE-3 format cannot represent faithfully."""


# -- checks ---------------------------------------------------------------------------------------
def check_exportable(drafter: Drafter, format: str) -> None:
    """Refuse what EAGLE-3 checkpoints cannot carry, naming the field that is in the way."""
    c = drafter.config
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; choose one of {FORMATS}")
    if c.step_bias:
        raise ExportError(
            "this drafter has config.step_bias=True: the step bias is a HiViS extra that the "
            "EAGLE-3 format cannot carry (no serving engine applies it); export a drafter "
            "trained with step_bias=False"
        )
    if not c.target_features:
        raise ExportError(
            "config.target_features=False (text_only): no target features and no `fc`; EAGLE-3 "
            "always fuses target hidden states through `fc`, so only drafters with target "
            "features can be exported"
        )
    if c.visual_prefix == "compressed":
        raise ExportError(
            "config.visual_prefix='compressed': the elastic compressor's prefix has no place in "
            "the EAGLE-3 format (no engine runs it); export a drafter with visual_prefix "
            "'none' or 'full'"
        )
    if format == "eagle3" and c.num_hidden_layers > 1:
        raise ExportError(
            f"config.num_hidden_layers={c.num_hidden_layers}: the original EAGLE-3 format holds "
            "exactly one decoder layer (`midlayer`); use format='speculators' for deeper drafters"
        )
    if format == "eagle3" and len(c.fused_layer_ids) != 3:
        raise ExportError(
            f"config.fused_layer_ids={c.fused_layer_ids}: the original EAGLE-3 code builds "
            "`fc` for exactly 3 target layers; use format='speculators'"
        )
    if c.target_vocab_size is None:
        raise ExportError("config.target_vocab_size is not recorded; cannot size the vocabulary")
    if c.draft_vocab_size and not drafter.has_draft_vocab():
        raise ExportError(
            f"config.draft_vocab_size={c.draft_vocab_size} but no draft vocabulary is installed "
            "(t2d does not mark it): call drafter.set_draft_vocab(ids) before training/export"
        )
    if c.draft_vocab_size == c.target_vocab_size and bool(drafter.d2t.any()):
        raise ExportError(
            "config.draft_vocab_size equals the target vocabulary but d2t is not the identity; "
            "speculators keeps no mapping for a full-size draft vocabulary"
        )
    head = drafter.head()  # raises unless attached to the target
    if getattr(head, "bias", None) is not None:
        raise ExportError("the LM head has a bias, which EAGLE-3 checkpoints cannot carry")


def compatibility_notes(drafter: Drafter) -> list[str]:
    """Things that load but that a stock serving engine may not run as covspec does."""
    c, notes = drafter.config, []
    if len(c.fused_layer_ids) != 3:
        notes.append(
            f"{len(c.fused_layer_ids)} fused target layers: some vLLM versions build the "
            "EAGLE-3 `fc` for exactly 3 (target_hidden_size * 3) and will refuse this checkpoint"
        )
    n = c.target_num_layers
    if n is not None and any(not 1 <= i < n for i in c.fused_layer_ids):
        notes.append(
            f"fused layer ids {c.fused_layer_ids}: vLLM captures the input of decoder layer i "
            f"for i in 1..{n - 1} only; id {n} (the final normed state) or 0 is not served"
        )
    return notes


# -- tensors --------------------------------------------------------------------------------------
def _out_dtype(drafter: Drafter, dtype: torch.dtype | str | None) -> torch.dtype:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ExportError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        return DTYPES[dtype]
    return dtype or drafter.dtype


@torch.no_grad()
def _target_embeddings(drafter: Drafter) -> torch.Tensor:
    """(V, D) what the target's embedding module returns for every id (any scale baked in)."""
    emb = drafter.embedding()
    ids = torch.arange(drafter.config.target_vocab_size, device=emb.weight.device)
    return emb(ids)


def _tensors(drafter: Drafter, dtype: torch.dtype, layer_prefix: Callable[[int], str]) -> dict:
    """Drafter weights under EAGLE-3 names; `layer_prefix(i)` names decoder layer i."""
    # a feature codec's two halves fold into one fc (its int8 wire quantisation has no place
    # in an engine that runs target and drafter on one machine)
    out = {"fc.weight": drafter.feature_projection(), "norm.weight": drafter.norm.weight}
    for i, layer in enumerate(drafter.layers):
        for name, t in layer.state_dict().items():
            out[f"{layer_prefix(i)}.{name}"] = t
    out["lm_head.weight"] = drafter.head().weight
    out["embed_tokens.weight"] = _target_embeddings(drafter)
    out = {k: v.detach().to("cpu", dtype).contiguous() for k, v in out.items()}
    if drafter.config.draft_vocab_size:
        out["d2t"] = drafter.d2t.detach().to("cpu", torch.long).contiguous()
        out["t2d"] = drafter.t2d.detach().to("cpu", torch.bool).contiguous()
    return out


def _is_pruned(drafter: Drafter) -> bool:
    """Whether the draft vocabulary is smaller than the target's (a real mapping exists)."""
    c = drafter.config
    return bool(c.draft_vocab_size) and c.draft_vocab_size != c.target_vocab_size


def speculators_tensors(drafter: Drafter, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Weights as `speculators.models.eagle3.Eagle3DraftModel` names them."""
    out = _tensors(drafter, dtype, lambda i: f"layers.{i}")
    if not _is_pruned(drafter):  # speculators registers no d2t/t2d when draft == target vocab
        out.pop("d2t", None)
        out.pop("t2d", None)
    return out


def eagle3_tensors(
    drafter: Drafter, dtype: torch.dtype, embed_tokens: bool = True
) -> dict[str, torch.Tensor]:
    """Weights in the original EAGLE-3 naming: `midlayer.*`, d2t/t2d always (identity if full)."""
    out = _tensors(drafter, dtype, lambda i: "midlayer")
    if not embed_tokens:
        del out["embed_tokens.weight"]
    if "d2t" not in out:
        v = drafter.config.target_vocab_size
        out["d2t"] = torch.zeros(v, dtype=torch.long)
        out["t2d"] = torch.ones(v, dtype=torch.bool)
    return out


# -- configs --------------------------------------------------------------------------------------
def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def layer_config(drafter: Drafter) -> dict:
    """The drafter layer as a Llama config dict; vocab_size is the target's vocabulary."""
    c, lc = drafter.config, drafter.config.llama_config()
    return {
        "model_type": "llama",
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": lc.head_dim,
        "hidden_act": lc.hidden_act,
        "rms_norm_eps": c.rms_norm_eps,
        "max_position_embeddings": c.max_position_embeddings,
        "rope_theta": c.rope_theta,  # read by transformers < 5 and older engines
        "rope_parameters": dict(lc.rope_parameters),  # read by transformers >= 5
        "attention_bias": lc.attention_bias,
        "attention_dropout": lc.attention_dropout,
        "mlp_bias": lc.mlp_bias,
        "pretraining_tp": 1,
        "initializer_range": lc.initializer_range,
        "tie_word_embeddings": False,
        "use_cache": True,
        "vocab_size": c.target_vocab_size,
    }


def speculators_config(
    drafter: Drafter,
    dtype: torch.dtype,
    target_architectures: Sequence[str] = (),
    target_name_or_path: str | None = None,
) -> dict:
    """config.json for the speculators EAGLE-3 format (what vLLM's speculators parser reads)."""
    c = drafter.config
    return {
        "architectures": ["Eagle3DraftModel"],
        "speculators_model_type": "eagle3",
        "speculators_version": SPECULATORS_VERSION,
        "transformer_layer_config": layer_config(drafter),
        "draft_vocab_size": c.draft_vocab_size or c.target_vocab_size,
        "norm_before_residual": False,  # vLLM defaults this to True when absent
        "norm_before_fc": False,
        "fc_norm": False,
        "norm_output": False,
        "embed_requires_grad": False,
        "target_hidden_size": c.target_hidden_size,
        "eagle_aux_hidden_state_layer_ids": list(c.fused_layer_ids),
        "speculators_config": {
            "algorithm": "eagle3",
            "default_proposal_method": "greedy",
            "proposal_methods": [
                {"proposal_type": "greedy", "speculative_tokens": c.max_draft_steps}
            ],
            "verifier": {
                "name_or_path": target_name_or_path or c.target_name_or_path,
                "architectures": list(target_architectures or []),
            },
        },
        "tie_word_embeddings": False,
        "dtype": _dtype_name(dtype),
        "transformers_version": transformers.__version__,
    }


def eagle3_config(drafter: Drafter, dtype: torch.dtype) -> dict:
    """config.json as the original EAGLE-3 checkpoints have it (LlamaForCausalLMEagle3)."""
    c = drafter.config
    ids = list(c.fused_layer_ids)
    return {
        "architectures": ["LlamaForCausalLMEagle3"],
        **layer_config(drafter),
        "rope_scaling": None,
        "draft_vocab_size": c.draft_vocab_size or c.target_vocab_size,
        "target_hidden_size": c.target_hidden_size,
        "eagle_aux_hidden_state_layer_ids": ids,
        "eagle_config": {"eagle_aux_hidden_state_layer_ids": ids, "use_aux_hidden_state": True},
        "torch_dtype": _dtype_name(dtype),
        "transformers_version": transformers.__version__,
    }


# -- folder ---------------------------------------------------------------------------------------
_CAVEATS = {
    "visual_free": (
        "This drafter is visual-token-free: covspec trained it on text positions only, with "
        "compact positions that count text tokens alone. A stock engine (vLLM, SGLang) runs an "
        "EAGLE-3 drafter at every position of the prompt, visual ones included, with the "
        "target's own positions, so on image prompts its acceptance there may be lower than in "
        "covspec's runner. On text-only prompts it is fed exactly as in covspec."
    ),
    "full_visual": (
        "This drafter saw every position in training, with the target's merged input embeddings "
        "(projected image features) at visual positions. Engines differ in what they feed an "
        "EAGLE-3 drafter at visual positions (often the placeholder token's embedding), so on "
        "image prompts acceptance may be lower than in covspec's runner."
    ),
}


def model_card(
    drafter: Drafter,
    format: str,
    dtype: torch.dtype,
    target: str | None,
    embed_tokens: bool = True,
) -> str:
    """README.md of the exported folder: what it is, for which target, and its caveats."""
    c = drafter.config
    embeddings = (
        "`embed_tokens.weight` is a copy of the target's input embeddings, so the folder is "
        "self-contained"
        if embed_tokens
        else "token embeddings are not included: the engine takes them from the target"
    )
    vocab = (
        f"pruned draft vocabulary of {c.draft_vocab_size} ids (`d2t` offsets: "
        "target id = draft id + d2t[draft id]; `t2d` mask over the target vocabulary)"
        if _is_pruned(drafter)
        else f"full target vocabulary ({c.target_vocab_size} ids; the target's LM head is included)"
    )
    layout = {
        "speculators": "the `speculators` library's EAGLE-3 format (v0.9), loaded by "
        "`Eagle3DraftModel.from_pretrained` and by vLLM as an EAGLE-3 speculator",
        "eagle3": "the original EAGLE-3 (SafeAILab) layout, `LlamaForCausalLMEagle3` with "
        "`midlayer.*`, the layout EAGLE-3's own code, SGLang and vLLM read",
    }[format]
    lines = [
        "# EAGLE-3 drafter exported by covspec",
        "",
        f"Format: {layout}. Weights: `model.safetensors` ({_dtype_name(dtype)}).",
        "",
        f"- Target (verifier): `{target}` ({c.target_model_type}, {c.target_num_layers} "
        f"decoder layers, hidden size {c.target_hidden_size}, vocabulary {c.target_vocab_size})",
        f"- Fused target layers (`eagle_aux_hidden_state_layer_ids`): {list(c.fused_layer_ids)}, "
        "indexed as HF `output_hidden_states` (id i = input of decoder layer i), which is "
        "EAGLE-3's and vLLM's indexing",
        f"- Drafter: {c.num_hidden_layers} decoder layer(s), hidden size {c.hidden_size}, "
        f"{c.num_attention_heads} heads ({c.num_key_value_heads} KV), trained for "
        f"{c.max_draft_steps} draft steps; covspec variant `{c.variant}`",
        f"- Vocabulary: {vocab}",
        f"- {embeddings}",
        "",
        "## Caveat",
        "",
        _CAVEATS[c.variant],
    ]
    notes = compatibility_notes(drafter)
    if notes:
        lines += ["", "## Compatibility notes", "", *[f"- {n}" for n in notes]]
    return "\n".join(lines) + "\n"


def check_out_dir(out: str | Path, overwrite: bool) -> None:
    """Refuse an output path that is a file, or a non-empty folder unless `overwrite`."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"output path {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(
            f"output folder {out} exists and is not empty; pass --overwrite (overwrite=True) "
            "to replace it"
        )


def _write_folder(out: Path, files: dict[str, Callable[[Path], None]], overwrite: bool) -> Path:
    """Write `files` (name -> writer) into a temporary sibling, then swap it in for `out`."""
    check_out_dir(out, overwrite)

    def write(tmp: Path) -> None:
        for name, writer in files.items():
            writer(tmp / name)

    # check_out_dir was stricter (any non-empty folder needs `overwrite`), so replace freely
    return write_folder(out, write, overwrite=True, kind="eagle3-export")


def export_drafter(
    drafter: Drafter,
    out: str | Path,
    format: str = "speculators",
    *,
    dtype: torch.dtype | str | None = None,
    target_architectures: Sequence[str] | None = None,
    target_name_or_path: str | None = None,
    embed_tokens: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write `drafter` (attached to its target) to the folder `out` in `format`; returns it.

    dtype: of the float weights (default: the drafter's own). target_architectures: the
    verifier's `config.architectures` recorded in the speculators config. target_name_or_path:
    the verifier recorded there (default: `config.target_name_or_path`). embed_tokens: include
    the target embeddings in the `eagle3` format (always included in `speculators`).
    An existing non-empty `out` is refused unless `overwrite`.
    """
    check_exportable(drafter, format)
    out, dt = Path(out), _out_dtype(drafter, dtype)
    check_out_dir(out, overwrite)
    for note in compatibility_notes(drafter):
        warnings.warn(f"EAGLE-3 export: {note}", stacklevel=2)
    target = target_name_or_path or drafter.config.target_name_or_path
    if format == "speculators":
        tensors = speculators_tensors(drafter, dt)
        config = speculators_config(drafter, dt, target_architectures or (), target)
    else:
        tensors = eagle3_tensors(drafter, dt, embed_tokens=embed_tokens)
        config = eagle3_config(drafter, dt)
    files = {
        "model.safetensors": lambda p: save_file(tensors, str(p), metadata={"format": "pt"}),
        "config.json": lambda p: p.write_text(json.dumps(config, indent=2) + "\n"),
        "README.md": lambda p: p.write_text(
            model_card(drafter, format, dt, target, embed_tokens or format == "speculators")
        ),
    }
    return _write_folder(out, files, overwrite)
