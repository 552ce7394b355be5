"""Chapter 1: attention. Five tasks, from the softmax to the learner's attention running
SmolLM2.

Every reference here is float64 and built from `reference_engine.attention`, in the
trusted process only. Shapes differ on every axis (q_len != kv_len, head_dim != heads),
masks include rows that see nothing, and grouped-query cases would expose K/V heads
repeated in the wrong order.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from ...attention import causal_mask, multi_head_attention, padding_mask, repeat_kv, sdpa_math
from ..tasks import Case, Check, Memory, Speed, Task, register

SOFTMAX_OPS = {
    "aten::softmax": "torch.softmax / F.softmax / Tensor.softmax",
    "aten::_softmax": "torch.softmax / F.softmax / Tensor.softmax",
    "aten::_safe_softmax": "a built-in softmax",
    "aten::log_softmax": "torch.log_softmax",
    "aten::_log_softmax": "torch.log_softmax",
}
ATTENTION_OPS = {
    "aten::scaled_dot_product_attention": "F.scaled_dot_product_attention",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "F.scaled_dot_product_attention",
    "aten::_scaled_dot_product_attention_math": "F.scaled_dot_product_attention",
    "aten::_scaled_dot_product_efficient_attention": "F.scaled_dot_product_attention",
    "aten::_native_multi_head_attention": "nn.MultiheadAttention",
}


def randn(g, *shape, scale=1.0):
    return torch.randn(*shape, generator=g) * scale


# -- 1.1 stable softmax -------------------------------------------------------------------


def softmax64(x, dim=-1):
    """softmax(x)_i = exp(x_i - max x) / sum_j exp(x_j - max x), in float64."""
    x = x.double()
    e = (x - x.amax(dim, keepdim=True)).exp()
    return e / e.sum(dim, keepdim=True)


def softmax_cases(g):
    return [
        Case("values", [randn(g, 3, 5, 7)], {"dim": -1}, "shape (3, 5, 7), dim=-1"),
        Case("values", [randn(g, 4, 9)], {}, "shape (4, 9), default dim"),
        Case("other_axes", [randn(g, 3, 5, 7)], {"dim": 0}, "shape (3, 5, 7), dim=0"),
        Case("other_axes", [randn(g, 2, 6, 4)], {"dim": 1}, "shape (2, 6, 4), dim=1"),
        Case("large_inputs", [randn(g, 4, 11, scale=80.0)], {"dim": -1}, "shape (4, 11), values around +-200"),
        Case("large_inputs", [randn(g, 6, 5, scale=80.0) + 500.0], {"dim": 0}, "shape (6, 5), dim=0, values near 500"),
    ]


BASELINE_SOFTMAX = """
    def baseline(x, dim=-1):
        e = (x - x.amax(dim, keepdim=True)).exp()
        return e / e.sum(dim, keepdim=True)
