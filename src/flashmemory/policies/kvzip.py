"""KVzip (Kim et al., 2025) as an eviction policy over chunks: query-agnostic context reconstruction.

The runtime asks the model to repeat its history (a repeat instruction, then the history's own
tokens, teacher-forced, over the history's KV) and records, for every history token, the most
attention it receives from any reconstruction query at each layer and KV head (the query heads
of a group included): `SelectionContext.reconstruction`. A chunk's score is the largest of its
tokens' scores, averaged over KV heads and layers. These extra forward passes cost about one
prefill of the history, attending over twice its length; the report gives their seconds
(`scoring_forward_seconds`). It evicts: the pages it keeps at the first cycle are all it ever
sees of the prompt (`base.Eviction`).
"""

from __future__ import annotations

import torch

from .base import SelectionContext, SelectionPolicy

#: What the model is asked before it repeats its history (KVzip's reconstruction prompt).
REPEAT_PROMPT = "\n\nRepeat the previous context exactly.\n\n"


class KVzipPolicy(SelectionPolicy):
    """Keeps the chunks the model attends to most while reconstructing its context; decides once, never recalls."""

    name = "kvzip"
    evicts = True
    needs_reconstruction = True

    def score(self, ctx: SelectionContext) -> torch.Tensor:
        if ctx.reconstruction is None:
            raise RuntimeError("kvzip reconstructs the context with extra forward passes; run it through LSAEngine")
        token_max = ctx.reconstruction()  # [layers, kv_heads, length]
        C = ctx.config.chunk_size
        chunks = token_max[:, :, : ctx.n_chunks * C].float().reshape(*token_max.shape[:2], ctx.n_chunks, C)
        return chunks.amax(-1).mean(dim=(0, 1)).cpu()
