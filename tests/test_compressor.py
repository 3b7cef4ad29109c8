import math

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from covspec.data.toy_world import make_sample
from covspec.inference.roles import EdgeRole, Request
from covspec.inference.runner import SpecRunner, build_prompt
from covspec.inference.tree import DraftSettings
from covspec.modeling.adapters import adapter_for
from covspec.modeling.compressor import (
    VisualCompressor,
    VisualCompressorConfig,
    frame_chunks,
    grid_for,
    option_tokens,
    parse_option,
    sample_tokens,
)
from covspec.modeling.drafter import Drafter, DrafterConfig
from covspec.modeling.drafter_inputs import image_runs, prompt_mask, visual_prefix
from tests.test_distill import _batch, _module

ALL = ["none", "prune:0.25", "pool:2", "pool:4", "conv:2", "resampler:2", "resampler:8"]


def _compressor(options=ALL, d=8, seed=0) -> VisualCompressor:
    torch.manual_seed(seed)
    return VisualCompressor(VisualCompressorConfig(hidden_size=d, options=options))


@pytest.mark.parametrize("grid", [(9, 9), (3, 5), (1, 7), (2, 2)])
def test_every_primitive_makes_its_token_count_on_odd_grids(grid):
    comp = _compressor()
    tokens = torch.randn(grid[0] * grid[1], 16)
    prompt = torch.randn(8)
    for i, option in enumerate(ALL):
        out = comp.compress(i, tokens, grid, prompt)
        assert out.shape == (option_tokens(option, grid), 16), option
    # pooling keeps the odd edge: the last pooled token of a 9x9 grid is the corner alone
    grid_tokens = torch.arange(81.0)[:, None].expand(81, 16)
    pooled = comp.compress(ALL.index("pool:4"), grid_tokens, (9, 9), prompt)
    assert pooled[0, 0] == grid_tokens.view(9, 9, 16)[:4, :4, 0].mean()
    assert pooled[-1, 0] == 80.0
    # the convolution starts as the pooling it learns from
    torch.testing.assert_close(
        comp.compress(ALL.index("conv:2"), tokens, grid, prompt),
        comp.compress(ALL.index("pool:2"), tokens, grid, prompt),
    )


def test_temporal_pooling_averages_consecutive_frames_of_one_grid():
    grids = [(3, 3)] * 5 + [(2, 2)] + [(3, 3)] * 2
    assert frame_chunks(grids, 2) == [[0, 1], [2, 3], [4], [5], [6, 7]]
    assert frame_chunks(grids, 1) == [[i] for i in range(8)]
    assert sample_tokens("tpool:2", grids) == 9 * 4 + 4
    assert sample_tokens("pool:2", grids) == option_tokens("pool:2", (3, 3)) * 7 + 1
    comp = _compressor(["none", "tpool:2"])
    frames = [torch.randn(9, 16) for _ in range(5)]
    out = comp([[(f, (3, 3)) for f in frames]], torch.randn(1, 8), force=1)
    assert out.valid.sum().item() == 27  # chunks [0, 1], [2, 3], [4]
    torch.testing.assert_close(out.tokens[0, :9], (frames[0] + frames[1]) / 2)
    torch.testing.assert_close(out.tokens[0, 18:], frames[4])


def test_prune_keeps_the_top_scored_tokens_in_grid_order_and_depends_on_the_question():
    comp = _compressor(["prune:0.25", "none"])
    tokens, i = torch.randn(81, 16), 0
    kept = [comp.compress(i, tokens, (9, 9), torch.randn(8)) for _ in range(4)]
    assert all(k.shape == (math.ceil(0.25 * 81), 16) for k in kept)
    rows = [[int(torch.where((tokens == r).all(1))[0]) for r in k.detach()] for k in kept]
    assert all(r == sorted(r) for r in rows), "kept tokens must stay in grid order"
    assert len({tuple(r) for r in rows}) > 1, "the prompt never changed which tokens stay"


