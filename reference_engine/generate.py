"""Decoding: sampling filters, prefill, one decode step, and batched generation.

Generation has two phases with different costs:
  - prefill: the whole prompt in one forward, filling the KV cache (compute-bound);
  - decode: one token per forward, reading every weight once per step (memory-bound).

Batches of prompts with different lengths are *left*-padded, so that every row writes
its next token into the same cache slot. Padding slots are masked out of attention and
each row keeps its own positions, so a padded row computes exactly what it would alone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

from . import cpu_kernels
from .errors import DojoError
from .model import Transformer


# -- sampling ---------------------------------------------------------------------------


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row, set the rest to -inf. logits: (B, V)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1) k-th largest value
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probabilities sum
    to at least p; set the rest to -inf. logits: (B, V).

    Example: probs [0.5, 0.3, 0.15, 0.05], p = 0.7 -> keep the first two (0.5 + 0.3 >= 0.7).
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above
    drop_sorted = mass_before >= p  # subtle: the top token has mass_before 0, so it always stays
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def top_k_top_p_filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """top-k first, then top-p on the softmax of what is left (0 and 1.0 switch them off)."""
    return top_p_filter(top_k_filter(logits, top_k), top_p)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty on logits (B, V) for the tokens marked in seen (B, V) bool:
    a positive logit is divided by the penalty, a negative one multiplied, so either way
    the token becomes less likely (penalty > 1). Example: penalty 2: 2.0 -> 1.0, -2.0 -> -4.0."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """The argmax of each row of logits (B, V), (B,): the compiled kernels' where they are
    loaded and the logits are a contiguous float32 CPU tensor (torch.argmax ran at about
    3.5 G values/s here: 0.22 ms a step at batch 16, 4% of a quantized decode step), else
    torch.argmax. Both give the first of equal values, and a NaN where a row has one."""
    kernels = cpu_kernels._loaded
    if (kernels is not None and logits.dim() == 2 and logits.dtype == torch.float32 and logits.device.type == "cpu"
            and logits.is_contiguous() and logits.shape[1] > 0):
        return kernels.argmax_rows(logits)
    return logits.argmax(dim=-1)


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token per row from logits (B, V). temperature 0 is greedy (argmax). Returns (B,)."""
    if temperature == 0.0:
        return greedy(logits)
    logits = top_k_top_p_filter(logits / temperature, top_k, top_p)
    probs = torch.softmax(logits.float(), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def check_sampling_args(temperature: float, top_k: int, top_p: float, repetition_penalty: float = 1.0) -> None:
    if not repetition_penalty > 0.0:
        raise DojoError(f"repetition_penalty must be > 0 (1 disables it, above 1 discourages repeats), "
                        f"got {repetition_penalty}")
    if not temperature >= 0.0:  # also rejects NaN
        raise DojoError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
    if top_k < 0:
        raise DojoError(f"top-k must be >= 0 (0 disables it), got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise DojoError(f"top-p must be in (0, 1] (1 disables it), got {top_p}")


# -- one step at a time -----------------------------------------------------------------


@torch.inference_mode()
def prefill(model: Transformer, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
            key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Run the prompt (B, T) through the model into cache slots [0, T). Returns the last
    position's logits (B, V)."""
    return model(input_ids, start=0, positions=positions, key_valid=key_valid, last_only=True)[:, -1]


@torch.inference_mode()
def decode_one_token(model: Transformer, token: torch.Tensor, slot: int, positions: torch.Tensor | None = None,
                     key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Feed one token per row (B,) into cache slot `slot`. Returns next-token logits (B, V)."""
    return model(token[:, None], start=slot, positions=positions, key_valid=key_valid)[:, -1]


# -- generation -------------------------------------------------------------------------


@dataclass
class Generation:
    """Generated token ids per prompt (stop token excluded) and what it cost."""

    tokens: list[list[int]]
    finish_reasons: list[str]  # "stop" (a stop token), "length" (max_new_tokens or context)
    prompt_tokens: int = 0  # summed over the batch, padding excluded
    prefill_s: float = 0.0  # time to first token: prefill plus sampling the first token
    decode_s: float = 0.0  # every later step
    decode_steps: int = 0  # forwards after prefill
    timings: dict = field(default_factory=dict)


def pad_left(prompts: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-pad prompts to one length.

    Returns ids (B, T), valid (B, T) bool (False on padding) and positions (B, T), where a
    row's first real token has position 0.
    Example: [[5, 6, 7], [8]] -> ids [[5, 6, 7], [0, 0, 8]], positions [[0, 1, 2], [0, 0, 0]].
    """
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    valid = torch.zeros(len(prompts), T, dtype=torch.bool)
    for row, p in enumerate(prompts):
        ids[row, T - len(p):] = torch.tensor(p, dtype=torch.long)
        valid[row, T - len(p):] = True
    positions = (valid.long().cumsum(dim=1) - 1).clamp(min=0)  # (B, T)
    return ids, valid, positions


def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int = 64,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             stop_ids: Iterable[int] = (), seed: int | None = None,
             on_token: Callable[[int, int], None] | None = None, repetition_penalty: float = 1.0) -> Generation:
    """Generate for a batch of prompts (lists of token ids, any lengths); each row stops on
    its own at a stop token or after max_new_tokens.

    on_token(row, token_id) is called for every generated token as soon as it is sampled
    (stop tokens included), which is how the CLI streams text. repetition_penalty > 1
    discourages every token already in the row's prompt or output (`apply_repetition_penalty`).
    """
    check_sampling_args(temperature, top_k, top_p, repetition_penalty)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise DojoError("empty prompt: give at least one token (an empty string encodes to nothing)")
    if max_new_tokens < 1:
        raise DojoError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    context = model.config.max_seq_len
    longest = max(len(p) for p in prompts)
    if longest >= context:
        raise DojoError(f"the prompt has {longest} tokens but the model's context is {context}; "
                        "shorten the prompt to leave room for at least one new token")
    max_new_tokens = min(max_new_tokens, context - longest)  # prompt + output fit the context
    total_len = longest + max_new_tokens
    stop_ids = frozenset(stop_ids)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    B = len(prompts)

    device = model.tok_embeddings.weight.device  # the model's inputs live there; sampling stays on the CPU
    ids, valid, positions = (t.to(device) for t in pad_left(prompts))
    padded = not bool(valid.all())
    key_valid = torch.ones(B, total_len, dtype=torch.bool, device=device)  # grows into the generated slots
    key_valid[:, :longest] = valid
    next_pos = positions[:, -1] + 1  # (B,) position of each row's next token

    out = Generation(tokens=[[] for _ in range(B)], finish_reasons=["length"] * B,
                     prompt_tokens=sum(len(p) for p in prompts))
    # a list, and each step's tokens read in one call: two tensor reads per row cost 0.13 ms a
    # step at batch 16
    done = [False] * B
    seen = torch.zeros(B, model.config.vocab_size, dtype=torch.bool)  # tokens each row has seen
    for row, p in enumerate(prompts):
        seen[row, p] = True

    def pick(logits: torch.Tensor) -> torch.Tensor:
        logits = logits.cpu()  # (B, vocab): a small copy per step from a GPU, none on the CPU
        if repetition_penalty == 1.0:  # off: no bookkeeping on the decode path
            return sample(logits, temperature, top_k, top_p, generator)
        token = sample(apply_repetition_penalty(logits, seen, repetition_penalty), temperature, top_k, top_p,
                       generator)
        seen[torch.arange(B), token] = True
        return token

    model.setup_cache(B, total_len)
    try:
        t0 = time.perf_counter()
        logits = prefill(model, ids, positions, key_valid if padded else None)
        token = pick(logits)
        out.prefill_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        for step in range(max_new_tokens):
            for row, tid in enumerate(token.tolist()):
                if done[row]:
                    continue
                if on_token is not None:
                    on_token(row, tid)
                if tid in stop_ids:
                    done[row] = True
                    out.finish_reasons[row] = "stop"
                else:
                    out.tokens[row].append(tid)
                    if len(out.tokens[row]) >= max_new_tokens:
                        done[row] = True
            if all(done):
                break
            logits = decode_one_token(model, token.to(device), longest + step, next_pos[:, None],
                                      key_valid if padded else None)
            token = pick(logits)
            next_pos += 1
            out.decode_steps += 1
        out.decode_s = time.perf_counter() - t1
    finally:
        model.clear_cache()
    return out
