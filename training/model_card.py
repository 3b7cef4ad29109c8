"""Hub model cards for exported parts, built from the exported folder alone (no Lightning).

    >>> card = build_card(folder_files(Path("checkpoints/toy-drafter")),
    ...                   repo_id="my-org/toy-drafter", base_model="llava-hf/llava-1.5-7b-hf")
    >>> card.save("staging/README.md")
    >>> check_card("staging/README.md", base_model="llava-hf/llava-1.5-7b-hf")

Everything comes from the folder's `config.json`, `metrics.json` and the ```yaml recipe block of
the README that the export callback wrote, never from a Trainer, so `covspec publish` and the
runner side can use it without importing Lightning. The YAML metadata is built with
`huggingface_hub.ModelCardData` (base_model, library_name, tags, license and a `model-index` of
`EvalResult`s); the body says what the part is, how to load it, its metrics and the recipe.

Parts dispatch on config.json's `model_type` (`CARD_BUILDERS`); the drafter (`covspec_drafter`)
is the only one registered today, the compressor and acceptance head will join it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData, metadata_load

from covspec.modeling.drafter import DrafterConfig

TAU_DEFINITION = (
    "tau = mean number of tokens emitted per target forward in the decode loop, the bonus token "
    "included (ceiling: draft depth + 1)."
)
DEFAULT_DATASET = "covspec validation split"
_RECIPE_BLOCK = re.compile(r"```yaml\n(.*?)```", re.DOTALL)
_AGREE_KEY = re.compile(r"^val/agree_(\d+)$")


class CardError(ValueError):
    """The folder cannot be described by a card (unknown part, unreadable config or metrics)."""


@dataclass
class ExportedPart:
    """What a card is built from: the parsed files of one exported folder."""

    config: dict
    metrics: dict
    recipe_text: str | None  # the resolved recipe, verbatim from the exported README
    recipe: dict | None  # the same, parsed (None when absent or not a mapping)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CardError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict):
        raise CardError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def read_recipe(readme_text: str) -> tuple[str | None, dict | None]:
    """The ```yaml block under the README's recipe heading (else its first one): text, parsed."""
    heading = re.search(r"^#+ .*recipe.*$", readme_text, re.IGNORECASE | re.MULTILINE)
    block = _RECIPE_BLOCK.search(readme_text, heading.end() if heading else 0)
    block = block or _RECIPE_BLOCK.search(readme_text)
    if block is None:
        return None, None
    text = block.group(1).rstrip("\n") + "\n"
    try:
        parsed = yaml.safe_load(text)
    except yaml.YAMLError:
        parsed = None
    return text, parsed if isinstance(parsed, dict) else None


def folder_files(folder: Path) -> ExportedPart:
    """Parse config.json (required), metrics.json and README.md (optional) of an exported folder."""
    config = _read_json(folder / "config.json")
    metrics_path, readme = folder / "metrics.json", folder / "README.md"
    metrics = _read_json(metrics_path) if metrics_path.is_file() else {}
    text, recipe = read_recipe(readme.read_text()) if readme.is_file() else (None, None)
    return ExportedPart(config=config, metrics=metrics, recipe_text=text, recipe=recipe)


def depth_agreement(metrics: dict) -> dict[int, float]:
    """{depth: top-1 agreement} from `val/agree_<k>` keys, in depth order."""
    found = {int(m.group(1)): float(v) for k, v in metrics.items() if (m := _AGREE_KEY.match(k))}
    return dict(sorted(found.items()))


def implied_tau(rates: list[float]) -> float:
    """1 + a1 + a1*a2 + ...: tokens per target forward of a chain with these acceptance rates."""
    tau, running = 1.0, 1.0
    for r in rates:
        running *= r
        tau += running
    return tau


def dataset_name(recipe: dict | None) -> str:
    """The data the validation metrics were measured on, as the recipe names it."""
    data = (recipe or {}).get("data") or {}
    if not isinstance(data, dict):
        return DEFAULT_DATASET
    val, train = data.get("val_data"), data.get("train_data")
    if val and str(val).startswith("holdout:") and train:  # carved out of the training data
        return f"{train} ({str(val).removeprefix('holdout:')} held-out conversations)"
    if val:
        return f"{val} (validation)"
    return DEFAULT_DATASET  # no validation data: nothing was measured on the training data


def drafter_eval_results(part: ExportedPart) -> list[EvalResult]:
    """Per-depth validation agreement and the implied tau, as `model-index` entries."""
    rates = depth_agreement(part.metrics)
    tau = part.metrics.get("val/tau")
    if tau is None and rates and list(rates) == list(range(1, len(rates) + 1)):
        tau = implied_tau(list(rates.values()))
    common = dict(
        task_type="text-generation",
        task_name="Speculative decoding (draft acceptance)",
        dataset_type="covspec-validation",
        dataset_name=dataset_name(part.recipe),
        dataset_split="validation",
    )
    results = [
        EvalResult(
            **common,
            metric_type=f"agreement_depth_{k}",
            metric_name=f"Top-1 agreement with the target at depth {k}",
            metric_value=round(v, 4),
        )
        for k, v in rates.items()
    ]
    if tau is not None:
        results.append(
            EvalResult(
                **common,
                metric_type="implied_tau",
                metric_name="Implied tau (tokens per target forward, bonus included)",
                metric_value=round(float(tau), 4),
            )
        )
    return results


def _drafter_description(cfg: dict) -> str:
    config = DrafterConfig.from_dict(cfg)
    variant, sees = config.variant, config.describe_inputs()
    return (
        f"A {cfg.get('num_hidden_layers', 1)}-layer EAGLE-3 style drafter (hidden "
        f"{cfg.get('hidden_size')}) for a `{cfg.get('target_model_type')}` target "
        f"({cfg.get('target_num_layers')} layers, hidden {cfg.get('target_hidden_size')}, vocab "
        f"{cfg.get('target_vocab_size')}), fusing target layers {cfg.get('fused_layer_ids')}. "
        f"Variant `{variant}`: {sees}. Trained by online-logit distillation from the frozen target "
        "with a training-time-test unroll."
        + (" HiViS step-dependent bias corrections are on." if cfg.get("step_bias") else "")
        + (
            f" Pruned draft vocabulary of {cfg['draft_vocab_size']} tokens (EAGLE-3 `d2t`)."
            if cfg.get("draft_vocab_size")
            else ""
        )
        + " Embeddings (and the full LM head) are the target's and are not stored here; the "
        "config records the target so that a mismatch is refused."
    )


def _metrics_section(part: ExportedPart) -> str:
    rates = depth_agreement(part.metrics)
    rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in rates.items()) or "| - | not recorded |"
    tau = part.metrics.get("val/tau")
    tau_line = f"Implied tau: **{float(tau):.3f}**. " if tau is not None else ""
    return f"""## Validation metrics

Measured on {dataset_name(part.recipe)}. Top-1 agreement with the target at each unroll depth:

| depth | agreement |
|---|---|
{rows}

{tau_line}{TAU_DEFINITION} Implied tau reads depth-k agreement as the chance that draft k is
accepted once drafts 1..k-1 were; the covspec runner measures the real one.

All logged metrics:

```json
{json.dumps(part.metrics, indent=2, sort_keys=True)}
```
"""


def drafter_card(part: ExportedPart, *, repo_id: str, base_model: str, license: str | None) -> str:
    """The README.md (YAML metadata + body) of a published drafter."""
    cfg = part.config
    variant = DrafterConfig.from_dict(cfg).variant
    data = ModelCardData(
        base_model=base_model,
        library_name="transformers",
        license=license,
        tags=["speculative-decoding", "eagle3", "drafter", "covspec", variant.replace("_", "-")],
        model_name=repo_id.split("/")[-1],
        eval_results=drafter_eval_results(part) or None,
    )
    recipe = (
        f"## Training recipe (resolved)\n\n```yaml\n{part.recipe_text}```\n"
        if part.recipe_text
        else "## Training recipe\n\nNot recorded in the exported folder.\n"
    )
    body = f"""
# {repo_id.split("/")[-1]}: covspec drafter ({variant}) for {base_model}

{_drafter_description(cfg)}

Not a standalone model: it drafts tokens for [`{base_model}`](https://huggingface.co/{base_model}),
which verifies them (speculative decoding; lossless with exact verification).

## How to load it

With the covspec code installed (the drafter's classes are registered by the import; no
`trust_remote_code`):

```python
from transformers import AutoModelForImageTextToText
from covspec.modeling.adapters import adapter_for
from covspec.modeling.drafter import Drafter

