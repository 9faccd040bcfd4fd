"""`flashmemory serve`: an OpenAI-compatible HTTP server over the batched engine.

`app.create_app` makes the FastAPI app; `worker.EngineWorker` owns the engine in one thread;
`protocol` holds the request and response bodies; `metrics` renders Prometheus text.
"""
