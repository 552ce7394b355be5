"""Chapter 8: parallel inference on torch.distributed. Six tasks: a row-parallel linear
layer, a tensor-parallel SwiGLU MLP, tensor-parallel grouped-query attention split by KV
group, a data-parallel forward with an ordered merge, the GPipe schedule, and a ring
all-reduce from sends and receives.

The five distributed tasks run the learner's function on 3 gloo ranks at once, forked in
the sandboxed child (each rank under the child's limits, the whole group killed at the
deadline); `ch08_harness.py` records the collectives and multiply-adds of every call. The
parent judges every rank's output against a float64 reference, then what each rank did:
how many all-reduces, how many messages and bytes, and whether it did only its share of
the work (a rank that computes everything and throws most away is not parallel).
Shares are contiguous and the first ranks take one more when a size does not divide:
torch.tensor_split's rule, the engine's too (`parallel.tensor.shares`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ...parallel.pipeline import gpipe_schedule as engine_schedule
from ...parallel.tensor import kv_group_split, shares
from ..tasks import Case, Check, Task, register

CHAPTER = "ch08_parallel_inference"
WORLD = 3
STATS = ("all_reduce", "all_gather", "other_collectives", "messages_sent", "messages_received", "bytes_sent",
         "flops")  # the harness's order (`ch08_harness.STATS`)
HARNESS = """
    from reference_engine.grading.chapters.ch08_harness import join, wrap_task

    join(RANK, WORLD_SIZE, STORE)

    def wrap(fn):
        return wrap_task(fn, RANK, WORLD_SIZE, "{inputs}")
