"""Stage 2: train the indexer on a dump. The backbone is never loaded (only the dump is read).

Loss: focal binary cross-entropy (gamma = 2) per target layer, on every positive chunk of an
anchor's selectable population and `neg_ratio` sampled negatives per positive (or all
negatives), optionally weighting positives by how many layers voted for them. Validation:
recall@K, recall at a resident budget, F1 at 0.5 and the resident fraction the threshold
produces; early stopping on the validation recall at the budget. Multi-process training uses
torch.distributed (DDP; gloo on CPU, nccl on GPU) when launched by torchrun.
"""

from __future__ import annotations

import copy
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F

from ..indexer.model import IndexerConfig, NeuralIndexer
from .dataset import TraceSet
from .labels import Population
from .metrics import ScoreMetrics, score_metrics


class TrainError(ValueError):
    """Training settings that cannot work with this dump."""


@dataclass
class TrainConfig:
    """Indexer size and training schedule (validated at construction). The home of every training
    default: `flashmemory train` derives its options from the fields' defaults and help metadata."""

    layers: list[int] | None = None   # target layers; None: the dump's recommended set or 3 spread candidates
    n_heads: int | None = field(default=None, metadata={
        "flag": "heads",
        "help": "indexer heads per layer (default: the backbone's query heads with --init backbone, else 8)"})
    q_rank: int = field(default=64, metadata={"help": "low-rank size of the query projection"})
    init: str = field(default="backbone", metadata={
        "choices": ("backbone", "random"),
        "help": "start the query side from the backbone's q_proj stored in the dump, or at random"})
    freeze_queries: bool = True       # keep wq_a / wq_b at their backbone-derived start (train the rest)
    score: str = field(default="softmax", metadata={
        "choices": ("softmax", "relu"),
        "help": "head aggregation: per-head attention mass (softmax) or DeepSeek's sum of ReLU(q.k)"})
    ensemble: str = field(default="max", metadata={"choices": ("max", "mean"), "help": "cross-layer ensemble"})
    min_layers: int | None = field(default=None, metadata={
        "help": "golden when at least this many layers vote (default: dump's)"})
    neg_ratio: float = field(default=3.0, metadata={"help": "sampled negatives per positive (<= 0: all negatives)"})
    min_negatives: int = 8            # negatives per anchor even when it has no positive
    gamma: float = field(default=2.0, metadata={"help": "focal loss gamma"})
    vote_weighting: bool = field(default=False, metadata={"help": "weight positives by their number of votes"})
    lr: float = field(default=2e-3, metadata={"help": "AdamW learning rate"})
    weight_decay: float = 0.01
    batch_size: int = field(default=64, metadata={"help": "anchors per step"})
    epochs: int = field(default=60, metadata={"help": "passes over the training anchors"})
    patience: int = field(default=10, metadata={"help": "early stopping: epochs without validation improvement"})
    val_fraction: float = field(default=0.15, metadata={"help": "documents held out for validation"})
    seed: int = field(default=0, metadata={"help": "seed of the validation split, initialisation and batch order"})
    time_limit: float | None = field(default=None, metadata={
        "help": "seconds; keep the best model when exceeded"})
    budget: float = 0.10              # resident share used by the recall-at-budget metric
    ks: tuple[int, ...] = (4, 8, 16, 32)
    sink_tokens: int | None = None    # population overrides (None: the dump's)
    tail_tokens: int | None = None
    page_size: int | None = None
    extend_distance_prior: bool = True  # far buckets the data never reached take the farthest trained bias
    #: run time: the key store keeps keys of this many tokens (a divisor of the dump's key_block) and
    #: the indexer scores them and their means at the trained resolution, best of both. None: one
    #: resolution. Training and its metrics use the dump's keys.
    fine_key_block: int | None = field(default=None, metadata={
        "help": "run time: also score keys of this many tokens (a divisor of the dump's key_block), "
                "best of both resolutions (default: the dump's resolution only)"})
    threads: int | None = 1           # torch threads while training (this model is small: 1 beats 2 on a busy CPU)

    def __post_init__(self) -> None:
        for f in fields(self):
            allowed = f.metadata.get("choices")
            if allowed and getattr(self, f.name) not in allowed:
                raise TrainError(f"{f.name} must be one of {', '.join(map(repr, allowed))}, "
                                 f"got {getattr(self, f.name)!r}")
        for name in ("q_rank", "batch_size", "epochs", "patience") + (("n_heads",) if self.n_heads is not None else ()):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise TrainError(f"{name} must be a positive integer, got {v!r}")
        if self.fine_key_block is not None and (isinstance(self.fine_key_block, bool)
                                            or not isinstance(self.fine_key_block, int) or self.fine_key_block <= 0):
            raise TrainError(f"fine_key_block must be a positive integer or None, got {self.fine_key_block!r}")
        if not isinstance(self.extend_distance_prior, bool):
            raise TrainError(f"extend_distance_prior must be True or False, got {self.extend_distance_prior!r}")
        if not (self.lr > 0 and self.gamma >= 0 and self.weight_decay >= 0):
            raise TrainError("lr must be positive; gamma and weight_decay non-negative")
        if not 0.0 <= self.val_fraction < 1.0:
            raise TrainError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if not 0.0 < self.budget <= 1.0:
            raise TrainError(f"budget must be in (0, 1], got {self.budget}")
        if self.min_layers is not None and self.min_layers < 1:
            raise TrainError(f"min_layers must be at least 1, got {self.min_layers}")


