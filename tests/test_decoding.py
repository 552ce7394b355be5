"""Beam search, speculative decoding, the paged KV cache and the repetition penalty, each
against an implementation that recomputes everything from scratch."""

import pytest
import torch
from tiny_gguf import random_model as tiny_random_model

from reference_engine.decoding import (
    accept_or_resample, beam_search, prompt_lookup_draft, sampling_probs, speculative_generate,
)
from reference_engine.errors import DojoError
from reference_engine.generate import apply_repetition_penalty, generate
from reference_engine.kv_cache import BlockAllocator


def random_model(preset="tiny", **overrides):
    return tiny_random_model(preset, seed=3, **overrides)


def logprobs_by_recomputation(model, tokens):
    with torch.inference_mode():
        return model(torch.tensor([tokens]))[0, -1].double().log_softmax(-1)


def beam_search_by_recomputation(model, prompt, width, steps, alpha, stop):
    """The same search, every beam recomputed from scratch at every step (no cache)."""
    beams, finished = [([], 0.0)], []
    for step in range(steps):
        candidates = []
        for tokens, lp in beams:
            logprobs = logprobs_by_recomputation(model, prompt + tokens)
            candidates += [(lp + logprobs[t].item(), tokens, t) for t in range(len(logprobs))]
        candidates.sort(key=lambda c: -c[0])
        beams = []
        for value, tokens, t in candidates[: 2 * width]:
            if t in stop:
                finished.append((tokens, value / (len(tokens) + 1) ** alpha))
            else:
                beams.append((tokens + [t], value))
            if len(beams) == width:
                break
        if len(finished) >= width:
            break
    if len(finished) < width:
        finished += [(tokens, lp / len(tokens) ** alpha) for tokens, lp in beams]
    return sorted(finished, key=lambda f: -f[1])[:width]


def test_beam_width_one_is_greedy():
    model = random_model()
    prompt = [5, 17, 42]
    assert beam_search(model, prompt, beam_width=1, max_new_tokens=8)[0].tokens == \
        generate(model, [prompt], max_new_tokens=8).tokens[0]


@pytest.mark.parametrize("kv_cache", ["static", "paged"])
def test_beam_search_equals_recomputation(kv_cache):
    model = random_model(kv_cache=kv_cache, kv_block_size=4)
    prompt, stop = [7, 3, 99, 12], {11, 250}
    ours = beam_search(model, prompt, beam_width=3, max_new_tokens=6, length_penalty=0.7, stop_ids=stop)
    theirs = beam_search_by_recomputation(model, prompt, 3, 6, 0.7, stop)
    assert [h.tokens for h in ours] == [t for t, _ in theirs]
    assert [h.score for h in ours] == pytest.approx([s for _, s in theirs], rel=1e-9)


def test_beam_scores_are_length_normalised_log_probabilities():
    model = random_model()
    prompt = [1, 2, 3]
    for hyp in beam_search(model, prompt, beam_width=4, max_new_tokens=5, length_penalty=1.0):
        total = sum(logprobs_by_recomputation(model, prompt + hyp.tokens[:i])[t].item() for i, t in enumerate(hyp.tokens))
        assert hyp.logprob == pytest.approx(total, rel=1e-9)
        assert hyp.score == pytest.approx(total / len(hyp.tokens), rel=1e-9)


# -- paged KV cache -------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["tiny", "tiny-mha", "tiny-alibi"])
def test_paged_cache_generates_what_the_static_cache_does(preset):
    static = random_model(preset)
    paged = random_model(preset, kv_cache="paged", kv_block_size=3)
    prompts = [[4, 8, 15, 16, 23, 42, 7], [1, 2], [9, 9, 9, 9]]
    assert generate(paged, prompts, max_new_tokens=9).tokens == generate(static, prompts, max_new_tokens=9).tokens


def test_paged_cache_holds_blocks_for_the_tokens_written_only():
    model = random_model(kv_cache="paged", kv_block_size=4)
    model.setup_cache(2, 64)
    allocator = model.layers[0].attn.kv_cache.allocator
    with torch.inference_mode():
        model(torch.randint(0, 300, (2, 6)))  # 6 slots -> 2 blocks of 4 per sequence
    assert allocator.blocks_in_use == 4 and all(len(t) == 2 for t in allocator.tables)
    model.clear_cache()


def test_block_allocator_grows_releases_and_reports_a_full_pool():
    alloc = BlockAllocator(n_blocks=5, block_size=4, n_sequences=2)
    alloc.ensure(0, 6)
    alloc.ensure(1, 1)
    assert alloc.tables == [[0, 1], [2]] and alloc.blocks_in_use == 3
    block, offset = alloc.locate(0, torch.tensor([0, 5]))
    assert block.tolist() == [0, 1] and offset.tolist() == [0, 1]
    alloc.release(0)
    assert alloc.blocks_in_use == 1 and len(alloc.free) == 4
    alloc.ensure(1, 16)  # 4 blocks: the one it has and three more
    with pytest.raises(DojoError, match="paged KV cache is full"):
        alloc.ensure(0, 9)



class ListCache:
    """A KV cache written the simplest way (a list of chunks, concatenated on every read):
    a stand-in for a learner's class, which the engine must accept."""

    def __init__(self, batch_size, n_kv_heads, max_seq_len, head_dim):
        self.k, self.v = [], []

    def update(self, start, k, v):
        self.k.append(k)
        self.v.append(v)
        return torch.cat(self.k, dim=2), torch.cat(self.v, dim=2)


