"""The tiered KV cache as a transformers `Cache`: one layer object per attention layer, and a
step plan that says what the coming forward does.

Three kinds of forward:
  - dense (a prefill piece, or the oracle decoding ahead) for one sequence: its new K/V go to
    its host mirror and the layer attends over its whole history, one layer at a time, so device
    memory for KV never exceeds one layer of that history;
  - decode, one token for each of B sequences: each row's new K/V go to its open page in the
    shared device pool, and the layer attends over the row's resident pages and open region,
    gathered in history order (rows of different lengths are padded and masked);
  - mixed: both in one forward, the B decode tokens then the piece packed in one row, so the
    linear layers run once for all of them; each layer returns `Segments` and
    `mixed_attention.segmented_attention` attends per segment.
Two kinds of layer: a `TieredLayer` (global attention) works as above; a `WindowLayer` (sliding
attention, hybrid models) keeps only its last `window` tokens, in a ring of one slot per sequence
in the window pool, and attends over them: its cost stays flat however long the history.
`Cache.update` is transformers' plain dispatch to `self.layers[layer_idx]`. Keys are cached
after RoPE, so attending to a subset of tokens keeps their true positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..memory.pools import DevicePool, LayerLayout
from .sequence import Sequence


class ContextLengthError(ValueError):
    """More tokens than the cache (or the model) can hold."""


@dataclass
class StepPlan:
    """What the coming forward does."""

    dense: bool
    seqs: list[Sequence]
    start: int = 0                            # dense: history position of the first new token
    q_len: int = 1
    kv_length: int = 0                        # keys each row attends to (the padded length in a batch)
    write_pos: torch.Tensor | None = None     # decode: pool position of each row's new token [B]
    gather: torch.Tensor | None = None        # decode: pool positions each row attends to [B, kv_length]
    attention_mask: torch.Tensor | dict | None = None  # decode with rows of different lengths ([B, 1, 1, T])
    position_ids: torch.Tensor | None = None  # [B, q_len] true positions
    attend: torch.Tensor | None = None        # sparse dense: host positions attended, the new tokens last (None: all)
    # sliding layers: ring positions in the window pool
    window_length: int = 0                    # keys a row attends to (padded length in a batch)
    window_offset: int = 0                    # history position of the first of them (one sequence)
    window_read: torch.Tensor | None = None   # dense: ring positions of the tokens before `start` [n]
    window_store: torch.Tensor | None = None  # dense: ring positions for the last new tokens [m]
    window_write: torch.Tensor | None = None  # decode: ring position of each row's new token [B]
    window_gather: torch.Tensor | None = None  # decode: ring positions each row attends to [B, window_length]


@dataclass
class MixedPlan:
    """A mixed forward: the decode rows' plan, then a dense piece's plan, packed as one row of tokens."""

    decode: StepPlan
    dense: StepPlan

    @property
    def rows(self) -> int:
        """Decode tokens packed before the piece."""
        return len(self.decode.seqs)


@dataclass
class Segments:
    """What a layer's `update` returns in a mixed forward: the decode rows' keys (or values)
    [B, kv_heads, T, head_dim] with their mask, then the piece's [1, kv_heads, n, head_dim] with its."""

    decode: torch.Tensor
    piece: torch.Tensor
    decode_mask: torch.Tensor | None = None
    piece_mask: torch.Tensor | None = None


def _window_mask(start: int, n: int, first_key: int, window: int) -> torch.Tensor:
    """[1, 1, n, keys] mask of n queries at positions start.. over keys at first_key..start+n-1: each
    query sees the keys at or before it and less than `window` tokens back."""
    kv = torch.arange(first_key, start + n)[None]
    q = torch.arange(start, start + n)[:, None]
    return ((kv <= q) & (kv > q - window))[None, None]


def _pick_mask(mask: torch.Tensor | dict | None, sliding: bool) -> torch.Tensor | None:
    if isinstance(mask, dict):
        return mask["sliding_attention" if sliding else "full_attention"]
    return mask


