"""Oracle: the backbone's real attention over the next tau steps (an evaluation upper bound)."""

from __future__ import annotations

import torch

from ..runtime.attention_mass import top_p_mask
from .base import SelectionContext, SelectionPolicy


class OraclePolicy(SelectionPolicy):
    """Decodes tau steps ahead with the full cache, then keeps the chunks that attention used.

    A chunk's score is how many (step, layer) pairs put it in their top-p attention set,
    with the total attention mass breaking ties. Only `LSAEngine` can provide the lookahead.
    """

    name = "oracle"
    needs_queries = True
    needs_lookahead = True

    def __init__(self, top_p: float = 0.6) -> None:
        self.top_p = top_p

    def score(self, ctx: SelectionContext) -> torch.Tensor:
        if ctx.lookahead is None:
            raise RuntimeError("the oracle policy decodes ahead; run it through LSAEngine, not model.generate")
        mass = ctx.lookahead()[..., : ctx.n_chunks]  # [steps, layers, n_chunks]
        votes = top_p_mask(mass, self.top_p).sum(dim=(0, 1)).float()
        return votes + mass.sum(dim=(0, 1)) / (mass.sum() + 1e-9)
