"""Fault injection: nothing lost, nothing deleted, every bad input refused early.

One test per fault, each named after it: a lost export, a resumed checkpoint or a
drafter of another target, output folders deleted, bad data found late, tracebacks instead of
one line, NaN caught a step late, another run's recipe in a card, and a killed run that must
resume to the very same weights. Runner losslessness has its own file (tests/test_lossless.py).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText

from covspec.data.datamodule import Collator, ConversationDataModule
from covspec.data.readers import DataFileError, read_conversations_jsonl, read_prompts_jsonl
from covspec.data.resumable import ResumableLoader, ResumableSampler
from covspec.data.toy_world import make_sample
from covspec.inference.runner import SpecRunner
from covspec.modeling import outputs
from covspec.modeling.adapters import TargetMismatchError
from covspec.modeling.drafter import Drafter, DrafterWeightsError
from covspec.modeling.outputs import MARKER, OutputFolderError, write_folder
from covspec.scripts.cli import main
from covspec.training.acceptance import ExportAcceptanceHead
from covspec.training.checkpoint_export import export_checkpoint
from covspec.training.distill import DrafterDistillation
from covspec.training.guards import check_finite_weights
from covspec.training.toy_target import ToyTargetSettings, build_toy_target

ROOT = Path(__file__).resolve().parents[1]


def _train_args(target: Path, out: Path, *extra: str, steps: int = 4) -> list[str]:
    """`covspec train` on the micro target: 12 toy rows in batches of 4 (3 per epoch), a
    checkpoint every step, the export callback, no logger or validation."""
    return [
        "train", "--config", "recipes/toy/drafter.yaml", f"--model.target={target}",
        "--model.unroll_steps=2", "--model.warmup_steps=1", "--data.train_data=toy:12:3",
        "--data.val_data=null", "--data.batch_size=4", "--trainer.logger=false",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        "--trainer.val_check_interval=null", f"--trainer.max_steps={steps}",
        "--trainer.callbacks=lightning.pytorch.callbacks.ModelCheckpoint",
        f"--trainer.callbacks.dirpath={out}/ckpt", "--trainer.callbacks.save_last=true",
        "--trainer.callbacks.every_n_train_steps=1", "--trainer.callbacks.save_top_k=0",
        "--trainer.callbacks+=covspec.training.callbacks.ExportDrafter",
        f"--trainer.callbacks.dirpath={out}/drafter", f"--trainer.default_root_dir={out}", *extra,
    ]  # fmt: skip


@pytest.fixture
def at_root(monkeypatch):
    monkeypatch.chdir(ROOT)


@pytest.fixture(scope="module")
def trained(micro_target_dir, tmp_path_factory):
    """A finished 4-step run: (run folder, its export's tensors)."""
    out = tmp_path_factory.mktemp("run")
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        assert main(_train_args(micro_target_dir, out)) == 0
    finally:
        os.chdir(cwd)
    return out, load_file(out / "drafter" / "model.safetensors")


@pytest.fixture(scope="module")
def retrained_target(micro_target_dir, tmp_path_factory):
    """The micro target "retrained": same shapes, same tokenizer, other weights."""
    out = tmp_path_factory.mktemp("retrained") / "micro"
    shutil.copytree(micro_target_dir, out)
    model = AutoModelForImageTextToText.from_pretrained(out)
    with torch.no_grad():
        model.lm_head.weight.mul_(1.01)
    model.save_pretrained(out)
    return out


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- 1. a lost export is recovered from the checkpoint ------------------------------------------
def test_export_is_a_function_of_the_checkpoint(trained, tmp_path, capsys):
    out, tensors = trained
    assert (
        main(["export-checkpoint", str(out / "ckpt" / "last.ckpt"), "--out", str(tmp_path / "e")])
        == 0
    )
    assert _same(load_file(tmp_path / "e" / "model.safetensors"), tensors)
    card = (tmp_path / "e" / "README.md").read_text()
    assert card == (out / "drafter" / "README.md").read_text()  # same steps, metrics, recipe


def test_rerun_with_a_complete_checkpoint_exports_a_missing_export(
    trained, micro_target_dir, at_root, capsys
):
    out, tensors = trained
    shutil.rmtree(out / "drafter")  # killed between the last checkpoint and the export
    capsys.readouterr()
    assert main(_train_args(micro_target_dir, out)) == 0
    said = capsys.readouterr().out
    assert "nothing left to train" in said and "exported drafter" in said, said
    assert _same(load_file(out / "drafter" / "model.safetensors"), tensors)
    assert main(_train_args(micro_target_dir, out)) == 0  # now current: not rewritten
    assert "is current" in capsys.readouterr().out
    # an export from an earlier checkpoint, written after the last one: newer, yet stale
    last = torch.load(out / "ckpt" / "last.ckpt", weights_only=True)
    early = {**last, "global_step": last["global_step"] - 1}
    early["state_dict"] = {k: v * 0.5 for k, v in last["state_dict"].items()}
    torch.save(early, out / "early.ckpt")
    assert main(["export-checkpoint", str(out / "early.ckpt"), "--out", str(out / "drafter")]) == 0
    assert not _same(load_file(out / "drafter" / "model.safetensors"), tensors)
    capsys.readouterr()
    assert main(_train_args(micro_target_dir, out)) == 0
    assert "exported drafter" in capsys.readouterr().out  # by its step, not its file time
    assert _same(load_file(out / "drafter" / "model.safetensors"), tensors)


def _target_of(run: Path) -> str:
    return json.loads((run / "drafter" / "config.json").read_text())["target_name_or_path"]


# -- 2. checkpoints and drafters carry their target's identity ----------------------------------
def test_resume_refuses_a_retrained_target(trained, retrained_target, at_root, capsys):
    out, _ = trained
    assert main(_train_args(retrained_target, out, steps=6)) == 2
    err = capsys.readouterr().err
    assert "weights digest" in err and "target_weights_digest" in err and "Traceback" not in err


def test_resume_refuses_other_drafter_settings(trained, micro_target_dir, at_root, capsys):
    out, _ = trained
    assert main(_train_args(micro_target_dir, out, "--model.drafter_layers=2", steps=6)) == 2
    assert "num_hidden_layers=1" in capsys.readouterr().err


def test_runner_refuses_a_retrained_target_and_an_unchecked_drafter(
    trained, retrained_target, tmp_path
):
    out, _ = trained
    with pytest.raises(TargetMismatchError, match="weights digest"):
        SpecRunner.from_folders(str(retrained_target), str(out / "drafter"))
    shutil.copytree(out / "drafter", tmp_path / "d")
    config = json.loads((tmp_path / "d" / "config.json").read_text())
    for field in ("tokenizer_fingerprint", "target_weights_digest"):  # nulled: check switched off
        edited = {**config, field: None}
        (tmp_path / "d" / "config.json").write_text(json.dumps(edited))
        with pytest.raises(TargetMismatchError, match=f"records no .*{field}"):
            SpecRunner.from_folders(_target_of(out), str(tmp_path / "d"))


def test_edited_layer_count_and_pickle_weights_refused(trained, tmp_path):
    out, tensors = trained
    shutil.copytree(out / "drafter", tmp_path / "d")
    config = json.loads((tmp_path / "d" / "config.json").read_text())
    (tmp_path / "d" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 2}))
    with pytest.raises(DrafterWeightsError, match="missing: .*layers.1"):
        Drafter.from_pretrained(tmp_path / "d")
    (tmp_path / "d" / "config.json").write_text(json.dumps(config))
    torch.save(tensors, tmp_path / "d" / "pytorch_model.bin")
    (tmp_path / "d" / "model.safetensors").unlink()
    with pytest.raises(OSError, match="model.safetensors"):
        Drafter.from_pretrained(tmp_path / "d")


