import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from covspec.data.datamodule import ConversationDataModule
from covspec.training.cli import CovspecCLI, make_cli
from covspec.training.distill import DrafterDistillation, compact
from covspec.training.metrics import DepthAgreement, implied_tau

ROOT = Path(__file__).resolve().parents[1]


def _module(target_dir, **kw):
    torch.manual_seed(0)
    module = DrafterDistillation(target=str(target_dir), unroll_steps=3, **kw)
    module.configure_model()
    return module


def _loader(target_dir, n, seed, batch_size):
    dm = ConversationDataModule(
        target=str(target_dir), train_data=f"toy:{n}:{seed}", val_data=None, batch_size=batch_size
    )
    dm.setup("fit")
    return dm.train_dataloader()


def _batch(target_dir, n=4, seed=0):
    return next(iter(_loader(target_dir, n, seed, n)))


def test_compact_keeps_order():
    keep = torch.tensor([[1, 0, 1, 1, 0], [0, 0, 1, 0, 0]], dtype=torch.bool)
    idx, valid = compact(keep)
    assert idx[0].tolist() == [0, 2, 3] and idx[1, :1].tolist() == [2]
    assert valid.tolist() == [[True, True, True], [True, False, False]]


def test_metrics_implied_tau():
    m = DepthAgreement(3)
    m.update(1, torch.tensor([True, True, False, True]))
    m.update(2, torch.tensor([True, False]))
    rates = m.compute()
    assert rates.tolist() == [0.75, 0.5, 0.0]
    assert implied_tau(rates) == pytest.approx(1 + 0.75 + 0.375)
    with pytest.raises(ValueError, match="depth"):
        m.update(4, torch.tensor([True]))


@pytest.mark.parametrize("variant", ["visual_free", "text_only", "full_visual"])
def test_step_moves_every_drafter_parameter_and_no_target_parameter(micro_target_dir, variant):
    module = _module(micro_target_dir, variant=variant)
    batch = _batch(micro_target_dir)
    before_d = {n: p.detach().clone() for n, p in module.drafter.named_parameters()}
    before_t = {n: p.detach().clone() for n, p in module.target.named_parameters()}
    opt = torch.optim.AdamW(module.drafter.parameters(), lr=1e-2)
    loss = module.losses(batch, module.train_agreement)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert all(not p.requires_grad for p in module.target.parameters())
    for n, p in module.drafter.named_parameters():
        assert not torch.equal(p, before_d[n]), f"drafter parameter {n} did not move"
    for n, p in module.target.named_parameters():
        assert torch.equal(p, before_t[n]), f"target parameter {n} moved"


def test_visual_free_sequence_has_no_visual_positions(micro_target_dir):
    batch = _batch(micro_target_dir)
    free = _module(micro_target_dir).teacher(batch)
    full = _module(micro_target_dir, variant="full_visual").teacher(batch)
    image_id = free["ids"].new_tensor(_module(micro_target_dir).adapter.visual_token_ids())
    assert not torch.isin(free["ids"][free["valid"]], image_id).any()
    n_visual = 81
    assert full["ids"].shape[1] - free["ids"].shape[1] == n_visual


def test_nan_loss_stops_naming_the_step(micro_target_dir):
    module = _module(micro_target_dir)
    with torch.no_grad():
        module.drafter.fc.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="global step 0"):
        module.training_step(_batch(micro_target_dir), 0)


def test_missing_layer_ids_refused_before_training(micro_target_dir):
    with pytest.raises(ValueError, match="outside"):
        _module(micro_target_dir, fused_layer_ids=[1, 40])


class ParseOnlyCLI(CovspecCLI):
    """Parses a recipe and instantiates every class in it except the Trainer (GPU recipes)."""

    def instantiate_trainer(self, **kwargs):
        return None


RECIPES = sorted(
    str(p.relative_to(ROOT)) for p in (ROOT / "recipes").rglob("*.yaml") if "_shared" not in p.parts
)


MODULE_RECIPES = [
    r for r in RECIPES if "acceptance" in Path(r).name or r.endswith("device-vlm.yaml")
]
DRAFTER_RECIPES = [r for r in RECIPES if r not in MODULE_RECIPES]