@dataclass
class TrainResult:
    indexer: NeuralIndexer
    config: TrainConfig
    min_layers: int
    history: list[dict] = field(default_factory=list)   # per epoch: train_loss, val metrics
    val: ScoreMetrics | None = None                     # best epoch, on validation documents
    val_quest: ScoreMetrics | None = None               # the quest baseline on the same anchors
    val_qa: ScoreMetrics | None = None                  # validation anchors of question documents only
    seconds: float = 0.0
    epochs_run: int = 0
    train_anchors: int = 0
    val_anchors: int = 0
    world_size: int = 1
    ranks_in_sync: bool | None = None   # DDP: every rank held identical weights after the last step
    calibration_shift: float = 0.0      # bias shift that makes 0.5 the F1-best threshold on validation
    distance_buckets_trained: int | None = None  # farther buckets took this one's bias (extend_distance_prior)

    def summary(self) -> dict:
        return {"min_layers": self.min_layers, "seconds": round(self.seconds, 2), "epochs_run": self.epochs_run,
                "train_anchors": self.train_anchors, "val_anchors": self.val_anchors, "world_size": self.world_size,
                "ranks_in_sync": self.ranks_in_sync, "calibration_shift": self.calibration_shift,
                "distance_buckets_trained": self.distance_buckets_trained,
                "parameters": self.indexer.parameter_count(), "layers": self.indexer.layers,
                "train_loss_first": self.history[0]["train_loss"] if self.history else None,
                "train_loss_last": self.history[-1]["train_loss"] if self.history else None,
                "val": self.val.to_dict() if self.val else None,
                "val_quest": self.val_quest.to_dict() if self.val_quest else None,
                "val_qa": self.val_qa.to_dict() if self.val_qa else None}


def default_layers(manifest: dict, n: int = 3) -> list[int]:
    """The dump's recommended target layers if its manifest names some, else n candidates spread
    over the depth (read from the manifest alone: no tensors are loaded to decide)."""
    c = list(manifest["candidate_layers"])
    rec = manifest.get("recommended_layers")
    if rec and all(x in c for x in rec):
        return list(rec)
    return sorted({c[round(i * (len(c) - 1) / max(1, n - 1))] for i in range(n)}) if len(c) > n else list(c)


def focal_bce(logits: torch.Tensor, targets: torch.Tensor, gamma: float) -> torch.Tensor:
    """Element-wise focal binary cross-entropy (Lin et al.): (1 - p_t)^gamma * BCE."""
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    if gamma == 0:
        return bce
    p_t = torch.exp(-bce)
    return (1 - p_t).pow(gamma) * bce


