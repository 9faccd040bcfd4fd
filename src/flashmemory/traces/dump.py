"""Stage 1: run the backbone over a corpus and store what the indexer trains on.

For every document, one dense forward (no LSA: a plain transformers DynamicCache) gives the
post-RoPE keys of every layer and, through `ActivationRecorder(keep_all=True)`, the attention
input of every layer at every position. From these the dump stores, per document
(`part-NNNNNN.safetensors`, written atomically, so an interrupted dump resumes where it stopped):

  keys      [C, n_chunks * per, key_dim]  compressed keys (fp16) of every complete chunk at the C candidate
                                          layers: per = chunk_size / key_block keys per chunk
  hidden    [A, C, d_model]        fp16   attention input at each anchor (the indexer's query side)
  positions [A]                    int64  anchor positions (the last decoded token before a cycle)
  votes     [A, n_chunks]          uint8  max over the anchor's next tau positions of the number of
                                          layers whose top-p set holds the chunk (see labels.py)
  quest     [A, n_chunks]          fp32   the training-free `quest` policy's scores at the anchor
                                          (a baseline computed on exactly the same data)

and one `manifest.json` with the backbone fingerprint and every parameter. Decode positions
come from teacher-forced continuations (`continue`, `recall`) and from the model's own greedy
answers to questions (`qa`).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..config import LSAConfig
from ..indexer.keystore import compress_keys
from ..policies.base import SelectionContext
from ..policies.quest import QuestIndex, QuestPolicy
from .corpus import TraceDocument
from .labels import layer_votes, window_max

FORMAT = "flashmemory-traces"
VERSION = 1
MANIFEST = "manifest.json"
QUERY_WEIGHTS = "query_weights.safetensors"


class DumpError(ValueError):
    """A dump that cannot be started or continued as asked."""


@dataclass
class DumpConfig:
    """What a dump records. Everything here goes into the manifest; resuming requires equality.
    The home of every dump default (chunking from LSAConfig): `flashmemory dump` derives its options
    from the fields' defaults and help metadata."""

    chunk_size: int = LSAConfig.chunk_size
    key_block: int = 8                   # tokens per compressed key (chunk_size / key_block keys per chunk)
    tau: int = LSAConfig.tau
    top_p: float = field(default=0.6, metadata={"help": "per-layer attention mass a golden set must reach"})
    min_layers: int = field(default=3, metadata={
        "help": "layers that must choose a chunk (training default; votes are stored, so it can change later)"})
    label_layers: list[int] | None = None  # layers whose attention votes (None: all)
    candidate_layers: list[int] | None = None  # layers whose hidden states and keys are stored (None: all)
    region_tokens: int = field(default=512, metadata={"help": "teacher-forced decode positions per document"})
    anchor_stride: int = field(default=16, metadata={"help": "decode positions between anchors"})
    qa_anchor_stride: int = 4            # denser anchors over a question and its answer (few positions, rich labels)
    label_stride: int = field(default=1, metadata={
        "help": "label every k-th decode position (faster, approximate)"})
    max_answer_tokens: int = field(default=32, metadata={"help": "answer length cap for question documents"})
    max_tokens: int = field(default=8192, metadata={
        "flag": "doc-max-tokens", "help": "documents are cut to this many tokens (and to the model's context)"})
    page_size: int = LSAConfig.page_size  # population defaults for training (sink/tail excluded), see labels.Population
    sink_tokens: int = LSAConfig.sink_tokens
    tail_tokens: int = LSAConfig.tail_tokens
    quest_baseline: bool = True          # also store the quest policy's scores (a baseline; ~15% of dump time)
    block: int = 128                     # query positions per attention block when labelling (memory bound)

    def __post_init__(self) -> None:
        for name in ("chunk_size", "key_block", "tau", "min_layers", "region_tokens", "anchor_stride", "qa_anchor_stride", "label_stride",
                     "max_answer_tokens", "max_tokens", "page_size", "block"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise DumpError(f"{name} must be a positive integer, got {value!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise DumpError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.chunk_size % self.key_block:
            raise DumpError(f"chunk_size ({self.chunk_size}) must be a multiple of key_block ({self.key_block})")
        if self.page_size % self.chunk_size:
            raise DumpError(f"page_size ({self.page_size}) must be a multiple of chunk_size ({self.chunk_size})")
        if self.max_tokens < 4 * self.chunk_size:
            raise DumpError(f"max_tokens must be at least {4 * self.chunk_size}")


@dataclass
class DumpSummary:
    """What a dump run did."""

    folder: str
    shard: tuple[int, int]
    documents: int = 0           # written by this run
    skipped: int = 0             # already on disk (resumed)
    anchors: int = 0
    tokens: int = 0
    positives: int = 0           # population chunks with votes >= min_layers, over written anchors
    population: int = 0
    seconds: float = 0.0
    disk_bytes: int = 0          # whole dump folder
    answers: list[dict] = field(default_factory=list)

    @property
    def positive_rate(self) -> float:
        return self.positives / max(1, self.population)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["positive_rate"] = self.positive_rate
        return d


def backbone_info(backbone) -> dict:
    """Shapes the indexer needs, read once from the backbone (training never loads it)."""
    cfg = backbone.model.config
    n_heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    rotary = getattr(getattr(backbone.model, "model", backbone.model), "rotary_emb", None)
    # hybrid models (Gemma 3) keep one table per layer type; the indexer reads global layers only
    table = getattr(rotary, "inv_freq", None)
    table = getattr(rotary, "full_attention_inv_freq", None) if table is None else table
    inv_freq = table.float().tolist() if table is not None else None
    return {"fingerprint": backbone.fingerprint, "path": str(backbone.path), "num_layers": cfg.num_hidden_layers,
            "d_model": cfg.hidden_size, "n_heads": n_heads, "kv_heads": cfg.num_key_value_heads,
            "head_dim": head_dim, "key_dim": cfg.num_key_value_heads * head_dim, "inv_freq": inv_freq,
            "max_context": backbone.max_context}


def encode_document(tokenizer, doc: TraceDocument, max_tokens: int) -> tuple[list[int], int]:
    """(ids, region_start). A `qa` document's ids are its first prompt (context + first question)
    and region_start is where that question starts; other documents are cut to max_tokens."""
    if doc.kind == "qa":
        if not doc.questions:
            raise DumpError(f"{doc.doc_id}: a qa document needs at least one question")
        body = doc.context.rstrip() + "\n\n"
        if doc.chat and getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template([{"role": "user", "content": body + doc.questions[0]}],
                                                 add_generation_prompt=True, tokenize=False)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            q_start = len(tokenizer(text[: text.index(body) + len(body)], add_special_tokens=False)["input_ids"])
        else:
            ids = tokenizer(body + "Question: " + doc.questions[0] + "\nAnswer:", add_special_tokens=True)["input_ids"]
            q_start = len(tokenizer(body, add_special_tokens=True)["input_ids"])
        if len(ids) > max_tokens:
            raise DumpError(f"{doc.doc_id}: the question prompt has {len(ids)} tokens, more than the {max_tokens} left "
                            "for it (--doc-max-tokens minus room for every question and answer); shorten the "
                            "document or raise --doc-max-tokens (built-in corpus: lower --max-tokens)")
        return ids, max(1, min(q_start, len(ids) - 1))
    ids = tokenizer(doc.context, add_special_tokens=True)["input_ids"]
    if doc.continuation:
        extra = tokenizer(doc.continuation, add_special_tokens=False)["input_ids"]
        ids = ids[: max_tokens - len(extra)]
        start = len(ids)
        return ids + extra, start
    return ids[:max_tokens], 0


def followup_ids(tokenizer, question: str, chat: bool) -> list[int]:
    """Tokens that close the model's answer and ask the next question (a new user turn)."""
    if chat and getattr(tokenizer, "chat_template", None):
        # render a two-turn conversation with sentinels and keep what lies between answer and question
        a, q = "\x00ANSWER\x00", "\x00QUESTION\x00"
        text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}, {"role": "assistant", "content": a},
                                              {"role": "user", "content": q}], add_generation_prompt=True,
                                             tokenize=False)
        between = text[text.index(a) + len(a):].replace(q, question)
        return tokenizer(between, add_special_tokens=False)["input_ids"]
    return tokenizer("\nQuestion: " + question + "\nAnswer:", add_special_tokens=False)["input_ids"]


