"""Serving's compiled decode paths (`serve/runner.py`): the paged attention reads each
decoding request's keys and values where they lie in the pool and gives the attention of a
gathered copy, for every pool dtype it reads; the fused block over the pool gives the
modules' logits; both run only where they compute what the modules would, bad tables are
refused, not read, and `bench-serve --step` times the three paths side by side."""

import json
import random

import pytest
import torch

from reference_engine import cpu_kernels
from reference_engine.errors import DojoError
from reference_engine.serve.runner import LayerPool, PagedRunner
from test_cli import assert_clean_error, run_cli
from tiny_gguf import random_model, tiny_llama, write_gguf


@pytest.fixture(scope="module")
def kernels():
    built = cpu_kernels.kernels(build=True)  # CI's set-up has built them already
    assert built is not None, cpu_kernels.status()
    return built


def scattered_pool(dtype, rows, KV, D, seed=0) -> LayerPool:
    """A pool whose rows hold random keys and values, stored as the serving pool stores them."""
    torch.manual_seed(seed)
    pool = LayerPool(rows, KV, D, dtype, "cpu")
    pool.write(torch.arange(rows), torch.randn(rows, KV, D) * 2, torch.randn(rows, KV, D))
    return pool


def tables(lengths, rows, seed=0) -> torch.Tensor:
    """(requests, max length) pool rows: each request's slots at random rows of the pool (two
    requests may read the same row, as a shared prefix would); the padding past a length is
    -1, which the kernel must never read."""
    rng = random.Random(seed)
    out = torch.full((len(lengths), max(lengths)), -1, dtype=torch.long)
    for b, n in enumerate(lengths):
        out[b, :n] = torch.tensor(rng.sample(range(rows), n))
    return out


def gathered_attention(q, pool: LayerPool, slots, lengths) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v per request over its first lengths[b] slots, in float64 on
    the values the pool gives back: what the kernel must compute."""
    B, H, D = q.shape
    out = torch.empty(B, H, D, dtype=torch.float64)
    for b in range(B):
        k, v = (t.double() for t in pool.read(slots[b, : lengths[b]], torch.float32))  # (n, KV, D)
        group = H // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (n, H, D)
        p = torch.softmax(torch.einsum("hd,nhd->hn", q[b].double(), k) / D ** 0.5, dim=-1)
        out[b] = torch.einsum("hn,nhd->hd", p, v)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int8])
@pytest.mark.parametrize("D", [32, 64, 96])
@pytest.mark.parametrize("lengths", [[37], [1, 5, 16, 17, 40, 33]])  # one request: a query head per thread
def test_paged_attention_is_the_attention_over_each_requests_rows(kernels, dtype, D, lengths):
    """Lengths below, at and past a group of 16 slots; heads of 32, 64 (the unrolled loops)
    and 96 (a last 32 outputs); 9 query heads on 3 KV heads, as SmolLM2."""
    rows, H, KV = 120, 9, 3
    pool = scattered_pool(dtype, rows, KV, D)
    slots, n = tables(lengths, rows), torch.tensor(lengths)
    q = torch.randn(len(lengths), H, D)
    out = kernels.paged_attention(q, pool.k, pool.v, pool.k_scale, pool.v_scale, slots, n)
    torch.testing.assert_close(out.double(), gathered_attention(q, pool, slots, n), rtol=2e-5, atol=2e-5)


def test_paged_attention_refuses_a_table_outside_the_pool(kernels):
    pool = scattered_pool(torch.int8, 20, 3, 64)
    q, n = torch.randn(2, 9, 64), torch.tensor([3, 2])
    good = torch.tensor([[0, 1, 2], [5, 6, -1]])
    kernels.paged_attention(q, pool.k, pool.v, pool.k_scale, pool.v_scale, good, n)  # -1 past a length is not read
    for slots, lengths, what in [(torch.tensor([[0, 1, 20], [5, 6, 7]]), n, "slot 2 is pool row 20, outside"),
                                 (torch.tensor([[0, 1, 2], [5, -1, 7]]), n, "slot 1 is pool row -1, outside"),
                                 (good, torch.tensor([3, 4]), "request 1 has length 4"),
                                 (good, torch.tensor([0, 2]), "request 0 has length 0")]:
        with pytest.raises(RuntimeError, match=what):
            kernels.paged_attention(q, pool.k, pool.v, pool.k_scale, pool.v_scale, slots, lengths)
    with pytest.raises(RuntimeError, match="int8 pool needs float32 scales"):
        kernels.paged_attention(q, pool.k, pool.v, torch.empty(0), torch.empty(0), good, n)
    for heads in (8, 0):  # not a multiple of 3; none at all (no division by zero)
        with pytest.raises(RuntimeError, match="multiple of the pool's KV heads"):
            kernels.paged_attention(torch.randn(2, heads, 64), pool.k, pool.v, pool.k_scale, pool.v_scale, good, n)


N_BLOCKS = 16  # blocks of 8 slots in the tests' pools


def decode_steps(runner: PagedRunner, vocab: int, seed=0, step=None) -> list[torch.Tensor]:
    """The logits of six steps (each taken by `step(chunks)`, by default the runner's):
    three requests' prompts (one chunk each); four steps where each feeds one token, two of
    them into the first slot of a new block (slots 8 and 16); in the last of those, the first
    request's token is a one-token chunk of a prompt that goes on (it samples nothing); then
    a step that mixes a fourth request's prompt with two decodes (at token rows 3 and 4)."""
    step = step or runner.forward_step
    rng = random.Random(seed)
    prompts = [[rng.randrange(vocab) for _ in range(n)] for n in (6, 15, 11)]
    tabs = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]  # blocks of 8: up to 32 slots each
    logits = [step([(p, 0, t, True) for p, t in zip(prompts, tabs)])]
    for i in range(4):
        logits.append(step([([rng.randrange(vocab)], len(p) + i, t, i < 3 or j > 0)
                            for j, (p, t) in enumerate(zip(prompts, tabs))]))
    assert logits[-1].shape[0] == 2
    late = [rng.randrange(vocab) for _ in range(3)]
    logits.append(step([(late, 0, [12, 13, 14, 15], True)] + [([rng.randrange(vocab)], len(p) + 4, t, True)
                                                              for p, t in zip(prompts[1:], tabs[1:])]))
    return logits


