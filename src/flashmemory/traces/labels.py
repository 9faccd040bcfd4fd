"""Golden labels: which chunks the backbone's real attention needs in the next tau steps.

Definition (the paper's, with every parameter exposed):
  1. At each attention layer and query position s, the attention distribution over the keys
     0..s (causal) is summed into chunks of `chunk_size` tokens. Grouped-query heads: each
     query head has its own softmax; the layer's distribution is the mean over all query
     heads (every head counts equally, whichever KV head it shares), as in
     `runtime.attention_mass.token_attention` and the `oracle` policy.
  2. The layer keeps the smallest set of chunks whose mass reaches `top_p` (0.6). The
     unfinished chunk that holds s takes part (it is usually heavy), so the sets are exactly
     those of real attention.
  3. votes[s, c] = how many layers kept chunk c. A chunk is golden at s when
     votes >= `min_layers`.
  4. The positives of an anchor a (the last decoded token when a cycle starts; the cycle's
     queries are a+1 .. a+tau) are the union of golden chunks over those positions. The
     union of "votes >= m" equals "max votes >= m", so the dump stores the window maximum
     of the votes (uint8) and `min_layers` can still be changed when training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..runtime.attention_mass import chunk_mass, top_p_mask


def causal_chunk_mass(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Head-mean attention mass per chunk for queries at `positions` over causally visible keys.

    q: [S, heads, head_dim] post-RoPE queries; k: [kv_heads, T, head_dim] post-RoPE keys with
    T > max(positions); returns [S, ceil(T / chunk_size)] (each row sums to 1).
    """
    S, heads, dim = q.shape
    kv_heads, T, _ = k.shape
    group = heads // kv_heads
    qg = q.float().reshape(S, kv_heads, group, dim).permute(1, 0, 2, 3).reshape(kv_heads, S * group, dim)
    logits = torch.bmm(qg, k.float().transpose(1, 2)) / math.sqrt(dim)      # [kv, S*group, T]
    future = torch.arange(T)[None, :] > positions.repeat_interleave(group)[:, None]
    logits.masked_fill_(future[None], float("-inf"))
    probs = torch.softmax(logits, dim=-1).reshape(kv_heads, S, group, T).mean(dim=(0, 2))
    return chunk_mass(probs, chunk_size)


def layer_votes(queries: list[torch.Tensor], keys: list[torch.Tensor], positions: torch.Tensor,
                chunk_size: int, top_p: float, block: int = 128) -> torch.Tensor:
    """votes [S, ceil(T / chunk_size)] uint8: for each query position, how many layers keep each chunk.

    queries: per layer [S, heads, head_dim]; keys: per layer [kv_heads, T, head_dim].
    Positions are processed in blocks of `block` to bound memory (a block costs
    kv_heads * block * group * T floats); each block only looks at the keys it can see.
    """
    if len(queries) != len(keys) or not queries:
        raise ValueError("need one query tensor and one key tensor per label layer")
    T = keys[0].shape[1]
    n = -(-T // chunk_size)
    votes = torch.zeros(len(positions), n, dtype=torch.uint8)
    for start in range(0, len(positions), block):
        rows = slice(start, start + block)
        pos = positions[rows]
        visible = int(pos.max()) + 1
        for q, k in zip(queries, keys):
            mass = causal_chunk_mass(q[rows], k[:, :visible], pos, chunk_size)
            keep = top_p_mask(mass, top_p)
            votes[rows, : keep.shape[1]] += keep.to(torch.uint8)
    return votes


def window_max(votes: torch.Tensor, vote_positions: torch.Tensor, anchors: torch.Tensor, tau: int) -> torch.Tensor:
    """[A, n] maximum of votes over the labelled positions in (a, a + tau] for every anchor a.

    Anchors whose window holds no labelled position get all zeros.
    """
    out = torch.zeros(len(anchors), votes.shape[1], dtype=votes.dtype)
    for i, a in enumerate(anchors.tolist()):
        sel = (vote_positions > a) & (vote_positions <= a + tau)
        if sel.any():
            out[i] = votes[sel].amax(0)
    return out


@dataclass(frozen=True)
class Population:
    """Which chunks of an anchor's history count for training and metrics.

    At a cycle that starts with `a + 1` history tokens the runtime keeps the sink pages, the
    last `tail_tokens` of complete pages and the unfinished page resident whatever the policy
    says, so only the complete chunks between sink and tail are the indexer's to choose. The sizes
    come from the dump (DumpConfig, whose defaults are LSAConfig's) or training overrides.
    """

    chunk_size: int
    page_size: int
    sink_tokens: int
    tail_tokens: int

    def bounds(self, anchor: int) -> tuple[int, int]:
        """[lo, hi) chunk indices the indexer chooses among for the cycle after `anchor`."""
        cpp = self.page_size // self.chunk_size
        n_pages = (anchor + 1) // self.page_size
        sink_pages = -(-self.sink_tokens // self.page_size)
        tail_pages = -(-self.tail_tokens // self.page_size)
        lo = min(sink_pages, n_pages) * cpp
        hi = max(lo, (n_pages - tail_pages) * cpp)
        return lo, hi

    def mask(self, anchors: torch.Tensor, n_chunks: int) -> torch.Tensor:
        """[A, n_chunks] bool: the selectable chunks of each anchor."""
        idx = torch.arange(n_chunks)
        out = torch.zeros(len(anchors), n_chunks, dtype=torch.bool)
        for i, a in enumerate(anchors.tolist()):
            lo, hi = self.bounds(a)
            out[i] = (idx >= lo) & (idx < hi)
        return out
