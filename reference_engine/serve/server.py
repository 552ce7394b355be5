"""The OpenAI-compatible HTTP server: FastAPI on uvicorn, the engine on its own thread.

    python -m reference_engine serve --port 8000
    curl localhost:8000/v1/completions -H 'content-type: application/json' \
         -d '{"model": "smollm2-135m-instruct", "prompt": "The capital of France is", "max_tokens": 8}'

Routes: /v1/completions and /v1/chat/completions (whole or streamed as server-sent
events), /v1/models, /health, /metrics (Prometheus text). The HTTP side is asyncio: each
request is a coroutine that hands its prompt to the `EngineLoop` and waits on an
asyncio.Queue that the engine thread fills (`loop.call_soon_threadsafe`), so thousands of
open connections cost no threads, and the model sees them all in one batch per step.

Bad input never reaches the engine: a body that is not JSON, an unknown field or model,
a prompt that is empty or too long for the context each get an OpenAI-style error with a
4xx status. When more than `max_waiting` requests are queued the server answers 503 with
Retry-After instead of letting the queue (and every waiting client's latency) grow without
limit. A client that disconnects is aborted at once: its KV blocks go back to the pool.

FastAPI is imported at the top of this module (it reads the handlers' annotations from the
module's globals); nothing else in the engine imports this module.
"""

from __future__ import annotations

import asyncio
import json
import time

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import DojoError
from .api import ChatRequest, CompletionRequest, Reply, error_body
from .engine import EngineLoop, Event
from .scheduler import Request, SamplingParams