def test_multi_image_samples_are_left_padded_and_force_picks_one_option():
    comp = _compressor()
    images = [
        [(torch.randn(81, 16), (9, 9))],
        [(torch.randn(81, 16), (9, 9)), (torch.randn(15, 16), (3, 5))],
    ]
    out = comp(images, torch.randn(2, 8), force=ALL.index("pool:2"))
    counts = [25, 25 + 6]
    assert out.valid.sum(1).tolist() == counts and out.tokens.shape == (2, 31, 16)
    assert not out.valid[0, :6].any() and out.valid[0, 6:].all()  # left padding
    assert out.choice.tolist() == [ALL.index("pool:2")] * 2
    with pytest.raises(ValueError, match="grid"):
        comp.compress(2, torch.randn(10, 16), (3, 3), torch.randn(8))
    mixed = comp([images[0], []], torch.randn(2, 8))  # a text-only sample takes `none`
    assert mixed.valid.sum(1).tolist()[1] == 0 and mixed.choice[1] == ALL.index("none")


def test_gate_gets_gradient_in_training_and_is_argmax_at_inference():
    comp = _compressor(["pool:2", "pool:4", "resampler:2"])
    with torch.no_grad():
        comp.gate.net[2].weight.normal_()
    images = [[(torch.randn(81, 16), (9, 9))] for _ in range(6)]
    prompt = torch.randn(6, 8)
    out = comp(images, prompt, temperature=1.0)
    assert torch.equal(out.weight, torch.ones(6))  # straight-through: 1.0 forward
    (out.weight * torch.randn(6)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in comp.gate.parameters())
    with torch.no_grad():
        logits = comp.gate(
            torch.cat([prompt, torch.stack([i[0][0][:, :8].mean(0) for i in images])], -1)
        )
        a, b = comp(images, prompt), comp(images, prompt)
    assert torch.equal(a.choice, logits.argmax(-1)) and torch.equal(a.tokens, b.tokens)


@pytest.mark.parametrize(
    "options,match",
    [([], "empty"), (["pool:0"], ">= 1"), (["prune:1.5"], "ratio"), (["blur:2"], "kind"),
     (["pool:2", "pool:2"], "repeat"), (["none:3"], "no argument"), (["conv:x"], "number")],
)  # fmt: skip
def test_bad_options_are_refused(options, match):
    with pytest.raises(ValueError, match=match):
        VisualCompressorConfig(hidden_size=8, options=options)


def test_a_row_without_visual_tokens_has_no_runs():
    assert image_runs(torch.zeros(7, dtype=torch.bool)) == []


def test_grid_and_runs():
    assert grid_for(81) == (9, 9) and grid_for(12) == (1, 12)
    assert parse_option("resampler:8") == ("resampler", 8.0)
    row = torch.tensor([0, 1, 1, 0, 1, 1, 1, 0], dtype=torch.bool)
    assert image_runs(row) == [(1, 2), (4, 3)]


def test_drafter_config_fields_replace_the_variant_enum(tmp_path):
    old = DrafterConfig(hidden_size=8, num_attention_heads=2, variant="text_only").to_dict()
    assert "variant" not in old and old["target_features"] is False
    legacy = {**old, "variant": "full_visual"}
    legacy.pop("target_features"), legacy.pop("visual_prefix")
    cfg = DrafterConfig.from_dict(legacy)  # a config.json written before the two fields
    assert (cfg.target_features, cfg.visual_prefix, cfg.variant) == (True, "full", "full_visual")
    with pytest.raises(ValueError, match="compressor"):
        DrafterConfig(hidden_size=8, num_attention_heads=2, visual_prefix="compressed")
    with pytest.raises(ValueError, match="visual_prefix"):
        DrafterConfig(hidden_size=8, num_attention_heads=2, visual_prefix="half")
    both = DrafterConfig(
        hidden_size=8, num_attention_heads=2, variant="text_only", visual_prefix="compressed",
        compressor={"options": ["pool:2"]},
    )  # fmt: skip
    assert both.variant == "text_only_compressed" and not both.target_features
    bad = [
        ({"visual_prefix": "compressed", "compressor": {"options": ["bogus:3"]}}, "kind"),
        ({"visual_prefix": "compressed", "compressor": {"options": ["pool:2"], "hidden_size": 4}},
         "hidden_size"),
        ({"visual_prefix": "compressed", "compressor": {"options": ["pool:2"], "resampler_heads": 0}},
         "resampler_heads"),
        ({"fused_layer_ids": []}, "fused_layer_ids"),
        ({"fused_layer_ids": [1, 1]}, "fused_layer_ids"),
        ({"num_attention_heads": 3}, "num_attention_heads 3"),
    ]  # fmt: skip
    for kw, match in bad:  # refused when the config is made, not when the model is built
        with pytest.raises(ValueError, match=match):
            DrafterConfig(**{"hidden_size": 8, "num_attention_heads": 2, **kw})
    with pytest.raises(ValueError, match="force must index"):
        _compressor().choose(torch.randn(1, 8), torch.randn(1, 8), [[(9, 9)]], force=len(ALL))


