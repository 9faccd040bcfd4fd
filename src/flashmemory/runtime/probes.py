"""Probe forwards: extra passes over a sequence's history that some policies score with.

Neither changes the sequence. `lookahead` serves the `oracle` policy (it decodes tau tokens
ahead over the whole history and records where they attend); `reconstruction` serves `kvzip`
(the model is asked to repeat its history, and each history token's attention from the
repetition is recorded). The engine hands both to its cycle scheduler.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from ..memory.pools import HostMirror
from ..policies import make_policy
from ..policies.kvzip import REPEAT_PROMPT
from .attention_mass import causal_attention, chunk_mass, token_attention
from .capture import ActivationRecorder, Activations
from .sampling import SamplingParams
from .sequence import Sequence

if TYPE_CHECKING:
    from .engine import LSAEngine


def lookahead(engine: "LSAEngine", seq: Sequence) -> torch.Tensor:
    """Decode tau tokens ahead of `seq` over its whole history, record per-layer chunk attention, roll back.

    Returns [steps, layers, chunks] attention mass of each future token. The tokens written
    past the history are overwritten by the real decode (the host mirror's length is unchanged).
    """
    cfg, base = seq.config, seq.length
    masses = []
    token = seq.pending
    saved_window = engine._window_of(seq) if engine.window_pool is not None else None
    for i in range(min(cfg.tau, seq.max_length - base)):
        token = int(engine._dense(seq, [token], base + i).argmax())
        per_layer = []
        for row, q in enumerate(engine.recorder.row(0).queries(list(engine.layout.tiered))):
            k = seq.host.keys[row, :, : base + i + 1].to(q.device)
            per_layer.append(chunk_mass(token_attention(q, k), cfg.chunk_size)[0])
        masses.append(torch.stack(per_layer).cpu())
    if saved_window is not None:  # decoding ahead wrote into the rings: put them back
        engine._load_window(seq, saved_window)
    n = base // cfg.chunk_size
    return torch.stack([m[:, :n] for m in masses])


@torch.no_grad()
def reconstruction(engine: "LSAEngine", seq: Sequence) -> torch.Tensor:
    """Ask the model to repeat `seq`'s history (`kvzip.REPEAT_PROMPT`, then the history's tokens,
    teacher-forced over a copy of its KV) and return, per tiered layer, KV head and history token,
    the most attention any reconstruction query gives it: [layers, kv_heads, length]. Its time is
    added to `seq.scoring_seconds`; `seq` itself is untouched."""
    t0 = time.perf_counter()
    n = seq.length
    history = seq.prompt_ids[:n]
    repeat = (engine.tokenizer(REPEAT_PROMPT, add_special_tokens=False)["input_ids"] if engine.tokenizer is not None
              else []) + history
    probe = Sequence(0, history + repeat, make_policy("full"), seq.config, SamplingParams(max_new_tokens=1),
                     n + len(repeat))
    probe.host = HostMirror(engine.shape, n + len(repeat), pin=engine.device.type == "cuda")
    engine._copy_history(seq.host, probe.host, n)
    window = engine._window_of(seq) if seq.window_slot is not None else None
    best = torch.zeros(len(engine.layout.tiered), engine.shape.kv_heads, n)
    recorder = ActivationRecorder(engine.model, keep_all=True)
    engine._take_window(probe)
    try:
        if window is not None:
            engine._load_window(probe, window)
        step = seq.config.prefill_chunk
        for lo in range(n, len(probe.prompt_ids), step):
            piece = probe.prompt_ids[lo: lo + step]
            engine._dense(probe, piece, lo)
            probe.host.length = lo + len(piece)
            queries = Activations(recorder.modules, recorder.inputs, recorder.cos, recorder.sin)
            for row, q in enumerate(queries.queries(list(engine.layout.tiered))):
                k = probe.host.k[row, :, : lo + len(piece)].to(q.device)
                for b in range(0, len(piece), 256):  # bounded memory: 256 queries at a time
                    probs = causal_attention(q[b: b + 256], k, lo + b)[..., :n]
                    best[row] = torch.maximum(best[row], probs.amax(dim=(1, 2)).cpu())
    finally:
        recorder.close()
        engine._drop_window(probe)
    seq.scoring_seconds += time.perf_counter() - t0
    return best