@pytest.mark.parametrize("recipe", MODULE_RECIPES)
def test_class_path_recipes_parse_through_the_cli(recipe, monkeypatch):
    import lightning as L

    from covspec.data.datamodule import ConversationDataModule
    from covspec.data.trajectories import TrajectoryDataModule
    from covspec.training.acceptance import AcceptanceHeadTraining
    from covspec.training.cli import ModuleCLI, _names_classes
    from covspec.training.device_drafter import DeviceDrafterDistillation

    class ParseOnly(ModuleCLI):
        def instantiate_trainer(self, **kwargs):
            return None

    monkeypatch.chdir(ROOT)
    assert _names_classes(["--config", recipe])  # covspec train picks the generic CLI
    cli = ParseOnly(
        L.LightningModule, L.LightningDataModule, subclass_mode_model=True,
        subclass_mode_data=True, run=False, args=["--config", recipe],
    )  # fmt: skip
    callbacks = cli.config_init.trainer.callbacks
    if "acceptance" in Path(recipe).name:
        assert isinstance(cli.model, AcceptanceHeadTraining)
        assert isinstance(cli.datamodule, TrajectoryDataModule)
        assert [type(c).__name__ for c in callbacks] == ["ExportAcceptanceHead"]
        if "toy" not in recipe:  # never the toy head's folders, which its base recipe names
            folder = Path(recipe).parent.name
            assert (
                folder in callbacks[0].dirpath
                and folder in cli.config_init.trainer.default_root_dir
            )
    else:
        assert isinstance(cli.model, DeviceDrafterDistillation)
        assert isinstance(cli.datamodule, ConversationDataModule)
        assert callbacks[-1].dirpath == f"checkpoints/{Path(recipe).parent.name}-device-vlm"


@pytest.mark.parametrize("recipe", DRAFTER_RECIPES)
def test_every_recipe_parses_through_the_cli(recipe, monkeypatch):
    monkeypatch.chdir(ROOT)
    cli = make_cli(["--config", recipe, "--model.variant", "text_only"], cli_class=ParseOnlyCLI)
    assert isinstance(cli.model, DrafterDistillation) and cli.model.hparams.variant == "text_only"
    assert isinstance(cli.datamodule, ConversationDataModule)
    assert cli.datamodule.hparams.target == cli.model.hparams.target
    callbacks = cli.config_init.trainer.callbacks
    export = [c for c in callbacks if type(c).__name__ == "ExportDrafter"][0]
    assert "-text-only" in export.dirpath, "variant suffix not resolved"
    if recipe.startswith("recipes/toy/") and "quick" not in recipe:  # named after their target
        stem = Path(cli.model.hparams.target).name.removesuffix("-target")
        assert export.dirpath.startswith(f"checkpoints/{stem}-drafter-text-only")
    if cli.model.hparams.feature_codec_rank:  # a codec run never overwrites its start drafter
        assert export.dirpath.endswith(f"-r{cli.model.hparams.feature_codec_rank}")
    if "toy" not in recipe:
        strategy = cli.config_init.trainer.strategy
        assert (
            type(strategy).__name__ == "DeepSpeedStrategy"
            and strategy.config["zero_optimization"]["stage"] == 2
        )
        # the frozen target stays out of DeepSpeed checkpoints (the engine saves every
        # parameter otherwise; Lightning does not call the module's state-dict filter)
        assert strategy.exclude_frozen_parameters is True
        folder = Path(recipe).parent.name  # shared base, names follow the including recipe
        assert export.dirpath == f"checkpoints/{folder}-drafter-text-only"
        assert cli.model.hparams.draft_vocab_size == 32000


@pytest.mark.parametrize("seed,suffix", [(0, "toy-drafter-full-visual"), (3, "-full-visual-seed3")])
def test_a_seed_replicate_gets_folders_of_its_own(seed, suffix, monkeypatch):
    """Another seed must not resume (resume: last) or overwrite seed 0's run: the resume guard
    compares drafter settings and target, which seeds share."""
    monkeypatch.chdir(ROOT)
    args = ["--config", "recipes/toy/drafter.yaml", "--model.variant", "full_visual"]
    cli = make_cli([*args, "--seed_everything", str(seed)], cli_class=ParseOnlyCLI)
    callbacks = cli.config_init.trainer.callbacks
    dirs = [c.dirpath for c in callbacks if hasattr(c, "dirpath")]  # checkpoints and export
    assert len(dirs) == 2 and all(d.endswith(suffix) for d in dirs)


def test_unknown_recipe_key_is_an_error(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        (ROOT / "recipes/toy/drafter.yaml")
        .read_text()
        .replace("  unroll_steps: 6", "  unrol_steps: 6")
    )
    with pytest.raises(SystemExit):
        make_cli(["--config", str(bad)], cli_class=ParseOnlyCLI)


