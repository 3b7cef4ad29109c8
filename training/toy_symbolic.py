"""Symbolic frames: a toy target's language stage on the ground truth, then moved to pixels.

    >>> frames = SymbolicFrames(spec.text_hidden)
    >>> train_language(model, processor, s, bar, encode, symbolic_loss(frames), frames.parameters())
    >>> align_projector(model, processor, frames, s.vision_draw(), steps=300, lr=2e-3, bar=bar)

Why: what a toy video target finds hard to learn is not seeing the objects but answering "where
does the red square move to": the language model must look a name up among the clip's visual
tokens (associative recall), a lookup it is slow to find however good the visual tokens are.
Those steps can be spent without the tower: every image
slot of the conversation (`encode_image_slots`, token for token what the processor gives) is
filled with the sum of learned colour, shape and cell embeddings of its patch, read from the
clip's ground truth. Then `align_projector` regresses the projector, on the frozen tower's
features of rendered frames, onto those embeddings, so the pixel model reads what the language
model learned. The embedding tables are training-only: nothing of them is saved.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from covspec.data.toy_world import COLOURS, SHAPES
from covspec.training.toy_target import assistant_loss, lr_lambda, patch_labels

LABEL_SIZES = (len(COLOURS) + 1, len(SHAPES) + 1, 9)  # colour (0 = none), shape (0 = none), cell


class SymbolicFrames(torch.nn.Module):
    """Per patch label (colour, shape, cell), as `patch_labels` gives it, -> one embedding."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.tables = torch.nn.ModuleList(torch.nn.Embedding(n, hidden) for n in LABEL_SIZES)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:  # (N, 3) -> (N, D)
        return sum(table(labels[:, k]) for k, table in enumerate(self.tables))


def symbolic_loss(frames: SymbolicFrames):
    """`loss_fn(model, batch)` for `train_language`: the batch is `encode_image_slots` rows
    plus `visual_labels` (N, 3), one row per image slot in order; the slots get `frames`'
    embeddings where the projector's output would go."""

    def loss(model, batch: dict) -> torch.Tensor:
        ids = batch["input_ids"]  # (B, T)
        embeds = model.get_input_embeddings()(ids)  # (B, T, D)
        slots = (ids == model.config.image_token_id)[..., None].expand_as(embeds)
        visual = frames(batch["visual_labels"]).to(embeds.dtype)  # (N, D)
        assert slots.sum() == visual.numel(), "one visual label row per image slot"
        embeds = embeds.masked_scatter(slots, visual)
        logits = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits
        return assistant_loss(logits, batch)

    return loss


def tower_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """(B, P, D_vision): the tower's per-patch features the projector reads, as LLaVA picks
    them (`vision_feature_layer`, the class token dropped by the "default" strategy)."""
    config = model.config
    if not isinstance(config.vision_feature_layer, int):
        raise ValueError(
            "symbolic frames read one tower layer, got vision_feature_layer="
            f"{config.vision_feature_layer!r}"
        )
    if config.vision_feature_select_strategy != "default":
        raise ValueError(
            "symbolic frames need the 'default' feature strategy (one slot per patch), got "
            f"{config.vision_feature_select_strategy!r}"
        )
    out = model.model.vision_tower(pixel_values=pixel_values, output_hidden_states=True)
    return out.hidden_states[config.vision_feature_layer][:, 1:]


def align_projector(
    model,
    processor,
    frames: SymbolicFrames,
    draw,
    steps: int,
    lr: float,
    bar: tqdm,
    batch: int = 64,
    warmup: int = 20,
    first_index: int = 10**6,
) -> float:
    """Regress the projector's output for rendered frames onto `frames`' embeddings of their
    ground truth (MSE; tower and tables frozen). `draw(index) -> (image, objects)` gives the
    frames, from `first_index` on (past what the vision stage drew); returns the last loss."""
    if steps < 1 or lr <= 0:
        raise ValueError(f"need steps >= 1 and lr > 0, got {steps}, {lr}")
    projector = model.model.multi_modal_projector
    grid = model.config.vision_config.image_size // model.config.vision_config.patch_size
    params = list(projector.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(steps, min(warmup, steps)))
    frames.requires_grad_(False)
    projector.train()
    for step in range(steps):
        drawn = [draw(first_index + step * batch + i) for i in range(batch)]
        pixels = processor.image_processor([im for im, _ in drawn], return_tensors="pt")
        labels = torch.stack([patch_labels(objs, grid) for _, objs in drawn])  # (B, P, 3)
        with torch.no_grad():
            feats = tower_features(model, pixels["pixel_values"])  # (B, P, D_vision)
            wanted = frames(labels.flatten(0, 1)).view(*labels.shape[:2], -1)  # (B, P, D)
        loss = F.mse_loss(projector(feats), wanted)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # unclipped: a plain regression, its gradients shrink as it fits
        opt.step()
        sched.step()
        bar.update(1)
        bar.set_postfix(stage="align", mse=f"{loss.item():.4f}")
    model.eval()
    return loss.item()
