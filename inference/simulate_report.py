"""Tables and figures of a `covspec simulate` report.

>>> write_report(report, "checkpoints/simulate/toy.json")  # .json, .md and .png beside it
"""

from __future__ import annotations

from pathlib import Path

from covspec.inference.pages import save_figure_atomic, write_pages

COLUMNS = (
    ("latency/token ms", "latency_per_token_ms", "{:.1f}"),
    ("answer ms", "latency_per_answer_ms", "{:.0f}"),
    ("first token ms", "time_to_first_token_ms", "{:.0f}"),
    ("edge ms/token", "edge_compute_per_token_ms", "{:.2f}"),
    ("up B/token", "uplink_bytes_per_token", "{:.0f}"),
    ("down B/token", "downlink_bytes_per_token", "{:.0f}"),
    (
        "decode up/down B/token",
        ("decode_uplink_bytes_per_token", "decode_downlink_bytes_per_token"),
        "{:.0f}",
    ),
    ("rounds/answer", "rounds_per_answer", "{:.1f}"),
    ("tau", "tau", "{:.2f}"),
    ("acceptance/depth", "acceptance_rate", "{:.2f}"),
    ("identical", "identical_fraction", "{:.0%}"),
    ("task accuracy", "task_accuracy", "{:.1%}"),
    ("answers broken / mended", ("answers_broken", "answers_mended"), "{:d}"),
    ("mismatches accepted", "mismatch_accept_rate", "{:.0%}"),
    ("speedup vs edge_only", "speedup_vs_edge_only", "{:.2f}x"),
    ("edge compute saving", "edge_compute_saving_vs_edge_only", "{:.2f}x"),
)


def _cell(row: dict, key, fmt: str) -> str:
    if isinstance(key, tuple):
        return " / ".join(_cell(row, k, fmt) for k in key)
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
    if report.get("greedy_task_accuracy") is not None:
        lines += [
            f"Task accuracy of the target's own greedy answers (`generate`): "
            f"{report['greedy_task_accuracy']:.1%}; a lossy row's answers broken / mended "
            "count the answers it gets wrong that greedy gets right, and the other way round.",
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
        lines.append(f"- `{name}`: {_channel_line(doc)}")
    lines += ["", report["preset_sources"], "", "### Compute settings", ""]
    for name, doc in report["computes"].items():
        lines.append(f"- `{name}`: {doc['description']}")
        for part in ("edge", "device"):
            if part in doc:
                lines.append(f"  - {part}: {doc[part]['name']}: {doc[part]['source']}")
    return "\n".join(lines) + "\n"


def _channel_line(doc: dict) -> str:
    if "trace" in doc:
        return f"trace {doc['trace']} ({doc['rows']} rows)"

    def radio(r: dict) -> str:
        return (
            f"{r['bandwidth_hz'] / 1e6:g} MHz at {r['mean_snr_db']:g} dB mean SNR, "
            f"{r['shadowing_sigma_db']:g} dB shadowing, {r['fading']} fading per "
            f"{r['coherence_s'] * 1e3:g} ms block, {r['efficiency']:g} of Shannon"
        )

    return (
        f"{doc['description']}. Uplink {radio(doc['uplink'])}; downlink {radio(doc['downlink'])}; "
        f"RTT {doc['rtt_ms']:g} ms + exponential jitter of mean {doc['rtt_jitter_ms']:g} ms; "
        f"{doc['overhead_bytes']} header bytes per message."
    )


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
    panels = [(c, "latency_per_token_ms", "latency per output token", "ms") for c in computes]
    panels += [
        (c, "edge_compute_per_token_ms", "edge compute per output token", "ms")
        for c in computes[-1:]
    ]
    panels += [
        (computes[0], "downlink_bytes_per_token", "downlink bytes per output token", "bytes")
    ]
    panels += [(computes[0], "uplink_bytes_per_token", "uplink bytes per output token", "bytes")]
    cols = 3
    rows = -(-(len(panels) + 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4.2 * rows), squeeze=False)
    flat = list(axes.flat)
    for ax, (compute, key, title, unit) in zip(flat, panels, strict=False):
        _by_channel(ax, [r for r in table if r["compute"] == compute], key)
        ax.set(title=f"{title} ({compute})", ylabel=unit, yscale="log")
    _sweep_plot(flat[len(panels)], report)
    for ax in flat[len(panels) + 1 :]:
        ax.axis("off")
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=100)
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
    fig, axes = plt.subplots(len(keys), 1, figsize=(12, 2.4 * len(keys)), squeeze=False)
    colours = {
        "draft": "tab:blue", "commit": "tab:cyan", "drafter_prefill": "tab:purple",
        "verify+project": "tab:orange", "vision+prefill": "tab:red", "step": "tab:orange",
    }  # fmt: skip
    for ax, key in zip(axes[:, 0], keys, strict=True):
        events, seen = examples[key], set()
        for role, kind, start, end in events["compute"]:
            y = 1 if role == "device" else 0
            ax.broken_barh(
                [(start * 1e3, (end - start) * 1e3)], (y - 0.3, 0.6),
                color=colours.get(kind, "grey"), edgecolor="white",
                label=None if kind in seen else kind,
            )  # fmt: skip
            seen.add(kind)
        for direction, _kind, _nbytes, sent, arrived in events["messages"]:
            y0, y1 = (1, 0) if direction == "up" else (0, 1)
            ax.annotate("", (arrived * 1e3, y1), (sent * 1e3, y0),
                        arrowprops={"arrowstyle": "->", "lw": 0.5, "color": "grey"})  # fmt: skip
        ax.set(yticks=[0, 1], yticklabels=["edge", "device"], ylim=(-0.6, 2.0),
               xlabel="simulated ms", title=f"one answer, simulated: {key.replace('|', ', ')}")  # fmt: skip
        ax.legend(fontsize=7, loc="upper left", ncol=6)
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=100)


def write_report(report: dict, out: str | Path) -> Path:
    """JSON at `out`, markdown and PNG figures beside it (atomic writes)."""
    out = write_pages(report, out, markdown(report))
    plot(report, out.with_suffix(".png"))
    return out
