"""Measured memory and transfer accounting for one sequence."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TransferLog:
    """Every copy between the tiers, with the decode step it happened at."""

    recalls: int = 0          # host -> device page copies
    recall_bytes: int = 0
    offloads: int = 0         # device -> host copies of newly decoded tokens
    offload_bytes: int = 0
    steps: list[int] = field(default_factory=list)  # decode step index of each transfer
    # the disk tier (memory/spill.py): reads into host slots, writes of pages leaving the host
    disk_reads: int = 0
    disk_read_bytes: int = 0
    disk_writes: int = 0
    disk_write_bytes: int = 0
    prefetch_hits: int = 0    # recalls served by a page the background prefetch had read
    prefetch_misses: int = 0  # recalls that read their page from disk at the boundary
    # (step, kind, page) of every disk event; kind: "prefetch" (background read, logged with the step of the
    # boundary that asked for it), "miss" (a recall's
    # synchronous read), "read" (another synchronous read: an index build, a write's page, a dense
    # forward), "hit" (a recall served by a prefetched page), "write"
    disk_events: list[tuple[int, str, int]] = field(default_factory=list)

    def recall(self, nbytes: int, step: int) -> None:
        self.recalls += 1
        self.recall_bytes += nbytes
        self.steps.append(step)

    def offload(self, nbytes: int, step: int) -> None:
        self.offloads += 1
        self.offload_bytes += nbytes
        self.steps.append(step)

    def disk_read(self, nbytes: int, step: int, kind: str, page: int) -> None:
        self.disk_reads += 1
        self.disk_read_bytes += nbytes
        self.prefetch_misses += kind == "miss"
        self.disk_events.append((step, kind, page))

    def disk_write(self, nbytes: int, step: int, page: int) -> None:
        self.disk_writes += 1
        self.disk_write_bytes += nbytes
        self.disk_events.append((step, "write", page))

    def prefetch_hit(self, step: int, page: int) -> None:
        self.prefetch_hits += 1
        self.disk_events.append((step, "hit", page))

    def to_dict(self) -> dict:
        return {"recalls": self.recalls, "recall_bytes": self.recall_bytes,
                "offloads": self.offloads, "offload_bytes": self.offload_bytes,
                "count": self.recalls + self.offloads, "bytes": self.recall_bytes + self.offload_bytes,
                "disk_reads": self.disk_reads, "disk_read_bytes": self.disk_read_bytes,
                "disk_writes": self.disk_writes, "disk_write_bytes": self.disk_write_bytes,
                "prefetch_hits": self.prefetch_hits, "prefetch_misses": self.prefetch_misses}


@dataclass
class MemoryMeter:
    """Peaks of the bytes one sequence holds on each tier, sampled at every step."""

    device_kv_bytes_peak: int = 0      # bytes of the tokens attention reads on the device (resident + open region)
    device_pages_bytes_peak: int = 0   # bytes of the pool pages this sequence holds (open pages' room included)
    device_reserved_bytes: int = 0     # bytes of the pool slots reserved for it at admission
    host_kv_bytes_peak: int = 0        # history bytes in its host mirror
    host_reserved_bytes: int = 0       # storage of its host mirror
    full_kv_bytes_peak: int = 0        # what a full cache of the same history would hold
    dense_device_peak: int = 0         # largest transient device KV of one dense layer (prefill)
    window_bytes: int = 0              # the sliding layers' window slot on the device (hybrid models)
    disk_bytes_peak: int = 0           # its spill file on disk (the disk tier), sampled at cycle starts and the end

    def sample(self, device_kv: int, device_pages: int, host_kv: int, full_kv: int) -> None:
        self.device_kv_bytes_peak = max(self.device_kv_bytes_peak, device_kv)
        self.device_pages_bytes_peak = max(self.device_pages_bytes_peak, device_pages)
        self.host_kv_bytes_peak = max(self.host_kv_bytes_peak, host_kv)
        self.full_kv_bytes_peak = max(self.full_kv_bytes_peak, full_kv)