"""

# -- 1.2 scaled dot-product attention ----------------------------------------------------------


def attention64(q, k, v, key_valid=None, causal=False):
    """softmax(q k^T / sqrt(D), masked) v; query rows that see no key are zeros."""
    mask = None if key_valid is None else padding_mask(key_valid)
    return sdpa_math(q.double(), k.double(), v.double(), mask, is_causal=causal)


def attention_cases(g):
    def qkv(B, H, Tq, Tk, D):
        return [randn(g, B, H, Tq, D), randn(g, B, H, Tk, D), randn(g, B, H, Tk, D)]

    valid = torch.rand(2, 7, generator=g) > 0.3
    valid[:, -1] = True
    left_padded = torch.ones(2, 6, dtype=torch.bool)
    left_padded[0, :3] = False  # queries 0-2 of sequence 0 see no key once causal
    return [
        Case("values", qkv(2, 3, 5, 7, 8), {}, "q (2, 3, 5, 8), k and v (2, 3, 7, 8), no mask"),
        Case("values", qkv(1, 2, 4, 4, 16), {}, "q, k, v (1, 2, 4, 16), no mask"),
        Case("causal", qkv(2, 3, 3, 7, 8), {"causal": True}, "3 queries, 7 keys, causal"),
        Case("causal", qkv(1, 2, 6, 6, 4), {"causal": True}, "6 queries, 6 keys, causal"),
        Case("padding", qkv(2, 2, 4, 7, 8) + [valid], {}, "key_valid (2, 7) with padding, not causal"),
        Case("causal_and_padding", qkv(2, 2, 6, 6, 8) + [left_padded], {"causal": True},
             "left padding and causal: three queries see no key"),
    ]


# -- 1.3 grouped-query attention from weights ----------------------------------------------------


def gqa64(x, wq, wk, wv, wo, n_heads, n_kv_heads):
    return multi_head_attention(x.double(), wq.double(), wk.double(), wv.double(), wo.double(),
                                n_heads, n_kv_heads, is_causal=True)


def gqa_cases(g):
    def case(check, B, T, d, H, KV, D):
        args = [randn(g, B, T, d), randn(g, H * D, d, scale=d ** -0.5), randn(g, KV * D, d, scale=d ** -0.5),
                randn(g, KV * D, d, scale=d ** -0.5), randn(g, d, H * D, scale=(H * D) ** -0.5), H, KV]
        return Case(check, args, {}, f"x ({B}, {T}, {d}), {H} query heads of {D}, {KV} K/V heads")

    return [case("mha", 2, 5, 24, 4, 4, 6), case("mha", 1, 7, 20, 2, 2, 8),
            case("gqa", 2, 6, 24, 6, 2, 5), case("gqa", 1, 4, 16, 4, 2, 4),
            case("mqa", 2, 5, 24, 4, 1, 6)]


# -- 1.4 tiled attention ---------------------------------------------------------------------


def tiled64(q, k, v, causal=False, block_size=64):
    """(out, lse) of attention, computed the plain way in float64."""
    q, k, v = q.double(), k.double(), v.double()
    out = sdpa_math(q, k, v, is_causal=causal)
    scores = q @ repeat_kv(k, q.shape[1] // k.shape[1]).transpose(-2, -1) / q.shape[-1] ** 0.5
    if causal:
        scores = scores.masked_fill(~causal_mask(q.shape[2], k.shape[2]), float("-inf"))
    return out, scores.logsumexp(-1)


def tiled_cases(g):
    def qkv(B, H, Tq, Tk, D):
        return [randn(g, B, H, Tq, D), randn(g, B, H, Tk, D), randn(g, B, H, Tk, D)]

    return [
        Case("values", qkv(1, 2, 10, 10, 8), {"block_size": 4}, "T=10, block_size=4 (does not divide T)", output=0),
        Case("values", qkv(2, 1, 6, 16, 4), {"block_size": 16}, "6 queries, 16 keys, one block", output=0),
        Case("lse", qkv(1, 2, 10, 10, 8), {"block_size": 4}, "T=10, block_size=4: the log-sum-exp", output=1),
        Case("lse", qkv(2, 3, 5, 9, 8), {"causal": True, "block_size": 3}, "causal, 5 queries, 9 keys", output=1),
        Case("causal", qkv(2, 1, 5, 9, 8), {"causal": True, "block_size": 3}, "causal, 5 queries, 9 keys", output=0),
        Case("causal", qkv(1, 2, 12, 12, 4), {"causal": True, "block_size": 5}, "causal, T=12, block_size=5", output=0),
    ]


# The speed baseline tiles exactly as the task asks, but computes every tile and masks the
# ones above the diagonal. Against the naive (Tq, Tk) version the ratio of a correct answer
# moved with the machine's memory bandwidth (0.44 to 0.64 for the same code that skips
# nothing); against this one only the skipped half shows: about 0.5 with skipping, 1.0 without.
BASELINE_EVERY_TILE = """
    import math
    import torch

    def every_tile(q, k, v, causal=False, block_size=64):
        Tq, Tk, D = q.shape[2], k.shape[2], q.shape[3]
        outs, lses = [], []
        for qs in range(0, Tq, block_size):
            qb = q[:, :, qs:qs + block_size]
            rows = torch.arange(qs, qs + qb.shape[2])[:, None] + (Tk - Tq)
            m = torch.full(qb.shape[:3] + (1,), float("-inf"), dtype=q.dtype)
            l = torch.zeros_like(m)
            acc = torch.zeros_like(qb)
            for ks in range(0, Tk, block_size):  # all key blocks, the ones above the diagonal too
                s = qb @ k[:, :, ks:ks + block_size].transpose(-2, -1) / math.sqrt(D)
                if causal:
                    s = s.masked_fill(torch.arange(ks, ks + s.shape[-1]) > rows, float("-inf"))
                m_new = torch.maximum(m, s.amax(-1, keepdim=True))
                p, fix = (s - m_new).exp(), (m - m_new).exp()
                l = l * fix + p.sum(-1, keepdim=True)
                acc = acc * fix + p @ v[:, :, ks:ks + block_size]
                m = m_new
            outs.append(acc / l)
            lses.append((m + l.log()).squeeze(-1))
        return torch.cat(outs, 2), torch.cat(lses, 2)
