"""The engine thread: the only thread that touches the engine.

HTTP handlers (on the asyncio loop) hand a `Job` over through an inbox; the engine thread submits
it, steps the engine, and posts each token's text and the final result back to the job's asyncio
queue. Cancelling is a message too, so the engine is never called from two threads.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

from ..policies import SelectionPolicy, make_policy
from ..runtime.engine import LSAEngine, PromptError
from ..runtime.report import GenerationResult
from ..runtime.sequence import Sequence, Status, TokenEvent
from .metrics import Metrics

log = logging.getLogger("flashmemory.serve")


class QueueFullError(Exception):
    """The admission queue holds `max_queue` requests already (answered 429)."""


class ShuttingDownError(Exception):
    """The engine thread has stopped (answered 503)."""


@dataclass
class Event:
    """What a job's handler receives: new text, and on the last event how the request ended."""

    text: str
    finish_reason: str | None = None          # stop, length, cancelled or error on the last event
    result: GenerationResult | None = None    # on the last event of a request that stopped or hit its length
    error: BaseException | None = None        # on the last event of a request that failed


class Job:
    """One request handed from an HTTP handler to the engine thread.

    `prompt` is text, token ids, or chat messages (a list of {"role", "content"} dicts, turned
    into ids with the tokenizer's chat template). Create it on the event loop that will read
    `events` and await `submitted`.
    """

    def __init__(self, prompt: str | list[int] | list[dict[str, str]], policy: str, options: dict[str, Any]):
        self.prompt = prompt
        self.policy = policy
        self.options = options
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.submitted: asyncio.Future[Sequence] = self.loop.create_future()
        self.arrival = time.perf_counter()
        self.sequence: Sequence | None = None     # set by the engine thread
        self.finished = False                     # set on the event loop when the last event is read
        self.last_token_at: float | None = None

    def post(self, fn, *args) -> None:
        """Run `fn(*args)` on the job's event loop (from the engine thread)."""
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop has closed: nobody is listening any more
            pass

    def resolve(self, value: Sequence | BaseException) -> None:
        """Settle `submitted` from the engine thread (unless the handler stopped waiting)."""
        def settle() -> None:
            if self.submitted.done():
                return
            if isinstance(value, BaseException):
                self.submitted.set_exception(value)
            else:
                self.submitted.set_result(value)
        self.post(settle)


