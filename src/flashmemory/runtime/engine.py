"""LSAEngine: many sequences decoding together over one shared device KV pool.

Each call of `step()` is one scheduler iteration (continuous batching):
  1. admit waiting sequences whose device pages fit the pool (their reservation: the resident
     cap for a sparse policy, the whole cache for `full`), in arrival order;
  2. start the cycles that are due (per sequence);
  3. run one forward with a decode token for every decoding sequence (per-row positions, resident
     sets and lengths) and one prompt piece of the oldest sequence still prefilling, packed in one
     row (runtime/mixed_attention.py): the piece is `LSAConfig.prefill_chunk` tokens less the
     decode tokens beside it, so a long prompt never stalls the running decodes for more than one
     chunk's forward, and the decodes cost the linear layers almost nothing extra.
Sequences join and leave between steps. `generate` submits prompts and steps until they end.
`prefill` + `decode` share one prefill among several decodes (what policy comparisons use).
"""

from __future__ import annotations

import os
import tempfile
import time
from collections import deque
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Sequence as Seq

import torch

from ..config import EngineConfig, LSAConfig
from ..memory.block_pool import BlockPool
from ..memory.mover import PageMover
from ..memory.pools import DevicePool, HostMirror, KVShape, LayerLayout
from ..memory.spill import SpillError, SpilledMirror, check_spill_folder, min_host_pages
from ..models.loader import Backbone, check_architecture
from ..policies import DEFAULT_POLICY, BudgetError, SelectionPolicy, make_policy
from ..policies.base import Eviction
from . import probes
from .cache import ContextLengthError, TieredCache
from .capture import ActivationRecorder, Activations
from .conversation import Conversation, follow_up_ids
from .cycles import CycleScheduler
from .mixed_attention import PieceCost, can_pack, packed_attention
from .report import GenerationReport, GenerationResult
from .sampling import GenerationOptionsError, SamplingParams, sample
from .sequence import Sequence, Status, TokenEvent

_SAMPLING_FIELDS = {f.name for f in fields(SamplingParams)}


class PromptError(ValueError):
    """A prompt that cannot be run (empty, bad token ids, or longer than the model's context)."""


class AdmissionError(ValueError):
    """A sequence whose device pages can never fit the engine's device memory."""


@dataclass
class Prefill:
    """A prompt's prefilled history, reusable by several decodes one after another."""

    host: HostMirror
    prompt_ids: list[int]
    logits: torch.Tensor          # next-token logits after the prompt
    activations: Activations      # attention inputs of the prompt's last `observation_window` tokens
    seconds: float
    max_new_tokens: int
    dense_device_peak: int
    window: tuple[torch.Tensor, torch.Tensor] | None = None  # hybrid models: the sliding layers' ring
    in_use: bool = False


@dataclass
class MemoryUsage:
    """The engine's memory now, counted from the tensors that hold it."""

    device_capacity_bytes: int    # the device pools' storage (tiered pages, and sliding windows on a hybrid model)
    device_used_bytes: int        # pool pages and window slots that hold a sequence's KV now
    device_reserved_bytes: int    # pool pages reserved by admitted sequences, plus their window slots
    device_free_bytes: int        # capacity - used
    host_bytes: int               # storage of the running sequences' host mirrors
    disk_bytes: int               # their spill files on disk (the disk tier, EngineConfig.host_memory)
    running: int
    waiting: int

    def to_dict(self) -> dict:
        return asdict(self)