"""
T_MEMORY, BLOCK_MEMORY = 1024, 64
_g = torch.Generator().manual_seed(7)
MEMORY_ARGS = [torch.randn(1, 2, T_MEMORY, 16, generator=_g) for _ in range(3)]

# -- 1.5 the learner's attention inside SmolLM2 ---------------------------------------------------

HARNESS = """
    import torch
    from reference_engine.generate import generate
    from reference_engine.grading.chapters.ch01_attention import prompts_of, smollm

    MODEL, _ = smollm()  # in a notebook kernel: the same model the reference uses, loaded once

    def wrap(attention_fn):
        def greedy_tokens(prompt_ids):
            MODEL.set_attention(attention_fn)
            try:
                return torch.tensor(generate(MODEL, prompts_of(prompt_ids), max_new_tokens=12).tokens)
            finally:
                MODEL.set_attention("sdpa")
        return greedy_tokens
"""
LONG_PROMPT = "Write a short friendly note to a neighbour asking them to water my plants while I am away next week."
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Name three primary colors.",
           "Why is the sky blue?"]


@lru_cache(maxsize=1)
def smollm():
    from ...load import load_model

    return load_model(pack=False)


def prompts_of(prompt_ids: torch.Tensor) -> list[list[int]]:
    """Rows of a (B, L) tensor of token ids, -1 marking the end of shorter prompts: the
    engine's generate left-pads them itself (and then hands attention a padding mask)."""
    return [row[row >= 0].tolist() for row in prompt_ids]


def greedy64(prompt_ids):
    """SmolLM2's own greedy continuation of each prompt (the engine's attention): (B, 12)."""
    from ...generate import generate

    model, _ = smollm()
    return torch.tensor(generate(model, prompts_of(prompt_ids), max_new_tokens=12).tokens)


@lru_cache(maxsize=1)
def smollm_tokenizer():
    from ...load import load_tokenizer

    return load_tokenizer()


def engine_cases(g):
    tokenizer = smollm_tokenizer()
    first = int(torch.randint(0, len(PROMPTS), (1,), generator=g))
    texts = [PROMPTS[first], PROMPTS[(first + 1) % len(PROMPTS)]]
    cases = []
    for text in texts:
        ids = torch.tensor([tokenizer.encode_chat(text)])
        cases.append(Case("greedy_output", [ids], {}, f"chat prompt {text!r}, 12 greedy tokens"))
    # the longer prompt leaves 13-16 padding slots before the others: enough that attending
    # to them changes the tokens
    batch = [tokenizer.encode_chat(text) for text in (texts[0], LONG_PROMPT, texts[1])]
    padded = torch.full((len(batch), max(map(len, batch))), -1)
    for row, ids in enumerate(batch):
        padded[row, : len(ids)] = torch.tensor(ids)
    lengths = ", ".join(str(len(ids)) for ids in batch)
    cases.append(Case("padded_batch", [padded], {},
                      f"a batch of {len(batch)} chat prompts of {lengths} tokens, left-padded by the engine, "
                      "12 greedy tokens each"))
    return cases


