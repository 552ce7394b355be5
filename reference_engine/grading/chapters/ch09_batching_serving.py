"""Chapter 9: batching and serving. Five tasks: attention of one decoding token per
sequence over a paged KV pool, TTFT and TPOT from a request's timestamps, goodput against
latency targets, one step of the continuous-batching scheduler, and prefix sharing of
full cache blocks.

The references are written out here (float64 where there are floats), and the
scheduler's is held to the engine's own `serve/scheduler.py` by `tests/test_serving.py`.
Cases are built so that each convention shows: pools whose unused slots hold wild values,
grouped-query heads (repeat and repeat_interleave differ), timestamp rows padded with
later times, single-token replies and latencies exactly at the target, preemptions with
requests waiting behind, the same block content after different prefixes.
"""

from __future__ import annotations

import math

import torch

from ..tasks import Case, Check, Task, register

CHAPTER = "ch09_batching_serving"

# -- 9.1 paged decode attention ------------------------------------------------------------------


def paged_attention64(q, k_pool, v_pool, block_tables, lengths, block_size):
    """out[b, h] = softmax(q[b, h] . K_b^T / sqrt(D)) V_b over the first lengths[b] positions of
    sequence b, position p living at k_pool[block_tables[b, p // bs], p % bs]; query head h
    reads KV head h // (H / KV)."""
    B, H, D = q.shape
    group = H // k_pool.shape[2]
    out = torch.empty(B, H, D, dtype=torch.float64)
    for b in range(B):
        pos = torch.arange(int(lengths[b]))
        blocks = block_tables[b, pos // block_size]
        keys = k_pool[blocks, pos % block_size].double().repeat_interleave(group, dim=1)  # (L, H, D)
        values = v_pool[blocks, pos % block_size].double().repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,lhd->hl", q[b].double(), keys) / math.sqrt(D)
        out[b] = torch.einsum("hl,lhd->hd", scores.softmax(-1), values)
    return out


def paged_cases(g):
    def case(check, B, H, KV, D, bs, lengths, note):
        n_blocks = sum(-(-n // bs) for n in lengths) + 3  # a few blocks that belong to nobody
        k_pool = torch.randn(n_blocks, bs, KV, D, generator=g) * 8 + 20  # wild: reading a wrong slot shows
        v_pool = torch.randn(n_blocks, bs, KV, D, generator=g) * 8 - 30
        order = torch.randperm(n_blocks, generator=g)  # blocks are handed out in any order
        width = max(-(-n // bs) for n in lengths)
        tables = torch.full((B, width), -1, dtype=torch.long)
        used = 0
        for b, n in enumerate(lengths):
            held = -(-n // bs)
            tables[b, :held] = order[used : used + held]
            blocks, offsets = tables[b, torch.arange(n) // bs], torch.arange(n) % bs
            k_pool[blocks, offsets] = torch.randn(n, KV, D, generator=g)  # the real keys and values
            v_pool[blocks, offsets] = torch.randn(n, KV, D, generator=g)
            used += held
        q = torch.randn(B, H, D, generator=g)
        return Case(check, [q, k_pool, v_pool, tables, torch.tensor(lengths), bs], {}, note)

    n = int(torch.randint(9, 20, (), generator=g))
    return [
        case("values", 2, 2, 2, 8, 4, [8, 4], "2 sequences of whole blocks (8 and 4 tokens), 2 heads"),
        case("values", 3, 4, 4, 16, 4, [12, 4, 8], "3 sequences, 4 heads, D = 16"),
        case("gqa", 2, 6, 2, 8, 4, [8, 12], "6 query heads sharing 2 KV heads"),
        case("gqa", 1, 9, 3, 8, 8, [16], "SmolLM2's 9 query heads in 3 groups"),
        case("lengths", 3, 4, 2, 8, 4, [n, 1, 6], f"lengths {n}, 1 and 6: last blocks partly filled"),
        case("block_size", 2, 4, 2, 8, 5, [n, 7], f"block size 5, lengths {n} and 7"),
    ]


# -- 9.2 TTFT and TPOT ------------------------------------------------------------------------


def ttft_tpot64(sent, token_times, n_tokens):
    """[TTFT, TPOT] per request: first token - sent, and (last - first) / (n - 1), NaN for n = 1."""
    rows = torch.arange(len(n_tokens))
    first, last = token_times[:, 0].double(), token_times[rows, n_tokens - 1].double()
    n = n_tokens.double()
    tpot = torch.where(n > 1, (last - first) / (n - 1).clamp(min=1), torch.tensor(float("nan"), dtype=torch.float64))
    return torch.stack([first - sent.double(), tpot], dim=1)


def timing_cases(g):
    def case(check, counts, width, note, dtype=torch.float64):
        R = len(counts)
        sent = torch.rand(R, generator=g, dtype=torch.float64) * 10
        gaps = torch.rand(R, width, generator=g, dtype=torch.float64) * 0.1 + 0.02
        gaps[:, 0] += torch.rand(R, generator=g, dtype=torch.float64)  # the wait for the first token
        times = sent[:, None] + gaps.cumsum(1)
        for r, n in enumerate(counts):
            times[r, n:] = times[r, n - 1] + 100 + torch.rand(width - n, generator=g, dtype=torch.float64)  # a later reply
        return Case(check, [sent.to(dtype), times.to(dtype), torch.tensor(counts)], {}, note)

    k = int(torch.randint(3, 9, (), generator=g))
    return [
        case("values", [5, 5, 5], 5, "3 requests of 5 tokens each, rows full"),
        case("values", [k, k], k, f"2 requests of {k} tokens, float32", dtype=torch.float32),
        case("padding", [k, 3, 2], 10, f"{k}, 3 and 2 tokens in rows of 10 (the rest: another reply's times)"),
        case("single_token", [1, 4, 1], 6, "two one-token replies: TPOT is undefined (NaN)"),
    ]


# -- 9.3 goodput ------------------------------------------------------------------------------


def goodput64(ttft, tpot, wall_s, slo_ttft, slo_tpot):
    """Requests per second that met both targets; NaN TPOT (one token) meets its target,
    NaN TTFT (failed) meets nothing."""
    ok = (ttft.double() <= slo_ttft) & (torch.isnan(tpot) | (tpot.double() <= slo_tpot))
    return ok.sum().double() / wall_s


def goodput_cases(g):
    def case(check, R, note, single=0, failed=0, exact=0, wall=None):
        ttft = torch.rand(R, generator=g, dtype=torch.float64) * 2
        tpot = torch.rand(R, generator=g, dtype=torch.float64) * 0.3
        idx = torch.randperm(R, generator=g)
        tpot[idx[:single]] = float("nan")
        ttft[idx[single : single + failed]] = float("nan")
        ttft[idx[single + failed : single + failed + exact]] = 1.0  # exactly at the target
        tpot[idx[single + failed + exact : single + failed + 2 * exact]] = 0.125
        wall = wall or round(5 + 20 * float(torch.rand((), generator=g)), 3)
        return Case(check, [ttft, tpot, wall, 1.0, 0.125], {}, note)

    return [
        case("values", 20, "20 requests, every one with 2+ tokens"),
        case("values", 7, "7 requests, another wall time"),
        case("single_token", 12, "12 requests, 4 of them one token long (TPOT NaN)", single=4),
        case("boundary", 10, "latencies exactly at the targets (TTFT 1.0 s, TPOT 0.125 s) meet them", exact=2),
        case("failed", 10, "3 failed requests (TTFT NaN)", failed=3),
    ]


# -- 9.4 one scheduler step -------------------------------------------------------------------


def schedule_step_ref(running, waiting, free_blocks, block_size, token_budget, max_running):
    """The engine's continuous-batching step on counts (see the task's statement)."""
    def blocks_for(n):
        return -(-n // block_size)

    free, budget = int(free_blocks), int(token_budget)
    state = [[int(c), int(p), int(b)] for c, p, b in running.tolist()]  # computed, pending, blocks held
    out = [0] * (len(state) + len(waiting))
    alive = list(range(len(state)))  # running requests not preempted, oldest first
    i, preempted = 0, False
    while i < len(alive) and budget > 0:
        r = alive[i]
        computed, pending, held = state[r]
        n = min(pending, budget)
        need = blocks_for(computed + n) - held
        while need > free:
            victim = alive.pop()  # the newest
            free += state[victim][2]
            out[victim], preempted = -1, True
            if victim == r:
                break
        else:
            free -= max(need, 0)
            out[r] = n
            budget -= n
            i += 1
            continue
        break
    if not preempted:
        seats = int(max_running) - len(alive)
        for w, pending in enumerate(int(p) for p in waiting.tolist()):
            if budget <= 0 or seats <= 0 or blocks_for(pending) > free:
                break  # no overtaking: whoever is behind waits too
            n = min(pending, budget)
            free -= blocks_for(n)
            out[len(state) + w] = n
            budget -= n
            seats -= 1
    return torch.tensor(out, dtype=torch.long)


def schedule_cases(g):
    def case(check, running, waiting, free, bs, budget, seats, note):
        return Case(check, [torch.tensor(running, dtype=torch.long).reshape(-1, 3),
                            torch.tensor(waiting, dtype=torch.long), free, bs, budget, seats], {}, note)

    p = int(torch.randint(20, 40, (), generator=g))
    return [
        case("decodes", [[9, 1, 3], [5, 1, 2], [4, 1, 1]], [], 4, 4, 16, 8,
             "3 decoding requests, one needs a new block"),
        case("decodes", [[30, 1, 8], [7, 1, 2]], [6], 5, 4, 64, 8, "2 decodes, then a 6-token prompt admitted"),
        case("budget", [[8, 1, 2], [4, 1, 1]], [p, 5], 40, 4, 12, 8,
             f"a budget of 12: two decodes, then the first {10} of a {p}-token prompt; nothing for the next"),
        case("budget", [[0, p, 2]], [3], 40, 4, 8, 8, f"a running prompt of {p} tokens fed 8 at a time"),
        case("admission", [[3, 1, 1]], [p, 2], 4, 4, 10, 8,
             f"a {p}-token prompt needs more blocks than the 4 free (its first chunk would fit): it waits, "
             "and the 2-token one behind it too"),
        case("preemption", [[8, 1, 2], [8, 1, 2], [8, 1, 2]], [5], 1, 4, 64, 8,
             "3 requests each needing a new block, 1 free: the newest gives its 2 back, nobody is admitted"),
        case("preemption", [[4, 1, 1], [12, 1, 3]], [], 0, 4, 64, 8,
             "the oldest needs a block, none is free: the newest is preempted"),
        case("preemption", [[8, 1, 2], [4, 1, 1], [4, 1, 1], [4, 1, 1]], [], 0, 4, 64, 8,
             "4 running, the oldest needs a block: the newest of the other three gives its block"),
        case("preemption", [[8, 1, 2], [20, 1, 5]], [3], 0, 4, 64, 8,
             "the newest is preempted and frees 5 blocks; the waiting request is still not admitted this step"),
        case("seats", [[5, 1, 2], [5, 1, 2]], [4, 4, 4], 30, 4, 64, 3, "3 seats, 2 taken: one of the 3 waiting"),
    ]


# -- 9.5 prefix sharing ---------------------------------------------------------------------


def prefix_blocks_ref(tokens, lengths, block_size):
    """Block table per request; a full block is shared with an earlier request whose tokens
    are the same from position 0 to the end of that block; ids by first need; -1 beyond."""
    N, T = tokens.shape
    width = -(-T // block_size)
    out = torch.full((N, width), -1, dtype=torch.long)
    seen, next_id = {}, 0
    for r in range(N):
        n = int(lengths[r])
        for j in range(-(-n // block_size)):
            end = (j + 1) * block_size
            key = tuple(tokens[r, :end].tolist()) if end <= n else None  # None: a partial block, never shared
            if key is not None and key in seen:
                out[r, j] = seen[key]
                continue
            out[r, j] = next_id
            if key is not None:
                seen[key] = next_id
            next_id += 1
    return out


def prefix_cases(g):
    def prompts(rows, T):
        tokens = torch.zeros(len(rows), T, dtype=torch.long)
        for r, row in enumerate(rows):
            tokens[r, : len(row)] = torch.tensor(row)
        return tokens, torch.tensor([len(row) for row in rows])

    def case(check, rows, bs, note):
        T = max(len(r) for r in rows) + int(torch.randint(0, 3, (), generator=g))
        return Case(check, [*prompts(rows, T), bs], {}, note)

    def words(n):
        return torch.randint(5, 500, (n,), generator=g).tolist()

    system = words(8)
    a, b = words(4), words(4)
    same = words(4)
    return [
        case("values", [system + words(5), system + words(3), system + words(6)], 4,
             "3 prompts behind the same 8-token system prompt (2 blocks of 4)"),
        case("values", [words(6), words(9)], 3, "2 unrelated prompts"),
        case("chain", [a + same, b + same, a + same + words(2)], 4,
             "the same 4 tokens after different first blocks must not share"),
        case("partial", [system + a[:2], system + a[:2], system + a], 4,
             "identical prompts end in a partly filled block: never shared (each writes into its own)"),
        case("padding", [words(3), system + words(9)], 4, "a short prompt's table ends in -1"),
    ]


# -- the tasks ------------------------------------------------------------------------------

register(
    Task(
        id="9.1", chapter=CHAPTER, title="decode attention over a paged KV pool", function="paged_decode_attention",
        params=("q", "k_pool", "v_pool", "block_tables", "lengths", "block_size"), reference=paged_attention64,
        make_cases=paged_cases,
        checks={
            "values": Check(3, "position p of sequence b is k_pool[block_tables[b, p // block_size], p % block_size]; "
                               "gather its first lengths[b] positions, then softmax(q K^T / sqrt(D)) V"),
            "gqa": Check(3, "query head h reads KV head h // (H / KV): expand with repeat_interleave, not repeat"),
            "lengths": Check(2, "only the first lengths[b] positions: the rest of the last block holds stale values"),
            "block_size": Check(2, "use the block_size argument, not a constant"),
        },
        atol=1e-5, rtol=1e-5,
    ),
    Task(
        id="9.2", chapter=CHAPTER, title="TTFT and TPOT from timestamps", function="ttft_tpot",
        params=("sent", "token_times", "n_tokens"), reference=ttft_tpot64, make_cases=timing_cases,
        checks={
            "values": Check(3, "TTFT = first token's time - sent; TPOT = (last - first) / (n - 1): n - 1 gaps "
                               "follow the first token"),
            "padding": Check(3, "the last token of request r is token_times[r, n_tokens[r] - 1], not the row's last"),
            "single_token": Check(2, "with one token there is no time per output token: NaN, not 0"),
        },
        rtol=1e-6, atol=1e-6,
    ),
    Task(
        id="9.3", chapter=CHAPTER, title="goodput against latency targets", function="goodput",
        params=("ttft", "tpot", "wall_s", "slo_ttft", "slo_tpot"), reference=goodput64, make_cases=goodput_cases,
        checks={
            "values": Check(2, "count the requests with TTFT <= slo_ttft and TPOT <= slo_tpot, divide by wall_s"),
            "single_token": Check(2, "a one-token reply (TPOT NaN) meets the TPOT target; NaN <= x is False, "
                                     "so test torch.isnan explicitly"),
            "boundary": Check(1, "meeting a target means <=, not <"),
            "failed": Check(1, "a failed request (TTFT NaN) meets nothing"),
        },
    ),
    Task(
        id="9.4", chapter=CHAPTER, title="one step of continuous batching", function="schedule_step",
        params=("running", "waiting", "free_blocks", "block_size", "token_budget", "max_running"),
        reference=schedule_step_ref, make_cases=schedule_cases,
        checks={
            "decodes": Check(2, "running requests first, oldest first, each its pending tokens; take the blocks "
                                "computed + n slots need, then admit waiting requests"),
            "budget": Check(3, "each request gets min(pending, what is left of token_budget); stop when it is spent"),
            "admission": Check(3, "admit only when blocks for the whole pending prompt are free, and in order: "
                                  "when the first in line does not fit, the ones behind it wait too"),
            "preemption": Check(3, "when blocks run out, preempt the newest running request (-1; its blocks are "
                                   "freed), again if needed; admit nobody in a step that preempted"),
            "seats": Check(1, "at most max_running requests run: count the running ones that were not preempted"),
        },
    ),
    Task(
        id="9.5", chapter=CHAPTER, title="prefix sharing of cache blocks", function="prefix_blocks",
        params=("tokens", "lengths", "block_size"), reference=prefix_blocks_ref, make_cases=prefix_cases,
        checks={
            "values": Check(3, "block j of request r is shared with an earlier request whose tokens 0 .. "
                               "(j + 1) * block_size - 1 are the same; new ids 0, 1, 2, ... in order of first need"),
            "chain": Check(3, "key a block by the whole prefix up to its end (or by a hash chained over the "
                              "blocks before it), not by its own tokens: keys and values depend on every earlier token"),
            "partial": Check(2, "a block with fewer than block_size tokens is never shared: its owner writes "
                                "the next token into it"),
            "padding": Check(1, "-1 in the table past a request's last block"),
        },
    ),
)
