"""The cycle schedule: the one place that decides when a sequence's resident set changes.

Every sequence runs its own cycles of `tau` decode steps (boundaries are per sequence, not
aligned across the batch: a newcomer starts decoding as soon as its prefill ends instead of
waiting for everyone else's boundary, and one boundary's copies stall the batch for that
sequence's recalls only). At a boundary, `start_cycle`:
  1. offloads the tokens decoded during the last cycle from the device to the host mirror;
  2. asks the policy for the resident pages (`policies.choose_pages`: sink, tail, budget);
     the oracle's lookahead and kvzip's reconstruction, when the policy needs one, run here and
     only here; an eviction policy is asked once, and later cycles keep its `Eviction`;
  3. frees the slots of pages that leave, takes slots for pages that arrive and recalls them,
     and lays out the open region (the unfinished page and room for tau new tokens);
  4. with the disk tier (a history beyond `EngineConfig.host_memory`), names the pages the policy
     ranked next to the mirror, which reads them from disk in the background during the cycle.
Nothing moves between the device and the host inside a cycle; only that disk -> host prefetch runs.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ..memory.block_pool import BlockPool
from ..memory.mover import PageMover
from ..memory.pools import DevicePool
from ..policies import PagePlan, SelectionContext, choose_pages
from ..policies.base import Eviction
from .sequence import CycleRecord, Sequence

Probe = Callable[[Sequence], torch.Tensor]


class CycleScheduler:
    """Starts cycles for sequences that are due, and drops a finished sequence's pages."""

    def __init__(self, pool: DevicePool, blocks: BlockPool, mover: PageMover, lookahead: Probe | None = None,
                 layers: tuple[int, ...] | None = None, reconstruction: Probe | None = None,
                 prefetch_multiple: float | None = None):
        self.pool, self.blocks, self.mover, self.lookahead = pool, blocks, mover, lookahead
        self.prefetch_multiple = prefetch_multiple  # disk tier: predicted pages per budget page (None: no prefetch)
        self.reconstruction = reconstruction
        self.layers = layers  # backbone layers of the host mirror's rows (None: every layer)

    @staticmethod
    def due(seq: Sequence) -> bool:
        return seq.cycle_index is None or seq.cycle_step >= seq.config.tau

    def before_decode(self, seqs: list[Sequence]) -> None:
        """Start a cycle for every sequence whose cycle is over (or that has none yet)."""
        for seq in seqs:
            if self.due(seq):
                self.start_cycle(seq)

    def offload(self, seq: Sequence) -> None:
        """Copy the tokens decoded since the last boundary from their open pages to the host mirror."""
        with self.mover.copies():
            self._offload(seq)

    def _offload(self, seq: Sequence) -> None:
        P, pos = seq.config.page_size, seq.host.length
        while pos < seq.length:
            page, offset = divmod(pos, P)
            n = min(P - offset, seq.length - pos)
            self.mover.offload(seq.host, pos, seq.table.slot_of[page], offset, n, seq.transfers, seq.step)
            pos += n
        seq.host.length = seq.length

    def start_cycle(self, seq: Sequence) -> None:
        """Begin a cycle of `seq` now: offload new tokens, choose the resident set, recall what is missing."""
        cfg, P = seq.config, seq.config.page_size
        if seq.length == 0:
            raise RuntimeError("nothing to decode from: prefill first")
        self.offload(seq)
        n_pages = seq.length // P
        ctx = SelectionContext(config=cfg, length=seq.length, n_pages=n_pages, cycle=len(seq.cycles),
                               host_keys=seq.host.keys, activations=seq.activations, generator=seq.rng,
                               layers=self.layers)
        if seq.index is None:
            seq.index = seq.policy.new_index(ctx)
        ctx.index = seq.index
        if seq.policy.needs_lookahead and self.lookahead is not None:
            ctx.lookahead = lambda: self.lookahead(seq)
        if seq.policy.needs_reconstruction and self.reconstruction is not None:
            ctx.reconstruction = lambda: self.reconstruction(seq)
        if seq.eviction is not None:  # an eviction policy decided before: what it kept, and everything since
            pages = seq.eviction.pages(n_pages)
            plan = PagePlan(pages, len(pages))
        else:
            plan = choose_pages(seq.policy, ctx, seq.reserved_pages)
            if seq.policy.evicts:
                seq.eviction = Eviction(tuple(plan.pages), n_pages)
        open_pages = list(range(n_pages, n_pages + cfg.open_pages))
        drop, incoming = seq.table.diff(plan.pages + open_pages)
        seq.table.drop(list(drop))
        self.blocks.free(list(drop.values()))
        seq.table.assign(incoming, self.blocks.allocate(len(incoming)))
        partial = seq.length - n_pages * P
        seq.host.fetch([page for page in incoming if page <= n_pages])
        with self.mover.copies():
            for page in incoming:
                n = P if page < n_pages else (partial if page == n_pages else 0)
                if n:
                    self.mover.recall(seq.host, page * P, seq.table.slot_of[page], 0, n, seq.transfers, seq.step)
        seq.cycle_index = self.pool.token_index(seq.table.slots(plan.pages) + seq.table.slots(open_pages))
        seq.resident_tokens = len(plan.pages) * P
        seq.open_start = n_pages * P
        seq.cycle_step = 0
        predicted = self._prefetch(seq, plan)
        seq.cycles.append(CycleRecord(seq.step, seq.length, len(plan.pages), plan.allowed, seq.attended / seq.length,
                                      tuple(plan.pages), predicted))

    def _prefetch(self, seq: Sequence, plan: PagePlan) -> tuple[int, ...]:
        """Disk tier: start reading the pages the policy ranked next after the chosen ones (up to
        `prefetch_multiple` times the budget's pages in all) from disk while the cycle decodes."""
        if not seq.host.spills or self.prefetch_multiple is None:
            return ()
        extra = math.ceil((self.prefetch_multiple - 1) * plan.allowed)
        predicted = tuple(plan.ranked[:extra])
        seq.host.prefetch(list(predicted))
        seq.memory.disk_bytes_peak = max(seq.memory.disk_bytes_peak, seq.host.disk_bytes)
        return predicted

    def release(self, seq: Sequence) -> None:
        """Return every page slot of `seq` to the pool (it stops decoding)."""
        self.blocks.free(seq.table.clear())
        seq.cycle_index = None
