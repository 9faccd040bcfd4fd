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
    """Attention inputs of some tokens at every layer, with each layer's rotary cos/sin: what policies read."""

    def __init__(self, modules: list[nn.Module], inputs: list[torch.Tensor], cos: list[torch.Tensor],
                 sin: list[torch.Tensor]):
        self.modules, self.inputs, self.cos, self.sin = modules, inputs, cos, sin

    def hidden(self, layer: int) -> torch.Tensor:
        """[tokens, hidden] attention input (after the layer's input norm) of `layer`."""
        return self.inputs[layer]

    @torch.no_grad()
    def queries(self, layers: list[int] | None = None) -> list[torch.Tensor]:
        """Post-RoPE queries [tokens, heads, head_dim] of these tokens, per layer."""
        layers = range(len(self.modules)) if layers is None else layers
        return [project_queries(self.modules[i], self.inputs[i], self.cos[i], self.sin[i]) for i in layers]

    @property
    def tokens(self) -> int:
        return self.inputs[0].shape[0]

    def last(self, n: int = 1) -> "Activations":
        """The same for the last n tokens only."""
        r = slice(-n, None)
        return Activations(self.modules, [x[r] for x in self.inputs], [c[r] for c in self.cos], [s[r] for s in self.sin])

    def then(self, later: "Activations", keep: int) -> "Activations":
        """These tokens followed by `later`'s, the last `keep` of them."""
        if later.tokens >= keep:
            return later.last(keep)
        def join(a: list[torch.Tensor], b: list[torch.Tensor]) -> list[torch.Tensor]:
            return [torch.cat([x.to(y.device), y]) for x, y in zip(a, b)]

        return Activations(later.modules, join(self.inputs, later.inputs), join(self.cos, later.cos),
                           join(self.sin, later.sin)).last(keep)


class ActivationRecorder:
    """Keeps each attention layer's input and rotary cos/sin for the last `keep_last` tokens of every row
    (or, with `keep_all`, for every token of row 0; or, after `keep_tokens`, for those tokens of row 0)
    of the latest forward.

    Layers may use different rotary tables (hybrid models rotate sliding and global layers
    differently), so cos/sin are kept per layer.
    """

    def __init__(self, model: nn.Module, keep_all: bool = False, keep_last: int = 1):
        self.modules = attention_modules(model)
        self.keep_all = keep_all
        self.keep_last = keep_last
        self.tokens: torch.Tensor | None = None
        n = len(self.modules)
        self.inputs: list[torch.Tensor | None] = [None] * n
        self.cos: list[torch.Tensor | None] = [None] * n
        self.sin: list[torch.Tensor | None] = [None] * n
        self._handles = [m.register_forward_pre_hook(self._hook(i), with_kwargs=True)
                         for i, m in enumerate(self.modules)]

    def _pick(self, x: torch.Tensor) -> torch.Tensor:
        if self.tokens is not None:
            return x[0, self.tokens].detach()
        return (x[0] if self.keep_all else x[:, -self.keep_last:]).detach().clone()

    def keep_tokens(self, tokens: torch.Tensor | None) -> None:
        """Keep these token positions of row 0 (a tensor on the model's device) in the coming forwards
        (None: back to the default); read them with `kept`."""
        self.tokens = tokens

    def _hook(self, layer: int):
        def hook(module, args, kwargs):
            self.inputs[layer] = self._pick(kwargs.get("hidden_states", args[0] if args else None))
            cos, sin = kwargs["position_embeddings"]
            self.cos[layer], self.sin[layer] = self._pick(cos), self._pick(sin)
        return hook

    def row(self, b: int) -> Activations:
        """The kept tokens of batch row `b` in the latest forward (at most `keep_last`, fewer if the input was shorter)."""
        if self.cos[0] is None:
            raise RuntimeError("no forward pass recorded yet")
        return self._select(lambda x: x[b])

    def _select(self, pick) -> Activations:
        return Activations(self.modules, [pick(x) for x in self.inputs], [pick(c) for c in self.cos],
                           [pick(s) for s in self.sin])

    def kept(self, lo: int, hi: int) -> Activations:
        """Entries lo:hi of the tokens chosen by `keep_tokens`, in the latest forward."""
        if self.tokens is None or self.cos[0] is None:
            raise RuntimeError("no forward recorded with keep_tokens")
        return self._select(lambda x: x[lo:hi])

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