target = AutoModelForImageTextToText.from_pretrained("{base_model}")
drafter = Drafter.from_pretrained("{repo_id}").attach_target(adapter_for(target))
```

`attach_target` refuses a target whose model type, vocabulary, width or depth differ from the
one recorded in `config.json`.

{_metrics_section(part)}
{recipe}"""
    return f"---\n{data.to_yaml()}\n---\n{body}"


CardBuilder = Callable[..., str]
CARD_BUILDERS: dict[str, CardBuilder] = {"covspec_drafter": drafter_card}
REQUIRED_TAGS: dict[str, tuple[str, ...]] = {
    "covspec_drafter": ("speculative-decoding", "eagle3", "drafter", "covspec")
}


def build_card(
    part: ExportedPart, *, repo_id: str, base_model: str, license: str | None = None
) -> str:
    """Dispatch on config.json's `model_type`; an unregistered type is refused, naming it."""
    model_type = part.config.get("model_type")
    builder = CARD_BUILDERS.get(str(model_type))
    if builder is None:
        raise CardError(
            f"cannot publish model_type {model_type!r}: publishable parts are {sorted(CARD_BUILDERS)}"
        )
    return builder(part, repo_id=repo_id, base_model=base_model, license=license)


def check_card(path: str | Path, *, base_model: str, model_type: str = "covspec_drafter") -> dict:
    """Parse a written card back with huggingface_hub and check base_model, tags, model-index."""
    card = ModelCard.load(Path(path))  # raises on a malformed model-index
    meta = metadata_load(path) or {}
    problems = []
    if meta.get("base_model") != base_model or card.data.base_model != base_model:
        problems.append(f"base_model is {meta.get('base_model')!r}, expected {base_model!r}")
    missing = [t for t in REQUIRED_TAGS.get(model_type, ()) if t not in (meta.get("tags") or [])]
    if missing:
        problems.append(f"tags lack {missing}")
    if not meta.get("model-index") or not card.data.eval_results:
        problems.append("model-index is empty (no val/agree_<k> or val/tau in metrics.json?)")
    if problems:
        raise CardError(f"generated card {path} is invalid: " + "; ".join(problems))
    return meta
