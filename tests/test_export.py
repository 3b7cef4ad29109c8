"""EAGLE-3 export: speculators loads our drafter and computes the same logits; refusals."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText

from covspec.modeling.adapters import adapter_for
from covspec.modeling.drafter import Drafter, DrafterConfig
from covspec.modeling.export import ExportError, export_drafter
from covspec.modeling.outputs import MARKER
from covspec.modeling.ttt import ttt_unroll
from covspec.scripts.cli import main
from tests.tiny_vlms import llava

S = 9  # sequence length of the logit comparisons
DRAFT_IDS = torch.tensor([0, 1, 3, 7, 10, 22, 40, 41, 60, 77, 90, 95])


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    """A tiny LLaVA saved to a real folder and loaded back (so name_or_path points at it)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("target") / "llava"
    llava()[0].save_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    return model, adapter_for(model)


def _drafter(adapter, draft_vocab: torch.Tensor | None = None, **kw) -> Drafter:
    """A drafter with every weight perturbed (norms too), so a misplaced tensor shows."""
    torch.manual_seed(1)
    kw.setdefault("fused_layer_ids", (1, 2, 3))
    if draft_vocab is not None:
        kw["draft_vocab_size"] = len(draft_vocab)
    d = Drafter(DrafterConfig.for_target(adapter, max_draft_steps=3, **kw))
    d = d.attach_target(adapter).eval()
    if draft_vocab is not None:
        d.set_draft_vocab(draft_vocab)
    with torch.no_grad():
        for name, p in d.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            else:
                p.normal_(0, 0.3)
    return d


def _inputs(d: Drafter):
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, d.config.target_vocab_size, (1, S), generator=g)
    states = torch.randn(
        1, S, len(d.config.fused_layer_ids) * d.config.target_hidden_size, generator=g
    )
    return ids, states, torch.arange(S)[None]


def _load_speculators(folder, attn: str | None = None):
    """Eagle3DraftModel as speculators loads it; `attn` overrides its flex attention (whose
    block mask cannot be extended over TTT steps for sequences shorter than a block on CPU).
    Imported here, not skipped: only the tests that load with speculators need it installed."""
    from speculators.models.eagle3 import Eagle3DraftModel, Eagle3SpeculatorConfig

    config = None
    if attn:
        config = Eagle3SpeculatorConfig.from_pretrained(folder)
        config.transformer_layer_config._attn_implementation = attn
    return Eagle3DraftModel.from_pretrained(folder, config=config).eval()


def _speculators_logits(model, ids, states, pos, steps: int) -> list[torch.Tensor]:
    """Logits of every TTT step, captured from speculators' own forward at its lm_head."""
    caught: list[torch.Tensor] = []
    hook = model.lm_head.register_forward_hook(lambda m, i, o: caught.append(o))
    with torch.no_grad():
        docs = torch.zeros_like(ids)
        model(
            hidden_states=states,
            input_ids=ids,
            document_ids=docs,
            position_ids=pos,
            ttt_steps=steps,
        )
    hook.remove()
    return caught


def _our_logits(d: Drafter, ids, states, steps: int) -> list[torch.Tensor]:
    with torch.no_grad():
        embeds = d.embed(ids)
        feats = d.project_features(states, like=embeds)
        outs = ttt_unroll(d, embeds, feats, torch.ones_like(ids, dtype=torch.bool), steps)
        return [d.logits(h) for h in outs]


def _assert_same_logits(d: Drafter, folder) -> None:
    ids, states, pos = _inputs(d)
    ours = _our_logits(d, ids, states, steps=3)
    # plain load (flex attention), one step: the drafter's prefill over the context
    (first,) = _speculators_logits(_load_speculators(folder), ids, states, pos, steps=1)
    torch.testing.assert_close(first, ours[0], atol=1e-5, rtol=1e-5)
    # three TTT steps: speculators' step k at index t is our unrolled depth k at index t+k-1
    steps = _speculators_logits(_load_speculators(folder, "eager"), ids, states, pos, steps=3)
    for k in range(3):
        torch.testing.assert_close(steps[k][:, : S - k], ours[k][:, k:], atol=1e-5, rtol=1e-5)