class LastFreedLast(BlockAllocator):
    """A different free-list policy (hand out the highest free id): the engine must not
    depend on which blocks it gets, only on locate."""

    def __init__(self, n_blocks, block_size, n_sequences):
        super().__init__(n_blocks, block_size, n_sequences)
        self.free.sort()
        self.tables = [[] for _ in range(n_sequences)]


def test_the_engine_decodes_with_a_cache_class_it_is_given():
    model = random_model()
    prompts = [[4, 8, 15, 16, 23, 42, 7], [1, 2]]
    expected = generate(model, prompts, max_new_tokens=9).tokens
    model.set_kv_cache(ListCache)
    assert generate(model, prompts, max_new_tokens=9).tokens == expected
    assert isinstance(model.layers[0].attn.kv_cache, type(None))  # cleared after generating
    model.setup_cache(2, 32)
    assert isinstance(model.layers[0].attn.kv_cache, ListCache)
    with pytest.raises(DojoError, match="no reorder"):
        model.reorder_cache(torch.tensor([1, 0]))
    model.set_kv_cache("paged", allocator=LastFreedLast)
    model.config = model.config.__class__(**{**model.config.__dict__, "kv_block_size": 3})
    assert generate(model, prompts, max_new_tokens=9).tokens == expected
    model.setup_cache(2, 32)
    assert isinstance(model.layers[0].attn.kv_cache.allocator, LastFreedLast)
    model.set_kv_cache("static")
    model.setup_cache(2, 32)
    assert type(model.layers[0].attn.kv_cache).__name__ == "KVCache"


@pytest.mark.parametrize("bad", ["dynamic", 3, None])
def test_set_kv_cache_names_what_it_accepts(bad):
    with pytest.raises(DojoError, match="set_kv_cache"):
        random_model().set_kv_cache(bad)

# -- speculative decoding -------------------------------------------------------------------


def test_accept_or_resample_keeps_the_target_distribution():
    """Whatever the draft distribution, the first token out is distributed as p."""
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.5, 0.2, 0.2, 0.1, 0.0], [0.1, 0.1, 0.1, 0.1, 0.6]], dtype=torch.float64)
    q = torch.tensor([[0.1, 0.1, 0.1, 0.2, 0.5]], dtype=torch.float64)
    n = 20000
    counts = torch.zeros(5)
    accepted = 0
    for _ in range(n):
        x = int(torch.multinomial(q[0], 1, generator=g))
        n_ok, nxt = accept_or_resample(p, q, [x], g)
        counts[x if n_ok == 1 else nxt] += 1
        accepted += n_ok
    assert (counts / n - p[0].float()).abs().max() < 0.015
    assert accepted / n == pytest.approx(float(torch.minimum(p[0], q[0]).sum()), abs=0.015)  # sum min(p, q)


@pytest.mark.parametrize("draft", ["layers", "lookup"])
def test_greedy_speculative_decoding_equals_greedy_decoding(draft):
    model = random_model(n_layers=4)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6, 3, 1, 4]
    expected = generate(model, [prompt], max_new_tokens=20).tokens[0]
    result = speculative_generate(model, prompt, max_new_tokens=20, k=3, draft=draft, draft_layers=2)
    assert result.tokens == expected
    assert result.target_forwards <= 20 and sum(result.history) >= 20


def test_sampled_speculative_decoding_matches_plain_sampling_in_distribution():
    """First two tokens of many sampled runs: speculative vs plain sampling, same model."""
    model = random_model(vocab_size=6, n_layers=3)
    prompt = [1, 2, 3]
    n = 600
    plain = torch.zeros(6, 6)
    spec = torch.zeros(6, 6)
    for seed in range(n):
        a = generate(model, [prompt], max_new_tokens=2, temperature=1.0, seed=seed).tokens[0]
        b = speculative_generate(model, prompt, max_new_tokens=2, k=2, draft_layers=1, temperature=1.0,
                                 seed=10_000 + seed).tokens
        plain[a[0], a[1]] += 1
        spec[b[0], b[1]] += 1
    assert (plain / n - spec / n).abs().sum() < 0.25  # total variation of two 600-sample estimates


def test_prompt_lookup_example():
    assert prompt_lookup_draft([5, 6, 7, 1, 5, 6], k=2, ngram=2) == [7, 1]
    assert prompt_lookup_draft([1, 2, 3], k=2, ngram=2) == []


def test_sampling_probs_is_one_hot_for_greedy():
    logits = torch.tensor([[0.1, 2.0, -1.0]])
    assert sampling_probs(logits, 0.0).tolist() == [[0.0, 1.0, 0.0]]
    assert sampling_probs(logits, 1.0).sum().item() == pytest.approx(1.0)


# -- repetition penalty ---------------------------------------------------------------------


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    seen = torch.tensor([[True, True, False, False]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -4.0, 1.0, 0.5]]


def test_repetition_penalty_reduces_repeats():
    model = random_model()
    prompt = [10, 11, 12]
    plain = generate(model, [prompt], max_new_tokens=40).tokens[0]
    penalised = generate(model, [prompt], max_new_tokens=40, repetition_penalty=1.5).tokens[0]
    assert len(set(penalised)) > len(set(plain))
    with pytest.raises(DojoError, match="repetition_penalty"):
        generate(model, [prompt], max_new_tokens=4, repetition_penalty=0.0)
