"""Losslessness tests that a broken runner fails.

The target is context-sensitive: the micro toy target with its language model redrawn at random
(scale 3), so every image and prompt gets its own answer, several answers stop at EOS midway,
and the visual placeholder is the raw argmax exactly where the token it shadows would be chosen
(its LM-head row is 1.1 times that token's), at the first token of one answer and inside others.
The scripted drafter knows the target's greedy continuation past EOS; in tree mode the right
token is a later child (second or third) as often as the first, so accepted paths leave the
depth-first prefix, and accepted blocks run across EOS. The sampling test verifies a two-level
tree whose every node has its own target distribution, over two tokens.

Mutations that must each make at least one test here fail (tests/mutations.py applies them:
`python -m pytest -p tests.mutations --mutation NAME tests/test_lossless.py`):

- order_not_depth: verify tree nodes at their upload index instead of their tree depth
- no_tree_mask: verify without the tree mask (a causal mask over the uploaded nodes)
- no_eos_truncation: stop at EOS but keep the accepted tokens after it
- loop_ignores_eos: a decode loop that ignores EOS (runs to max_new_tokens; hangs without one)
- no_suppress_verify: no suppression of visual placeholders in the verify forward
- no_suppress_prefill: no suppression at prefill (the first token)
- wrong_prob_row: rejection sampling reads the wrong row of target probabilities
"""

from __future__ import annotations

import random
import shutil

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from covspec.data.toy_world import make_sample
from covspec.inference import roles
from covspec.inference.runner import SpecRunner, build_prompt
from covspec.inference.tree import DraftSettings, DraftTree, verify_sampling
from tests.mutations import MUTATIONS

MAX_NEW = 24
CASES = 4


@torch.no_grad()
def _trace(model, processor, image, prompt: str, n: int, suppress: list[int]):
    """Greedy decoding without EOS: (tokens, raw argmax before suppression, smallest top-2 gap)."""
    inputs = processor(images=[image], text=build_prompt(processor, prompt), return_tensors="pt")
    out = model(**inputs, use_cache=True)
    tokens, raw, gaps = [], [], []
    for _ in range(n):
        logits = out.logits[0, -1]
        raw.append(int(logits.argmax()))
        logits = logits.index_fill(0, torch.tensor(suppress), float("-inf"))
        top = logits.topk(2).values
        gaps.append(float(top[0] - top[1]))
        tokens.append(int(logits.argmax()))
        out = model(input_ids=torch.tensor([[tokens[-1]]]), cache=out.cache, use_cache=True)
    return tokens, raw, gaps


def _cases():
    samples = [make_sample(42, i) for i in range(CASES)]
    return [(s["image"], s["messages"][0]["content"].replace("<image>\n", "")) for s in samples]


