"""Shared by the decode benchmarks: random-weight backbones of real shapes and synthetic prefills.

A CPU prefill of 32K-128K tokens is impractical, so a benchmark fills a host mirror with random
post-RoPE K/V and decodes from it; the model's own one-token forward provides real activations
for the first selection. Sequences of one context share one synthetic history tensor (each has
its own length and device pages; the tokens they decode overwrite each other's in that tensor,
which changes values, not the work done).
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from flashmemory import LSAEngine, Prefill
from flashmemory.indexer.checkpoint import DEFAULT_DIR, load_indexer
from flashmemory.memory.pools import HostMirror
from flashmemory.policies.lsa import LSAPolicy

SHAPES = {
    # SmolLM2-135M (Llama): 30 layers, 3 KV heads of 64
    "smollm2-135m": (LlamaForCausalLM, LlamaConfig, dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                                         num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                                                         vocab_size=49152, rope_theta=1e5, tie_word_embeddings=True)),
    # Qwen2.5-0.5B (Qwen2): 24 layers, 2 KV heads of 64 (vocab cut to keep the random model small)
    "qwen2.5-0.5b": (Qwen2ForCausalLM, Qwen2Config, dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                                         num_attention_heads=14, num_key_value_heads=2, vocab_size=32000,
                                                         rope_theta=1e6, tie_word_embeddings=True)),
    # Llama-3-8B (bf16 on a GPU): 32 layers, 8 KV heads of 128
    "llama3-8b": (LlamaForCausalLM, LlamaConfig, dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                                      num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                                                      vocab_size=128256, rope_theta=5e5)),
}


def build(shape: str, max_len: int, device: torch.device | str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    model_cls, config_cls, kw = SHAPES[shape]
    config = config_cls(max_position_embeddings=max_len, attn_implementation="sdpa",
                        architectures=[model_cls.__name__], **kw)
    torch.manual_seed(0)
    with torch.device(device):
        model = model_cls(config).to(dtype)
    return model.eval()


def shipped_lsa() -> LSAPolicy:
    """The shipped SmolLM2 indexer, unbound from its backbone's fingerprint (the random model of the
    same shape differs in its context length only), so lsa does its real scoring work."""
    indexer = load_indexer(DEFAULT_DIR)
    indexer.cfg.fingerprint = None
    return LSAPolicy(checkpoint=indexer)


def synthetic_history(engine: LSAEngine, context: int, room: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random post-RoPE K/V of `context` tokens, with room for `room` more, in (pinned) host memory."""
    s = engine.shape
    size = (s.layers, s.kv_heads, context + room, s.head_dim)
    gen = torch.Generator().manual_seed(seed)
    pin = engine.device.type == "cuda"
    k = torch.empty(size, dtype=s.dtype, pin_memory=pin)
    v = torch.empty(size, dtype=s.dtype, pin_memory=pin)
    k[:, :, :context].normal_(generator=gen)
    v[:, :, :context].normal_(generator=gen)
    return k, v


def synthetic_prefill(engine: LSAEngine, history: tuple[torch.Tensor, torch.Tensor], context: int,
                      max_new_tokens: int, seed: int = 0) -> Prefill:
    """A prefill of `context` synthetic tokens over a shared history (one per decoding sequence); on a
    hybrid model the sliding layers' rings hold random K/V."""
    one = engine.prefill([1], max_new_tokens=1)  # real activations and logits of one token
    host = HostMirror.over(engine.shape, history[0], history[1], context)
    window = None
    if one.window is not None:
        gen = torch.Generator().manual_seed(seed)
        window = tuple(torch.randn(w.shape, generator=gen, dtype=w.dtype) for w in one.window)
    return Prefill(host, [1] * context, one.logits, one.activations, 0.0, max_new_tokens, 0, window=window)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
