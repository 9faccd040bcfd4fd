"""Reading dumps back for training: documents, anchors, labels and the selectable population.

Loading never touches the backbone: everything needed (shapes, rotary frequencies, the
fingerprint) is in the manifest.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from .dump import FORMAT, MANIFEST, QUERY_WEIGHTS, VERSION
from .labels import Population


class TraceError(ValueError):
    """A dump folder that cannot be read (missing, corrupt, or mixed)."""


@dataclass
class TraceDoc:
    """One document's tensors, restricted to the requested candidate layers."""

    index: int
    meta: dict
    keys: torch.Tensor        # [L, n_chunks * per_chunk, key_dim] float32 (per_chunk keys per chunk, in order)
    hidden: torch.Tensor      # [A, L, d_model] float32
    positions: torch.Tensor   # [A]
    votes: torch.Tensor       # [A, n_chunks] uint8
    quest: torch.Tensor       # [A, n_chunks] float32
    population: torch.Tensor  # [A, n_chunks] bool

    @property
    def n_chunks(self) -> int:
        return self.votes.shape[1]


def read_manifest(folder: str | Path) -> dict:
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise TraceError(f"{folder} is not a trace dump (no {MANIFEST}); create one with `flashmemory dump`")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise TraceError(f"{path} is not valid JSON: {exc}") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise TraceError(f"{path} is not a {FORMAT} v{VERSION} manifest")
    return manifest


def _label_params(manifest: dict) -> dict:
    """The parameters that must agree for two dumps' labels and populations to mix."""
    return {k: v for k, v in manifest["params"].items() if k != "candidate_layers"}


def common_candidate_layers(folders: list[str | Path]) -> list[int]:
    """The candidate layers stored by every dump (dumps may store different ones)."""
    return _common_layers([read_manifest(f) for f in folders])


def _common_layers(manifests: list[dict]) -> list[int]:
    first, rest = manifests[0]["candidate_layers"], [m["candidate_layers"] for m in manifests[1:]]
    return [x for x in first if all(x in c for c in rest)]


class TraceSet:
    """All documents of one or more dump folders of the same backbone and label parameters."""

    def __init__(self, folders: list[str | Path] | str | Path, layers: list[int] | None = None,
                 population: Population | None = None):
        from safetensors import safe_open

        folders = [folders] if isinstance(folders, (str, Path)) else list(folders)
        if not folders:
            raise TraceError("no dump folders given")
        manifests = [read_manifest(f) for f in folders]
        self.manifest = manifests[0]
        for other, m in zip(folders[1:], manifests[1:]):
            if m["backbone"]["fingerprint"] != self.manifest["backbone"]["fingerprint"]:
                raise TraceError(f"{other} was dumped from another backbone than {folders[0]}")
            mine, theirs = _label_params(self.manifest), _label_params(m)
            differ = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
            if differ:
                raise TraceError(f"{other} was dumped with other parameters than {folders[0]} "
                                 f"({', '.join(differ)}); their documents cannot be mixed")
        params = self.manifest["params"]
        self.candidates: list[int] = _common_layers(manifests)
        self.layers = list(layers) if layers is not None else list(self.candidates)
        missing = [x for x in self.layers if x not in self.candidates]
        if missing:
            where = "the dump" if len(folders) == 1 else "every dump"
            raise TraceError(f"layers {missing} are not in {where} (candidate layers stored by {where}: "
                             f"{self.candidates})")
        self.population = population or Population(params["chunk_size"], params["page_size"],
                                                   params["sink_tokens"], params["tail_tokens"])
        self.docs: list[TraceDoc] = []
        for folder, m in zip(map(Path, folders), manifests):
            rows = [m["candidate_layers"].index(x) for x in self.layers]   # a layer's row differs per dump
            for path in sorted(folder.glob("part-*.safetensors")):
                try:
                    with safe_open(str(path), framework="pt") as f:
                        meta = json.loads(f.metadata()["doc"])
                        keys = f.get_slice("keys")[rows[0]: rows[0] + 1] if len(rows) == 1 else None
                        keys = f.get_tensor("keys")[rows] if keys is None else keys
                        hidden = f.get_tensor("hidden")[:, rows]
                        doc = TraceDoc(meta["index"], meta, keys.float(), hidden.float(),
                                       f.get_tensor("positions"), f.get_tensor("votes"), f.get_tensor("quest"),
                                       torch.zeros(0, dtype=torch.bool))
                except Exception as exc:  # safetensors raises several types for damaged files
                    raise TraceError(f"cannot read {path}: {exc}; delete it and resume the dump") from None
                doc.population = self.population.mask(doc.positions, doc.n_chunks)
                self.docs.append(doc)
        if not self.docs:
            raise TraceError(f"no documents in {', '.join(map(str, folders))}; run `flashmemory dump` first")
        self.query_weights: dict[int, torch.Tensor] | None = None  # the backbone's q_proj at loaded layers
        self.query_norms: dict[int, torch.Tensor] = {}  # per-head query norm gains, where the backbone has them
        qw = Path(folders[0]) / QUERY_WEIGHTS
        if qw.is_file():
            try:
                with safe_open(str(qw), framework="pt") as f:
                    self.query_weights = {x: f.get_tensor(f"q_proj.{x}").float() for x in self.layers}
                    self.query_norms = {x: f.get_tensor(f"q_norm.{x}").float() for x in self.layers
                                        if f"q_norm.{x}" in f.keys()}
            except Exception as exc:
                raise TraceError(f"cannot read {qw}: {exc}") from None

    @property
    def backbone(self) -> dict:
        return self.manifest["backbone"]

    @property
    def params(self) -> dict:
        return self.manifest["params"]

    @property
    def n_anchors(self) -> int:
        return sum(len(d.positions) for d in self.docs)

    def split(self, val_fraction: float = 0.15, seed: int = 0) -> tuple[list[int], list[int]]:
        """Document indices (into self.docs) for training and validation; a document is never split."""
        if not 0.0 <= val_fraction < 1.0:
            raise TraceError(f"val_fraction must be in [0, 1), got {val_fraction}")
        order = list(range(len(self.docs)))
        random.Random(seed).shuffle(order)
        n_val = round(len(order) * val_fraction)
        if val_fraction > 0 and n_val == 0 and len(order) > 1:
            n_val = 1
        return sorted(order[n_val:]), sorted(order[:n_val])

    def positive_rate(self, min_layers: int, docs: list[int] | None = None) -> float:
        pos = tot = 0
        for i in (range(len(self.docs)) if docs is None else docs):
            d = self.docs[i]
            pos += int(((d.votes >= min_layers) & d.population).sum())
            tot += int(d.population.sum())
        return pos / max(1, tot)


def select_layers(traces: TraceSet, layers: list[int]) -> TraceSet:
    """A view of `traces` restricted to some of its loaded layers (no disk access)."""
    missing = [x for x in layers if x not in traces.layers]
    if missing:
        raise TraceError(f"layers {missing} are not loaded (loaded: {traces.layers})")
    rows = [traces.layers.index(x) for x in layers]
    view = TraceSet.__new__(TraceSet)
    view.__dict__.update(traces.__dict__)
    view.layers = list(layers)
    if traces.query_weights is not None:
        view.query_weights = {x: traces.query_weights[x] for x in layers}
    view.query_norms = {x: g for x, g in traces.query_norms.items() if x in layers}
    view.docs = [TraceDoc(d.index, d.meta, d.keys[rows], d.hidden[:, rows], d.positions, d.votes, d.quest,
                          d.population) for d in traces.docs]
    return view
