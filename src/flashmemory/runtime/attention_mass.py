"""How much of a query's attention falls on each chunk: the ground truth behind the
`oracle` policy and the indexer's golden labels.

Grouped-query heads: every query head yields a distribution over tokens; a layer's
distribution is the mean over all its query heads (each sums to one, so the mean does too).
"""

from __future__ import annotations

import math

import torch


def token_attention(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Head-mean attention probabilities.

    q: [tokens, heads, head_dim] post-RoPE queries; k: [kv_heads, T, head_dim] post-RoPE keys,
    every key visible to every query. Returns [tokens, T].
    """
    n_tok, heads, dim = q.shape
    kv_heads, _, _ = k.shape
    group = heads // kv_heads
    qg = q.float().reshape(n_tok, kv_heads, group, dim).permute(1, 0, 2, 3).reshape(kv_heads, n_tok * group, dim)
    logits = torch.bmm(qg, k.float().transpose(1, 2)) / math.sqrt(dim)  # [kv_heads, tok*group, T]
    probs = torch.softmax(logits, dim=-1)
    return probs.reshape(kv_heads, n_tok, group, -1).mean(dim=(0, 2))


def chunk_mass(token_probs: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Sum token probabilities [..., T] into chunks [..., ceil(T / chunk_size)]."""
    T = token_probs.shape[-1]
    pad = (-T) % chunk_size
    if pad:
        token_probs = torch.nn.functional.pad(token_probs, (0, pad))
    return token_probs.reshape(*token_probs.shape[:-1], -1, chunk_size).sum(-1)


def top_p_mask(mass: torch.Tensor, p: float) -> torch.Tensor:
    """The smallest set of chunks whose cumulative mass reaches `p` (per row of [..., n])."""
    order = torch.argsort(mass, dim=-1, descending=True)
    sorted_mass = torch.gather(mass, -1, order)
    before = torch.cumsum(sorted_mass, dim=-1) - sorted_mass
    keep_sorted = before < p  # keep each chunk until the mass before it already reaches p
    mask = torch.zeros_like(keep_sorted)
    return mask.scatter(-1, order, keep_sorted)


def causal_attention(q: torch.Tensor, k: torch.Tensor, first: int) -> torch.Tensor:
    """Attention probabilities of every query head, causally masked.

    q: [n, heads, head_dim] post-RoPE queries of the tokens at positions first .. first + n - 1;
    k: [kv_heads, T, head_dim] post-RoPE keys of positions 0 .. T - 1. Returns [kv_heads, group, n, T].
    """
    n, heads, dim = q.shape
    kv_heads, T, _ = k.shape
    qg = q.float().reshape(n, kv_heads, heads // kv_heads, dim).permute(1, 2, 0, 3)
    logits = qg @ k.float().transpose(1, 2)[:, None] / math.sqrt(dim)
    future = torch.arange(T, device=q.device)[None] > torch.arange(first, first + n, device=q.device)[:, None]
    return torch.softmax(logits.masked_fill(future, float("-inf")), dim=-1)
