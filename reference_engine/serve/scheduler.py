"""Continuous batching: which requests run in the next forward, and how many tokens each feeds.

A decode step at batch 1 reads every weight to produce one token; at batch 16 it reads
them once for 16 tokens, for nearly the same time (`bench`, chapter 3). Serving therefore
wants as many sequences in each forward as memory allows. Two ways to batch:

  - static batching takes a batch of requests, runs it until the *last* one finishes, then
    takes the next batch: a request that stops after 5 tokens holds its seat while its
    neighbour writes 500, and new arrivals wait for the whole batch;
  - continuous (iteration-level) batching decides again at every step: a request joins the
    running batch at any step and leaves the step it stops.

The scheduler below is the second, with the limits a real server has (vLLM's, simplified):
  - memory: keys and values live in a pool of fixed-size blocks (the paged KV cache of
    chapter 3). A request is admitted only when the pool has free blocks for its whole
    prompt (it takes them chunk by chunk);
  - compute: a token budget per step. Decodes (1 token each) are scheduled first, then
    prompts, cut into chunks that fit what is left of the budget (chunked prefill), so a
    long prompt never stalls the running decodes for a whole prefill;
  - preemption: when a running request needs a block and none is free, the *newest*
    running request gives its blocks back and returns to the front of the queue; it is
    recomputed later from its prompt and the tokens it already produced (recompute, not
    swap: on a CPU the "swap space" is the same memory). The newest has done the least
    work, so the least is thrown away, and the oldest requests always make progress.

Everything here is plain Python over token counts: no tensors, no model. The engine
(`engine.py`) feeds each step's chunks to the model and reports the sampled tokens back.
Every step is recorded in `log`, so a test can replay what happened.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from ..errors import DojoError

WAITING, RUNNING, FINISHED = "waiting", "running", "finished"
POLICIES = {
    "continuous": "requests join and leave the running batch at every step",
    "static": "a batch runs until its last request finishes; then the next batch starts",
    "sequential": "one request at a time",
}


@dataclass
class SamplingParams:
    max_tokens: int = 16  # new tokens at most (stop token excluded)
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None  # seeds this request's own generator (sampling only)
    stop_ids: frozenset[int] = frozenset()  # tokens that end the request (not part of the output)


@dataclass(eq=False)
class Request:
    rid: str
    prompt: list[int]
    params: SamplingParams
    output: list[int] = field(default_factory=list)
    computed: int = 0  # leading tokens of prompt + output whose keys and values are in the cache
    blocks: list[int] = field(default_factory=list)  # block table: block i holds slots [i*bs, (i+1)*bs)
    status: str = WAITING
    finish_reason: str | None = None  # "stop", "length" or "abort"
    preemptions: int = 0

    @property
    def tokens(self) -> list[int]:
        """Everything the model has to have seen before sampling the next token."""
        return self.prompt + self.output

    @property
    def pending(self) -> int:
        """Tokens still to feed before the next token can be sampled: the whole prompt at first,
        1 while decoding, prompt + output again after a preemption."""
        return len(self.prompt) + len(self.output) - self.computed


@dataclass
class Step:
    """One forward: feed req.tokens[req.computed : req.computed + n] for each (req, n)."""

    number: int
    chunks: list[tuple[Request, int]]
    admitted: list[str]
    preempted: list[str]

    def samples(self, req: Request, n: int) -> bool:
        """Whether this chunk ends the known tokens, so the forward's last logits are sampled
        (a prompt cut into chunks samples only after its last chunk)."""
        return req.computed + n == len(req.tokens)


class BlockPool:
    """The KV cache's blocks: a free list of block ids. Example: 4 blocks of 16 slots; a
    request of 20 tokens holds 2 (ceil(20 / 16)), leaving 2 free."""

    def __init__(self, n_blocks: int, block_size: int):
        if n_blocks < 1 or block_size < 1:
            raise DojoError(f"the KV cache needs at least 1 block of at least 1 slot, got {n_blocks} "
                            f"block(s) of {block_size}")
        self.n_blocks, self.block_size = n_blocks, block_size
        self.free = list(range(n_blocks - 1, -1, -1))  # a stack: the lowest id is handed out first

    @property
    def used(self) -> int:
        return self.n_blocks - len(self.free)

    def blocks_for(self, n_slots: int) -> int:
        return -(-n_slots // self.block_size)

    def grow(self, table: list[int], n_slots: int) -> bool:
        """Append blocks to `table` until it holds n_slots slots; False (and nothing taken)
        when the pool has too few free."""
        needed = self.blocks_for(n_slots) - len(table)
        if needed > len(self.free):
            return False
        for _ in range(max(needed, 0)):
            table.append(self.free.pop())
        return True

    def release(self, table: list[int]) -> None:
        self.free.extend(reversed(table))
        table.clear()


class Scheduler:
    """Decides each step's chunks under a block pool and a token budget (module docstring).

    Example (token_budget 8, block_size 4, prompts of 6 and 5 tokens arriving together):
    step 0 feeds A's 6 prompt tokens and B's first 2 (the budget is spent), samples for A;
    step 1 feeds A's new token and B's last 3, samples for both; then both decode.
    """

    def __init__(self, n_blocks: int, block_size: int = 16, token_budget: int = 256, max_running: int = 16,
                 policy: str = "continuous"):
        if policy not in POLICIES:
            raise DojoError(f"unknown batching policy {policy!r}; choose one of: "
                            + "; ".join(f"{k} ({v})" for k, v in POLICIES.items()))
        if token_budget < 1 or max_running < 1:
            raise DojoError(f"token_budget and max_running must be >= 1, got {token_budget} and {max_running}")
        self.pool = BlockPool(n_blocks, block_size)
        self.token_budget = token_budget
        self.max_running = 1 if policy == "sequential" else max_running
        self.policy = policy
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in the order they were admitted: the oldest first
        self.steps = 0
        self.log: list[dict] = []  # one entry per step (see `_record`)

    @property
    def capacity(self) -> int:
        """Slots in the whole pool: the most tokens one request can ever hold."""
        return self.pool.n_blocks * self.pool.block_size

    def add(self, req: Request) -> None:
        total = len(req.prompt) + req.params.max_tokens
        if not req.prompt:
            raise DojoError(f"request {req.rid}: the prompt is empty")
        if total > self.capacity:
            raise DojoError(f"request {req.rid}: prompt ({len(req.prompt)}) + max_tokens "
                            f"({req.params.max_tokens}) need {total} cache slots, and the whole pool has "
                            f"{self.capacity}; ask for fewer tokens or start with more cache blocks")
        req.status = WAITING
        self.waiting.append(req)

    def abort(self, rid: str) -> Request | None:
        """Stop a request wherever it is and give its blocks back at once (a client that went away)."""
        for queue in (self.running, self.waiting):
            for req in queue:
                if req.rid == rid:
                    queue.remove(req)
                    self._finish(req, "abort")
                    return req
        return None

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Step:
        """The next step's chunks: running requests first (oldest first), each its pending
        tokens up to the budget, preempting the newest when blocks run out; then, if nothing
        was preempted, waiting requests in arrival order while budget, seats and blocks last."""
        budget, chunks, admitted, preempted = self.token_budget, [], [], []
        if self.policy != "continuous" and not self.running:  # static: the next batch, whole
            while self.waiting and len(self.running) < self.max_running:
                admitted.append(self._admit(self.waiting.popleft()).rid)
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.pending, budget)
            if not req.blocks and not self.pool.grow(req.blocks, req.computed + n):
                i += 1  # static batching admits a whole batch at once: one that never ran waits its turn
                continue
            while not self.pool.grow(req.blocks, req.computed + n):
                victim = self.running.pop()  # the newest; never one already in this step (index < i)
                self._preempt(victim)
                preempted.append(victim.rid)
                if victim is req:
                    break
            else:
                chunks.append((req, n))
                budget -= n
                i += 1
                continue
            break  # req preempted itself: it was the last running request
        if self.policy == "continuous" and not preempted:
            while self.waiting and budget > 0 and len(self.running) < self.max_running:
                req = self.waiting[0]
                n = min(req.pending, budget)
                # the pool is the admission limit: blocks for the whole prompt must be free, not only
                # for its first chunk (else a long prompt, the newest, is preempted and restarted over
                # and over); later arrivals wait too (no overtaking)
                if self.pool.blocks_for(len(req.tokens)) > len(self.pool.free):
                    break
                self.pool.grow(req.blocks, req.computed + n)
                self._admit(self.waiting.popleft())
                admitted.append(req.rid)
                chunks.append((req, n))
                budget -= n
        step = Step(self.steps, chunks, admitted, preempted)
        self.steps += 1
        return step

    def update(self, step: Step, sampled: dict[str, int]) -> list[Request]:
        """Account for a step that ran: advance each chunk's request, append the token
        sampled for it (sampled[rid], for the chunks where `step.samples`), and finish the
        requests that hit a stop token or max_tokens. Returns those finished."""
        finished = []
        for req, n in step.chunks:
            if req.status != RUNNING:
                continue  # aborted while the step ran
            sample = step.samples(req, n)
            req.computed += n
            if not sample:
                continue
            token = sampled[req.rid]
            if token in req.params.stop_ids:
                self._finish(req, "stop")
            else:
                req.output.append(token)
                if len(req.output) >= req.params.max_tokens:
                    self._finish(req, "length")
            if req.status == FINISHED:
                self.running.remove(req)
                finished.append(req)
        self._record(step, finished)
        return finished

    # -- bookkeeping ------------------------------------------------------------------------

    def _admit(self, req: Request) -> Request:
        req.status = RUNNING
        self.running.append(req)
        return req

    def _preempt(self, req: Request) -> None:
        self.pool.release(req.blocks)
        req.computed = 0  # recompute: its prompt and output so far are fed again on return
        req.status = WAITING
        req.preemptions += 1
        self.waiting.appendleft(req)  # first in line: it was admitted before everyone waiting

    def _finish(self, req: Request, reason: str) -> None:
        self.pool.release(req.blocks)
        req.status, req.finish_reason = FINISHED, reason

    def _record(self, step: Step, finished: list[Request]) -> None:
        self.log.append({"step": step.number, "run": [(r.rid, n) for r, n in step.chunks],
                         "admitted": step.admitted, "preempted": step.preempted,
                         "finished": [r.rid for r in finished], "blocks_used": self.pool.used,
                         "waiting": len(self.waiting), "running": len(self.running)})
