"""Tiny random-weight models of every supported architecture, for fast shape and behaviour tests."""

from __future__ import annotations

import torch
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

COMMON = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=4096)

ARCHITECTURES = {
    "llama": (LlamaForCausalLM, LlamaConfig, {}),
    "mistral": (MistralForCausalLM, MistralConfig, {"sliding_window": None}),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config, {}),
    "qwen3": (Qwen3ForCausalLM, Qwen3Config, {"head_dim": 16}),
}


def tiny_model(arch: str = "llama", seed: int = 0) -> torch.nn.Module:
    model_cls, config_cls, extra = ARCHITECTURES[arch]
    config = config_cls(**COMMON, **extra, architectures=[model_cls.__name__], attn_implementation="sdpa")
    torch.manual_seed(seed)
    return model_cls(config).eval()


def random_prompts(lengths, seed: int = 1, vocab: int = 512) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    """transformers' own greedy generate: the reference every stock-path test compares with."""
    t = torch.tensor([ids])
    out = model.generate(t, attention_mask=torch.ones_like(t), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()
