"""Indexer checkpoints: a folder with `indexer.safetensors` (weights) and `indexer.json`
(config, backbone fingerprint, provenance, the weights' sha256).

A checkpoint is bound to the backbone it was trained for: loading it for another backbone,
or loading a damaged one, raises `CheckpointError` with a message that says what to do.
`load_deepseek_retrievers` reads the published FlashMemory DeepSeek-V4 layout
(`retrievers.l{L}.wq_a.weight`, ... in a torch .pt file) without executing pickled code.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import torch

from .model import IndexerConfig, IndexerConfigError, NeuralIndexer

FORMAT = "flashmemory-indexer"
VERSION = 1
WEIGHTS = "indexer.safetensors"
META = "indexer.json"
DEFAULT_DIR = Path(__file__).parent / "default"


class CheckpointError(ValueError):
    """A checkpoint that is missing, damaged, or made for another backbone."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_indexer(indexer: NeuralIndexer, folder: str | os.PathLike, dtype: torch.dtype = torch.float32,
                 extra: dict | None = None) -> Path:
    """Write the checkpoint folder (weights in `dtype`; fp16 halves a shipped file). Returns the folder."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = indexer.cfg.to_dict()
    if extra:
        cfg["extra"] = {**cfg.get("extra", {}), **extra}
    tensors = {k: v.detach().to(dtype).contiguous().cpu() for k, v in indexer.state_dict().items()}
    tmp = folder / (WEIGHTS + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": FORMAT})
    os.replace(tmp, folder / WEIGHTS)  # never leave a half-written weights file under the real name
    meta = {"format": FORMAT, "version": VERSION, "config": cfg,
            "parameters": indexer.parameter_count(), "dtype": str(dtype).replace("torch.", ""),
            "weights_bytes": (folder / WEIGHTS).stat().st_size, "sha256": _sha256(folder / WEIGHTS)}
    (folder / META).write_text(json.dumps(meta, indent=2) + "\n")
    return folder


def read_meta(folder: str | os.PathLike) -> dict:
    """The checkpoint's JSON description, validated."""
    folder = Path(folder)
    if folder.is_file():
        folder = folder.parent
    if not folder.is_dir():
        raise CheckpointError(f"indexer checkpoint not found: {folder}")
    meta_path = folder / META
    if not meta_path.is_file() or not (folder / WEIGHTS).is_file():
        raise CheckpointError(f"{folder} is not an indexer checkpoint (needs {META} and {WEIGHTS}); "
                              "make one with `flashmemory train`")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"corrupt indexer checkpoint {meta_path}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "config" not in meta:
        raise CheckpointError(f"corrupt indexer checkpoint {meta_path}: not a {FORMAT} description")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{meta_path} has format version {meta.get('version')}; this flashmemory reads "
                              f"version {VERSION}")
    return meta


