"""HTTP load generator for `flashmemory serve`: full vs lsa at one device-memory budget.

Starts a server on 127.0.0.1 (or uses --url, loopback only) and, for each number of concurrent
clients and each policy, runs a closed loop: every client sends --requests-per-client streamed
completions of a ~--prompt-tokens prompt (distinct per request) asking for exactly --max-tokens
tokens (ignore_eos). It measures requests completed per minute, aggregate decode tokens/s, time
to first token and inter-token latency (gaps between streamed chunks; one chunk is one token
here), and samples /metrics for the most requests running at once. Bounded: every request has a
timeout, every level a deadline.

    python benchmarks/serve.py              # 2048-token prompts, 256 new tokens, 4/8/16 clients: about an hour on 2 cores
    python benchmarks/serve.py --prompt-tokens 800 --budget 0.35 --max-tokens 8 --concurrency 4   # a quick check

A budget is floored at sink + tail + one cycle (256 tokens by default), so on short prompts lsa
keeps a larger share than --budget says.

Writes benchmarks/results/serve.json and serve.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx

from flashmemory.config import LSAConfig
from flashmemory.models.loader import DEFAULT_MODEL, resolve_model_path
from flashmemory.serving.metrics import parse

RESULTS = Path(__file__).parent / "results"
WORDS = ("river stone garden letter window morning silver market engine forest paper winter harbor lantern "
         "question story island village teacher doctor mountain candle ticket bridge orchard meadow").split()
TOKENS_PER_WORD = 1.0  # about right for these words with SmolLM2's tokenizer; the table reports the measured count


@dataclass
class RequestRecord:
    ok: bool
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft: float = 0.0
    gaps: list[float] = field(default_factory=list)
    error: str = ""


@dataclass
class LevelResult:
    policy: str
    clients: int
    requests: int
    completed: int
    failed: int
    seconds: float
    requests_per_minute: float
    decode_tokens_per_second: float
    prompt_tokens_mean: float
    ttft_median: float
    ttft_p99: float
    itl_median: float
    itl_p90: float
    itl_p99: float
    itl_max: float
    max_running: int
    errors: list[str]


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank); 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def make_prompt(rng: random.Random, tokens: int) -> str:
    words = [rng.choice(WORDS) for _ in range(int(tokens / TOKENS_PER_WORD))]
    return "Read the notes and summarise them.\n" + " ".join(words) + "\nSummary:"


async def one_request(client: httpx.AsyncClient, url: str, prompt: str, policy: str, max_tokens: int,
                      timeout: float) -> RequestRecord:
    body = {"model": DEFAULT_MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True, "policy": policy}
    t0 = time.perf_counter()
    record = RequestRecord(ok=False)

    async def read() -> None:
        last = None
        async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            if response.status_code != 200:
                record.error = f"HTTP {response.status_code}: {(await response.aread()).decode()[:200]}"
                return
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    record.error = chunk["error"]["message"]
                    return
                if chunk.get("usage"):
                    record.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    record.completion_tokens = chunk["usage"]["completion_tokens"]
                if chunk["choices"] and chunk["choices"][0]["text"]:
                    now = time.perf_counter()
                    if last is None:
                        record.ttft = now - t0
                    else:
                        record.gaps.append(now - last)
                    last = now

    try:
        await asyncio.wait_for(read(), timeout)
    except (asyncio.TimeoutError, httpx.HTTPError) as exc:
        record.error = f"{type(exc).__name__}: {exc}"
    if record.error:
        return record
    record.ok = record.completion_tokens > 0
    return record


async def watch_running(client: httpx.AsyncClient, url: str, stop: asyncio.Event) -> int:
    """The most requests running at once, sampled from /metrics until `stop`."""
    most = 0
    while not stop.is_set():
        try:
            samples = parse((await client.get(f"{url}/metrics")).text)
            most = max(most, int(samples["flashmemory_requests_running"]))
        except httpx.HTTPError:
            pass
        try:
            await asyncio.wait_for(stop.wait(), 0.5)
        except asyncio.TimeoutError:
            pass
    return most


async def run_level(url: str, policy: str, clients: int, args: argparse.Namespace, seed: int) -> LevelResult:
    rng = random.Random(seed)
    prompts = [[make_prompt(rng, args.prompt_tokens) for _ in range(args.requests_per_client)] for _ in range(clients)]
    limits = httpx.Limits(max_connections=clients + 2)
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.request_timeout), limits=limits) as client:
        async def client_loop(mine: list[str]) -> list[RequestRecord]:
            return [await one_request(client, url, p, policy, args.max_tokens, args.request_timeout) for p in mine]

        stop = asyncio.Event()
        watcher = asyncio.create_task(watch_running(client, url, stop))
        t0 = time.perf_counter()
        per_client = await asyncio.gather(*(client_loop(mine) for mine in prompts))
        seconds = time.perf_counter() - t0
        stop.set()
        max_running = await watcher
    records = [r for rs in per_client for r in rs]
    done = [r for r in records if r.ok]
    gaps = [g for r in done for g in r.gaps]
    ttfts = [r.ttft for r in done]
    return LevelResult(
        policy=policy, clients=clients, requests=len(records), completed=len(done), failed=len(records) - len(done),
        seconds=seconds, requests_per_minute=60.0 * len(done) / seconds,
        decode_tokens_per_second=sum(r.completion_tokens for r in done) / seconds,
        prompt_tokens_mean=statistics.mean(r.prompt_tokens for r in done) if done else 0.0,
        ttft_median=statistics.median(ttfts) if ttfts else 0.0, ttft_p99=percentile(ttfts, 99),
        itl_median=statistics.median(gaps) if gaps else 0.0, itl_p90=percentile(gaps, 90),
        itl_p99=percentile(gaps, 99), itl_max=max(gaps, default=0.0),
        max_running=max_running, errors=sorted({r.error for r in records if not r.ok})[:5])


def kv_bytes_per_token() -> int:
    """fp32 K and V bytes of one token of the default model (what the server's pool pages hold)."""
    cfg = json.loads((resolve_model_path(None) / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head_dim * 4


def default_device_memory(args: argparse.Namespace) -> int:
    """Room for --full-requests `full` requests at the prompt length (each reserves its whole cache)."""
    page = LSAConfig().page_size
    tokens = int(args.prompt_tokens * 1.1) + args.max_tokens  # the prompt length is approximate
    pages = tokens // page + LSAConfig().open_pages
    return args.full_requests * pages * page * kv_bytes_per_token()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: argparse.Namespace, log: Path) -> tuple[str, subprocess.Popen]:
    port = free_port()
    cmd = [sys.executable, "-m", "flashmemory.cli.main", "serve", "--port", str(port), "--log-level", "warning",
           "--device-memory", str(args.device_memory), "--max-queue", str(max(args.concurrency) * 2),
           "--max-batch", str(max(args.concurrency)), "--device", args.device,
           "--prefill-chunk", str(args.prefill_chunk)]
    if args.budget is not None:
        cmd += ["--budget", str(args.budget)]
    with open(log, "w") as out:
        env = os.environ.copy()
        if args.threads is not None:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"serve: the server exited with {process.returncode}; see {log}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return url, process
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    process.kill()
    raise SystemExit(f"serve: the server did not start within 300 s; see {log}")


def markdown(rows: list[LevelResult], args: argparse.Namespace, note: str) -> str:
    lines = [
        "# Serving benchmark: full vs lsa at one device-memory budget", "",
        f"`{' '.join(sys.argv)}`", "",
        f"device memory {args.device_memory / 2**20:.1f} MiB, prompt ~{args.prompt_tokens} tokens, "
        f"{args.max_tokens} new tokens per request (ignore_eos), {args.requests_per_client} request(s) per client, "
        f"prefill pieces of {args.prefill_chunk} tokens, device {args.device}"
        f"{'' if args.threads is None else f', {args.threads} server thread(s)'}. {note}", "",
        "| clients | policy | done/sent | max running | req/min | decode tok/s | TTFT p50 (s) | TTFT p99 (s) "
        "| ITL p50 (ms) | ITL p90 (ms) | ITL p99 (ms) | ITL max (ms) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.clients} | {r.policy} | {r.completed}/{r.requests} | {r.max_running} "
                     f"| {r.requests_per_minute:.2f} | {r.decode_tokens_per_second:.2f} | {r.ttft_median:.1f} "
                     f"| {r.ttft_p99:.1f} | {1000 * r.itl_median:.0f} | {1000 * r.itl_p90:.0f} "
                     f"| {1000 * r.itl_p99:.0f} | {1000 * r.itl_max:.0f} |")
    errors = sorted({e for r in rows for e in r.errors})
    if errors:
        lines += ["", "Errors:", *[f"- {e}" for e in errors]]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=None, help="a running server (loopback only); default: start one")
    parser.add_argument("--policies", nargs="+", default=["full", "lsa"], help="policies to compare")
    parser.add_argument("--concurrency", nargs="+", type=int, default=[4, 8, 16], help="concurrent clients per level")
    parser.add_argument("--prompt-tokens", type=int, default=2048, help="approximate prompt length")
    parser.add_argument("--max-tokens", type=int, default=256, help="tokens generated per request")
    parser.add_argument("--prefill-chunk", type=int, default=256,
                        help="the server's prompt tokens per prefill piece (a piece stalls the running decodes)")
    parser.add_argument("--threads", type=int, default=None,
                        help="the server's compute threads (OMP_NUM_THREADS; default: torch's choice)")
    parser.add_argument("--requests-per-client", type=int, default=1, help="requests each client sends in turn")
    parser.add_argument("--device-memory", type=int, default=None,
                        help="bytes of device KV for the server (default: room for --full-requests full requests)")
    parser.add_argument("--full-requests", type=int, default=2,
                        help="with no --device-memory: how many full requests the pool holds at once")
    parser.add_argument("--budget", type=float, default=None, help="the server's lsa budget (default: LSAConfig's)")
    parser.add_argument("--device", default="cpu", help="the server's compute device")
    parser.add_argument("--request-timeout", type=float, default=900.0, help="seconds before a request is abandoned")
    parser.add_argument("--out", type=Path, default=RESULTS / "serve", help="results path without extension")
    args = parser.parse_args()
    for name in ("prompt_tokens", "max_tokens", "prefill_chunk", "requests_per_client", "full_requests"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be a positive integer")
    if any(c < 1 for c in args.concurrency):
        parser.error("--concurrency values must be positive integers")
    if args.url is not None and urlparse(args.url).hostname not in ("127.0.0.1", "localhost", "::1"):
        parser.error(f"--url must be a loopback address (this is a load generator), got {args.url}")
    if args.url is not None and args.device_memory is None:
        parser.error("with --url, give the server's --device-memory too (it is reported in the table)")
    if args.device_memory is None:
        args.device_memory = default_device_memory(args)

    process = None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    url = args.url
    if url is None:
        url, process = start_server(args, args.out.with_suffix(".log"))
    rows: list[LevelResult] = []
    try:
        for clients in args.concurrency:
            for policy in args.policies:
                row = asyncio.run(run_level(url, policy, clients, args, seed=clients))
                rows.append(row)
                print(f"{clients:3d} clients {policy:6s}: {row.completed}/{row.requests} done in {row.seconds:.0f} s, "
                      f"{row.requests_per_minute:.2f} req/min, {row.decode_tokens_per_second:.2f} tok/s, "
                      f"max running {row.max_running}, TTFT p50 {row.ttft_median:.1f} s, "
                      f"ITL p99 {1000 * row.itl_p99:.0f} ms", flush=True)
    finally:
        if process is not None:
            process.send_signal(signal.SIGINT)
            process.wait(timeout=120)
    note = "Server started by the benchmark." if args.url is None else f"Server at {args.url}."
    args.out.with_suffix(".json").write_text(json.dumps(
        {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
         "levels": [asdict(r) for r in rows]}, indent=2))
    args.out.with_suffix(".md").write_text(markdown(rows, args, note))
    print(markdown(rows, args, note))
    return 0


if __name__ == "__main__":
    sys.exit(main())
