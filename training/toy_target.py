"""Train the toy target VLM from scratch on the toy world, in minutes, on a CPU.

    >>> from covspec.training.toy_target import ToyTargetSettings, build_toy_target
    >>> build_toy_target("checkpoints/toy-target", ToyTargetSettings())   # cached after the first

The result is a standard HF folder (model, processor, tokenizer, chat template) plus
`covspec_toy_target.json` (settings, their hash, the measured accuracy). It is a fixture builder,
not one of the trained parts, so it is a plain, deterministic torch loop with a tqdm bar: two
stages over freshly generated scenes.

1. Vision: the CLIP tower learns, per patch, the colour and shape of the object in the patch's
   grid cell and the cell's index (a dense, cheap signal; captions alone teach shapes slowly).
2. Language: the tower is frozen; projector and Llama learn the conversations, loss on assistant
   tokens only.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import LlavaForConditionalGeneration

from covspec.data.chat import encode_conversation, pad_batch
from covspec.data.toy_world import (
    COLOURS,
    DESCRIBE_PROMPTS,
    SHAPES,
    corpus_text,
    make_sample,
    parse_description,
)
from covspec.modeling.outputs import check_replaceable, write_folder
from covspec.modeling.toy_vlm import ToyVLMSpec, build_config, build_processor, train_tokenizer

REPORT_NAME = "covspec_toy_target.json"
EVAL_SEED = 987_654  # unseen by training (which draws from streams seed to seed + 4)


@dataclass(frozen=True)
class ToyTargetSettings:
    spec: ToyVLMSpec = field(default_factory=ToyVLMSpec)
    seed: int = 0
    vision_steps: int = 900
    vision_batch: int = 48
    vision_lr: float = 2e-3
    lm_steps: int = 900
    lm_batch: int = 24
    lm_lr: float = 1e-3
    warmup_steps: int = 40
    eval_samples: int = 200
    paraphrase: bool = False  # the paraphrase world's answers (data/toy_wording.py)

    def __post_init__(self) -> None:
        # refused here, before minutes of training, not after them
        counts = {
            k: v for k, v in asdict(self).items() if k.endswith(("_steps", "_batch", "_samples"))
        }
        bad = {k: v for k, v in counts.items() if not isinstance(v, int) or v < 1}
        if bad:
            raise ValueError(f"toy target settings must be integers >= 1, got {bad}")
        if self.vision_lr <= 0 or self.lm_lr <= 0:
            raise ValueError(f"learning rates must be > 0, got {self.vision_lr}, {self.lm_lr}")

    def digest(self) -> str:
        fields = asdict(self)
        if not self.paraphrase:  # so targets cached before the paraphrase world stay valid
            del fields["paraphrase"]
        blob = json.dumps(fields, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    # The world the target learns and how; the toy video target's settings override these.
    def corpus(self) -> list[str]:
        return corpus_text(self.seed, 4000, self.paraphrase)

    def vision_draw(self):
        return None  # train_vision's default: toy scenes (the same pixels in either world)

    def lm_encode(self, processor):
        if not self.paraphrase:
            return None  # train_language's default: toy-scene conversations
        return lambda k: _encode(processor, make_sample(self.seed, k, paraphrase=True))

    def evaluate(self, model, processor) -> dict:
        return object_accuracy(model, processor, self.eval_samples)

    def total_steps(self) -> int:
        return self.vision_steps + self.lm_steps

    def step_batch(self, step: int) -> int:
        """Conversations in language step `step` (the video target's long-clip steps hold fewer)."""
        return self.lm_batch

    def train_language_stage(self, model, processor, bar: tqdm) -> None:
        """Everything after the vision stage."""
        train_language(model, processor, self, bar, self.lm_encode(processor))


def lr_lambda(total: int, warmup: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def patch_labels(objects: list[dict], grid: int) -> torch.Tensor:
    """(grid*grid, 3) per patch: colour id (0 = none), shape id (0 = none), cell id."""
    per_cell = grid // 3
    by_cell = {o["cell"]: o for o in objects}
    colours, shapes = ["none", *COLOURS], ["none", *SHAPES]
    rows = []
    for p in range(grid * grid):
        r, c = divmod(p, grid)
        cell = (r // per_cell) * 3 + c // per_cell
        o = by_cell.get(cell)
        rows.append(
            [colours.index(o["colour"]) if o else 0, shapes.index(o["shape"]) if o else 0, cell]
        )
    return torch.tensor(rows)


def _step(opt, sched, params, loss: torch.Tensor, bar: tqdm, stage: str) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()
    bar.update(1)
    bar.set_postfix(stage=stage, loss=f"{loss.item():.3f}")


def _scene(seed: int, index: int) -> tuple:
    x = make_sample(seed, index)
    return x["image"], x["objects"]


def train_vision(model, processor, s: ToyTargetSettings, bar: tqdm, draw=None) -> None:
    """Per-patch colour / shape / cell heads on the tower. `draw(index) -> (image, objects)`
    gives the training images (default: toy scenes of stream seed + 1)."""
    draw = draw or (lambda k: _scene(s.seed + 1, k))
    tower = model.model.vision_tower
    grid = s.spec.image_size // s.spec.patch_size
    heads = torch.nn.ModuleList(
        [torch.nn.Linear(s.spec.vision_hidden, n) for n in (len(COLOURS) + 1, len(SHAPES) + 1, 9)]
    )
    params = list(tower.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=s.vision_lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(s.vision_steps, s.warmup_steps))
    tower.train()
    for step in range(s.vision_steps):
        drawn = [draw(step * s.vision_batch + i) for i in range(s.vision_batch)]
        pixels = processor.image_processor([im for im, _ in drawn], return_tensors="pt")
        labels = torch.stack([patch_labels(objs, grid) for _, objs in drawn])  # (B, P, 3)
        feats = tower(pixel_values=pixels["pixel_values"]).last_hidden_state[:, 1:]  # (B, P, D)
        loss = sum(
            F.cross_entropy(h(feats).flatten(0, 1), labels[..., k].flatten())
            for k, h in enumerate(heads)
        )
        _step(opt, sched, params, loss, bar, "vision")
    tower.requires_grad_(False)
    tower.eval()


def _encode(processor, sample: dict) -> dict:
    return encode_conversation(processor, sample["messages"], [sample["image"]])


def assistant_loss(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """Next-token cross-entropy of `logits` (B, T, V) on the batch's assistant tokens only."""
    target = batch["input_ids"][:, 1:].masked_fill(~batch["loss_mask"][:, 1:], -100)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), target.flatten(), ignore_index=-100)


def lm_loss(model, batch: dict) -> torch.Tensor:
    """Next-token cross-entropy on assistant tokens only."""
    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        pixel_values=batch["pixel_values"],
    ).logits  # (B, T, V)
    return assistant_loss(logits, batch)


def train_language(
    model, processor, s: ToyTargetSettings, bar: tqdm, encode=None, loss_fn=lm_loss, extra=()
) -> None:
    """Assistant-token loss with the tower frozen. `encode(index) -> encoding` gives the
    training conversations (default: toy scenes of stream seed); `loss_fn(model, batch)` scores
    a padded batch of them; `extra` parameters (of `loss_fn`) train beside the model's."""
    encode = encode or (lambda k: _encode(processor, make_sample(s.seed, k)))
    params = [p for p in model.parameters() if p.requires_grad] + list(extra)
    opt = torch.optim.AdamW(params, lr=s.lm_lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(s.lm_steps, s.warmup_steps))
    pad = processor.tokenizer.pad_token_id
    model.train()
    model.model.vision_tower.eval()
    for step in range(s.lm_steps):
        encs = [encode(step * s.lm_batch + i) for i in range(s.step_batch(step))]
        loss = loss_fn(model, pad_batch(encs, pad))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"toy target loss is {loss.item()} at language step {step}")
        _step(opt, sched, params, loss, bar, "language")
    model.eval()


