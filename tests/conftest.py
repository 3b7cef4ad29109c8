import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def micro_target_dir(tmp_path_factory):
    """A seconds-long toy target (tiny sizes, a few dozen steps): a real HF folder."""
    from covspec.training.toy_target import build_toy_target
    from tests.test_toy_target import MICRO

    out = tmp_path_factory.mktemp("targets") / "micro"
    build_toy_target(out, MICRO)
    return out


@pytest.fixture(scope="session")
def micro_small_dir(tmp_path_factory):
    """Another micro toy VLM (1 text layer, half the steps): the target's tokenizer and image
    processing, other weights; a small-VLM device drafter for the micro target."""
    import dataclasses

    from covspec.training.toy_target import build_toy_target
    from tests.test_toy_target import MICRO

    spec = dataclasses.replace(MICRO.spec, text_layers=1)
    settings = dataclasses.replace(MICRO, spec=spec, lm_steps=MICRO.lm_steps // 2)
    out = tmp_path_factory.mktemp("targets") / "micro-small"
    build_toy_target(out, settings)
    return out
