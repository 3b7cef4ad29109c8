"""Tables and figures of a `covspec simulate` report.

>>> write_report(report, "checkpoints/simulate/toy.json")  # .json, .md and .png beside it
"""

from __future__ import annotations

from pathlib import Path

from covspec.inference.simulate import write_json

COLUMNS = (
    ("latency/token ms", "latency_per_token_ms", "{:.1f}"),
    ("answer ms", "latency_per_answer_ms", "{:.0f}"),
    ("first token ms", "time_to_first_token_ms", "{:.0f}"),
    ("edge ms/token", "edge_compute_per_token_ms", "{:.2f}"),
    ("up B/token", "uplink_bytes_per_token", "{:.0f}"),
    ("down B/token", "downlink_bytes_per_token", "{:.0f}"),
    ("rounds/answer", "rounds_per_answer", "{:.1f}"),
    ("tau", "tau", "{:.2f}"),
    ("identical", "identical_fraction", "{:.0%}"),
    ("speedup vs edge_only", "speedup_vs_edge_only", "{:.2f}x"),
    ("edge compute saving", "edge_compute_saving_vs_edge_only", "{:.2f}x"),
)


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    return "-" if value is None else fmt.format(value)


def _name(row: dict) -> str:
    return row["protocol"] if row["drafter"] is None else f"{row['drafter']}/{row['protocol']}"


def markdown(report: dict) -> str:
    lines = [
        f"Target `{report['target']}`, {report['num_samples']} samples, up to "
        f"{report['max_new_tokens']} new tokens. {report['tau_definition']}. Tokens, tau, "
        "acceptance and bytes are measured by real decoding; link times are simulated (channel "
        "model below), compute is either measured on this machine (`measured`, the toy "
        "models) or priced by a roofline profile of real hardware (simulated).",
        "",
    ]
    table = [r for r in report["rows"] if r["section"] == "table"]
    header = "| method | " + " | ".join(c[0] for c in COLUMNS) + " |"
    for compute in dict.fromkeys(r["compute"] for r in table):
        for channel in dict.fromkeys(r["channel"] for r in table):
            rows = [r for r in table if r["compute"] == compute and r["channel"] == channel]
            if not rows:
                continue
            lines += [f"### channel `{channel}`, compute `{compute}`", "", header]
            lines.append("|---|" + "---|" * len(COLUMNS))
            for r in rows:
                cells = " | ".join(_cell(r, key, fmt) for _, key, fmt in COLUMNS)
                lines.append(f"| {_name(r)} | {cells} |")
            lines.append("")
    lines += _sweep_table(report)
    lines += ["### Channels", ""]
    for name, doc in report["channels"].items():
        lines.append(f"- `{name}`: {doc}")
    lines += ["", report["preset_sources"], "", "### Compute settings", ""]
    for name, doc in report["computes"].items():
        lines.append(f"- `{name}`: {doc['description']}")
        for part in ("edge", "device"):
            if part in doc:
                lines.append(f"  - {part}: {doc[part]['name']}: {doc[part]['source']}")
    return "\n".join(lines) + "\n"


def _sweep_table(report: dict) -> list[str]:
    sweep = [r for r in report["rows"] if r["section"] == "sweep"]
    if not sweep:
        return []
    channels = list(dict.fromkeys(r["channel"] for r in sweep))
    methods = list(dict.fromkeys(r["protocol"] for r in sweep))
    compute = sweep[0]["compute"]
    lines = [
        f"### Latency per output token (ms) against RTT, compute `{compute}`",
        "",
        "| protocol | " + " | ".join(c.split("@rtt")[1] + " ms" for c in channels) + " |",
        "|---|" + "---|" * len(channels),
    ]
    for m in methods:
        cells = []
        for c in channels:
            row = next(r for r in sweep if r["protocol"] == m and r["channel"] == c)
            cells.append(f"{row['latency_per_token_ms']:.1f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = [r for r in report["rows"] if r["section"] == "table"]
    computes = list(dict.fromkeys(r["compute"] for r in table))
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    for ax, compute in zip(axes[0], computes[:2], strict=False):
        _by_channel(ax, [r for r in table if r["compute"] == compute], "latency_per_token_ms")
        ax.set(title=f"latency per output token ({compute})", ylabel="ms", yscale="log")
    _by_channel(
        axes[1][0], [r for r in table if r["compute"] == computes[0]], "downlink_bytes_per_token"
    )
    axes[1][0].set(title="downlink bytes per output token", ylabel="bytes", yscale="log")
    _sweep_plot(axes[1][1], report)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    if report.get("timeline_example"):
        _timeline_plot(report["timeline_example"], path.with_name(path.stem + "-timeline.png"))


def _by_channel(ax, rows: list[dict], key: str) -> None:
    channels = list(dict.fromkeys(r["channel"] for r in rows))
    for name in dict.fromkeys(_name(r) for r in rows):
        values = [
            next((r[key] for r in rows if _name(r) == name and r["channel"] == c), None)
            for c in channels
        ]
        ax.plot(channels, values, marker="o", label=name)
    ax.set(xlabel="channel")
    ax.legend(fontsize=7)


def _sweep_plot(ax, report: dict) -> None:
    sweep = [r for r in report["rows"] if r["section"] == "sweep"]
    for m in dict.fromkeys(r["protocol"] for r in sweep):
        rows = [r for r in sweep if r["protocol"] == m]
        ax.plot([float(r["channel"].split("@rtt")[1]) for r in rows],
                [r["latency_per_token_ms"] for r in rows], marker="o", label=m)  # fmt: skip
    compute = sweep[0]["compute"] if sweep else ""
    ax.set(xlabel="RTT (ms)", ylabel="ms per output token", xscale="log",
           title=f"crossover against RTT ({compute})")  # fmt: skip
    ax.legend(fontsize=7)


def _timeline_plot(examples: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    keys = [k for k in examples if k.split("|")[0] in ("sync", "decoupled")][:4]
    if not keys:
        return
    fig, axes = plt.subplots(len(keys), 1, figsize=(12, 2.2 * len(keys)), squeeze=False)
    colours = {"device": "tab:blue", "edge": "tab:orange"}
    for ax, key in zip(axes[:, 0], keys, strict=True):
        events = examples[key]
        for role, _kind, start, end in events["compute"]:
            y = 1 if role == "device" else 0
            ax.broken_barh(
                [(start * 1e3, (end - start) * 1e3)], (y - 0.3, 0.6), color=colours[role]
            )
        for direction, _kind, _nbytes, sent, arrived in events["messages"]:
            y0, y1 = (1, 0) if direction == "up" else (0, 1)
            ax.annotate("", (arrived * 1e3, y1), (sent * 1e3, y0),
                        arrowprops={"arrowstyle": "->", "lw": 0.5, "color": "grey"})  # fmt: skip
        ax.set(yticks=[0, 1], yticklabels=["edge", "device"], title=f"round timeline: {key}")
        ax.set_xlabel("simulated ms")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(report: dict, out: str | Path) -> Path:
    """JSON at `out`, markdown and PNG figures beside it (atomic writes)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(report, out)
    md = out.with_suffix(".md")
    tmp = md.with_name(f".{md.name}.tmp")
    tmp.write_text(markdown(report))
    tmp.rename(md)
    plot(report, out.with_suffix(".png"))
    return out