@torch.no_grad()
def greedy_answers(
    model, processor, prompts: list[str], images: list[list], max_new_tokens: int, batch: int = 25
) -> list[str]:
    """Greedy answers to chat-templated `prompts`, each with its list of images (left-padded
    batches; a batch's prompts should show equally many images to waste no compute)."""
    tok = processor.tokenizer
    side, tok.padding_side = tok.padding_side, "left"
    texts = []
    try:
        for i in range(0, len(prompts), batch):
            flat = [im for ims in images[i : i + batch] for im in ims]
            inputs = processor(
                images=flat, text=prompts[i : i + batch], return_tensors="pt", padding=True
            )
            out = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
            texts += tok.batch_decode(
                out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True
            )
    finally:
        tok.padding_side = side
    return texts


def describe_images(model, processor, images: list, max_new_tokens: int = 96) -> list[str]:
    """Greedy answers to "Describe the image." for each image."""
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": "<image>\n" + DESCRIBE_PROMPTS[0]}],
        tokenize=False,
        add_generation_prompt=True,
    )
    return greedy_answers(
        model, processor, [prompt] * len(images), [[im] for im in images], max_new_tokens
    )


def object_accuracy(model, processor, num: int, seed: int = EVAL_SEED) -> dict:
    """Multiset (colour, shape) match of greedy descriptions on unseen scenes.

    accuracy = sum(matched) / sum(max(|truth|, |predicted|)): misses and hallucinated objects
    both count against it. Recall and precision are reported beside it.
    """
    samples = [make_sample(seed, i) for i in range(num)]
    texts = describe_images(model, processor, [x["image"] for x in samples])
    matched = denom = truth_n = pred_n = exact = 0
    for sample, text in zip(samples, texts, strict=True):
        truth = Counter((o["colour"], o["shape"]) for o in sample["objects"])
        pred = Counter((c, s) for c, s, _ in parse_description(text))
        m = sum((truth & pred).values())
        matched += m
        truth_n, pred_n = truth_n + sum(truth.values()), pred_n + sum(pred.values())
        denom += max(sum(truth.values()), sum(pred.values()))
        exact += truth == pred
    return {
        "object_accuracy": matched / max(1, denom),
        "recall": matched / max(1, truth_n),
        "precision": matched / max(1, pred_n),
        "exact_scene_fraction": exact / num,
        "num_scenes": num,
        "eval_seed": seed,
        "example": texts[0],
    }