class _PlannedLayer(CacheLayerMixin):
    """A layer that does what the cache's step plan says; `row` is its index among the layers of its kind."""

    def __init__(self, cache: "TieredCache", layer: int, row: int):
        super().__init__()
        self.cache = cache
        self.layer = layer
        self.row = row
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Storage (the device pools, the sequences' host mirrors) is allocated up front."""

    def _plan(self) -> StepPlan | MixedPlan:
        if self.cache.plan is None:
            raise RuntimeError("TieredCache used without a step plan: run it through LSAEngine or LSACache")
        return self.cache.plan

    def get_seq_length(self) -> int:
        plan = self.cache.plan
        if plan is None:
            return 0
        if isinstance(plan, MixedPlan):
            plan = plan.dense
        return plan.start if plan.dense else plan.seqs[0].length

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        plan = self._plan()
        if isinstance(plan, MixedPlan):  # [1, kv_heads, B + n, head_dim]: B decode tokens, then the piece
            b = plan.rows
            rows_k = key_states[0, :, :b].transpose(0, 1).unsqueeze(2)
            rows_v = value_states[0, :, :b].transpose(0, 1).unsqueeze(2)
            k, v = self._decode(plan.decode, rows_k, rows_v)
            pk, pv = self._dense(plan.dense, key_states[:, :, b:], value_states[:, :, b:])
            keys = Segments(k, pk, _pick_mask(plan.decode.attention_mask, self.is_sliding),
                            _pick_mask(plan.dense.attention_mask, self.is_sliding))
            return keys, Segments(v, pv)
        if plan.dense:
            return self._dense(plan, key_states, value_states)
        return self._decode(plan, key_states, value_states)

    def _rows(self, plan: StepPlan) -> tuple[DevicePool, torch.Tensor, torch.Tensor, int]:
        """A decode plan's pool for this kind of layer, each row's write position, gather index and padded length."""
        raise NotImplementedError

    def _decode(self, plan: StepPlan, key_states: torch.Tensor, value_states: torch.Tensor):
        """Write each row's new token to the pool; gather the keys and values every row attends to."""
        pool, write, index, length = self._rows(plan)
        pool.write_rows(self.row, write, key_states, value_states)
        k, v = self.cache.scratch(len(plan.seqs), length)
        pool.gather(self.row, index, k, v)
        return k, v

    def reset(self) -> None:
        """Sequences own their state; there is nothing per layer to reset."""


class TieredLayer(_PlannedLayer):
    """A global attention layer: its history lives in host mirrors and its resident pages in the device pool."""

    is_sliding = False

    def _dense(self, plan: StepPlan, key_states: torch.Tensor, value_states: torch.Tensor):
        pool = self.cache.pool
        seq = plan.seqs[0]
        seq.host.write(self.row, plan.start, key_states[0], value_states[0])
        k, v = seq.host.layer_view(self.row, plan.start + plan.q_len)
        if plan.attend is not None:  # only the kept history (an eviction policy's follow-up prompt)
            k, v = k.index_select(2, plan.attend), v.index_select(2, plan.attend)
        if pool.device.type != "cpu":  # one layer of this history visits the device at a time
            k, v = k.to(pool.device, non_blocking=True), v.to(pool.device, non_blocking=True)
        seq.memory.dense_device_peak = max(seq.memory.dense_device_peak, k.nbytes + v.nbytes)
        return k, v

    def _rows(self, plan: StepPlan) -> tuple[DevicePool, torch.Tensor, torch.Tensor, int]:
        return self.cache.pool, plan.write_pos, plan.gather, plan.kv_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cache.plan.kv_length, 0

    def get_max_length(self) -> int:
        return -1


class WindowLayer(_PlannedLayer):
    """A sliding-window layer: a ring of the last `window` tokens per sequence, never tiered."""

    is_sliding = True

    def _dense(self, plan: StepPlan, key_states: torch.Tensor, value_states: torch.Tensor):
        pool = self.cache.window_pool
        k_ring, v_ring = pool.k[self.row], pool.v[self.row]
        k = torch.cat([k_ring[:, plan.window_read][None], key_states], dim=2)  # the window before, then the new
        v = torch.cat([v_ring[:, plan.window_read][None], value_states], dim=2)
        m = plan.window_store.numel()
        k_ring.index_copy_(1, plan.window_store, key_states[0, :, -m:])
        v_ring.index_copy_(1, plan.window_store, value_states[0, :, -m:])
        return k, v

    def _rows(self, plan: StepPlan) -> tuple[DevicePool, torch.Tensor, torch.Tensor, int]:
        return self.cache.window_pool, plan.window_write, plan.window_gather, plan.window_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cache.plan.window_length, self.cache.plan.window_offset

    def get_max_length(self) -> int:
        return self.cache.window_pool.page_size


class TieredCache(Cache):
    """The layers plus the plan of the coming forward and a reusable attention buffer."""

    def __init__(self, pool: DevicePool, layout: LayerLayout, window_pool: DevicePool | None = None):
        self.pool = pool
        self.layout = layout
        self.window_pool = window_pool
        self.plan: StepPlan | None = None
        self._buf_k = self._buf_v = torch.empty(0, dtype=pool.shape.dtype, device=pool.device)
        n = len(layout.tiered) + len(layout.sliding)
        super().__init__(layers=[WindowLayer(self, i, layout.row(i)) if i in layout.sliding
                                 else TieredLayer(self, i, layout.row(i)) for i in range(n)])

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def scratch_bytes(self) -> int:
        """Bytes of the attention buffer (one layer of the current batch's attended K/V, reused by every layer)."""
        return self._buf_k.untyped_storage().nbytes() + self._buf_v.untyped_storage().nbytes()

    def scratch(self, rows: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Contiguous [rows, kv_heads, length, head_dim] buffers; they grow geometrically, never per step."""
        s = self.pool.shape
        n = rows * s.kv_heads * length * s.head_dim
        if n > self._buf_k.numel():
            cap = max(n, 2 * self._buf_k.numel())
            self._buf_k = torch.empty(cap, dtype=s.dtype, device=self.pool.device)
            self._buf_v = torch.empty(cap, dtype=s.dtype, device=self.pool.device)
        shape = (rows, s.kv_heads, length, s.head_dim)
        return self._buf_k[:n].view(shape), self._buf_v[:n].view(shape)

    # ------------------------------------------------------------------ step plans
    def plan_dense(self, seq: Sequence, start: int, n: int, kept: torch.Tensor | None = None) -> StepPlan:
        """A dense forward of n tokens of one sequence at history position `start`, over its whole history,
        or (`kept`: sorted host positions before `start`) over those positions only: a sparse prefill."""
        if start + n > seq.host.capacity:
            raise ContextLengthError(f"{start + n} tokens exceed the sequence's max_length of {seq.host.capacity}")
        device = self.pool.device
        self.plan = StepPlan(True, [seq], start=start, q_len=n, kv_length=start + n,
                             position_ids=torch.arange(start, start + n, device=device)[None])
        if kept is not None:
            new = torch.arange(start, start + n)
            self.plan.attend = torch.cat([kept.long(), new])
            self.plan.kv_length = self.plan.attend.numel()
            causal = new[None, :] <= new[:, None]  # [n, n]
            self.plan.attention_mask = torch.cat([torch.ones(n, kept.numel(), dtype=torch.bool), causal],
                                                 1)[None, None].to(device)
        if self.window_pool is not None:
            W, base = self.window_pool.page_size, seq.window_slot * self.window_pool.page_size
            before = min(start, W - 1)
            stored = min(n, W)
            self.plan.window_length, self.plan.window_offset = before + n, start - before
            self.plan.window_read = torch.tensor([base + p % W for p in range(start - before, start)],
                                                 dtype=torch.long, device=device)
            self.plan.window_store = torch.tensor([base + p % W for p in range(start + n - stored, start + n)],
                                                  dtype=torch.long, device=device)
            if kept is not None:  # explicit masks for both kinds of layer
                sliding = _window_mask(start, n, start - before, W).to(device)
                self.plan.attention_mask = {"full_attention": self.plan.attention_mask, "sliding_attention": sliding}
        return self.plan

    def plan_decode(self, seqs: list[Sequence]) -> StepPlan:
        """One decode token for every sequence (each must be inside a cycle, see `cycles.CycleScheduler`)."""
        device = self.pool.device
        lengths = [s.attended + 1 for s in seqs]
        T = max(lengths)
        for s in seqs:
            if s.length + 1 > s.max_length:
                raise ContextLengthError(f"{s.length + 1} tokens exceed the sequence's max_length of {s.max_length}")
        write = torch.stack([s.cycle_index[s.attended] for s in seqs])
        gather = torch.stack([torch.nn.functional.pad(s.cycle_index[:n], (0, T - n), value=int(s.cycle_index[0]))
                              for s, n in zip(seqs, lengths)])
        mask = None
        if min(lengths) != T:
            mask = (torch.arange(T)[None] < torch.tensor(lengths)[:, None])[:, None, None, :].to(device)
        positions = torch.tensor([[s.length] for s in seqs], device=device)
        self.plan = StepPlan(False, list(seqs), q_len=1, kv_length=T, write_pos=write.to(device),
                             gather=gather.to(device), attention_mask=mask, position_ids=positions)
        if self.window_pool is not None:
            self._plan_windows(seqs)
        return self.plan

    def _plan_windows(self, seqs: list[Sequence]) -> None:
        """Ring positions of every row's window (its last window - 1 tokens, then the new one)."""
        plan, W, device = self.plan, self.window_pool.page_size, self.pool.device
        rows = []
        for s in seqs:
            base, before = s.window_slot * W, min(s.length, W - 1)
            rows.append([base + p % W for p in range(s.length - before, s.length + 1)])
        lengths = [len(r) for r in rows]
        T = max(lengths)
        plan.window_length = T
        plan.window_offset = seqs[0].length + 1 - lengths[0]
        plan.window_write = torch.tensor([r[-1] for r in rows], device=device)
        plan.window_gather = torch.tensor([r + [r[0]] * (T - len(r)) for r in rows], device=device)
        masks = {"full_attention": plan.attention_mask, "sliding_attention": None}
        if min(lengths) != T:
            masks["sliding_attention"] = (torch.arange(T)[None] < torch.tensor(lengths)[:, None])[:, None, None, :].to(device)
        plan.attention_mask = masks if any(m is not None for m in masks.values()) else None

    def plan_mixed(self, seqs: list[Sequence], seq: Sequence, start: int, n: int) -> MixedPlan:
        """One decode token for every sequence in `seqs`, then n prompt tokens of `seq` at `start`, in one forward."""
        dense = self.plan_dense(seq, start, n)
        decode = self.plan_decode(seqs)
        device = self.pool.device
        # transformers builds no mask in a mixed forward: explicit ones, except where plain causal attention is exact
        causal = None if start == 0 else _window_mask(start, n, 0, start + n).to(device)
        dense.attention_mask = causal
        if self.window_pool is not None:
            W = self.window_pool.page_size
            sliding = None if start == 0 and n <= W else _window_mask(start, n, dense.window_offset, W).to(device)
            dense.attention_mask = {"full_attention": causal, "sliding_attention": sliding}
        self.plan = MixedPlan(decode, dense)
        return self.plan

    def finish_decode(self) -> None:
        """Commit the decode step (of a mixed one: its decode rows): every row's history grew by one token;
        sample the measured bytes."""
        plan = self.plan.decode if isinstance(self.plan, MixedPlan) else self.plan
        page_bytes = self.pool.page_bytes
        window_bytes = self.window_pool.page_bytes if self.window_pool is not None else 0
        for s in plan.seqs:
            s.length += 1
            s.step += 1
            s.cycle_step += 1
            cycle = s.cycles[-1]
            cycle.resident_fraction = max(cycle.resident_fraction, s.attended / s.length)
            s.memory.sample(s.attended * self.pool.shape.bytes_per_token, len(s.table) * page_bytes, s.host.nbytes,
                            s.full_kv_bytes)
            s.memory.window_bytes = window_bytes
        self.plan = None
