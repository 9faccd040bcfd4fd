"""LSA for DeepSeek-V4 inside transformers' own `DeepseekV4ForCausalLM.generate` (one sequence).

    cache = DeepseekLSACache(model, DeepseekLSAConfig(max_pages=96))   # policy "deepseek-lsa"
    model.generate(ids, past_key_values=cache, do_sample=False)
    cache.close()   # or `with DeepseekLSACache(...) as cache:`

What is tiered: the compressed entries of the compressed-sparse-attention (CSA) layers, the
history that grows (one entry per 4 tokens per CSA layer: the attention entry of
`head_dim` values and the native indexer's key of `index_head_dim` values). Every entry lives
in a host mirror (`EntryMirror`, pinned on CUDA); the device holds only the resident set:
whole pages of `page_entries` entries chosen at a cycle start, plus the open region (the
unfinished page and the entries emitted during the cycle). The heavily compressed (HCA)
entries, the sliding windows and the compressors' sub-window buffers stay on the device, as
in the paper. HF's stock cache layers are used for everything but CSA.

How the model reads the tier: `TieredCSALayer` is Hugging Face's `DeepseekV4CSACache` whose
`compressed_kv` tensors hold only the resident entries, in entry order. The model's CSA
compressor and its native per-step indexer read exactly those tensors, so the native top-k
(`index_topk` among CSA entries) can only pick resident entries; a non-resident entry is not
a candidate at all, which is what scoring it -inf means. Entry positions stay true: the
compressors place new windows by `entry_count`, which counts every entry ever emitted.
`resident_ids()` maps a row of the resident tensors back to its entry index; a forward hook
on each native indexer records the entries it picked (`record_picks=True`).

The cycle: a forward pre-hook on the model plans each forward. The prompt is prefilled in one
dense forward (every entry on the device, the stock computation). Before a decode step the
cycle starts when due (every `tau` steps, and before the first one): the entries emitted since
the last start are copied to the host mirror, the policy chooses pages (`choose_pages` in
entry space: threshold, recency tail, KMAX), pages that arrive are copied from the host, and
the device tensors are rebuilt to the new resident set. Nothing moves between the tiers inside
a cycle; new entries are appended to the device tensors (and reach the host at the next start).
A forward hook counts the step. With `enabled=False` the cache is the stock one (no hooks).

Batch size 1: the resident set, the cycle and the host mirror belong to one sequence.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING, Cache, get_layer_types_and_kwargs
from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4CSACache

from ..config import ConfigError, LSAConfig
from ..indexer.lightning import CSA_LAYER_TYPE
from ..memory.accounting import TransferLog
from ..policies import SelectionContext, SelectionPolicy, choose_pages, make_policy
from ..policies.base import reserve_pages
from ..policies.deepseek_lsa import csa_layers  # importing it registers the "deepseek-lsa" policy
from .cache import ContextLengthError

#: The names of the two entry series of a CSA layer (HF's `compressed_kv` keys).
SERIES = ("compressor", "indexer")


@dataclass(frozen=True)
class DeepseekLSAConfig:
    """How CSA entries are paged, how many stay on the device, and how often that changes.

    Units are CSA entries (one per `compress_rate` = 4 tokens), except `tau` (decode steps).
    Budget: exactly one of `max_pages` (KMAX, the paper's cap: 96 / 192 / 384 pages at
    256K / 512K / 1M tokens) or `budget` (the resident share of the entries). Defaults are the
    release's: a page of 64 entries (256 tokens), tau 64, a recency tail of 2048 entries, no
    sink, threshold 0.5, KMAX 96.
    """

    enabled: bool = True
    page_entries: int = 64
    tau: int = 64
    tail_entries: int = 2048
    sink_entries: int = 0
    max_pages: int | None = 96
    budget: float | None = None
    threshold: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ConfigError(f"enabled must be true or false, got {self.enabled!r}")
        for name in ("page_entries", "tau"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ("tail_entries", "sink_entries"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name} must be a non-negative integer, got {value!r}")
        if (self.budget is None) == (self.max_pages is None):
            raise ConfigError("give exactly one of max_pages (KMAX) or budget (a fraction)")

    def entry_config(self, compress_rate: int) -> LSAConfig:
        """The same rules as an `LSAConfig` whose "tokens" are CSA entries (chunk = 1 entry).

        Its tau is the most entries a cycle of `tau` decode steps can emit, so the open region
        that `choose_pages` reserves holds every entry emitted during the cycle. Invalid
        combinations (e.g. KMAX below tail + open region) raise `ConfigError`.
        """
        return LSAConfig(chunk_size=1, page_size=self.page_entries, tau=math.ceil(self.tau / compress_rate),
                         sink_tokens=self.sink_entries, tail_tokens=self.tail_entries, budget=self.budget,
                         max_pages=self.max_pages, threshold=self.threshold, seed=self.seed)


class EntryMirror:
    """Every CSA entry of one sequence in host memory: [csa_layers, capacity, dim] per series, grown geometrically."""

    def __init__(self, n_layers: int, pin: bool):
        self.n_layers = n_layers
        self.pin = pin
        self.length = 0
        self.data: dict[str, torch.Tensor | None] = {name: None for name in SERIES}

    def _reserve(self, name: str, n: int, like: torch.Tensor) -> torch.Tensor:
        held = self.data[name]
        if held is None or held.shape[1] < n:
            cap = max(n, 2 * (held.shape[1] if held is not None else 0), 256)
            grown = torch.empty(self.n_layers, cap, like.shape[-1], dtype=like.dtype, pin_memory=self.pin)
            if held is not None:
                grown[:, :self.length] = held[:, :self.length]
            self.data[name] = held = grown
        return held

    def append(self, rows: dict[str, torch.Tensor]) -> None:
        """Add entries: rows[name] is [csa_layers, n_new, dim] (any device)."""
        n_new = rows[SERIES[0]].shape[1]
        for name in SERIES:
            held = self._reserve(name, self.length + n_new, rows[name])
            held[:, self.length:self.length + n_new].copy_(rows[name], non_blocking=self.pin)
        self.length += n_new

    def entries(self, name: str, layer_row: int, ids: torch.Tensor) -> torch.Tensor:
        """The entries `ids` of one CSA layer: [len(ids), dim] (host)."""
        return self.data[name][layer_row, ids.cpu()]

    def view(self, name: str) -> torch.Tensor:
        """All stored entries of a series: [csa_layers, length, dim] (a view)."""
        return self.data[name][:, :self.length]

    @property
    def nbytes(self) -> int:
        """Bytes of the stored entries (both series, all CSA layers)."""
        return sum(t[:, :self.length].numel() * t.element_size() for t in self.data.values() if t is not None)


class TieredCSALayer(DeepseekV4CSACache):
    """HF's CSA cache layer whose `compressed_kv` holds only the resident entries (in entry order).

    `cycle_ids` are the entries installed at the last cycle start; entries emitted since then
    (`cycle_base` onward) follow them. Before the first cycle every entry is resident.
    """

    _layer_type = None  # not registered: DynamicCache keeps using HF's own CSA layer

    def __init__(self, config, **kwargs):
        super().__init__(config, **kwargs)
        self.cycle_ids = torch.zeros(0, dtype=torch.long)
        self.cycle_base = 0

    @property
    def n_entries(self) -> int:
        """Entries emitted so far (resident or not)."""
        return self.entry_count["indexer"]

    def resident_ids(self) -> torch.Tensor:
        """Entry index of each row of the resident tensors [n_resident] (cpu)."""
        return torch.cat([self.cycle_ids, torch.arange(self.cycle_base, self.n_entries)])

    def rows_since(self, first: int) -> dict[str, torch.Tensor]:
        """The device rows of the entries `first..n_entries-1` (the newest rows), per series [n, dim]."""
        n = self.n_entries - first
        return {name: self.compressed_kv[name][0, self.compressed_kv[name].shape[1] - n:] for name in SERIES}

    def install(self, ids: torch.Tensor, source_rows: torch.Tensor, from_host: torch.Tensor,
                mirror: EntryMirror, layer_row: int) -> None:
        """Make `ids` (sorted) the resident set: kept rows move within the device, the others come from the host."""
        for name in SERIES:
            held = self.compressed_kv[name]
            out = held.new_empty((1, ids.numel(), held.shape[-1]))
            keep = ~from_host
            out[0, keep.to(held.device)] = held[0, source_rows[keep].to(held.device)]
            if bool(from_host.any()):
                out[0, from_host.to(held.device)] = mirror.entries(name, layer_row, ids[from_host]).to(
                    held.device, held.dtype, non_blocking=mirror.pin)
            self.compressed_kv[name] = out
        self.cycle_ids = ids.cpu()
        self.cycle_base = self.n_entries

    @property
    def device_bytes(self) -> int:
        """Bytes of the resident entries held on the device (both series)."""
        return sum(t.numel() * t.element_size() for t in self.compressed_kv.values() if t is not None)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise ValueError("DeepseekLSACache decodes one sequence: beam search is not supported")


@dataclass
class DeepseekCycle:
    """One cycle start: what was chosen and what it cost."""

    step: int                 # decode step the cycle starts at
    entries: int              # CSA entries of the history
    pages: list[int]          # complete pages made resident
    allowed: int              # pages the budget / KMAX allowed
    recalled_pages: int       # pages copied host -> device
    offloaded_entries: int    # entries copied device -> host
    select_seconds: float     # policy scoring and page choice
    move_seconds: float       # copies and rebuilding the device tensors


@dataclass
class DeepseekStep:
    """One decode step, measured after its forward."""

    step: int
    cycle: int
    entries: int              # CSA entries of the history
    resident: int             # resident entries per CSA layer
    pages: int                # distinct pages the resident entries span
    device_bytes: int         # bytes of the CSA tier on the device (all CSA layers)
    seconds: float            # wall time of the step's forward, the cycle start included


@dataclass
class _Activations:
    """The attention inputs of the last processed token at every CSA layer (the policy's query side)."""

    csa_layers: list[int]
    position: int = -1
    states: dict[int, torch.Tensor] = field(default_factory=dict)

    def hidden(self, layer: int) -> torch.Tensor:
        return self.states[layer]


class DeepseekLSACache(Cache):
    """A transformers Cache for `DeepseekV4ForCausalLM` that tiers the CSA entries with LSA (batch size 1)."""

    def __init__(self, model: torch.nn.Module, config: DeepseekLSAConfig | None = None,
                 policy: str | SelectionPolicy = "deepseek-lsa", max_length: int | None = None,
                 record_picks: bool = False):
        hf = model.config
        if getattr(hf, "model_type", None) != "deepseek_v4":
            raise ValueError(f"DeepseekLSACache needs a DeepSeek-V4 model, got model_type="
                             f"{getattr(hf, 'model_type', None)!r}")
        self.config = config or DeepseekLSAConfig()
        self.compress_rate = int(hf.compress_rates[CSA_LAYER_TYPE])
        self.csa_layers = csa_layers(hf)
        model_max = int(getattr(hf, "max_position_embeddings", 0) or 0)
        self.max_length = int(max_length or model_max)
        if self.max_length <= 0 or (model_max and self.max_length > model_max):
            raise ContextLengthError(f"max_length must be in 1..{model_max}, got {self.max_length}")
        types, kwargs = get_layer_types_and_kwargs(hf)
        tiered = self.config.enabled
        super().__init__(layers=[TieredCSALayer(**kw) if tiered and t == CSA_LAYER_TYPE
                                 else DYNAMIC_LAYER_TYPE_MAPPING[t](**kw) for t, kw in zip(types, kwargs)])
        self.entry_config = self.config.entry_config(self.compress_rate)
        self.policy = make_policy(policy)
        self.record_picks = record_picks
        self.tokens = 0
        self.step = 0
        self.cycle_step = 0
        self.decoding = False
        self.cycles: list[DeepseekCycle] = []
        self.steps: list[DeepseekStep] = []
        self.picks: dict[int, dict[int, torch.Tensor]] = {}   # step -> CSA layer -> entries the native top-k used
        self.transfers = TransferLog()
        self.index = None
        self.rng = torch.Generator().manual_seed(self.config.seed)
        self._hooks: list = []
        if not tiered:
            return
        if not self.csa_layers:
            raise ValueError("this DeepSeek-V4 model has no compressed-sparse-attention layer to tier")
        self.policy.bind(model)
        self.capacity = reserve_pages(self.entry_config, self.policy.mode, self.max_length // self.compress_rate + 1)
        device = next(model.parameters()).device
        self.mirror = EntryMirror(len(self.csa_layers), pin=device.type == "cuda")
        self.activations = _Activations(self.csa_layers)
        self._step_started = 0.0
        decoder = model.model.layers
        self._hooks = [model.register_forward_pre_hook(self._before, with_kwargs=True),
                       model.register_forward_hook(self._after, with_kwargs=True)]
        for layer in self.csa_layers:
            attn = decoder[layer].self_attn
            self._hooks.append(attn.register_forward_pre_hook(self._capture(layer), with_kwargs=True))
            self._hooks.append(attn.compressor.indexer.register_forward_hook(self._picked(layer)))

    # ------------------------------------------------------------------ hooks
    def _before(self, module, args, kwargs) -> None:
        if kwargs.get("past_key_values") is not self:
            return
        ids = kwargs.get("input_ids")
        shape = ids.shape if ids is not None else kwargs["inputs_embeds"].shape[:2]
        if shape[0] != 1:
            raise ValueError(f"DeepseekLSACache decodes one sequence, got a batch of {shape[0]}")
        n = shape[1]
        if self.tokens + n > self.max_length:
            raise ContextLengthError(f"{self.tokens + n} tokens exceed the cache's max_length of {self.max_length}")
        self._step_started = time.perf_counter()
        if n > 1 or not self.tokens:
            if self.decoding:
                raise ValueError("DeepseekLSACache cannot take a multi-token input after decoding started")
            return
        self.decoding = True
        if not self.cycles or self.cycle_step >= self.config.tau:
            self._start_cycle()

    def _after(self, module, args, kwargs, output) -> None:
        if kwargs.get("past_key_values") is not self:
            return
        ids = kwargs.get("input_ids")
        n = ids.shape[1] if ids is not None else kwargs["inputs_embeds"].shape[1]
        self.tokens += n
        self.activations.position = self.tokens - 1
        if not self.decoding:
            return
        first = self.layers[self.csa_layers[0]]
        resident = first.cycle_ids.numel() + first.n_entries - first.cycle_base
        open_first = first.cycle_base // self.config.page_entries * self.config.page_entries
        open_pages = math.ceil((first.n_entries - open_first) / self.config.page_entries)
        pages = len(self.cycles[-1].pages) + open_pages
        self.steps.append(DeepseekStep(self.step, len(self.cycles) - 1, first.n_entries, resident, pages,
                                       self.device_bytes, time.perf_counter() - self._step_started))
        self.step += 1
        self.cycle_step += 1

    def _capture(self, layer: int):
        def hook(module, args, kwargs) -> None:
            if kwargs.get("past_key_values") is self:
                self.activations.states[layer] = args[0][0, -1].detach().clone()
        return hook

    def _picked(self, layer: int):
        def hook(module, args, output) -> None:
            if not (self.record_picks and self.decoding and args[3] is self):
                return
            used = output[0, -1]
            ids = self.layers[layer].resident_ids()
            self.picks.setdefault(self.step, {})[layer] = ids[used[used >= 0].cpu()]
        return hook

    # ------------------------------------------------------------------ cycles
    def _start_cycle(self) -> None:
        """Offload new entries, choose the resident pages, recall what is missing, rebuild the device tensors."""
        started = time.perf_counter()
        layers = [self.layers[i] for i in self.csa_layers]
        n = layers[0].n_entries
        if any(layer.n_entries != n or layer.entry_count["compressor"] != n for layer in layers):
            raise RuntimeError("the CSA layers disagree on their entry counts")
        P = self.config.page_entries
        new = n - self.mirror.length
        if new:
            rows = [layer.rows_since(self.mirror.length) for layer in layers]
            self.mirror.append({name: torch.stack([r[name] for r in rows]) for name in SERIES})
            self.transfers.offload(new * self.entry_bytes, self.step)
        n_pages = n // P
        ctx = SelectionContext(config=self.entry_config, length=n, n_pages=n_pages, cycle=len(self.cycles),
                               host_keys=self.mirror.view("indexer")[:, None] if n else torch.zeros(0),
                               activations=self.activations, index=self.index, generator=self.rng)
        if n_pages and self.index is None:
            self.index = ctx.index = self.policy.new_index(ctx)
        plan = choose_pages(self.policy, ctx, self.capacity)
        selected = time.perf_counter()
        pages = torch.tensor(plan.pages, dtype=torch.long)
        ids = torch.cat([(pages[:, None] * P + torch.arange(P)).flatten(), torch.arange(n_pages * P, n)])
        current = layers[0].resident_ids()
        rows = torch.searchsorted(current, ids).clamp(max=max(current.numel() - 1, 0))
        from_host = current[rows] != ids if current.numel() else torch.ones_like(ids, dtype=torch.bool)
        for row, layer in enumerate(layers):
            layer.install(ids, rows, from_host, self.mirror, row)
        recalled = torch.unique(ids[from_host] // P)
        for page in recalled.tolist():
            self.transfers.recall(int(((ids[from_host] // P) == page).sum()) * self.entry_bytes, self.step)
        self.cycles.append(DeepseekCycle(self.step, n, plan.pages, plan.allowed, recalled.numel(), new,
                                         selected - started, time.perf_counter() - selected))
        self.cycle_step = 0

    # ------------------------------------------------------------------ measurements
    @property
    def entry_bytes(self) -> int:
        """Bytes of one entry of every CSA layer (attention entry + indexer key)."""
        layer = self.layers[self.csa_layers[0]]
        return sum(t.shape[-1] * t.element_size() for t in layer.compressed_kv.values()) * len(self.csa_layers)

    @property
    def device_bytes(self) -> int:
        """Bytes of the CSA tier on the device: the resident entries of every CSA layer."""
        return sum(self.layers[i].device_bytes for i in self.csa_layers)

    @property
    def host_bytes(self) -> int:
        """Bytes of the host mirror."""
        return self.mirror.nbytes if self.config.enabled else 0

    def close(self) -> None:
        """Remove every hook this cache installed on the model."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def __enter__(self) -> "DeepseekLSACache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@torch.no_grad()
def generate_one(model: torch.nn.Module, prompt_ids: list[int], max_new_tokens: int,
                 policy: str | SelectionPolicy = "deepseek-lsa", config: DeepseekLSAConfig | None = None,
                 eos: bool = True) -> tuple[list[int], dict]:
    """Greedy generation of one sequence with LSA over the CSA entries; returns (new token ids, memory report)."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids], device=device)
    limit = {} if eos else {"min_new_tokens": max_new_tokens}
    with DeepseekLSACache(model, config, policy=policy, max_length=len(prompt_ids) + max_new_tokens) as cache:
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, past_key_values=cache, **limit)
    steps = cache.steps
    report = {
        "policy": cache.policy.name, "prompt_tokens": len(prompt_ids), "cycles": len(cache.cycles),
        "csa_entries": cache.steps[-1].entries if steps else 0,
        "resident_entries_max": max((s.resident for s in steps), default=0),
        "csa_device_bytes_peak": max((s.device_bytes for s in steps), default=0),
        "csa_full_bytes": (steps[-1].entries * cache.entry_bytes) if steps else 0,
        "host_bytes": cache.host_bytes, "transfers": cache.transfers.to_dict(),
        "decode_ms_per_token": 1000 * sum(s.seconds for s in steps) / max(1, len(steps)),
    }
    return out[0, len(prompt_ids):].tolist(), report
