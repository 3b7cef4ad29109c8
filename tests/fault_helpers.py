"""Helpers that tests/test_faults.py runs inside `covspec train` subprocesses."""

from __future__ import annotations

from pathlib import Path

import lightning as L


class StepReporter(L.Callback):
    """Prints each finished optimizer step, so a test can SIGKILL the run at a chosen one."""

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        print(f"covspec-test step {trainer.global_step}", flush=True)


class RewriteSharedConfig(L.Callback):
    """Plays a concurrent run that rewrites the config.yaml both runs' log folder shares."""

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        (Path(trainer.log_dir) / "config.yaml").write_text("model:\n  target: another-run\n")
