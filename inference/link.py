"""Simulated device-edge link: a block-fading radio each way, RTT with jitter, traces.

    >>> link = Link(PRESETS["medium"], seed=0)
    >>> arrival = link.send("up", nbytes=1_200, ready_s=0.0)    # seconds when the edge has it
    >>> link.state(arrival)                                      # SNR, rates, RTT at that time
    >>> link = Link(TraceChannel.from_csv("drive.csv", base=PRESETS["medium"]), seed=0)

Each direction is a radio of bandwidth B: its SNR is a mean plus log-normal shadowing (a
Gauss-Markov process in dB with decorrelation time `shadowing_corr_s`) plus Rayleigh or Rician
small-scale fading redrawn every coherence block (block fading). The rate in a block is
`efficiency * B * log2(1 + snr * |h|^2)`, capped at `max_spectral_efficiency * B`, so Shannon's
bound is discounted for coding, MAC and control overhead. A message of b bytes (plus
`overhead_bytes` of transport headers) is serialised after the previous message in the same
direction (FIFO), integrating the rate block by block, then takes a one-way delay of RTT/2 plus
an exponential queueing jitter of mean `rtt_jitter_ms / 2`; each direction is one ordered
stream, so a message is never delivered before the one sent ahead of it. Everything is drawn from a seeded
generator in time order, so a run is reproducible.

Trace mode replaces the model with a CSV `time_s,snr_db,rtt_ms[,uplink_mbps,downlink_mbps]`
(piecewise constant, the last row held): rates from the columns when present, else Shannon on
the trace's SNR with the base preset's bandwidth and efficiency (no extra fading).

The presets are documented assumptions, not measurements (see PRESET_SOURCES).
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np

Direction = Literal["up", "down"]


@dataclass(frozen=True)
class RadioConfig:
    """One direction of the link."""

    bandwidth_hz: float
    mean_snr_db: float
    shadowing_sigma_db: float = 4.0
    shadowing_corr_s: float = 1.0  # Gauss-Markov decorrelation time of the shadowing
    fading: Literal["rayleigh", "rician", "none"] = "rayleigh"
    rician_k_db: float = 6.0  # line-of-sight to scattered power, Rician only
    coherence_s: float = 0.005  # block length: small-scale fading is constant within a block
    efficiency: float = 0.6  # fraction of Shannon capacity achieved (coding, MAC, control)
    max_spectral_efficiency: float = 7.4  # bit/s/Hz cap (5G NR 256-QAM, highest MCS)

    def __post_init__(self) -> None:
        if self.bandwidth_hz <= 0 or self.coherence_s <= 0 or not 0 < self.efficiency <= 1:
            raise ValueError(
                f"bandwidth, coherence time > 0 and efficiency in (0, 1] needed: {self}"
            )
        if self.shadowing_corr_s <= 0 or self.shadowing_sigma_db < 0:
            raise ValueError(f"shadowing_corr_s > 0 and shadowing_sigma_db >= 0 needed: {self}")
        if self.max_spectral_efficiency <= 0:
            raise ValueError(f"max_spectral_efficiency must be > 0: {self}")


@dataclass(frozen=True)
class LinkConfig:
    name: str
    uplink: RadioConfig
    downlink: RadioConfig
    rtt_ms: float  # propagation + core-network round trip, both directions together
    rtt_jitter_ms: float = 0.0  # mean extra queueing delay per round trip
    overhead_bytes: int = 48  # per message: IPv6 (40) + UDP (8) headers
    description: str = ""

    def __post_init__(self) -> None:
        if not (self.rtt_ms >= 0 and self.rtt_jitter_ms >= 0 and self.overhead_bytes >= 0):
            raise ValueError(
                f"channel {self.name!r}: rtt_ms, rtt_jitter_ms and overhead_bytes must be >= 0, "
                f"got {self.rtt_ms}, {self.rtt_jitter_ms}, {self.overhead_bytes}"
            )

    def with_rtt(self, rtt_ms: float) -> LinkConfig:
        return replace(self, name=f"{self.name}@rtt{rtt_ms:g}ms", rtt_ms=rtt_ms)


PRESETS: dict[str, LinkConfig] = {
    "good": LinkConfig(
        "good",
        uplink=RadioConfig(bandwidth_hz=40e6, mean_snr_db=20.0, shadowing_sigma_db=3.0),
        downlink=RadioConfig(bandwidth_hz=100e6, mean_snr_db=25.0, shadowing_sigma_db=3.0),
        rtt_ms=10.0,
        rtt_jitter_ms=2.0,
        description="5G NR FR1 near a MEC edge site: 100 MHz carrier, strong signal, 10 ms RTT",
    ),
    "medium": LinkConfig(
        "medium",
        uplink=RadioConfig(bandwidth_hz=20e6, mean_snr_db=10.0),
        downlink=RadioConfig(bandwidth_hz=40e6, mean_snr_db=15.0),
        rtt_ms=40.0,
        rtt_jitter_ms=10.0,
        description="5G NR mid-cell / loaded Wi-Fi: 20-40 MHz, 10-15 dB SNR, 40 ms RTT",
    ),
    "bad": LinkConfig(
        "bad",
        uplink=RadioConfig(bandwidth_hz=5e6, mean_snr_db=0.0, shadowing_sigma_db=6.0),
        downlink=RadioConfig(bandwidth_hz=10e6, mean_snr_db=5.0, shadowing_sigma_db=6.0),
        rtt_ms=120.0,
        rtt_jitter_ms=40.0,
        description="LTE cell edge: 5-10 MHz, 0-5 dB SNR, 6 dB shadowing, 120 ms RTT",
    ),
}
PRESET_SOURCES = (
    "Assumed, representative values: carrier bandwidths are 3GPP NR FR1 / LTE channel sizes "
    "(TS 38.101-1, TS 36.101); cell-edge SNR around 0 dB and shadowing sigma 4-8 dB follow "
    "3GPP TR 38.901's urban macro model; RTTs follow the MEC target of ~10 ms (ETSI MEC) up to "
    "typical LTE cell-edge latencies of ~100+ ms. The 0.6 Shannon efficiency stands for "
    "coding, HARQ and control overhead."
)


@dataclass
class LinkState:
    """What a protocol may know about the link at a moment (CSI): per-direction SNR and rate."""

    time_s: float
    uplink_snr_db: float
    downlink_snr_db: float
    uplink_bps: float
    downlink_bps: float
    rtt_ms: float


class Radio:
    """One direction's block-fading channel; blocks are drawn lazily, in order, from `rng`."""

    def __init__(self, cfg: RadioConfig, rng: np.random.Generator) -> None:
        self.cfg = cfg
        self.rng = rng
        self.rho = math.exp(-cfg.coherence_s / cfg.shadowing_corr_s)
        self._shadow: list[float] = []
        self._gain: list[float] = []

    def _extend(self, block: int) -> None:
        c = self.cfg
        while len(self._shadow) <= block:
            prev = self._shadow[-1] if self._shadow else self.rng.normal(0.0, c.shadowing_sigma_db)
            innovation = self.rng.normal(0.0, c.shadowing_sigma_db * math.sqrt(1 - self.rho**2))
            self._shadow.append(self.rho * prev + innovation if self._shadow else prev)
            self._gain.append(self._fading_gain())

    def _fading_gain(self) -> float:
        c = self.cfg
        if c.fading == "none":
            return 1.0
        if c.fading == "rayleigh":
            return float(self.rng.exponential(1.0))  # |h|^2 of a unit-power Rayleigh channel
        k = 10 ** (c.rician_k_db / 10)
        los = math.sqrt(k / (k + 1))
        scatter = self.rng.normal(0.0, math.sqrt(1 / (2 * (k + 1))), size=2)
        return float((los + scatter[0]) ** 2 + scatter[1] ** 2)

    def snr_db(self, t: float) -> float:
        """Average SNR (shadowing included, small-scale fading excluded) at time t."""
        block = int(t / self.cfg.coherence_s)
        self._extend(block)
        return self.cfg.mean_snr_db + self._shadow[block]

    def _block_rate(self, block: int) -> float:
        c = self.cfg
        self._extend(block)
        snr = 10 ** ((c.mean_snr_db + self._shadow[block]) / 10) * self._gain[block]
        spectral = min(c.efficiency * math.log2(1 + snr), c.max_spectral_efficiency)
        return max(spectral * c.bandwidth_hz, 1.0)  # a deep fade still trickles

    def rate_bps(self, t: float) -> float:
        return self._block_rate(int(t / self.cfg.coherence_s))

    def transfer_seconds(self, nbytes: int, start: float) -> float:
        """Seconds to push `nbytes` starting at `start`, rate integrated block by block."""
        step = self.cfg.coherence_s
        bits, t, block = 8.0 * nbytes, start, int(start / step)
        while True:
            rate = self._block_rate(block)
            available = rate * max((block + 1) * step - t, 0.0)
            if available >= bits:
                return t + bits / rate - start
            bits -= available
            block += 1
            t = block * step