FAILED = {  # finish reasons that are not an answer: what the client is told instead
    "error": (500, "the engine failed on this request (the server log has the traceback); retry it"),
    "abort": (503, "the server stopped before this request finished; retry it"),
}
MAX_CHARS_PER_TOKEN = 32  # a prompt longer than this many characters per context token cannot fit: refused unread
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """The Prometheus metrics of one server (its own registry, so tests can run several)."""

    def __init__(self, loop: EngineLoop):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

        self.registry = r = CollectorRegistry()
        ProcessCollector(registry=r)  # process_resident_memory_bytes and friends: does memory grow?
        sched = loop.engine.scheduler
        self.requests = Counter("dojo_requests", "Requests answered, by outcome", ["outcome"], registry=r)
        self.prompt_tokens = Counter("dojo_prompt_tokens", "Prompt tokens of accepted requests", registry=r)
        self.generated = Counter("dojo_generation_tokens", "Tokens generated", registry=r)
        Gauge("dojo_requests_waiting", "Requests queued, not yet running", registry=r).set_function(
            lambda: len(sched.waiting))
        Gauge("dojo_requests_running", "Requests in the running batch", registry=r).set_function(
            lambda: len(sched.running))
        Gauge("dojo_kv_blocks_used", "KV cache blocks in use", registry=r).set_function(lambda: sched.pool.used)
        Gauge("dojo_engine_busy_seconds", "Seconds the engine spent in steps (busy / wall = utilisation)",
              registry=r).set_function(lambda: loop.busy_s)
        Gauge("dojo_engine_steps", "Forward steps run", registry=r).set_function(lambda: sched.steps)
        Gauge("dojo_kv_blocks_total", "KV cache blocks in the pool", registry=r).set(sched.pool.n_blocks)
        self.ttft = Histogram("dojo_time_to_first_token_seconds", "Arrival to first token", registry=r,
                              buckets=LATENCY_BUCKETS)
        self.tpot = Histogram("dojo_time_per_output_token_seconds", "(latency - TTFT) / (tokens - 1)",
                              registry=r, buckets=LATENCY_BUCKETS)
        self.latency = Histogram("dojo_e2e_request_latency_seconds", "Arrival to last token", registry=r,
                                 buckets=LATENCY_BUCKETS)

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class Stream:
    """One request's view of the engine: its tokens as text deltas, with stop strings held
    back until they can no longer start one (the text returned never contains a stop)."""

    def __init__(self, loop: EngineLoop, tokenizer, req: Request, stops: list[str]):
        self.loop, self.req, self.stops = loop, req, stops
        self.decoder = tokenizer.stream_decoder()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        aloop = asyncio.get_running_loop()
        loop.submit(req, lambda event: aloop.call_soon_threadsafe(self.queue.put_nowait, event))
        self.text, self.sent, self.done = "", 0, False
        self.finish_reason: str | None = None
        self.arrival, self.first_token_at = time.perf_counter(), None

    async def deltas(self):
        """Yields text as it becomes safe to send; sets finish_reason at the end."""
        while not self.done:
            event = await self.queue.get()
            if event.token is not None:
                self.first_token_at = self.first_token_at or time.perf_counter()
                self.text += self.decoder.push(event.token)
            if event.finished:
                self.text += self.decoder.flush()
                self.done, self.finish_reason = True, event.request.finish_reason
            start = max(0, self.sent - max(map(len, self.stops), default=0))  # text before was searched already
            cut = min((i for i in (self.text.find(s, start) for s in self.stops) if i >= 0), default=-1)
            if cut >= 0:  # a stop string: end here, and tell the engine to stop working on it
                self.text, self.finish_reason = self.text[:cut], "stop"
                if not self.done:
                    self.done = True
                    self.loop.abort(self.req.rid)
            safe = len(self.text) if self.done else len(self.text) - self._held_back()
            if safe > self.sent:
                yield self.text[self.sent : safe]
                self.sent = safe

    def _held_back(self) -> int:
        """Characters at the end of the text that could be the start of a stop string."""
        return max((k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)

    def cancel(self) -> None:
        if not self.done:
            self.done = True
            self.loop.abort(self.req.rid)


def create_app(loop: EngineLoop, tokenizer, model_name: str, stop_ids: list[int]):
    """The FastAPI application around a started EngineLoop."""
    app = FastAPI(title="Inference Dojo", docs_url=None, redoc_url=None)
    metrics = Metrics(loop)
    app.state.metrics, app.state.loop = metrics, loop
    context = loop.engine.context

    def fail(status: int, message: str, kind: str = "invalid_request_error", param=None, code=None,
             headers=None) -> JSONResponse:
        metrics.requests.labels(outcome=str(status)).inc()
        return JSONResponse(error_body(message, kind, param, code), status_code=status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, exc: RequestValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        if first.get("type") == "json_invalid":
            return fail(400, "the body is not valid JSON: " + first.get("msg", ""), code="invalid_json")
        if first.get("type") == "extra_forbidden":
            return fail(400, f"unknown field '{where}': this server accepts the OpenAI fields it implements "
                             "(check its spelling; the README's serving section lists them)", param=where, code="unknown_field")
        return fail(400, f"{where or 'body'}: {first.get('msg')}", param=where or None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, exc: StarletteHTTPException):
        return fail(exc.status_code, str(exc.detail), kind="invalid_request_error" if exc.status_code < 500
                    else "server_error")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "inference-dojo", "max_model_len": context}]}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.text(), media_type="text/plain; version=0.0.4")

    async def answer(http: HTTPRequest, body, prompt_ids: list[int], max_tokens: int | None, chat: bool):
        if body.model != model_name:
            return fail(404, f"the model '{body.model}' does not exist; this server serves '{model_name}' "
                             "(GET /v1/models)", param="model", code="model_not_found")
        if not prompt_ids:
            return fail(400, "the prompt is empty: send some text", param="prompt")
        if max_tokens is None:
            max_tokens = max(loop.engine.longest - len(prompt_ids), 1)
        params = SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                                seed=body.seed, stop_ids=frozenset(stop_ids))
        reply = Reply(chat, model_name)
        req = Request(reply.id, prompt_ids, params)
        try:
            loop.engine.check(prompt_ids, params)
        except DojoError as e:
            return fail(400, str(e), param="max_tokens" if len(prompt_ids) < loop.engine.longest else "prompt",
                        code="context_length_exceeded")
        if loop.full:
            # 503, not 429: the server as a whole is full (429 says this client sent too much)
            return fail(503, f"the server is at capacity ({loop.max_waiting} requests already waiting); retry "
                             "shortly", kind="server_error", code="overloaded", headers={"Retry-After": "1"})
        stream = Stream(loop, tokenizer, req, body.stops())
        metrics.prompt_tokens.inc(len(prompt_ids))
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(sse(stream, reply, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        watcher = asyncio.create_task(cancel_on_disconnect(http, stream))
        try:
            text = "".join([d async for d in stream.deltas()])
        finally:
            watcher.cancel()
            stream.cancel()
        if stream.finish_reason in FAILED:
            status, message = FAILED[stream.finish_reason]
            return fail(status, message, kind="server_error", code=stream.finish_reason)
        finished(stream)
        return reply.whole(text, stream.finish_reason, len(prompt_ids), len(req.output))

    async def cancel_on_disconnect(http: HTTPRequest, stream: Stream) -> None:
        """A non-streaming client that hangs up is aborted too (a stream notices on its own)."""
        while not stream.done:
            if await http.is_disconnected():
                stream.cancel()
                stream.queue.put_nowait(Event(stream.req, None, True))
                return
            await asyncio.sleep(0.25)

    def finished(stream: Stream) -> None:
        n = len(stream.req.output)
        metrics.requests.labels(outcome=stream.finish_reason or "abort").inc()
        metrics.generated.inc(n)
        if stream.first_token_at is not None:
            end = time.perf_counter()
            metrics.ttft.observe(stream.first_token_at - stream.arrival)
            metrics.latency.observe(end - stream.arrival)
            if n > 1:
                metrics.tpot.observe((end - stream.first_token_at) / (n - 1))

    async def sse(stream: Stream, reply: Reply, include_usage: bool):
        """Server-sent events: one `data: {json}` line per chunk, then `data: [DONE]`.
        (The framing is two lines of text; a library would add nothing here.)"""
        def event(obj) -> str:
            return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"

        try:
            if reply.chat:
                yield event(reply.chunk(None, first=True))
            async for delta in stream.deltas():
                yield event(reply.chunk(delta))
            if stream.finish_reason in FAILED:  # OpenAI's way: an error object in the stream, then the end
                status, message = FAILED[stream.finish_reason]
                metrics.requests.labels(outcome=str(status)).inc()
                yield event(error_body(message, "server_error", code=stream.finish_reason))
                yield "data: [DONE]\n\n"
                return
            yield event(reply.chunk(None, stream.finish_reason))
            if include_usage:
                yield event(reply.usage_chunk(len(stream.req.prompt), len(stream.req.output)))
            yield "data: [DONE]\n\n"
            finished(stream)
        finally:
            if not stream.done:  # the client went away mid-stream
                metrics.requests.labels(outcome="disconnected").inc()
            stream.cancel()  # free its blocks now (a no-op when it finished)

    def too_long(chars: int):
        return fail(400, f"the prompt has {chars:,} characters, far more than the context of {context} tokens "
                         "holds; shorten it", param="prompt", code="context_length_exceeded")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HTTPRequest):
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            return fail(400, f"prompt must be one string (got a list of {len(prompts)}); send one request per "
                             "prompt: the server batches them for you", param="prompt")
        if len(prompts[0]) > MAX_CHARS_PER_TOKEN * context:
            return too_long(len(prompts[0]))
        return await answer(http, body, await asyncio.to_thread(tokenizer.encode, prompts[0]), body.max_tokens,
                            chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, http: HTTPRequest):
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        text = tokenizer.apply_chat_template(messages) if any(m["content"] for m in messages) else ""
        if len(text) > MAX_CHARS_PER_TOKEN * context:
            return too_long(len(text))
        ids = await asyncio.to_thread(tokenizer.encode, text)  # off the event loop: other streams go on
        return await answer(http, body, ids, body.max_completion_tokens or body.max_tokens, chat=True)

    return app


def bind(host: str, port: int):
    """The listening socket, bound here so that a port in use is one clear error line."""
    import socket

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restarts need no wait
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise DojoError(f"cannot listen on {host}:{port} ({e.strerror}); is another server running there? "
                        "pass another --port") from None
    sock.listen(2048)
    return sock


def run_server(loop: EngineLoop, tokenizer, model_name: str, stop_ids: list[int], sock,
               shutdown_timeout: float = 10.0) -> None:
    """Serve until SIGINT or SIGTERM. On either, uvicorn stops accepting connections and lets
    the running requests finish for up to shutdown_timeout seconds; what is still running
    then is cancelled (its clients see the stream end), and the engine thread stops."""
    import uvicorn

    app = create_app(loop, tokenizer, model_name, stop_ids)
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=shutdown_timeout,
                            access_log=False)
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[sock])
    finally:
        loop.stop()
