"""Decoding strategies beyond one sampled token per step: beam search, and speculative
decoding with the rejection-sampling step that keeps the target distribution exactly.

`generate.py` holds the sampling filters and the batched generation loop these build on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch

from .errors import DojoError
from .generate import check_sampling_args, prefill, top_k_top_p_filter
from .model import Transformer

# -- beam search --------------------------------------------------------------------------


@dataclass
class Hypothesis:
    tokens: list[int]  # generated tokens, the stop token excluded
    logprob: float  # sum of the log-probabilities of the generated tokens (stop token included)
    score: float  # logprob / length ** length_penalty, what beams are ranked by at the end


def length_normalised(logprob: float, length: int, length_penalty: float) -> float:
    """score = logprob / length^alpha. alpha 0 ranks by total log-probability, which favours
    short outputs (every token adds a negative term); alpha 1 ranks by the mean per token."""
    return logprob / max(length, 1) ** length_penalty


@torch.inference_mode()
def beam_search(model: Transformer, prompt: list[int], beam_width: int = 4, max_new_tokens: int = 32,
                length_penalty: float = 1.0, stop_ids: Iterable[int] = ()) -> list[Hypothesis]:
    """Beam search on the model (see `search_beams` for the rule). The KV cache holds one
    row per beam and is reordered when beams are copied (`reorder_cache`)."""
    if beam_width < 1 or max_new_tokens < 1 or not prompt:
        raise DojoError("beam search needs a non-empty prompt, beam_width >= 1 and max_new_tokens >= 1")
    if len(prompt) + max_new_tokens > model.config.max_seq_len:
        raise DojoError(f"prompt ({len(prompt)}) + max_new_tokens ({max_new_tokens}) exceed the model's "
                        f"context of {model.config.max_seq_len}")
    model.setup_cache(beam_width, len(prompt) + max_new_tokens)  # room for every beam
    try:
        first = prefill(model, torch.tensor([prompt])).double().log_softmax(-1)  # (1, V)

        def advance(parents: list[int], beams: list[list[int]]) -> torch.Tensor:
            model.reorder_cache(torch.tensor(parents))  # cache row i continues beam parents[i]
            last = torch.tensor([b[-1] for b in beams])[:, None]
            return model(last, start=len(prompt) + len(beams[0]) - 1)[:, -1].double().log_softmax(-1)

        return search_beams(first, advance, beam_width, max_new_tokens, length_penalty, stop_ids)
    finally:
        model.clear_cache()


def search_beams(first: torch.Tensor, advance, beam_width: int, max_new_tokens: int,
                 length_penalty: float = 1.0, stop_ids: Iterable[int] = ()) -> list[Hypothesis]:
    """Keep the beam_width most likely continuations at every step; return the finished
    hypotheses, best score first. Model-free: first (1, V) holds the log-probabilities of
    the first token, and advance(parents, beams) those after each beam (n_beams, V), where
    beam i (a list of generated tokens) continues old beam parents[i].

    Each step scores every (beam, next token) pair by the beam's log-probability plus the
    token's, and keeps the best beam_width that do not stop; a pair ending in a stop token
    becomes a finished hypothesis. The search ends when beam_width hypotheses have finished
    or after max_new_tokens (the beams still running then count as finished). Length
    counts the generated tokens, the stop token included.
    """
    stop_ids = frozenset(stop_ids)
    logprobs = first
    beams, beam_logprob = [[]], torch.zeros(1, dtype=torch.float64)
    finished: list[Hypothesis] = []
    for step in range(max_new_tokens):
        V = logprobs.shape[-1]
        candidates = (beam_logprob[:, None] + logprobs).flatten()  # (n_beams * V,)
        top = candidates.topk(min(2 * beam_width, candidates.numel()))  # W may stop, W continue
        parents, new_beams, running = [], [], []
        for value, index in zip(top.values.tolist(), top.indices.tolist()):
            parent, token = divmod(index, V)
            if token in stop_ids:
                length = len(beams[parent]) + 1
                finished.append(Hypothesis(beams[parent], value, length_normalised(value, length, length_penalty)))
            else:
                parents.append(parent)
                new_beams.append(beams[parent] + [token])
                running.append(value)
            if len(running) == beam_width:
                break
        beams, beam_logprob = new_beams, torch.tensor(running, dtype=torch.float64)
        if len(finished) >= beam_width or step == max_new_tokens - 1:
            break
        logprobs = advance(parents, beams)
    if len(finished) < beam_width:  # out of steps: the running beams finish as they are
        finished += [Hypothesis(b, lp, length_normalised(lp, len(b), length_penalty))
                     for b, lp in zip(beams, beam_logprob.tolist())]
    return sorted(finished, key=lambda h: h.score, reverse=True)[:beam_width]


# -- speculative decoding -------------------------------------------------------------------


def sampling_probs(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """The distribution `generate.sample` draws from, float64 (..., V): the filtered softmax
    of logits / temperature, or a one-hot argmax for temperature 0 (greedy)."""
    if temperature == 0.0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).double()
    return torch.softmax(top_k_top_p_filter(logits.double() / temperature, top_k, top_p), dim=-1)


def accept_or_resample(p: torch.Tensor, q: torch.Tensor, draft: list[int],
                       generator: torch.Generator | None = None) -> tuple[int, int]:
    """The rejection-sampling step of speculative decoding.

    p: (k+1, V) target probabilities at the k drafted positions and one more;
    q: (k, V) draft probabilities that the draft tokens were sampled from.
    Draft token x_i is accepted with probability min(1, p_i(x_i) / q_i(x_i)); at the first
    rejection, the replacement is drawn from max(0, p_i - q_i), renormalised; if all k are
    accepted, a bonus token is drawn from p_{k+1}. The output is then distributed exactly
    as sampling from p one token at a time. Returns (number accepted, next token).
    """
    for i, x in enumerate(draft):
        ratio = p[i, x] / q[i, x] if q[i, x] > 0 else torch.tensor(0.0, dtype=p.dtype)
        if torch.rand((), generator=generator, dtype=torch.float64) < ratio:
            continue
        residual = (p[i] - q[i]).clamp(min=0)
        # subtle: residual is all zeros only when p_i == q_i, where rejection has probability 0
        residual = residual if residual.sum() > 0 else p[i]
        return i, int(torch.multinomial(residual / residual.sum(), 1, generator=generator))
    return len(draft), int(torch.multinomial(p[len(draft)], 1, generator=generator))


def prompt_lookup_draft(context: list[int], k: int, ngram: int = 3) -> list[int]:
    """Draft without a model: find the last earlier occurrence of the context's final
    `ngram` tokens and propose the (up to) k tokens that followed it. [] when none.
    Example: context [5, 6, 7, 1, 5, 6], ngram 2 -> the match [5, 6] at 0 -> propose [7, 1]."""
    tail = context[-ngram:]
    for start in range(len(context) - ngram - 1, -1, -1):
        if context[start:start + ngram] == tail:
            return context[start + ngram:start + ngram + k]
    return []


@dataclass
class SpeculativeResult:
    tokens: list[int]
    proposed: int = 0  # draft tokens proposed
    accepted: int = 0  # of which accepted by the target
    target_forwards: int = 0  # verification passes (each checks k drafts and yields >= 1 token)
    draft_forwards: int = 0
    history: list[int] = field(default_factory=list)  # tokens gained per verification

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0


@torch.inference_mode()
def speculative_generate(model: Transformer, prompt: list[int], max_new_tokens: int = 64, k: int = 4,
                         draft: str = "lookup", draft_layers: int = 8, temperature: float = 0.0,
                         top_k: int = 0, top_p: float = 1.0, stop_ids: Iterable[int] = (),
                         seed: int | None = None) -> SpeculativeResult:
    """Generate with a cheap draft and the model as verifier: the draft proposes k tokens,
    one forward of the model scores all of them at once, `accept_or_resample` keeps a prefix.

    draft="layers": the model's own first `draft_layers` blocks, then its final norm and
        head (self-speculation; no second model to download). Those blocks compute the same
        keys and values as in the full model, so the draft writes straight into their cache.
    draft="lookup": `prompt_lookup_draft`, a deterministic guess (q is one-hot).
    subtle: SmolLM2 was not trained to exit early, and its first 8 or 16 blocks agree with
    the full model on 0-4% of greedy tokens (lesson 3 measures it), so "layers" is a correct
    but slow draft; prompt lookup, which proposes only where the text repeats, had every
    proposal accepted on an answer that copies its prompt (1.5x faster there).
    With temperature 0 the output equals greedy decoding token for token; otherwise it is
    distributed exactly as `generate` with the same temperature, top_k and top_p.
    """
    check_sampling_args(temperature, top_k, top_p)
    if draft not in ("layers", "lookup"):
        raise DojoError(f"draft must be 'layers' or 'lookup', got {draft!r}")
    if not prompt or k < 1 or max_new_tokens < 1:
        raise DojoError("speculative decoding needs a non-empty prompt, k >= 1 and max_new_tokens >= 1")
    if not 0 < draft_layers < model.config.n_layers:
        raise DojoError(f"draft_layers must be between 1 and {model.config.n_layers - 1}, got {draft_layers}")
    total = len(prompt) + max_new_tokens + k + 1
    if total > model.config.max_seq_len:
        raise DojoError(f"prompt + max_new_tokens + k exceed the model's context of {model.config.max_seq_len}")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    stop_ids = frozenset(stop_ids)
    out = SpeculativeResult(tokens=[])
    context = list(prompt)
    model.setup_cache(1, total)
    try:
        if len(prompt) > 1:
            prefill(model, torch.tensor([prompt[:-1]]))  # cache every prompt token but the last
        while len(out.tokens) < max_new_tokens:
            slot = len(context) - 1  # the last token is not in the cache yet
            proposal, q = [], []
            if draft == "lookup":
                proposal = prompt_lookup_draft(context, k)
                q = [torch.nn.functional.one_hot(torch.tensor(t), model.config.vocab_size).double() for t in proposal]
            else:
                token = context[-1]
                for i in range(k):
                    draft_logits = model(torch.tensor([[token]]), start=slot + i, exit_layer=draft_layers)[0, -1]
                    q.append(sampling_probs(draft_logits, temperature, top_k, top_p))
                    token = int(torch.multinomial(q[-1], 1, generator=generator))
                    proposal.append(token)
                out.draft_forwards += k
            verify = torch.tensor([[context[-1], *proposal]])  # (1, 1 + k)
            p = sampling_probs(model(verify, start=slot)[0], temperature, top_k, top_p)  # (1 + k, V)
            out.target_forwards += 1
            n_ok, next_token = accept_or_resample(p, torch.stack(q) if q else p[:0], proposal, generator)
            out.proposed += len(proposal)
            out.accepted += n_ok
            new = proposal[:n_ok] + [next_token]
            out.history.append(len(new))
            for t in new:
                if t in stop_ids or len(out.tokens) >= max_new_tokens:
                    return out
                out.tokens.append(t)
                context.append(t)
    finally:
        model.clear_cache()
    return out