@dataclass
class TraceRow:
    time_s: float
    snr_db: float
    rtt_ms: float
    uplink_bps: float | None = None
    downlink_bps: float | None = None


@dataclass
class TraceChannel:
    """A measured or scripted channel: rows of `time_s,snr_db,rtt_ms[,uplink_mbps,downlink_mbps]`."""

    rows: list[TraceRow]
    base: LinkConfig
    name: str = "trace"

    @classmethod
    def from_csv(cls, path: str | Path, base: LinkConfig) -> TraceChannel:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"channel trace not found: {path}")
        rows = []
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            missing = {"time_s", "snr_db", "rtt_ms"} - set(reader.fieldnames or [])
            if missing:
                raise ValueError(f"{path}: trace lacks column(s) {sorted(missing)}")
            for n, rec in enumerate(reader, start=2):
                try:
                    up, down = rec.get("uplink_mbps"), rec.get("downlink_mbps")
                    rows.append(
                        TraceRow(
                            float(rec["time_s"]),
                            float(rec["snr_db"]),
                            float(rec["rtt_ms"]),
                            float(up) * 1e6 if up not in (None, "") else None,
                            float(down) * 1e6 if down not in (None, "") else None,
                        )
                    )
                except (TypeError, ValueError) as e:
                    raise ValueError(f"{path}:{n}: not a number ({e})") from e
                row = rows[-1]
                rates = [r for r in (row.uplink_bps, row.downlink_bps) if r is not None]
                if row.rtt_ms < 0 or any(r <= 0 for r in rates):
                    raise ValueError(f"{path}:{n}: rtt_ms must be >= 0 and rates > 0, got {rec}")
        if not rows:
            raise ValueError(f"{path}: trace has no rows")
        if any(b.time_s < a.time_s for a, b in zip(rows, rows[1:], strict=False)):
            raise ValueError(f"{path}: time_s must not decrease")
        return cls(rows, base, name=f"trace:{path.stem}")

    def row(self, t: float) -> TraceRow:
        times = [r.time_s for r in self.rows]
        return self.rows[max(0, int(np.searchsorted(times, t, side="right")) - 1)]

    def rate_bps(self, direction: Direction, t: float) -> float:
        r = self.row(t)
        given = r.uplink_bps if direction == "up" else r.downlink_bps
        if given is not None:
            return max(given, 1.0)
        radio = self.base.uplink if direction == "up" else self.base.downlink
        spectral = min(
            radio.efficiency * math.log2(1 + 10 ** (r.snr_db / 10)), radio.max_spectral_efficiency
        )
        return max(spectral * radio.bandwidth_hz, 1.0)

    def transfer_seconds(self, direction: Direction, nbytes: int, start: float) -> float:
        """Seconds to push `nbytes` starting at `start`, each trace row's rate over its span."""
        times = [r.time_s for r in self.rows]
        bits, t = 8.0 * nbytes, start
        nxt = int(np.searchsorted(times, t, side="right"))  # the row after the current one
        while True:
            rate = self.rate_bps(direction, t)
            if nxt >= len(times) or rate * (times[nxt] - t) >= bits:
                return t + bits / rate - start
            bits -= rate * (times[nxt] - t)
            t, nxt = times[nxt], nxt + 1