def chat_prompt_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a conversation in the model's chat template, ending with the assistant's turn."""
    if not getattr(tokenizer, "chat_template", None):
        raise PromptError("this model has no chat template; use /v1/completions")
    if not any(m["content"].strip() for m in messages):
        raise PromptError("the messages are empty")
    try:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    except Exception as exc:  # jinja raises its own types for a conversation the template refuses
        raise PromptError(f"the model's chat template refused these messages: {exc}") from None
    if hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)


class EngineWorker:
    """Owns an `LSAEngine` and steps it in one thread; bounded admission queue; metrics.

    `max_queue` bounds the requests waiting for admission (handed over but not yet admitted to
    the engine); one more is refused with `QueueFullError`. `policy_options` gives constructor
    options per policy name (the lsa indexer checkpoint); each policy is made once and shared,
    as policies keep no per-sequence state.
    """

    def __init__(self, engine: LSAEngine, default_policy: str, max_queue: int, metrics: Metrics,
                 policy_options: dict[str, dict[str, Any]] | None = None):
        if max_queue < 1:
            raise ValueError(f"max_queue must be a positive integer, got {max_queue!r}")
        self.engine = engine
        self.default_policy = default_policy
        self.max_queue = max_queue
        self.metrics = metrics
        self.policy_options = policy_options or {}
        self._policies: dict[str, SelectionPolicy] = {}
        self._inbox: queue.Queue[tuple[str, Job | None]] = queue.Queue()
        self._lock = threading.Lock()
        self._handed_over = 0        # submits in the inbox, not yet seen by the engine thread
        self._submitted: list[Sequence] = []  # submitted to the engine and maybe still waiting (pruned by _publish)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="flashmemory-engine", daemon=True)

    # ------------------------------------------------------------------ any thread
    def start(self) -> None:
        self._publish()  # /metrics shows the pool before the first request
        self._thread.start()

    def stop(self, timeout: float = 60.0) -> None:
        """Cancel every request and end the engine thread (after the step in progress)."""
        self._stopping.set()
        self._inbox.put(("stop", None))
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping.is_set()

    def _queued(self) -> int:
        """Requests waiting for admission now (call with the lock held)."""
        # Status is read, not the engine's queue: a sequence admitted during a long step counts as admitted at once.
        return self._handed_over + sum(1 for seq in self._submitted if seq.status is Status.WAITING)

    def submit(self, job: Job) -> None:
        """Hand a job over; its `submitted` future then gives the sequence or the submit error."""
        if not self.alive:
            raise ShuttingDownError("the server is shutting down")
        with self._lock:
            if self._queued() >= self.max_queue:
                raise QueueFullError(f"the server is at capacity: {self.max_queue} requests are already waiting "
                                     "for device memory; retry later")
            self._handed_over += 1
        self._inbox.put(("submit", job))

    def cancel(self, job: Job) -> None:
        """Stop a job's sequence and free its pages (done by the engine thread, at its next iteration)."""
        self._inbox.put(("cancel", job))

    def policy(self, name: str) -> SelectionPolicy:
        """The shared instance of a policy (made on first use)."""
        if name not in self._policies:
            self._policies[name] = make_policy(name, **self.policy_options.get(name, {}))
        return self._policies[name]

    # ------------------------------------------------------------------ the engine thread
    def _run(self) -> None:
        while not self._stopping.is_set():
            self._read_inbox(block=not self.engine.has_work)
            if self.engine.has_work and not self._stopping.is_set():
                try:
                    self.engine.step()
                except Exception as exc:  # a bug outside one sequence's guarded work: end the batch, keep serving
                    log.exception("engine step failed; ending the running requests")
                    for seq in list(self.engine.running):
                        seq.error = exc
                        self.engine.cancel(seq)
            self._publish()
        self._shut_down()

    def _read_inbox(self, block: bool) -> None:
        try:
            command, job = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            if command == "submit":
                self._submit(job)
            elif command == "cancel" and job.sequence is not None:
                self.engine.cancel(job.sequence)
            try:
                command, job = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _submit(self, job: Job) -> None:
        with self._lock:
            self._handed_over -= 1
        if self._stopping.is_set():
            job.resolve(ShuttingDownError("the server is shutting down"))
            return
        try:
            prompt = job.prompt
            if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
                prompt = chat_prompt_ids(self.engine.tokenizer, prompt)
            seq = self.engine.submit(prompt, self.policy(job.policy),
                                     on_token=lambda event: self._on_token(job, event), **job.options)
        except ValueError as exc:  # PromptError, GenerationOptionsError, AdmissionError, ConfigError, unknown policy
            job.resolve(exc)
            return
        job.sequence = seq
        job.resolve(seq)
        with self._lock:
            self._submitted.append(seq)

    def _on_token(self, job: Job, event: TokenEvent) -> None:
        now = time.perf_counter()
        if event.token_id >= 0:
            if job.last_token_at is None:
                self.metrics.first_token(now - job.arrival)
            self.metrics.token(None if job.last_token_at is None else now - job.last_token_at)
            job.last_token_at = now
        if not event.finished:
            if event.text:
                job.post(job.events.put_nowait, Event(event.text))
            return
        seq = event.sequence
        reason = "error" if seq.error is not None else event.finish_reason
        result = self.engine.result(seq) if reason in ("stop", "length") else None
        self.metrics.finish(reason, len(seq.prompt_ids), seq.transfers.to_dict())
        job.post(job.events.put_nowait, Event(event.text, reason, result, seq.error))

    def _publish(self) -> None:
        with self._lock:
            self._submitted = [seq for seq in self._submitted if seq.status is Status.WAITING]
            queued = self._handed_over + len(self._submitted)
        self.metrics.engine_state(self.engine.memory(), queued)

    def _shut_down(self) -> None:
        for seq in list(self.engine.running) + list(self.engine.waiting):
            self.engine.cancel(seq)
        while True:
            try:
                command, job = self._inbox.get_nowait()
            except queue.Empty:
                break
            if command == "submit":
                self._submit(job)  # answers "shutting down"
        self._publish()
