"""Indexer checkpoints: a folder with `indexer.safetensors` (weights) and `indexer.json`
(config, backbone fingerprint, provenance, the weights' sha256).

A checkpoint is bound to the backbone it was trained for: loading it for another backbone,
or loading a damaged one, raises `CheckpointError` with a message that says what to do.

The release-form DeepSeek-V4 indexer (`lightning.LightningIndexer`) has two formats:
the published one (`load_release_checkpoint` / `save_release_checkpoint`: a torch state dict
with `retrievers.l{L}.wq_a.weight`, ..., read without executing pickled code) and ours
(`save_lightning_indexer` / `load_lightning_indexer`: the same tensor names in a folder with
`indexer.safetensors` and an `indexer.json` whose format is `flashmemory-lightning-indexer`).
`convert_checkpoint` converts between them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import replace
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from .lightning import RELEASE_PARTS, LightningConfig, LightningIndexer, yarn_inv_freq
from .model import IndexerConfig, IndexerConfigError, NeuralIndexer

FORMAT = "flashmemory-indexer"
VERSION = 1
LIGHTNING_FORMAT = "flashmemory-lightning-indexer"
LIGHTNING_VERSION = 1
WEIGHTS = "indexer.safetensors"
META = "indexer.json"
DEFAULT_DIR = Path(__file__).parent / "default"
#: The indexers shipped in the package, per embedded model (traces/recipe.py makes each one).
SHIPPED_DIRS = {"smollm2-135m": DEFAULT_DIR, "gemma3-270m": Path(__file__).parent / "gemma3-270m"}


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


#: Per format: what a checkpoint of it is, how to make one, and how to load one.
_KINDS = {
    FORMAT: ("an indexer checkpoint", "make one with `flashmemory train`", "load_indexer",
             "an indexer for ordinary attention backbones"),
    LIGHTNING_FORMAT: ("a lightning indexer checkpoint", "make one with `flashmemory indexer convert`",
                       "load_lightning_indexer", "a DeepSeek-V4 lightning indexer"),
}


def _read_description(path: str | os.PathLike, fmt: str, version: int) -> tuple[Path, dict]:
    """The checkpoint folder of `path` (the folder or a file in it) and its JSON description, validated
    as format `fmt` at `version`; a checkpoint of the other format gets a message saying what it is."""
    folder = Path(path)
    if folder.is_file():
        folder = folder.parent
    if not folder.is_dir():
        raise CheckpointError(f"indexer checkpoint not found: {folder}")
    kind, make, _, _ = _KINDS[fmt]
    meta_path = folder / META
    if not meta_path.is_file() or not (folder / WEIGHTS).is_file():
        raise CheckpointError(f"{folder} is not {kind} (needs {META} and {WEIGHTS}); {make}")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"corrupt indexer checkpoint {meta_path}: not valid JSON ({exc})") from None
    other = LIGHTNING_FORMAT if fmt == FORMAT else FORMAT
    if isinstance(meta, dict) and meta.get("format") == other:
        _, _, loader, what = _KINDS[other]
        raise CheckpointError(f"{folder} is {what} ({other}); load it with {loader}")
    if not isinstance(meta, dict) or meta.get("format") != fmt or "config" not in meta:
        raise CheckpointError(f"corrupt indexer checkpoint {meta_path}: not a {fmt} description")
    if meta.get("version") != version:
        raise CheckpointError(f"{meta_path} has format version {meta.get('version')}; this flashmemory reads "
                              f"version {version}")
    return folder, meta


def _load_weights(indexer: nn.Module, folder: Path, meta: dict, remake: str) -> nn.Module:
    """Fill `indexer` from `folder`'s weights after checking them against the description's sha256."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights = folder / WEIGHTS
    if meta.get("sha256") and _sha256(weights) != meta["sha256"]:
        raise CheckpointError(f"corrupt indexer checkpoint {weights}: its checksum does not match {META} "
                              f"(truncated or modified file); {remake}")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"corrupt indexer checkpoint {weights}: {exc}") from None
    _load_state(indexer, state, str(weights))
    return indexer.eval()


def read_meta(folder: str | os.PathLike) -> dict:
    """The checkpoint's JSON description, validated."""
    return _read_description(folder, FORMAT, VERSION)[1]


