"""`flashmemory serve` end to end: a real uvicorn server with the default model, driven by the openai client.

One server process for the module (started with the CLI, stopped with Ctrl-C). Its device pool
holds POOL_PAGES pages; each lsa request reserves MAX_PAGES (everything resident at these prompt
lengths). A `full` request asking for HOLD_TOKENS new tokens reserves all but 3 pages, so while it
streams every other request waits for admission: that is how the queue and disconnect tests fill it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI

from flashmemory.models.loader import DEFAULT_MODEL, resolve_model_path
from flashmemory.serving.metrics import parse

PAGE_TOKENS = 32
POOL_PAGES = 160
MAX_PAGES = 16
MAX_QUEUE = 8
HOLD_PROMPT = list(range(1000, 1016))   # 16 token ids
HOLD_TOKENS = 4920                      # (16 + 4920) // 32 + 3 open pages = 157 pages reserved
HOLD_PAGES = 157

DOORS = ["red", "blue", "green", "yellow", "white", "black", "silver", "golden"]
CODES = [4817, 2093, 7352, 6148, 9261, 3570, 8406, 1739]
FILLER = "The hallway was quiet and the lamps gave a soft light over the old wooden floor. "


def needle_prompt(i: int, filler_sentences: int = 8) -> str:
    """~330 tokens (8 filler sentences each side) with one door's code, asking for it."""
    pad = FILLER * filler_sentences
    return (f"{pad}The secret code of the {DOORS[i]} door is {CODES[i]}. {pad}\n"
            f"Question: what is the secret code of the {DOORS[i]} door?\n"
            f"Answer: The secret code of the {DOORS[i]} door is")


def page_bytes() -> int:
    cfg = json.loads((resolve_model_path(None) / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head_dim * 4 * PAGE_TOKENS  # fp32 K and V


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, url: str, process: subprocess.Popen, log: Path):
        self.url = url
        self.process = process
        self.log = log

    def metrics(self) -> dict[str, float]:
        return parse(httpx.get(f"{self.url}/metrics", timeout=10).text)

    def wait_for(self, condition, what: str, timeout: float = 120.0) -> dict[str, float]:
        """Poll /metrics until `condition(samples)` holds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            samples = self.metrics()
            if condition(samples):
                return samples
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}; metrics: {self.metrics()}")


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Server:
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    cmd = [sys.executable, "-m", "flashmemory.cli.main", "serve", "--port", str(port), "--log-level", "warning",
           "--max-pages", str(MAX_PAGES), "--device-memory", str(POOL_PAGES * page_bytes()),
           "--max-queue", str(MAX_QUEUE)]
    with open(log, "w") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        if process.poll() is not None:
            raise AssertionError(f"the server exited with {process.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"the server did not start:\n{log.read_text()}")
        time.sleep(0.5)
    yield Server(url, process, log)
    process.send_signal(signal.SIGINT)  # Ctrl-C
    try:
        rc = process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        raise AssertionError(f"the server did not stop on SIGINT:\n{log.read_text()}")
    assert rc == 0, log.read_text()
    assert "Traceback" not in log.read_text(), log.read_text()


def new_client(server: Server) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=600)


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return new_client(server)


def complete_alone(server: Server, prompt, **options):
    """A completion on a client of its own (concurrent requests each use their own connection pool)."""
    with new_client(server) as own:
        return complete(own, prompt, **options)


def complete(client: OpenAI, prompt, **options):
    options.setdefault("temperature", 0)
    return client.completions.create(model=DEFAULT_MODEL, prompt=prompt, **options)


def test_models_health_and_metrics(server, client):
    assert [m.id for m in client.models.list().data] == [DEFAULT_MODEL]
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    samples = server.metrics()
    assert samples["flashmemory_device_kv_capacity_bytes"] == POOL_PAGES * page_bytes()
    for name in ("flashmemory_requests_running", "flashmemory_requests_waiting", "flashmemory_device_kv_used_bytes",
                 "flashmemory_host_kv_bytes", "flashmemory_generated_tokens_total",
                 'flashmemory_transfers_total{direction="recall"}', 'flashmemory_time_to_first_token_seconds_count',
                 'flashmemory_inter_token_latency_seconds_bucket{le="+Inf"}'):
        assert name in samples


def test_completion(client):
    r = complete(client, needle_prompt(0, filler_sentences=1), max_tokens=6)
    assert "4817" in r.choices[0].text
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 6 and r.usage.prompt_tokens > 20
    assert r.usage.total_tokens == r.usage.prompt_tokens + 6
    memory = r.model_extra["memory"]
    assert memory["policy"] == "lsa"
    assert 0 < memory["resident_fraction_mean"] <= 1.0
    assert memory["device_kv_bytes_peak"] > 0 and memory["device_kv_bytes_reserved"] == MAX_PAGES * page_bytes()
    assert memory["transfers"]["recalls"] > 0


def test_chat_completion(client):
    r = client.chat.completions.create(
        model=DEFAULT_MODEL, temperature=0, max_tokens=16,
        messages=[{"role": "system", "content": "You answer briefly."},
                  {"role": "user", "content": "The secret code of the red door is 4817. "
                                              "What is the secret code of the red door?"}])
    assert r.choices[0].message.role == "assistant"
    assert "4817" in r.choices[0].message.content
    assert r.usage.completion_tokens <= 16 and r.usage.prompt_tokens > 20
    assert r.model_extra["memory"]["policy"] == "lsa"


def test_streamed_completion(client):
    prompt = needle_prompt(1, filler_sentences=1)
    reference = complete(client, prompt, max_tokens=8)
    whole = reference.choices[0].text
    chunks = list(complete(client, prompt, max_tokens=8, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole and "2093" in text
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].model_extra["memory"]["device_kv_bytes_peak"] > 0
    assert chunks[-1].usage == reference.usage


def test_streamed_chat_completion(client):
    chunks = list(client.chat.completions.create(
        model=DEFAULT_MODEL, temperature=0, max_tokens=6, stream=True,
        messages=[{"role": "user", "content": "Say hello."}]))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks).strip()
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_eight_concurrent_needles(server, client):
    """Eight clients at once, decoded together: each gets its own door's code."""
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: complete_alone(server, needle_prompt(i), max_tokens=6), range(8)))
    for i, r in enumerate(answers):
        assert r.usage.prompt_tokens > 300
        assert str(CODES[i]) in r.choices[0].text, (i, [a.choices[0].text for a in answers])
    samples = server.metrics()
    assert samples["flashmemory_device_kv_reserved_bytes"] == 0 and samples["flashmemory_requests_running"] == 0