# -- 3. folders covspec did not make are never deleted -------------------------------------------
def test_toy_data_refuses_a_foreign_folder(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    assert main(["toy-data", "--out", str(out), "--num", "2"]) == 2
    assert "not written by covspec" in capsys.readouterr().err
    assert (out / "thesis.tex").read_text() == "years of work"
    assert main(["toy-data", "--out", str(out), "--num", "2", "--overwrite"]) == 0
    assert main(["toy-data", "--out", str(out), "--num", "3"]) == 0  # ours now: replaced
    assert len((out / "data.jsonl").read_text().splitlines()) == 3 and (out / MARKER).is_file()


def test_toy_target_and_export_refuse_a_foreign_folder_before_training(
    micro_target_dir, tmp_path, at_root, capsys
):
    out = tmp_path / "target"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    with pytest.raises(OutputFolderError, match="not written by covspec"):
        build_toy_target(out, ToyTargetSettings(vision_steps=10**9))  # refused, not trained
    run = tmp_path / "run"
    (run / "drafter").mkdir(parents=True)
    (run / "drafter" / "notes.txt").write_text("keep")
    assert main(_train_args(micro_target_dir, run)) == 2
    assert "not written by covspec" in capsys.readouterr().err
    assert not (run / "ckpt").exists()  # refused at setup, before any step
    with pytest.raises(OutputFolderError, match="not written by covspec"):  # the head's export
        ExportAcceptanceHead(str(out)).setup(None, None, "fit")
    assert (out / "notes.txt").is_file() and (run / "drafter" / "notes.txt").is_file()


@pytest.mark.parametrize("exchange", [True, False])
def test_replacing_a_folder_leaves_one_complete_folder_at_every_instant(
    tmp_path, monkeypatch, exchange
):
    out = tmp_path / "out"
    write_folder(out, lambda t: (t / "f").write_text("old"))
    if not exchange:  # a file system without renameat2(RENAME_EXCHANGE): two renames
        monkeypatch.setattr(outputs, "_exchange", lambda a, b: False)
    seen = []
    real_rename = Path.rename

    def rename(self, target):  # observe `out` at every rename of the swap
        result = real_rename(self, target)
        seen.append((out / "f").read_text() if (out / "f").exists() else None)
        return result

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(RuntimeError):  # a writer that dies leaves the old folder untouched
        write_folder(out, lambda t: (_ for _ in ()).throw(RuntimeError("disk full")))
    assert (out / "f").read_text() == "old"
    write_folder(out, lambda t: (t / "f").write_text("new"))
    assert (out / "f").read_text() == "new" and not list(tmp_path.glob(".out.*"))
    if exchange:
        assert seen == []  # one atomic exchange, no rename at all
    else:  # between the two renames the old folder sits at its .old name: `recover` restores it
        assert seen == [None, "new"]
        old = tmp_path / ".out.old-dead"
        out.rename(old)
        write_folder(out, lambda t: (t / "g").write_text("x"))
        assert not old.exists() and (out / "g").is_file()


# -- 4. bad data is refused when read, naming file:line ------------------------------------------
@pytest.mark.parametrize(
    "content, image, message",
    [
        ("What is this?", True, "0 <image> tag"),  # an image no turn shows
        ("<image>\n<image>\nTwo?", True, "2 <image> tag"),
        ("<image>\nWhat is this?", False, "1 <image> tag"),  # a tag without an image
        ("   ", False, "empty or whitespace"),
    ],
)
def test_rows_are_checked_when_read(tmp_path, content, image, message):
    make_sample(0, 0)["image"].save(tmp_path / "a.png")

    def row(question: str) -> str:
        turns = [{"role": "user", "content": question}, {"role": "assistant", "content": "A."}]
        return json.dumps({"id": "r", "messages": turns, **({"image": "a.png"} if image else {})})

    path = tmp_path / "d.jsonl"  # line 1 is fine, line 2 is not
    path.write_text(row("<image>\nFine." if image else "Fine.") + "\n" + row(content) + "\n")
    with pytest.raises(DataFileError, match=f"{path}:2: .*{message}"):
        read_conversations_jsonl(path)


def test_whitespace_prompt_refused(tmp_path):
    make_sample(0, 0)["image"].save(tmp_path / "a.png")
    (tmp_path / "p.jsonl").write_text(
        json.dumps({"id": "a", "image": "a.png", "prompt": " "}) + "\n"
    )
    with pytest.raises(DataFileError, match="p.jsonl:1: 'prompt' must be a non-empty"):
        read_prompts_jsonl(tmp_path / "p.jsonl")


def test_over_long_rows_are_cut_or_skipped_and_counted_never_fatal(micro_target_dir):
    dm = ConversationDataModule(target=str(micro_target_dir), train_data="toy:4:1", val_data=None)
    dm.setup("fit")
    rows = list(dm.train_set)
    assert dm.max_length == 512  # the target's context by default, never unlimited
    limit = int(Collator(dm.processor, None)(rows)["attention_mask"].sum(1).min()) - 1
    cut = Collator(dm.processor, limit, "truncate")(rows)  # every row over, images still fit
    assert cut["overlong"].tolist() == [4, 0] and cut["input_ids"].shape == (4, limit)
    skipped = Collator(dm.processor, limit, "skip")(rows)
    assert skipped["overlong"].tolist() == [0, 4] and skipped["input_ids"].shape[0] == 0
    module = DrafterDistillation(target=str(micro_target_dir), unroll_steps=2)
    module.configure_model()
    loss = module.training_step(skipped, 0)  # a batch of nothing: a zero-gradient step
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is None or not p.grad.any() for p in module.drafter.parameters())


