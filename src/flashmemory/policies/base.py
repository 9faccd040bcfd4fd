"""The selection-policy interface and the glue that turns chunk scores into resident pages.

A policy is one small stateless class: hyperparameters (and, for learned ones, weights) only.
`score(ctx)` returns one number per selectable chunk (higher means "keep"). What a policy keeps
about one sequence between cycles (quest's key bounds, lsa's key store) is a chunk index that
the policy creates with `new_index` and the sequence owns; it comes back in `ctx.index`.
Everything common to all policies (sink and tail pages, the budget, the page cap, threshold
versus top-k) lives in `choose_pages`, so policies compare fairly.

An eviction policy (`evicts`) is scored once, at its sequence's first cycle: the pages chosen then
are an `Eviction`, and from then on the resident set is those pages plus every page that history
gains later (answers, follow-up questions); nothing dropped comes back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Literal, Protocol

import torch

from ..config import LSAConfig


class BudgetError(ValueError):
    """The budget cannot hold the pages every policy must keep."""


class ChunkIndex(Protocol):
    """Per-sequence metadata a policy keeps about chunks (owned by the sequence)."""

    @property
    def nbytes(self) -> int: ...


@dataclass
class SelectionContext:
    """What a policy may look at when a cycle of one sequence starts."""

    config: LSAConfig
    length: int                     # history tokens (true positions) at the boundary
    n_pages: int                    # complete pages, the selectable history
    cycle: int
    host_keys: torch.Tensor         # [layers, kv_heads, >=length, head_dim] post-RoPE keys (host mirror)
    activations: object | None = None  # runtime.capture.Activations of the last token
    index: ChunkIndex | None = None    # this sequence's chunk index (from policy.new_index)
    lookahead: Callable[[], torch.Tensor] | None = None  # -> [steps, layers, n_chunks] future attention mass
    # -> [layers, kv_heads, length] the most attention each history token gets while the model repeats the history
    reconstruction: Callable[[], torch.Tensor] | None = None
    generator: torch.Generator = field(default_factory=torch.Generator)
    layers: tuple[int, ...] | None = None  # backbone layer of each host_keys row (None: row i is layer i)

    @property
    def n_chunks(self) -> int:
        return self.n_pages * self.config.chunks_per_page

    @property
    def key_layers(self) -> list[int]:
        """Backbone layers whose keys `host_keys` holds, in row order."""
        return list(self.layers) if self.layers is not None else list(range(self.host_keys.shape[0]))


class SelectionPolicy:
    """Base class. Subclasses set `name` and implement `score`."""

    name: ClassVar[str] = "base"
    #: "topk" fills the budget by score; "threshold" keeps only chunks scoring above
    #: config.threshold (page score = how many of its chunks pass); "all" keeps everything.
    mode: ClassVar[Literal["topk", "threshold", "all"]] = "topk"
    keep_sink: ClassVar[bool] = True
    needs_lookahead: ClassVar[bool] = False  # decodes ahead (only LSAEngine can provide it)
    needs_reconstruction: ClassVar[bool] = False  # reads ctx.reconstruction (only LSAEngine can provide it)
    evicts: ClassVar[bool] = False  # decides once at the first cycle and never recalls (see `Eviction`)

    def bind(self, model) -> None:
        """Called with the backbone (a transformers model) before its first sequence.

        Learned policies load or check what belongs to this backbone here
        (`flashmemory.models.loader.fingerprint(model.config)` names it)."""

    def new_index(self, ctx: SelectionContext) -> ChunkIndex | None:
        """A fresh chunk index for a new sequence (None: this policy keeps none)."""
        return None

    def score(self, ctx: SelectionContext) -> torch.Tensor:
        """One score per selectable chunk, shape [ctx.n_chunks]."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


@dataclass(frozen=True)
class PagePlan:
    """The resident set chosen for one cycle."""

    pages: list[int]
    allowed: int       # how many resident pages the budget allows this cycle
    ranked: tuple[int, ...] = ()  # the pages not chosen, best first (the disk tier prefetches the first ones)


