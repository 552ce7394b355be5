"""Serving's compiled paged attention: each decoding request's keys and values read where
they lie in the pool (`paged_attention`) give the attention the readable runner computes on
a gathered copy, for every pool dtype it reads; bad tables are refused, not read."""

import json
import random

import pytest
import torch

from reference_engine import cpu_kernels
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
    """(requests, max length) pool rows: each request's slots scattered over the pool, rows
    shared between requests (a prefix two requests share); the padding past a length is -1,
    which the kernel must never read."""
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
    with pytest.raises(RuntimeError, match="multiple of the pool's KV heads"):
        kernels.paged_attention(torch.randn(2, 8, 64), pool.k, pool.v, pool.k_scale, pool.v_scale, good, n)


def decode_steps(runner: PagedRunner, vocab: int, seed=0) -> list[torch.Tensor]:
    """Three requests' prompts (one chunk each, one step), then four steps where all decode:
    the logits of every step."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(vocab) for _ in range(n)] for n in (5, 19, 11)]
    tabs = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]  # blocks of 8: up to 32 slots each
    logits = [runner.forward_step([(p, 0, t, True) for p, t in zip(prompts, tabs)])]
    for step in range(4):
        logits.append(runner.forward_step([([rng.randrange(vocab)], len(p) + step, t, True)
                                           for p, t in zip(prompts, tabs)]))
    return logits


@pytest.mark.parametrize("kv_dtype", [None, "float16", "int8"])
def test_a_serving_step_reads_the_pool_in_place_and_gets_the_gathered_logits(kernels, monkeypatch, kv_dtype):
    model = random_model("tiny", seed=2, head_dim=32).float()
    if kv_dtype:
        model.set_kv_dtype(kv_dtype)
    calls = []
    compiled = kernels.paged_attention
    monkeypatch.setattr(kernels, "paged_attention", lambda *a: calls.append(a[0].shape) or compiled(*a))
    in_place = decode_steps(PagedRunner(model, 12, 8), model.config.vocab_size)
    assert calls == [(3, model.config.n_heads, 32)] * 4 * model.config.n_layers, "the decode steps used the kernel"
    runner = PagedRunner(model, 12, 8)
    runner.read_in_place = False
    gathered = decode_steps(runner, model.config.vocab_size)
    assert len(calls) == 4 * model.config.n_layers, "the gathered run did not use it"
    for a, b in zip(in_place, gathered):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)  # float32 sums in other orders, 2 layers on


def test_a_bfloat16_pool_and_a_learners_attention_are_gathered(kernels, monkeypatch):
    """The kernel runs only where it computes what the modules would: a bfloat16 pool (no
    loader for it) and an attention function the model was given run the readable path."""
    monkeypatch.setattr(kernels, "paged_attention", lambda *a: pytest.fail("the kernel ran"))
    model = random_model("tiny", seed=2, head_dim=32).float()
    model.set_kv_dtype("bfloat16")
    decode_steps(PagedRunner(model, 12, 8), model.config.vocab_size)
    model = random_model("tiny", seed=2, head_dim=32).float()
    seen = []
    attend = model.layers[0].attn.attend
    model.set_attention(lambda *a: seen.append(1) or attend(*a))
    decode_steps(PagedRunner(model, 12, 8), model.config.vocab_size)
    assert len(seen) == (3 + 4) * model.config.n_layers, "the learner's attention ran for every chunk and step"


def test_smollm2_serving_steps_read_the_pool_in_place(kernels, smollm):
    """The real model, float32 and int8 pools: the logits of the first decode step with the
    pool read in place equal the gathered ones to float32 rounding (measured 6e-5 and 3e-4;
    logits of size 10-30). Later steps of the int8 pool store keys that came out of slightly
    different sums, so a value near a rounding boundary gets the neighbouring code: logits
    then move by up to 0.05 (KL 5e-5 nats, the same greedy tokens), where a slot read from
    the wrong row moves them by whole units."""
    model, _ = smollm

    def kl(p, q):
        p, q = p.log_softmax(-1), q.log_softmax(-1)
        return (p.exp() * (p - q)).sum(-1)

    try:
        for kv_dtype in (None, "int8"):
            model.set_kv_dtype(kv_dtype)
            in_place = decode_steps(PagedRunner(model, 12, 8), model.config.vocab_size, seed=1)
            runner = PagedRunner(model, 12, 8)
            runner.read_in_place = False
            gathered = decode_steps(runner, model.config.vocab_size, seed=1)
            torch.testing.assert_close(in_place[1], gathered[1], rtol=0, atol=1e-3)
            for a, b in zip(in_place[2:], gathered[2:]):
                assert (a - b).abs().max() < (1e-3 if kv_dtype is None else 0.2)
                assert kl(b, a).max() < 1e-3 and torch.equal(a.argmax(-1), b.argmax(-1))
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
    assert figures["in_place"] > 0 and figures["gathered"] > 0
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