class Spy:
    """The compiled module, counting the calls of the serving step's two kernels."""

    def __init__(self, real):
        self.real, self.calls = real, {"paged_attention": 0, "llama_block_decode_paged": 0}

    def __getattr__(self, name):
        kernel = getattr(self.real, name)
        if name not in self.calls:
            return kernel

        def counted(*args):
            self.calls[name] += 1
            return kernel(*args)
        return counted


@pytest.fixture
def spy(kernels, monkeypatch):
    counting = Spy(kernels)
    monkeypatch.setattr(cpu_kernels, "_loaded", counting)
    return counting


def pool_values(pool: LayerPool) -> list[torch.Tensor]:
    """A pool's keys and values as float32 (int8 codes times their scales)."""
    if not pool.codes:
        return [pool.k.to(torch.float32, copy=True), pool.v.to(torch.float32, copy=True)]
    return [codes * scale.repeat_interleave(32, dim=-1) for codes, scale in ((pool.k, pool.k_scale),
                                                                             (pool.v, pool.v_scale))]


def by_path(model, spy, seed=0) -> dict[str, list[torch.Tensor]]:
    """decode_steps' logits down each of the runner's decode paths, every step taken from the
    same pool: the readable path's, restored before each path runs. (Run apart, the paths'
    pools drift by float32 rounding, and once a key near a float16 or int8 rounding boundary
    lands on the neighbouring code, the logits of the steps after it move by 0.1 and more on
    a tiny model: a real difference, but not the kernels'.) Also checks what each path wrote
    into the pool (the readable path's values, but for rounding: a row written to the wrong
    place leaves a row of zeros, or other values, of size 1) and which kernels it called:
    the prompt step never a compiled one, each decode step one call per layer of its own,
    the mixed step the in-place attention."""
    n = model.config.n_layers
    expected = {"gathered": (0, 0), "in_place": (5 * n, 0), "fused": (n, 4 * n)}
    runner = PagedRunner(model, N_BLOCKS, 8)
    pool_tensors = [t for pool in runner.pools for t in (pool.k, pool.v, pool.k_scale, pool.v_scale)]
    logits = {path: [] for path in PagedRunner.DECODE_PATHS}
    calls = {path: (0, 0) for path in PagedRunner.DECODE_PATHS}

    def step(chunks):
        before, written = [t.clone() for t in pool_tensors], {}
        for path in PagedRunner.DECODE_PATHS[::-1]:  # "gathered" last: its pool goes on
            for t, saved in zip(pool_tensors, before):
                t.copy_(saved)
            counts = dict(spy.calls)
            runner.decode_path = path
            logits[path].append(runner.forward_step(chunks))
            calls[path] = tuple(c + spy.calls[k] - counts[k] for c, k in zip(calls[path], counts))
            written[path] = [v for pool in runner.pools for v in pool_values(pool)]
        for path in ("fused", "in_place"):
            gap = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()
                      for a, b in zip(written[path], written["gathered"]))
            assert gap < 0.02, f"{path} wrote other keys or values than the readable path (by {gap:.3g} of the largest)"
        return logits["gathered"][-1]

    decode_steps(runner, model.config.vocab_size, seed, step=step)
    for path, made in calls.items():
        assert made == expected[path], f"{path}: (paged_attention, llama_block_decode_paged) calls {made}"
    return logits