@pytest.fixture(scope="module")
def chaos(micro_target_dir, tmp_path_factory):
    """(runner, [(image, prompt, generate's tokens, greedy tokens past EOS)], eos)."""
    out = tmp_path_factory.mktemp("chaos") / "target"
    shutil.copytree(micro_target_dir, out)
    model = AutoModelForImageTextToText.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    image_id = model.config.image_token_id
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "vision_tower" not in name and p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 3.0 / p.shape[-1] ** 0.5)
    long = [_trace(model, processor, im, pr, MAX_NEW + 8, [image_id])[0] for im, pr in _cases()]
    # shadow a token that starts one answer and occurs inside another; stop at a token that
    # first occurs midway through as many answers as possible
    shadowed = next(a[0] for a in long if any(a[0] in b[1:MAX_NEW] for b in long))
    first_seen = [{t: i for i, t in reversed(list(enumerate(a[:MAX_NEW])))} for a in long]
    eos = max(
        (
            t
            for seen in first_seen
            for t, i in seen.items()
            if 2 <= i < MAX_NEW - 4 and t != shadowed
        ),
        key=lambda t: sum(2 <= seen.get(t, -1) < MAX_NEW - 4 for seen in first_seen),
    )
    with torch.no_grad():
        model.lm_head.weight[image_id] = 1.1 * model.lm_head.weight[shadowed]
    model.generation_config.eos_token_id = eos
    model.save_pretrained(out)
    runner = SpecRunner(AutoModelForImageTextToText.from_pretrained(out).eval(), processor, None)
    cases, raws = [], []
    for (image, prompt), tokens in zip(_cases(), long, strict=True):
        inputs = runner.encode(image, prompt)
        ref = runner.model.generate(
            **inputs,
            do_sample=False,
            max_new_tokens=MAX_NEW,
            suppress_tokens=runner.suppress_tokens,
        )[0, inputs["input_ids"].shape[1] :].tolist()
        traced, raw, gaps = _trace(runner.model, processor, image, prompt, len(ref), [image_id])
        assert traced == ref == tokens[: len(ref)] and min(gaps) > 1e-4  # no near-ties
        cases.append((image, prompt, ref, tokens))
        raws.append(raw)
    # what makes the tests able to fail, checked rather than hoped for
    assert sum(ref[-1] == eos and len(ref) < MAX_NEW - 2 for _, _, ref, _ in cases) >= 2
    assert any(raw[0] == image_id for raw in raws), "no answer starts on a suppressed token"
    assert any(image_id in raw[1:] for raw in raws), "no suppressed token inside an answer"
    return runner, cases, eos


class Oracle:
    """A scripted drafter that knows the greedy continuation (past EOS). Each draft's right
    token is in the top `width` children at a random rank (with probability `p_right`)."""

    def __init__(self, continuation: list[int], vocab: int, p_right: float, width: int, seed: int):
        self.next, self.vocab, self.p_right, self.width = continuation, vocab, p_right, width
        self.rng = random.Random(seed)
        self.committed = 1  # tokens emitted so far (the first came with the prefill)

    def _logits(self, index: int) -> torch.Tensor:
        want = self.next[index] if index < len(self.next) else 0
        wrong = self.rng.sample([t for t in range(self.vocab) if t != want], self.width)
        if self.rng.random() < self.p_right:
            wrong[self.rng.randrange(self.width)] = want
        logits = torch.zeros(self.vocab)
        for rank, tok in enumerate(wrong):
            logits[tok] = 8.0 - rank  # distinct ranks: the tree orders children by them
        return logits

    def root_logits(self) -> torch.Tensor:
        return self._logits(self.committed)

    def expand(self, tree, nodes) -> torch.Tensor:
        return torch.stack([self._logits(self.committed + tree.depths[n]) for n in nodes])

    def commit(self, features, emitted) -> None:
        self.committed += len(emitted)


@pytest.mark.parametrize(
    "mode, p_right",
    [("chain", 1.0), ("chain", 0.7), ("tree", 1.0), ("tree", 0.8), ("tree", 0.0)],
)
def test_greedy_runner_equals_generate_on_a_context_sensitive_target(
    chaos, monkeypatch, mode, p_right
):
    runner, cases, eos = chaos
    seen = {"later_child": 0, "across_eos": 0}
    verify = roles.verify_greedy

    def spy(tree, order, logits):  # what the accepted paths looked like
        path, bonus = verify(tree, order, logits)
        seen["later_child"] += any(tree.children[tree.parents[n]].index(n) > 0 for n in path)
        tokens = [tree.tokens[n] for n in path] + [bonus]
        seen["across_eos"] += eos in tokens[:-1]
        return path, bonus

    monkeypatch.setattr(roles, "verify_greedy", spy)
    width = 1 if mode == "chain" else 3
    settings = DraftSettings(mode=mode, depth=5, top_k=width, beam=3, max_nodes=24)
    vocab = runner.adapter.vocab_size
    for i, (image, prompt, ref, continuation) in enumerate(cases):

        def factory(*_, continuation=continuation, i=i):
            return Oracle(continuation, vocab, p_right, width, seed=i)

        got = runner.generate(image, prompt, MAX_NEW, settings, source_factory=factory)
        assert got.tokens == ref, (i, got.tokens, ref)
    if p_right == 1.0:
        assert seen["across_eos"] > 0, "no accepted block ran across EOS"
    if mode == "tree" and p_right > 0:
        assert seen["later_child"] > 0, "no later child was ever accepted"


