"""Generation: batching, stopping, sampling filters, and argument checks."""

import pytest
import torch

from reference_engine import DojoError
from reference_engine.generate import generate, sample, top_k_filter, top_p_filter


def greedy_by_recomputation(model, prompt, n):
    """The obvious, slow definition: full forward over the whole sequence every step."""
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


def test_greedy_generation_equals_recomputation(any_tiny):
    prompt = [3, 17, 42, 7]
    out = generate(any_tiny, [prompt], max_new_tokens=10)
    assert out.tokens[0] == greedy_by_recomputation(any_tiny, prompt, 10)
    assert out.finish_reasons == ["length"]


def test_batched_generation_equals_one_by_one(any_tiny):
    prompts = [[5, 9, 11, 20, 33, 4, 8], [7], [100, 101, 102], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]
    batched = generate(any_tiny, prompts, max_new_tokens=9)
    for row, prompt in enumerate(prompts):
        assert batched.tokens[row] == generate(any_tiny, [prompt], max_new_tokens=9).tokens[0], f"row {row}"


def test_each_row_stops_on_its_own(any_tiny):
    prompts = [[5, 9, 11], [7, 8], [100, 101, 102, 103]]
    free = generate(any_tiny, prompts, max_new_tokens=8)

    def stop_index(row, token):
        return free.tokens[row].index(token) if token in free.tokens[row] else None

    # a stop token that ends the rows at different steps (or not at all)
    stop = next(t for t in free.tokens[1] if len({stop_index(r, t) for r in range(3)}) > 1)
    out = generate(any_tiny, prompts, max_new_tokens=8, stop_ids=[stop])
    for row in range(3):
        i = stop_index(row, stop)
        assert out.tokens[row] == free.tokens[row][:i], f"row {row}"
        assert out.finish_reasons[row] == ("length" if i is None else "stop")


def test_streaming_callback_sees_every_token_in_order(tiny):
    seen = []
    out = generate(tiny, [[1, 2, 3], [4]], max_new_tokens=5, on_token=lambda row, t: seen.append((row, t)))
    for row in range(2):
        assert [t for r, t in seen if r == row] == out.tokens[row]


def test_generation_stops_at_the_context_limit(tiny):
    ctx = tiny.config.max_seq_len
    out = generate(tiny, [list(range(1, ctx - 3))], max_new_tokens=50)
    assert len(out.tokens[0]) == 4 and out.finish_reasons == ["length"]  # 124 + 4 = 128


def test_temperature_zero_is_greedy():
    torch.manual_seed(0)
    logits = torch.randn(8, 50)
    assert torch.equal(sample(logits, temperature=0.0, top_k=5, top_p=0.3), logits.argmax(-1))


def test_sampling_with_a_seed_is_reproducible(tiny):
    kw = dict(max_new_tokens=12, temperature=1.0, top_k=40, top_p=0.9)
    a = generate(tiny, [[1, 2, 3]], seed=7, **kw).tokens
    assert a == generate(tiny, [[1, 2, 3]], seed=7, **kw).tokens
    assert a != generate(tiny, [[1, 2, 3]], seed=8, **kw).tokens


@pytest.mark.parametrize("seed", range(5))
def test_top_k_never_samples_outside_the_k_largest(seed):
    torch.manual_seed(seed)
    logits = torch.randn(4, 100)
    allowed = logits.topk(7, dim=-1).indices
    g = torch.Generator().manual_seed(seed)
    for _ in range(200):
        tok = sample(logits, temperature=1.5, top_k=7, generator=g)
        assert (allowed == tok[:, None]).any(-1).all()


@pytest.mark.parametrize("seed", range(5))
def test_top_p_never_samples_outside_the_nucleus(seed):
    torch.manual_seed(seed)
    logits = torch.randn(3, 60) * 3
    p = 0.6
    probs = torch.softmax(logits, -1)
    nucleus = []
    for row in probs:  # smallest prefix of the sorted probabilities with mass >= p
        order = row.argsort(descending=True)
        k = int((row[order].cumsum(0) < p).sum()) + 1
        nucleus.append(set(order[:k].tolist()))
    g = torch.Generator().manual_seed(seed)
    for _ in range(200):
        tok = sample(logits, temperature=1.0, top_p=p, generator=g)
        assert all(int(t) in nucleus[r] for r, t in enumerate(tok))


def test_top_p_keeps_the_top_token_even_for_tiny_p():
    logits = torch.tensor([[0.0, 5.0, 1.0]])
    assert torch.isfinite(top_p_filter(logits, 1e-6)).tolist() == [[False, True, False]]


def test_top_k_keeps_exactly_k():
    logits = torch.tensor([[0.1, 0.5, 0.3, 0.9, 0.2]])
    assert torch.isfinite(top_k_filter(logits, 2)).tolist() == [[False, True, False, True, False]]


@pytest.mark.parametrize("kwargs,words", [
    (dict(top_p=0.0), "top-p"), (dict(top_p=1.5), "top-p"), (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("nan")), "temperature"), (dict(top_k=-1), "top-k"), (dict(max_new_tokens=0), "max_new_tokens"),
])
def test_bad_sampling_arguments_are_explained(tiny, kwargs, words):
    with pytest.raises(DojoError, match=words):
        generate(tiny, [[1, 2]], **kwargs)


def test_empty_and_too_long_prompts_are_explained(tiny):
    with pytest.raises(DojoError, match="empty prompt"):
        generate(tiny, [[]])
    with pytest.raises(DojoError, match="context is 128"):
        generate(tiny, [list(range(1, 129))])
