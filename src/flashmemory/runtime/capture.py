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


class Activations:
    """Attention inputs of some tokens at every layer, with their rotary cos/sin: what policies read."""

    def __init__(self, modules: list[nn.Module], inputs: list[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor):
        self.modules, self.inputs, self.cos, self.sin = modules, inputs, cos, sin

    def hidden(self, layer: int) -> torch.Tensor:
        """[tokens, hidden] attention input (after the layer's input norm) of `layer`."""
        return self.inputs[layer]

    @torch.no_grad()
    def queries(self, layers: list[int] | None = None) -> list[torch.Tensor]:
        """Post-RoPE queries [tokens, heads, head_dim] of these tokens, per layer."""
        layers = range(len(self.modules)) if layers is None else layers
        return [project_queries(self.modules[i], self.inputs[i], self.cos, self.sin) for i in layers]


class ActivationRecorder:
    """Keeps each attention layer's input for the last token of every row (or, with `keep_all`, for
    every token of row 0) of the latest forward."""

    def __init__(self, model: nn.Module, keep_all: bool = False):
        self.modules = attention_modules(model)
        self.keep_all = keep_all
        self.inputs: list[torch.Tensor | None] = [None] * len(self.modules)
        self.cos: torch.Tensor | None = None
        self.sin: torch.Tensor | None = None
        self._handles = [m.register_forward_pre_hook(self._hook(i), with_kwargs=True)
                         for i, m in enumerate(self.modules)]

    def _pick(self, x: torch.Tensor) -> torch.Tensor:
        return (x[0] if self.keep_all else x[:, -1]).detach().clone()

    def _hook(self, layer: int):
        def hook(module, args, kwargs):
            self.inputs[layer] = self._pick(kwargs.get("hidden_states", args[0] if args else None))
            if layer == 0:
                cos, sin = kwargs["position_embeddings"]
                self.cos, self.sin = self._pick(cos), self._pick(sin)
        return hook

    def row(self, b: int) -> Activations:
        """The last token of batch row `b` in the latest forward."""
        if self.cos is None:
            raise RuntimeError("no forward pass recorded yet")
        r = slice(b, b + 1)
        return Activations(self.modules, [x[r] for x in self.inputs], self.cos[r], self.sin[r])

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
