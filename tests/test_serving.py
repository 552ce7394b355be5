"""Chapter 9's engine: the continuous-batching scheduler (invariants over scripted and random
traces) and the paged ragged forward (each request's output equals what it gets alone)."""

import random

import pytest
import torch

from reference_engine.errors import DojoError
from reference_engine.generate import decode_one_token, generate, prefill
from reference_engine.serve.engine import Engine
from reference_engine.serve.runner import PagedRunner
from reference_engine.serve.scheduler import RUNNING, Request, SamplingParams, Scheduler
from tiny_gguf import random_model


def req(rid, n_prompt, max_tokens=4, **kw):
    return Request(rid, list(range(1, n_prompt + 1)), SamplingParams(max_tokens=max_tokens, **kw))


def run(s: Scheduler, token=7, arrivals=None, max_steps=10_000, check=None):
    """Drive a scheduler with a fake model that always samples `token`; arrivals maps a step
    number to requests added before it. Returns the finished requests in order."""
    arrivals, done = dict(arrivals or {}), []
    while s.has_work or arrivals:
        for r in arrivals.pop(s.steps, []):
            s.add(r)
        step = s.schedule()
        if check:
            check(s, step)
        done += s.update(step, {r.rid: token for r, n in step.chunks if step.samples(r, n)})
        assert s.steps < max_steps, "the scheduler made no progress"
    return done


def invariants(s: Scheduler, step) -> None:
    """What must hold after every schedule(): the budgets, and the pool's books."""
    assert sum(n for _, n in step.chunks) <= s.token_budget
    assert len(s.running) <= s.max_running
    tables = [b for r in s.running for b in r.blocks] + [b for r in s.waiting for b in r.blocks]
    assert len(tables) == len(set(tables)), "a block is in two block tables"
    assert not set(tables) & set(s.pool.free), "a block is both free and in a table"
    assert len(tables) + len(s.pool.free) == s.pool.n_blocks, "a block was lost"
    for r, n in step.chunks:
        assert r.status == RUNNING and n >= 1
        assert len(r.blocks) * s.pool.block_size >= r.computed + n, "a chunk has no slot to write into"
    assert all(not r.blocks and r.computed == 0 for r in s.waiting), "a waiting request holds blocks"


def test_chunked_prefill_follows_the_docstring_example():
    s = Scheduler(n_blocks=8, block_size=4, token_budget=8)
    s.add(req("A", 6))
    s.add(req("B", 5))
    first = s.schedule()
    assert [(r.rid, n) for r, n in first.chunks] == [("A", 6), ("B", 2)]
    assert first.samples(*first.chunks[0]) and not first.samples(*first.chunks[1])
    s.update(first, {"A": 9})
    second = s.schedule()
    assert [(r.rid, n) for r, n in second.chunks] == [("A", 1), ("B", 3)]
    assert all(second.samples(r, n) for r, n in second.chunks)


def test_requests_join_and_leave_at_every_step():
    s = Scheduler(n_blocks=64, block_size=4, token_budget=64)
    done = run(s, arrivals={0: [req("long", 3, max_tokens=20)], 5: [req("short", 3, max_tokens=2)]},
               check=invariants)
    assert [r.rid for r in done] == ["short", "long"]
    joined = next(e for e in s.log if "short" in e["admitted"])
    assert joined["step"] == 5 and ("long", 1) in joined["run"], "a new request waited for the batch"
    assert s.log[-1]["blocks_used"] == 0 and not s.pool.used


def test_static_batching_waits_for_the_whole_batch():
    s = Scheduler(n_blocks=64, block_size=4, token_budget=64, max_running=4, policy="static")
    run(s, arrivals={0: [req("a", 3, 20), req("b", 3, 2)], 3: [req("c", 3, 2)]}, check=invariants)
    admitted = {rid: e["step"] for e in s.log for rid in e["admitted"]}
    finished = {rid: e["step"] for e in s.log for rid in e["finished"]}
    assert admitted["a"] == admitted["b"] == 0
    assert admitted["c"] > finished["a"], "static batching let a request join a running batch"


def test_sequential_runs_one_request_at_a_time():
    s = Scheduler(n_blocks=64, block_size=4, policy="sequential", max_running=8)
    run(s, arrivals={0: [req(str(i), 3, 3) for i in range(4)]}, check=invariants)
    assert max(e["running"] for e in s.log) <= 1 and all(len(e["run"]) == 1 for e in s.log)


