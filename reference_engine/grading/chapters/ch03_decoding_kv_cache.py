"""Chapter 3: decoding and the KV cache. Five tasks: top-k/top-p filtering, a KV cache
class the engine decodes with (checked against recomputation, and timed against it),
beam search over a `step` function (a toy table and SmolLM2), the accept/reject step of
speculative decoding (checked statistically), and block allocation for the paged cache
(checked by its invariants, and by the engine decoding through it).

Two of the tasks are classes: the harness (`ch03_harness.py`) plugs them into the engine
and returns tensors, which is all the grader ever compares. References are the engine's
own functions in float64. The statistical judges allow 5.5 standard deviations per
comparison (about 40 per grading), so a correct implementation fails about once in a
million gradings; the draws are seeded, so the same code always gets the same verdict.
"""

from __future__ import annotations

import torch

from ...decoding import search_beams
from ...generate import top_k_top_p_filter
from ..tasks import Case, Check, Speed, Task, register
from .ch01_attention import smollm_tokenizer
from .ch03_harness import SMALL, model_named, small_model, step_for
from .ch03_judges import acceptance_matches, allocator_judge, bonus_follows_target, follows_target

# -- 3.1 top-k and top-p ------------------------------------------------------------------------


def filter64(logits, top_k, top_p):
    return top_k_top_p_filter(logits.double(), top_k, top_p)


def filter_cases(g):
    def logits(B, V, scale=2.0):
        return torch.randn(B, V, generator=g) * scale

    k = int(torch.randint(2, 9, (), generator=g))
    p = round(0.5 + 0.4 * float(torch.rand((), generator=g)), 3)
    return [
        Case("top_k", [logits(3, 40), k, 1.0], {}, f"logits (3, 40), top_k={k}, top_p=1.0"),
        Case("top_k", [logits(2, 25), 1, 1.0], {}, "top_k=1: greedy"),
        Case("top_k", [logits(2, 10), 50, 1.0], {}, "top_k=50 > vocabulary of 10: nothing removed"),
        Case("top_p", [logits(3, 40), 0, p], {}, f"top_k=0 (off), top_p={p}"),
        Case("top_p", [logits(2, 30, scale=4.0), 0, 0.05], {}, "top_p=0.05, below the top token's probability"),
        Case("top_p", [logits(2, 30), 0, 1.0], {}, "top_p=1.0: nothing removed"),
        Case("both", [logits(3, 40, scale=1.0), 6, 0.8], {}, "top_k=6 and top_p=0.8"),
        Case("both", [logits(2, 50, scale=1.0), 10, 0.6], {}, "top_k=10 and top_p=0.6"),
    ]


# -- 3.2 a KV cache class ---------------------------------------------------------------------------

HARNESS_CACHE = """
    from reference_engine.grading.chapters.ch03_harness import decode_with_cache

    def wrap(cache_class):
        def call(ids, n_prefill, chunk=1, model="small", rewind=False):
            return decode_with_cache(cache_class, ids, n_prefill, chunk, model, rewind)
        return call
"""
BASELINE_RECOMPUTE = """
    from reference_engine.grading.chapters.ch03_harness import logits_by_recomputation, small_model

    small_model()  # built before the clock starts

    def recompute(ids, n_prefill, chunk=1, model="small"):
        return logits_by_recomputation(ids, n_prefill, chunk, model)
"""
QUESTIONS = [("What is the capital of France?", "The capital of France is Paris."),
             ("Name a primary color.", "Red is a primary color."),
             ("What is 2 + 3?", "2 + 3 equals 5.")]


def recomputed64(ids, n_prefill, chunk=1, model="small", rewind=False):
    """The logits of one forward over the whole sequence (no cache), from position n_prefill - 1."""
    with torch.inference_mode():
        return model_named(model)(ids)[:, n_prefill - 1 :].double()


def chat_ids(question: str, answer: str) -> tuple[torch.Tensor, int]:
    tokenizer = smollm_tokenizer()
    prompt = tokenizer.encode_chat(question)
    return torch.tensor([prompt + tokenizer.encode(answer)]), len(prompt)


def cache_cases(g):
    def ids(B, T):
        return torch.randint(0, SMALL["vocab_size"], (B, T), generator=g)

    question, answer = QUESTIONS[int(torch.randint(0, len(QUESTIONS), (), generator=g))]
    chat, n_prompt = chat_ids(question, answer)
    chunk = int(torch.randint(2, 6, (), generator=g))
    return [
        Case("smollm", [chat, n_prompt, 1, "smollm2"], {},
             f"SmolLM2: the chat prompt {question!r}, then the answer {answer!r} one token at a time"),
        Case("chunks", [ids(1, 31), 9, chunk, "small"], {}, f"prefill 9 tokens, then chunks of {chunk} (start > 0, T > 1)"),
        Case("chunks", [ids(1, 20), 6, 4, "small", True], {},
             "speculative drafts of up to 4 tokens, all but the first rejected: the next call starts up to 3 "
             "slots before the last one ended, and overwrites them"),
        Case("batch", [ids(3, 24), 8, 1, "small"], {}, "a batch of 3 sequences"),
    ]


