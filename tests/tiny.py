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
    "gemma3": None,  # hybrid sliding-window / global layers, see tiny_gemma3
}


def tiny_model(arch: str = "llama", seed: int = 0) -> torch.nn.Module:
    if arch == "gemma3":
        return tiny_gemma3(seed)
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


def tiny_gemma3(seed: int = 0, window: int = 64) -> torch.nn.Module:
    """A hybrid model: sliding-window layers with two global ones, as Gemma 3 (window kept small)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                              num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=4096,
                              sliding_window=window, query_pre_attn_scalar=16,
                              layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
                              architectures=["Gemma3ForCausalLM"], attn_implementation="sdpa")
    torch.manual_seed(seed)
    return Gemma3ForCausalLM(config).eval()