def test_preemption_takes_the_newest_and_recomputes_it():
    # 3 blocks of 4 slots: two requests of 4 prompt tokens fit (1 block each); when both
    # need a second block, only one is free: the newest (b) gives its blocks back.
    s = Scheduler(n_blocks=3, block_size=4, token_budget=64)
    a, b = req("a", 4, max_tokens=6), req("b", 4, max_tokens=6)
    done = run(s, arrivals={0: [a, b]}, check=invariants)
    preempted = [rid for e in s.log for rid in e["preempted"]]
    assert preempted and set(preempted) == {"b"}, f"expected only the newest preempted, got {preempted}"
    assert [r.rid for r in done] == ["a", "b"] and b.preemptions >= 1
    assert a.output == b.output == [7] * 6, "a preempted request lost or repeated tokens"
    resumed = next(e for e in s.log if e["step"] > s.log[0]["step"] and ("b", 5) in e["run"])
    assert resumed, "b was not recomputed from its prompt and its output so far"


def test_a_preempted_request_returns_before_later_arrivals():
    s = Scheduler(n_blocks=3, block_size=4, token_budget=64, max_running=2)
    run(s, arrivals={0: [req("a", 4, 6), req("b", 4, 6), req("c", 4, 2)]}, check=invariants)
    back = next(e["step"] for e in s.log if any("b" in x["preempted"] for x in s.log[: e["step"]]) and "b" in e["admitted"])
    c_in = next(e["step"] for e in s.log if "c" in e["admitted"])
    assert back <= c_in, "the preempted request went to the back of the queue"


def test_the_pool_is_the_admission_limit_and_nobody_overtakes():
    s = Scheduler(n_blocks=4, block_size=4, token_budget=64)
    s.add(req("big", 12, max_tokens=2))  # 3 blocks for its prompt
    s.add(req("next", 8, max_tokens=2))  # 2 blocks: does not fit beside big
    s.add(req("tiny", 1, max_tokens=1))  # would fit, but must not overtake "next"
    step = s.schedule()
    assert [r.rid for r, _ in step.chunks] == ["big"]
    done = run(s, check=invariants)
    assert {r.rid for r in done} == {"big", "next", "tiny"}


def test_a_long_prompt_waits_until_it_fits_whole():
    # 6 blocks of 4; two requests decode; a 12-token prompt (3 blocks) arrives when only 2 are
    # free. Admitted on its first chunk it would be the newest and preempted again and again
    # (3 times here); admitted when its whole prompt fits, a and b's growth preempts it once.
    s = Scheduler(n_blocks=6, block_size=4, token_budget=4)
    done = run(s, arrivals={0: [req("a", 4, 8), req("b", 4, 8)], 2: [req("long", 12, 2)]}, check=invariants)
    assert {r.rid for r in done} == {"a", "b", "long"}
    assert sum(e["preempted"].count("long") for e in s.log) <= 1, [e for e in s.log if e["preempted"]]


def test_random_traces_keep_the_invariants_and_finish_everything():
    rng = random.Random(0)
    for trial in range(30):
        s = Scheduler(n_blocks=rng.randint(4, 12), block_size=rng.choice([2, 4]),
                      token_budget=rng.randint(1, 24), max_running=rng.randint(1, 6),
                      policy=rng.choice(["continuous", "continuous", "static"]))
        arrivals = {}
        for i in range(rng.randint(1, 10)):
            n = rng.randint(1, 6)
            max_tokens = rng.randint(1, min(8, s.capacity - n))
            arrivals.setdefault(rng.randint(0, 15), []).append(req(f"{trial}.{i}", n, max_tokens))
        expected = {r.rid: r.params.max_tokens for rs in arrivals.values() for r in rs}
        done = run(s, arrivals=arrivals, check=invariants)
        assert {r.rid: len(r.output) for r in done} == expected
        assert s.pool.used == 0


def test_abort_frees_the_blocks_at_once():
    s = Scheduler(n_blocks=8, block_size=4)
    s.add(req("x", 9, max_tokens=10))
    s.update(s.schedule(), {"x": 1})
    assert s.pool.used == 3
    assert s.abort("x").finish_reason == "abort"
    assert s.pool.used == 0 and not s.has_work and s.abort("x") is None


def test_a_request_larger_than_the_pool_is_refused_by_name():
    s = Scheduler(n_blocks=2, block_size=4)
    with pytest.raises(DojoError, match="r1.*9 cache slots.*8"):
        s.add(req("r1", 5, max_tokens=4))
    with pytest.raises(DojoError, match="unknown batching policy"):
        Scheduler(4, policy="dynamic")


# -- the engine on real weights --------------------------------------------------------------


def alone(model, prompt, max_tokens):
    return generate(model, [prompt], max_new_tokens=max_tokens).tokens[0]