@pytest.fixture(scope="module")
def micro_model(micro_target_dir):
    return AutoModelForImageTextToText.from_pretrained(micro_target_dir).eval()


def test_compressed_drafter_save_load_round_trip(micro_model, tmp_path):
    adapter = adapter_for(micro_model)
    cfg = DrafterConfig.for_target(
        adapter, visual_prefix="compressed", compressor={"options": ["pool:2", "resampler:2"]}
    )
    torch.manual_seed(0)
    d = Drafter(cfg).attach_target(adapter)
    d.save_pretrained(tmp_path)
    back = Drafter.from_pretrained(tmp_path)
    assert back.config.compressor == cfg.compressor
    for (n, a), (_, b) in zip(d.state_dict().items(), back.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    critic = DrafterConfig.for_target(
        adapter,
        visual_prefix="compressed",
        compressor={"options": ["none", "pool:2"], "gate": "critic"},
    )
    d = Drafter(critic).attach_target(adapter)
    d.set_cost_weight(0.25)  # a price set at inference is the one a later save keeps
    d.save_pretrained(tmp_path / "priced")
    assert Drafter.from_pretrained(tmp_path / "priced").compressor.config.cost_weight == 0.25
    with pytest.raises(ValueError, match="no compressor gate"):
        Drafter(DrafterConfig.for_target(adapter)).set_cost_weight(0.1)


def test_resampler_weight_absorption_equals_multihead_attention():
    comp = _compressor(["resampler:8"], d=12)
    res = comp.resamplers["8"]
    with torch.no_grad():  # away from the identity start, biases included
        for p in [res.from_prompt.weight, res.attn.in_proj_weight, res.attn.in_proj_bias]:
            p.normal_()
        res.attn.out_proj.bias.normal_()
    tokens, prompt = torch.randn(81, 24), torch.randn(12)
    q = (res.queries + res.from_prompt(prompt))[None]
    reference, _ = res.attn(q, tokens[None], tokens[None], need_weights=False)
    torch.testing.assert_close(res(tokens, prompt), reference[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("codec", [None, 2])
def test_visual_prefix_computes_only_the_chosen_option_and_equals_the_compressor(
    micro_model, codec
):
    """The lean builder (gate first, pooling before the feature projection) gives the rows
    the compressor makes from fully projected tokens, option by option."""
    adapter = adapter_for(micro_model)
    options = ["none", "pool:2", "resampler:2", "prune:0.5", "conv:2", "tpool:2"]
    cfg = DrafterConfig.for_target(
        adapter,
        visual_prefix="compressed",
        compressor={"options": options, "option_embedding": True},
        feature_codec_rank=codec,
    )
    torch.manual_seed(0)
    d = Drafter(cfg).attach_target(adapter).eval()
    with torch.no_grad():
        d.compressor.option_embedding.normal_()
    processor = AutoProcessor.from_pretrained(micro_model.name_or_path)
    sample = make_sample(3, 0)
    text = build_prompt(processor, "How many shapes?", 2)  # two images: two grids
    inputs = processor(text=text, images=[sample["image"], sample["image"]], return_tensors="pt")
    out = adapter.forward(inputs, sorted({0, *cfg.fused_layer_ids}))
    ask = prompt_mask(inputs["attention_mask"], out.visual_mask)
    fused = torch.cat([out.hidden_states[i] for i in cfg.fused_layer_ids], -1)[0]
    imgs = []
    for start, n in image_runs(out.visual_mask[0]):
        e = out.hidden_states[0][0, start : start + n]
        imgs.append((torch.cat([e, d.project_features(fused[start : start + n], like=e)], -1),
                     grid_for(n)))  # fmt: skip
    prompt = d.embed(inputs["input_ids"])[0, ask[0]].mean(0)[None]
    with torch.no_grad():
        for k in range(len(options)):
            lean = visual_prefix(d, inputs["input_ids"], out.hidden_states, out.visual_mask, ask,
                                 force=k)  # fmt: skip
            full = d.compressor([imgs], prompt, force=k)
            assert int(lean.choice[0]) == k
            torch.testing.assert_close(lean.tokens, full.tokens, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(lean.scores, full.scores)


def test_option_embedding_starts_at_zero_and_round_trips(micro_model, tmp_path):
    adapter = adapter_for(micro_model)
    compressor = {"options": ["none", "pool:2"], "gate": "critic", "option_embedding": True}
    cfg = DrafterConfig.for_target(adapter, visual_prefix="compressed", compressor=compressor)
    d = Drafter(cfg).attach_target(adapter)
    assert d.compressor.option_embedding.shape == (2, 2 * cfg.hidden_size)
    assert not d.compressor.option_embedding.any()
    with torch.no_grad():
        d.compressor.option_embedding.normal_()
    d.save_pretrained(tmp_path)
    back = Drafter.from_pretrained(tmp_path)
    assert torch.equal(back.compressor.option_embedding, d.compressor.option_embedding)
    # a fixed primitive has one option: a constant bias would carry nothing, so none is made
    one = DrafterConfig.for_target(
        adapter,
        visual_prefix="compressed",
        compressor={"options": ["pool:2"], "option_embedding": True},
    )
    assert Drafter(one).compressor.option_embedding is None


@pytest.mark.parametrize(
    "compressor",
    [
        {"options": ["prune:0.5"]},
        {"options": ["conv:2"]},
        {"options": ["resampler:2"]},
        {"options": ["resampler:2", "pool:2"], "gate": "critic", "option_embedding": True},
    ],
)
def test_joint_step_moves_every_compressor_and_drafter_parameter(micro_target_dir, compressor):
    module = _module(micro_target_dir, visual_prefix="compressed", compressor=compressor)
    module.train()
    before = {n: p.detach().clone() for n, p in module.drafter.named_parameters()}
    # no weight decay: a parameter moves only if its gradient reaches it
    opt = torch.optim.AdamW(module.drafter.parameters(), lr=1e-2, weight_decay=0.0)
    # two steps: a gate's zero-initialised output layer passes no gradient to its first layer
    # until it has moved itself
    for _ in range(2):
        loss = module.losses(_batch(micro_target_dir), module.train_agreement)
        loss.backward()
        opt.step()
        opt.zero_grad()
        assert torch.isfinite(loss)
    for n, p in module.drafter.named_parameters():
        assert not torch.equal(p, before[n]), f"parameter {n} did not move"


def test_training_and_the_edge_build_the_same_prefix(micro_target_dir, micro_model):
    options = ["prune:0.25", "pool:2", "resampler:2"]
    module = _module(micro_target_dir, visual_prefix="compressed", compressor={"options": options})
    with torch.no_grad():
        module.drafter.compressor.gate.net[2].weight.normal_()
    module.eval()
    batch = _batch(micro_target_dir, n=1, seed=5)
    t = module.teacher(batch)
    with torch.no_grad():
        prefix = visual_prefix(module.drafter, **t["target"])
    sample = make_sample(5, 0)
    question = sample["messages"][0]["content"].replace("<image>\n", "")
    processor = AutoProcessor.from_pretrained(micro_target_dir)
    runner = SpecRunner(micro_model, processor, module.drafter)  # the same weights on both sides
    req = Request(sample["image"], question, max_new_tokens=4)
    down = EdgeRole(runner, runner.feature_encoder()).prefill(req)
    assert req.gate_choice == options[int(prefix.choice[0])]
    torch.testing.assert_close(down.visual.values, prefix.tokens[0][prefix.valid[0]])
    # the question the gate reads is the same text on both sides
    ask = t["target"]["ask"][0]
    inputs = runner.encode(sample["image"], question)
    mask = prompt_mask(inputs["attention_mask"], runner.adapter.visual_mask(inputs["input_ids"]))
    assert batch["input_ids"][0][ask].tolist() == inputs["input_ids"][0][mask[0]].tolist()


@pytest.mark.parametrize("options", [["pool:4"], ["resampler:2"], ["none", "prune:0.25"]])
def test_compressed_prefix_runner_is_lossless(micro_model, micro_target_dir, options, tmp_path):
    adapter = adapter_for(micro_model)
    torch.manual_seed(0)
    cfg = DrafterConfig.for_target(
        adapter, visual_prefix="compressed", compressor={"options": options}
    )
    Drafter(cfg).save_pretrained(tmp_path)
    runner = SpecRunner.from_folders(str(micro_target_dir), str(tmp_path))
    s = make_sample(43, 0)
    inputs = runner.encode(s["image"], "Describe the image.")
    with torch.no_grad():
        ref = micro_model.generate(
            **inputs, do_sample=False, max_new_tokens=30, suppress_tokens=runner.suppress_tokens
        )[0, inputs["input_ids"].shape[1] :].tolist()
    for mode in ("chain", "tree"):
        got = runner.generate(
            s["image"], "Describe the image.", 30, DraftSettings(mode=mode, depth=4)
        )
        assert got.tokens == ref
        assert got.prefix_tokens == option_tokens(got.gate_choice, grid_for(81))
        assert got.draft_steps > 0
    # a text-only prompt (a follow-up turn, a text question) has nothing to compress
    inputs = runner.encode(None, "How many objects are there?")
    with torch.no_grad():
        ref = micro_model.generate(
            **inputs, do_sample=False, max_new_tokens=12, suppress_tokens=runner.suppress_tokens
        )[0, inputs["input_ids"].shape[1] :].tolist()
    got = runner.generate(None, "How many objects are there?", 12, DraftSettings(depth=4))
    assert got.tokens == ref and got.prefix_tokens == 0
    assert got.gate_choice == ("none" if "none" in options else options[0])


@pytest.mark.parametrize(
    "extra,suffix",
    [
        ([], "toy-drafter-elastic"),
        (["--model.compressor", "{options: [pool:4]}"], "toy-drafter-pool4"),
    ],
)
def test_elastic_recipe_names_its_exports(monkeypatch, extra, suffix):
    from tests.test_distill import ROOT, ParseOnlyCLI, make_cli

    monkeypatch.chdir(ROOT)
    cli = make_cli(["--config", "recipes/toy/elastic.yaml", *extra], cli_class=ParseOnlyCLI)
    assert cli.model.hparams.visual_prefix == "compressed"
    export = [c for c in cli.config_init.trainer.callbacks if type(c).__name__ == "ExportDrafter"]
    assert export[0].dirpath.endswith(suffix)


def test_device_puts_the_prefix_ahead_of_the_prompt_in_its_cache(micro_model, micro_target_dir):
    from covspec.inference.roles import DeviceRole

    adapter = adapter_for(micro_model)
    torch.manual_seed(0)
    cfg = DrafterConfig.for_target(
        adapter, visual_prefix="compressed", compressor={"options": ["pool:4"]}
    )
    drafter = Drafter(cfg).attach_target(adapter).eval()
    runner = SpecRunner(micro_model, AutoProcessor.from_pretrained(micro_target_dir), drafter)
    s = make_sample(43, 0)
    req = Request(s["image"], "Describe the image.", max_new_tokens=4)
    down = EdgeRole(runner, runner.feature_encoder()).prefill(req)
    DeviceRole(runner).prefill(req, down, capacity=256)
    d = cfg.hidden_size
    prefix = down.visual.values  # (9, 2D)
    assert prefix.shape == (9, 2 * d)
    with torch.no_grad():  # the reference: the drafter module over [prefix rows; prompt rows]
        inputs = runner.encode(s["image"], "Describe the image.")
        out = runner.adapter.forward(inputs, cfg.fused_layer_ids)
        text = ~out.visual_mask[0]
        fused = torch.cat([out.hidden_states[i][0][text] for i in cfg.fused_layer_ids], -1)
        feats = drafter.project_features(fused, like=prefix[:, :d])
        ids = torch.cat([down.token_ids[1:], torch.tensor([down.first_token])])
        embeds = torch.cat([prefix[:, :d], drafter.embed(ids)])[None]
        feats = torch.cat([prefix[:, d:], feats])[None]
        n = embeds.shape[1]
        mask = torch.full((n, n), torch.finfo(embeds.dtype).min).triu(1)[None, None]
        ref = drafter(embeds, feats, torch.arange(n)[None], mask)[0, -1]
    torch.testing.assert_close(req.source.hidden[0], ref, atol=1e-5, rtol=1e-5)


def test_critic_gate_picks_the_lowest_predicted_loss_plus_the_price_of_its_rows():
    comp = _compressor(["none", "pool:4", "pool:2"])
    comp.config.gate = "critic"
    images = [[(torch.randn(81, 16), (9, 9))] for _ in range(3)]
    with torch.no_grad():
        comp.gate.net[2].bias.copy_(torch.tensor([0.30, 0.10, 0.05]))  # predicted losses
        assert comp(images, torch.randn(3, 8)).choice.tolist() == [2, 2, 2]  # free rows
        comp.config.cost_weight = 0.5  # 0.10 + 0.5 * 9/81 < 0.05 + 0.5 * 25/81 < 0.30
        out = comp(images, torch.randn(3, 8), temperature=1.0)  # a critic never samples
    assert out.choice.tolist() == [1, 1, 1]
    assert torch.allclose(out.scores, torch.tensor([0.30, 0.10, 0.05]).expand(3, 3))
    forced = comp(images, torch.randn(3, 8), force=torch.tensor([0, 2, 1]))
    assert forced.choice.tolist() == [0, 2, 1] and forced.valid.sum(1).tolist() == [0, 25, 9]
    with pytest.raises(ValueError, match="gate"):
        VisualCompressorConfig(hidden_size=8, gate="bandit")


def test_a_critics_price_moves_its_pick_monotonically_toward_fewer_rows():
    comp = _compressor(["none", "pool:4", "pool:2", "pool:1"])
    comp.config.gate = "critic"
    images = [[(torch.randn(81, 16), (9, 9))] for _ in range(16)]
    prompts = torch.randn(16, 8)
    rows = []
    with torch.no_grad():
        comp.gate.net[2].bias.copy_(torch.tensor([0.4, 0.2, 0.1, 0.0]))  # more rows, less loss
        for weight in (0.0, 0.1, 0.3, 1.0, 100.0):
            comp.set_cost_weight(weight)
            rows.append(comp(images, prompts).valid.sum(1))  # (B,) rows per sample
    assert rows[0].tolist() == [81] * 16 and rows[-1].tolist() == [0] * 16
    for cheaper, dearer in zip(rows, rows[1:], strict=False):
        assert (dearer <= cheaper).all()  # a higher price never buys a sample more rows
    assert len({tuple(r.tolist()) for r in rows}) >= 3  # the price moves the operating point
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="cost_weight"):
            comp.set_cost_weight(bad)
    with pytest.raises(ValueError, match="only a critic gate"):
        _compressor(["none", "pool:4"]).set_cost_weight(0.1)  # a gumbel gate learned its price
    single = _compressor(["pool:4"])
    single.config.gate = "critic"
    with pytest.raises(ValueError, match="only a critic gate"):
        single.set_cost_weight(0.1)


def test_full_visual_rows_cross_the_link_at_the_wire_dtype(micro_model, micro_target_dir):
    """The MSD-style baseline's visual rows are priced as sent (float16), like every feature
    row, not at the target's float32."""
    from covspec.inference.roles import EdgeRole

    adapter = adapter_for(micro_model)
    torch.manual_seed(0)
    drafter = Drafter(DrafterConfig.for_target(adapter, variant="full_visual")).attach_target(
        adapter
    )
    runner = SpecRunner(
        micro_model, AutoProcessor.from_pretrained(micro_target_dir), drafter.eval()
    )
    s = make_sample(43, 0)
    encoder = runner.feature_encoder(wire=True)
    down = EdgeRole(runner, encoder).prefill(Request(s["image"], "Describe the image.", 4))
    assert down.visual.values.dtype == torch.float16 and down.visual.values.shape[0] == 81
    assert down.visual.nbytes() == 81 * adapter.hidden_size * 2


@pytest.mark.parametrize(
    "family, option, rows",
    [
        # any-res image: base 4x4 -> 2x2, tiles 8x9 (newline column kept) -> 4x5; video: 4
        # pooled 2x2 frames -> 1 row each; the clip's newline token -> 1 row
        ("llava_onevision", "pool:2", 4 + 20 + 4 + 1),
        # frames pooled in time two by two: 2 chunks of 2x2 rows; the images pass unpooled
        ("llava_onevision", "tpool:2", 16 + 72 + 2 * 4 + 1),
        ("qwen2_vl", "pool:2", 1 + 1 + 1),  # one 2x2 image, two 2x2 video time steps
    ],
)
def test_real_families_compress_by_their_own_grids(family, option, rows):
    """The adapter's grids, not run lengths, shape the compression: an any-res image is its
    base view and tile grid, a clip its frames (so temporal pooling pools them)."""
    from tests.tiny_vlms import FAMILIES

    torch.manual_seed(0)
    model, inputs = FAMILIES[family]()
    adapter = adapter_for(model.eval())
    cfg = DrafterConfig.for_target(
        adapter, visual_prefix="compressed", compressor={"options": [option]}
    )
    d = Drafter(cfg).attach_target(adapter).eval()
    with torch.no_grad():
        out = adapter.forward(inputs, sorted({0, *cfg.fused_layer_ids}))
        ask = torch.zeros_like(out.visual_mask)
        ask[0, 0] = True  # the gate's question: any text position will do here
        prefix = visual_prefix(d, inputs["input_ids"], out.hidden_states, out.visual_mask, ask,
                               grids=adapter.visual_grids(inputs))  # fmt: skip
    assert int(prefix.valid.sum()) == rows


def test_training_and_the_edge_cut_visual_runs_by_the_adapters_grids(
    micro_model, micro_target_dir, monkeypatch
):
    """Both callers hand the adapter's grids to the compressor: told that the micro target's
    81-token image is one row of 81, pool:2 makes 41 rows, not the square guess's 25."""
    from covspec.modeling.adapters import TargetAdapter

    monkeypatch.setattr(TargetAdapter, "visual_grids", lambda self, inputs: [[(1, 81)]])
    module = _module(
        micro_target_dir, visual_prefix="compressed", compressor={"options": ["pool:2"]}
    )
    module.eval()
    t = module.teacher(_batch(micro_target_dir, n=1, seed=5))
    with torch.no_grad():
        assert int(visual_prefix(module.drafter, **t["target"]).valid.sum()) == 41
    runner = SpecRunner(
        micro_model, AutoProcessor.from_pretrained(micro_target_dir), module.drafter
    )
    req = Request(make_sample(5, 0)["image"], "How many shapes?", max_new_tokens=4)
    EdgeRole(runner, runner.feature_encoder()).prefill(req)
    assert req.prefix_tokens == 41