def load_indexer(folder: str | os.PathLike, fingerprint: str | None = None) -> NeuralIndexer:
    """Load a checkpoint folder; with `fingerprint`, refuse one trained for another backbone."""
    folder, meta = _read_description(folder, FORMAT, VERSION)
    try:
        cfg = IndexerConfig.from_dict(meta["config"])
    except (IndexerConfigError, TypeError) as exc:
        raise CheckpointError(f"corrupt indexer checkpoint {folder}: bad config ({exc})") from None
    if fingerprint is not None and cfg.fingerprint != fingerprint:
        raise CheckpointError(
            f"indexer checkpoint {folder} was trained for backbone {cfg.fingerprint}, but the loaded backbone is "
            f"{fingerprint}; train an indexer for it with `flashmemory dump` and `flashmemory train`")
    return _load_weights(NeuralIndexer(cfg), folder, meta, "re-create or re-download it")


def _load_state(indexer: nn.Module, state: dict, where: str) -> None:
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


def shipped_dir(model: str) -> Path:
    """The package folder of the indexer shipped for an embedded model (SmolLM2's is `default/`)."""
    return SHIPPED_DIRS.get(model, Path(__file__).parent / model)


def default_checkpoint(fingerprint: str) -> Path:
    """The indexer shipped in the package for this backbone, or a CheckpointError saying there is none."""
    shipped = {}
    for folder in SHIPPED_DIRS.values():
        try:
            shipped[read_meta(folder)["config"].get("fingerprint")] = folder
        except CheckpointError:
            continue
    if fingerprint not in shipped:
        have = f"the package ships them for {', '.join(map(str, shipped))}" if shipped else \
            "this installation has no shipped indexer"
        raise CheckpointError(
            f"no shipped indexer for backbone {fingerprint} ({have}); train one with "
            "`flashmemory dump --model ...` and `flashmemory train`, then pass it with --indexer, or use another "
            "policy (e.g. quest)")
    return shipped[fingerprint]


#: Rows of a release checkpoint's RoPE table compared with the config's frequencies.
_TABLE_ROWS_CHECKED = 2048
_RELEASE_KEY = re.compile(r"^retrievers\.l(\d+)\.(.+)$")
_RELEASE_TABLE = "freqs_cis"  # the release trainer saves its RoPE table as a buffer; derived, never loaded


