"""Symbolic frames, the toy video target's language stage: the same conversations as the pixel
stage token for token, the slots filled from the ground truth, every part trained, and the
projector regression that moves what was learned onto pixels."""

import dataclasses

import pytest
import torch
from tqdm.auto import tqdm
from transformers import LlavaForConditionalGeneration

from covspec.data.chat import encode_image_slots
from covspec.data.toy_video import clip_frame, clip_story, make_clip
from covspec.data.toy_world import COLOURS, SHAPES
from covspec.modeling.toy_vlm import build_config, build_processor, train_tokenizer
from covspec.training.toy_symbolic import (
    SymbolicFrames,
    align_projector,
    symbolic_loss,
    tower_features,
)
from covspec.training.toy_target import pad_batch, patch_labels
from covspec.training.toy_video_target import (
    AFTER_SYMBOLIC,
    PIXEL_STREAM,
    ToyVideoTargetSettings,
)
from tests.test_video_mode import MICRO_VIDEO

SETTINGS = dataclasses.replace(MICRO_VIDEO, lm_batch=2, where_every=2)


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    s = SETTINGS
    tok = train_tokenizer(s.corpus()[:600], s.spec.vocab_size, s.spec.max_position_embeddings)
    processor = build_processor(tok, s.spec)
    model = LlavaForConditionalGeneration(build_config(s.spec, tok))
    return model, processor


def test_symbolic_rows_are_the_pixel_rows_token_for_token(parts):
    _, processor = parts
    pixel, symbolic = SETTINGS.lm_encode(processor), SETTINGS.symbolic_encode(processor)
    slot = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    where_to = 0
    for k in range(12):  # steps 0, 2, 4: where-to batches; 1, 3, 5: the mixed stream
        a, b = pixel(k), symbolic(k)
        for key in ("input_ids", "attention_mask", "loss_mask"):
            assert torch.equal(a[key], b[key]), (k, key)
        frames = len(a["pixel_values"])
        assert b["visual_labels"].shape == (frames * 9, 3)
        assert int((b["input_ids"] == slot).sum()) == frames * 9
        where_to += SETTINGS.lm_clip(k)[3]
    assert where_to == 6
    with pytest.raises(ValueError, match="tokens_per_image"):
        encode_image_slots(processor, [{"role": "user", "content": "<image>\nHi"}], 0)


def test_visual_labels_are_each_frames_ground_truth_in_slot_order(parts):
    _, processor = parts
    k = SETTINGS.lm_batch  # a mixed-stream clip
    seed, index, num, _ = SETTINGS.lm_clip(k)
    story, clip = clip_story(seed, index, num, 72), make_clip(seed, index, num, 72)
    assert story["messages"] == clip["messages"] and story["tracks"] == clip["tracks"]
    labels = SETTINGS.symbolic_encode(processor)(k)["visual_labels"].view(num, 9, 3)
    colours, shapes = ["none", *COLOURS], ["none", *SHAPES]
    for f in range(num):
        _, objects = clip_frame(seed, index, num, f, 72)
        want = {o["cell"]: (colours.index(o["colour"]), shapes.index(o["shape"])) for o in objects}
        for cell in range(9):
            assert tuple(labels[f, cell].tolist()) == (*want.get(cell, (0, 0)), cell)
    where = clip_story(0, 4, 2, where_to_only=True)
    names = [f"{t['colour']} {t['shape']}" for t in where["tracks"]]
    asked = [m["content"] for m in where["messages"] if m["role"] == "user"]
    assert sorted(n for n in names for q in asked if n in q) == sorted(names)  # all, once each


def test_symbolic_loss_reads_the_slots_and_trains_every_part(parts):
    model, processor = parts
    frames = SymbolicFrames(SETTINGS.spec.text_hidden)
    encode = SETTINGS.symbolic_encode(processor)
    batch = pad_batch([encode(k) for k in (2, 3)], processor.tokenizer.pad_token_id)
    loss_fn = symbolic_loss(frames)
    loss = loss_fn(model, batch)
    loss.backward()
    text = [p for n, p in model.named_parameters() if "language_model" in n or "lm_head" in n]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in text)
    assert all(t.weight.grad.abs().sum() > 0 for t in frames.tables)
    assert model.model.multi_modal_projector.linear_1.weight.grad is None  # not used here
    model.zero_grad()
    other = dict(batch, visual_labels=torch.zeros_like(batch["visual_labels"]))
    assert not torch.isclose(loss_fn(model, other), loss)  # the slots are read
    with pytest.raises(AssertionError, match="slot"):
        loss_fn(model, dict(batch, visual_labels=batch["visual_labels"][:-1]))