class _Feeder:
    """Feeds tokens through the backbone with one cache, keeping layer inputs from position `first` on."""

    def __init__(self, model, recorder, first: int):
        from transformers import DynamicCache

        self.model, self.recorder, self.first = model, recorder, first
        self.cache = DynamicCache(config=model.config)
        self.device = next(model.parameters()).device
        self.length = 0
        self.hidden: list[list[torch.Tensor]] = [[] for _ in recorder.modules]
        self.cos: list[list[torch.Tensor]] = [[] for _ in recorder.modules]  # per layer: rotary tables may differ
        self.sin: list[list[torch.Tensor]] = [[] for _ in recorder.modules]

    def feed(self, ids: list[int]) -> torch.Tensor:
        """Run `ids` at the next positions; return the last position's logits."""
        out = self.model(input_ids=torch.tensor([ids], device=self.device), past_key_values=self.cache,
                         use_cache=True, logits_to_keep=1)
        keep = slice(max(0, self.first - self.length), None)
        for i, rows in enumerate(self.recorder.inputs):
            self.hidden[i].append(rows[keep].float().cpu())
            self.cos[i].append(self.recorder.cos[i][keep].float().cpu())
            self.sin[i].append(self.recorder.sin[i][keep].float().cpu())
        self.length += len(ids)
        return out.logits[0, -1]

    def answer(self, logits: torch.Tensor, eos: set[int], max_tokens: int) -> list[int]:
        """Greedy answer; every token but a final end-of-sequence is fed (it is a decode position)."""
        out: list[int] = []
        nxt = int(logits.argmax())
        while len(out) < max_tokens and nxt not in eos:
            out.append(nxt)
            nxt = int(self.feed([nxt]).argmax())
        return out

    def tensors(self) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """Per layer: attention inputs, rotary cos and sin of the kept positions, and post-RoPE keys [kv, N, D]."""
        keys = [layer.keys[0].float().cpu() for layer in self.cache.layers]
        return [torch.cat(h) for h in self.hidden], [torch.cat(c) for c in self.cos], \
            [torch.cat(x) for x in self.sin], keys