@pytest.mark.parametrize("n_blocks, block_size, budget, max_running", [
    (64, 4, 256, 16),  # everything fits: plain continuous batching
    (64, 4, 3, 16),  # a budget of 3 tokens: prompts cut into chunks, decodes share steps with them
    (9, 2, 64, 16),  # a pool of 18 slots: preemption and recompute
    (64, 8, 64, 2),  # two seats
])
def test_each_request_gets_what_it_gets_alone(n_blocks, block_size, budget, max_running):
    model = random_model("tiny", seed=3)  # float64: equal tokens are not luck with rounding
    rng = random.Random(n_blocks + budget)
    prompts = {f"r{i}": [rng.randrange(model.config.vocab_size) for _ in range(rng.randint(1, 9))] for i in range(6)}
    lengths = {rid: rng.randint(1, 7) for rid in prompts}
    engine = Engine(model, n_blocks=n_blocks, block_size=block_size, token_budget=budget, max_running=max_running)
    late = {"r4", "r5"}  # arrive while the others run
    for rid in prompts:
        if rid not in late:
            engine.add(Request(rid, prompts[rid], SamplingParams(max_tokens=lengths[rid])))
    reqs = {}
    while engine.has_work or late:
        if engine.scheduler.steps == 3:
            for rid in sorted(late):
                engine.add(Request(rid, prompts[rid], SamplingParams(max_tokens=lengths[rid])))
            late = set()
        for event in engine.step():
            reqs[event.request.rid] = event.request
    for rid, p in prompts.items():
        assert reqs[rid].output == alone(model, p, lengths[rid]), f"{rid} changed in company"
    if n_blocks == 9:
        assert any(e["preempted"] for e in engine.scheduler.log), "the small pool never preempted"


@pytest.mark.parametrize("kv_dtype, stored, per_value, tolerance", [("float16", torch.float16, 2, 0.01),
                                                                    ("int8", torch.int8, 1 + 4 / 32, 0.2)])
def test_a_rounded_pool_gives_what_the_same_static_cache_gives(kv_dtype, stored, per_value, tolerance):
    """`--kv-dtype` for serving: the pool stores each key and value as the static cache of that
    dtype does (float16; int8 codes with a float32 scale per 32 values), so every request's
    greedy output equals what `generate` gives it alone with that cache, through chunked
    prompts and preemption. Its logits are those of the static cache to float64 rounding, near
    the float64 pool's, and not equal to them."""
    model = random_model("tiny", seed=3, head_dim=32)  # float64: equal tokens are not luck with rounding
    rng = random.Random(5)
    prompts = {f"r{i}": [rng.randrange(model.config.vocab_size) for _ in range(rng.randint(3, 12))] for i in range(5)}
    first = prompts["r0"]
    steps = [[(first, 0, [0, 1, 2, 3], True)], [([7], len(first), [0, 1, 2, 3], True)]]  # its prompt, one decode
    runner = PagedRunner(model, 8, 4)
    exact = [runner.forward_step(chunks)[0] for chunks in steps]
    model.set_kv_dtype(kv_dtype)
    runner = PagedRunner(model, 8, 4)
    rounded = [runner.forward_step(chunks)[0] for chunks in steps]
    model.setup_cache(1, 16)
    static = [prefill(model, torch.tensor([first]))[0], decode_one_token(model, torch.tensor([7]), len(first))[0]]
    model.clear_cache()
    for a, b, c in zip(rounded, exact, static):
        torch.testing.assert_close(a, c, rtol=1e-9, atol=1e-9)
        assert not torch.equal(a, b), "the pool really holds rounded values"
        torch.testing.assert_close(a, b, rtol=0, atol=tolerance)  # logits up to 13 here
    engine = Engine(model, n_blocks=12, block_size=2, token_budget=5)  # 24 slots for 5 x up to 24: preempts
    out = engine.generate(prompts, SamplingParams(max_tokens=12))
    for rid, p in prompts.items():
        assert out[rid] == alone(model, p, 12), f"{rid} changed in company"
    assert any(e["preempted"] for e in engine.scheduler.log), "the small pool never preempted"
    c = model.config
    assert engine.runner.pools[0].k.dtype == stored
    assert engine.runner.bytes_per_token == 2 * c.n_layers * c.n_kv_heads * c.head_dim * per_value


def test_an_int8_pool_needs_whole_blocks_of_32():
    model = random_model("tiny")  # heads of 16
    model.set_kv_dtype("int8")
    refusal = r"multiple of 32 values; this model's have 16: store a float type instead \(--kv-dtype float16"
    with pytest.raises(DojoError, match=refusal):
        Engine(model, n_blocks=4)


