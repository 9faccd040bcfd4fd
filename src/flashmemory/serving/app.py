"""The FastAPI app: OpenAI-compatible completions and chat completions over one `EngineWorker`.

    worker = EngineWorker(engine, "lsa", max_queue=64, metrics=Metrics())
    app = create_app(worker, model_id="smollm2-135m")
    uvicorn.run(app, host="127.0.0.1", port=8000)

Status codes: 400 for a request that cannot run (malformed body, empty or too long prompt, unknown
model or policy, unsupported option), 429 when the admission queue is full, 500 when generation
fails, 503 while shutting down. Errors use OpenAI's `{"error": {...}}` body.
"""

from __future__ import annotations

import asyncio
import json
from contextlib import aclosing, asynccontextmanager
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel

from .protocol import (ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest,
                       ChatCompletionResponse, ChatDelta, CompletionChoice, CompletionRequest, CompletionResponse,
                       MemoryReport, ModelCard, ModelList, RequestError, Usage, error_body, new_id, now)
from .worker import EngineWorker, Event, Job, QueueFullError, ShuttingDownError


class GenerationError(Exception):
    """A request that failed while generating (answered 500, or an error event in a stream)."""


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        if err.get("type") == "json_invalid":
            return f"the request body is not valid JSON: {err.get('ctx', {}).get('error', err.get('msg'))}"
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
    return "invalid request body: " + "; ".join(parts)


def _sse(payload: BaseModel | dict) -> str:
    data = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {data}\n\n"


