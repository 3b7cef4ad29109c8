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


class StopAfter(L.Callback):
    """Ends the run cleanly after `steps` optimizer steps (an interruption whose last
    checkpoint a rerun resumes from), the schedule still sized for the full run."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_step >= self.steps:
            trainer.should_stop = True