def test_align_projector_fits_the_symbolic_frames_from_pixels(parts):
    model, processor = parts
    torch.manual_seed(1)
    frames = SymbolicFrames(SETTINGS.spec.text_hidden)
    draw = SETTINGS.vision_draw()
    drawn = [draw(5_000 + i) for i in range(16)]
    pixels = processor.image_processor([im for im, _ in drawn], return_tensors="pt")
    labels = torch.stack([patch_labels(o, 3) for _, o in drawn])

    def mse() -> float:
        with torch.no_grad():
            got = model.model.multi_modal_projector(tower_features(model, pixels["pixel_values"]))
            return torch.nn.functional.mse_loss(got, frames(labels.flatten(0, 1)).view_as(got))

    tower = [p.clone() for p in model.model.vision_tower.parameters()]
    before = mse()
    with tqdm(total=40, disable=True) as bar:
        align_projector(model, processor, frames, draw, steps=40, lr=1e-2, bar=bar, batch=16)
    assert mse() < 0.7 * before
    assert all(
        torch.equal(a, b) for a, b in zip(tower, model.model.vision_tower.parameters(), strict=True)
    )
    assert not any(t.weight.requires_grad for t in frames.tables)
    with pytest.raises(ValueError, match="steps"):
        align_projector(model, processor, frames, draw, steps=0, lr=1e-2, bar=bar)


def test_bad_symbolic_settings_are_refused():
    with pytest.raises(ValueError, match="where_every"):
        ToyVideoTargetSettings(where_every=-1)
    with pytest.raises(ValueError, match="align_lr"):
        ToyVideoTargetSettings(align_lr=0.0)
    with pytest.raises(ValueError, match="3x3 cells"):
        ToyVideoTargetSettings(spec=dataclasses.replace(SETTINGS.spec, patch_size=18))


def test_cli_flags_reach_the_video_settings(monkeypatch, tmp_path):
    import covspec.training.toy_target as toy_target
    from covspec.scripts.cli import main

    seen = []
    monkeypatch.setattr(toy_target, "build_toy_target", lambda out, s, **kw: seen.append(s) or {})
    argv = ["toy-target", "--video", "--out", str(tmp_path / "t"), "--where-every", "0"]
    assert main([*argv, "--pixel-language"]) == 0
    assert main([*argv, "--align-steps", "7"]) == 0
    assert main([*argv, "--long-every", "5", "--long-max-frames", "64"]) == 0
    assert main([*argv, "--long-step-frames", "128"]) == 0
    polish = ["--pixel-polish", "30", "--pixel-lr", "1e-4", "--pixel-step-frames", "64"]
    assert main([*argv, *polish]) == 0
    pixel, symbolic, long, budget, polished = seen
    assert (long.long_every, long.long_max_frames, budget.long_step_frames) == (5, 64, 128)
    assert (pixel.symbolic, pixel.where_every) == (False, 0)
    assert (symbolic.symbolic, symbolic.align_steps) == (True, 7)
    assert (polished.pixel_polish, polished.pixel_lr, polished.pixel_step_frames) == (30, 1e-4, 64)
    assert main([*argv, "--pixel-language", "--align-steps", "7"]) == 2  # no regression to set
    assert main([*argv, "--pixel-language", "--pixel-polish", "7"]) == 2  # nor a polish


def test_the_pixel_language_stage_builds_a_target_without_symbolic_frames(tmp_path, monkeypatch):
    import covspec.training.toy_video_target as video_target
    from covspec.training.toy_target import build_toy_target

    def refuse(*args, **kwargs):
        raise AssertionError("symbolic frames used with symbolic=False")

    monkeypatch.setattr(video_target, "SymbolicFrames", refuse)
    defaults = {k: getattr(ToyVideoTargetSettings(), k) for k in AFTER_SYMBOLIC}  # else refused
    settings = dataclasses.replace(MICRO_VIDEO, symbolic=False, lm_steps=6, **defaults)
    assert settings.total_steps() == settings.vision_steps + 6  # step 5: long clips
    report = build_toy_target(tmp_path / "pixel", settings)
    assert report["settings"]["symbolic"] is False and 0.0 <= report["event_accuracy"] <= 1.0
    with pytest.raises(ValueError, match="symbolic=False"):
        dataclasses.replace(settings, align_steps=5)


