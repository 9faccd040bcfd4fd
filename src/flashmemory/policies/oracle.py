"""Oracle: the backbone's real attention over the next tau steps (an evaluation upper bound)."""

from __future__ import annotations

import torch

from .base import SelectionContext, SelectionPolicy


class OraclePolicy(SelectionPolicy):
    """Decodes tau steps ahead with the full cache, then keeps the chunks that attention used.

    A chunk's score is the largest share of attention (averaged over layers) that any of the
    next tau tokens gives it. The max over steps matters: a needle is read by the few tokens
    that state the answer, and summing over all steps would drown it in the chunks that every
    token glances at. Only `LSAEngine` can provide the lookahead.
    """

    name = "oracle"
    needs_lookahead = True

    def score(self, ctx: SelectionContext) -> torch.Tensor:
        if ctx.lookahead is None:
            raise RuntimeError("the oracle policy decodes ahead; run it through LSAEngine, not model.generate")
        mass = ctx.lookahead()[..., : ctx.n_chunks]  # [steps, layers, n_chunks]
        return mass.mean(dim=1).amax(dim=0)
