"""The two-tier KV cache, as a transformers `Cache` so stock attention code runs unchanged.

Two modes:
  - dense (prefill, or any multi-token forward): new K/V go to the host mirror and every
    layer attends over the whole history, one layer at a time, so device memory for KV
    never exceeds one layer of the full cache;
  - sparse (decoding): every layer attends over the device reserve only, which holds
    [resident pages][open region]. The open region holds the unfinished page and the tokens
    decoded in this cycle. Every `tau` steps a cycle starts: the open region is copied to
    the host, the policy picks the resident pages, and missing pages are recalled.
Keys are cached after RoPE, so attending to a subset of tokens keeps their true positions;
`get_seq_length` always reports the true history length.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..config import LSAConfig
from ..memory.accounting import MemoryMeter, TransferLog
from ..memory.page_table import PageTable
from ..memory.pools import DeviceReserve, HostMirror, KVShape
from ..policies import SelectionContext, SelectionPolicy, choose_pages, make_policy
from .capture import ActivationRecorder


class ContextLengthError(ValueError):
    """More tokens than the cache (or the model) can hold."""


@dataclass
class CycleRecord:
    """One cycle: where it started and what was resident."""

    step: int                 # decode step at which the cycle started
    length: int               # history tokens at the start
    pages: int                # resident pages chosen
    allowed: int              # pages the budget allowed
    resident_fraction: float = 0.0  # max over the cycle's steps of device tokens / history tokens


@dataclass
class CacheStats:
    cycles: list[CycleRecord] = field(default_factory=list)
    transfers: TransferLog = field(default_factory=TransferLog)
    memory: MemoryMeter = field(default_factory=MemoryMeter)
    dense_stream_bytes: int = 0   # host->device reads of dense (prefill) forwards under CUDA
    dense_device_peak: int = 0    # largest transient device KV of a dense forward (one layer)


class _LayerView(CacheLayerMixin):
    """Per-layer facade so `Cache` helpers that iterate `layers` keep working."""

    is_sliding = False

    def __init__(self, owner: "LSACache"):
        super().__init__()
        self._owner = owner
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:  # storage is owned by LSACache
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        raise RuntimeError("LSACache.update routes by layer index")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self._owner._mask_length(query_length), 0

    def get_seq_length(self) -> int:
        return self._owner.length

    def get_max_length(self) -> int:
        return self._owner.max_length

    def reset(self) -> None:
        pass


class LSACache(Cache):
    """A transformers Cache that keeps every token on the host and a budgeted subset on the device.

    Use it through `LSAEngine` (prefill sharing, the oracle, reports), or directly:

        cache = LSACache(model, LSAConfig(budget=0.15), policy="quest")
        model.generate(**inputs, past_key_values=cache, do_sample=False)
        cache.report()

    Batch size 1. `max_length` bounds prompt + generated tokens (default: the model's context).
    """

    def __init__(self, model: torch.nn.Module, config: LSAConfig | None = None,
                 policy: str | SelectionPolicy = "full", max_length: int | None = None,
                 recorder: ActivationRecorder | None = None):
        cfg = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
        self.config = config or LSAConfig()
        self.policy = make_policy(policy)
        self.model = model
        n_layers = cfg.num_hidden_layers
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        param = next(model.parameters())
        self.device = param.device
        self.shape = KVShape(n_layers, cfg.num_key_value_heads, head_dim, param.dtype)
        model_max = int(getattr(cfg, "max_position_embeddings", 0) or 0)
        self.max_length = int(max_length or model_max)
        if self.max_length <= 0:
            raise ContextLengthError("max_length must be positive")
        if model_max and self.max_length > model_max:
            raise ContextLengthError(f"max_length {self.max_length} exceeds the model's context of {model_max} tokens")
        super().__init__(layers=[_LayerView(self) for _ in range(n_layers)])
        self._own_recorder = recorder is None and self.policy.needs_queries
        self.recorder = recorder or (ActivationRecorder(model) if self._own_recorder else None)
        self.host = HostMirror(self.shape, self.max_length, self.device)
        self.reserve: DeviceReserve | None = None
        self.table: PageTable | None = None
        self.length = 0            # committed history tokens (true positions)
        self.sparse = False        # decoding from the reserve
        self._active = 0           # tokens in the reserve's attended prefix (resident pages + open region)
        self._open_start = 0       # history position of the first token of the open region
        self._step = 0             # decode steps taken
        self._cycle_step = 0       # decode steps in the current cycle
        self._prepared_for = -1    # history length for which the next forward was prepared
        self._force_dense = 0
        self._lookahead: Callable[[], torch.Tensor] | None = None
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._generator = torch.Generator().manual_seed(self.config.seed)
        self.stats = CacheStats()
        self.stats.memory.host_reserved_bytes = self.host.allocated_bytes
        self.policy.bind(model)
        self.policy.reset()

    # ------------------------------------------------------------------ transformers Cache API
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.max_length

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self._mask_length(query_length), 0

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return False

    @property
    def batch_size(self) -> int:
        return 1

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if key_states.shape[0] != 1:
            raise ValueError(f"LSACache supports batch size 1, got {key_states.shape[0]}")
        q_len = key_states.shape[-2]
        if layer_idx == 0:
            self._prepare(q_len)
        if self.sparse:
            self.reserve.write(layer_idx, self._active, key_states, value_states)
            out = self.reserve.layer_view(layer_idx, self._active + q_len)
        else:
            out = self._dense_update(layer_idx, key_states, value_states)
        if layer_idx == self.shape.layers - 1:
            self._commit(q_len)
        return out

    def reset(self) -> None:
        self.rewind(0)

    # ------------------------------------------------------------------ modes and cycles
    def _mask_length(self, q_len: int) -> int:
        self._prepare(q_len)
        return (self._active if self.sparse else self.length) + q_len

    def _prepare(self, q_len: int) -> None:
        """Decide the mode of the coming forward; start a cycle when one is due."""
        if self._prepared_for == self.length:
            return
        if self.length + q_len > self.max_length:
            raise ContextLengthError(
                f"{self.length + q_len} tokens exceed the cache's max_length of {self.max_length}")
        if q_len > 1 or self._force_dense:
            if self.sparse:
                self._leave_sparse()
        elif not self.sparse or self._cycle_step >= self.config.tau:
            self.start_cycle()
        self._prepared_for = self.length

    def _dense_update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        self.host.write(layer, self.length, k, v)
        k_all, v_all = self.host.layer_view(layer, self.length + k.shape[-2])
        if self.device.type != "cpu":  # one layer of the history visits the device at a time
            k_all, v_all = k_all.to(self.device, non_blocking=True), v_all.to(self.device, non_blocking=True)
            self.stats.dense_stream_bytes += 2 * k_all.nbytes
        self.stats.dense_device_peak = max(self.stats.dense_device_peak, 2 * k_all.nbytes)
        return k_all, v_all

    def _commit(self, q_len: int) -> None:
        self.length += q_len
        if self.sparse:
            self._active += q_len
            self._step += 1
            self._cycle_step += 1
            frac = self._active / self.length
            cycle = self.stats.cycles[-1]
            cycle.resident_fraction = max(cycle.resident_fraction, frac)
            self.stats.memory.sample(self.device_kv_bytes, self.host_kv_bytes, self.full_kv_bytes)
        else:
            self.host.length = self.length
            self.stats.memory.sample(0, self.host_kv_bytes, self.full_kv_bytes)

    def _allocate_reserve(self) -> None:
        cfg = self.config
        if self.policy.mode == "all":
            pages = self.max_length // cfg.page_size + cfg.open_pages
        elif cfg.max_pages is not None:
            pages = cfg.max_pages
        else:
            pages = cfg.budget_tokens(self.max_length) // cfg.page_size + cfg.open_pages
        pages = max(pages, cfg.open_pages + 1)
        if self.reserve is None or self.reserve.capacity_pages != pages:
            self.reserve = DeviceReserve(self.shape, pages, cfg.page_size, self.device)
            self.stats.memory.device_reserved_bytes = self.reserve.allocated_bytes
        self.table = PageTable(pages - cfg.open_pages)

    def _copy_scope(self):
        if self._stream is None:
            return contextlib.nullcontext()
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        return torch.cuda.stream(self._stream)

    def _sync_copies(self) -> None:
        if self._stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self._stream)
            self._stream.synchronize()  # the host side (policies) may read the mirror next

    def _flush_open_region(self) -> None:
        """Copy the tokens decoded since the last cycle from the device to the host mirror."""
        n_new = self.length - self.host.length
        if n_new <= 0:
            return
        src = self._active - (self.length - self.host.length)
        with self._copy_scope():
            nbytes = self.host.copy_from(self.reserve, src, self.host.length, n_new, non_blocking=True)
        self._sync_copies()
        self.stats.transfers.offload(nbytes, self._step)
        self.host.length = self.length

    def _leave_sparse(self) -> None:
        self._flush_open_region()
        self.sparse = False
        self._active = 0
        self.table.clear()

    def start_cycle(self, lookahead: Callable[[], torch.Tensor] | None = None) -> None:
        """Begin a cycle now: offload new tokens, choose the resident set, recall what is missing."""
        cfg = self.config
        if self.length == 0:
            raise RuntimeError("nothing to decode from: run a prefill first")
        if self._stream is not None:  # dense writes to the pinned mirror are asynchronous; policies read it
            torch.cuda.current_stream(self.device).synchronize()
        if self.sparse:
            self._flush_open_region()
        else:
            self._allocate_reserve()
        n_pages = self.length // cfg.page_size
        ctx = SelectionContext(config=cfg, length=self.length, n_pages=n_pages, cycle=len(self.stats.cycles),
                               host_keys=self.host.k, recorder=self.recorder,
                               lookahead=lookahead or self._lookahead, generator=self._generator)
        plan = choose_pages(self.policy, ctx, self.reserve.capacity_pages)
        moves = self.table.plan(plan.pages)
        P = cfg.page_size
        with self._copy_scope():
            for mv in moves:
                if mv.source == "host":
                    nbytes = self.reserve.copy_from(self.host, mv.page * P, mv.slot * P, P, non_blocking=True)
                    self.stats.transfers.recall(nbytes, self._step)
                else:
                    self.reserve.move(mv.from_slot * P, mv.slot * P, P)
            # The unfinished page opens the new cycle's region right after the resident pages.
            self._open_start = n_pages * P
            partial = self.length - self._open_start
            resident_tokens = len(self.table) * P
            if partial:
                nbytes = self.reserve.copy_from(self.host, self._open_start, resident_tokens, partial, non_blocking=True)
                self.stats.transfers.recall(nbytes, self._step)
        self._sync_copies()
        self._active = resident_tokens + partial
        self.sparse = True
        self._cycle_step = 0
        self._prepared_for = self.length
        self.stats.cycles.append(CycleRecord(self._step, self.length, len(plan.pages), plan.allowed,
                                             self._active / self.length))

    @contextlib.contextmanager
    def dense_scope(self):
        """Force dense attention over the whole history (used to decode ahead for the oracle)."""
        if self.sparse:
            self._flush_open_region()
        was_sparse, self.sparse = self.sparse, False  # the reserve and page table stay as they are
        self._force_dense += 1
        self._prepared_for = -1
        try:
            yield
        finally:
            self._force_dense -= 1
            self.sparse = was_sparse
            self._prepared_for = -1

    def rewind(self, length: int) -> None:
        """Forget everything after the first `length` tokens (leaves decoding unless in a dense scope)."""
        if self.sparse:
            self._leave_sparse()
        if length > self.host.length:
            raise ValueError(f"cannot rewind to {length}: only {self.host.length} tokens are cached")
        self.length = self.host.length = length
        self._prepared_for = -1

    def restart(self, policy: str | SelectionPolicy | None = None, config: LSAConfig | None = None) -> None:
        """Start a new generation from the current history with fresh counters."""
        if policy is not None:
            self.policy = make_policy(policy)
            self.policy.bind(self.model)
        if config is not None:
            self.config = config
        if self.policy.needs_queries and self.recorder is None:
            self.recorder, self._own_recorder = ActivationRecorder(self.model), True
        self.policy.reset()
        self.reserve, self.table, self.sparse, self._active = None, None, False, 0
        self._step = self._cycle_step = 0
        self._prepared_for = -1
        self._generator = torch.Generator().manual_seed(self.config.seed)
        self.stats = CacheStats()
        self.stats.memory.host_reserved_bytes = self.host.allocated_bytes

    def close(self) -> None:
        """Remove the hooks this cache installed on the model."""
        if self._own_recorder and self.recorder is not None:
            self.recorder.close()
            self.recorder = None

    # ------------------------------------------------------------------ measured sizes
    @property
    def device_kv_bytes(self) -> int:
        """Bytes of KV that attention reads on the device now (resident pages + open region)."""
        if not self.sparse:
            return 0
        k, v = self.reserve.k[:, :, : self._active], self.reserve.v[:, :, : self._active]
        return k.nbytes + v.nbytes

    @property
    def host_kv_bytes(self) -> int:
        return self.host.k[:, :, : self.host.length].nbytes + self.host.v[:, :, : self.host.length].nbytes

    @property
    def full_kv_bytes(self) -> int:
        """What a full cache of the current history would hold."""
        return self.length * self.shape.bytes_per_token

    @property
    def resident_pages(self) -> list[int]:
        return self.table.resident if self.table is not None else []