def test_the_pixel_polish_runs_on_rendered_frames_of_its_own_clips():
    s = dataclasses.replace(MICRO_VIDEO, pixel_polish=6, pixel_step_frames=24)
    polish = s.pixel_stage()
    assert (polish.lm_steps, polish.lm_lr, polish.where_every) == (6, s.pixel_lr, 0)
    assert (polish.long_step_frames, polish.long_max_frames) == (24, s.long_max_frames)
    assert polish.seed == s.seed + PIXEL_STREAM and not any(map(polish.where_step, range(6)))
    assert [polish.long_step(k) for k in range(6)] == [False, True] * 3  # every other step
    for step in (1, 3, 5):  # long clips from the polish's stream, as many as fit its frames
        seed, _, frames, where_to = polish.lm_clip(step * polish.lm_batch)
        assert (seed, where_to) == (s.seed + PIXEL_STREAM, False)
        assert s.max_frames < frames <= s.long_max_frames
        assert polish.step_batch(step) * frames <= max(frames, s.pixel_step_frames)
    assert s.total_steps() == s.vision_steps + s.lm_steps + s.align_steps + 6


def test_the_pixel_polish_trains_projector_and_llama_after_the_regression(tmp_path, monkeypatch):
    import covspec.training.toy_video_target as video_target
    from covspec.training.toy_target import build_toy_target

    stages = []
    real_language, real_align = video_target.train_language, video_target.align_projector

    def moved(before, module) -> bool:
        return not all(torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))

    def language(model, processor, s, bar, encode, *args):
        projector, llama = model.model.multi_modal_projector, model.model.language_model
        before = [[p.clone() for p in m.parameters()] for m in (projector, llama)]
        real_language(model, processor, s, bar, encode, *args)
        kind = "pixel" if "visual_labels" not in encode(0) else "symbolic"
        stages.append((kind, s, moved(before[0], projector), moved(before[1], llama)))

    def align(*args, **kwargs):
        stages.append(("align",))
        return real_align(*args, **kwargs)

    monkeypatch.setattr(video_target, "train_language", language)
    monkeypatch.setattr(video_target, "align_projector", align)
    build_toy_target(tmp_path / "t", MICRO_VIDEO)
    assert stages == [
        ("symbolic", MICRO_VIDEO, False, True),
        ("align",),
        ("pixel", MICRO_VIDEO.pixel_stage(), True, True),
    ]
    stages.clear()
    build_toy_target(tmp_path / "u", dataclasses.replace(MICRO_VIDEO, pixel_polish=0))
    assert [stage[0] for stage in stages] == ["symbolic", "align"]


@pytest.mark.parametrize(
    "bad", [{"pixel_polish": 1}, {"pixel_polish": -2}, {"pixel_lr": 0.0}, {"pixel_step_frames": 0}]
)
def test_bad_pixel_polish_settings_are_refused(bad):
    with pytest.raises(ValueError, match="pixel"):
        dataclasses.replace(MICRO_VIDEO, **bad)


def test_a_polish_whose_long_clips_cannot_be_drawn_is_refused_before_training():
    # no long steps in the symbolic stage, but the polish still needs clips past max_frames
    no_long = dataclasses.replace(MICRO_VIDEO, long_every=0)
    assert no_long.pixel_stage().long_every == 2
    with pytest.raises(ValueError, match="pixel polish's long clips.*max_frames"):
        dataclasses.replace(no_long, max_frames=MICRO_VIDEO.long_max_frames)
    assert dataclasses.replace(no_long, max_frames=MICRO_VIDEO.long_max_frames, pixel_polish=0)
    after = set(AFTER_SYMBOLIC) - {"pixel_polish"}
    defaults = {k: getattr(ToyVideoTargetSettings(), k) for k in after}
    assert dataclasses.replace(MICRO_VIDEO, symbolic=False, pixel_polish=0, **defaults)