@dataclass
class Link:
    """Both directions of a device-edge link, FIFO per direction, deterministic under `seed`."""

    channel: LinkConfig | TraceChannel
    seed: int = 0
    _free: dict[str, float] = field(default_factory=lambda: {"up": 0.0, "down": 0.0})
    _last: dict[str, float] = field(default_factory=lambda: {"up": 0.0, "down": 0.0})

    def __post_init__(self) -> None:
        root = np.random.SeedSequence(self.seed)
        up, down, jitter = (np.random.default_rng(s) for s in root.spawn(3))
        self._jitter = jitter
        cfg = self.config
        self._radios = None
        if isinstance(self.channel, LinkConfig):
            self._radios = {"up": Radio(cfg.uplink, up), "down": Radio(cfg.downlink, down)}

    @property
    def config(self) -> LinkConfig:
        return self.channel if isinstance(self.channel, LinkConfig) else self.channel.base

    @property
    def name(self) -> str:
        return self.channel.name

    def rtt_ms(self, t: float) -> float:
        if isinstance(self.channel, TraceChannel):
            return self.channel.row(t).rtt_ms
        return self.config.rtt_ms

    def rate_bps(self, direction: Direction, t: float) -> float:
        if self._radios is None:
            return self.channel.rate_bps(direction, t)
        return self._radios[direction].rate_bps(t)

    def _transfer(self, direction: Direction, nbytes: int, start: float) -> float:
        if self._radios is not None:
            return self._radios[direction].transfer_seconds(nbytes, start)
        return self.channel.transfer_seconds(direction, nbytes, start)

    def send(self, direction: Direction, nbytes: int, ready_s: float) -> float:
        """Arrival time of a message of `nbytes` payload handed to the link at `ready_s`."""
        if direction not in ("up", "down"):
            raise ValueError(f"direction must be 'up' or 'down', got {direction!r}")
        start = max(ready_s, self._free[direction])
        done = start + self._transfer(direction, nbytes + self.config.overhead_bytes, start)
        self._free[direction] = done
        one_way = self.rtt_ms(start) / 2e3
        jitter = self.config.rtt_jitter_ms / 2e3
        if jitter > 0 and isinstance(self.channel, LinkConfig):
            one_way += float(self._jitter.exponential(jitter))
        # one ordered stream per direction: a message never overtakes the one before it
        self._last[direction] = max(done + one_way, self._last[direction])
        return self._last[direction]

    def state(self, t: float) -> LinkState:
        """The channel state information a protocol may act on at time t."""
        if self._radios is not None:
            up, down = self._radios["up"].snr_db(t), self._radios["down"].snr_db(t)
        else:
            up = down = self.channel.row(t).snr_db
        return LinkState(
            t, up, down, self.rate_bps("up", t), self.rate_bps("down", t), self.rtt_ms(t)
        )


def resolve_channel(spec: str, base: str = "medium") -> LinkConfig | TraceChannel:
    """A preset name, `PRESET@rttMS` (a preset with another RTT) or a trace CSV path."""
    name, _, rtt = spec.partition("@rtt")
    if name in PRESETS:
        cfg = PRESETS[name]
        return cfg.with_rtt(float(rtt.removesuffix("ms"))) if rtt else cfg
    if spec.endswith(".csv"):
        return TraceChannel.from_csv(spec, PRESETS[base])
    raise ValueError(
        f"unknown channel {spec!r}: use one of {sorted(PRESETS)}, PRESET@rttMS or a .csv trace"
    )
