"""Reading what the backbone already computes: attention inputs and queries, via hooks.

Policies score chunks from the last decoded token's state. Rather than a second forward
pass, forward pre-hooks on every attention module keep that layer's (normalised) input and
its rotary cos/sin; a query is re-projected only when a policy asks for one.
"""

from __future__ import annotations

import torch
from torch import nn


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention module of every decoder layer, in order."""
    layers = getattr(getattr(model, "model", model), "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no decoder layers at model.layers")
    return [layer.self_attn for layer in layers]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def project_queries(attn: nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Post-RoPE queries [tokens, heads, head_dim] exactly as the attention module forms them."""
    head_dim = attn.head_dim
    q = attn.q_proj(hidden).view(*hidden.shape[:-1], -1, head_dim)  # [..., tokens, heads, head_dim]
    if getattr(attn, "q_norm", None) is not None:  # Qwen3 normalises each head before RoPE
        q = attn.q_norm(q)
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    q = q * cos + _rotate_half(q) * sin
    return q.reshape(-1, q.shape[-2], head_dim)


class ActivationRecorder:
    """Keeps each attention layer's input for the last token (or all tokens) of every forward."""

    def __init__(self, model: nn.Module, keep_all: bool = False):
        self.modules = attention_modules(model)
        self.keep_all = keep_all
        n = len(self.modules)
        self.inputs: list[torch.Tensor | None] = [None] * n
        self.cos: torch.Tensor | None = None
        self.sin: torch.Tensor | None = None
        self._handles = [m.register_forward_pre_hook(self._hook(i), with_kwargs=True)
                         for i, m in enumerate(self.modules)]

    def _hook(self, layer: int):
        def hook(module, args, kwargs):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            rows = slice(None) if self.keep_all else slice(-1, None)
            self.inputs[layer] = hidden[0, rows].detach().clone()
            if layer == 0:
                cos, sin = kwargs["position_embeddings"]
                self.cos, self.sin = cos[0, rows].detach().clone(), sin[0, rows].detach().clone()
        return hook

    @property
    def ready(self) -> bool:
        return self.cos is not None and all(x is not None for x in self.inputs)

    def hidden(self, layer: int) -> torch.Tensor:
        """[tokens, hidden] attention input (after the layer's input norm) of `layer`."""
        if self.inputs[layer] is None:
            raise RuntimeError("no forward pass recorded yet")
        return self.inputs[layer]

    @torch.no_grad()
    def queries(self, layers: list[int] | None = None) -> list[torch.Tensor]:
        """Post-RoPE queries [tokens, heads, head_dim] of the recorded tokens, per layer."""
        if not self.ready:
            raise RuntimeError("no forward pass recorded yet")
        layers = range(len(self.modules)) if layers is None else layers
        return [project_queries(self.modules[i], self.inputs[i], self.cos, self.sin) for i in layers]

    def snapshot(self) -> tuple:
        return list(self.inputs), self.cos, self.sin

    def restore(self, state: tuple) -> None:
        inputs, self.cos, self.sin = state
        self.inputs = list(inputs)

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