def _one_line(exc: BaseException) -> str:
    """The informative line of a (possibly multi-line) exception message."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if line.startswith("WeightsUnpickler error"):
            return line
    return lines[0] if lines else type(exc).__name__


def _read_release_state(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"indexer checkpoint not found: {path}" if not path.exists() else
                              f"{path} is a folder; a release-format indexer is one torch file (.pt)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling fails with many types; all mean "not a plain weights file"
        raise CheckpointError(f"cannot read {path} as a weights-only torch state dict (pickled code and objects "
                              f"are refused): {_one_line(exc)}") from None
    if isinstance(state, dict) and isinstance(state.get("model_state"), dict):
        state = state["model_state"]  # the release trainer's per-epoch file wraps the weights
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise CheckpointError(f"{path} does not hold a plain state dict (tensor names to tensors)")
    return state


def _release_sizes(parts: dict[str, torch.Tensor], layer: int, where: str) -> dict[str, int]:
    """d_model, q_rank, n_heads and head_dim of one layer's tensors, checked against each other."""
    name = f"retrievers.l{layer}."
    wq_a, wq_b, norm, proj = (parts[p] for p in RELEASE_PARTS)
    for part, tensor, dims in zip(RELEASE_PARTS, (wq_a, wq_b, norm, proj), (2, 2, 1, 2)):
        if tensor.dim() != dims or 0 in tensor.shape:
            raise CheckpointError(f"{where}: {name}{part} has shape {list(tensor.shape)}; expected a non-empty "
                                  f"{dims}-D tensor")
    q_rank, d_model = wq_a.shape
    n_heads = proj.shape[0]
    if proj.shape[1] != d_model:
        raise CheckpointError(f"{where}: {name}weights_proj.weight has shape {list(proj.shape)}, expected "
                              f"[heads, {d_model}] (wq_a takes hidden size {d_model})")
    if norm.shape[0] != q_rank:
        raise CheckpointError(f"{where}: {name}q_norm_weight has {norm.shape[0]} entries, expected q rank {q_rank}")
    if wq_b.shape[1] != q_rank or wq_b.shape[0] % n_heads:
        raise CheckpointError(f"{where}: {name}wq_b.weight has shape {list(wq_b.shape)}, expected "
                              f"[{n_heads} heads x head_dim, {q_rank}]")
    return {"d_model": int(d_model), "q_rank": int(q_rank), "n_heads": int(n_heads),
            "head_dim": int(wq_b.shape[0] // n_heads)}


def _check_rope_table(table: torch.Tensor, layer: int, cfg: LightningConfig, where: str) -> None:
    """The release's saved RoPE table must agree with the frequencies this config computes."""
    half = cfg.rope_dim // 2
    if not table.is_complex() or table.dim() != 2 or table.shape[1] != half:
        raise CheckpointError(f"{where}: retrievers.l{layer}.freqs_cis has {table.dtype} shape {list(table.shape)}; "
                              f"expected a complex [positions, {half}] RoPE table for rope_dim {cfg.rope_dim}")
    rows = min(table.shape[0], _TABLE_ROWS_CHECKED)
    angles = torch.outer(torch.arange(rows, dtype=torch.float32), yarn_inv_freq(cfg))
    ours = torch.polar(torch.ones_like(angles), angles)
    if not torch.allclose(table[:rows].to(torch.complex64), ours, atol=1e-3, rtol=0):
        raise CheckpointError(
            f"{where}: the RoPE table saved with layer {layer} does not match rope_dim {cfg.rope_dim}, theta "
            f"{cfg.rope_theta:g}, YaRN factor {cfg.rope_factor:g} (original {cfg.rope_original_max_position}, beta "
            f"{cfg.rope_beta_fast:g}/{cfg.rope_beta_slow:g}); give the backbone's config (--model) that it was "
            "trained with")


def _check_backbone(sizes: dict[str, int], config: LightningConfig, where: str) -> None:
    """The backbone-bound sizes (hidden size, key dim) of a checkpoint must be the backbone's."""
    for name in ("d_model", "head_dim"):
        if getattr(config, name) != sizes[name]:
            raise CheckpointError(f"{where} was made for another backbone: its {name} is {sizes[name]}, this "
                                  f"backbone's is {getattr(config, name)}")


def load_release_checkpoint(path: str | os.PathLike, config: LightningConfig | None = None) -> LightningIndexer:
    """Load the published FlashMemory DeepSeek-V4 indexer (a torch state dict, usually a .pt file).

    Read with `torch.load(weights_only=True)`, so a pickle holding code or custom objects is
    refused; tensors are cast to fp32. Expected keys: `retrievers.l{L}.wq_a.weight`,
    `wq_b.weight`, `q_norm_weight`, `weights_proj.weight` for every layer L; a
    `retrievers.l{L}.freqs_cis` RoPE table (saved by the release's trainer) is checked against
    the config's RoPE parameters and not loaded. The release trainer's per-epoch files (the
    weights under "model_state") load too.

    n_heads, q_rank and head_dim come from the tensors. `config` (e.g.
    `LightningConfig.from_hf_config(backbone_config)`) gives the RoPE parameters, decision
    rule, fingerprint and target layers (the file must hold them all; other layers in it are
    not loaded), and its d_model and head_dim must match the file (otherwise the file was
    made for another backbone). Without `config`: the release's published constants and every
    layer in the file.
    """
    path = Path(path)
    where = str(path)
    state = _read_release_state(path)
    layers: dict[int, dict[str, torch.Tensor]] = {}
    tables: dict[int, torch.Tensor] = {}
    unexpected = []
    for key, value in state.items():
        m = _RELEASE_KEY.match(key)
        if m and m.group(2) == _RELEASE_TABLE:
            tables[int(m.group(1))] = value
        elif m and m.group(2) in RELEASE_PARTS:
            layers.setdefault(int(m.group(1)), {})[m.group(2)] = value
        else:
            unexpected.append(key)
    if not layers:
        raise CheckpointError(f"{where} has no retrievers.l{{L}}.* weights: not a FlashMemory DeepSeek-V4 indexer "
                              "in the published layout")
    if unexpected:
        raise CheckpointError(f"{where} holds tensors outside the published layout: {', '.join(sorted(unexpected)[:4])}")
    for layer, parts in sorted(layers.items()):
        missing = [f"retrievers.l{layer}.{p}" for p in RELEASE_PARTS if p not in parts]
        if missing:
            raise CheckpointError(f"{where}: layer {layer} lacks {', '.join(missing)}")
    base = config or LightningConfig(layers=tuple(sorted(layers)))
    absent = [L for L in base.layers if L not in layers]
    if absent:
        raise CheckpointError(f"{where} has no weights for target layer(s) {absent}; it holds layers {sorted(layers)}")
    sizes = _release_sizes(layers[base.layers[0]], base.layers[0], where)
    if config is not None:
        _check_backbone(sizes, config, where)
    try:
        cfg = replace(base, **sizes)
    except IndexerConfigError as exc:
        raise CheckpointError(f"{where}: {exc}") from None
    for layer in cfg.layers:
        if layer in tables:
            _check_rope_table(tables[layer], layer, cfg, where)
    indexer = LightningIndexer(cfg)
    _load_state(indexer, {f"retrievers.l{L}.{p}": layers[L][p] for L in cfg.layers for p in RELEASE_PARTS}, where)
    return indexer.eval()


def _weights(indexer: LightningIndexer) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().contiguous().cpu() for k, v in indexer.state_dict().items()}


def save_release_checkpoint(indexer: LightningIndexer, path: str | os.PathLike) -> Path:
    """Write the published layout: a flat fp32 state dict (`retrievers.l{L}.wq_a.weight`, ...) saved with
    `torch.save`, through a temporary file renamed into place. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(_weights(indexer), tmp)
    os.replace(tmp, path)
    return path


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def save_lightning_indexer(indexer: LightningIndexer, folder: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write our format: `folder/indexer.safetensors` (fp32, the release's tensor names) and
    `folder/indexer.json` (format, config with the backbone fingerprint, parameter count, size,
    sha256, and `extra` provenance). Each file goes through a temporary file renamed into place.
    Returns the folder."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (WEIGHTS + ".tmp")
    save_file(_weights(indexer), str(tmp), metadata={"format": LIGHTNING_FORMAT})
    os.replace(tmp, folder / WEIGHTS)
    _write_json(folder / META, {
        "format": LIGHTNING_FORMAT, "version": LIGHTNING_VERSION, "config": indexer.cfg.to_dict(),
        "parameters": indexer.parameter_count(), "dtype": "float32",
        "weights_bytes": (folder / WEIGHTS).stat().st_size, "sha256": _sha256(folder / WEIGHTS),
        "extra": extra or {}})
    return folder


def load_lightning_indexer(folder: str | os.PathLike, fingerprint: str | None = None) -> LightningIndexer:
    """Load our format (a folder from `save_lightning_indexer`, or a file in it).

    With `fingerprint`, a checkpoint bound to another backbone is refused (one converted
    without a backbone config is unbound and loads). The checksum, config, tensor names,
    shapes and finiteness are checked; a damaged checkpoint raises a "corrupt" CheckpointError.
    """
    folder, meta = _read_description(folder, LIGHTNING_FORMAT, LIGHTNING_VERSION)
    try:
        cfg = LightningConfig.from_dict(meta["config"])
    except (IndexerConfigError, TypeError) as exc:
        raise CheckpointError(f"corrupt indexer checkpoint {folder}: bad config ({exc})") from None
    if fingerprint is not None and cfg.fingerprint not in (None, fingerprint):
        raise CheckpointError(f"indexer checkpoint {folder} was made for backbone {cfg.fingerprint}, but the loaded "
                              f"backbone is {fingerprint}")
    return _load_weights(LightningIndexer(cfg), folder, meta, "re-create it with `flashmemory indexer convert`")


def checkpoint_format(path: str | os.PathLike) -> Literal["release", "safetensors"]:
    """"safetensors" for our folder (or a file in it), "release" for any other file."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"indexer checkpoint not found: {path}")
    return "safetensors" if path.is_dir() or path.name in (WEIGHTS, META) else "release"


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike,
                       to: Literal["release", "safetensors"] | None = None,
                       config: LightningConfig | None = None, force: bool = False) -> LightningIndexer:
    """Convert a lightning indexer between the published layout and ours; returns the converted indexer.

    `to` defaults to the format SRC is not in. `config` (from the backbone's config) binds a
    release file to that backbone (see `load_release_checkpoint`), or checks that our
    checkpoint is bound to it. An existing DST is replaced only with `force`. Weights are
    written as fp32 under the same tensor names both ways, so the conversion is lossless.
    """
    src, dst = Path(src), Path(dst)
    source = checkpoint_format(src)
    to = to or ("release" if source == "safetensors" else "safetensors")
    if to not in ("release", "safetensors"):
        raise CheckpointError(f"unknown checkpoint format {to!r}; choose release or safetensors")
    if dst.exists() and not force:
        raise CheckpointError(f"{dst} exists; pass --force to overwrite it")
    if dst.exists() and dst.resolve() == src.resolve():
        raise CheckpointError(f"source and destination are the same path: {dst}")
    if to == "release" and dst.is_dir():
        raise CheckpointError(f"{dst} is a folder; the release format is one torch file (e.g. indexer.pt)")
    if to == "safetensors" and dst.exists() and not dst.is_dir():
        raise CheckpointError(f"{dst} is a file; our format is a folder (indexer.safetensors + indexer.json)")
    if source == "release":
        indexer = load_release_checkpoint(src, config)
    else:
        indexer = load_lightning_indexer(src, fingerprint=config.fingerprint if config else None)
        if config is not None:
            _check_backbone({"d_model": indexer.cfg.d_model, "head_dim": indexer.cfg.head_dim}, config, str(src))
    if to == "release":
        save_release_checkpoint(indexer, dst)
    else:
        save_lightning_indexer(indexer, dst, extra={"source": str(src), "source_format": source})
    return indexer
