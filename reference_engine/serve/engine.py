"""The serving engine: the scheduler's steps run on the model, one after another.

`Engine` is synchronous and deterministic (tests, the lesson, offline batches):
    engine = Engine(model, n_blocks=256)
    engine.add(Request("a", prompt_ids, SamplingParams(max_tokens=32)))
    while engine.has_work: engine.step()

`EngineLoop` runs an Engine on its own thread for the server. Why one thread for the
model and an asyncio event loop for HTTP: a forward spends its time inside PyTorch's
kernels, which release the GIL, so the event loop keeps accepting connections and writing
tokens while the model computes. Running one model call per request on many threads would
instead decode each request at batch 1, the threads fighting over the same cores and
weights; one loop that batches every request into each step reads the weights once for all.
"""

from __future__ import annotations

import queue
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import DojoError
from ..generate import check_sampling_args, sample
from ..model import Transformer
from .runner import PagedRunner
from .scheduler import FINISHED, Request, SamplingParams, Scheduler


@dataclass
class Event:
    """What one step did for one request: the token it produced (None while its prompt is
    still being fed, or when it stopped on a stop token), and whether it is finished."""

    request: Request
    token: int | None
    finished: bool


GREEDY_BELOW = 1e-5  # temperatures below this sample the argmax
MAX_SEED = 2**63 - 1


class Engine:
    def __init__(self, model: Transformer, n_blocks: int = 512, block_size: int = 16, token_budget: int = 256,
                 max_running: int = 16, policy: str = "continuous"):
        self.model = model
        self.scheduler = Scheduler(n_blocks, block_size, token_budget, max_running, policy)
        self.runner = PagedRunner(model, n_blocks, block_size)
        self.generators: dict[str, torch.Generator] = {}
        self.tokens_generated = 0

    @property
    def context(self) -> int:
        return self.model.config.max_seq_len

    @property
    def longest(self) -> int:
        """The most tokens (prompt + output) one request may hold: the context or the pool."""
        return min(self.context, self.scheduler.capacity)

    def check(self, prompt: list[int], params: SamplingParams) -> None:
        """Refuse, with the reason, a request that could never run (before it is queued)."""
        if not prompt:
            raise DojoError("the prompt is empty: send at least one token of text")
        if params.max_tokens < 1:
            raise DojoError(f"max_tokens must be >= 1, got {params.max_tokens}")
        if len(prompt) + params.max_tokens > self.context:
            raise DojoError(f"the prompt ({len(prompt)} tokens) plus max_tokens ({params.max_tokens}) exceed the "
                            f"model's context of {self.context} tokens; ask for at most "
                            f"{max(self.context - len(prompt), 0)} new tokens or shorten the prompt")
        if len(prompt) + params.max_tokens > self.scheduler.capacity:
            raise DojoError(f"the prompt ({len(prompt)} tokens) plus max_tokens ({params.max_tokens}) need more "
                            f"than the {self.scheduler.capacity} slots of the whole KV cache pool; ask for at most "
                            f"{max(self.scheduler.capacity - len(prompt), 0)} new tokens")
        check_sampling_args(params.temperature, params.top_k, params.top_p)
        if params.seed is not None and not 0 <= params.seed <= MAX_SEED:
            raise DojoError(f"seed must be in [0, 2**63 - 1], got {params.seed}")

    def add(self, req: Request) -> Request:
        self.check(req.prompt, req.params)
        self.scheduler.add(req)
        if req.params.temperature >= GREEDY_BELOW:
            generator = torch.Generator()  # this request's own: the global RNG is left alone
            if req.params.seed is None:
                generator.seed()  # a fresh random seed
            else:
                generator.manual_seed(req.params.seed)
            self.generators[req.rid] = generator
        return req

    def abort(self, rid: str) -> Request | None:
        self.generators.pop(rid, None)
        return self.scheduler.abort(rid)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def step(self) -> list[Event]:
        """Schedule, run the forward, sample, account. Returns one Event per chunk run. A
        forward that fails ends only the requests of this step (finish_reason "error")."""
        step = self.scheduler.schedule()
        if not step.chunks:
            return []
        chunks = [(req.tokens[req.computed : req.computed + n], req.computed, req.blocks, step.samples(req, n))
                  for req, n in step.chunks]
        try:
            logits = self.runner.forward_step(chunks).cpu()  # (chunks that sample, vocab); may be 0 rows
        except Exception:  # noqa: BLE001 - a bug in the forward must not take every other request down
            traceback.print_exc()
            return [self._fail(req) for req, _ in step.chunks]
        sampled, failed, row = {}, [], 0
        for (req, n), chunk in zip(step.chunks, chunks):
            if chunk[3]:
                try:
                    sampled[req.rid] = self._sample(req, logits[row : row + 1])
                except Exception:  # noqa: BLE001 - e.g. probabilities that are not finite: this request only
                    traceback.print_exc()
                    failed.append(req)
                row += 1
        events = [self._fail(req) for req in failed]
        lengths = {req.rid: len(req.output) for req, _ in step.chunks}
        finished = set(self.scheduler.update(step, sampled))
        for req, _ in step.chunks:
            grew = len(req.output) > lengths[req.rid]
            if grew:
                self.tokens_generated += 1
            if req.rid in sampled or req in finished:
                events.append(Event(req, req.output[-1] if grew else None, req in finished))
            if req in finished:
                self.generators.pop(req.rid, None)
        return events

    def _sample(self, req: Request, logits: torch.Tensor) -> int:
        p = req.params
        if p.temperature < GREEDY_BELOW:  # logits / 1e-40 overflow: that close to 0 is greedy anyway
            return int(logits.argmax(-1)[0])
        return int(sample(logits, p.temperature, p.top_k, p.top_p, self.generators.get(req.rid))[0])

    def _fail(self, req: Request) -> Event:
        self.abort(req.rid)
        req.finish_reason = "error"
        return Event(req, None, True)

    def generate(self, prompts: dict[str, list[int]], params: SamplingParams) -> dict[str, list[int]]:
        """Every prompt to completion (offline batch). Returns rid -> output tokens."""
        reqs = [self.add(Request(rid, list(p), params)) for rid, p in prompts.items()]
        while self.has_work:
            self.step()
        return {r.rid: r.output for r in reqs}


