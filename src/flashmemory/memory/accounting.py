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

    def recall(self, nbytes: int, step: int) -> None:
        self.recalls += 1
        self.recall_bytes += nbytes
        self.steps.append(step)

    def offload(self, nbytes: int, step: int) -> None:
        self.offloads += 1
        self.offload_bytes += nbytes
        self.steps.append(step)

    def to_dict(self) -> dict:
        return {"recalls": self.recalls, "recall_bytes": self.recall_bytes,
                "offloads": self.offloads, "offload_bytes": self.offload_bytes,
                "count": self.recalls + self.offloads, "bytes": self.recall_bytes + self.offload_bytes}


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

    def sample(self, device_kv: int, device_pages: int, host_kv: int, full_kv: int) -> None:
        self.device_kv_bytes_peak = max(self.device_kv_bytes_peak, device_kv)
        self.device_pages_bytes_peak = max(self.device_pages_bytes_peak, device_pages)
        self.host_kv_bytes_peak = max(self.host_kv_bytes_peak, host_kv)
        self.full_kv_bytes_peak = max(self.full_kv_bytes_peak, full_kv)