def test_speculators_full_vocab_same_logits(target, tmp_path):
    model, adapter = target
    d = _drafter(adapter)
    out = export_drafter(
        d, tmp_path / "spec", "speculators", target_architectures=model.config.architectures
    )
    config = json.loads((out / "config.json").read_text())
    assert config["speculators_model_type"] == "eagle3"
    assert config["draft_vocab_size"] == config["transformer_layer_config"]["vocab_size"] == 96
    assert config["eagle_aux_hidden_state_layer_ids"] == [1, 2, 3]
    assert config["norm_before_residual"] is False
    assert config["speculators_config"]["verifier"]["name_or_path"] == model.name_or_path
    tensors = load_file(out / "model.safetensors")
    assert "d2t" not in tensors and "t2d" not in tensors  # speculators keeps none for full vocab
    torch.testing.assert_close(tensors["lm_head.weight"], adapter.lm_head().weight)
    torch.testing.assert_close(tensors["embed_tokens.weight"], adapter.input_embeddings().weight)
    card = (out / "README.md").read_text()
    assert model.name_or_path in card and "[1, 2, 3]" in card and "visual ones included" in card
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left
    _assert_same_logits(d, out)


def test_speculators_pruned_vocab_same_logits_and_mapping(target, tmp_path):
    model, adapter = target
    d = _drafter(adapter, draft_vocab=DRAFT_IDS)
    out = export_drafter(d, tmp_path / "spec", target_architectures=model.config.architectures)
    assert json.loads((out / "config.json").read_text())["draft_vocab_size"] == len(DRAFT_IDS)
    spec = _load_speculators(out)
    assert spec.use_draft_vocab
    torch.testing.assert_close(spec.d2t + torch.arange(len(DRAFT_IDS)), DRAFT_IDS)
    assert torch.equal(spec.d2t + torch.arange(len(DRAFT_IDS)), d.draft_token_ids())
    assert torch.equal(spec.t2d, d.t2d) and int(spec.t2d.sum()) == len(DRAFT_IDS)
    torch.testing.assert_close(spec.lm_head.weight, d.lm_head.weight)
    _assert_same_logits(d, out)


def test_eagle3_format_names_and_values(target, tmp_path):
    _, adapter = target
    d = _drafter(adapter, draft_vocab=DRAFT_IDS)
    out = export_drafter(d, tmp_path / "e3", "eagle3", dtype="bfloat16")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLMEagle3"]
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 1
    assert (config["vocab_size"], config["draft_vocab_size"]) == (96, len(DRAFT_IDS))
    assert config["target_hidden_size"] == 32 and config["torch_dtype"] == "bfloat16"
    assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [1, 2, 3]
    tensors = load_file(out / "model.safetensors")
    ours = {f"midlayer.{k}": v for k, v in d.layers[0].state_dict().items()}
    ours |= {"fc.weight": d.fc.weight, "norm.weight": d.norm.weight}
    ours |= {"lm_head.weight": d.lm_head.weight, "d2t": d.d2t, "t2d": d.t2d}
    ours["embed_tokens.weight"] = adapter.input_embeddings().weight
    assert set(tensors) == set(ours)
    for name, value in ours.items():
        want = value.to(torch.bfloat16) if value.is_floating_point() else value
        assert tensors[name].dtype == want.dtype and torch.equal(tensors[name], want), name


def test_eagle3_full_vocab_identity_mapping(target, tmp_path):
    d = _drafter(target[1], fused_layer_ids=(1, 2, 4))  # 4 = L: the final normed state
    with pytest.warns(UserWarning, match="final normed state"):
        out = export_drafter(d, tmp_path / "e3", "eagle3", embed_tokens=False)
    tensors = load_file(out / "model.safetensors")
    assert torch.equal(tensors["d2t"], torch.zeros(96, dtype=torch.long))
    assert bool(tensors["t2d"].all()) and tensors["lm_head.weight"].shape == (96, 32)
    assert "embed_tokens.weight" not in tensors
    assert "Compatibility notes" in (out / "README.md").read_text()


