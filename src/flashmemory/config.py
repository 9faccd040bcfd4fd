"""Configuration of Lookahead Sparse Attention, validated at construction."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace


def _number_in(value, lo: float, hi: float) -> bool:
    """Whether `value` is a real number (int or float, not bool) in [lo, hi] (NaN is not)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and lo <= value <= hi


class ConfigError(ValueError):
    """An LSA setting that cannot work."""


@dataclass(frozen=True)
class LSAConfig:
    """How the KV history is cut, how much of it stays on the device, and how often it changes.

    Units: a *chunk* is the unit a policy scores; a *page* is the unit that is resident or
    transferred (a whole number of chunks). A *cycle* is `tau` decode steps during which the
    resident set is frozen.

    Budget: exactly one of
      - `budget`: the fraction of the history's chunks that may be on the device at any step
        (sink, tail and the tokens decoded in the current cycle included), or
      - `max_pages`: KMAX, a fixed cap on device pages (the open pages of the current cycle included).
    """

    chunk_size: int = field(default=32, metadata={"help": "tokens per chunk (the scoring unit)"})
    page_size: int = field(default=32, metadata={
        "help": "tokens per page (the residency and transfer unit, a multiple of the chunk size)"})
    tau: int = field(default=64, metadata={
        "help": "decode steps per cycle (the resident set changes only between cycles)"})
    sink_tokens: int = field(default=32, metadata={"help": "first tokens always resident"})
    tail_tokens: int = field(default=128, metadata={"help": "most recent tokens always resident"})
    budget: float | None = field(default=0.15, metadata={
        "help": "resident share of the history's chunks, sink and tail included"})
    max_pages: int | None = field(default=None, metadata={"help": "KMAX: a fixed cap on a sequence's device pages"})
    threshold: float = field(default=0.5, metadata={"help": "score above which a learned policy wants a chunk"})
    prefill_chunk: int = field(default=2048, metadata={
        "help": "tokens per prefill forward; when sequences decode beside a piece, their tokens share "
                "the forward, and the piece shrinks by EngineConfig.decode_token_weight tokens for each, and as "
                "its history grows (runtime/engine.py)"})
    seed: int = field(default=0, metadata={"help": "seed of the random policy"})
    observation_window: int = field(default=32, metadata={
        "help": "last prompt tokens whose attention inputs are kept after a prefill (snapkv's observation window)"})

    def __post_init__(self) -> None:
        for name in ("chunk_size", "page_size", "tau", "prefill_chunk", "observation_window"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ("sink_tokens", "tail_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name} must be a non-negative integer, got {value!r}")
        if self.page_size % self.chunk_size:
            raise ConfigError(
                f"page_size ({self.page_size}) must be a multiple of chunk_size ({self.chunk_size}): "
                "a page is the transfer unit made of whole chunks")
        if (self.budget is None) == (self.max_pages is None):
            raise ConfigError("give exactly one of budget (a fraction) or max_pages (KMAX)")
        if self.budget is not None and not (0.0 < float(self.budget) <= 1.0):
            raise ConfigError(f"budget must be a fraction in (0, 1], got {self.budget!r}")
        if self.max_pages is not None and (not isinstance(self.max_pages, int) or self.max_pages <= 0):
            raise ConfigError(f"max_pages must be a positive integer, got {self.max_pages!r}")
        if not (0.0 < self.threshold < 1.0):
            raise ConfigError(f"threshold must be in (0, 1), got {self.threshold!r}")
        if self.max_pages is not None and self.max_pages < self.min_pages:
            raise ConfigError(
                f"max_pages={self.max_pages} is smaller than sink + tail + the current cycle "
                f"({self.sink_pages} + {self.tail_pages} + {self.open_pages} = {self.min_pages} pages)")

    # -- derived sizes (in pages) -------------------------------------------------------------
    @property
    def chunks_per_page(self) -> int:
        return self.page_size // self.chunk_size

    @property
    def sink_pages(self) -> int:
        return math.ceil(self.sink_tokens / self.page_size)

    @property
    def tail_pages(self) -> int:
        return math.ceil(self.tail_tokens / self.page_size)

    @property
    def open_pages(self) -> int:
        """Pages spanned by the unfinished page plus the tokens decoded during one cycle."""
        return math.ceil((self.page_size - 1 + self.tau) / self.page_size)

    @property
    def min_pages(self) -> int:
        return self.sink_pages + self.tail_pages + self.open_pages

    def budget_tokens(self, history: int) -> int:
        """Tokens allowed on the device during a cycle that starts with `history` tokens.

        A fraction is taken of the history at the cycle's end (history + tau): the device
        holds the open region's new tokens too, so measured against the history at any step
        of the cycle the resident share never exceeds `budget`, and budget=1.0 keeps all.
        It is floored at the working set every policy keeps (sink + tail + one cycle,
        `min_pages`), so a short history is kept whole rather than refused; from about
        `min_pages * page_size / budget` tokens on, the fraction governs.
        """
        if self.max_pages is not None:
            return self.max_pages * self.page_size
        return max(math.floor(float(self.budget) * (history + self.tau) + 1e-9), self.min_pages * self.page_size)

    def with_(self, **changes) -> "LSAConfig":
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class EngineConfig:
    """How the engine shares one device among sequences.

    `device_memory` is the byte budget of the device KV pool for all sequences together; a
    sequence is admitted only when its reservation fits (otherwise it waits). None sizes the
    pool to what the admitted sequences need (it grows at admission, never inside a step).

    `host_memory` caps each sequence's host mirror (not the engine's total: a sequence's cap then
    never depends on what else runs, and one sequence's prefetch never evicts another's pages);
    history beyond it lives in a spill file in `spill_dir` (memory/spill.py).
    """

    device_memory: int | None = field(default=None, metadata={
        "help": "bytes of device KV for all sequences together (default: grow as sequences are admitted)"})
    max_batch: int = field(default=16, metadata={"help": "most sequences decoding together in one forward"})
    host_memory: int | None = field(default=None, metadata={
        "help": "bytes of host memory for one sequence's KV history; the rest spills to a file in spill_dir "
                "(default: the whole history in host memory)"})
    spill_dir: str | None = field(default=None, metadata={
        "help": "folder for the spill files of histories beyond host_memory (default: the system's temp folder)"})
    decode_token_weight: float = field(default=16.0, metadata={
        "help": "prompt tokens one decode token displaces from the prompt piece it shares a step with (a step's "
                "piece is prefill_chunk less this times the decode tokens, at least half a chunk). On a CPU a decode "
                "token costs 9-17 prompt tokens' time (small matrix products run far below peak), so steps with "
                "many decoding requests stay as short as steps with few; on a GPU, where decode tokens are nearly "
                "free, 1 gives the most prefill per step"})
    prefetch_multiple: float = field(default=2.0, metadata={
        "help": "pages read from disk ahead of the next cycle: the resident set plus the next-ranked pages, "
                "up to this multiple of the budget's pages"})

    def __post_init__(self) -> None:
        if self.device_memory is not None and (isinstance(self.device_memory, bool) or not isinstance(
                self.device_memory, int) or self.device_memory <= 0):
            raise ConfigError(f"device_memory must be a positive number of bytes, got {self.device_memory!r}")
        if isinstance(self.max_batch, bool) or not isinstance(self.max_batch, int) or self.max_batch <= 0:
            raise ConfigError(f"max_batch must be a positive integer, got {self.max_batch!r}")
        if self.host_memory is not None and (isinstance(self.host_memory, bool) or not isinstance(
                self.host_memory, int) or self.host_memory <= 0):
            raise ConfigError(f"host_memory must be a positive number of bytes, got {self.host_memory!r}")
        if self.spill_dir is not None and (not isinstance(self.spill_dir, str) or not self.spill_dir.strip()):
            raise ConfigError(f"spill_dir must be a folder path, got {self.spill_dir!r}")
        if not _number_in(self.decode_token_weight, 0.0, 1e6):
            raise ConfigError(f"decode_token_weight must be a number >= 0 (prompt tokens per decode token), "
                              f"got {self.decode_token_weight!r}")
        if not _number_in(self.prefetch_multiple, 1.0, 1e6):
            raise ConfigError(f"prefetch_multiple must be a number >= 1 (1: no pages beyond the resident set), "
                              f"got {self.prefetch_multiple!r}")