def _eos_ids(model, tokenizer) -> set[int]:
    gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = {tokenizer.eos_token_id} | set([gen] if isinstance(gen, int) else (gen or []))
    return {i for i in ids if i is not None}


@torch.no_grad()
def trace_document(backbone, doc: TraceDocument, cfg: DumpConfig) -> tuple[dict[str, torch.Tensor], dict]:
    """Run the backbone over one document; return its tensors and metadata (see the module docstring)."""
    from ..runtime.capture import ActivationRecorder, Activations, project_queries

    model, tok = backbone.model, backbone.tokenizer
    info = backbone_info(backbone)
    cands, voters = dump_layers(backbone, cfg)
    limit = min(cfg.max_tokens, info["max_context"] or cfg.max_tokens)
    ids, region_start = encode_document(tok, doc, limit - (60 + cfg.max_answer_tokens) * len(doc.questions))
    if doc.kind != "qa" and not doc.continuation:
        region_start = max(1, len(ids) - cfg.region_tokens)
    if len(ids) < 2 * cfg.page_size + cfg.tau:
        raise DumpError(f"{doc.doc_id}: only {len(ids)} tokens; documents need at least {2 * cfg.page_size + cfg.tau}")
    first = region_start - 1  # the anchor just before the first decode position
    recorder = ActivationRecorder(model, keep_all=True)
    prompt_ends, answers = [], []
    try:
        feeder = _Feeder(model, recorder, first)
        logits = feeder.feed(ids)
        eos = _eos_ids(model, tok)
        for t, question in enumerate(doc.questions if doc.kind == "qa" else []):
            if t:
                logits = feeder.feed(followup_ids(tok, question, doc.chat))
            prompt_ends.append(feeder.length - 1)
            answers.append(feeder.answer(logits, eos, cfg.max_answer_tokens))
            if not answers[-1]:  # an empty answer leaves nothing fed; feed the end marker to keep positions going
                logits = feeder.feed([int(logits.argmax())])
        hidden, cos, sin, keys = feeder.tensors()
    finally:
        recorder.close()
    N = feeder.length
    modules = recorder.modules
    kept = sorted(set(cands) | set(voters))  # layers with the whole history (a sliding layer's cache is cut)

    # golden-label votes at the decode positions region_start .. N-1 (every label_stride-th)
    vote_pos = torch.arange(region_start, N, cfg.label_stride)
    rows = vote_pos - first
    queries = [project_queries(modules[i], hidden[i][rows], cos[i][rows], sin[i][rows]) for i in voters]
    votes = layer_votes(queries, [keys[i] for i in voters], vote_pos, cfg.chunk_size, cfg.top_p, cfg.block)
    n_chunks = N // cfg.chunk_size
    votes = votes[:, :n_chunks]

    # anchors: teacher-forced prose needs whole windows; a question's answer really ends
    last = N - 1 - cfg.tau if doc.kind == "continue" and not doc.continuation else N - 2
    stride = cfg.qa_anchor_stride if doc.kind == "qa" else cfg.anchor_stride
    anchors = set(range(first, max(first, last) + 1, stride)) | set(prompt_ends)  # each answer's first cycle
    anchors = torch.tensor(sorted(a for a in anchors if first <= a < N - 1))
    labels = window_max(votes, vote_pos, anchors, cfg.tau)
    for i, a in enumerate(anchors.tolist()):
        labels[i, (a + 1) // cfg.chunk_size:] = 0  # only complete chunks of the anchor's history

    # the quest baseline on the same anchors, through the real policy
    lsa = LSAConfig(chunk_size=cfg.chunk_size, page_size=cfg.page_size, tau=cfg.tau,
                    sink_tokens=cfg.sink_tokens, tail_tokens=cfg.tail_tokens)
    host_keys = torch.stack([keys[i] for i in kept])
    quest, policy, index = torch.zeros(len(anchors), n_chunks), QuestPolicy(), QuestIndex()
    for i, a in enumerate(anchors.tolist() if cfg.quest_baseline else []):
        n_pages = (a + 1) // cfg.page_size
        if n_pages == 0:
            continue
        r = slice(a - first, a - first + 1)
        ctx = SelectionContext(config=lsa, length=a + 1, n_pages=n_pages, cycle=i, host_keys=host_keys,
                               activations=Activations(modules, [h[r] for h in hidden], [c[r] for c in cos],
                                                       [x[r] for x in sin]), index=index, layers=tuple(kept))
        s = policy.score(ctx)
        quest[i, : s.numel()] = s

    tensors = {
        "keys": compress_keys(host_keys[[kept.index(i) for i in cands], :, : n_chunks * cfg.chunk_size],
                              cfg.key_block).half(),
        "hidden": torch.stack([hidden[i][anchors - first] for i in cands], 1).half(),
        "positions": anchors.long(),
        "votes": labels.contiguous(),
        "quest": quest,
    }
    meta = {**doc.to_meta(), "tokens": N, "region_start": int(region_start), "prompt_ends": prompt_ends,
            "generated": [tok.decode(a) for a in answers]}
    if doc.kind == "qa":
        meta["answer_correct"] = [bool(ref) and ref.lower() in gen.lower()
                                  for ref, gen in zip(doc.answers, meta["generated"])]
    return tensors, meta


def dump_layers(backbone, cfg: DumpConfig) -> tuple[list[int], list[int]]:
    """(candidate layers, label layers): the configured ones, by default every layer that keeps the
    whole history. A sliding-window layer (Gemma 3's local layers) is refused: it is never tiered,
    so the indexer has nothing to choose there and its cache holds only the window."""
    from ..memory.pools import LayerLayout

    layout = LayerLayout.of(backbone.model)
    out = []
    for name, layers in (("candidate_layers", cfg.candidate_layers), ("label_layers", cfg.label_layers)):
        layers = list(layout.tiered) if layers is None else list(layers)
        n_layers = len(layout.tiered) + len(layout.sliding)
        bad = [x for x in layers if not 0 <= x < n_layers]
        if bad:
            raise DumpError(f"{name} {bad} out of range: the backbone has {n_layers} layers")
        local = [x for x in layers if x in layout.sliding]
        if local:
            raise DumpError(f"{name} {local} are sliding-window layers; this backbone keeps the whole history at "
                            f"layers {list(layout.tiered)} only")
        out.append(layers)
    return out[0], out[1]


def export_query_weights(backbone, folder: str | os.PathLike, layers: list[int]) -> Path:
    """Store the backbone's query projections at `layers` beside the dump (fp16).

    Training may start the indexer's query side from them (`TrainConfig.init="backbone"`):
    their leading singular directions already point at what the layer attends to, which a
    few hundred training anchors cannot teach from scratch. This is part of stage 1;
    training still reads nothing but the dump folder.

    A backbone that normalises each query head before RoPE (Qwen3, Gemma 3: `q_norm`) also gets
    `q_norm.{layer}`, the norm's gain per head dimension (its output on a vector of ones).
    """
    from safetensors.torch import save_file

    from ..runtime.capture import attention_modules

    path = Path(folder) / QUERY_WEIGHTS
    if path.is_file():
        return path
    modules = attention_modules(backbone.model)
    tensors = {f"q_proj.{i}": modules[i].q_proj.weight.detach().to(torch.float16).cpu().contiguous() for i in layers}
    for i in layers:
        norm = getattr(modules[i], "q_norm", None)
        if norm is not None:
            ones = torch.ones(modules[i].head_dim, dtype=modules[i].q_proj.weight.dtype,
                              device=modules[i].q_proj.weight.device)
            tensors[f"q_norm.{i}"] = norm(ones).detach().to(torch.float16).cpu().contiguous()
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata={"fingerprint": backbone.fingerprint})
    os.replace(tmp, path)
    return path