# -- 5. one error boundary; one line per user mistake --------------------------------------------
@pytest.mark.parametrize(
    "argv, says",
    [
        (["bench", "--max-new-tokens", "0"], "--max-new-tokens: must be >= 1, got 0"),
        (["bench", "--gate-cost-weight", "inf"], "--gate-cost-weight: must be in [0, None]"),
        (["bench", "--gate-cost-weight", "-1"], "--gate-cost-weight: must be in [0, None]"),
        (["bench", "--toy", "x"], "expected an integer"),
        (["simulate", "--stop-margin", "2"], "must be in [0, 1]"),
        (["simulate", "--rtt-sweep", "10,-5"], "positive milliseconds"),
        (["toy-target", "--eval-samples", "0"], "--eval-samples: must be >= 1"),
        (["toy-target", "--max-questions", "4"], "--max-questions set the toy video target's"),
        (["toy-target", "--video", "--describe-prob", "2"], "must be in [0, 1]"),
        (["toy-target", "--frame-spread", "log"], "--frame-spread set the toy video target's"),
        (["toy-target", "--video", "--min-frames", "9", "--max-frames", "4"], "min_frames"),
        (["toy-target", "--video", "--paraphrase"], "no paraphrase variant"),
        (["toy-target", "--pixel-language"], "--pixel-language set the toy video target's"),
        (["toy-target", "--where-every", "-1"], "--where-every: must be >= 0"),
        (["toy-data", "--out", "x", "--video", "--paraphrase"], "toy video world has none"),
        (["toy-eval", "--target", "checkpoints/no-such-target"], "target folder not found"),
        (["toy-eval", "--frames", "8"], "--frames [8] sets clip lengths: add --video"),
        (["bench", "--target", "./nope", "--toy", "1"], "target folder not found: ./nope"),
        (["export-checkpoint", "nope.ckpt", "--out", "x"], "checkpoint not found"),
    ],
)
def test_user_mistakes_print_one_line(argv, says, at_root, capsys, micro_target_dir):
    if argv[0] in ("bench", "simulate") and "--target" not in argv:
        argv = [*argv, "--target", str(micro_target_dir)]  # a clean clone has no toy target
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0], err