@pytest.mark.parametrize("kv_dtype", [None, "float16", "int8"])
@pytest.mark.parametrize("fmt", [None, "q4_1", "q8_0"])
def test_a_serving_step_reads_the_pool_in_place_and_gets_the_gathered_logits(spy, kv_dtype, fmt):
    """A tiny model (float32, or quantized with the integer kernels): the decode steps' logits
    are the readable path's down the in-place attention and the fused blocks, to float32
    rounding (sums in other orders, two layers on)."""
    model = random_model("tiny", seed=2, head_dim=32).float()
    model = model.quantize(fmt) if fmt else model
    assert model.pack_for_cpu()
    model.set_kv_dtype(kv_dtype)
    logits = by_path(model, spy)
    roundings = 0 if (fmt, kv_dtype) == (None, None) else 1  # float32 throughout: no boundary to cross
    for ours, other in [("in_place", "gathered"), ("fused", "in_place"), ("fused", "gathered")]:
        assert_equal_but_for_roundings(logits[ours][1:], logits[other][1:], f"{ours} against {other}", roundings)


def assert_equal_but_for_roundings(ours: list[torch.Tensor], readable: list[torch.Tensor], what: str, roundings: int,
                                   close=1e-4, moved=0.5):
    """Each step's logits (size 15 here) within `close`, but for at most `roundings` steps
    within `moved`. subtle: the paths sum in other orders, so a value can land on the other
    side of a rounding boundary in one of them: a key stored as float16 or int8 codes, or an
    activation quantized to int8 for the integer matmuls. That moves its step's logits by
    about 1% (measured 0.15 in 2 of 72 comparisons); a wiring mistake (a wrong row, length,
    pool or scale) moves every step that takes the path."""
    gaps = [(a - b).abs().max().item() for a, b in zip(ours, readable)]
    assert max(gaps) < moved and sum(g > close for g in gaps) <= roundings, f"{what}: largest gap per step {gaps}"


def test_a_bfloat16_pool_a_learners_attention_and_a_hook_run_as_modules(kernels, monkeypatch):
    """The compiled paths run only where they compute what the modules would: a bfloat16
    pool (no loader for it) and an attention function the model was given run the readable
    path; a hook on a module the runner calls keeps the blocks as modules."""
    monkeypatch.setattr(kernels, "paged_attention", lambda *a: pytest.fail("the kernel ran"))
    monkeypatch.setattr(kernels, "llama_block_decode_paged", lambda *a: pytest.fail("the fused block ran"))

    def packed():
        model = random_model("tiny", seed=2, head_dim=32).float()
        assert model.pack_for_cpu()
        return model

    model = packed()
    model.set_kv_dtype("bfloat16")
    decode_steps(PagedRunner(model, N_BLOCKS, 8), model.config.vocab_size)
    model, seen = packed(), []
    attend = model.layers[0].attn.attend
    model.set_attention(lambda *a: seen.append(1) or attend(*a))
    decode_steps(PagedRunner(model, N_BLOCKS, 8), model.config.vocab_size)
    assert len(seen) == (3 + 4 + 2) * model.config.n_layers, "the learner's attention ran for every chunk and step"
    model = packed()  # a hook: the attention may read in place, the blocks must run as modules
    model.layers[1].mlp.register_forward_hook(lambda module, inputs, out: seen.append(2))
    monkeypatch.undo()
    monkeypatch.setattr(kernels, "llama_block_decode_paged", lambda *a: pytest.fail("the fused block ran"))
    decode_steps(PagedRunner(model, N_BLOCKS, 8), model.config.vocab_size)
    assert seen.count(2) == 6, "the hook ran at every step"