class LSAEngine:
    """Long-context generation for many sequences with a tiered KV cache.

        engine = LSAEngine(load_backbone(), LSAConfig(budget=0.15))
        result = engine.generate("...long prompt...", policy="lsa", max_new_tokens=64)
        results = engine.generate([prompt_a, prompt_b], temperature=0.7, seed=1, stop=["\\n\\n"])

    `model` is a `Backbone` from `load_backbone`, or an already loaded transformers causal LM (pass its
    `tokenizer` for text prompts and output). Use it as a context manager, or call `close()`, to
    remove the hooks it installs on the model.
    """

    def __init__(self, model: Backbone | torch.nn.Module, config: LSAConfig | None = None, *,
                 tokenizer=None, engine_config: EngineConfig | None = None):
        if isinstance(model, Backbone):
            self.backbone, tokenizer, model = model, tokenizer or model.tokenizer, model.model
        else:
            self.backbone = None
        check_architecture(model.config)
        self.model = model
        self.tokenizer = tokenizer
        self.config = config or LSAConfig()
        self.engine_config = engine_config or EngineConfig()
        self.device = next(model.parameters()).device
        self.max_context = int(getattr(model.config, "max_position_embeddings", 0) or 0)
        try:
            self.layout = LayerLayout.of(model)
        except ValueError as exc:
            raise AdmissionError(str(exc)) from None
        self.shape = KVShape.of(model, len(self.layout.tiered))
        page_bytes = self.config.page_size * self.shape.bytes_per_token
        self.window_pool: DevicePool | None = None
        self.window_slots = BlockPool(0)
        window_bytes = 0
        if self.layout.sliding:  # one ring of `window` tokens per running sequence, for every sliding layer
            window_shape = KVShape.of(model, len(self.layout.sliding))
            window_bytes = self.layout.window * window_shape.bytes_per_token
            n_windows = self.engine_config.max_batch if self.engine_config.device_memory is not None else 0
            self.window_pool = DevicePool(window_shape, n_windows, self.layout.window, self.device)
            self.window_slots.grow(n_windows)
        budget = self.engine_config.device_memory
        n_slots = 0 if budget is None else (budget - self.window_slots.n_slots * window_bytes) // page_bytes
        if budget is not None and n_slots <= 0:
            raise AdmissionError(f"device_memory of {budget} bytes holds no page ({page_bytes} bytes each) beside "
                                 f"{self.window_slots.n_slots} sliding windows of {window_bytes} bytes; raise it "
                                 "or lower max_batch")
        self.pool = DevicePool(self.shape, n_slots, self.config.page_size, self.device)
        self.blocks = BlockPool(n_slots)
        self.cache = TieredCache(self.pool, self.layout, self.window_pool)
        self.spill_dir = None
        if self.engine_config.host_memory is not None:
            self.spill_dir = check_spill_folder(self.engine_config.spill_dir or tempfile.gettempdir())
            self._check_host_memory(self.config)
        self.scheduler = CycleScheduler(self.pool, self.blocks, PageMover(self.pool),
                                        lambda seq: probes.lookahead(self, seq), self.layout.tiered,
                                        lambda seq: probes.reconstruction(self, seq),
                                        prefetch_multiple=self.engine_config.prefetch_multiple)
        self.recorder = ActivationRecorder(model, keep_last=self.config.observation_window)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._next_id = 0
        self._eos = self._eos_ids()
        self._packable = can_pack(model)
        self.piece_cost = PieceCost.of(model, self.layout)

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Remove the hooks this engine installed on the model."""
        self.recorder.close()

    def __enter__(self) -> "LSAEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ prompts
    def encode(self, prompt: str, chat: bool = False) -> list[int]:
        """Token ids of a prompt; `chat` wraps it in the model's chat template as a user turn."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise PromptError("the prompt is empty")
        if self.tokenizer is None:
            raise PromptError("this engine has no tokenizer: pass token ids, or LSAEngine(model, tokenizer=...)")
        if chat:
            if not getattr(self.tokenizer, "chat_template", None):
                raise PromptError("this model has no chat template; run without --chat")
            ids = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                     add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
            return list(ids)
        return self.tokenizer(prompt, add_special_tokens=True)["input_ids"]

    def _prompt_ids(self, prompt: str | Seq[int], chat: bool) -> list[int]:
        if isinstance(prompt, str):
            return self.encode(prompt, chat=chat)
        ids = prompt.flatten().tolist() if isinstance(prompt, torch.Tensor) else list(prompt)
        vocab = self.model.config.get_text_config(decoder=True).vocab_size
        if any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab for i in ids):
            raise PromptError(f"token ids must be integers in [0, {vocab})")
        return ids

    def _check_length(self, n_prompt: int, max_new_tokens: int) -> None:
        if n_prompt == 0:
            raise PromptError("the prompt is empty")
        if self.max_context and n_prompt + max_new_tokens > self.max_context:
            raise PromptError(f"the prompt has {n_prompt} tokens; with {max_new_tokens} new tokens that exceeds "
                              f"the model's context of {self.max_context} tokens")

    def _room(self, n_prompt: int, max_new_tokens: int, lookahead: bool) -> int:
        """Tokens a sequence may hold: prompt + new tokens (+ tau for the oracle to decode ahead)."""
        room = n_prompt + max_new_tokens + (self.config.tau if lookahead else 0)
        return min(room, self.max_context) if self.max_context else room

    # ------------------------------------------------------------------ submitting
    def submit(self, prompt: str | Seq[int], policy: str | SelectionPolicy = DEFAULT_POLICY, *,
               config: LSAConfig | None = None, chat: bool = False,
               on_token: Callable[[TokenEvent], None] | None = None, **options) -> Sequence:
        """Queue one prompt; it is admitted, prefilled and decoded by later `step()` calls.

        options: the fields of `SamplingParams` (max_new_tokens, temperature, top_p, top_k, seed, stop,
        stop_at_eos). `on_token` receives a `TokenEvent` after every generated token.
        """
        sampling = self._sampling(options)
        policy = self._policy(policy)
        cfg = self._config(config)
        ids = self._prompt_ids(prompt, chat)
        self._check_length(len(ids), sampling.max_new_tokens)
        seq = Sequence(self._new_id(), ids, policy, cfg, sampling,
                       self._room(len(ids), sampling.max_new_tokens, policy.needs_lookahead), on_token)
        self._enqueue(seq)
        return seq

    def _sampling(self, options: dict) -> SamplingParams:
        unknown = sorted(set(options) - _SAMPLING_FIELDS)
        if unknown:
            raise GenerationOptionsError(f"unknown generation option(s) {', '.join(unknown)}; "
                                         f"known: {', '.join(sorted(_SAMPLING_FIELDS))}")
        return SamplingParams(**options)

    def _policy(self, policy: str | SelectionPolicy) -> SelectionPolicy:
        policy = make_policy(policy)
        policy.bind(self.model)
        return policy

    def _config(self, config: LSAConfig | None) -> LSAConfig:
        cfg = config or self.config
        if cfg.page_size != self.pool.page_size:
            raise ValueError(f"page_size {cfg.page_size} differs from the engine's device pool "
                             f"({self.pool.page_size}); make another engine for another page size")
        if self.engine_config.host_memory is not None:
            self._check_host_memory(cfg)
        return cfg

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def _enqueue(self, seq: Sequence) -> None:
        if self.engine_config.device_memory is not None and seq.reserved_pages > self.blocks.n_slots:
            raise AdmissionError(
                f"this sequence needs {seq.reserved_pages * self.pool.page_bytes} bytes of device KV "
                f"({seq.reserved_pages} pages), more than the engine's device_memory holds "
                f"({self.blocks.n_slots} pages): lower the budget or the length, or raise device_memory")
        self.waiting.append(seq)

    def cancel(self, seq: Sequence) -> None:
        """Stop a sequence now; its device pages and host memory are released at once."""
        if seq.finished:
            return
        if seq in self.waiting:
            self.waiting.remove(seq)
        self._finish(seq, "cancelled")

    # ------------------------------------------------------------------ the loop
    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @torch.no_grad()
    def step(self) -> None:
        """One scheduler iteration: admit, start the cycles that are due, then one decode token for every
        decoding sequence and one prompt piece of the oldest sequence still prefilling, in one forward."""
        self._admit()
        decoding = [s for s in self.running if s.status is Status.DECODE]
        for seq in decoding:
            if self.scheduler.due(seq):
                self._guard(seq, self.scheduler.start_cycle, seq)
        decoding = [s for s in decoding if not s.finished]
        prefilling = next((s for s in self.running if s.status is Status.PREFILL), None)
        if prefilling is not None and decoding and self._packable:
            self._mixed(decoding, prefilling)
            return
        if prefilling is not None:
            self._guard(prefilling, self._prefill_piece, prefilling)
        if decoding:
            self._decode(decoding)

    def run(self, seqs: list[Sequence] | None = None) -> None:
        """Step until the given sequences (default: all) have finished."""
        while (any(not s.finished for s in seqs) if seqs is not None else self.has_work):
            self.step()

    def _guard(self, seq: Sequence, fn, *args) -> None:
        """Run one sequence's work; a failure ends that sequence (reason "error"), not the others."""
        try:
            fn(*args)
        except (BudgetError, ContextLengthError, ValueError, RuntimeError) as exc:
            seq.error = exc
            self._finish(seq, "error")

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.engine_config.max_batch:
            seq = self.waiting[0]
            if not self.blocks.reserve(seq.reserved_pages):
                if self.engine_config.device_memory is not None:
                    return  # wait until running sequences free their pages
                n = self.blocks.n_slots + seq.reserved_pages - self.blocks.unreserved
                self.pool.grow(n)
                self.blocks.grow(n)
                self.blocks.reserve(seq.reserved_pages)
            self._take_window(seq)
            self.waiting.popleft()
            seq.admitted = True
            self.running.append(seq)
            if seq.host is None:
                seq.host = self._new_mirror(seq.max_length)
                seq.status = Status.PREFILL
            else:  # decoding from a shared prefill: its first token comes from the prefill's logits
                seq.status = Status.DECODE
                if seq.window_init is not None:
                    self._load_window(seq, seq.window_init)
                self._emit(seq, sample(seq.first_logits, seq.sampling, seq.sampler))
            seq.host.attach(seq.transfers, lambda seq=seq: seq.step)
            seq.memory.host_reserved_bytes = seq.host.allocated_bytes

    def _new_mirror(self, capacity: int) -> HostMirror | SpilledMirror:
        """A host mirror for `capacity` tokens: in host memory, or, beyond `host_memory`, capped with a spill file."""
        cap, pin = self.engine_config.host_memory, self.device.type == "cuda"
        if cap is None or capacity * self.shape.bytes_per_token <= cap:
            return HostMirror(self.shape, capacity, pin=pin)
        return SpilledMirror(self.shape, capacity, self.config.page_size, cap, self.spill_dir, pin=pin)

    def _check_host_memory(self, cfg: LSAConfig) -> None:
        need = min_host_pages(cfg.page_size, cfg.prefill_chunk, cfg.open_pages) * cfg.page_size * self.shape.bytes_per_token
        if self.engine_config.host_memory < need:
            raise SpillError(f"host_memory of {self.engine_config.host_memory} bytes is below the working set of a "
                             f"sequence ({need} bytes: one prefill piece of {cfg.prefill_chunk} tokens and one "
                             f"cycle's open pages); raise it or lower prefill_chunk")

    def _take_window(self, seq: Sequence) -> None:
        """Give `seq` a window slot (hybrid models; max_batch slots exist under a device budget)."""
        if self.window_pool is None:
            return
        if not self.window_slots.reserve(1):
            n = self.window_slots.n_slots + 1
            self.window_pool.grow(n)
            self.window_slots.grow(n)
            self.window_slots.reserve(1)
        seq.window_slot = self.window_slots.allocate(1)[0]

    def _drop_window(self, seq: Sequence) -> None:
        if seq.window_slot is not None:
            self.window_slots.free([seq.window_slot])
            self.window_slots.unreserve(1)
            seq.window_slot = None

    def _window_of(self, seq: Sequence) -> tuple[torch.Tensor, torch.Tensor]:
        """A copy of the sequence's rings (ring position = history position mod window)."""
        span = slice(seq.window_slot * self.layout.window, (seq.window_slot + 1) * self.layout.window)
        return self.window_pool.k[:, :, span].clone(), self.window_pool.v[:, :, span].clone()

    def _load_window(self, seq: Sequence, window: tuple[torch.Tensor, torch.Tensor]) -> None:
        span = slice(seq.window_slot * self.layout.window, (seq.window_slot + 1) * self.layout.window)
        self.window_pool.k[:, :, span].copy_(window[0])
        self.window_pool.v[:, :, span].copy_(window[1])

    def _dense(self, seq: Sequence, ids: list[int], start: int, kept: torch.Tensor | None = None) -> torch.Tensor:
        """A dense forward of one sequence's tokens at `start` (over its history positions `kept` only, if
        given); next-token logits of the last one."""
        plan = self.cache.plan_dense(seq, start, len(ids), kept)
        try:
            out = self.model(input_ids=torch.tensor([ids], device=self.device), position_ids=plan.position_ids,
                             attention_mask=plan.attention_mask, past_key_values=self.cache, use_cache=True,
                             logits_to_keep=1)
        finally:
            self.cache.plan = None
        return out.logits[0, -1]

    def _piece(self, seq: Sequence, rows: int) -> tuple[int, int]:
        """The prompt span of `seq`'s next piece: `prefill_chunk` tokens alone. Beside `rows` decode tokens,
        the chunk less `decode_token_weight` tokens per decode token (at least half a chunk, so prompts keep
        moving beside many decodes), then shrunk to cost what it would at the prompt's start (at least a
        quarter chunk): every step a decode token waits on then takes about as long, early or late in a
        long prompt, and with few or many decode tokens beside it."""
        chunk, start = seq.config.prefill_chunk, seq.prefilled
        size = chunk
        if rows:
            fill = chunk - round(self.engine_config.decode_token_weight * rows)
            size = max(self.piece_cost.tokens(max(fill, (chunk + 1) // 2), start), (chunk + 3) // 4)
        return start, min(start + size, len(seq.prompt_ids))

    def _prefill_piece(self, seq: Sequence) -> None:
        t0 = time.perf_counter()
        lo, hi = self._piece(seq, 0)
        logits = self._dense(seq, seq.prompt_ids[lo:hi], lo)
        self._prefilled(seq, hi, logits, self.recorder.row(0), time.perf_counter() - t0)

    def _prefilled(self, seq: Sequence, hi: int, logits: torch.Tensor, activations: Activations,
                   seconds: float) -> None:
        """Commit a piece that ended at prompt position `hi`; the last piece samples the first token."""
        seq.prefilled = seq.length = seq.host.length = hi
        seq.memory.sample(0, 0, seq.host.nbytes, seq.full_kv_bytes)
        seq.activations = self._observe(seq.activations, activations)
        seq.prefill_seconds += seconds
        if hi == len(seq.prompt_ids):
            seq.status = Status.DECODE
            self._emit(seq, sample(logits.float(), seq.sampling, seq.sampler))

    def _decode(self, seqs: list[Sequence]) -> None:
        t0 = time.perf_counter()
        plan = self.cache.plan_decode(seqs)
        ids = torch.tensor([[s.pending] for s in seqs], device=self.device)
        try:
            out = self.model(input_ids=ids, position_ids=plan.position_ids, attention_mask=plan.attention_mask,
                             past_key_values=self.cache, use_cache=True)
            self.cache.finish_decode()
        finally:
            self.cache.plan = None
        self._decoded(seqs, out.logits[:, -1], [self.recorder.row(b) for b in range(len(seqs))],
                      1000.0 * (time.perf_counter() - t0))

    def _mixed(self, seqs: list[Sequence], prefilling: Sequence) -> None:
        """One forward for a decode token of every sequence in `seqs` and the next piece of `prefilling`,
        packed in one row (runtime/mixed_attention.py). If it fails, the piece's sequence ends with the
        error and the decode tokens run on their own."""
        t0 = time.perf_counter()
        b = len(seqs)
        lo, hi = self._piece(prefilling, b)
        n = hi - lo
        tail = min(n, self.recorder.keep_last)
        self.recorder.keep_tokens(torch.cat([torch.arange(b), torch.arange(b + n - tail, b + n)]).to(self.device))
        failure = None
        try:
            plan = self.cache.plan_mixed(seqs, prefilling, lo, n)
            positions = torch.cat([plan.decode.position_ids[:, 0], plan.dense.position_ids[0]])[None]
            ids = [s.pending for s in seqs] + prefilling.prompt_ids[lo:hi]
            with packed_attention(self.model):
                out = self.model(input_ids=torch.tensor([ids], device=self.device), position_ids=positions,
                                 past_key_values=self.cache, use_cache=True,
                                 logits_to_keep=torch.tensor(list(range(b)) + [b + n - 1], device=self.device))
            self.cache.finish_decode()
            rows = [self.recorder.kept(i, i + 1) for i in range(b)]
            piece = self.recorder.kept(b, b + tail)
        except (BudgetError, ContextLengthError, ValueError, RuntimeError) as exc:
            failure = exc
        finally:
            self.cache.plan = None
            self.recorder.keep_tokens(None)
        if failure is not None:
            prefilling.error = failure
            self._finish(prefilling, "error")
            self._decode(seqs)
            return
        seconds = time.perf_counter() - t0
        logits = out.logits[0]
        self._prefilled(prefilling, hi, logits[b], piece, seconds)
        self._decoded(seqs, logits[:b], rows, 1000.0 * seconds)

    def _decoded(self, seqs: list[Sequence], logits: torch.Tensor, activations: list[Activations], ms: float) -> None:
        """Sample and emit one token per sequence from its row of `logits` [B, vocab]."""
        if all(s.sampling.greedy for s in seqs):
            tokens = logits.argmax(-1).tolist()  # one synchronisation for the batch
        else:
            tokens = [sample(logits[b], s.sampling, s.sampler) for b, s in enumerate(seqs)]
        for seq, token, acts in zip(seqs, tokens, activations):
            seq.activations = acts
            seq.decode_ms.append(ms)
            self._emit(seq, token)

    # ------------------------------------------------------------------ output
    def _eos_ids(self) -> set[int]:
        gen = getattr(self.model, "generation_config", None)
        eos = gen.eos_token_id if gen is not None else None
        if eos is None and self.tokenizer is not None:
            eos = self.tokenizer.eos_token_id
        return set(eos) if isinstance(eos, (list, tuple)) else ({eos} if eos is not None else set())

    def _text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if self.tokenizer is not None else ""

    def _emit(self, seq: Sequence, token: int) -> None:
        seq.output_ids.append(token)
        reason = "stop" if seq.sampling.stop_at_eos and token in self._eos else None
        text = self._text(seq.output_ids)
        hits = [text.find(s) for s in seq.sampling.stop if s in text]
        if hits:
            text, reason = text[:min(hits)], "stop"
        if reason is None and (len(seq.output_ids) >= seq.sampling.max_new_tokens or seq.length >= seq.max_length):
            reason = "length"
        seq.text = text
        visible = text
        if reason is None:  # hold back what may be the start of a stop string, or half a character
            hold = max((len(s) - 1 for s in seq.sampling.stop), default=0)
            visible = text[: len(text) - hold].rstrip("\ufffd")
        delta = visible[seq.emitted:] if len(visible) > seq.emitted else ""
        seq.emitted = max(seq.emitted, len(visible))
        seq.pending = token
        if reason is not None:
            self._finish(seq, reason)
        if seq.on_token is not None:
            seq.on_token(TokenEvent(seq, token, delta, reason is not None, reason))

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason = reason
        seq.status = Status.FINISHED
        if seq in self.running:
            self.running.remove(seq)
        if seq.admitted:
            if seq.keep_history and reason in ("stop", "length"):  # a conversation goes on from this history
                self.scheduler.offload(seq)
                seq.window_after = self._window_of(seq) if seq.window_slot is not None else None
            self.scheduler.release(seq)
            self.blocks.unreserve(seq.reserved_pages)
            self._drop_window(seq)
            seq.admitted = False
        owned = seq.release_prefill is None
        if seq.release_prefill is not None:
            seq.release_prefill()
            seq.release_prefill = None
        if seq.host is not None:
            seq.host.join()
            seq.memory.disk_bytes_peak = max(seq.memory.disk_bytes_peak, seq.host.disk_bytes)
            if owned:  # its own mirror (not a shared prefill's): the spill file goes now
                seq.host.close()
        seq.host = None  # a shared prefill keeps its own reference
        seq.activations = None
        if reason in ("cancelled", "error") and seq.on_token is not None:
            seq.on_token(TokenEvent(seq, -1, "", True, reason))

    def result(self, seq: Sequence) -> GenerationResult:
        """The text, token ids and measured report of a finished sequence (its error, if it failed)."""
        if not seq.finished:
            raise RuntimeError(f"{seq} has not finished")
        if seq.error is not None:
            raise seq.error
        return GenerationResult(seq.text, list(seq.output_ids), GenerationReport.of(seq, self.pool.page_bytes, list(self.layout.tiered)))

    def memory(self) -> MemoryUsage:
        """Device and host bytes in use now."""
        page, window = self.pool.page_bytes, self.window_pool.page_bytes if self.window_pool is not None else 0
        capacity = self.pool.allocated_bytes + (self.window_pool.allocated_bytes if self.window_pool is not None else 0)
        used = self.blocks.used * page + self.window_slots.used * window
        return MemoryUsage(capacity, used, self.blocks.reserved * page + self.window_slots.reserved * window,
                           capacity - used,
                           sum(s.host.allocated_bytes for s in self.running if s.host is not None),
                           sum(s.host.disk_bytes for s in self.running if s.host is not None),
                           len(self.running), len(self.waiting))

    # ------------------------------------------------------------------ one call
    def generate(self, prompts: str | Seq[int] | list[str] | list[list[int]],
                 policy: str | SelectionPolicy = DEFAULT_POLICY, *, chat: bool = False,
                 config: LSAConfig | None = None, on_token: Callable[[TokenEvent], None] | None = None,
                 **options) -> GenerationResult | list[GenerationResult]:
        """Generate for one prompt (a string or token ids) or a list of prompts, decoded together.

        options: the fields of `SamplingParams` (max_new_tokens=64, temperature=0 (greedy), top_p,
        top_k, seed, stop, stop_at_eos). Returns one result, or a list in the prompts' order.
        """
        single = isinstance(prompts, str) or (len(prompts) > 0 and isinstance(prompts[0], int)) \
            or isinstance(prompts, torch.Tensor)
        batch = [prompts] if single else list(prompts)
        if not batch:
            raise PromptError("no prompts given")
        seqs = []
        try:
            for p in batch:
                seqs.append(self.submit(p, policy, config=config, chat=chat, on_token=on_token, **options))
            self.run(seqs)
        except BaseException:
            for s in seqs:
                self.cancel(s)
            raise
        results = [self.result(s) for s in seqs]
        return results[0] if single else results

    # ------------------------------------------------------------------ one prefill, many decodes
    @torch.no_grad()
    def prefill(self, prompt_ids: Seq[int] | torch.Tensor, max_new_tokens: int = 64) -> Prefill:
        """Dense prefill in pieces of `config.prefill_chunk` tokens (bounded activation memory), kept for `decode`."""
        ids = self._prompt_ids(prompt_ids, chat=False)
        self._check_length(len(ids), max_new_tokens)
        room = self._room(len(ids), max_new_tokens, lookahead=True)
        seq = Sequence(0, ids, make_policy("full"), self.config, SamplingParams(max_new_tokens=max_new_tokens), room)
        seq.host = self._new_mirror(room)
        seq.host.attach(seq.transfers, lambda: 0)
        return self._prefill_from(seq, 0, None)

    def _observe(self, before: Activations | None, now: Activations) -> Activations:
        """The last `observation_window` tokens' attention inputs: `now`'s, after `before`'s when `now` has fewer."""
        keep = self.config.observation_window
        return now.last(keep) if before is None else before.then(now, keep)

    def _prefill_from(self, seq: Sequence, start: int, window: tuple[torch.Tensor, torch.Tensor] | None,
                      kept: torch.Tensor | None = None, observed: Activations | None = None) -> Prefill:
        """Prefill `seq.prompt_ids[start:]` in pieces over a host mirror that holds the first `start` tokens
        (and, on a hybrid model, the sliding layers' rings `window` at `start`): densely, or over the history
        positions `kept` only (an eviction policy's follow-up). `observed`: the attention inputs of the tokens
        before `start`, continued for the new prefill's observation window."""
        self._take_window(seq)
        try:
            t0 = time.perf_counter()
            if window is not None:
                self._load_window(seq, window)
            ids = seq.prompt_ids
            for lo in range(start, len(ids), self.config.prefill_chunk):
                piece = ids[lo: lo + self.config.prefill_chunk]
                logits = self._dense(seq, piece, lo, kept)
                seq.host.length = lo + len(piece)
                observed = self._observe(observed, self.recorder.row(0))
                if kept is not None:  # later pieces see this one
                    kept = torch.cat([kept, torch.arange(lo, lo + len(piece))])
            seconds = time.perf_counter() - t0
            window = self._window_of(seq) if self.window_pool is not None else None
        finally:
            self._drop_window(seq)
        return Prefill(seq.host, ids, logits.float(), observed, seconds, seq.sampling.max_new_tokens,
                       seq.memory.dense_device_peak, window)

    def decode(self, prefill: Prefill, policy: str | SelectionPolicy = DEFAULT_POLICY,
               max_new_tokens: int | None = None, config: LSAConfig | None = None,
               stop_at_eos: bool = True) -> GenerationResult:
        """Greedy decoding from a prefill, with `policy` choosing the resident set every tau steps."""
        return self._run_one(self.submit_prefilled(prefill, policy, config=config, max_new_tokens=max_new_tokens,
                                                   stop_at_eos=stop_at_eos))

    def _run_one(self, seq: Sequence) -> GenerationResult:
        """Step until `seq` ends (other sequences run along); cancel it if the loop is interrupted."""
        try:
            self.run([seq])
        except BaseException:
            self.cancel(seq)
            raise
        return self.result(seq)

    def submit_prefilled(self, prefill: Prefill, policy: str | SelectionPolicy = DEFAULT_POLICY, *,
                         config: LSAConfig | None = None, on_token: Callable[[TokenEvent], None] | None = None,
                         eviction: Eviction | None = None, **options) -> Sequence:
        """Queue a decode that continues a `prefill` (one running decode per prefill at a time).

        `eviction`: for an eviction policy, a decision made earlier in the conversation the prefill continues
        (the decode keeps to it instead of deciding again).
        """
        options.setdefault("max_new_tokens", prefill.max_new_tokens)
        if options["max_new_tokens"] is None:
            options["max_new_tokens"] = prefill.max_new_tokens
        sampling = self._sampling(options)
        if sampling.max_new_tokens > prefill.max_new_tokens:
            raise ValueError(f"this prefill reserved room for {prefill.max_new_tokens} new tokens, "
                             f"asked {sampling.max_new_tokens}")
        if prefill.in_use:
            raise RuntimeError("this prefill is being decoded by a running sequence; decode it again after that one "
                               "ends, or prefill again")
        policy = self._policy(policy)
        cfg = self._config(config)
        n = len(prefill.prompt_ids)
        self._check_length(n, sampling.max_new_tokens)
        seq = Sequence(self._new_id(), prefill.prompt_ids, policy, cfg, sampling, prefill.host.capacity, on_token,
                       eviction if policy.evicts else None)
        seq.host, seq.length, seq.prefilled = prefill.host, n, n
        prefill.host.length = n  # forget what an earlier decode appended
        seq.activations = prefill.activations
        seq.first_logits = prefill.logits
        seq.window_init = prefill.window
        seq.prefill_seconds = prefill.seconds
        seq.memory.dense_device_peak = prefill.dense_device_peak
        prefill.in_use = True
        seq.release_prefill = lambda: setattr(prefill, "in_use", False)
        try:
            self._enqueue(seq)
        except AdmissionError:
            seq.release_prefill()
            raise
        return seq

    # ------------------------------------------------------------------ follow-up prompts and saved contexts
    @torch.no_grad()
    def extend(self, prefill: Prefill, ids: Seq[int] | torch.Tensor, max_new_tokens: int | None = None) -> Prefill:
        """A new prefill: `prefill`'s prompt followed by `ids`, prefilled densely over its history only.

        The history is copied into a new host mirror with room for `max_new_tokens` (default: the
        prefill's), so `prefill` stays usable for other follow-ups (one saved context, many questions).
        """
        max_new = prefill.max_new_tokens if max_new_tokens is None else max_new_tokens
        return self._extend(prefill.host, prefill.prompt_ids, self._prompt_ids(ids, chat=False), max_new,
                            prefill.window, prefill.dense_device_peak, prefill.activations)

    def _prefix_ids(self, prefix: str) -> list[int]:
        if not prefix:
            return []
        if self.tokenizer is None:
            raise PromptError("this engine has no tokenizer for an answer prefix: pass LSAEngine(model, tokenizer=...)")
        return self.tokenizer(prefix, add_special_tokens=False)["input_ids"]

    def _copy_history(self, source: HostMirror, target: HostMirror, n: int) -> None:
        """Copy the first n tokens of one mirror into another (a page at a time: a spilled mirror reads so)."""
        P = self.config.page_size
        for start in range(0, n, P):
            k, v = source.span(start, min(P, n - start))
            k_to, v_to = target.span(start, k.shape[2], write=True)
            k_to.copy_(k)
            v_to.copy_(v)
        target.length = n

    def _extend(self, host: HostMirror, before: list[int], more: list[int], max_new: int,
                window: tuple[torch.Tensor, torch.Tensor] | None, dense_peak: int, observed: Activations | None,
                eviction: Eviction | None = None) -> Prefill:
        """Prefill `more` after the history `before` (whose KV `host` holds) into a copy of that history:
        densely, or, under an eviction that dropped pages, over what it kept only."""
        if not more:
            raise PromptError("nothing to append")
        n, ids = len(before), before + more
        self._check_length(len(ids), max_new)
        room = self._room(len(ids), max_new, lookahead=True)
        seq = Sequence(0, ids, make_policy("full"), self.config, SamplingParams(max_new_tokens=max_new), room)
        seq.host = self._new_mirror(room)
        seq.host.attach(seq.transfers, lambda: 0)
        self._copy_history(host, seq.host, n)
        seq.memory.dense_device_peak = dense_peak
        kept = eviction.positions(n, self.config.page_size) if eviction is not None and eviction.evicted else None
        return self._prefill_from(seq, n, window, kept, observed)

    def ask(self, context: Prefill | GenerationResult, question: str | Seq[int],
            policy: str | SelectionPolicy | None = None,
            *, chat: bool = False, answer_prefix: str = "", config: LSAConfig | None = None,
            on_token: Callable[[TokenEvent], None] | None = None, **options) -> GenerationResult:
        """Answer a question about a document context, or a follow-up question in a conversation.

        `context` is a `Prefill` of a document (`saved.context_ids`, or a loaded `.fmkv` file; it is left as
        it was), or the result of an earlier `ask`: then the question is appended after that answer, as in a
        chat, and the whole history (document, earlier questions and answers) is kept. The first question part
        is "\n\n" + question (with `chat`, it also ends the user turn and opens the assistant's:
        `saved.question_ids`); a follow-up closes the answer and adds a user turn (`conversation.follow_up_ids`).
        A question given as token ids is appended as it is (after the last answer token, for a follow-up).
        `answer_prefix`: text the answer starts with (RULER's answer prefix), appended after the question part;
        the result's text and tokens are what follows it.

        `policy` and `config` (default: the conversation's, else `DEFAULT_POLICY` and the engine's) choose the
        resident set. Policies that do
        not evict prefill each question densely over the whole history. An eviction policy (snapkv, kvzip)
        decides once, at the first question's first cycle; every later question is prefilled over the pages it
        kept plus what came after them, and the decode keeps to that decision. The result carries the
        `Conversation` to continue (it holds the history's host memory while the result is referenced).
        options: `SamplingParams` fields.
        """
        from .saved import question_ids

        conversation = context.conversation if isinstance(context, GenerationResult) else None
        if isinstance(context, GenerationResult) and conversation is None:
            raise PromptError("this result does not continue a conversation: ask a question on a Prefill first")
        if conversation is None:
            policy = self._policy(DEFAULT_POLICY if policy is None else policy)
            ids = question_ids(self, context, question, chat) if isinstance(question, str) \
                else self._prompt_ids(question, chat=False)
            ids += self._prefix_ids(answer_prefix)
            extended = self._extend(context.host, context.prompt_ids, ids,
                                    options.get("max_new_tokens") or context.max_new_tokens, context.window,
                                    context.dense_device_peak, context.activations)
        else:
            if chat != conversation.chat:
                raise PromptError(f"this conversation was started with chat={conversation.chat}; ask with the same")
            if policy is not None and make_policy(policy).name != conversation.policy.name:
                raise ValueError(f"this conversation runs {conversation.policy.name!r}; it cannot go on with "
                                 f"{make_policy(policy).name!r}")
            policy = conversation.policy
            config = config or conversation.config
            extended = self._extend(conversation.host, conversation.ids,
                                    follow_up_ids(self, conversation, question) + self._prefix_ids(answer_prefix),
                                    options.get("max_new_tokens") or conversation.max_new_tokens,
                                    conversation.window, conversation.dense_device_peak, None, conversation.eviction)
        seq = self.submit_prefilled(extended, policy, config=config, on_token=on_token,
                                    eviction=conversation.eviction if conversation is not None else None, **options)
        seq.keep_history = True
        result = self._run_one(seq)
        last = seq.output_ids[-1] if seq.output_ids else None
        result.conversation = Conversation(
            extended.host, seq.prompt_ids + seq.output_ids[:-1], None if last in self._eos else last,
            seq.window_after, policy, seq.config, chat, seq.eviction, seq.sampling.max_new_tokens,
            seq.memory.dense_device_peak,
            (conversation.turns if conversation is not None else 0) + 1)
        return result

    def save(self, prefill: Prefill, path: str | os.PathLike, force: bool = False) -> Path:
        """Write a prefill to a `.fmkv` file atomically (`saved.save_context`); `force` replaces an existing file."""
        from .saved import SavedContextError, save_context

        if prefill.host.spills:
            raise SavedContextError("this prefill's history spilled to disk (host_memory): saving one is not "
                                    "supported yet; prefill it with an engine without host_memory to save it")
        return save_context(prefill, path, self, force=force)

    def load(self, path: str | os.PathLike, max_new_tokens: int | None = None) -> Prefill:
        """Read a `.fmkv` file saved from this backbone and chunk/page sizes (`saved.load_context`), with room
        for `max_new_tokens` new tokens (default: the room it was saved with). Under `host_memory`, a history
        beyond it is read whole, then moved into a capped mirror with a spill file."""
        from .saved import load_context

        prefill = load_context(path, self, max_new_tokens)
        capped = self._new_mirror(prefill.host.capacity)
        if capped.spills:  # beyond host_memory: the loaded history moves to a capped mirror, a page at a time
            self._copy_history(prefill.host, capped, prefill.host.length)
            prefill.host = capped
        return prefill


__all__ = ["LSAEngine", "GenerationResult", "GenerationReport", "Prefill", "PromptError", "AdmissionError",
           "MemoryUsage", "ContextLengthError"]
