"""The elastic gate's training terms (training/gate_terms.py) and the distillation step that
uses them: the Gumbel gate's straight-through term, the critic's pairs and its regression."""

import math

import torch

from tests.test_distill import _batch, _module


def test_gate_term_prefers_choices_with_lower_loss():
    from covspec.modeling.drafter_inputs import VisualPrefix
    from covspec.training.gate_terms import gate_term

    logits = torch.zeros(4, 2, requires_grad=True)
    probs = logits.softmax(-1)
    choice = torch.tensor([0, 0, 1, 1])
    weight = probs.gather(1, choice[:, None])[:, 0]
    weight = weight + (1.0 - weight).detach()  # straight-through, 1.0 forward
    z = torch.zeros(4, 0, 8)
    prefix = VisualPrefix(
        z, z, z[..., 0].bool(), choice, probs, torch.zeros(4), weight, logits.detach()
    )
    per_sample = torch.tensor([[1.0, 1.0], [1.0, 1.0], [3.0, 1.0], [3.0, 1.0]])  # option 0 wins
    term = gate_term(prefix, per_sample)
    assert term.item() == 0.0
    term.backward()
    assert (logits.grad[:, 0] < 0).all(), "descending the loss must raise option 0's logit"


def test_gate_learns_from_the_distillation_loss_without_a_cost_term(micro_target_dir):
    module = _module(
        micro_target_dir, visual_prefix="compressed", compressor={"options": ["pool:4", "pool:2"]}
    )
    module.train()
    gate = module.drafter.compressor.gate
    loss = module.losses(_batch(micro_target_dir), module.train_agreement)  # cost_weight 0
    loss.backward()
    last = gate.net[2]  # zero at the start, so the first layer's gradient is zero at step 1
    assert last.weight.grad.abs().sum() > 0 and last.bias.grad.abs().sum() > 0


def test_critic_training_pairs_every_sample_with_two_options_and_regresses_their_gap(
    micro_target_dir,
):
    from covspec.training.gate_terms import explore_pairs

    t = {"ids": torch.arange(6).view(3, 2), "embeds": None, "target": {"x": torch.ones(3, 4)}}
    torch.manual_seed(0)
    doubled, force = explore_pairs(t, 4)
    assert doubled["ids"][:, 0].tolist() == [0, 0, 2, 2, 4, 4] and doubled["embeds"] is None
    assert doubled["target"]["x"].shape == (6, 4)
    assert (force.view(3, 2)[:, 0] != force.view(3, 2)[:, 1]).all()  # two distinct options

    options = ["none", "pool:4", "resampler:2"]
    module = _module(
        micro_target_dir,
        visual_prefix="compressed",
        compressor={"options": options, "gate": "critic"},
        cost_weight=0.05,
    )
    assert module.drafter.compressor.config.cost_weight == 0.05  # kept for inference
    module.train()
    before = {n: p.detach().clone() for n, p in module.drafter.named_parameters()}
    opt = torch.optim.AdamW(module.drafter.parameters(), lr=1e-2)
    for _ in range(3):  # three steps: each draws its own pairs, so every option gets trained
        opt.zero_grad()
        module.losses(_batch(micro_target_dir), module.train_agreement).backward()
        opt.step()
    for n, p in module.drafter.named_parameters():
        assert not torch.equal(p, before[n]), f"parameter {n} did not move"
    module.eval()
    with torch.no_grad():
        module.losses(_batch(micro_target_dir), module.val_agreement)  # argmin, no pairs


def test_critic_term_fits_the_measured_loss_gap():
    from covspec.modeling.drafter_inputs import VisualPrefix
    from covspec.training.gate_terms import critic_term

    scores = torch.zeros(2, 3, requires_grad=True)
    rows = scores.repeat_interleave(2, 0)  # the pairs share their sample's prediction
    z = torch.zeros(4, 0, 8)
    one = torch.ones(4)
    prefix = VisualPrefix(z, z, z[..., 0].bool(), torch.zeros(4).long(), rows, one, one, rows)
    force = torch.tensor([0, 1, 2, 0])
    per_sample = torch.tensor([[2.0, 1.0], [1.0, 1.0], [1.0, 1.0], [1.5, 1.0]])
    term = critic_term(prefix, per_sample, force)
    assert math.isclose(term.item(), (1.0**2 + 0.5**2) / 2)
    term.backward()
    assert scores.grad[0, 0] < 0 < scores.grad[0, 1]  # option 0 lost more: its score rises
    assert scores.grad[1, 2] > 0 > scores.grad[1, 0]
    assert critic_term(prefix, per_sample, None).item() == 0.0


def test_paired_rows_share_one_teacher_logits_pass(micro_target_dir):
    module = _module(
        micro_target_dir,
        visual_prefix="compressed",
        compressor={"options": ["none", "pool:4"], "gate": "critic"},
    )
    torch.manual_seed(1)
    hidden = torch.randn(3, 7, module.adapter.hidden_size).repeat_interleave(2, 0)  # (2B, S, D)
    mask = torch.rand(3, 7).lt(0.6).repeat_interleave(2, 0)
    mask[0] = False  # a sample without answer positions keeps the others aligned
    mask[1] = False
    logits, rows = module._teacher_logits(hidden, mask, torch.zeros(6, dtype=torch.long))
    assert len(logits) == mask[0::2].sum()  # one pass per sample, not per row
    expected = module.adapter.logits_from_hidden(hidden[mask]).float()
    assert torch.allclose(logits[rows], expected)
    plain, identity = module._teacher_logits(hidden, mask, None)
    assert torch.allclose(plain[identity], expected)
