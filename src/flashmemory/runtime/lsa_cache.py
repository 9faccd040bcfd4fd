"""LSACache: the tiered cache for one sequence inside transformers' own `model.generate`.

    cache = LSACache(model, LSAConfig(budget=0.2), policy="quest", max_length=8192)
    model.generate(**inputs, past_key_values=cache, do_sample=False)
    cache.close()   # or `with LSACache(...) as cache:`

A forward pre-hook on the model is the explicit entry point of each step: it plans a dense
forward for a multi-token input (the prompt) and, for a one-token input, lets the cycle
scheduler start a cycle where one is due, then plans a decode step; a forward hook commits it.
Batch size 1; `LSAEngine` is the batched runtime. The oracle needs `LSAEngine` (it decodes ahead).
"""

from __future__ import annotations

import torch

from ..config import LSAConfig
from ..memory.block_pool import BlockPool
from ..memory.mover import PageMover
from ..memory.pools import DevicePool, HostMirror, KVShape, LayerLayout
from ..policies import SelectionPolicy, make_policy
from .cache import ContextLengthError, TieredCache
from .capture import ActivationRecorder
from .cycles import CycleScheduler
from .sampling import SamplingParams
from .sequence import Sequence, Status


class LSACache(TieredCache):
    """A transformers Cache that keeps every token on the host and a budgeted subset on the device."""

    def __init__(self, model: torch.nn.Module, config: LSAConfig | None = None,
                 policy: str | SelectionPolicy = "full", max_length: int | None = None):
        config = config or LSAConfig()
        policy = make_policy(policy)
        policy.bind(model)
        layout = LayerLayout.of(model)
        shape = KVShape.of(model, len(layout.tiered))
        model_max = int(getattr(model.config, "max_position_embeddings", 0) or 0)
        max_length = int(max_length or model_max)
        if max_length <= 0:
            raise ContextLengthError("max_length must be positive")
        if model_max and max_length > model_max:
            raise ContextLengthError(f"max_length {max_length} exceeds the model's context of {model_max} tokens")
        device = next(model.parameters()).device
        self.sequence = Sequence(0, [], policy, config, SamplingParams(), max_length)
        self.sequence.host = HostMirror(shape, max_length, pin=device.type == "cuda")
        self.sequence.memory.host_reserved_bytes = self.sequence.host.allocated_bytes
        n_slots = self.sequence.reserved_pages
        window_pool = None
        if layout.sliding:  # one ring of the last `window` tokens for every sliding layer
            window_pool = DevicePool(KVShape.of(model, len(layout.sliding)), 1, layout.window, device)
            self.sequence.window_slot = 0
        super().__init__(DevicePool(shape, n_slots, config.page_size, device), layout, window_pool)
        self.blocks = BlockPool(n_slots)
        self.blocks.reserve(n_slots)
        self.scheduler = CycleScheduler(self.pool, self.blocks, PageMover(self.pool), layers=layout.tiered)
        self.recorder = ActivationRecorder(model, keep_last=config.observation_window)
        self._hooks = [model.register_forward_pre_hook(self._before, with_kwargs=True),
                       model.register_forward_hook(self._after, with_kwargs=True)]

    def _before(self, module, args, kwargs) -> None:
        if kwargs.get("past_key_values") is not self:
            return
        ids = kwargs.get("input_ids")
        if ids is None or ids.shape[0] != 1:
            raise ValueError("LSACache takes input_ids of batch size 1 (LSAEngine decodes batches)")
        seq, n = self.sequence, ids.shape[1]
        if n > 1 or seq.status is not Status.DECODE:
            if seq.status is Status.DECODE:
                raise ValueError("LSACache cannot take a multi-token input after decoding started")
            if seq.length + n > seq.max_length:
                raise ContextLengthError(f"{seq.length + n} tokens exceed the cache's max_length of {seq.max_length}")
            self.plan_dense(seq, seq.length, n)
        else:
            self.scheduler.before_decode([seq])
            self.plan_decode([seq])

    def _after(self, module, args, kwargs, output) -> None:
        if kwargs.get("past_key_values") is not self or self.plan is None:
            return
        seq = self.sequence
        if self.plan.dense:
            seq.length = seq.host.length = self.plan.start + self.plan.q_len
            seq.status = Status.DECODE  # the next one-token forward decodes
            self.plan = None
        else:
            self.finish_decode()
        seq.activations = self.recorder.row(0)

    @property
    def cycles(self):
        """The cycles so far (start step, history length, pages, resident fraction)."""
        return self.sequence.cycles

    @property
    def transfers(self):
        return self.sequence.transfers

    @property
    def memory(self):
        return self.sequence.memory

    def close(self) -> None:
        """Remove the hooks this cache installed on the model."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self.recorder.close()

    def __enter__(self) -> "LSACache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
