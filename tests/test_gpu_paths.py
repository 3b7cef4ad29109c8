"""CPU checks of the paths the GPU recipes take: DeepSpeed checkpoints without the frozen target,
and a pruned draft vocabulary from training through export to lossless decoding."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from covspec.data.datamodule import ConversationDataModule
from covspec.data.toy_world import make_sample
from covspec.inference.runner import SpecRunner
from covspec.inference.tree import DraftSettings, DraftTree
from covspec.modeling.drafter import Drafter
from covspec.training.callbacks import ExportDrafter
from covspec.training.distill import DrafterDistillation

ROOT = Path(__file__).resolve().parents[1]

# -- DeepSpeed: the frozen target stays out of the engine's checkpoint ---------------------------


def deepspeed_child(target_dir: str, out_dir: str) -> None:
    """Runs in a subprocess (one gloo rank on CPU): wrap the distillation module in a ZeRO-2
    engine as Lightning's DeepSpeedStrategy does, save one checkpoint with and one without
    `exclude_frozen_parameters`, and write the parameter names to `out_dir/names.json`."""
    import importlib

    import deepspeed

    # One rank never uses DeepSpeed's shared-memory CPU all-reduce; skipping it avoids a JIT C++
    # build of that op (about a minute on a cold ~/.cache/torch_extensions). importlib, because
    # the attribute `deepspeed.comm.torch` is the torch package, not DeepSpeed's module.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    module = DrafterDistillation(target=target_dir, unroll_steps=2)
    module.configure_model()
    trainable = [p for p in module.parameters() if p.requires_grad]
    # Lightning hands DeepSpeed the optimizer from configure_optimizers (a torch AdamW), which
    # ZeRO only accepts with zero_allow_untested_optimizer (Lightning's default config sets it).
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": 2},
        "gradient_clipping": 0.5,  # as the recipe's gradient_clip_val reaches the engine
        "zero_allow_untested_optimizer": True,
    }
    engine, *_ = deepspeed.initialize(
        model=module,
        model_parameters=trainable,
        optimizer=torch.optim.AdamW(trainable, lr=1e-4),
        config=config,
    )
    assert engine.zero_optimization_stage() == 2
    for exclude in (True, False):
        engine.save_checkpoint(out_dir, tag=f"exclude_{exclude}", exclude_frozen_parameters=exclude)
    # as Lightning's DeepSpeedStrategy saves last.ckpt: a folder, the module's hooks' client
    # state (hyper-parameters, the drafter's config) beside the engine's tensors
    client = {"hyper_parameters": dict(module.hparams), "global_step": 0, "state_dict": {}}
    module.on_save_checkpoint(client)
    del client["state_dict"]
    engine.save_checkpoint(
        str(Path(out_dir) / "last.ckpt"), client_state=client, tag="checkpoint",
        exclude_frozen_parameters=True,
    )  # fmt: skip
    torch.save(module.drafter.state_dict(), Path(out_dir) / "drafter.pt")
    names = {
        "trainable": [n for n, p in module.named_parameters() if p.requires_grad],
        "frozen": [n for n, p in module.named_parameters() if not p.requires_grad],
    }
    (Path(out_dir) / "names.json").write_text(json.dumps(names))
    (Path(out_dir) / "guard.json").write_text(
        json.dumps(_nonfinite_step(module, engine, trainable))
    )
    torch.distributed.destroy_process_group()


def _nonfinite_step(module, engine, trainable) -> dict:
    """A finite step, then one with a NaN gradient, each followed by the module's batch-end
    hook as Lightning calls it under its DeepSpeedStrategy: what the hook said, and whether the
    weights stayed finite (ZeRO skips the step itself; the hook must stop the run)."""
    from types import SimpleNamespace

    module._trainer = SimpleNamespace(
        strategy=SimpleNamespace(deepspeed_engine=engine), global_step=0, log_every_n_steps=10**9
    )
    module.on_train_start()
    said = []
    for scale in (1.0, float("nan")):
        engine.backward(sum((p.float() ** 2).sum() for p in trainable) * scale)
        engine.step()
        module._trainer.global_step += 1  # Lightning counts the step before the batch-end hook
        try:
            module.on_train_batch_end(None, None, 0)
            said.append("")
        except FloatingPointError as e:
            said.append(str(e))
    finite = all(bool(p.isfinite().all()) for p in trainable)
    return {"said": said, "skipped": engine.skipped_steps, "finite": finite}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model_states(folder: Path) -> dict:
    (path,) = folder.glob("*model_states.pt")
    # DeepSpeed pickles its checkpoint (config, shapes, ...): weights_only=False is needed and
    # safe here, the file was written a moment ago by this test's own subprocess.
    return torch.load(path, map_location="cpu", weights_only=False)["module"]


def test_deepspeed_zero2_checkpoint_excludes_frozen_target(micro_target_dir, tmp_path):
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_SIZE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT),
    }
    code = "import sys; from tests.test_gpu_paths import deepspeed_child; deepspeed_child(*sys.argv[1:])"
    run = subprocess.run(
        [sys.executable, "-c", code, str(micro_target_dir), str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    names = json.loads((tmp_path / "names.json").read_text())
    # ZeRO hides the gradients from on_before_optimizer_step: the batch-end hook stops the run
    guard = json.loads((tmp_path / "guard.json").read_text())
    assert guard["said"][0] == "" and "skipped the update of global step 1" in guard["said"][1]
    assert guard["skipped"] == 1 and guard["finite"]
    assert names["frozen"] and all(n.startswith("target.") for n in names["frozen"])
    assert names["trainable"] and all(n.startswith("drafter.") for n in names["trainable"])

    excluded = _model_states(tmp_path / "exclude_True")
    assert not [k for k in excluded if k.startswith("target.")]
    assert set(names["trainable"]) <= set(excluded)
    full = _model_states(tmp_path / "exclude_False")
    assert set(names["frozen"]) <= set(full)  # without the flag the engine writes the target
    for k in names["trainable"]:
        torch.testing.assert_close(excluded[k], full[k])
    # resume checks and export read a DeepSpeed checkpoint folder
    from covspec.training.checkpoint_export import drafter_from_checkpoint, read_checkpoint
    from covspec.training.guards import check_resumable

    checkpoint = read_checkpoint(tmp_path / "last.ckpt")
    drafter = drafter_from_checkpoint(checkpoint)
    want = torch.load(tmp_path / "drafter.pt", weights_only=True)
    for k, v in drafter.state_dict().items():
        torch.testing.assert_close(v, want[k])
    client = {k: v for k, v in checkpoint.items() if k not in ("state_dict", "module")}
    check_resumable(client, drafter)  # what DeepSpeed hands on_load_checkpoint: no state_dict


# -- a pruned draft vocabulary, end to end --------------------------------------------------------


@pytest.fixture(scope="module")
def pruned_drafter(micro_target_dir, tmp_path_factory):
    """Three optimiser steps with a draft vocabulary of half the target's, exported."""
    out = tmp_path_factory.mktemp("pruned")
    torch.manual_seed(0)
    target = str(micro_target_dir)
    full_vocab = json.loads((micro_target_dir / "config.json").read_text())["text_config"][
        "vocab_size"
    ]
    size = full_vocab // 2

    class VocabBeforeOptimizer(DrafterDistillation):
        def configure_optimizers(self):  # DeepSpeed copies the weights here: the head is set
            assert self.drafter.has_draft_vocab(), "draft vocabulary built after the optimizer"
            return super().configure_optimizers()

    module = VocabBeforeOptimizer(
        target=target,
        unroll_steps=2,
        draft_vocab_size=size,
        draft_vocab_batches=4,  # the whole train set (16 conversations, batch 4)
        warmup_steps=1,
    )
    dm = ConversationDataModule(
        target=target, train_data="toy:16:3", val_data="toy:4:4", batch_size=4
    )
    trainer = L.Trainer(
        max_steps=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=out,
        callbacks=[ExportDrafter(str(out / "drafter"))],
    )
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 3
    dm.setup("fit")
    answer_ids = set()
    for batch in dm.train_dataloader():
        answer_ids |= set(batch["input_ids"][batch["loss_mask"]].tolist())
    return out / "drafter", size, full_vocab, answer_ids