def load_indexer(folder: str | os.PathLike, fingerprint: str | None = None) -> NeuralIndexer:
    """Load a checkpoint folder; with `fingerprint`, refuse one trained for another backbone."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    if folder.is_file():
        folder = folder.parent
    meta = read_meta(folder)
    try:
        cfg = IndexerConfig.from_dict(meta["config"])
    except (IndexerConfigError, TypeError) as exc:
        raise CheckpointError(f"corrupt indexer checkpoint {folder}: bad config ({exc})") from None
    if fingerprint is not None and cfg.fingerprint != fingerprint:
        raise CheckpointError(
            f"indexer checkpoint {folder} was trained for backbone {cfg.fingerprint}, but the loaded backbone is "
            f"{fingerprint}; train an indexer for it with `flashmemory dump` and `flashmemory train`")
    weights = folder / WEIGHTS
    if meta.get("sha256") and _sha256(weights) != meta["sha256"]:
        raise CheckpointError(f"corrupt indexer checkpoint {weights}: its checksum does not match {META} "
                              "(truncated or modified file); re-create or re-download it")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"corrupt indexer checkpoint {weights}: {exc}") from None
    indexer = NeuralIndexer(cfg)
    _load_state(indexer, state, str(weights))
    return indexer.eval()


def _load_state(indexer: NeuralIndexer, state: dict, where: str) -> None:
    expected = indexer.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"indexer weights in {where} do not match its config: missing {missing[:4]}, "
                              f"unexpected {unexpected[:4]}")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(f"indexer weight {name} in {where} has shape {list(tensor.shape)}, "
                                  f"expected {list(expected[name].shape)}")
        if not torch.isfinite(tensor.float()).all():
            raise CheckpointError(f"indexer weight {name} in {where} holds NaN or infinite values")
    indexer.load_state_dict({k: v.float() for k, v in state.items()})


def default_checkpoint(fingerprint: str) -> Path:
    """The indexer shipped in the package for this backbone, or a CheckpointError saying there is none."""
    try:
        meta = read_meta(DEFAULT_DIR)
    except CheckpointError:
        meta = None
    if meta is None or meta["config"].get("fingerprint") != fingerprint:
        shipped = f"the package ships one for {meta['config'].get('fingerprint')}" if meta else \
            "this installation has no shipped indexer"
        raise CheckpointError(
            f"no shipped indexer for backbone {fingerprint} ({shipped}); train one with "
            "`flashmemory dump --model ...` and `flashmemory train`, then pass it with --indexer, or use another "
            "policy (e.g. quest)")
    return DEFAULT_DIR


_DS_KEY = re.compile(r"^retrievers\.l(\d+)\.(wq_a\.weight|wq_b\.weight|q_norm_weight|weights_proj\.weight)$")
_DS_PARTS = ("wq_a.weight", "wq_b.weight", "q_norm_weight", "weights_proj.weight")


def load_deepseek_retrievers(path: str | os.PathLike, rope_dim: int = 64, fingerprint: str | None = None
                             ) -> NeuralIndexer:
    """Read the published FlashMemory DeepSeek-V4 retrievers (a .pt state dict, or .safetensors).

    Loaded with `weights_only=True`, so a malicious pickle cannot run code. Sizes come from the
    tensors: d_model and q_rank from wq_a, heads from weights_proj, key_dim = rows(wq_b) / heads.
    Query RoPE is left to the DeepSeek adapter (it rotates only part of each head), so
    `inv_freq` is None here and `rope_dim` only records that split. Each key is one
    compressed entry (key_block = chunk_size) and there is no distance prior, as published.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"DeepSeek retriever checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types; all mean "not a safe weights file"
        raise CheckpointError(f"cannot read {path} as a weights-only state dict: {exc}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a state dict")
    layers: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        m = _DS_KEY.match(str(key))
        if m and isinstance(value, torch.Tensor):
            layers.setdefault(int(m.group(1)), {})[m.group(2)] = value
    if not layers:
        raise CheckpointError(f"{path} has no retrievers.l{{L}}.* weights (not a FlashMemory DeepSeek-V4 indexer)")
    for layer, parts in sorted(layers.items()):
        missing = [p for p in _DS_PARTS if p not in parts]
        if missing:
            raise CheckpointError(f"{path}: layer {layer} lacks {', '.join('retrievers.l%d.%s' % (layer, p) for p in missing)}")
    first = layers[min(layers)]
    q_rank, d_model = first["wq_a.weight"].shape
    n_heads = first["weights_proj.weight"].shape[0]
    rows = first["wq_b.weight"].shape[0]
    if rows % n_heads:
        raise CheckpointError(f"{path}: wq_b has {rows} rows, not a multiple of {n_heads} heads")
    key_dim = rows // n_heads
    try:
        cfg = IndexerConfig(d_model=int(d_model), key_dim=int(key_dim), rope_dim=min(rope_dim, int(key_dim)),
                            layers=sorted(layers), n_heads=int(n_heads), q_rank=int(q_rank), inv_freq=None,
                            key_block=32, distance_buckets=0, spill=None, fingerprint=fingerprint, extra={"source": str(path), "layout": "deepseek-v4"})
    except IndexerConfigError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    indexer = NeuralIndexer(cfg)
    ours = indexer.state_dict()
    ours.update({f"retrievers.l{layer}.{p}": layers[layer][p] for layer in layers for p in _DS_PARTS})
    _load_state(indexer, ours, str(path))
    return indexer.eval()
