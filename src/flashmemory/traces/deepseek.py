"""Dump and train the release-form indexer for a DeepSeek-V4 backbone (the backbone is not loaded to train).

Dump (`dump_deepseek`), per document: prefill the prompt with the stock cache, decode greedily,
and record for every decode token t:
  - the attention input of t at each target CSA layer (the indexer's query side);
  - golden entries: at every CSA layer, the attention of t over the CSA entries (mean over
    heads of the model's real attention, which its own top-k already restricts), the smallest
    set of entries holding `top_p` (0.6) of that mass; an entry is golden for t when at least
    `min_layers` CSA layers keep it;
and once per document the CSA indexer keys of every entry at the target layers (the native
indexer's compressed keys, before the Hadamard rotation). The label of anchor t is the union of
the golden entries of t..t+tau-1 (what the next cycle will attend). The dump also holds the
backbone's native indexer weights at the target layers in the release layout, so training
starts from them without the backbone.

Train (`train_deepseek`): a `LightningIndexer` initialised from those native weights, focal
binary cross-entropy (gamma 2) on each target layer's logits over the entries visible at the
anchor; saved in our safetensors format (`save_lightning_indexer`), bound to the backbone's
fingerprint, loadable by `DeepseekLSAPolicy(checkpoint=folder)`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from ..indexer.checkpoint import save_lightning_indexer
from ..indexer.lightning import LightningConfig, LightningIndexer
from ..policies.deepseek_lsa import csa_layers, default_target_layers, native_lightning_indexer

DUMP_META = "deepseek_dump.json"
NATIVE_WEIGHTS = "native_indexer.pt"


class DeepseekDumpError(ValueError):
    """A dump that cannot be made or read."""


def top_p_set(mass: torch.Tensor, top_p: float) -> torch.Tensor:
    """Bool mask of the smallest set of entries whose share of `mass` [N] reaches top_p."""
    total = mass.sum()
    keep = torch.zeros_like(mass, dtype=torch.bool)
    if total <= 0:
        return keep
    order = mass.argsort(descending=True)
    cumulative = (mass[order] / total).cumsum(0)
    n = int((cumulative < top_p).sum()) + 1
    keep[order[:min(n, mass.numel())]] = True
    return keep


@torch.no_grad()
def dump_document(model, prompt: list[int], steps: int, layers: tuple[int, ...], top_p: float,
                  min_layers: int, tau: int) -> dict[str, torch.Tensor]:
    """One document's hidden states, keys and labels (see the module docstring)."""
    csa = csa_layers(model.config)
    hidden: dict[int, list[torch.Tensor]] = {L: [] for L in layers}
    mass: dict[int, torch.Tensor] = {}

    def capture(layer: int):
        def hook(module, args, kwargs) -> None:
            if layer in hidden and args[0].shape[1] == 1:
                hidden[layer].append(args[0][0, -1].float().clone())
        return hook

    def attention(layer: int):
        def hook(module, args, kwargs, output) -> None:
            weights = output[1]
            if weights is not None and weights.shape[2] == 1:
                n = kwargs["past_key_values"].layers[layer].entry_count["compressor"]
                mass[layer] = weights[0, :, -1, weights.shape[-1] - n:].float().mean(0) if n else torch.zeros(0)
        return hook

    handles = []
    for layer in csa:
        attn = model.model.layers[layer].self_attn
        handles.append(attn.register_forward_pre_hook(capture(layer), with_kwargs=True))
        handles.append(attn.register_forward_hook(attention(layer), with_kwargs=True))
    device = next(model.parameters()).device
    cache = DynamicCache(config=model.config)
    golden: list[torch.Tensor] = []
    entries: list[int] = []
    try:
        ids = torch.tensor([prompt], device=device)
        token = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        for _ in range(steps):
            token = model(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
            n = cache.layers[csa[0]].entry_count["compressor"]
            votes = torch.zeros(n, dtype=torch.long)
            for layer in csa:
                votes += top_p_set(mass[layer].cpu(), top_p).long()
            golden.append(votes >= min_layers)
            entries.append(n)
    finally:
        for h in handles:
            h.remove()
    n_total = entries[-1]
    per_step = torch.zeros(steps, n_total, dtype=torch.bool)
    for t, g in enumerate(golden):
        per_step[t, :g.numel()] = g
    labels = torch.zeros_like(per_step)
    for t in range(steps):
        labels[t] = per_step[t:t + tau].any(0)
    keys = torch.stack([cache.layers[L].compressed_kv["indexer"][0].float().cpu() for L in layers])
    start = len(prompt)
    return {"hidden": torch.stack([torch.stack(hidden[L]) for L in layers], 1).cpu(),   # [steps, L, d]
            "positions": torch.arange(start, start + steps), "entries": torch.tensor(entries),
            "keys": keys, "labels": labels}


def dump_deepseek(model, prompts: list[list[int]], folder: str | os.PathLike, steps: int = 128,
                  layers: tuple[int, ...] | None = None, top_p: float = 0.6, min_layers: int = 3,
                  tau: int = 64) -> Path:
    """Dump documents for training (min_layers is clamped to the number of CSA layers)."""
    if getattr(model.config, "model_type", None) != "deepseek_v4":
        raise DeepseekDumpError("dump_deepseek needs a DeepSeek-V4 model")
    if not prompts or steps <= 0 or not 0 < top_p <= 1 or tau <= 0 or min_layers <= 0:
        raise DeepseekDumpError("need prompts, steps > 0, 0 < top_p <= 1, tau > 0 and min_layers > 0")
    from ..models.loader import fingerprint

    layers = tuple(layers) if layers is not None else default_target_layers(model.config)
    native = native_lightning_indexer(model, layers)
    min_layers = min(min_layers, len(csa_layers(model.config)))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.cpu() for k, v in native.state_dict().items()}, folder / NATIVE_WEIGHTS)
    for i, prompt in enumerate(prompts):
        torch.save(dump_document(model, prompt, steps, layers, top_p, min_layers, tau), folder / f"doc{i:05d}.pt")
    meta = {"fingerprint": fingerprint(model.config), "indexer": native.cfg.to_dict(), "documents": len(prompts),
            "steps": steps, "top_p": top_p, "min_layers": min_layers, "tau": tau}
    (folder / DUMP_META).write_text(json.dumps(meta, indent=1))
    return folder