@pytest.mark.parametrize(
    "kw,fmt,field",
    [
        ({"step_bias": True}, "speculators", "step_bias"),
        ({"variant": "text_only"}, "speculators", "text_only"),
        ({"num_hidden_layers": 2}, "eagle3", "num_hidden_layers"),
        (
            {"visual_prefix": "compressed", "compressor": {"options": ["pool:2"]}},
            "speculators",
            "visual_prefix='compressed'",
        ),
        ({"target_vocab_size": None}, "speculators", "target_vocab_size is not recorded"),
    ],
)
def test_refusals_name_the_field(target, tmp_path, kw, fmt, field):
    _, adapter = target
    with pytest.raises(ExportError, match=field):
        export_drafter(_drafter(adapter, **kw), tmp_path / "x", fmt)
    assert not (tmp_path / "x").exists()


def test_step_bias_refusal_says_why(target, tmp_path):
    with pytest.raises(ValueError, match="HiViS extra .* EAGLE-3 format cannot carry"):
        export_drafter(_drafter(target[1], step_bias=True), tmp_path / "x")


def test_two_layer_drafter_exports_to_speculators(target, tmp_path):
    d = _drafter(target[1], num_hidden_layers=2)
    out = export_drafter(
        d, tmp_path / "spec", target_architectures=["LlavaForConditionalGeneration"]
    )
    assert (
        json.loads((out / "config.json").read_text())["transformer_layer_config"][
            "num_hidden_layers"
        ]
        == 2
    )
    _assert_same_logits(d, out)


def test_feature_codec_folds_into_one_fc(target, tmp_path):
    d = _drafter(target[1], feature_codec_rank=4)  # the device-edge codec: fc_up @ fc_down
    out = export_drafter(d, tmp_path / "codec")
    fc = load_file(out / "model.safetensors")["fc.weight"]
    torch.testing.assert_close(fc, d.fc_up.weight @ d.fc_down.weight)
    # the engine runs the folded fc unquantised: the same drafter without its wire's int8 step
    plain = _drafter(target[1])
    state = {k: v for k, v in d.state_dict().items() if not k.startswith("fc_")}
    plain.load_state_dict({**state, "fc.weight": d.feature_projection()})
    _assert_same_logits(plain, out)


def test_cli_export_end_to_end(target, tmp_path, capsys):
    model, adapter = target
    _drafter(adapter, draft_vocab=DRAFT_IDS).save_pretrained(tmp_path / "drafter")
    out = tmp_path / "out"
    argv = ["export", str(tmp_path / "drafter"), "--target", model.name_or_path, "--out", str(out)]
    assert main([*argv, "--format", "speculators"]) == 0
    names = {p.name for p in out.iterdir()}
    assert names == {"config.json", "model.safetensors", "README.md", MARKER}
    spec = _load_speculators(out)
    assert spec.config.speculators_config.verifier.architectures == [
        "LlavaForConditionalGeneration"
    ]
    assert "--verifier ORG/NAME" in capsys.readouterr().err  # the recorded target is a folder
    named = tmp_path / "named"
    assert (
        main([*argv[:-1], str(named), "--format", "speculators", "--verifier", "org/target"]) == 0
    )
    config = json.loads((named / "config.json").read_text())
    assert config["speculators_config"]["verifier"]["name_or_path"] == "org/target"
    assert "--verifier ORG/NAME" not in capsys.readouterr().err
    assert main([*argv, "--format", "speculators", "--verifier", "not a repo"]) == 2
    capsys.readouterr()
    assert main([*argv, "--format", "eagle3"]) == 2  # non-empty --out without --overwrite
    assert str(out) in capsys.readouterr().err
    assert "midlayer.mlp.up_proj.weight" not in load_file(out / "model.safetensors")
    assert main([*argv, "--format", "eagle3", "--overwrite", "--dtype", "float16"]) == 0
    tensors = load_file(out / "model.safetensors")
    assert tensors["midlayer.mlp.up_proj.weight"].dtype == torch.float16
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
