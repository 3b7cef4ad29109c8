"""Broken runners, to prove that the losslessness tests can fail (a pytest plugin).

    OMP_NUM_THREADS=1 python -m pytest -q -p tests.mutations --mutation no_tree_mask \\
        tests/test_lossless.py tests/test_runner.py

Each mutation is one textual change to one runner function, applied to a copy of that function's
source that is compiled in its module's namespace and swapped in before any test module is
imported; the files on disk are never touched. A mutation whose original text is gone fails
loudly, so the list cannot silently rot. tests/test_lossless.py lists them in its docstring;
every one of them must make at least one test there fail.
"""

from __future__ import annotations

import importlib
import inspect
import sys
import textwrap

# name: (module, qualified function name, original text, mutated text)
MUTATIONS: dict[str, tuple[str, str, str, str]] = {
    "order_not_depth": (  # verify tree nodes at their index in the upload, not their depth
        "covspec.inference.roles", "EdgeRole.verify",
        "[[req.past + d for d in tree.depths]]", "[[req.past + i for i in range(len(tree.depths))]]",
    ),
    "no_tree_mask": (  # verify with a causal mask: nodes see their siblings' subtrees
        "covspec.inference.roles", "EdgeRole.verify", "attention_mask=mask,", "attention_mask=None,",
    ),
    "no_eos_truncation": (  # stop at EOS but keep the accepted tokens after it
        "covspec.inference.protocols", "_Run.finished",
        "req.tokens = req.tokens[: stop + 1]", "pass",
    ),
    "loop_ignores_eos": (  # decode on past EOS until max_new_tokens
        "covspec.inference.protocols", "_Run.finished",
        "eos, req = self.runner.eos, self.req", "eos, req = set(), self.req",
    ),
    "no_suppress_verify": (  # the verify forward may emit suppressed (visual) tokens
        "covspec.inference.roles", "EdgeRole.verify",
        "logits = r.suppress(out.logits[0])", "logits = out.logits[0]",
    ),
    "no_suppress_prefill": (  # the first token may be a suppressed one
        "covspec.inference.roles", "EdgeRole.prefill",
        "first_token(r.suppress(out.logits[0, -1]), req)", "first_token(out.logits[0, -1], req)",
    ),
    "wrong_prob_row": (  # rejection sampling reads the root's target distribution everywhere
        "covspec.inference.tree", "verify_sampling",
        "p = target_probs[index[node]].double().clone()", "p = target_probs[0].double().clone()",
    ),
}  # fmt: skip


def apply(name: str) -> None:
    """Swap the mutated copy of the function in, wherever covspec modules hold it."""
    module_name, qualname, original, mutated = MUTATIONS[name]
    for loaded in ("covspec.inference.runner", "covspec.inference.protocol_variants"):
        importlib.import_module(loaded)  # everything that may hold the function by name
    module = importlib.import_module(module_name)
    owner, attr = module, qualname
    if "." in qualname:
        cls_name, attr = qualname.split(".")
        owner = getattr(module, cls_name)
    function = inspect.unwrap(getattr(owner, attr))
    source = textwrap.dedent(inspect.getsource(function))
    if source.count(original) != 1:
        raise RuntimeError(f"mutation {name}: {original!r} is not in {qualname} once")
    namespace = dict(vars(module))
    exec(compile(source.replace(original, mutated), f"<mutant {name}>", "exec"), namespace)
    broken = namespace[attr]
    old = getattr(owner, attr)
    setattr(owner, attr, broken)
    for other in list(sys.modules.values()):  # `from ... import verify_sampling` copies
        if (
            getattr(other, "__name__", "").startswith("covspec.")
            and getattr(other, attr, None) is old
        ):
            setattr(other, attr, broken)


def pytest_addoption(parser) -> None:
    parser.addoption("--mutation", choices=sorted(MUTATIONS), help="break the runner this way")


def pytest_configure(config) -> None:
    name = config.getoption("--mutation")
    if name:
        apply(name)