def _atomic_write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def open_manifest(folder: Path, manifest: dict) -> None:
    """Create the manifest, or check that an existing one describes the same dump."""
    path = folder / MANIFEST
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            raise DumpError(f"{path} is corrupt; remove the folder or choose another --out") from None
        for key in ("format", "version", "backbone", "params", "corpus"):
            if old.get(key) != manifest.get(key):
                raise DumpError(f"{folder} already holds a dump with a different {key}; resume with the same "
                                "model, corpus and parameters, or choose another --out")
        return
    folder.mkdir(parents=True, exist_ok=True)
    _atomic_write_json(path, manifest)


def part_path(folder: Path, index: int) -> Path:
    return folder / f"part-{index:06d}.safetensors"


def _remove_stale_temporaries(folder: Path) -> None:
    """Delete half-written parts left by killed processes of this machine (never a live one's)."""
    for tmp in folder.glob("part-*.tmp*"):
        try:
            pid = int(tmp.suffix[len(".tmp"):])
            os.kill(pid, 0)  # raises if no such process: the writer is gone
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except (ValueError, PermissionError):
            pass


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*") if p.is_file())


def run_dump(backbone, corpus: list[TraceDocument], folder: str | os.PathLike, cfg: DumpConfig | None = None,
             corpus_spec: dict | None = None, shard: tuple[int, int] = (0, 1), progress: bool = True,
             max_docs: int | None = None) -> DumpSummary:
    """Dump the documents of shard i/N (index % N == i) into `folder`, skipping those already there.

    `corpus_spec` describes the corpus in the manifest (so a resume with another corpus is
    refused). `max_docs` stops after writing that many documents (the rest is left for a resume).
    """
    from safetensors.torch import save_file
    from tqdm import tqdm

    from .labels import Population

    cfg = cfg or DumpConfig()
    folder = Path(folder)
    i_shard, n_shards = shard
    if not (n_shards >= 1 and 0 <= i_shard < n_shards):
        raise DumpError(f"shard must be i/N with 0 <= i < N, got {i_shard}/{n_shards}")
    info = backbone_info(backbone)
    candidates, _ = dump_layers(backbone, cfg)
    ids = [d.doc_id for d in corpus]
    if len(set(ids)) != len(ids):
        raise DumpError("document ids must be unique")
    manifest = {"format": FORMAT, "version": VERSION, "backbone": info, "params": asdict(cfg),
                "corpus": corpus_spec or {"documents": len(corpus)}, "n_documents": len(corpus),
                "candidate_layers": candidates}
    open_manifest(folder, manifest)
    export_query_weights(backbone, folder, manifest["candidate_layers"])
    _remove_stale_temporaries(folder)
    summary = DumpSummary(folder=str(folder), shard=(i_shard, n_shards))
    mine = [i for i in range(len(corpus)) if i % n_shards == i_shard]
    todo = [i for i in mine if not part_path(folder, i).is_file()]
    summary.skipped = len(mine) - len(todo)
    if max_docs is not None:
        todo = todo[:max_docs]
    pop = Population(cfg.chunk_size, cfg.page_size, cfg.sink_tokens, cfg.tail_tokens)
    start = time.perf_counter()
    bar = tqdm(todo, desc=f"dump {i_shard}/{n_shards}", unit="doc", disable=not progress, dynamic_ncols=True)
    for index in bar:
        t0 = time.perf_counter()
        tensors, meta = trace_document(backbone, corpus[index], cfg)
        meta["seconds"] = round(time.perf_counter() - t0, 2)
        tmp = part_path(folder, index).with_suffix(f".tmp{os.getpid()}")
        save_file(tensors, str(tmp), metadata={"doc": json.dumps({**meta, "index": index})})
        os.replace(tmp, part_path(folder, index))
        summary.documents += 1
        summary.tokens += meta["tokens"]
        summary.anchors += len(tensors["positions"])
        mask = pop.mask(tensors["positions"], tensors["votes"].shape[1])
        summary.positives += int(((tensors["votes"] >= cfg.min_layers) & mask).sum())
        summary.population += int(mask.sum())
        for ref, gen, ok in zip(meta.get("answers", []), meta["generated"], meta.get("answer_correct", [])):
            summary.answers.append({"doc": meta["doc_id"], "answer": ref, "generated": gen, "correct": ok})
        elapsed = time.perf_counter() - start
        bar.set_postfix(tok_s=f"{summary.tokens / elapsed:.0f}", disk=f"{folder_bytes(folder) / 2**20:.1f}MiB")
    summary.seconds = time.perf_counter() - start
    summary.disk_bytes = folder_bytes(folder)
    return summary