@dataclass
class DeepseekTrainResult:
    """What training did: the loss of each epoch (mean over anchors) and where the indexer went."""

    losses: list[float]
    folder: Path


def _documents(folder: Path) -> list[dict[str, torch.Tensor]]:
    docs = [torch.load(p, weights_only=True) for p in sorted(folder.glob("doc*.pt"))]
    if not docs:
        raise DeepseekDumpError(f"{folder} holds no dumped documents")
    return docs


def train_deepseek(dump: str | os.PathLike, out: str | os.PathLike, epochs: int = 3, lr: float = 1e-4,
                   gamma: float = 2.0, seed: int = 0) -> DeepseekTrainResult:
    """Train from a dump folder alone (no backbone), starting at the dumped native weights; save to `out`."""
    dump = Path(dump)
    if not (dump / DUMP_META).is_file():
        raise DeepseekDumpError(f"{dump} is not a DeepSeek-V4 dump (no {DUMP_META})")
    meta = json.loads((dump / DUMP_META).read_text())
    indexer = LightningIndexer(LightningConfig.from_dict(meta["indexer"]))
    indexer.load_state_dict(torch.load(dump / NATIVE_WEIGHTS, weights_only=True))
    docs = _documents(dump)
    opt = torch.optim.AdamW(indexer.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    indexer.train()
    for _ in range(epochs):
        total, count = 0.0, 0
        for d in torch.randperm(len(docs), generator=gen).tolist():
            doc = docs[d]
            keys = indexer.rotate_keys(doc["keys"]).detach()
            for t in torch.randperm(doc["hidden"].shape[0], generator=gen).tolist():
                n = int(doc["entries"][t])
                logits = indexer.layer_logits(doc["hidden"][t:t + 1], keys[:, :n], doc["positions"][t:t + 1])
                target = doc["labels"][t, :n].float().expand_as(logits[:, 0])
                p = torch.sigmoid(logits[:, 0])
                bce = F.binary_cross_entropy_with_logits(logits[:, 0], target, reduction="none")
                weight = (target * (1 - p) + (1 - target) * p).pow(gamma)
                loss = (weight * bce).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                total, count = total + float(loss.detach()), count + 1
        losses.append(total / count)
    indexer.eval()
    folder = save_lightning_indexer(indexer, out, extra={"trained_from": str(dump), "epochs": epochs})
    return DeepseekTrainResult(losses, Path(folder))