@pytest.mark.parametrize("swap", ["rope", "norm", "norm-class"])
def test_a_rope_or_norm_function_set_in_place_keeps_the_blocks_as_modules(kernels, monkeypatch, swap):
    """A learner's RoPE or RMSNorm function, set on the modules (or, for the norm, on its
    class) after the fused plan was made, runs at every step: the plan no longer holds, and
    the blocks run as modules (the static cache's fused step too: `fused_decode.applies`)."""
    from reference_engine import fused_decode
    from reference_engine.model import RMSNorm, rms_norm

    model = random_model("tiny", seed=2, head_dim=32).float()
    assert model.pack_for_cpu()
    with torch.inference_mode():
        plan = fused_decode.plan_for(model, cache=False)
        assert plan is not None and plan.holds()
    seen = []

    def learners_norm(x, weight, eps):
        seen.append(1)
        return rms_norm(x, weight, eps)

    for layer in model.layers:
        if swap == "rope":
            layer.attn.rotate = lambda *a, rope=layer.attn.rotate: seen.append(1) or rope(*a)
        elif swap == "norm":
            layer.ffn_norm.fused = learners_norm
    if swap == "norm-class":  # both norms of every block
        monkeypatch.setattr(RMSNorm, "fused", staticmethod(learners_norm))
    with torch.inference_mode():
        assert not plan.holds() and not fused_decode.applies(model) and not fused_decode.applies(model, cache=False)
    monkeypatch.setattr(kernels, "llama_block_decode_paged", lambda *a: pytest.fail("the fused block ran"))
    decode_steps(PagedRunner(model, N_BLOCKS, 8), model.config.vocab_size)
    per_step = 2 * model.config.n_layers + 1 if swap == "norm-class" else model.config.n_layers  # (+ the final norm)
    assert len(seen) == 6 * per_step, "the learner's function ran at every step"


def test_the_fused_serving_block_refuses_inconsistent_rows(kernels):
    """Each request must write the row it then reads as its newest, and no row twice."""
    model = random_model("tiny", seed=2, head_dim=32).float()
    assert model.pack_for_cpu()
    from reference_engine import fused_decode

    with torch.inference_mode():
        block = fused_decode.plan_for(model, cache=False).blocks[0]
    attn_norm, ffn_norm, eps, wqkv, wo, w13, w2, _, _, n_heads, adjacent, _, _ = block
    pool = scattered_pool(torch.float32, 20, model.config.n_kv_heads, 32)
    x, cos = torch.randn(2, model.config.d_model), torch.randn(2, 32)
    rows, lengths = torch.tensor([[0, 1, 2], [5, 6, 7]]), torch.tensor([3, 2])
    for new, what in [([2, 7], "request 1 writes pool row 7 but its last slot is row 6"),
                      ([2, 2], "request 1 writes pool row 2 but its last slot is row 6")]:
        with pytest.raises(RuntimeError, match=what):
            kernels.llama_block_decode_paged(x, attn_norm, ffn_norm, eps, wqkv, wo, w13, w2, pool.k, pool.v,
                                             pool.k_scale, pool.v_scale, torch.tensor(new), rows, lengths, cos, cos,
                                             n_heads, adjacent)
    with pytest.raises(RuntimeError, match="requests 0 and 1 both write pool row 2"):
        kernels.llama_block_decode_paged(x, attn_norm, ffn_norm, eps, wqkv, wo, w13, w2, pool.k, pool.v, pool.k_scale,
                                         pool.v_scale, torch.tensor([2, 2]), torch.tensor([[0, 1, 2], [5, 2, 7]]),
                                         lengths, cos, cos, n_heads, adjacent)


@pytest.mark.parametrize("path", PagedRunner.DECODE_PATHS)
def test_two_tokens_writing_one_pool_row_are_refused_down_every_path(kernels, path):
    """Two requests whose tables share a block, at the same position: their new keys would go
    to one row. Every path refuses it before writing anything, with the row named."""
    model = random_model("tiny", seed=2, head_dim=32).float()
    assert model.pack_for_cpu()
    runner = PagedRunner(model, N_BLOCKS, 8)
    runner.decode_path = path
    runner.forward_step([([1, 2, 3], 0, [0], True), ([4, 5], 0, [1], True)])
    before = pool_values(runner.pools[0])
    with pytest.raises(DojoError, match="2 new tokens would write pool row 3"):
        runner.forward_step([([6], 3, [0], True), ([7], 3, [0], True)])
    with pytest.raises(DojoError, match="2 new tokens would write pool row 10"):  # a prompt chunk over a decode's row
        runner.forward_step([([6], 2, [1], True), ([8, 9, 7], 0, [1], True)])
    assert all(torch.equal(a, b) for a, b in zip(before, pool_values(runner.pools[0]))), "nothing was written"