@pytest.mark.parametrize("body, message", [
    (b'{"model": "smollm2-135m", "prompt": ', "not valid JSON"),
    (b'{"model": "smollm2-135m"}', "prompt"),
    (b'{"prompt": "hi"}', "model"),
    (b'{"model": "smollm2-135m", "prompt": "hi", "temperature": "hot"}', "temperature"),
    (b'{"model": "smollm2-135m", "prompt": "hi", "max_tokens": 0}', "max_tokens"),
    (b'{"model": "smollm2-135m", "prompt": "   "}', "the prompt is empty"),
    (b'{"model": "smollm2-135m", "prompt": "hi", "n": 2}', "n=2 is not supported"),
    (b'{"model": "smollm2-135m", "prompt": ["a", "b"]}', "one prompt per request"),
    (b'{"model": "smollm2-135m", "prompt": [99999999]}', "token ids must be integers"),
])
def test_bad_completion_bodies(server, body, message):
    r = httpx.post(f"{server.url}/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]["message"]


def test_bad_chat_bodies(server):
    r = httpx.post(f"{server.url}/v1/chat/completions", json={"model": DEFAULT_MODEL, "messages": []})
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]
    r = httpx.post(f"{server.url}/v1/chat/completions",
                   json={"model": DEFAULT_MODEL, "messages": [{"role": "robot", "content": "hi"}]})
    assert r.status_code == 400 and "role" in r.json()["error"]["message"]


def test_unknown_model_policy_and_long_prompt(client):
    with pytest.raises(openai.BadRequestError, match="unknown model 'gpt-4'"):
        client.completions.create(model="gpt-4", prompt="hi")
    with pytest.raises(openai.BadRequestError, match="unknown policy 'nope'"):
        complete(client, "hi", extra_body={"policy": "nope"})
    with pytest.raises(openai.BadRequestError, match="exceeds the model's context of 8192 tokens"):
        complete(client, "word " * 9000)


class HeldPool:
    """A streaming `full` request that reserves HOLD_PAGES pages, on its own connection so that
    `disconnect()` really closes the socket mid-stream."""

    def __init__(self, server: Server):
        self.client = new_client(server)
        self.stream = complete(self.client, HOLD_PROMPT, max_tokens=HOLD_TOKENS, stream=True,
                               extra_body={"policy": "full", "ignore_eos": True})
        self.chunks = iter(self.stream)
        next(self.chunks)

    def disconnect(self) -> None:
        self.stream.close()
        self.client.close()


def test_disconnect_frees_pages(server, client):
    before = server.metrics()
    held = HeldPool(server)
    for _ in range(3):
        next(held.chunks)
    holding = server.metrics()
    assert holding["flashmemory_device_kv_reserved_bytes"] == HOLD_PAGES * page_bytes()
    assert holding["flashmemory_device_kv_used_bytes"] > 0 and holding["flashmemory_host_kv_bytes"] > 0
    held.disconnect()  # the client goes away mid-stream
    after = server.wait_for(lambda s: s["flashmemory_device_kv_reserved_bytes"] == 0, "the pages to return")
    assert after["flashmemory_device_kv_used_bytes"] == 0 and after["flashmemory_host_kv_bytes"] == 0
    assert after["flashmemory_requests_running"] == 0
    cancelled = 'flashmemory_requests_finished_total{reason="cancelled"}'
    assert after[cancelled] == before.get(cancelled, 0) + 1


def test_full_queue_answers_429_then_drains(server, client):
    held = HeldPool(server)
    short = [needle_prompt(i, filler_sentences=1) for i in range(MAX_QUEUE)]
    with ThreadPoolExecutor(MAX_QUEUE) as pool:
        try:
            waiting = [pool.submit(complete_alone, server, short[i], max_tokens=6) for i in range(MAX_QUEUE)]
            server.wait_for(lambda s: s["flashmemory_requests_waiting"] == MAX_QUEUE, "the queue to fill", timeout=60)
            with pytest.raises(openai.APIStatusError) as info:
                complete(client, "one too many", max_tokens=4)
        finally:
            held.disconnect()
        answers = [f.result(timeout=300) for f in waiting]
    assert info.value.status_code == 429
    assert "8 requests are already waiting" in info.value.message, info.value.message
    for i, r in enumerate(answers):
        assert str(CODES[i]) in r.choices[0].text
    samples = server.wait_for(lambda s: s["flashmemory_requests_running"] == 0, "the queue to drain")
    assert samples["flashmemory_requests_waiting"] == 0
    assert samples["flashmemory_device_kv_reserved_bytes"] == 0
    assert samples['flashmemory_requests_rejected_total{status="429"}'] == 1


def test_still_answers_after_failures(server, client):
    r = complete(client, needle_prompt(0, filler_sentences=1), max_tokens=6)
    assert "4817" in r.choices[0].text
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
