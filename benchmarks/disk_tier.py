"""The disk tier at scale: a 512K-token history of the default model's shape decodes under a 4 GiB host cap.

Side by side in one run, with a random-weight backbone of SmolLM2-135M's shape (fp32, 45 KiB of KV
per token) and `quest` at a fixed page cap (KMAX, as benchmarks/decode.py):
  1. all in RAM: a 128K-token synthetic history in the host mirror (5.6 GiB), ms/token;
  2. disk tier: a 512K-token synthetic history (22.5 GiB, more than this machine can mirror) written,
     streamed, to a spill file, decoded under EngineConfig(host_memory=4 GiB): ms/token, resident
     fraction, host / disk / device bytes, disk reads, prefetch hits and misses.
Both sequences stay alive and their timed windows alternate, one cycle (tau steps) each, so both
see the same load on a shared machine; they span the same cycle boundaries (the first boundary,
which builds quest's index from the whole history, is in the warm-up).
Before the decode, the I/O method is measured on the big file: random whole-page reads, cold
(the kernel's cache of the file dropped), with explicit `preadv` into a tensor and through a
memory map. The file is deleted at the end.

    python benchmarks/disk_tier.py                           # 128K vs 512K, ~15 min on 2 cores
    python benchmarks/disk_tier.py --ram-context 4096 --disk-context 16384 --host-memory 100000000 --steps 64
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from synthetic import build, synthetic_history, synthetic_prefill  # noqa: E402

from flashmemory import EngineConfig, LSAConfig, LSAEngine, Prefill  # noqa: E402
from flashmemory.memory.spill import SpilledMirror  # noqa: E402

SHAPE = "smollm2-135m"
GiB = 2 ** 30


def start(engine: LSAEngine, prefill: Prefill, warmup: int, steps: int) -> tuple[object, float]:
    """Submit a quest decode of `prefill` and run its `warmup` steps (the first boundary: quest's index from
    the whole history); return the sequence and the warm-up seconds."""
    seq = engine.submit_prefilled(prefill, "quest", max_new_tokens=warmup + steps + 2, stop_at_eos=False)
    t0 = time.perf_counter()
    for _ in range(warmup):
        engine.step()
    return seq, time.perf_counter() - t0


def measure(engine: LSAEngine, seq, seconds: float, steps: int, warmup: int, warmup_seconds: float) -> dict:
    """ms/token of the timed steps, and the memory and disk traffic of `seq` (still running)."""
    usage = engine.memory()
    log = seq.transfers
    row = {
        "context": len(seq.prompt_ids), "steps": steps, "ms_per_token": 1000 * seconds / steps,
        "warmup_seconds": warmup_seconds, "cycles_timed": sum(1 for c in seq.cycles if c.step >= warmup),
        "resident_fraction": seq.attended / seq.length,
        "host_bytes": usage.host_bytes, "host_kv_bytes_peak": seq.memory.host_kv_bytes_peak,
        "disk_bytes": usage.disk_bytes, "device_bytes": usage.device_used_bytes,
        "device_capacity_bytes": usage.device_capacity_bytes, "full_kv_bytes": seq.full_kv_bytes,
        "index_bytes": int(seq.index.nbytes), "disk_reads": log.disk_reads, "disk_read_bytes": log.disk_read_bytes,
        "disk_writes": log.disk_writes, "prefetch_hits": log.prefetch_hits, "prefetch_misses": log.prefetch_misses,
        "prefetch_reads": sum(kind == "prefetch" for _, kind, _ in log.disk_events),
        "misses_after_first_cycle": sum(kind == "miss" and step > 0 for step, kind, _ in log.disk_events),
    }
    engine.cancel(seq)
    return row


def write_history(path: Path, engine: LSAEngine, context: int, block_pages: int = 64) -> dict:
    """Stream a synthetic history of `context` tokens into a spill file of page records (never held whole)."""
    s, P = engine.shape, engine.config.page_size
    record = P * s.bytes_per_token
    stride = -(-record // 4096) * 4096
    pages = -(-context // P)
    gen = torch.Generator().manual_seed(0)
    block = torch.empty((block_pages, 2, s.layers, s.kv_heads, P, s.head_dim), dtype=s.dtype)
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        for lo in range(0, pages, block_pages):
            n = min(block_pages, pages - lo)
            block[:n].normal_(generator=gen)
            raw = block[:n].view(n, -1).view(torch.uint8).numpy()
            if stride == record:
                os.pwrite(f.fileno(), raw, lo * stride)
            else:
                for i in range(n):
                    os.pwrite(f.fileno(), raw[i], (lo + i) * stride)
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - t0
    return {"file_bytes": pages * stride, "pages": pages, "write_seconds": seconds,
            "write_gib_per_s": pages * stride / GiB / seconds}


def io_methods(path: Path, record: int, stride: int, pages: int, n: int = 300) -> dict:
    """Cold random whole-page reads: explicit preadv into a tensor vs a copy out of a memory map."""
    rng = random.Random(0)
    picks = [rng.randrange(pages) for _ in range(n)]
    out = torch.empty(record, dtype=torch.uint8)
    buf = out.numpy()
    result = {}
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        t0 = time.perf_counter()
        for p in picks:
            os.preadv(fd, [buf], p * stride)
        result["pread_ms_per_page"] = 1000 * (time.perf_counter() - t0) / n
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as mm:
            view = np.frombuffer(mm, dtype=np.uint8)
            t0 = time.perf_counter()
            for p in picks:
                np.copyto(buf, view[p * stride: p * stride + record])
            result["mmap_ms_per_page"] = 1000 * (time.perf_counter() - t0) / n
            del view
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    result["page_bytes"] = record
    result["pages_read"] = n
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ram-context", type=int, default=131072, help="tokens of the all-in-RAM history")
    p.add_argument("--disk-context", type=int, default=524288, help="tokens of the disk-tier history")
    p.add_argument("--host-memory", type=int, default=4 * GiB, help="host cap of the disk-tier sequence (bytes)")
    p.add_argument("--max-pages", type=int, default=64, help="KMAX, the fixed LSA budget (pages of 32 tokens)")
    p.add_argument("--steps", type=int, default=128, help="timed decode steps (128 = two cycles)")
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--spill-dir", default=tempfile.gettempdir())
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "disk_tier")
    args = p.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    total = args.disk_context + args.warmup + args.steps + 64
    model = build(SHAPE, total, "cpu")
    config = LSAConfig(budget=None, max_pages=args.max_pages)
    env = {"machine": platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__,
           "load_average": os.getloadavg(), "date": time.strftime("%Y-%m-%d")}
    print(env, flush=True)

    # both sequences stay alive and their timed windows alternate (one cycle each), so both see the same
    # load on this shared machine; two engines on one model, each with its own tiers
    room = args.warmup + args.steps + 64
    ram_engine = LSAEngine(model, config)
    history = synthetic_history(ram_engine, args.ram_context, room)
    ram_seq, ram_warm = start(ram_engine, synthetic_prefill(ram_engine, history, args.ram_context, room - 62),
                              args.warmup, args.steps)
    engine = LSAEngine(model, config, engine_config=EngineConfig(host_memory=args.host_memory,
                                                                 spill_dir=args.spill_dir))
    path = Path(args.spill_dir) / f"fm-disk-tier-bench-{os.getpid()}.kv"
    mirror = None
    try:
        written = write_history(path, engine, args.disk_context)
        print("written", written, flush=True)
        record = config.page_size * engine.shape.bytes_per_token
        io = io_methods(path, record, written["file_bytes"] // written["pages"], written["pages"])
        print("io", io, flush=True)
        mirror = SpilledMirror.over_file(engine.shape, path, args.disk_context, args.disk_context + room,
                                         config.page_size, args.host_memory)
        seed = engine.prefill([1], max_new_tokens=1)
        prefill = Prefill(mirror, [1] * args.disk_context, seed.logits, seed.activations, 0.0, room - 62, 0)
        disk_seq, disk_warm = start(engine, prefill, args.warmup, args.steps)
        seconds = {"ram": 0.0, "disk": 0.0}
        window = config.tau
        for lo in range(0, args.steps, window):
            for name, eng in (("ram", ram_engine), ("disk", engine)):
                t0 = time.perf_counter()
                for _ in range(min(window, args.steps - lo)):
                    eng.step()
                seconds[name] += time.perf_counter() - t0
        ram = measure(ram_engine, ram_seq, seconds["ram"], args.steps, args.warmup, ram_warm)
        disk = measure(engine, disk_seq, seconds["disk"], args.steps, args.warmup, disk_warm)
        disk["host_memory"] = args.host_memory
        disk["host_slots_bytes"] = mirror.allocated_bytes
        print("ram", ram, "\ndisk", disk, flush=True)
    finally:
        if mirror is not None:
            mirror.close()
        elif path.exists():
            path.unlink()
        engine.close()
        ram_engine.close()
    ratio = disk["ms_per_token"] / ram["ms_per_token"]
    report = {"env": env, "shape": SHAPE, "max_pages": args.max_pages, "ram": ram, "disk": disk, "written": written,
              "io": io, "ratio": ratio, "target": 1.5, "file_removed": not path.exists()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    args.out.with_suffix(".md").write_text(markdown(report, " ".join(sys.argv[1:])))
    print(markdown(report, " ".join(sys.argv[1:])))


def markdown(r: dict, argv: str) -> str:
    ram, disk, io, w = r["ram"], r["disk"], r["io"], r["written"]
    gib = lambda b: f"{b / GiB:.2f} GiB"  # noqa: E731
    mib = lambda b: f"{b / 2**20:.1f} MiB"  # noqa: E731
    e = r["env"]
    lines = [
        f"# Disk tier: {disk['context']:,} tokens under a {gib(disk['host_memory'])} host cap, beside "
        f"{ram['context']:,} all in RAM",
        "",
        f"`python benchmarks/disk_tier.py {argv}`".replace(" `", "`"),
        "",
        f"{e['machine']}, {e['threads']} torch threads, torch {e['torch']}, load average at start "
        f"{e['load_average'][0]:.1f}, {e['date']}; random weights of {r['shape']}'s shape (fp32), synthetic K/V, "
        f"`quest` at KMAX {r['max_pages']} pages; {ram['steps']} timed decode steps after the warm-up.",
        "",
        "| | all in RAM | disk tier |",
        "|---|---|---|",
        f"| context | {ram['context']:,} tokens | {disk['context']:,} tokens |",
        f"| full KV | {gib(ram['full_kv_bytes'])} | {gib(disk['full_kv_bytes'])} |",
        f"| **ms/token** | **{ram['ms_per_token']:.1f}** | **{disk['ms_per_token']:.1f}** |",
        f"| resident fraction | {100 * ram['resident_fraction']:.3f}% | {100 * disk['resident_fraction']:.3f}% |",
        f"| host KV bytes (mirror storage) | {gib(ram['host_bytes'])} | {gib(disk['host_bytes'])} "
        f"(cap {gib(disk['host_memory'])}) |",
        f"| disk bytes (spill file) | 0 | {gib(disk['disk_bytes'])} |",
        f"| device KV bytes (pages held) | {mib(ram['device_bytes'])} | {mib(disk['device_bytes'])} |",
        f"| quest's index (host) | {mib(ram['index_bytes'])} | {mib(disk['index_bytes'])} |",
        f"| disk reads (count, bytes) | 0 | {disk['disk_reads']:,}, {gib(disk['disk_read_bytes'])} |",
        f"| prefetch reads / hits / misses | - | {disk['prefetch_reads']} / {disk['prefetch_hits']} / "
        f"{disk['prefetch_misses']} ({disk['misses_after_first_cycle']} after the first cycle) |",
        f"| warm-up (first boundary: index from the whole history) | {ram['warmup_seconds']:.1f} s | "
        f"{disk['warmup_seconds']:.1f} s |",
        "",
        f"**Disk-tier ms/token / all-in-RAM ms/token: {r['ratio']:.2f}** (the target, for 512K on disk "
        f"beside 128K in RAM: <= {r['target']}).",
        "",
        f"Synthetic history written, streamed in blocks of 64 pages: {gib(w['file_bytes'])} in "
        f"{w['write_seconds']:.0f} s ({w['write_gib_per_s']:.2f} GiB/s, random generation included); "
        f"removed at the end: {r['file_removed']}.",
        "",
        f"I/O method, {io['pages_read']} cold random page reads of {mib(io['page_bytes'])} from that file: "
        f"explicit `preadv` {io['pread_ms_per_page']:.2f} ms/page, memory map {io['mmap_ms_per_page']:.2f} ms/page.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