def test_smollm2_serving_steps_read_the_pool_in_place(spy, smollm):
    """The real model: with a float32 pool, the decode steps' logits down the in-place
    attention and the fused blocks are the readable path's to float32 rounding (measured up
    to 6e-5; logits of size 10-30). An int8 pool has 35,000 new codes a step: in each step a
    few of them land on the other side of a rounding boundary in one path, which moves the
    logits by up to 0.05 (KL 5e-5 nats, the same greedy tokens); a slot read from the wrong
    row, or with the wrong scale, moves them by whole units."""
    model, _ = smollm

    def kl(p, q):
        p, q = p.log_softmax(-1), q.log_softmax(-1)
        return (p.exp() * (p - q)).sum(-1)

    try:
        for kv_dtype in (None, "int8"):
            model.set_kv_dtype(kv_dtype)
            logits = by_path(model, spy, seed=1)
            for ours, other in [("in_place", "gathered"), ("fused", "in_place")]:
                what = f"{kv_dtype} pool: {ours} against {other}"
                if kv_dtype is None:
                    assert_equal_but_for_roundings(logits[ours][1:], logits[other][1:], what, 0, close=1e-3)
                for a, b in zip(logits[ours][1:], logits[other][1:]):
                    assert (a - b).abs().max() < 0.2 and kl(b, a).max() < 1e-3, what
                    assert torch.equal(a.argmax(-1), b.argmax(-1)), what
    finally:
        model.set_kv_dtype(None)


def test_bench_serve_step_times_both_reads_side_by_side(kernels, tmp_path):
    path = tmp_path / "tiny.gguf"
    write_gguf(tiny_llama(), path, "Q8_0")
    result = run_cli("bench-serve", "--step", "--model", path, "--batch", "3", "--slots", "20", "--kv-dtype", "float16",
                     "--json")
    assert result.returncode == 0, result.stderr
    assert "3 requests at 20 slots" in result.stdout and "x faster" in result.stdout, result.stdout
    figures = json.loads(result.stdout.splitlines()[-1])
    assert figures["gathered"] > 0 and figures["in_place"] > 0 and figures["fused"] > 0, figures
    refused = run_cli("bench-serve", "--step", "--model", path, "--slots", "1")
    assert_clean_error(refused, "--slots 2 to", "got 16 and 1")


def test_bench_serve_passes_the_model_options_to_every_server(monkeypatch):
    from reference_engine.cli import main
    from reference_engine.serve import bench

    class Started(Exception):
        pass

    def servers(policies, concurrency, n_requests, max_tokens, server_args, progress):
        raise Started(server_args)

    monkeypatch.setattr(bench, "compare_batching", servers)
    with pytest.raises(Started) as started:
        main(["bench-serve", "--threads", "1", "--model", "m.gguf", "--quantize", "q4_1", "--kv-dtype", "int8"])
    assert started.value.args[0] == ["--threads", "1", "--model", "m.gguf", "--quantize", "q4_1", "--kv-dtype", "int8"]


def test_bench_serve_step_says_which_path_a_model_cannot_take(kernels):
    from reference_engine.serve.bench import format_step, time_decode_step

    model = random_model("tiny", seed=2, head_dim=32).float()  # weights not packed: no fused block
    result = time_decode_step(model, batch=2, slots=12, rounds=1)
    assert result["gathered"] > 0 and result["in_place"] > 0 and result["fused"] is None
    assert "fused_decode.applies" in result["why"]
    assert "fused blocks" in format_step(result, 2, 12, "float32", "float32").splitlines()[-1]
    model.set_kv_dtype("bfloat16")
    result = time_decode_step(model, batch=2, slots=12, rounds=1)
    assert result["in_place"] is None and result["fused"] is None
    report = format_step(result, 2, 12, "float32", "bfloat16")
    assert "not available: the compiled attention reads float32 activations and a float32, float16" in report