def test_pruned_vocab_export_is_consistent(pruned_drafter):
    folder, size, full_vocab, answer_ids = pruned_drafter
    drafter = Drafter.from_pretrained(folder)
    assert drafter.config.draft_vocab_size == size
    assert drafter.has_draft_vocab()
    assert drafter.d2t.shape == (size,) and drafter.t2d.shape == (full_vocab,)
    ids = drafter.draft_token_ids()
    assert torch.equal(ids, torch.sort(ids).values) and ids.unique().numel() == size
    assert torch.equal(torch.nonzero(drafter.t2d).flatten(), ids)  # t2d marks exactly d2t's ids
    assert torch.equal(drafter.to_target_ids(torch.arange(size)), ids)
    assert drafter.lm_head.weight.shape[0] == size
    # built from answer-token counts over the train set: every answer token made it in
    assert 0 < len(answer_ids) <= size
    assert answer_ids <= set(ids.tolist())


@pytest.mark.parametrize("mode", ["chain", "tree"])
def test_pruned_vocab_drafter_is_lossless_and_drafts_inside_its_vocab(
    pruned_drafter, micro_target_dir, monkeypatch, mode
):
    folder, size, _, _ = pruned_drafter
    runner = SpecRunner.from_folders(str(micro_target_dir), str(folder))
    draft_ids = set(runner.drafter.draft_token_ids().tolist())
    drafted = []
    add = DraftTree.add

    def spy(tree, parent, token, score):
        if parent >= 0:  # the root is the committed token, not a draft
            drafted.append(int(token))
        return add(tree, parent, token, score)

    monkeypatch.setattr(DraftTree, "add", spy)
    prompt = "Describe the image."
    settings = DraftSettings(mode=mode, depth=3, top_k=2, beam=2, max_nodes=6)
    for i in range(2):
        image = make_sample(47, i)["image"]
        inputs = runner.encode(image, prompt)
        with torch.no_grad():
            ref = runner.model.generate(
                **inputs,
                do_sample=False,
                max_new_tokens=24,
                suppress_tokens=runner.suppress_tokens,
            )[0, inputs["input_ids"].shape[1] :].tolist()
        got = runner.generate(image, prompt, 24, settings)
        assert got.tokens == ref
        assert got.drafted > 0
    assert drafted and set(drafted) <= draft_ids, sorted(set(drafted) - draft_ids)