def create_app(worker: EngineWorker, model_id: str) -> FastAPI:
    """The server's app; its lifespan starts and stops the engine thread."""
    created = now()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        worker.start()
        try:
            yield
        finally:
            worker.stop()

    app = FastAPI(title="flashmemory", description="OpenAI-compatible serving with a tiered KV cache",
                  lifespan=lifespan)

    def error(status: int, message: str, kind: str, param: str | None = None, code: str | None = None) -> JSONResponse:
        if status in (400, 429, 503):
            worker.metrics.reject(status)
        return JSONResponse(error_body(message, kind, param, code), status_code=status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error(400, _validation_message(exc), "invalid_request_error")

    @app.exception_handler(RequestError)
    async def _bad(_: Request, exc: RequestError) -> JSONResponse:
        return error(400, str(exc), "invalid_request_error", exc.param)

    @app.exception_handler(QueueFullError)
    async def _full(_: Request, exc: QueueFullError) -> JSONResponse:
        return error(429, str(exc), "rate_limit_error", code="queue_full")

    @app.exception_handler(ShuttingDownError)
    async def _closing(_: Request, exc: ShuttingDownError) -> JSONResponse:
        return error(503, str(exc), "server_error")

    @app.exception_handler(GenerationError)
    async def _failed(_: Request, exc: GenerationError) -> JSONResponse:
        return error(500, str(exc), "server_error")

    # ------------------------------------------------------------------ running one request
    async def start(body: CompletionRequest | ChatCompletionRequest, prompt) -> Job:
        """Check the request, hand it to the engine thread and wait until the engine has queued it."""
        body.check_supported()
        if body.model != model_id:
            raise RequestError(f"unknown model {body.model!r}; this server serves {model_id!r}", param="model")
        job = Job(prompt, body.policy or worker.default_policy, body.sampling())
        worker.submit(job)
        try:
            await job.submitted
        except ValueError as exc:  # what the engine refused at submit time: the request's fault
            raise RequestError(str(exc)) from None
        except asyncio.CancelledError:
            worker.cancel(job)
            raise
        return job

    async def cancel_on_disconnect(request: Request, job: Job) -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        worker.cancel(job)

    async def events(job: Job, request: Request) -> AsyncIterator[Event]:
        """The job's events until its last; a client that goes away cancels it (its pages are freed)."""
        watcher = asyncio.create_task(cancel_on_disconnect(request, job))
        try:
            while not job.finished:
                event = await job.events.get()
                job.finished = event.finish_reason is not None
                if event.finish_reason in ("error", "cancelled"):
                    raise GenerationError(f"generation failed: {event.error}" if event.error is not None
                                          else "the request was cancelled: the server is shutting down")
                yield event
        finally:
            watcher.cancel()
            if not job.finished:
                worker.cancel(job)

    async def last_event(job: Job, request: Request) -> Event:
        async with aclosing(events(job, request)) as stream_of_events:
            async for event in stream_of_events:
                if event.finish_reason is not None:
                    return event
        raise AssertionError("events() ends with a finished event")

    async def stream(job: Job, request: Request, chunks) -> AsyncIterator[str]:
        """Server-sent events: one per chunk that `chunks(event)` makes, then [DONE]."""
        try:
            async with aclosing(events(job, request)) as stream_of_events:
                async for event in stream_of_events:
                    for chunk in chunks(event):
                        yield _sse(chunk)
        except GenerationError as exc:
            yield _sse(error_body(str(exc), "server_error"))
        yield "data: [DONE]\n\n"

    def usage(event: Event) -> Usage:
        report = event.result.report
        return Usage.of(report.prompt_tokens, report.new_tokens)

    # ------------------------------------------------------------------ routes
    @app.get("/health")
    async def health() -> JSONResponse:
        if worker.alive:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "the engine thread has stopped"}, status_code=503)

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(worker.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=model_id, created=created)])

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> CompletionResponse | StreamingResponse:
        job = await start(body, body.single_prompt())
        rid, t = new_id("cmpl"), now()

        def chunk(choices: list[CompletionChoice], **extra) -> CompletionResponse:
            return CompletionResponse(id=rid, created=t, model=model_id, choices=choices, **extra)

        if not body.stream:
            event = await last_event(job, request)
            return chunk([CompletionChoice(text=event.result.text, finish_reason=event.finish_reason)],
                         usage=usage(event), memory=MemoryReport.of(event.result.report))

        def chunks(event: Event) -> list[CompletionResponse]:
            if event.finish_reason is None:
                return [chunk([CompletionChoice(text=event.text, finish_reason=None)])]
            out = [chunk([CompletionChoice(text=event.text, finish_reason=event.finish_reason)],
                         memory=MemoryReport.of(event.result.report))]
            if body.include_usage:
                out.append(chunk([], usage=usage(event)))
            return out

        return StreamingResponse(stream(job, request, chunks), media_type="text/event-stream")

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest,
                               request: Request) -> ChatCompletionResponse | StreamingResponse:
        job = await start(body, body.chat_messages())
        rid, t = new_id("chatcmpl"), now()

        if not body.stream:
            event = await last_event(job, request)
            message = ChatDelta(role="assistant", content=event.result.text)
            return ChatCompletionResponse(id=rid, created=t, model=model_id,
                                          choices=[ChatChoice(message=message, finish_reason=event.finish_reason)],
                                          usage=usage(event), memory=MemoryReport.of(event.result.report))

        def chunk(delta: ChatDelta | None, finish_reason: str | None = None, **extra) -> ChatCompletionChunk:
            choices = [] if delta is None else [ChatChunkChoice(delta=delta, finish_reason=finish_reason)]
            return ChatCompletionChunk(id=rid, created=t, model=model_id, choices=choices, **extra)

        first = [chunk(ChatDelta(role="assistant", content=""))]

        def chunks(event: Event) -> list[ChatCompletionChunk]:
            out = [first.pop()] if first else []
            if event.text:
                out.append(chunk(ChatDelta(content=event.text)))
            if event.finish_reason is not None:
                out.append(chunk(ChatDelta(), event.finish_reason, memory=MemoryReport.of(event.result.report)))
                if body.include_usage:
                    out.append(chunk(None, usage=usage(event)))
            return out

        return StreamingResponse(stream(job, request, chunks), media_type="text/event-stream")

    return app