@dataclass(frozen=True)
class Eviction:
    """An eviction policy's one decision: of the first `n_pages` pages, only `kept` stay; later pages all stay."""

    kept: tuple[int, ...]
    n_pages: int

    def pages(self, n_pages: int) -> list[int]:
        """The resident pages when history has `n_pages` complete pages."""
        return list(self.kept) + list(range(self.n_pages, n_pages))

    @property
    def evicted(self) -> list[int]:
        return sorted(set(range(self.n_pages)) - set(self.kept))

    def positions(self, length: int, page_size: int) -> torch.Tensor:
        """History positions (of the first `length` tokens) that remain visible."""
        kept = torch.tensor(self.kept, dtype=torch.long)[:, None] * page_size + torch.arange(page_size)
        return torch.cat([kept.flatten(), torch.arange(self.n_pages * page_size, length)])


def reserve_evicting(config: LSAConfig, mode: str, decided_at: int, max_length: int,
                     eviction: Eviction | None = None) -> int:
    """Device pages of an eviction policy's sequence: what it keeps at its decision (made at `decided_at`
    tokens, or already made: `eviction`), plus every page up to `max_length`."""
    if eviction is not None:
        return len(eviction.kept) + math.ceil(max_length / config.page_size) - eviction.n_pages + config.open_pages
    later = math.ceil(max(0, max_length - decided_at) / config.page_size)
    return reserve_pages(config, mode, decided_at) + later


def reserve_pages(config: LSAConfig, mode: str, max_length: int) -> int:
    """Device pages a sequence may ever hold: its resident cap at `max_length` tokens plus its open region."""
    if mode == "all":
        pages = max_length // config.page_size + config.open_pages
    elif config.max_pages is not None:
        pages = config.max_pages
    else:
        pages = config.budget_tokens(max_length) // config.page_size + config.open_pages
    return max(pages, config.open_pages + 1)


def allowed_pages(config: LSAConfig, length: int, capacity_pages: int) -> int:
    """Resident (complete) pages the budget allows for a cycle starting at `length` tokens."""
    open_tokens = length % config.page_size + config.tau
    by_budget = (config.budget_tokens(length) - open_tokens) // config.page_size
    return max(0, min(by_budget, capacity_pages - config.open_pages))


def choose_pages(policy: SelectionPolicy, ctx: SelectionContext, capacity_pages: int) -> PagePlan:
    """Sink + tail + the best-scoring pages, within the budget."""
    cfg, n = ctx.config, ctx.n_pages
    if policy.mode == "all":
        return PagePlan(list(range(n)), n)
    allowed = allowed_pages(cfg, ctx.length, capacity_pages)
    if n <= allowed:
        return PagePlan(list(range(n)), allowed)
    sink = set(range(min(cfg.sink_pages, n))) if policy.keep_sink else set()
    tail = set(range(max(0, n - cfg.tail_pages), n))
    forced = sink | tail
    if len(forced) > allowed:
        need = (len(forced) * cfg.page_size + ctx.length % cfg.page_size + cfg.tau)
        have = cfg.budget_tokens(ctx.length)
        raise BudgetError(
            f"budget of {have} tokens at a {ctx.length}-token history is smaller than sink + tail + "
            f"one cycle ({need} tokens); raise the budget or lower sink_tokens/tail_tokens")
    scores = policy.score(ctx).float().flatten()
    if scores.numel() != ctx.n_chunks:
        raise RuntimeError(f"{policy.name} scored {scores.numel()} chunks, expected {ctx.n_chunks}")
    per_page = scores.reshape(n, cfg.chunks_per_page)
    if policy.mode == "threshold":
        votes = (per_page > cfg.threshold).sum(-1).float()
        # density first (the paper's page score), best chunk second
        page_score = votes + per_page.max(-1).values.clamp(0, 1) * 1e-3
        eligible = votes > 0
    else:
        page_score, eligible = per_page.max(-1).values, torch.ones(n, dtype=torch.bool)
    if forced:
        eligible[list(forced)] = False
    candidates = torch.nonzero(eligible).flatten()
    # ties go to newer pages: sort by (score, page index) descending
    values = page_score.tolist()
    order = sorted(candidates.tolist(), key=lambda p: (values[p], p), reverse=True)
    chosen = order[: allowed - len(forced)]
    return PagePlan(sorted(forced | set(chosen)), allowed, tuple(order[allowed - len(forced):]))