def _train(target_dir, out, extra, timeout=240):
    args = [
        sys.executable, "-m", "covspec.scripts.cli", "train", "--config", "recipes/toy/drafter.yaml",
        f"--model.target={target_dir}", "--model.unroll_steps=3", "--model.warmup_steps=2",
        "--data.train_data=toy:64:3", "--data.val_data=toy:8:4", "--data.batch_size=4",
        "--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.val_check_interval=null",
        "--trainer.callbacks=lightning.pytorch.callbacks.ModelCheckpoint",  # replaces the list
        f"--trainer.callbacks.dirpath={out}/ckpt", "--trainer.callbacks.save_last=true",
        "--trainer.callbacks+=training.callbacks.ExportDrafter", f"--trainer.callbacks.dirpath={out}/drafter",
        "--trainer.default_root_dir", str(out), "--resume", "none", *extra,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_cli_ddp_two_processes_on_cpu(micro_target_dir, tmp_path):
    run = _train(
        micro_target_dir,
        tmp_path,
        ["--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.max_steps=3"],
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "drafter" / "model.safetensors").is_file()
    card = (tmp_path / "drafter" / "README.md").read_text()
    assert "Implied tau" in card and "agreement" in card


def _agreement(module, batch):
    m = DepthAgreement(module.hparams.unroll_steps)
    with torch.no_grad():
        module.losses(batch, m)
    return m.compute()


def test_seconds_of_training_beat_chance(micro_target_dir):
    module = _module(micro_target_dir)
    held_out = _batch(micro_target_dir, n=16, seed=99)
    untrained = _agreement(module, held_out)
    opt = torch.optim.AdamW(module.drafter.parameters(), lr=3e-3)
    for batch in _loader(micro_target_dir, n=320, seed=1, batch_size=8):
        loss = module.losses(batch, module.train_agreement)
        opt.zero_grad()
        loss.backward()
        opt.step()
    trained = _agreement(module, held_out)
    chance = 1 / module.adapter.vocab_size
    assert trained[0] > max(10 * chance, untrained[0] + 0.1), (untrained, trained)
    assert implied_tau(trained) > implied_tau(untrained)


def test_resume_from_last_checkpoint_without_target_weights(micro_target_dir, tmp_path):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    class Count(L.Callback):
        batches = 0

        def on_train_batch_end(self, *args):
            self.batches += 1

    def fit(max_steps, ckpt_path=None):
        module = DrafterDistillation(target=str(micro_target_dir), unroll_steps=2, warmup_steps=1)
        dm = ConversationDataModule(
            target=str(micro_target_dir), train_data="toy:32:5", val_data=None, batch_size=4
        )
        ckpt = ModelCheckpoint(
            dirpath=tmp_path, save_last=True, save_top_k=0, every_n_train_steps=1
        )
        trainer = L.Trainer(
            accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
            enable_model_summary=False, callbacks=[ckpt, count := Count()], default_root_dir=tmp_path,
        )  # fmt: skip
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
        return trainer, module, count.batches

    _, first, _ = fit(2)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert saved["state_dict"] and not any(k.startswith("target.") for k in saved["state_dict"])
    trainer, resumed, batches = fit(3, ckpt_path=str(tmp_path / "last.ckpt"))
    assert trainer.global_step == 3 and batches == 1  # continued, not restarted


def test_teacher_computes_logits_at_answer_positions_only(micro_target_dir, monkeypatch):
    module = _module(micro_target_dir)
    batch = _batch(micro_target_dir)
    seen, rows = {}, []
    forward, from_hidden = module.adapter.forward, module.adapter.logits_from_hidden

    def spy_forward(inputs, layer_ids, **kw):
        seen.update(kw)
        out = forward(inputs, layer_ids, **kw)
        seen["logits_shape"] = tuple(out.logits.shape)
        return out

    monkeypatch.setattr(module.adapter, "forward", spy_forward)
    monkeypatch.setattr(
        module.adapter, "logits_from_hidden", lambda h: rows.append(h.shape[0]) or from_hidden(h)
    )
    module.losses(batch, module.train_agreement)
    assert seen["logits_to_keep"] == 1 and seen["logits_shape"][1] == 1
    # one head call over the answer tokens that have a drafter prediction, not every position
    answer_tokens = int(batch["loss_mask"].sum())
    assert rows and 0 < rows[0] <= answer_tokens < batch["attention_mask"].sum()


def test_codec_fine_tune_starts_from_a_trained_drafter(micro_target_dir, tmp_path):
    base = _module(micro_target_dir)
    with torch.no_grad():
        base.drafter.fc.weight.normal_()
    base.drafter.save_pretrained(tmp_path)
    d = base.drafter.config.hidden_size
    full = min(d, base.drafter.fc.weight.shape[1])
    codec = _module(micro_target_dir, init_from=str(tmp_path), feature_codec_rank=full)
    # at full rank the SVD split reproduces fc; every other weight is copied
    torch.testing.assert_close(
        codec.drafter.feature_projection(), base.drafter.fc.weight, rtol=1e-4, atol=1e-4
    )
    torch.testing.assert_close(codec.drafter.norm.weight, base.drafter.norm.weight)
    small = _module(micro_target_dir, init_from=str(tmp_path), feature_codec_rank=4)
    assert small.drafter.fc_down.weight.shape == (4, base.drafter.fc.weight.shape[1])
    before = {n: p.detach().clone() for n, p in small.drafter.named_parameters()}
    opt = torch.optim.AdamW(small.drafter.parameters(), lr=1e-2)
    small.losses(_batch(micro_target_dir), small.train_agreement).backward()
    opt.step()
    for name in ("fc_down.weight", "fc_up.weight"):  # gradients pass the int8 fake quantiser
        assert not torch.equal(dict(small.drafter.named_parameters())[name], before[name])
    with pytest.raises(ValueError, match="visual_free"):
        _module(micro_target_dir, init_from=str(tmp_path), variant="text_only")
    with pytest.raises(ValueError, match="exclusive"):  # two starts: refused, not one ignored
        DrafterDistillation(
            target=str(micro_target_dir), init_from=str(tmp_path), init_from_target=True
        )


def test_init_from_target_starts_the_drafter_at_the_targets_last_layer(micro_target_dir):
    module = _module(micro_target_dir, init_from_target=True)
    last, drafter = module.adapter.decoder_layers()[-1], module.drafter
    first = drafter.layers[0]
    assert torch.equal(first.mlp.down_proj.weight, last.mlp.down_proj.weight)
    assert torch.equal(first.self_attn.o_proj.weight, last.self_attn.o_proj.weight)
    assert torch.equal(drafter.norm.weight, module.adapter.language_model().norm.weight)
    q = first.self_attn.q_proj.weight
    d = q.shape[1] // 2
    assert torch.equal(q[:, :d] + q[:, d:], last.self_attn.q_proj.weight)
    states = torch.randn(2, 3, drafter.fc.in_features)
    assert torch.equal(drafter.project_features(states, like=states), states[..., -d:])
    fresh = _module(micro_target_dir)  # the default stays a random start
    assert not torch.equal(fresh.drafter.layers[0].mlp.down_proj.weight, last.mlp.down_proj.weight)
    narrow = _module(micro_target_dir).drafter
    with pytest.raises(ValueError, match="does not fit"):
        narrow.init_from_target_layer(_half_width(last), module.adapter.language_model().norm)


def test_init_from_target_refuses_a_gemma_layer():
    from covspec.modeling.adapters import adapter_for
    from covspec.modeling.drafter import Drafter, DrafterConfig
    from tests.tiny_vlms import gemma3

    model = gemma3()[0]
    adapter = adapter_for(model.eval())
    drafter = Drafter(DrafterConfig.for_target(adapter))
    last = adapter.decoder_layers()[-1]
    with pytest.raises(ValueError, match="not a Llama-layout decoder layer"):
        drafter.init_from_target_layer(last, adapter.language_model().norm)
    del last.pre_feedforward_layernorm  # even without the extra norms: (1 + w) norms differ
    with pytest.raises(ValueError, match="computes another function"):
        drafter.init_from_target_layer(last, adapter.language_model().norm)
    from tests.tiny_vlms import llava  # a bf16 Llama-layout target is accepted (GPU default)

    bf16 = adapter_for(llava()[0].to(torch.bfloat16).eval())
    fresh = Drafter(DrafterConfig.for_target(bf16))
    fresh.init_from_target_layer(bf16.decoder_layers()[-1], bf16.language_model().norm)
    assert torch.equal(fresh.norm.weight, bf16.language_model().norm.weight.float())


def _half_width(layer):
    """A decoder layer of half the width: its projections cannot fill the drafter's."""
    import copy

    odd = copy.deepcopy(layer)
    w = odd.self_attn.q_proj.weight
    odd.self_attn.q_proj = torch.nn.Linear(w.shape[1] // 2, w.shape[0], bias=False)
    return odd


def test_a_log_file_gets_a_progress_bar_that_prints(monkeypatch):
    """Rich draws nothing into a non-terminal stdout until the run ends: there the train
    command swaps in tqdm, and leaves a terminal's bar alone."""
    import io

    import lightning as L
    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

    from covspec.training.cli import _plain_progress_bar

    for tty in (False, True):
        stdout = io.StringIO()
        stdout.isatty = lambda tty=tty: tty
        monkeypatch.setattr("sys.stdout", stdout)
        trainer = L.Trainer(
            accelerator="cpu", logger=False, callbacks=[RichProgressBar()], max_steps=1
        )
        _plain_progress_bar(trainer)
        bar = trainer.progress_bar_callback
        assert isinstance(bar, RichProgressBar if tty else TQDMProgressBar), (tty, bar)
