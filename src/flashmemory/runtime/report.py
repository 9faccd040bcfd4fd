"""What a finished sequence reports: measured memory, transfers and timings."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from .sequence import Sequence

if TYPE_CHECKING:
    from .conversation import Conversation


@dataclass
class GenerationReport:
    """Measured memory, transfers and timings of one sequence."""

    policy: str
    prompt_tokens: int
    new_tokens: int
    finish_reason: str | None
    cycles: int
    resident_fraction_per_cycle: list[float]
    resident_fraction_mean: float
    resident_fraction_max: float
    resident_pages_per_cycle: list[int]
    resident_page_ids: list[list[int]]  # the resident pages of every cycle
    evicted_pages: list[int]           # an eviction policy's dropped pages (never read after its decision)
    device_kv_bytes_peak: int          # bytes of the tokens attention read on the device (peak over steps)
    device_pages_bytes_peak: int       # bytes of the pool pages this sequence held (open pages' room included)
    device_kv_bytes_reserved: int      # bytes of the pool pages reserved for it at admission
    host_kv_bytes_peak: int            # history bytes in its host mirror (peak)
    host_kv_bytes_reserved: int
    disk_bytes_peak: int               # its spill file on disk (the disk tier; 0 when the history fits host_memory)
    disk_reads: int                    # reads from the spill file (prefetches, misses, index builds)
    disk_read_bytes: int
    prefetch_hits: int                 # recalls served by a page the background prefetch had read
    prefetch_misses: int               # recalls that read their page from disk at the boundary
    full_kv_bytes: int                 # a full cache of the final history (tiered layers)
    tiered_layers: list[int]           # the layers whose history is tiered (the others keep a sliding window)
    device_window_bytes: int           # the sliding layers' windows on the device (hybrid models)
    model_kv_share: float              # device KV (peak attended + windows) / (full tiered history + windows)
    prefill_device_kv_bytes_peak: int  # transient device KV of one dense layer during prefill
    index_bytes: int                   # the policy's chunk index (lsa's key store, quest's min/max), measured
    transfers: dict
    transfer_steps: list[int]          # decode step of every transfer (all at cycle starts)
    prefill_seconds: float
    scoring_forward_seconds: float     # extra forward passes a policy ran to score chunks (kvzip's reconstruction)
    decode_seconds: float
    decode_ms_per_token: float
    decode_ms: list[float]             # wall time of every decode step (a cycle start included where one fell)
    config: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def of(cls, seq: Sequence, page_bytes: int, tiered_layers: list[int]) -> "GenerationReport":
        fractions = [c.resident_fraction for c in seq.cycles]
        mem = seq.memory
        whole = mem.full_kv_bytes_peak + mem.window_bytes
        return cls(
            policy=seq.policy.name, prompt_tokens=len(seq.prompt_ids), new_tokens=len(seq.output_ids),
            finish_reason=seq.finish_reason, cycles=len(seq.cycles), resident_fraction_per_cycle=fractions,
            resident_fraction_mean=sum(fractions) / len(fractions) if fractions else 0.0,
            resident_fraction_max=max(fractions) if fractions else 0.0,
            resident_pages_per_cycle=[c.pages for c in seq.cycles],
            resident_page_ids=[list(c.page_ids) for c in seq.cycles],
            evicted_pages=seq.eviction.evicted if seq.eviction is not None else [],
            device_kv_bytes_peak=mem.device_kv_bytes_peak, device_pages_bytes_peak=mem.device_pages_bytes_peak,
            device_kv_bytes_reserved=seq.reserved_pages * page_bytes,
            host_kv_bytes_peak=mem.host_kv_bytes_peak, host_kv_bytes_reserved=mem.host_reserved_bytes,
            disk_bytes_peak=mem.disk_bytes_peak, disk_reads=seq.transfers.disk_reads,
            disk_read_bytes=seq.transfers.disk_read_bytes, prefetch_hits=seq.transfers.prefetch_hits,
            prefetch_misses=seq.transfers.prefetch_misses,
            full_kv_bytes=mem.full_kv_bytes_peak, tiered_layers=list(tiered_layers),
            device_window_bytes=mem.window_bytes,
            model_kv_share=(mem.device_kv_bytes_peak + mem.window_bytes) / whole if whole else 0.0,
            prefill_device_kv_bytes_peak=mem.dense_device_peak,
            index_bytes=int(seq.index.nbytes) if seq.index is not None else 0,
            transfers=seq.transfers.to_dict(), transfer_steps=list(seq.transfers.steps),
            prefill_seconds=seq.prefill_seconds, scoring_forward_seconds=seq.scoring_seconds,
            decode_seconds=sum(seq.decode_ms) / 1000.0,
            decode_ms_per_token=sum(seq.decode_ms) / max(1, len(seq.decode_ms)), decode_ms=list(seq.decode_ms),
            config=seq.config.to_dict())


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    report: GenerationReport
    conversation: "Conversation | None" = None  # set by `LSAEngine.ask`: continue with ask(result, question)

    @property
    def finish_reason(self) -> str | None:
        return self.report.finish_reason