def dump_seconds(folder: str | os.PathLike) -> float:
    """Backbone time spent on all documents of a dump so far (summed over parts and resumes)."""
    from safetensors import safe_open

    total = 0.0
    for path in Path(folder).glob("part-*.safetensors"):
        try:
            with safe_open(str(path), framework="pt") as f:
                total += float(json.loads(f.metadata()["doc"]).get("seconds", 0.0))
        except Exception as exc:  # safetensors raises several types for damaged files
            raise DumpError(f"cannot read {path}: {exc}; delete it and resume the dump") from None
    return total


def parse_layers(spec: str | None) -> list[int] | None:
    """'all' or None -> None; '9-29' / '3,5,10-12' -> a sorted list of layer indices."""
    if spec is None or spec.strip().lower() in ("", "all"):
        return None
    out: set[int] = set()
    try:
        for part in spec.split(","):
            part = part.strip()
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                if hi < lo:
                    raise ValueError
                out.update(range(lo, hi + 1))
            else:
                out.add(int(part))
    except ValueError:
        raise DumpError(f"bad layer list {spec!r}: use 'all', '9-29' or '3,5,10-12'") from None
    if any(x < 0 for x in out):
        raise DumpError(f"bad layer list {spec!r}: layer indices are non-negative")
    return sorted(out)


def parse_shard(spec: str) -> tuple[int, int]:
    """'i/N' -> (i, N) with 0 <= i < N."""
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise DumpError(f"bad --shard {spec!r}: use i/N, e.g. 0/2") from None
    if not (n >= 1 and 0 <= i < n):
        raise DumpError(f"bad --shard {spec!r}: need 0 <= i < N")
    return i, n