def _cached(out: Path, digest: str) -> dict | None:
    report = out / REPORT_NAME
    if report.is_file() and (out / "model.safetensors").is_file():
        data = json.loads(report.read_text())
        if data.get("settings_digest") == digest:
            return data
    return None


def _is_toy_target(folder: Path) -> bool:
    """A toy target written by an older covspec (before output markers)."""
    return (folder / REPORT_NAME).is_file()


def build_toy_target(
    out: str | Path,
    settings: ToyTargetSettings | None = None,
    force: bool = False,
    overwrite: bool = False,
) -> dict:
    """Train (or reuse) the toy target in `out`; returns its report. The folder is written
    beside the old one and swapped in; a non-empty `out` that covspec did not write is refused
    before training, unless `overwrite`."""
    s = settings or ToyTargetSettings()
    out = Path(out)
    if not force and (hit := _cached(out, s.digest())):
        return hit
    check_replaceable(out, overwrite, _is_toy_target)
    torch.manual_seed(s.seed)
    start = time.time()
    tokenizer = train_tokenizer(s.corpus(), s.spec.vocab_size, s.spec.max_position_embeddings)
    processor = build_processor(tokenizer, s.spec)
    model = LlavaForConditionalGeneration(build_config(s.spec, tokenizer))
    with tqdm(total=s.total_steps(), desc="toy target", unit="step") as bar:
        train_vision(model, processor, s, bar, s.vision_draw())
        s.train_language_stage(model, processor, bar)
    train_s = time.time() - start
    metrics = s.evaluate(model, processor)
    report = {
        "settings": asdict(s),
        "settings_digest": s.digest(),
        "train_seconds": round(train_s, 1),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "torch_threads": torch.get_num_threads(),
        **metrics,
    }

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2))

    write_folder(out, write, overwrite=overwrite, kind="toy-target", legacy=_is_toy_target)
    return report
