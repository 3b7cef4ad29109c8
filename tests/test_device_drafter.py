"""LoRA online distillation of a small VLM toward the target (the device drafter)."""

import lightning as L
import pytest
import torch
from transformers import AutoModelForImageTextToText

from covspec.data.datamodule import ConversationDataModule
from covspec.data.toy_world import make_sample
from covspec.inference.runner import SpecRunner
from covspec.inference.tree import DraftSettings
from covspec.training.device_drafter import (
    DeviceDrafterDistillation,
    ExportDeviceDrafter,
    check_shared_processing,
)


def _batch(target_dir, n=4):
    dm = ConversationDataModule(
        target=str(target_dir), train_data="toy:8:3", val_data=None, batch_size=n
    )
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def test_only_adapters_train(micro_target_dir, micro_small_dir):
    module = DeviceDrafterDistillation(str(micro_target_dir), str(micro_small_dir), lora_rank=4)
    module.configure_model()
    named = dict(module.student.named_parameters())
    trainable = {n for n, p in named.items() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in named.items()}
    target_before = {n: p.detach().clone() for n, p in module.target.named_parameters()}
    opt = torch.optim.AdamW([named[n] for n in trainable], lr=1e-2)
    batch = _batch(micro_target_dir)
    for _ in range(2):  # LoRA B starts at zero, so A only gets a gradient from step 2
        opt.zero_grad()
        module._loss(batch, module.train_agreement).backward()
        opt.step()
    for n, p in named.items():
        moved = not torch.equal(p, before[n])
        assert moved == (n in trainable), n
    assert all(torch.equal(p, target_before[n]) for n, p in module.target.named_parameters())


def test_export_adapter_and_merged_both_draft_losslessly(
    micro_target_dir, micro_small_dir, tmp_path
):
    module = DeviceDrafterDistillation(
        str(micro_target_dir), str(micro_small_dir), lora_rank=4, warmup_steps=1
    )
    trainer = L.Trainer(
        max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, num_sanity_val_steps=0, limit_val_batches=1,
        callbacks=[ExportDeviceDrafter(str(tmp_path / "device"))],
    )  # fmt: skip
    dm = ConversationDataModule(
        target=str(micro_target_dir), train_data="toy:12:3", val_data="toy:4:4", batch_size=4
    )
    trainer.fit(module, datamodule=dm)
    assert (tmp_path / "device" / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "device" / "config.json").is_file()
    s = make_sample(64, 0)
    outputs = []
    for folder in (tmp_path / "device", tmp_path / "device" / "adapter"):
        runner = SpecRunner.from_folders(str(micro_target_dir), str(folder))
        inputs = runner.encode(s["image"], "Describe the image.")
        with torch.no_grad():
            ref = runner.model.generate(
                **inputs, do_sample=False, max_new_tokens=24, suppress_tokens=runner.suppress_tokens
            )
        ref = ref[0, inputs["input_ids"].shape[1] :].tolist()
        got = runner.generate(
            s["image"], "Describe the image.", 24, DraftSettings(mode="tree", depth=3)
        )
        assert got.tokens == ref
        outputs.append(got)
    # the merged folder and the adapter on its base draft the same
    assert outputs[0].accepted_per_depth == outputs[1].accepted_per_depth
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "device")
    assert not any("lora" in n for n, _ in merged.named_parameters())


def test_other_processing_refused(micro_target_dir, tmp_path):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(micro_target_dir)
    processor.image_processor.size = {"height": 64, "width": 64}
    processor.save_pretrained(tmp_path)
    AutoModelForImageTextToText.from_pretrained(micro_target_dir).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="preprocesses images differently"):
        check_shared_processing(str(micro_target_dir), str(tmp_path))


def test_resume_refuses_other_adapters_or_models(micro_target_dir, micro_small_dir):
    from covspec.training.guards import CheckpointMismatchError

    def module(**kw):
        m = DeviceDrafterDistillation(str(micro_target_dir), str(micro_small_dir), **kw)
        m.configure_model()
        return m

    saved = {"state_dict": module(lora_rank=4).state_dict()}
    module(lora_rank=4).on_save_checkpoint(saved)
    module(lora_rank=4).on_load_checkpoint(saved)  # the same settings resume
    with pytest.raises(CheckpointMismatchError, match="other LoRA adapters"):
        module(lora_rank=8).on_load_checkpoint(saved)
    with pytest.raises(CheckpointMismatchError, match="other LoRA adapters"):
        module(lora_rank=4, lora_projector=True).on_load_checkpoint(saved)
    other = module(lora_rank=4)
    other.target.config.text_config.rms_norm_eps *= 2  # a target of another config
    with pytest.raises(CheckpointMismatchError, match="another target"):
        other.on_load_checkpoint(saved)
    with pytest.raises(CheckpointMismatchError, match="no device-drafter identity"):
        module(lora_rank=4).on_load_checkpoint({"state_dict": {}})