@pytest.mark.parametrize(
    "argv, default",
    [
        (["toy-eval"], "checkpoints/toy-target"),
        (["toy-eval", "--video"], "checkpoints/toy-video-target"),
    ],
)
def test_toy_eval_default_target_follows_video(argv, default, tmp_path, monkeypatch, capsys):
    (tmp_path / "checkpoints").mkdir()  # as in a clone: the folder, without the toy targets
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert f"target folder not found: {default}" in capsys.readouterr().err


def test_train_mistakes_print_one_line_and_debug_the_traceback(tmp_path, at_root, capsys):
    missing = tmp_path / "no-such-target"
    assert main(_train_args(missing, tmp_path)) == 2
    err = capsys.readouterr().err
    assert f"covspec train: error: target folder not found: {missing}" in err
    assert "Traceback" not in err
    assert main([*_train_args(missing, tmp_path), "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err
    with pytest.raises(ValueError, match="eval_samples"):  # refused before, not after, training
        ToyTargetSettings(eval_samples=0)


def test_bench_prints_its_table_before_writing(monkeypatch, at_root, capsys, micro_target_dir):
    from covspec.inference import bench, bench_report

    method = dict(kind="baseline", drafter=None, mode=None, tokens_per_s=1.0, speedup=1.0,
                  tau=None, mean_drafted=None, acceptance_per_depth=None,
                  identical_fraction=1.0, ms_per_sample={"total": 1.0})  # fmt: skip
    report = dict(target="t", num_samples=1, max_new_tokens=1, torch_threads=1,
                  tau_definition="tau", methods={"hf_greedy": method}, samples=[])  # fmt: skip
    monkeypatch.setattr(bench, "run_bench", lambda *a, **k: report)
    monkeypatch.setattr(
        bench_report,
        "write_report",
        lambda *a: (_ for _ in ()).throw(OSError(28, "No space left on device")),
    )
    assert main(["bench", "--toy", "1", "--target", str(micro_target_dir)]) == 2
    captured = capsys.readouterr()
    assert "| hf_greedy |" in captured.out and "No space left" in captured.err


# -- 6. NaN is stopped before the update; the card's recipe is the run's own ---------------------
def test_nan_gradient_is_refused_before_the_optimizer_step(micro_target_dir, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    class PoisonAtStep2(L.Callback):
        def on_after_backward(self, trainer, module):
            if trainer.global_step == 2:
                module.drafter.norm.weight.grad.fill_(float("nan"))

    torch.manual_seed(0)
    module = DrafterDistillation(target=str(micro_target_dir), unroll_steps=2, warmup_steps=1)
    dm = ConversationDataModule(
        target=str(micro_target_dir), train_data="toy:12:3", val_data=None, batch_size=4
    )
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0, every_n_train_steps=1)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=5, logger=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[PoisonAtStep2(), ckpt], default_root_dir=tmp_path,
    )  # fmt: skip
    with pytest.raises(FloatingPointError, match="non-finite gradient of norm.weight"):
        trainer.fit(module, datamodule=dm)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 2  # the last good step
    weights = {k.removeprefix("drafter."): v for k, v in saved["state_dict"].items()}
    assert all(v.isfinite().all() for v in weights.values() if v.is_floating_point())
    assert _same({k: v for k, v in module.drafter.state_dict().items()}, weights)  # not updated
    with pytest.raises(FloatingPointError, match="not finite at global step 7"):
        check_finite_weights({"w": torch.tensor([1.0, float("inf")])}, 7)


def test_card_recipe_is_the_runs_own_not_a_shared_config(micro_target_dir, tmp_path, at_root):
    # a concurrent run rewrites the shared config.yaml while this one trains
    args = _train_args(
        micro_target_dir, tmp_path, "--trainer.callbacks+=tests.fault_helpers.RewriteSharedConfig"
    )
    assert main(args) == 0
    assert "another-run" in (tmp_path / "config.yaml").read_text()
    card = (tmp_path / "drafter" / "README.md").read_text()
    assert f"target: {micro_target_dir}" in card and "another-run" not in card


# -- 7. a run killed with SIGKILL resumes to the same weights -------------------------------------
def test_resumable_loader_continues_the_epoch_it_was_saved_in():
    def loader(progress=None, seed=0):
        data = list(range(10))
        sampler = ResumableSampler(data, shuffle=True, seed=seed)
        return ResumableLoader(data, sampler=sampler, batch_size=3, progress=progress)

    first = loader(progress=lambda: 2)
    first.sampler.set_epoch(4)
    epoch = [b.tolist() for b in first]
    again = loader()
    again.load_state_dict(first.state_dict())  # saved after 2 of the epoch's 4 batches
    assert [b.tolist() for b in again] == epoch[2:]
    assert [b.tolist() for b in again] == epoch  # only the next iteration skips
    done = loader(progress=lambda: 4)
    done.sampler.set_epoch(4)
    rolled = loader()
    rolled.load_state_dict(done.state_dict())  # saved at the epoch's end: the next one, whole
    assert rolled.sampler.epoch == 5 and len(list(rolled)) == 4
    with pytest.raises(ValueError, match="seed 0"):
        loader(seed=1).load_state_dict(first.state_dict())


def _run(target: Path, out: Path, *extra: str, log: Path | None = None) -> subprocess.Popen:
    """`covspec train` for 8 steps in a subprocess; its output in `log`, else a pipe."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    return subprocess.Popen(
        [sys.executable, "-m", "covspec.scripts.cli", *_train_args(target, out, *extra, steps=8)],
        cwd=ROOT, env=env, stdout=log.open("w") if log else subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def test_killed_run_resumes_to_identical_weights(micro_target_dir, tmp_path):
    """8 steps over 3-batch epochs, checkpoint every step; SIGKILL at a random step (2-5: step
    1's checkpoint may not exist yet) while the uninterrupted run trains beside it; resume; the
    exports must be bit-identical."""
    kill_at = random.Random(os.getpid()).randint(2, 5)
    whole = _run(micro_target_dir, tmp_path / "whole", log=tmp_path / "whole.log")
    reporter = "--trainer.callbacks+=tests.fault_helpers.StepReporter"
    killed = _run(micro_target_dir, tmp_path / "killed", reporter)
    for line in killed.stdout:
        if line.startswith(f"covspec-test step {kill_at}"):
            killed.kill()  # SIGKILL: no handler runs, mid-checkpoint or mid-step
            break
    killed.wait(timeout=120)
    assert killed.returncode == -9, f"run ended before step {kill_at} was seen"
    saved = torch.load(tmp_path / "killed" / "ckpt" / "last.ckpt", weights_only=True)
    assert kill_at - 1 <= saved["global_step"] <= kill_at + 1  # at most one step lost
    resumed = _run(micro_target_dir, tmp_path / "killed", log=tmp_path / "resumed.log")
    assert resumed.wait(timeout=180) == 0, (tmp_path / "resumed.log").read_text()[-3000:]
    assert whole.wait(timeout=180) == 0, (tmp_path / "whole.log").read_text()[-3000:]
    a = load_file(tmp_path / "whole" / "drafter" / "model.safetensors")
    b = load_file(tmp_path / "killed" / "drafter" / "model.safetensors")
    assert _same(a, b), (kill_at, {k: (a[k] - b[k]).abs().max().item() for k in a})


def test_checkpoint_of_an_older_covspec_is_not_resumed_but_exported(
    trained, micro_target_dir, tmp_path, at_root, capsys
):
    out, tensors = trained
    old = torch.load(out / "ckpt" / "last.ckpt", weights_only=True)
    del old["covspec"]  # what covspec wrote before target identity
    run = tmp_path / "old"
    (run / "ckpt").mkdir(parents=True)
    torch.save(old, run / "ckpt" / "last.ckpt")
    assert main(_train_args(micro_target_dir, run, steps=6)) == 2
    assert "older covspec" in capsys.readouterr().err
    export_checkpoint(run / "ckpt" / "last.ckpt", run / "export")  # rebuilt against its target
    assert _same(load_file(run / "export" / "model.safetensors"), tensors)
    save_file({"x": torch.zeros(1)}, run / "bogus.ckpt")
    assert main(["export-checkpoint", str(run / "bogus.ckpt"), "--out", str(run / "e2")]) == 2


@pytest.mark.parametrize("gate", ["critic", "gumbel"])
def test_elastic_run_stopped_and_resumed_equals_the_whole_run(
    gate, micro_target_dir, tmp_path, at_root
):
    """The gate's random draws (a critic's option pairs, Gumbel noise) come from a per-step
    stream: 4 steps in one go and 2 + 2 resumed give bit-identical exports."""
    elastic = (
        "--model.visual_prefix=compressed",
        f"--model.compressor={{options: [none, 'pool:2', 'resampler:2'], gate: {gate}}}",
        "--seed_everything=0",
    )
    assert main(_train_args(micro_target_dir, tmp_path / "whole", *elastic)) == 0
    stop = ("--trainer.callbacks+=tests.fault_helpers.StopAfter", "--trainer.callbacks.steps=2")
    assert main(_train_args(micro_target_dir, tmp_path / "part", *elastic, *stop)) == 0
    assert main(_train_args(micro_target_dir, tmp_path / "part", *elastic)) == 0  # resumes
    a = load_file(tmp_path / "whole" / "drafter" / "model.safetensors")
    b = load_file(tmp_path / "part" / "drafter" / "model.safetensors")
    assert _same(a, b), {
        k: (a[k] - b[k]).abs().max().item() for k in a if not torch.equal(a[k], b[k])
    }


def test_two_writers_of_one_folder_take_turns(tmp_path):
    """A second export into the same folder waits for the first instead of deleting its
    half-written temporary folder (both used to start at once, and the first failed)."""
    import threading
    import time

    from covspec.modeling.outputs import write_folder

    out, started, errors = tmp_path / "drafter", threading.Event(), []

    def slow(tmp):
        started.set()
        time.sleep(0.5)
        (tmp / "weights").write_text("first")

    def first():
        try:
            write_folder(out, slow)
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    thread = threading.Thread(target=first)
    thread.start()
    started.wait(5)
    write_folder(out, lambda tmp: (tmp / "weights").write_text("second"))
    thread.join(10)
    assert not errors, errors
    assert (out / "weights").read_text() == "second"  # the later writer's folder is the one kept
    assert not list(tmp_path.glob(".drafter.tmp-*")) and not list(tmp_path.glob(".drafter.old-*"))