class _Batcher:
    """Padded batches of anchors with labels and loss weights, from tensors gathered once."""

    def __init__(self, traces: TraceSet, docs: list[int], min_layers: int, cfg: TrainConfig):
        self.cfg, self.min_layers = cfg, min_layers
        chosen = [traces.docs[d] for d in docs]
        self.items = list(range(sum(len(d.positions) for d in chosen)))
        if not chosen:
            return
        n_max = max(d.n_chunks for d in chosen)
        L, D = chosen[0].keys.shape[0], chosen[0].keys.shape[-1]
        self.per = chosen[0].keys.shape[1] // max(1, chosen[0].n_chunks)
        self.keys = torch.zeros(len(chosen), L, n_max * self.per, D)   # every document's keys, padded once
        for i, d in enumerate(chosen):
            self.keys[i, :, : d.keys.shape[1]] = d.keys
        pad = lambda t: torch.nn.functional.pad(t, (0, n_max - t.shape[-1]))  # noqa: E731
        self.doc = torch.cat([torch.full((len(d.positions),), i) for i, d in enumerate(chosen)])
        self.hidden = torch.cat([d.hidden for d in chosen])
        self.positions = torch.cat([d.positions for d in chosen])
        self.votes = torch.cat([pad(d.votes) for d in chosen])
        self.population = torch.cat([pad(d.population) for d in chosen])
        self.chunk_size = traces.population.chunk_size

    def batch(self, rows: list[int], gen: torch.Generator, train: bool):
        rows_t = torch.tensor(rows)
        n = max(1, (int(self.positions[rows_t].max()) + 1) // self.chunk_size)
        keys = self.keys[self.doc[rows_t], :, : n * self.per]
        votes, pop = self.votes[rows_t, :n], self.population[rows_t, :n]
        pos = (votes >= self.min_layers) & pop
        neg = pop & ~pos
        weights = torch.zeros(pos.shape)
        weights[pos] = (votes[pos].float() / self.min_layers) if self.cfg.vote_weighting else 1.0
        if train and self.cfg.neg_ratio > 0:
            # k_i random negatives per anchor: rank the negatives of each row by a random key
            k = (pos.sum(1).float() * self.cfg.neg_ratio).ceil().clamp_min(self.cfg.min_negatives)
            key = torch.rand(pos.shape, generator=gen).masked_fill(~neg, 2.0)
            rank = key.argsort(1).argsort(1)
            weights[neg & (rank < k[:, None])] = 1.0
        else:
            weights[neg] = 1.0
        return self.hidden[rows_t], keys, self.positions[rows_t], pos.float(), weights


class _LayerLogits(torch.nn.Module):
    """DDP wraps a module whose forward is the per-layer logits."""

    def __init__(self, indexer: NeuralIndexer):
        super().__init__()
        self.indexer = indexer

    def forward(self, hidden, keys, positions):
        return self.indexer.layer_logits(hidden, keys, positions)


def _anchor_spans(doc, chunk_size: int):
    """(anchor row, chunks of history it may select) for every anchor of a document."""
    for a, pos in enumerate(doc.positions.tolist()):
        yield a, (pos + 1) // chunk_size


@torch.no_grad()
def evaluate(indexer: NeuralIndexer | None, traces: TraceSet, docs: list[int], min_layers: int,
             budget: float = 0.10, ks: tuple[int, ...] = (4, 8, 16, 32), scorer: str = "indexer",
             threshold: float = 0.5, batch_size: int = 256) -> ScoreMetrics:
    """Metrics of the indexer (or of the dump's stored `quest` scores) on the anchors of `docs`."""
    scores, labels, pops = [], [], []
    c = traces.population.chunk_size
    block = traces.params.get("key_block")  # finer than the trained keys: both resolutions score
    for d in docs:
        doc = traces.docs[d]
        if scorer == "quest":
            probs = doc.quest
        else:
            probs = torch.cat([indexer(doc.hidden[i: i + batch_size], doc.keys, doc.positions[i: i + batch_size], block)
                               for i in range(0, len(doc.positions), batch_size)])
        for a, n in _anchor_spans(doc, c):
            scores.append(probs[a, :n])
            labels.append(doc.votes[a, :n] >= min_layers)
            pops.append(doc.population[a, :n])
    return score_metrics(scores, labels, pops, ks=ks, budget=budget,
                         threshold=None if scorer == "quest" else threshold)


@torch.no_grad()
def calibrate_threshold(indexer: NeuralIndexer, traces: TraceSet, docs: list[int], min_layers: int,
                        threshold: float = 0.5) -> float:
    """Shift every retriever's bias so that `threshold` maximises F1 on `docs`; returns the shift.

    Negative sampling (3:1) and early stopping on a ranking metric leave the sigmoid's scale
    arbitrary; the runtime keeps chunks above a fixed 0.5, so the operating point is set here,
    on held-out documents, as the paper's F1-at-0.5 metric asks.
    """
    c = traces.population.chunk_size
    layer_logits, labels = [], []
    for d in docs:
        doc = traces.docs[d]
        ll = indexer.layer_logits(doc.hidden, doc.keys, doc.positions)      # [L, A, n]
        for a, n in _anchor_spans(doc, c):
            pop = doc.population[a, :n]
            layer_logits.append(ll[:, a, :n][:, pop])
            labels.append((doc.votes[a, :n] >= min_layers)[pop])
    if not layer_logits:
        return 0.0
    ll, y = torch.cat(layer_logits, 1), torch.cat(labels)
    if not y.any():
        return 0.0
    best, best_f1 = 0.0, -1.0
    for shift in torch.arange(-8.0, 8.01, 0.125).tolist():
        chosen = indexer.ensemble(ll + shift) > threshold
        tp = int((chosen & y).sum())
        f1 = 2 * tp / max(1, int(chosen.sum()) + int(y.sum()))
        if f1 > best_f1 + 1e-9:
            best, best_f1 = shift, f1
    for r in indexer.retrievers.values():
        r.bias.add_(best)
    return best


def _dist() -> tuple[int, int]:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed() -> bool:
    """Join the torchrun process group if launched by torchrun (gloo on CPU). Returns True if distributed."""
    import torch.distributed as dist
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


def _use_backbone_init(traces: TraceSet, cfg: TrainConfig) -> bool:
    return cfg.init == "backbone" and traces.query_weights is not None and \
        cfg.n_heads in (None, traces.backbone["n_heads"])


def build_indexer(traces: TraceSet, cfg: TrainConfig) -> NeuralIndexer:
    info, params = traces.backbone, traces.params
    layers = cfg.layers if cfg.layers is not None else default_layers(traces.manifest)
    bad = [x for x in layers if x not in traces.candidates]
    if bad:
        raise TrainError(f"target layers {bad} are not candidate layers of the dump ({traces.candidates})")
    n_heads = cfg.n_heads or (info["n_heads"] if _use_backbone_init(traces, cfg) else 8)
    icfg = IndexerConfig(d_model=info["d_model"], key_dim=info["key_dim"], rope_dim=info["head_dim"],
                         layers=list(layers), n_heads=n_heads, q_rank=cfg.q_rank, inv_freq=info["inv_freq"],
                         ensemble=cfg.ensemble, chunk_size=params["chunk_size"], score=cfg.score,
                         key_block=params.get("key_block", params["chunk_size"]), fingerprint=info["fingerprint"])
    return NeuralIndexer(icfg)


@torch.no_grad()
def init_from_backbone(indexer: NeuralIndexer, traces: TraceSet, docs: list[int], rate: float) -> None:
    """Start each retriever's query side from the backbone's own query projection at its layer.

    Head h of the indexer gets the backbone's query head h, placed in the key block of the KV
    head it reads (GQA), so q_h . k is that head's attention logit against a block's mean
    key. wq_b . RMSNorm(wq_a .) is set to the best rank-q_rank approximation of this map
    (SVD), rescaled by the typical norm wq_a . h has on the training anchors; the head weights
    start equal and positive, then logits are scaled to a spread of ~2 around the positive
    rate. Training refines everything from there.

    A backbone that normalises each query head (`q_norm`) divides head h by its RMS: each
    head's rows are divided by that RMS averaged over the training anchors and multiplied by
    the norm's gain, so the map has the backbone's query scale on typical inputs.
    """
    info, cfg = traces.backbone, indexer.cfg
    H, Dh = info["n_heads"], info["head_dim"]
    group = H // info["kv_heads"]
    for i, layer in enumerate(cfg.layers):
        W = traces.query_weights[layer].float()                     # [H * Dh, d_model]
        if layer in traces.query_norms:
            hidden = torch.cat([traces.docs[d].hidden[:, i] for d in docs])
            head_rms = (hidden @ W.T).view(-1, H, Dh).pow(2).mean(-1).sqrt().mean(0)   # [H]
            W = (W.view(H, Dh, -1) * (traces.query_norms[layer].view(1, Dh, 1) / head_rms.view(H, 1, 1))).view(H * Dh, -1)
        M = torch.zeros(H * cfg.key_dim, W.shape[1])
        for h in range(H):
            g = h // group
            M[h * cfg.key_dim + g * Dh: h * cfg.key_dim + (g + 1) * Dh] = W[h * Dh: (h + 1) * Dh]
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
        r = cfg.q_rank
        hidden = torch.cat([traces.docs[d].hidden[:, i] for d in docs])
        rms = float((hidden @ Vh[:r].T).pow(2).mean(-1).sqrt().mean())
        ret = indexer.retrievers[f"l{layer}"]
        ret.wq_a.weight.copy_(Vh[:r])
        ret.q_norm_weight.fill_(1.0)
        ret.wq_b.weight.copy_(U[:, :r] * S[:r] * rms)
        if cfg.score == "softmax":  # real attention logits: q.k / sqrt(head_dim) on unscaled keys
            ret.weights_proj.weight.zero_()                   # equal head mixture
            ret.log_temperature.fill_(-0.5 * math.log(Dh) - math.log(cfg.key_scale))
            ret.bias.fill_(math.log(rate / (1 - rate)))
            continue
        mean = hidden.mean(0)
        ret.weights_proj.weight.copy_((mean / mean.pow(2).sum())[None].expand(H, -1) * (cfg.key_dim * H) ** 0.5)
        # calibrate the logit scale on a sample of training anchors
        sample = [(d, a) for d in docs for a in range(len(traces.docs[d].positions))][:256]
        raw = []
        for d, a in sample:
            doc = traces.docs[d]
            ret.bias.zero_()
            logit = ret(doc.hidden[a: a + 1, i], doc.keys[i], doc.positions[a: a + 1])[0]
            raw.append(logit[doc.population[a]])
        raw = torch.cat(raw) if raw else torch.zeros(1)
        alpha = 2.0 / float(raw.std().clamp_min(1e-6))
        ret.weights_proj.weight.mul_(alpha)
        ret.bias.fill_(math.log(rate / (1 - rate)) - alpha * float(raw.mean()))


def extend_distance_prior(indexer: NeuralIndexer, traces: TraceSet, docs: list[int],
                          min_share: float = 0.01) -> int | None:
    """Give distance buckets the training data barely reached the bias of the farthest one it did.

    A bucket holding under `min_share` of the training population's chunks learned little or
    nothing (its bias stays near 0 or is fit to a handful of chunks), while trained buckets sit
    near +1: left as is, every chunk farther back than the training documents were long would
    be penalised at inference (on 4K training documents that is the whole first half of an 8K
    context). Returns the last trained bucket (None when the indexer has no distance prior).
    """
    n_buckets = indexer.cfg.distance_buckets
    if not n_buckets:
        return None
    retriever = next(iter(indexer.retrievers.values()))
    counts = torch.zeros(n_buckets)
    for d in docs:
        doc = traces.docs[d]
        buckets = retriever.buckets(doc.positions, doc.n_chunks)
        counts += torch.bincount(buckets[doc.population], minlength=n_buckets).float()
    trained = torch.nonzero(counts >= min_share * counts.sum().clamp_min(1)).flatten()
    last = int(trained.max()) if trained.numel() else 0
    with torch.no_grad():
        for r in indexer.retrievers.values():
            r.distance_bias[last + 1:] = r.distance_bias[last]
    return last


def train_indexer(dumps: list[str | Path] | str | Path | TraceSet, cfg: TrainConfig | None = None,
                  progress: bool = False, log=print) -> TrainResult:
    """Train on the dump(s); returns the best-on-validation indexer and its metrics (rank 0 in DDP)."""
    cfg = cfg or TrainConfig()
    before = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _train(dumps, cfg, progress, log)
    finally:
        torch.set_num_threads(before)


def _train(dumps, cfg: TrainConfig, progress: bool, log) -> TrainResult:
    import torch.distributed as dist

    start = time.perf_counter()
    rank, world = _dist()
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    traces = dumps if isinstance(dumps, TraceSet) else None
    if traces is None:
        from .dataset import common_candidate_layers, read_manifest
        folders = [dumps] if isinstance(dumps, (str, Path)) else list(dumps)
        manifest = read_manifest(folders[0])
        params = manifest["params"]
        pop = Population(params["chunk_size"], cfg.page_size or params["page_size"],
                         params["sink_tokens"] if cfg.sink_tokens is None else cfg.sink_tokens,
                         params["tail_tokens"] if cfg.tail_tokens is None else cfg.tail_tokens)
        if cfg.layers is not None:
            layers = cfg.layers
        else:  # decided from the manifests alone, among the layers every dump stored
            layers = default_layers({**manifest, "candidate_layers": common_candidate_layers(folders)})
        traces = TraceSet(folders, layers=layers, population=pop)   # only the target layers are read
        cfg = TrainConfig(**{**asdict(cfg), "layers": list(layers)})
    elif cfg.layers is not None and cfg.layers != traces.layers:
        raise TrainError(f"the TraceSet was loaded with layers {traces.layers}, the config asks for {cfg.layers}")
    else:
        cfg = TrainConfig(**{**asdict(cfg), "layers": list(traces.layers)})
    params = traces.params
    min_layers = cfg.min_layers or params["min_layers"]
    dump_block = params.get("key_block", params["chunk_size"])
    if cfg.fine_key_block is not None and dump_block % cfg.fine_key_block:
        raise TrainError(f"fine_key_block ({cfg.fine_key_block}) must divide the dump's key_block ({dump_block})")

    train_docs, val_docs = traces.split(cfg.val_fraction, cfg.seed)
    if not train_docs:
        raise TrainError("no training documents (dump more documents or lower val_fraction)")
    indexer = build_indexer(traces, cfg)
    # Condition the frozen keys once: scale them to unit RMS on the training documents.
    sq = sum(float(traces.docs[d].keys.pow(2).sum()) for d in train_docs)
    cnt = sum(traces.docs[d].keys.numel() for d in train_docs)
    indexer.cfg.key_scale = float(1.0 / math.sqrt(sq / max(1, cnt))) if sq > 0 else 1.0
    indexer.cfg.extra = {}
    rate = min(0.5, max(1e-3, traces.positive_rate(min_layers, train_docs)))
    if _use_backbone_init(traces, cfg):
        init_from_backbone(indexer, traces, train_docs, rate)
    else:
        with torch.no_grad():  # start from the positive rate, so early steps are not spent on calibration
            for r in indexer.retrievers.values():
                r.bias.fill_(math.log(rate / (1 - rate)))
    # make every rank start from rank 0's weights
    if world > 1:
        for p in indexer.parameters():
            dist.broadcast(p.data, 0)
    if cfg.freeze_queries and _use_backbone_init(traces, cfg):  # before DDP, which registers what needs grads
        for r in indexer.retrievers.values():
            r.wq_a.weight.requires_grad_(False)
            r.wq_b.weight.requires_grad_(False)
    model = _LayerLogits(indexer)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel
        model = DistributedDataParallel(model)
    opt = torch.optim.AdamW([p for p in indexer.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    batcher = _Batcher(traces, train_docs, min_layers, cfg)
    items = batcher.items
    result = TrainResult(indexer, cfg, min_layers, train_anchors=len(items),
                         val_anchors=sum(len(traces.docs[d].positions) for d in val_docs), world_size=world)
    if not items:
        raise TrainError("the training documents hold no anchors")
    gen = torch.Generator().manual_seed(cfg.seed + rank)
    best_score, best_state, bad_epochs = -1.0, None, 0
    for epoch in range(cfg.epochs):
        order = items[:]
        random.Random(cfg.seed * 1000 + epoch).shuffle(order)  # same order on every rank
        per_rank = len(order) // world
        mine = order[rank * per_rank: (rank + 1) * per_rank] if world > 1 else order
        model.train()
        total, steps = 0.0, 0
        for b in range(0, len(mine), cfg.batch_size):
            batch = batcher.batch(mine[b: b + cfg.batch_size], gen, train=True)
            hidden, keys, positions, targets, weights = batch
            logits = model(hidden, keys, positions)
            per = focal_bce(logits, targets.expand_as(logits), cfg.gamma) * weights
            loss = per.sum() / (weights.sum() * logits.shape[0]).clamp_min(1e-9)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach())
            steps += 1
        train_loss = total / max(1, steps)
        if world > 1:
            t = torch.tensor([train_loss])
            dist.all_reduce(t)
            train_loss = float(t) / world
        record = {"epoch": epoch + 1, "train_loss": train_loss}
        indexer.eval()
        stop = torch.zeros(1)
        if rank == 0:
            if val_docs:
                val = evaluate(indexer, traces, val_docs, min_layers, cfg.budget, cfg.ks)
                score = val.recall_at_budget + 1e-3 * (val.f1 or 0.0)
                record.update({"val_recall_at_budget": val.recall_at_budget, "val_f1": val.f1,
                               "val_recall": val.recall, "val_resident_fraction": val.resident_fraction})
            else:
                score = -train_loss
            if score > best_score + 1e-6:
                best_score, best_state, bad_epochs = score, copy.deepcopy(indexer.state_dict()), 0
            else:
                bad_epochs += 1
            over_time = cfg.time_limit is not None and time.perf_counter() - start > cfg.time_limit
            if bad_epochs >= cfg.patience or over_time:
                stop[0] = 1
            if progress:
                log(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
        result.history.append(record)
        result.epochs_run = epoch + 1
        if world > 1:
            dist.broadcast(stop, 0)
        if stop[0]:
            break
    if world > 1:  # DDP must have kept the replicas identical; check before rank 0 restores its best epoch
        flat = torch.cat([p.detach().flatten() for p in indexer.parameters()])
        gathered = [torch.zeros_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        result.ranks_in_sync = all(torch.equal(gathered[0], g) for g in gathered[1:])
    if rank == 0 and best_state is not None:
        indexer.load_state_dict(best_state)
    if world > 1:  # every rank ends with rank 0's best weights
        for p in indexer.parameters():
            dist.broadcast(p.data, 0)
    indexer.eval()
    if cfg.extend_distance_prior:
        result.distance_buckets_trained = extend_distance_prior(indexer, traces, train_docs)
    result.calibration_shift = calibrate_threshold(indexer, traces, val_docs or train_docs, min_layers)
    if val_docs:
        result.val = evaluate(indexer, traces, val_docs, min_layers, cfg.budget, cfg.ks)
        qa_docs = [d for d in val_docs if traces.docs[d].meta.get("kind") == "qa"]
        if qa_docs:  # retrieval events: the model reads a fact back to answer
            result.val_qa = evaluate(indexer, traces, qa_docs, min_layers, cfg.budget, cfg.ks)
        if traces.params.get("quest_baseline", True):  # the dump stored quest's scores
            result.val_quest = evaluate(None, traces, val_docs, min_layers, cfg.budget, cfg.ks, scorer="quest")
    result.seconds = time.perf_counter() - start
    indexer.cfg.fine_key_block = cfg.fine_key_block
    indexer.cfg.extra = {"min_layers": min_layers, "dump_params": traces.params,
                         "population": asdict(traces.population), "train": {**asdict(cfg), "ks": list(cfg.ks)},
                         "metrics": result.summary()}
    return result
