"""The generation loop: dense chunked prefill, then cycles of sparse greedy decoding.

One prefill can serve many decodes (`decode` rewinds the cache to the prompt), which is what
makes comparing policies affordable on a CPU. The oracle's lookahead lives here because it
has to run the model ahead of the current step and then roll back.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch

from ..config import LSAConfig
from ..models.loader import Backbone
from ..policies import SelectionPolicy, make_policy
from .attention_mass import chunk_mass, token_attention
from .cache import ContextLengthError, LSACache
from .capture import ActivationRecorder


class PromptError(ValueError):
    """A prompt that cannot be run (empty, or longer than the model's context)."""


@dataclass
class GenerationReport:
    """Measured memory, transfers and timings of one generation."""

    policy: str
    prompt_tokens: int
    new_tokens: int
    cycles: int
    resident_fraction_per_cycle: list[float]
    resident_fraction_mean: float
    resident_fraction_max: float
    resident_pages_per_cycle: list[int]
    device_kv_bytes_peak: int          # resident KV bytes attention read on the device (peak over steps)
    device_kv_bytes_reserved: int      # bytes allocated for the device reserve
    host_kv_bytes_peak: int            # history bytes in the host mirror (peak)
    host_kv_bytes_reserved: int
    full_kv_bytes: int                 # a full cache of the final history
    prefill_device_kv_bytes_peak: int  # transient device KV of one dense layer during prefill
    index_bytes: int                   # the policy's chunk index (lsa's key store, quest's min/max), measured
    transfers: dict
    transfer_steps: list[int]          # decode step of every transfer (all at cycle starts)
    prefill_seconds: float
    decode_seconds: float
    decode_ms_per_token: float
    decode_ms: list[float]             # wall time of every decode step (a cycle start included where one fell)
    config: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    report: GenerationReport


@dataclass
class Prefill:
    """The state after a prompt's prefill, reusable by several decodes."""

    cache: LSACache
    prompt_ids: list[int]
    logits: torch.Tensor          # next-token logits after the prompt
    recorder_state: tuple
    seconds: float
    max_new_tokens: int
    dense_device_peak: int


class LSAEngine:
    """Greedy long-context generation with a tiered KV cache.

        engine = LSAEngine(load_backbone(), LSAConfig(budget=0.15))
        result = engine.generate("...long prompt...", policy="quest", max_new_tokens=64)
    """

    def __init__(self, backbone: Backbone, config: LSAConfig | None = None):
        self.backbone = backbone
        self.model = backbone.model
        self.tokenizer = backbone.tokenizer
        self.config = config or LSAConfig()
        self.device = next(self.model.parameters()).device
        self.recorder = ActivationRecorder(self.model)

    # ------------------------------------------------------------------ prompts
    def encode(self, prompt: str, chat: bool = False) -> list[int]:
        """Token ids of a prompt; `chat` wraps it in the model's chat template as a user turn."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise PromptError("the prompt is empty")
        if chat:
            if not getattr(self.tokenizer, "chat_template", None):
                raise PromptError("this model has no chat template; run without --chat")
            ids = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                     add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
            return list(ids)
        return self.tokenizer(prompt, add_special_tokens=True)["input_ids"]

    def _check_length(self, n_prompt: int, max_new_tokens: int) -> None:
        limit = self.backbone.max_context
        if n_prompt == 0:
            raise PromptError("the prompt is empty")
        if max_new_tokens < 1:
            raise PromptError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if limit and n_prompt + max_new_tokens > limit:
            raise PromptError(f"the prompt has {n_prompt} tokens; with {max_new_tokens} new tokens that exceeds "
                              f"the model's context of {limit} tokens")

    # ------------------------------------------------------------------ prefill
    @torch.no_grad()
    def prefill(self, prompt_ids: Sequence[int] | torch.Tensor, max_new_tokens: int = 64) -> Prefill:
        """Dense prefill in pieces of `config.prefill_chunk` tokens (bounded activation memory)."""
        ids = torch.as_tensor(prompt_ids, dtype=torch.long).flatten()
        self._check_length(ids.numel(), max_new_tokens)
        # room for the oracle's lookahead past the last token, within the model's context
        room = ids.numel() + max_new_tokens + self.config.tau
        cache = LSACache(self.model, self.config, policy="full", recorder=self.recorder,
                         max_length=min(room, self.backbone.max_context or room))
        start = time.perf_counter()
        logits = None
        for lo in range(0, ids.numel(), self.config.prefill_chunk):
            piece = ids[lo: lo + self.config.prefill_chunk].to(self.device)[None]
            out = self.model(input_ids=piece, past_key_values=cache, use_cache=True, logits_to_keep=1)
            logits = out.logits[0, -1].float()
        seconds = time.perf_counter() - start
        return Prefill(cache, ids.tolist(), logits, self.recorder.snapshot(), seconds, max_new_tokens,
                       cache.stats.dense_device_peak)

    # ------------------------------------------------------------------ decode
    @torch.no_grad()
    def decode(self, prefill: Prefill, policy: str | SelectionPolicy = "full", max_new_tokens: int | None = None,
               config: LSAConfig | None = None, stop_at_eos: bool = True) -> GenerationResult:
        """Greedy decoding from a prefill with `policy` choosing the resident set every tau steps."""
        n_new = prefill.max_new_tokens if max_new_tokens is None else max_new_tokens
        if n_new > prefill.max_new_tokens:
            raise ValueError(f"this prefill reserved room for {prefill.max_new_tokens} new tokens, asked {n_new}")
        self._check_length(len(prefill.prompt_ids), n_new)
        policy = make_policy(policy)
        cache = prefill.cache
        cache.rewind(len(prefill.prompt_ids))
        cache.restart(policy, config or self.config)
        self.recorder.restore(prefill.recorder_state)
        lookahead = (lambda: self._lookahead(cache, pending)) if policy.needs_lookahead else None
        eos = self._eos_ids() if stop_at_eos else set()

        tokens: list[int] = []
        step_ms: list[float] = []
        pending = int(prefill.logits.argmax())
        for step in range(n_new):
            tokens.append(pending)
            if pending in eos or step == n_new - 1:
                break
            t0 = time.perf_counter()
            if not cache.sparse or cache._cycle_step >= cache.config.tau:
                cache.start_cycle(lookahead)
            inp = torch.tensor([[pending]], device=self.device)
            logits = self.model(input_ids=inp, past_key_values=cache, use_cache=True).logits[0, -1]
            pending = int(logits.argmax())  # .item() synchronises, so the step time is real
            step_ms.append(1000.0 * (time.perf_counter() - t0))
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        return GenerationResult(text, tokens, self._report(cache, policy, prefill, len(tokens), step_ms))

    def generate(self, prompt: str | Sequence[int], policy: str | SelectionPolicy = "full",
                 max_new_tokens: int = 64, chat: bool = False, config: LSAConfig | None = None) -> GenerationResult:
        """Prefill then decode in one call."""
        ids = self.encode(prompt, chat=chat) if isinstance(prompt, str) else list(prompt)
        make_policy(policy)  # fail on an unknown policy before the (slow) prefill
        return self.decode(self.prefill(ids, max_new_tokens), policy, max_new_tokens, config)

    def _eos_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id if self.model.generation_config else None
        eos = eos if eos is not None else self.tokenizer.eos_token_id
        return set(eos) if isinstance(eos, (list, tuple)) else ({eos} if eos is not None else set())

    # ------------------------------------------------------------------ oracle support
    def _lookahead(self, cache: LSACache, first_token: int) -> torch.Tensor:
        """Decode tau tokens ahead with the full history, record per-layer chunk attention, roll back.

        Returns [steps, layers, chunks] attention mass of each future token.
        """
        cfg = cache.config
        saved = self.recorder.snapshot()
        base = cache.length
        masses = []
        token = first_token
        with cache.dense_scope():
            for _ in range(min(cfg.tau, cache.max_length - cache.length)):
                inp = torch.tensor([[token]], device=self.device)
                logits = self.model(input_ids=inp, past_key_values=cache, use_cache=True).logits[0, -1]
                token = int(logits.argmax())
                per_layer = []
                for layer, q in enumerate(self.recorder.queries()):
                    k = cache.host.k[layer, :, : cache.length].to(q.device)
                    per_layer.append(chunk_mass(token_attention(q, k), cfg.chunk_size)[0])
                masses.append(torch.stack(per_layer).cpu())
            cache.rewind(base)
        self.recorder.restore(saved)
        n = base // cfg.chunk_size
        return torch.stack([m[:, :n] for m in masses])

    # ------------------------------------------------------------------ report
    def _report(self, cache: LSACache, policy: SelectionPolicy, prefill: Prefill, n_tokens: int,
                step_ms: list[float]) -> GenerationReport:
        cycles = cache.stats.cycles
        fractions = [c.resident_fraction for c in cycles]
        mem = cache.stats.memory
        decode_s = sum(step_ms) / 1000.0  # the first token comes from the prefill's logits
        return GenerationReport(
            policy=policy.name, prompt_tokens=len(prefill.prompt_ids), new_tokens=n_tokens, cycles=len(cycles),
            resident_fraction_per_cycle=fractions,
            resident_fraction_mean=sum(fractions) / len(fractions) if fractions else 0.0,
            resident_fraction_max=max(fractions) if fractions else 0.0,
            resident_pages_per_cycle=[c.pages for c in cycles],
            device_kv_bytes_peak=mem.device_kv_bytes_peak, device_kv_bytes_reserved=mem.device_reserved_bytes,
            host_kv_bytes_peak=mem.host_kv_bytes_peak, host_kv_bytes_reserved=mem.host_reserved_bytes,
            full_kv_bytes=cache.full_kv_bytes, prefill_device_kv_bytes_peak=prefill.dense_device_peak,
            index_bytes=policy.index_bytes(),
            transfers=cache.stats.transfers.to_dict(), transfer_steps=list(cache.stats.transfers.steps),
            prefill_seconds=prefill.seconds, decode_seconds=decode_s,
            decode_ms_per_token=sum(step_ms) / max(1, len(step_ms)), decode_ms=step_ms,
            config=cache.config.to_dict())


__all__ = ["LSAEngine", "GenerationResult", "GenerationReport", "Prefill", "PromptError", "ContextLengthError"]
