"""The two pipelined protocols: `decoupled` and `progressive` (see inference/protocols.py).

    >>> run_protocol("decoupled", runner, req, timeline, DraftSettings(depth=6), max_chunks=4)
    >>> run_protocol("progressive", runner, req, timeline, DraftSettings(mode="tree"))

Both verify greedily. `decoupled`: chunks of `depth` tokens drafted back to back on the device's
own optimistic path; the edge verifies them in order; at the first rejection the device, once
the verdict arrives, commits what was accepted (its roll-back) and starts a new round.
`progressive`: the top-1 chain and the heads of the other drafted branches go up; after a
mismatch whose wanted token heads a branch the edge asks for that subtree and verifies it next.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from covspec.inference.compute import Op
from covspec.inference.messages import Correction, DraftUpload, MismatchNack, ProgressiveUpload
from covspec.inference.protocols import (
    _commit,
    _draft,
    _elapsed,
    _Run,
    _tree_record,
    _verify_round,
)
from covspec.inference.roles import now, upload_for
from covspec.inference.timeline import GenerationResult
from covspec.inference.tree import DraftTree


def run_decoupled(run: _Run, policy) -> GenerationResult:
    """Chunks of `depth` tokens drafted back to back on the device's own optimistic path; the
    edge verifies them in order; at the first rejection the device, once the verdict arrives,
    commits what was accepted (its roll-back) and starts a new round."""
    req, t = run.req, run.t
    if req.sampling:
        raise ValueError("the decoupled protocol verifies greedily; use sync for sampling")
    base = replace(policy.base, mode="chain")
    c, chunks = base.depth, run.max_chunks
    run.depth_lists(c * chunks)
    run.prefill(base, extra_depth=c * chunks)
    if req.max_new_tokens <= 0:
        return run.finish()
    while not run.finished():
        results, emitted, back = [], [], run.device_ready
        for k in range(chunks):
            start = now(req.device)
            if k == 0:
                chunk = run.device.draft(req, base).tokens
            else:
                new = run.device.extend_chain(req, c)
                chunk = torch.tensor([req.tree.tokens[n] for n in new])
            n = len(chunk)
            ready = t.run(
                Op(
                    "device",
                    "draft",
                    n,
                    n,
                    len(req.tokens) + req.prompt_tokens,
                    _elapsed(start, req.device),
                ),
                run.device_ready if k == 0 else 0.0,  # later chunks follow the device's clock
            )
            message = DraftUpload(tokens=chunk, parents=torch.arange(-1, n - 1), chain=True)
            if k > 0 and int(chunk[0]) != req.tokens[-1]:
                # built on a guessed bonus the target did not emit: drop it, send a correction
                arrival = t.send("up", message, ready)
                correction = Correction(torch.zeros(0, dtype=torch.long), req.tokens[-1], type(results[-1].features)(), chain=True, chunk=k)  # fmt: skip
                back = t.send("down", correction, max(arrival, t.free["edge"]))
                run.result.attempts_per_depth[k * c] += 1
                break
            # a later chunk's first token is the previous bonus: verify the rest under it
            verify_up = (
                message if k == 0 else DraftUpload(chunk[1:], torch.arange(-1, n - 2), chain=True)
            )
            result, out, back = _verify_round(run, verify_up, ready, message)
            results.append(result)
            emitted += out
            first = k * c + 1
            if k > 0:  # the boundary token matched the bonus: attempted and accepted
                run.result.attempts_per_depth[first - 1] += 1
                run.result.accepted_per_depth[first - 1] += 1
            _tree_record(run, "round" if k == 0 else "chunk", verify_up, result, first - (k == 0), back)  # fmt: skip
            run.result.end_s = back
            if run.finished() or len(result.accepted) < len(verify_up.tokens):
                break
        if run.finished():
            break
        _commit(run, results, emitted, back)
    return run.finish()


def run_progressive(run: _Run, policy) -> GenerationResult:
    """Upload the top-1 chain and the heads of the other branches; after a mismatch whose
    wanted token heads a drafted branch, the edge asks for that subtree and verifies it next."""
    req, t = run.req, run.t
    if req.sampling:
        raise ValueError("the progressive protocol verifies greedily; use sync for sampling")
    settings = replace(policy.base, mode="tree")
    run.depth_lists(settings.depth)
    run.prefill(settings)
    if req.max_new_tokens <= 0:
        return run.finish()
    while not run.finished():
        up, ready = _draft(run, settings)
        tree, order = req.tree, req.order
        kept, chain = set(order), _top_path(tree, order)
        heads = {  # other branches that carry drafted descendants, by (depth, token)
            (tree.depths[b], tree.tokens[b]): b
            for node in [0, *chain[:-1]]
            for b in tree.children.get(node, [])
            if b in kept and b not in chain and any(c in kept for c in tree.children.get(b, []))
        }
        message = ProgressiveUpload(torch.tensor([tree.tokens[n] for n in chain]), list(heads))
        chain_up = upload_for(tree, [0, *chain], chain=True)
        result, emitted, back = _verify_round(run, chain_up, ready, message)
        _tree_record(run, "round", chain_up, result, 0, back)
        run.result.end_s = back
        if run.finished():
            break
        depth = len(result.accepted) + 1
        head = heads.get((depth, result.bonus))
        if head is not None:  # the edge asks for the branch the target chose
            asked = t.send("down", MismatchNack(depth, result.bonus), t.free["edge"])
            sub_up = upload_for(tree, _subtree(tree, order, head), chain=False)
        _commit(run, [result], emitted, back)
        if head is None:
            continue
        result, emitted, back = _verify_round(run, sub_up, asked)
        _tree_record(run, "subtree", sub_up, result, depth, back)
        run.result.end_s = back
        if run.finished():
            break
        _commit(run, [result], emitted, back)
    return run.finish()


def _subtree(tree: DraftTree, order: list[int], head: int) -> list[int]:
    """`head` then its kept descendants, in `order`'s depth-first order."""
    return [head] + [n for n in order if n != head and head in tree.ancestors(n)]


def _top_path(tree: DraftTree, order: list[int]) -> list[int]:
    """The drafter's top-1 chain among the kept nodes (first kept child at every level)."""
    kept, path, node = set(order), [], 0
    while True:
        child = next((c for c in tree.children.get(node, []) if c in kept), None)
        if child is None:
            return path
        path.append(child)
        node = child