# -- 3.3 beam search ----------------------------------------------------------------------------------

HARNESS_BEAM = """
    from reference_engine.grading.chapters.ch03_harness import run_beam_search

    def wrap(search):
        def call(source, prompt, beam_width, max_new_tokens, length_penalty, stop_id):
            return run_beam_search(search, source, prompt, beam_width, max_new_tokens, length_penalty, stop_id)
        return call
"""


def beam64(source, prompt, beam_width, max_new_tokens, length_penalty, stop_id):
    """(tokens, score) of the best hypothesis of the engine's `search_beams` with the same step."""
    key = None if isinstance(source, torch.Tensor) else (source, tuple(prompt.tolist()), beam_width, max_new_tokens,
                                                          length_penalty, stop_id)
    if key in SMOLLM_BEAMS:  # every grading asks for the same few searches on SmolLM2
        return SMOLLM_BEAMS[key]
    step, prompt = step_for(source), prompt.tolist()
    best = search_beams(step([prompt]), lambda parents, beams: step([prompt + b for b in beams]),
                        beam_width, max_new_tokens, length_penalty, () if stop_id is None else (stop_id,))[0]
    result = torch.tensor(best.tokens, dtype=torch.long), torch.tensor(best.score, dtype=torch.float64)
    if key is not None:
        SMOLLM_BEAMS[key] = result
    return result


SMOLLM_BEAMS: dict = {}


def beam_cases(g):
    V = 12

    def table(sharpness=1.5):
        return torch.randn(V, V, generator=g, dtype=torch.float64) * sharpness

    def prompt():
        return torch.randint(0, V, (3,), generator=g)

    stop = int(torch.randint(0, V, (), generator=g))
    likely_stop, stop_first = table(), table()
    likely_stop[:, stop] += 1.5  # the stop token is often among the best candidates
    stop_first[:, stop] += 3.0  # the best hypothesis ends with the stop token
    tokenizer = smollm_tokenizer()
    question = QUESTIONS[int(torch.randint(0, len(QUESTIONS), (), generator=g))][0]
    newline = tokenizer.encode("\n")[0]
    qa = torch.tensor(tokenizer.encode(f"Q: {question}\nA:"))  # short: every step reads all the weights
    return [
        Case("values", [table(), prompt(), 3, 6, 1.0, None], {}, "12-token table, beam_width=3, 6 tokens, no stop", output=0),
        Case("values", [table(2.5), prompt(), 4, 5, 1.0, None], {}, "12-token table, beam_width=4, 5 tokens", output=0),
        Case("stop", [likely_stop, prompt(), 3, 8, 1.0, stop], {}, f"stop_id={stop}, often likely", output=0),
        Case("stop", [likely_stop, prompt(), 2, 8, 0.5, stop], {}, f"stop_id={stop}, length_penalty=0.5", output=0),
        Case("length_penalty", [likely_stop, prompt(), 3, 8, 0.0, stop], {},
             "length_penalty=0: total log-probability (short hypotheses win)", output=0),
        Case("length_penalty", [likely_stop, prompt(), 3, 8, 2.0, stop], {}, "length_penalty=2.0", output=0),
        Case("score", [stop_first, prompt(), 3, 8, 0.7, stop], {}, "the returned score, length_penalty=0.7", output=1),
        Case("score", [table(), prompt(), 2, 4, 1.0, None], {}, "the returned score, no stop token", output=1),
        Case("smollm", ["smollm2", qa, 3, 9, 1.0, newline], {},
             f"SmolLM2 on 'Q: {question}\\nA:', beam_width=3, 9 tokens, stop at the newline", output=0),
    ]


# -- 3.4 the accept/reject step of speculative decoding ----------------------------------------------

HARNESS_ACCEPT = """
    from reference_engine.grading.chapters.ch03_harness import accept_trials

    def wrap(accept):
        def call(p, q, n_trials):
            return accept_trials(accept, p, q, n_trials)
        return call
"""


