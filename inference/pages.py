"""Result pages written whole: a report's JSON and its markdown page, each to a temporary name
first and renamed, so a crash or a full disk never leaves half a page behind.

    >>> out = write_pages(report, "docs/results/bench.json", markdown_table(report))
    >>> out.with_suffix(".md").exists()
    True
"""

from __future__ import annotations

import json
from pathlib import Path

# how every result page (bench, simulate, eval) defines the tau it reports
TAU_DEFINITION = (
    "tau = tokens emitted per target forward in the decode loop, the bonus token included "
    "(ceiling: depth + 1); the first token, from the prefill, is not counted"
)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.rename(path)


def save_figure_atomic(fig, path: str | Path, dpi: int) -> None:
    """Save a matplotlib figure under a temporary name, then rename it into place; closes it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")  # keeps the suffix: it sets the format
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    tmp.rename(path)


def write_pages(report: dict, out: str | Path, markdown: str) -> Path:
    """`out` (JSON, NaN refused) and the markdown page beside it (`.md`); returns `out`."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, json.dumps(report, indent=2, allow_nan=False))
    write_text_atomic(out.with_suffix(".md"), markdown)
    return out