register(
    Task(
        id="1.1", chapter="ch01_attention", title="stable softmax", function="stable_softmax", params=("x", "dim"),
        reference=softmax64, make_cases=softmax_cases,
        checks={
            "values": Check(3, "exponentiate, then divide by the sum over the same axis"),
            "other_axes": Check(2, "reduce over `dim`, keeping it (keepdim=True) so the shapes broadcast"),
            "large_inputs": Check(2, "exp() overflows float32 above about 88: subtract the max along `dim` first"),
        },
        forbidden_ops=SOFTMAX_OPS,
        speed=Speed(
            baseline_source=BASELINE_SOFTMAX, baseline_name="baseline",
            make_inputs=lambda g: [torch.randn(256, 1024, generator=g)], max_ratio=1.5,
            why="use whole-tensor operations (amax, exp, sum) along `dim`; a Python loop over rows or "
                "computing exp twice costs 2x to 100x",
        ),
    ),
    Task(
        id="1.2", chapter="ch01_attention", title="scaled dot-product attention with masks",
        function="scaled_dot_product_attention", params=("q", "k", "v", "key_valid", "causal"),
        reference=attention64, make_cases=attention_cases,
        checks={
            "values": Check(3, "scores = q @ k^T / sqrt(head_dim), softmax over the keys (last axis), then @ v"),
            "causal": Check(2, "with fewer queries than keys, query i is position i + (kv_len - q_len): it sees "
                               "keys up to there (tril with diagonal kv_len - q_len), masked before the softmax"),
            "padding": Check(2, "key_valid (B, kv_len) marks real keys: mask the others for every head and query "
                                "(reshape to (B, 1, 1, kv_len))"),
            "causal_and_padding": Check(2, "a query that sees no key must give zeros, not NaN"),
        },
        forbidden_ops=ATTENTION_OPS,
    ),
    Task(
        id="1.3", chapter="ch01_attention", title="grouped-query attention from projection weights",
        function="grouped_query_attention", params=("x", "wq", "wk", "wv", "wo", "n_heads", "n_kv_heads"),
        reference=gqa64, make_cases=gqa_cases,
        checks={
            "mha": Check(3, "project (x @ w.T), split the last axis into (heads, head_dim), move heads before "
                            "time, attend causally, merge heads back and project with wo"),
            "gqa": Check(3, "query head h reads K/V head h // (n_heads // n_kv_heads): repeat K/V heads with "
                            "repeat_interleave (0,0,1,1), not repeat (0,1,0,1)"),
            "mqa": Check(1, "one K/V head serves every query head"),
        },
        forbidden_ops=ATTENTION_OPS,
    ),
    Task(
        id="1.4", chapter="ch01_attention", title="tiled attention with an online softmax",
        function="tiled_attention", params=("q", "k", "v", "causal", "block_size"),
        reference=tiled64, make_cases=tiled_cases,
        checks={
            "values": Check(3, "keep a running max m, denominator l and output acc per query; when m grows, "
                               "rescale l and acc by exp(m_old - m_new) before adding the block"),
            "lse": Check(2, "the log-sum-exp is m + log(l) at the end"),
            "causal": Check(2, "mask by absolute positions: key block start + offset against query position "
                               "i + (kv_len - q_len)"),
        },
        forbidden_ops={**ATTENTION_OPS, **SOFTMAX_OPS},
        memory=Memory(args=MEMORY_ARGS, kwargs={"causal": True, "block_size": BLOCK_MEMORY},
                      max_elements=4 * 2 * T_MEMORY * BLOCK_MEMORY,
                      why="never build the (q_len, kv_len) score matrix: only (block, block) tiles at a time"),
        speed=Speed(
            baseline_source=BASELINE_EVERY_TILE, baseline_name="every_tile",
            make_inputs=lambda g: [torch.randn(1, 1, 4096, 64, generator=g) for _ in range(3)],
            kwargs={"causal": True, "block_size": 256}, max_ratio=0.75, pairs=9,
            why="tile the queries as well as the keys, and with causal=True let a query block stop at the key "
                "block holding its last position: the tiles above the diagonal (half the work) are never "
                "computed; the baseline is tiled attention that computes every tile and masks the ones above "
                "the diagonal",
        ),
    ),
    Task(
        id="1.5", chapter="ch01_attention", title="your attention inside SmolLM2", function="engine_attention",
        params=("q", "k", "v", "mask", "is_causal"), reference=greedy64, make_cases=engine_cases,
        checks={
            "greedy_output": Check(4, "q is (B, H, T, D) but k and v have only KV heads: repeat them for the "
                                      "query groups; mask (B, 1, T, L) is True where attention is allowed; "
                                      "is_causal means plain causal masking with T == L"),
            "padded_batch": Check(3, "prompts of different lengths are left-padded, and then the engine passes "
                                     "mask (B, 1, T, L), True where a query may attend (causality included), "
                                     "with is_causal=False, at every step (prefill and each decoded token): "
                                     "set the scores of masked keys to -inf before the softmax"),
        },
        forbidden_ops=ATTENTION_OPS, common=False, harness_source=HARNESS, memory_mb=8192,
        seeds=(0,), hidden_seeds=(1,), atol=0.0, rtol=0.0,
    ),
)
