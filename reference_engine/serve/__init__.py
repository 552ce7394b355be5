"""Chapter 9: batching and serving.

    scheduler.py  continuous batching: admission by the KV block pool, a token budget per
                  step, chunked prefill, preemption by recompute; static and sequential too
    runner.py     one forward over a step's ragged chunks, keys and values in a paged pool
    engine.py     the scheduler's steps run on the model; its loop on its own thread
    server.py     the OpenAI-compatible HTTP server (FastAPI on uvicorn)
    loadtest.py   the load generator: Poisson arrivals, TTFT / TPOT / latency percentiles
"""
