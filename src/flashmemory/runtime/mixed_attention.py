"""Attention for a mixed forward: decode tokens and a prefill piece packed in one row.

The engine packs B decode tokens (one per sequence) and a prompt piece of n tokens as one row
of B + n tokens, so that every linear layer runs once for all of them (vLLM's mixed batch). Only
attention must tell them apart: each cache layer returns `Segments` (the decode rows' gathered
keys, the piece's history) and `segmented_attention` runs transformers' SDPA attention once on
the decode rows, shaped as in a decode forward, and once on the piece, shaped as in a dense one.

`packed_attention(model)` switches the model to it for one forward. Its name is not a mask
function, so transformers builds no mask for that forward: the masks come from the cache's plan.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ..memory.pools import KVShape, LayerLayout, text_config
from .cache import Segments

NAME = "flashmemory_segmented"


def segmented_attention(module: torch.nn.Module, query: torch.Tensor, key: Segments, value: Segments,
                        attention_mask: torch.Tensor | None, **kwargs) -> tuple[torch.Tensor, None]:
    """query [1, heads, B + n, head_dim] -> output [1, B + n, heads, head_dim]."""
    b = key.decode.shape[0]
    rows = query[0, :, :b].transpose(0, 1).unsqueeze(2)  # [B, heads, 1, head_dim]
    out_rows, _ = sdpa_attention_forward(module, rows, key.decode, value.decode, key.decode_mask, **kwargs)
    out_piece, _ = sdpa_attention_forward(module, query[:, :, b:], key.piece, value.piece, key.piece_mask, **kwargs)
    return torch.cat([out_rows.transpose(0, 1), out_piece], dim=1), None


AttentionInterface.register(NAME, segmented_attention)


def can_pack(model: torch.nn.Module) -> bool:
    """Mixed forwards reuse transformers' SDPA attention, so they are used for models that run SDPA."""
    return getattr(model.config, "_attn_implementation", None) == "sdpa"


@contextmanager
def packed_attention(model: torch.nn.Module) -> Iterator[None]:
    """Run the model's attention layers with `segmented_attention` inside the block."""
    config = model.config
    before = config._attn_implementation
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = before


@dataclass(frozen=True)
class PieceCost:
    """Floating-point work of a prompt piece, to keep mixed steps equally long along a prompt.

    A piece of n tokens at history position s costs about n * linear (every weight matrix once per
    token) plus attention * n * (s + n / 2) (a causal query-key pair in every global layer); sliding
    layers' attention is bounded by their window and counted in neither. Late pieces of a long
    prompt attend over more history, so at equal length they take longer, and every decode token
    beside them waits that long.
    """

    linear: float     # flops per token of the decoder layers' weight matrices
    attention: float  # flops per query-key pair, summed over the global layers

    @classmethod
    def of(cls, model: torch.nn.Module, layout: LayerLayout) -> "PieceCost":
        decoder = getattr(model, "model", model).layers
        weights = sum(m.weight.numel() for m in decoder.modules() if isinstance(m, torch.nn.Linear))
        heads = text_config(model).num_attention_heads
        return cls(2.0 * weights, 4.0 * len(layout.tiered) * heads * KVShape.of(model).head_dim)

    def work(self, n: int, start: int) -> float:
        return n * self.linear + self.attention * n * (start + n / 2)

    def tokens(self, size: int, start: int) -> int:
        """The most tokens a piece at `start` may hold to cost no more than `size` tokens at the prompt's start."""
        budget, b = self.work(size, 0), self.linear + self.attention * start
        a = self.attention / 2
        n = budget / b if a == 0 else (-b + math.sqrt(b * b + 4 * a * budget)) / (2 * a)
        return max(1, min(size, int(n)))