def test_real_drafter_stops_at_eos(chaos, tmp_path):
    from covspec.modeling.drafter import Drafter, DrafterConfig

    runner, cases, eos = chaos
    torch.manual_seed(0)
    Drafter(DrafterConfig.for_target(runner.adapter)).save_pretrained(tmp_path)
    real = SpecRunner.from_folders(runner.model.name_or_path, str(tmp_path))
    for image, prompt, ref, _ in cases:
        for mode in ("chain", "tree"):
            got = real.generate(image, prompt, MAX_NEW, DraftSettings(mode=mode, depth=4))
            assert got.tokens == ref


def _two_token_distribution(q_rows: torch.Tensor, p_root: torch.Tensor, p_next: torch.Tensor,
                            n: int, gen: torch.Generator) -> torch.Tensor:  # fmt: skip
    """Empirical P(first, second emitted token) of rounds of two-level trees (2 children per
    node, drawn without replacement from q), each node verified against its own distribution:
    p_root at the root, p_next[t] after token t (and p_next[t] again one level deeper)."""
    v = len(p_root)
    counts = torch.zeros(v, v)
    for _ in range(n):
        emitted, context = [], None
        while len(emitted) < 2:  # another round when the first emitted only one token
            tree = DraftTree(root_token=0)
            rows = [p_root if context is None else p_next[context]]
            frontier = [0]
            for _level in range(2):
                new = []
                for node in frontier:
                    q = q_rows[tree.tokens[node] if node else v]
                    tree.draft_probs[node] = q
                    gumbel = -torch.log(-torch.log(torch.rand(v, generator=gen)))
                    for tok in (q.log() + gumbel).topk(2).indices.tolist():
                        new.append(tree.add(node, tok, 0.0))
                frontier = new
            order = tree.select()
            rows = [rows[0]] + [p_next[tree.tokens[n]] for n in order[1:]]
            path, bonus = verify_sampling(tree, order, torch.stack(rows), gen)
            emitted += [tree.tokens[n] for n in path] + [bonus]
            context = emitted[-1]
        counts[emitted[0], emitted[1]] += 1
    return counts / n


def test_multi_level_sampling_reproduces_the_target_per_node():
    """Statistical: 6000 samples over a 4-token vocabulary; the joint distribution of the first
    two emitted tokens must match p_root(a) * p_next[a](b) to within 0.03 per cell (about 4.5
    standard errors), while reading the root's row at every node is off by more than 0.1."""
    gen = torch.Generator().manual_seed(0)
    p_root = torch.tensor([0.1, 0.4, 0.3, 0.2])
    p_next = torch.tensor(
        [[0.7, 0.1, 0.1, 0.1], [0.05, 0.05, 0.1, 0.8], [0.1, 0.6, 0.2, 0.1], [0.25, 0.25, 0.4, 0.1]]
    )
    q_rows = torch.tensor(  # the drafter's guesses: per parent token, and at the root (row 4)
        [[0.4, 0.2, 0.2, 0.2], [0.2, 0.2, 0.2, 0.4], [0.2, 0.4, 0.2, 0.2], [0.3, 0.3, 0.3, 0.1],
         [0.25, 0.25, 0.25, 0.25]]
    )  # fmt: skip
    joint = _two_token_distribution(q_rows, p_root, p_next, 6000, gen)
    want = p_root[:, None] * p_next
    assert (joint - want).abs().max() < 0.03, (joint, want)


def test_docstring_lists_every_mutation():
    listed = {
        line.split(":")[0].removeprefix("- ")
        for line in __doc__.splitlines()
        if line.startswith("- ")
    }
    assert listed == set(MUTATIONS)