def test_sampling_with_a_seed_does_not_depend_on_the_company():
    model = random_model("tiny", seed=4)
    params = SamplingParams(max_tokens=6, temperature=1.0, seed=11)
    solo = Engine(model, n_blocks=32, block_size=4).generate({"x": [5, 6, 7]}, params)["x"]
    crowd = Engine(model, n_blocks=32, block_size=4).generate(
        {"a": [1, 2], "x": [5, 6, 7], "b": [9, 9, 9, 9]}, params)
    assert crowd["x"] == solo


def test_smollm_outputs_equal_alone_through_preemption(smollm):
    model, tok = smollm
    texts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, there was a", "Water boils at"]
    prompts = {f"p{i}": tok.encode(t) for i, t in enumerate(texts)}
    engine = Engine(model, n_blocks=7, block_size=8, token_budget=16)  # 56 slots for 4 x ~20: preempts
    out = engine.generate(prompts, SamplingParams(max_tokens=12))
    for rid, p in prompts.items():
        assert out[rid] == alone(model, p, 12), f"{rid}: {tok.decode(out[rid])!r}"
    assert any(e["preempted"] for e in engine.scheduler.log)
    assert any(len(e["run"]) > 1 for e in engine.scheduler.log), "never batched"
    assert engine.scheduler.pool.used == 0


def test_a_failing_forward_ends_only_the_requests_in_its_step(tiny, monkeypatch):
    engine = Engine(tiny, n_blocks=16, block_size=4, max_running=1)
    first = engine.add(Request("first", [1, 2, 3], SamplingParams(max_tokens=4)))
    queued = engine.add(Request("queued", [4, 5], SamplingParams(max_tokens=4)))
    monkeypatch.setattr(engine.runner, "forward_step", lambda chunks: 1 / 0)
    events = engine.step()
    assert [(e.request.rid, e.finished) for e in events] == [("first", True)] and first.finish_reason == "error"
    assert engine.scheduler.pool.used == 0 and queued.status == "waiting"
    monkeypatch.undo()
    assert engine.generate({}, SamplingParams()) == {} and queued.output == alone(tiny, [4, 5], 4)


def test_engine_refuses_what_could_never_run(tiny):
    engine = Engine(tiny, n_blocks=8, block_size=4)
    with pytest.raises(DojoError, match="empty"):
        engine.add(Request("e", [], SamplingParams()))
    with pytest.raises(DojoError, match="context"):
        engine.add(Request("c", [1] * tiny.config.max_seq_len, SamplingParams(max_tokens=1)))
    with pytest.raises(DojoError, match="seed"):
        engine.add(Request("s", [1], SamplingParams(temperature=1.0, seed=2**64)))
    with pytest.raises(DojoError, match="ALiBi"):
        Engine(random_model("tiny-alibi"), n_blocks=4)


def test_chapter_9_schedule_reference_is_the_engine_scheduler():
    """The grader's reference for task 9.4 decides exactly what `Scheduler.schedule` does."""
    from reference_engine.grading.chapters.ch09_batching_serving import schedule_step_ref

    rng = random.Random(7)
    for trial in range(400):
        bs, budget = rng.randint(2, 4), rng.randint(1, 24)
        running = []
        for _ in range(rng.randint(0, 4)):
            computed = rng.randint(0, 20)
            pending = 1 if computed and rng.random() < 0.7 else rng.randint(1, 20)
            running.append([computed, pending, max(-(-computed // bs), 1) + rng.randint(0, 1)])
        waiting = [rng.randint(1, 20) for _ in range(rng.randint(0, 3))]
        free, max_running = rng.randint(0 if running else 1, 6), max(len(running), 1) + rng.randint(0, 2)
        s = Scheduler(sum(r[2] for r in running) + free, bs, budget, max_running)
        reqs = []
        for i, (computed, pending, held) in enumerate(running):
            r = Request(f"r{i}", [1] * (computed + pending), SamplingParams(max_tokens=4))
            r.computed, r.status = computed, RUNNING
            r.blocks = [s.pool.free.pop() for _ in range(held)]
            s.running.append(r)
            reqs.append(r)
        for i, pending in enumerate(waiting):
            r = Request(f"w{i}", [1] * pending, SamplingParams(max_tokens=4))
            s.waiting.append(r)
            reqs.append(r)
        step = s.schedule()
        fed = {r.rid: n for r, n in step.chunks}
        engine = [-1 if r.rid in step.preempted else fed.get(r.rid, 0) for r in reqs]
        expected = schedule_step_ref(torch.tensor(running, dtype=torch.long).reshape(-1, 3),
                                     torch.tensor(waiting, dtype=torch.long), free, bs, budget, max_running)
        assert expected.tolist() == engine, (trial, running, waiting, free, bs, budget, max_running)