def accept_cases(g):
    def probs(*shape, zeros=0):
        logits = torch.randn(*shape, generator=g, dtype=torch.float64)
        if zeros:
            logits[..., :zeros] = float("-inf")  # like a top-k-filtered target
        return logits.softmax(-1)

    p1 = probs(2, 8, zeros=2)
    q1 = probs(1, 8)
    p3, q3 = probs(4, 6, zeros=1), probs(3, 6)
    close_q = (p3[:2] * 4 + probs(2, 6)) / 5  # a good draft: all accepted often, so the bonus is seen often
    return [
        Case("target_distribution", [p1, q1, 6000], {}, "1 draft token, 8-token vocabulary, 6000 trials",
             judge=follows_target),
        Case("target_distribution", [p3, q3, 6000], {}, "3 draft tokens, 6-token vocabulary, 6000 trials",
             judge=follows_target),
        Case("acceptance_rate", [p3, q3, 6000], {}, "3 draft tokens: acceptance at each position", judge=acceptance_matches),
        Case("acceptance_rate", [p3[:3], p3[:2], 2000], {}, "a draft equal to the target: always accepted",
             judge=acceptance_matches),
        Case("bonus_token", [p3[:3], close_q, 6000], {}, "2 draft tokens close to the target", judge=bonus_follows_target),
    ]


# -- 3.5 block allocation for the paged cache --------------------------------------------------------

HARNESS_ALLOCATOR = """
    from reference_engine.grading.chapters.ch03_harness import decode_with_allocator, replay_allocator

    def wrap(allocator_class):
        def call(kind, *args):
            if kind == "engine":
                return decode_with_allocator(allocator_class, *args)
            return replay_allocator(allocator_class, *args)
        return call
"""


def engine_paged64(kind, ids, n_prefill, block_size, draft=1):
    """The "engine" case's reference: recomputation (the script cases have judges instead)."""
    with torch.inference_mode():
        return small_model(block_size)(ids)[:, n_prefill - 1 :].double()


def allocator_cases(g):
    def ids(B, T):
        return torch.randint(0, SMALL["vocab_size"], (B, T), generator=g)

    def script(*rows):
        return torch.tensor(rows, dtype=torch.long)

    grow = [[0, int(s), int(n)] for s, n in zip(torch.randint(0, 3, (12,), generator=g),
                                                torch.randint(1, 14, (12,), generator=g))]
    return [
        Case("tables", ["script", script(*grow), 40, 4, 3], {}, "3 sequences growing in turns, block_size=4",
             judge=allocator_judge),
        Case("tables", ["script", script([0, 0, 1], [0, 1, 5], [0, 0, 9], [0, 1, 16], [0, 0, 6], [0, 0, 17]),
                        12, 4, 2], {},
             "sequences crossing block boundaries (1, 5, 9, 16, 17 slots), and asking for fewer slots than held",
             judge=allocator_judge),
        Case("reuse", ["script", script([0, 0, 12], [0, 1, 8], [1, 0, 0], [0, 2, 12], [1, 1, 0], [0, 0, 8],
                                        [1, 2, 0], [0, 1, 12]), 5, 4, 3], {},
             "5 blocks of 4: sequences released and their blocks reused", judge=allocator_judge),
        Case("full", ["script", script([0, 0, 8], [0, 1, 8], [0, 0, 16], [0, 1, 12], [1, 1, 0], [0, 0, 16]), 5, 4, 2],
             {}, "5 blocks of 4, 4 in use, 2 more asked for; then 1 more for the other sequence; then room is made",
             judge=allocator_judge),
        Case("engine", ["engine", ids(3, 21), 6, 4], {}, "the engine's paged cache on a small model, 3 sequences, "
                                                       "block_size=4: logits against recomputation"),
        Case("engine", ["engine", ids(2, 17), 5, 4, 3], {},
             "speculative drafts of up to 3 tokens through the paged cache, all but the first rejected: ensure "
             "is asked for fewer slots than the sequence holds, and the rejected slots are written again"),
    ]