"""


def stat(out, rank: int, name: str) -> float:
    return float(out[rank][1][STATS.index(name)])


def values_problem(out, expected: list[torch.Tensor], rtol: float = 1e-5, atol: float = 1e-5) -> str | None:
    """None when rank r returned expected[r] (a tensor, and its stats)."""
    for rank, (got, want) in enumerate(zip(out, expected)):
        if not (isinstance(got, list) and len(got) == 2 and isinstance(got[0], torch.Tensor)):
            return f"rank {rank} returned {got if isinstance(got, str) else type(got).__name__}, not a tensor"
        y, stats = got
        if not (isinstance(stats, torch.Tensor) and stats.shape == (len(STATS),)):
            return f"rank {rank}: the harness's record of what it did is missing"
        if y.shape != want.shape:
            return f"rank {rank} returned shape {tuple(y.shape)}, expected {tuple(want.shape)}"
        if not torch.allclose(y.double(), want, rtol=rtol, atol=atol):
            i = int(((y.double() - want).abs() - atol - rtol * want.abs()).flatten().argmax())
            return (f"rank {rank}: wrong values, at flat index {i} got {y.flatten()[i].item():.6g}, expected "
                    f"{want.flatten()[i].item():.6g}")
    return None


def judged(reference, *extra):
    """A case judge: every rank's output equals reference(*args) (the same on every rank),
    then each extra(out, *args) -> problem or None."""
    def judge(out, *args):
        ref = reference(*[a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args])
        problem = values_problem(out, [ref] * len(out))
        for check in extra:
            problem = problem or check(out, *args)
        return problem
    return judge


def collectives(all_reduce: int, gathers: int = 0):
    """Exactly this many all-reduces (and gathers), and no other collective or message."""
    def check(out, *args):
        for rank in range(len(out)):
            got = {k: stat(out, rank, k) for k in ("all_reduce", "all_gather", "other_collectives", "messages_sent")}
            want = {"all_reduce": all_reduce, "all_gather": gathers, "other_collectives": 0, "messages_sent": 0}
            if got != want:
                return (f"rank {rank} called {', '.join(f'{int(v)} {k}' for k, v in got.items())}; expected "
                        f"{', '.join(f'{v} {k}' for k, v in want.items())}")
        return None
    return check


def share_of_work(flops_for_rank):
    """Each rank's multiply-adds (counted by PyTorch's FlopCounterMode) at most its share."""
    def check(out, *args):
        for rank in range(len(out)):
            allowed, done = flops_for_rank(rank, len(out), *args), stat(out, rank, "flops")
            if done > allowed * 1.02 + 64:
                return (f"rank {rank} did {done:.0f} flops of matrix products where its share is {allowed:.0f}: "
                        "it computes more than its part")
        return None
    return check


def dist_task(inputs: str, **fields) -> Task:
    """A task run on WORLD ranks; `inputs`: what each rank is given (`ch08_harness.INPUTS`)."""
    defaults = dict(chapter=CHAPTER, harness_source=HARNESS.format(inputs=inputs), common_checks=(),
                    seeds=(0, 1), hidden_seeds=(101,), world_size=WORLD, memory_mb=4096)
    return Task(**{**defaults, **fields})


# -- 8.1 row-parallel linear ------------------------------------------------------------------------------


def row_linear64(x, weight, bias):
    return x @ weight.T + bias


def row_linear_flops(rank, world, x, weight, bias):
    return 2 * x.shape[0] * len(shares(weight.shape[1], world)[rank]) * weight.shape[0]


def row_linear_cases(g):
    def args(n, n_in, n_out):
        return [torch.randn(n, n_in, generator=g), torch.randn(n_out, n_in, generator=g), torch.randn(n_out, generator=g)]

    exact = judged(row_linear64, collectives(1))
    return [
        Case("values", args(5, 12, 7), {}, "x (5, 12), W (7, 12): 4 input features per rank", judge=exact),
        Case("values", args(1, 24, 9), {}, "one row, 24 input features", judge=exact),
        Case("uneven", args(4, 10, 6), {}, "10 input features on 3 ranks: 4, 3, 3", judge=exact),
        Case("uneven", args(3, 2, 5), {}, "2 input features on 3 ranks: rank 2 has none", judge=exact),
        Case("one_all_reduce", args(6, 9, 4), {}, "x (6, 9), W (4, 9)", judge=exact),
        Case("split", args(8, 30, 20), {}, "x (8, 30), W (20, 30)",
             judge=judged(row_linear64, share_of_work(row_linear_flops))),
    ]


register(dist_task(
    "row_linear", id="8.1", title="row-parallel linear", function="row_parallel_linear", params=("x", "weight", "bias"),
    reference=row_linear64, make_cases=row_linear_cases,
    checks={
        "values": Check(3, "rank r multiplies its slice of the input features, x[:, cols] @ weight[:, cols].T "
                           "(cols: its share), then dist.all_reduce adds the partial products; add the bias "
                           "once, after the sum (added on every rank before it, it counts 3 times)"),
        "uneven": Check(2, "shares of a size that does not divide: torch.tensor_split(torch.arange(n), world) "
                           "gives 4, 3, 3 for 10; a rank with no features still joins the all-reduce with zeros"),
        "one_all_reduce": Check(2, "one dist.all_reduce per call, nothing else: no gathers, no sends"),
        "split": Check(2, "each rank multiplies only its own columns of the weight; a rank that computes the "
                          "whole product and scales it does p times the work"),
    }))


# -- 8.2 tensor-parallel SwiGLU MLP ----------------------------------------------------------------------------


def mlp64(x, w_gate, w_up, w_down):
    return (F.silu(x @ w_gate.T) * (x @ w_up.T)) @ w_down.T


def mlp_flops(rank, world, x, w_gate, w_up, w_down):
    n, d, f = x.shape[0], x.shape[1], len(shares(w_gate.shape[0], world)[rank])
    return 2 * n * d * f * 2 + 2 * n * f * w_down.shape[0]


def mlp_cases(g):
    def args(n, d, ffn):
        return [torch.randn(n, d, generator=g), torch.randn(ffn, d, generator=g) / math.sqrt(d),
                torch.randn(ffn, d, generator=g) / math.sqrt(d), torch.randn(d, ffn, generator=g) / math.sqrt(ffn)]

    exact = judged(mlp64, collectives(1))
    return [
        Case("values", args(5, 8, 24), {}, "x (5, 8), FFN width 24: 8 per rank", judge=exact),
        Case("values", args(1, 16, 12), {}, "one token, FFN width 12", judge=exact),
        Case("uneven", args(3, 8, 10), {}, "FFN width 10 on 3 ranks: 4, 3, 3", judge=exact),
        Case("one_all_reduce", args(4, 6, 9), {}, "x (4, 6), FFN width 9", judge=exact),
        Case("split", args(6, 16, 48), {}, "x (6, 16), FFN width 48", judge=judged(mlp64, share_of_work(mlp_flops))),
    ]


register(dist_task(
    "mlp", id="8.2", title="tensor-parallel SwiGLU MLP", function="tp_mlp", params=("x", "w_gate", "w_up", "w_down"),
    reference=mlp64, make_cases=mlp_cases,
    checks={
        "values": Check(3, "split the FFN width: rank r keeps rows `mine` of w_gate and w_up (column parallel: "
                           "no communication), computes silu(x @ w_gate[mine].T) * (x @ w_up[mine].T) locally, "
                           "multiplies by w_down[:, mine] (row parallel), then one all-reduce"),
        "uneven": Check(2, "an FFN width that does not divide: the shares of torch.tensor_split"),
        "one_all_reduce": Check(2, "one all-reduce, after the down projection: SiLU is not linear, so the gate "
                                   "must be whole on its rank before it (column split), and partial sums are "
                                   "added only once, at the end"),
        "split": Check(2, "each rank multiplies only its share of the FFN width"),
    }))


# -- 8.3 tensor-parallel grouped-query attention ---------------------------------------------------------------


def attention64(x, wq, wk, wv, wo, n_heads, n_kv_heads):
    T, d = x.shape
    D = wq.shape[0] // n_heads
    q = (x @ wq.T).view(T, n_heads, D).transpose(0, 1)  # (H, T, D)
    k = (x @ wk.T).view(T, n_kv_heads, D).transpose(0, 1).repeat_interleave(n_heads // n_kv_heads, 0)
    v = (x @ wv.T).view(T, n_kv_heads, D).transpose(0, 1).repeat_interleave(n_heads // n_kv_heads, 0)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(D)
    scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    y = torch.softmax(scores, -1) @ v  # (H, T, D)
    return y.transpose(0, 1).reshape(T, n_heads * D) @ wo.T


def attention_flops(rank, world, x, wq, wk, wv, wo, n_heads, n_kv_heads):
    T, d = x.shape
    D = wq.shape[0] // n_heads
    heads, kv = kv_group_split(n_heads, n_kv_heads, world)[rank]
    h, k = len(heads), len(kv)
    return 2 * T * d * D * (h + 2 * k) + 2 * 2 * T * T * D * h + 2 * T * h * D * d


def attention_cases(g):
    def args(T, d, H, KV, D=4):
        s = 1 / math.sqrt(d)
        return [torch.randn(T, d, generator=g), torch.randn(H * D, d, generator=g) * s,
                torch.randn(KV * D, d, generator=g) * s, torch.randn(KV * D, d, generator=g) * s,
                torch.randn(d, H * D, generator=g) / math.sqrt(H * D), H, KV]

    exact = judged(attention64, collectives(1))
    return [
        Case("values", args(5, 12, 6, 3), {}, "6 query heads in 3 KV groups: one group per rank", judge=exact),
        Case("values", args(1, 8, 9, 3), {}, "one token (a decoding step), 9 heads in 3 groups", judge=exact),
        Case("kv_groups", args(4, 12, 8, 4), {}, "8 heads in 4 KV groups on 3 ranks: 2, 1, 1 groups", judge=exact),
        Case("kv_groups", args(3, 8, 10, 5), {}, "10 heads in 5 KV groups: 2, 2, 1 groups", judge=exact),
        Case("kv_groups", args(4, 8, 4, 4), {}, "multi-head (4 KV heads for 4 query heads): 2, 1, 1", judge=exact),
        Case("one_all_reduce", args(3, 8, 6, 3), {}, "6 heads, 3 groups", judge=exact),
        Case("split", args(6, 16, 12, 3, 8), {}, "12 heads in 3 groups, T = 6",
             judge=judged(attention64, share_of_work(attention_flops))),
    ]


register(dist_task(
    "attention", id="8.3", title="tensor-parallel attention by KV group", function="tp_attention",
    params=("x", "wq", "wk", "wv", "wo", "n_heads", "n_kv_heads"),
    reference=attention64, make_cases=attention_cases,
    checks={
        "values": Check(3, "rank r takes its KV heads (its share of range(n_kv_heads)) and the query heads of "
                           "those groups (group = n_heads // n_kv_heads consecutive heads each), the matching "
                           "rows of wq, wk, wv and columns of wo; causal attention on its heads; one all-reduce"),
        "kv_groups": Check(3, "split KV heads, not query heads: a query head needs its own K and V on its rank; "
                              "shares of KV heads as torch.tensor_split gives them (2, 1, 1 for 4 on 3 ranks)"),
        "one_all_reduce": Check(2, "one all-reduce, after the output projection (row parallel)"),
        "split": Check(2, "each rank projects and attends only with its own heads"),
    }))


# -- 8.4 data parallel with an ordered merge --------------------------------------------------------------------


def dp64(x, weight):
    return torch.softmax(x @ weight, dim=-1)


def dp_flops(rank, world, x, weight):
    return 2 * len(shares(x.shape[0], world)[rank]) * x.shape[1] * weight.shape[1]


def dp_cases(g):
    def args(n, d, out):
        return [torch.randn(n, d, generator=g), torch.randn(d, out, generator=g)]

    exact = judged(dp64)
    return [
        Case("values", args(9, 8, 5), {}, "9 rows on 3 ranks: 3 each", judge=exact),
        Case("values", args(6, 4, 7), {}, "6 rows", judge=exact),
        Case("uneven", args(7, 8, 5), {}, "7 rows on 3 ranks: 3, 2, 2", judge=exact),
        Case("uneven", args(2, 6, 3), {}, "2 rows on 3 ranks: rank 2 has none", judge=exact),
        Case("split", args(12, 16, 32), {}, "12 rows", judge=judged(dp64, share_of_work(dp_flops))),
    ]


register(dist_task(
    "rows", id="8.4", title="data parallel with an ordered merge", function="data_parallel_forward", params=("x", "weight"),
    reference=dp64, make_cases=dp_cases,
    checks={
        "values": Check(3, "rank r computes softmax(x[rows] @ weight) for its contiguous rows only, then every "
                           "rank gathers all the parts (dist.all_gather) and concatenates them in rank order, "
                           "which is row order"),
        "uneven": Check(3, "dist.all_gather needs the same shape on every rank: pad each part to the largest "
                           "share, gather, then cut each part back to its own number of rows"),
        "split": Check(2, "each rank computes only its own rows"),
    }))


# -- 8.5 the GPipe schedule ---------------------------------------------------------------------------------------


def schedule64(n_stages, n_micro):
    table = engine_schedule(n_stages, n_micro)
    return torch.tensor([[-1 if j is None else j for j in row] for row in table], dtype=torch.long)


def schedule_cases(g):
    p, m = int(torch.randint(2, 6, (1,), generator=g)), int(torch.randint(2, 9, (1,), generator=g))
    return [
        Case("values", [2, 3], {}, "2 stages, 3 micro-batches"),
        Case("values", [p, m], {}, f"{p} stages, {m} micro-batches"),
        Case("values", [4, 8], {}, "4 stages, 8 micro-batches"),
        Case("edges", [1, 4], {}, "1 stage: no bubble"),
        Case("edges", [3, 1], {}, "1 micro-batch: the pipe is never full"),
        Case("edges", [5, 2], {}, "more stages than micro-batches"),
    ]


register(Task(
    id="8.5", chapter=CHAPTER, title="the GPipe schedule", function="gpipe_schedule", params=("n_stages", "n_micro"),
    reference=schedule64, make_cases=schedule_cases, common_checks=("output_type",),
    output_dtypes=(torch.long,), seeds=(0, 1), hidden_seeds=(101,), rtol=0, atol=0,
    checks={
        "values": Check(3, "n_micro + n_stages - 1 steps; stage s runs micro-batch t - s at step t when "
                           "0 <= t - s < n_micro (it waits s steps for the first activations), -1 otherwise"),
        "edges": Check(2, "one stage runs every step; one micro-batch moves down one stage per step"),
    }))


# -- 8.6 ring all-reduce from sends and receives ---------------------------------------------------------------------


def ring64(stacked):
    return stacked.sum(0)


def ring_messages(out, stacked):
    world = len(out)
    for rank in range(world):
        sent, received = stat(out, rank, "messages_sent"), stat(out, rank, "messages_received")
        others = stat(out, rank, "all_reduce") + stat(out, rank, "all_gather") + stat(out, rank, "other_collectives")
        if others:
            return f"rank {rank} called {int(others)} collectives; build the sum from dist.send/recv (or isend/irecv)"
        if (sent, received) != (2 * (world - 1), 2 * (world - 1)):
            return (f"rank {rank} sent {int(sent)} and received {int(received)} messages; a ring of {world} needs "
                    f"2 (p - 1) = {2 * (world - 1)} of each (p - 1 to reduce-scatter, p - 1 to all-gather)")
    return None


def ring_bytes(out, stacked):
    world, n = len(out), stacked[0].numel()
    largest = -(-n // world) * stacked.element_size()
    for rank in range(world):
        sent = stat(out, rank, "bytes_sent")
        if sent > 2 * (world - 1) * largest:
            return (f"rank {rank} sent {int(sent)} bytes; a ring sends one chunk (1/p of the tensor, at most "
                    f"{largest} bytes here) per message, {2 * (world - 1) * largest} in all")
    return None


def ring_cases(g):
    def stacked(*shape):
        return torch.randn(WORLD, *shape, generator=g)

    exact = judged(ring64)
    return [
        Case("values", [stacked(12)], {}, "12 values per rank: chunks of 4", judge=exact),
        Case("values", [stacked(4, 6)], {}, "a (4, 6) tensor on every rank", judge=exact),
        Case("uneven", [stacked(10)], {}, "10 values: chunks of 4, 3, 3", judge=exact),
        Case("uneven", [stacked(2)], {}, "2 values on 3 ranks: one chunk is empty", judge=exact),
        Case("messages", [stacked(9)], {}, "9 values", judge=judged(ring64, ring_messages)),
        Case("bytes", [stacked(300)], {}, "300 values", judge=judged(ring64, ring_bytes)),
    ]


register(dist_task(
    "own_row", id="8.6", title="ring all-reduce", function="ring_all_reduce", params=("x",),
    reference=ring64, make_cases=ring_cases,
    checks={
        "values": Check(3, "reduce-scatter then all-gather around the ring: send to (rank + 1) % p, receive "
                           "from (rank - 1) % p; in reduce-scatter step s send chunk (rank - s) % p and add what "
                           "arrives to chunk (rank - s - 1) % p; then pass the finished chunks on"),
        "uneven": Check(2, "chunks of a size that does not divide (torch.tensor_split), empty ones included; "
                           "return the sum with x's shape"),
        "messages": Check(2, "2 (p - 1) sends and receives per rank, no collective"),
        "bytes": Check(2, "send chunks (1/p of x), never the whole tensor"),
    }))