class EngineLoop:
    """An Engine on its own thread. `submit` and `abort` are safe to call from any thread;
    `on_event(event)` is called on the engine's thread (the server hands it to asyncio)."""

    def __init__(self, engine: Engine, max_waiting: int = 64, batch_window: float = 0.05):
        self.engine = engine
        self.batch_window = batch_window  # static batching: seconds to wait for a fuller batch
        self.max_waiting = max_waiting  # requests queued but not yet running, at most
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.listeners: dict[str, Callable[[Event], None]] = {}
        self.pending = 0  # submitted, not yet finished (read by the server for its 503s)
        self.lock = threading.Lock()
        self.busy_s = 0.0
        self.thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)

    def start(self) -> "EngineLoop":
        self.thread.start()
        return self

    def submit(self, req: Request, on_event: Callable[[Event], None]) -> None:
        """Queue a request; raises DojoError when it could never run. The caller checks
        `full` first (bounded queue)."""
        self.engine.check(req.prompt, req.params)
        with self.lock:
            self.pending += 1
        self.inbox.put(("add", req, on_event))

    @property
    def full(self) -> bool:
        """Every seat of the running batch taken and max_waiting more queued behind them."""
        return self.pending >= self.engine.scheduler.max_running + self.max_waiting

    def abort(self, rid: str) -> None:
        self.inbox.put(("abort", rid, None))

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel what is queued or running (each gets a finished "abort" event) and end the thread."""
        self.inbox.put(("stop", None, None))
        self.thread.join(timeout)

    def _run(self) -> None:
        while self._take(wait=None if not self.engine.has_work else 0.0):
            if self._filling_batch():
                # static batching waits a moment for a fuller batch (a fair baseline: without
                # it, clients that come back a millisecond late miss a whole batch)
                deadline = time.perf_counter() + self.batch_window
                while self._filling_batch() and (left := deadline - time.perf_counter()) > 0:
                    if not self._take(wait=left):
                        return
            t0 = time.perf_counter()
            try:
                events = self.engine.step()
            except Exception:  # noqa: BLE001 - a bug must not silence the server: fail what runs, go on
                traceback.print_exc()
                s = self.engine.scheduler
                for req in list(s.running) + list(s.waiting):
                    self._abort(req.rid, "error")
                continue
            finally:
                self.busy_s += time.perf_counter() - t0
            for event in events:
                self._deliver(event)

    def _filling_batch(self) -> bool:
        s = self.engine.scheduler
        return s.policy == "static" and not s.running and 0 < len(s.waiting) < s.max_running

    def _take(self, wait: float | None) -> bool:
        """Handle what arrived: block until something does (wait None), up to `wait` seconds,
        or not at all (0). False when asked to stop."""
        block = wait is None or wait > 0
        while True:
            try:
                kind, item, on_event = self.inbox.get(block=block, timeout=wait if block else None)
            except queue.Empty:
                return True
            block = False
            if kind == "add":
                self.listeners[item.rid] = on_event
                try:
                    self.engine.add(item)
                except Exception:  # noqa: BLE001 - checked before submit; one that still cannot run ends at once
                    traceback.print_exc()
                    self.engine.abort(item.rid)  # in case it was queued before the failure
                    item.status, item.finish_reason = FINISHED, "error"
                    self._deliver(Event(item, None, True))
            elif kind == "abort":
                self._abort(item)
            else:
                for req in list(self.engine.scheduler.running) + list(self.engine.scheduler.waiting):
                    self._abort(req.rid)
                return False

    def _abort(self, rid: str, reason: str = "abort") -> None:
        req = self.engine.abort(rid)
        if req is not None:
            req.finish_reason = reason
            self._deliver(Event(req, None, True))

    def _deliver(self, event: Event) -> None:
        listener = self.listeners.get(event.request.rid)
        if event.finished:
            self.listeners.pop(event.request.rid, None)
            with self.lock:
                self.pending -= 1
        if listener is not None:
            try:
                listener(event)
            except RuntimeError:  # the event loop is gone (shutting down): nobody is listening
                pass


__all__ = ["Engine", "EngineLoop", "Event", "Request", "SamplingParams", "FINISHED"]