register(
    Task(
        id="3.1", chapter="ch03_decoding_kv_cache", title="top-k and top-p filtering", function="filter_logits",
        params=("logits", "top_k", "top_p"), reference=filter64, make_cases=filter_cases,
        checks={
            "top_k": Check(3, "keep the k largest logits of each row (torch.topk along the last axis gives the k-th "
                              "value); top_k=0 or top_k >= vocabulary means no filtering"),
            "top_p": Check(3, "sort each row's probabilities in descending order; keep a token while the mass of "
                              "the tokens ranked above it is below top_p, so the token that crosses top_p stays and "
                              "the top token always stays; scatter the decision back to vocabulary order"),
            "both": Check(2, "apply top-k first, then top-p on the softmax of what is left"),
        },
    ),
    Task(
        id="3.2", chapter="ch03_decoding_kv_cache", title="a KV cache the engine decodes with", function="KVCache",
        params=("batch_size", "n_kv_heads", "max_seq_len", "head_dim"), reference=recomputed64,
        make_cases=cache_cases,
        checks={
            "smollm": Check(4, "update(start, k, v) writes k and v (B, KV, T, D) into slots start..start+T-1 and "
                               "returns the keys and values of slots 0..start+T-1, nothing past them"),
            "chunks": Check(2, "after the prompt, a call may bring several tokens (T > 1) at start > 0: write all T; "
                               "and start may go back (speculative decoding rejected a draft): follow `start`, "
                               "not a length of your own, and return slots 0..start+T-1 only"),
            "batch": Check(2, "keep one row per sequence of the batch: (batch_size, n_kv_heads, max_seq_len, head_dim)"),
        },
        speed=Speed(
            baseline_source=BASELINE_RECOMPUTE, baseline_name="recompute",
            make_inputs=lambda g: [torch.randint(0, SMALL["vocab_size"], (1, 16 + 256), generator=g)],
            kwargs={"n_prefill": 16, "chunk": 1, "model": "small"}, max_ratio=0.33, pairs=5,
            why="256 decoding steps with your cache must take under a third of the time of recomputing every "
                "prefix (a small 2-layer model, where the cache wins about 7x): preallocate the buffers once and "
                "write each step's keys and values with one slice assignment, no Python loop over slots",
        ),
        common=False, harness_source=HARNESS_CACHE, memory_mb=8192, seeds=(0,), hidden_seeds=(1,),
        atol=1e-3, rtol=0.0,
    ),
    Task(
        id="3.3", chapter="ch03_decoding_kv_cache", title="beam search", function="beam_search",
        params=("step", "prompt", "beam_width", "max_new_tokens", "length_penalty", "stop_id"),
        reference=beam64, make_cases=beam_cases,
        checks={
            "values": Check(3, "score every (beam, next token) pair by the beam's log-probability plus the token's, "
                               "over all beams at once, and keep the best beam_width"),
            "stop": Check(2, "a candidate ending in stop_id becomes a finished hypothesis (stop token not in its "
                             "tokens); stop when beam_width hypotheses have finished"),
            "length_penalty": Check(2, "rank finished hypotheses by logprob / length ** length_penalty, the length "
                                       "counting the stop token"),
            "score": Check(1, "return the best hypothesis's score: its summed log-probability (stop token "
                              "included) / length ** length_penalty"),
            "smollm": Check(3, "the same search must hold on SmolLM2's real distributions"),
        },
        common=False, harness_source=HARNESS_BEAM, memory_mb=8192, seeds=(0,), hidden_seeds=(1,),
        atol=1e-9, rtol=1e-6,
    ),
    Task(
        id="3.4", chapter="ch03_decoding_kv_cache", title="the accept/reject step of speculative decoding",
        function="accept_or_resample", params=("p", "q", "draft", "generator"),
        reference=lambda *args: None, make_cases=accept_cases,  # every case has a judge
        checks={
            "target_distribution": Check(3, "accept draft token x with probability min(1, p(x) / q(x)); at the first "
                                            "rejection draw the replacement from max(0, p - q), renormalised, "
                                            "and stop"),
            "acceptance_rate": Check(2, "compare one uniform draw per draft token with p(x) / q(x) and stop at "
                                        "the first rejection: n_accepted counts the accepted prefix only"),
            "bonus_token": Check(2, "when every draft token is accepted, draw one more token from p's last row "
                                    "(the target's distribution after the whole draft)"),
        },
        common=False, harness_source=HARNESS_ACCEPT, seeds=(0,), hidden_seeds=(1,),
    ),
    Task(
        id="3.5", chapter="ch03_decoding_kv_cache", title="block allocation for the paged KV cache",
        function="BlockAllocator", params=("n_blocks", "block_size", "n_sequences"),
        reference=engine_paged64, make_cases=allocator_cases,
        checks={
            "tables": Check(3, "ensure(seq, n) appends ceil(n / block_size) - len(table) blocks from the free list; "
                               "locate(seq, slots) returns table[slot // block_size] and slot % block_size"),
            "reuse": Check(2, "release(seq) puts the sequence's blocks back on the free list and empties its table"),
            "full": Check(2, "when the free list has fewer blocks than ensure needs, raise an error before taking any"),
            "engine": Check(3, "the engine's paged cache finds every key and value through your locate: the "
                               "logits must equal recomputation's"),
        },
        common=False, harness_source=HARNESS_ALLOCATOR, seeds=(0,), hidden_seeds=(1,), atol=1e-3, rtol=0.0,
    ),
)
