"""Server metrics in the Prometheus text exposition format (no client library needed).

The engine thread records tokens, latencies and finished requests; `/metrics` renders them
together with the engine's latest memory snapshot. All updates take one lock.
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass, field, fields

from ..runtime.engine import MemoryUsage

#: Bucket upper bounds in seconds: time to first token spans a long prefill, a gap between tokens one step.
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)
ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0)

_PREFIX = "flashmemory_"


@dataclass
class Histogram:
    """Cumulative-bucket histogram of observations (seconds)."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for bound, n in zip(self.bounds, self.counts):
            running += n
            out.append(f'{name}_bucket{{le="{bound}"}} {running}')
        out.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        out.append(f"{name}_sum {self.total}")
        out.append(f"{name}_count {self.count}")
        return out


class Metrics:
    """Counters and histograms of one server, plus the engine's latest memory snapshot."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.finished: dict[str, int] = {}          # finish reason -> requests
        self.rejected: dict[str, int] = {}          # HTTP status -> requests refused before running
        self.transfers: dict[str, int] = {}         # TransferLog.to_dict() summed over finished requests
        self.memory = MemoryUsage(**{f.name: 0 for f in fields(MemoryUsage)})
        self.queued = 0                             # requests waiting for admission (handed over or in the engine)

    def first_token(self, seconds: float) -> None:
        with self._lock:
            self.ttft.observe(seconds)

    def token(self, gap_seconds: float | None) -> None:
        """One generated token; `gap_seconds` since the previous token of the same request (None: the first)."""
        with self._lock:
            self.generated_tokens += 1
            if gap_seconds is not None:
                self.itl.observe(gap_seconds)

    def finish(self, reason: str, prompt_tokens: int, transfers: dict[str, int]) -> None:
        with self._lock:
            self.finished[reason] = self.finished.get(reason, 0) + 1
            self.prompt_tokens += prompt_tokens
            for key, value in transfers.items():
                self.transfers[key] = self.transfers.get(key, 0) + value

    def reject(self, status: int) -> None:
        with self._lock:
            self.rejected[str(status)] = self.rejected.get(str(status), 0) + 1

    def engine_state(self, memory: MemoryUsage, queued: int) -> None:
        with self._lock:
            self.memory, self.queued = memory, queued

    def render(self) -> str:
        """The Prometheus text exposition of everything above."""
        with self._lock:
            m = self.memory
            lines: list[str] = []

            def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
                lines.append(f"# HELP {_PREFIX}{name} {help_text}")
                lines.append(f"# TYPE {_PREFIX}{name} {kind}")
                lines.extend(f"{_PREFIX}{name}{labels} {value}" for labels, value in samples)

            metric("requests_running", "gauge", "Requests admitted to the engine (prefilling or decoding).",
                   [("", m.running)])
            metric("requests_waiting", "gauge", "Requests waiting for admission (their device pages do not fit yet).",
                   [("", self.queued)])
            metric("device_kv_capacity_bytes", "gauge", "Bytes of the device KV pool.",
                   [("", m.device_capacity_bytes)])
            metric("device_kv_used_bytes", "gauge", "Device KV pool bytes holding a sequence's pages now.",
                   [("", m.device_used_bytes)])
            metric("device_kv_reserved_bytes", "gauge", "Device KV pool bytes reserved by admitted requests.",
                   [("", m.device_reserved_bytes)])
            metric("host_kv_bytes", "gauge", "Host memory of the running requests' KV mirrors.",
                   [("", m.host_bytes)])
            metric("disk_kv_bytes", "gauge", "Spill-file bytes of the running requests' KV beyond --host-memory.",
                   [("", m.disk_bytes)])
            metric("prompt_tokens_total", "counter", "Prompt tokens of finished requests.", [("", self.prompt_tokens)])
            metric("generated_tokens_total", "counter", "Tokens generated.", [("", self.generated_tokens)])
            metric("requests_finished_total", "counter", "Requests that ended, by finish reason.",
                   [(f'{{reason="{r}"}}', n) for r, n in sorted(self.finished.items())])
            metric("requests_rejected_total", "counter", "Requests refused before running, by HTTP status.",
                   [(f'{{status="{s}"}}', n) for s, n in sorted(self.rejected.items())])
            metric("transfers_total", "counter", "Host-device page transfers of finished requests.",
                   [(f'{{direction="{d}"}}', self.transfers.get(k, 0))
                    for d, k in (("recall", "recalls"), ("offload", "offloads"))])
            metric("transfer_bytes_total", "counter", "Bytes moved between host and device by finished requests.",
                   [(f'{{direction="{d}"}}', self.transfers.get(k, 0))
                    for d, k in (("recall", "recall_bytes"), ("offload", "offload_bytes"))])
            for name, hist, help_text in (
                    ("time_to_first_token_seconds", self.ttft, "From request arrival to its first generated token."),
                    ("inter_token_latency_seconds", self.itl, "Between consecutive tokens of one request.")):
                lines.append(f"# HELP {_PREFIX}{name} {help_text}")
                lines.append(f"# TYPE {_PREFIX}{name} histogram")
                lines.extend(hist.lines(_PREFIX + name))
            return "\n".join(lines) + "\n"


def parse(text: str) -> dict[str, float]:
    """Samples of a Prometheus text exposition by name (labels included): {'flashmemory_x{a="b"}': 1.0}."""
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples
