"""One sequence: its own history, its page table, its place in the cycle, its chunk index and output.

State has one owner. A policy is shared by any number of sequences and keeps nothing about
them; what belongs to one sequence (its host mirror, which of its pages are on the device,
where it is in its cycle, the policy's chunk index for it, its sampler) lives here.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable

import torch

from ..config import LSAConfig
from ..memory.accounting import MemoryMeter, TransferLog
from ..memory.page_table import PageTable
from ..memory.pools import HostMirror
from ..policies import SelectionPolicy
from ..policies.base import ChunkIndex, Eviction, reserve_evicting, reserve_pages
from .capture import Activations
from .sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"      # submitted, not admitted (its device pages do not fit yet)
    PREFILL = "prefill"      # admitted; the prompt is being prefilled in pieces
    DECODE = "decode"        # decoding, one token per engine step
    FINISHED = "finished"


@dataclass
class CycleRecord:
    """One cycle: where it started and what was resident."""

    step: int                 # decode step at which the cycle started
    length: int               # history tokens at the start
    pages: int                # resident pages chosen
    allowed: int              # pages the budget allowed
    resident_fraction: float = 0.0  # max over the cycle's steps of device tokens / history tokens
    page_ids: tuple[int, ...] = ()  # the resident pages
    predicted: tuple[int, ...] = ()  # pages the disk tier was asked to prefetch for the next cycle


@dataclass
class TokenEvent:
    """What a streaming callback receives after each generated token."""

    sequence: "Sequence"
    token_id: int
    text: str                 # new text since the previous event (held back while it may start a stop string)
    finished: bool
    finish_reason: str | None


class Sequence:
    """A request's state from submission to its last token."""

    def __init__(self, seq_id: int, prompt_ids: list[int], policy: SelectionPolicy, config: LSAConfig,
                 sampling: SamplingParams, max_length: int, on_token: Callable[[TokenEvent], None] | None = None,
                 eviction: Eviction | None = None):
        self.id = seq_id
        self.prompt_ids = list(prompt_ids)
        self.policy = policy
        self.config = config
        self.sampling = sampling
        self.max_length = max_length
        self.on_token = on_token
        self.eviction = eviction     # an eviction policy's decision (made at the first cycle, or carried over)
        if policy.evicts:
            self.reserved_pages = reserve_evicting(config, policy.mode, len(prompt_ids), max_length, eviction)
        else:
            self.reserved_pages = reserve_pages(config, policy.mode, max_length)
        self.status = Status.WAITING
        self.admitted = False        # holds a reservation in the device pool
        self.finish_reason: str | None = None
        self.error: Exception | None = None
        # history
        self.host: HostMirror | None = None
        self.length = 0              # committed history tokens (true positions)
        self.prefilled = 0           # prompt tokens already prefilled
        self.first_logits: torch.Tensor | None = None  # set when decoding continues a shared prefill
        self.activations: Activations | None = None  # attention inputs of the last token
        # device residency and the cycle
        self.table = PageTable()
        self.window_slot: int | None = None  # its slot in the window pool (hybrid models)
        self.window_init: tuple[torch.Tensor, torch.Tensor] | None = None  # rings to start from (a shared prefill)
        self.cycle_index: torch.Tensor | None = None  # pool positions: resident pages, then the open region
        self.resident_tokens = 0     # tokens of the complete resident pages (a prefix of cycle_index)
        self.open_start = 0          # history position where the open region starts
        self.step = 0                # decode steps taken
        self.cycle_step = 0          # decode steps in the current cycle
        self.index: ChunkIndex | None = None  # the policy's chunk index for this sequence
        self.rng = torch.Generator().manual_seed(config.seed)  # the random policy's draws
        self.sampler = sampling.generator()
        # output
        self.pending: int | None = None  # the last generated token, not yet fed to the model
        self.output_ids: list[int] = []
        self.text = ""
        self.emitted = 0             # characters of text already streamed
        # measurements
        self.cycles: list[CycleRecord] = []
        self.transfers = TransferLog()
        self.memory = MemoryMeter()
        self.prefill_seconds = 0.0
        self.decode_ms: list[float] = []
        self.scoring_seconds = 0.0   # extra forward passes a policy asked for (kvzip's reconstruction)
        self.release_prefill: Callable[[], None] | None = None
        # a conversation turn keeps its history at the end (its last tokens offloaded, its sliding rings copied)
        self.keep_history = False
        self.window_after: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def attended(self) -> int:
        """Device tokens attention reads now (resident pages plus the open region)."""
        return self.resident_tokens + self.length - self.open_start if self.cycle_index is not None else 0

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def full_kv_bytes(self) -> int:
        """What a full cache of the current history would hold."""
        return self.length * self.host.shape.bytes_per_token if self.host is not None else 0

    def __repr__(self) -> str:
        return f"Sequence(id={self.id}, status={self.status.value}, length={self.length}, policy={self.policy.name})"
