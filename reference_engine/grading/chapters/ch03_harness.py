"""The trusted machinery chapter 3's tasks run the learner's code in: models that decode
with the learner's cache or allocator, the `step` function beam search is graded with,
and the repeated trials of the accept/reject step. Runs in the grader's child (before the
learner's code) and in the notebook kernel. The cases are in `ch03_decoding_kv_cache.py`,
the judges in `ch03_judges.py`.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from ...config import ModelConfig
from ...model import Transformer
from .ch01_attention import smollm

# A small random Llama-style model: big enough that recomputing 256 steps costs clearly
# more than caching them (about 7x on one thread here), small enough to build instantly.
SMALL = dict(vocab_size=512, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, ffn_dim=384,
             max_seq_len=512)


@lru_cache(maxsize=None)
def small_model(kv_block_size: int = 16) -> Transformer:
    """The same random weights on every call and in every process (seeded generator)."""
    g = torch.Generator().manual_seed(0)
    model = Transformer(ModelConfig.from_name("tiny", **SMALL, kv_block_size=kv_block_size)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 if "embeddings" in name else p.shape[-1] ** -0.5))
    return model.requires_grad_(False)


def model_named(name: str, kv_block_size: int = 16) -> Transformer:
    return smollm()[0] if name == "smollm2" else small_model(kv_block_size)


# -- feeding a sequence through a KV cache ------------------------------------------------------


@torch.inference_mode()
def forced_logits(model: Transformer, ids: torch.Tensor, n_prefill: int, chunk: int,
                  rewind: bool = False) -> torch.Tensor:
    """Teacher-forced decoding through the model's KV cache: the first n_prefill tokens in
    one forward, then the rest `chunk` tokens at a time. Returns the logits that predict
    tokens n_prefill .. T, shape (B, T - n_prefill + 1, V): what recomputation gives as
    model(ids)[:, n_prefill - 1:]. Forced tokens, not greedy ones: a near-tie between two
    logits cannot send two processes down different paths.

    rewind=True is speculative decoding whose drafts are always rejected: each call brings
    the sequence's next token followed by wrong guesses (chunk - 1 of them, or none every
    other step, as a prompt-lookup draft that found nothing), and the next call starts
    right after that token, overwriting the guesses' slots. So `start` goes back, and
    start+T can be smaller than in the call before; a cache must return slots
    0 .. start+T-1 as written last, whatever it held past them."""
    B, T = ids.shape
    model.setup_cache(B, T + chunk)
    try:
        out = [model(ids[:, :n_prefill])[:, -1:]]
        for s in range(n_prefill, T, 1 if rewind else chunk):
            if not rewind:
                out.append(model(ids[:, s : s + chunk], start=s))
                continue
            n_guesses = chunk - 1 if (s - n_prefill) % 2 == 0 else 0
            guesses = (ids[:, s : s + 1] + 1 + torch.arange(n_guesses)) % model.config.vocab_size  # (B, n_guesses)
            out.append(model(torch.cat([ids[:, s : s + 1], guesses], dim=1), start=s)[:, :1])
        return torch.cat(out, dim=1)
    finally:
        model.clear_cache()


def decode_with_cache(cache_class, ids: torch.Tensor, n_prefill: int, chunk: int = 1,
                      model: str = "small", rewind: bool = False) -> torch.Tensor:
    """Task 3.2: `forced_logits` with the learner's KV cache class in every layer."""
    try:  # one tiny update first: an unwritten class fails here, before any model is loaded
        cache_class(1, 1, 2, 2).update(0, torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2))
    except NotImplementedError:
        raise
    except Exception:  # noqa: BLE001 (the real cases below report it in context)
        pass
    engine = model_named(model)
    engine.set_kv_cache(cache_class)
    try:
        return forced_logits(engine, ids, n_prefill, chunk, rewind)
    finally:
        engine.set_kv_cache("static")


@torch.inference_mode()
def logits_by_recomputation(ids: torch.Tensor, n_prefill: int, chunk: int = 1, model: str = "small") -> torch.Tensor:
    """Task 3.2's speed baseline, no cache: every step runs the whole prefix again, one
    token longer each time (chunk is accepted for the same signature, and ignored)."""
    engine = model_named(model)
    return torch.cat([engine(ids[:, :end])[:, -1:] for end in range(n_prefill, ids.shape[1] + 1)], dim=1)


def decode_with_allocator(allocator_class, ids: torch.Tensor, n_prefill: int, block_size: int,
                          draft: int = 1) -> torch.Tensor:
    """Task 3.5: `forced_logits` through the engine's paged cache, blocks handed out by the
    learner's allocator; draft > 1 rewinds after drafts of that many tokens."""
    engine = small_model(block_size)
    engine.set_kv_cache("paged", allocator=allocator_class)
    try:
        return forced_logits(engine, ids, n_prefill, draft, rewind=draft > 1)
    finally:
        engine.set_kv_cache("static")


def replay_allocator(allocator_class, ops: torch.Tensor, n_blocks: int, block_size: int,
                     n_sequences: int) -> torch.Tensor:
    """Task 3.5: run a script of (op, seq, n_slots) rows, op 0 = ensure(seq, n_slots) and
    op 1 = release(seq), and record after every op where each held slot of every sequence
    lives. Returns rows (op index, seq, slot, block, offset, raised): raised = 1 rows
    (slot, block, offset = -1) mark an ensure that raised an error."""
    allocator = allocator_class(n_blocks, block_size, n_sequences)
    held = [0] * n_sequences
    rows = []
    for i, (op, seq, n) in enumerate(ops.tolist()):
        if op == 1:
            allocator.release(seq)
            held[seq] = 0
        else:
            try:
                allocator.ensure(seq, n)
            except NotImplementedError:
                raise
            except Exception:  # noqa: BLE001 (any error counts as refusing; the judge decides if it should have)
                rows.append([i, seq, -1, -1, -1, 1])
            else:
                held[seq] = max(held[seq], n)
        for s, n_slots in enumerate(held):
            if n_slots:
                blocks, offsets = allocator.locate(s, torch.arange(n_slots))
                blocks, offsets = torch.as_tensor(blocks).long().flatten(), torch.as_tensor(offsets).long().flatten()
                if blocks.numel() != n_slots or offsets.numel() != n_slots:
                    raise ValueError(f"locate({s}, slots) must return one block and one offset per slot: asked for "
                                     f"{n_slots} slots, got {blocks.numel()} blocks and {offsets.numel()} offsets")
                rows += [[i, s, slot, b, o, 0] for slot, (b, o) in enumerate(zip(blocks.tolist(), offsets.tolist()))]
    return torch.tensor(rows, dtype=torch.long).reshape(-1, 6)


# -- beam search's step function --------------------------------------------------------------


class MarkovStep:
    """step(prefixes) -> log-probabilities (n, V) of the next token, from a table indexed by
    each prefix's last token: a toy language model whose answers are known exactly."""

    def __init__(self, table: torch.Tensor):
        self.logprobs = table.double().log_softmax(-1)  # (V, V)

    def __call__(self, prefixes) -> torch.Tensor:
        return self.logprobs[[int(p[-1]) for p in prefixes]].clone()


@lru_cache(maxsize=1)
def smollm64() -> Transformer:
    """SmolLM2 in float64: two processes scoring the same prefix agree to ~1e-15, so a
    near-tie cannot make the learner's search and the reference's part ways."""
    from ...load import load_model

    return load_model(dtype=torch.float64, pack=False)[0]


class PrefixScorer:
    """step(prefixes) -> SmolLM2's log-probabilities (n, V) of the token after each prefix.

    Keeps the keys and values of the prefixes it scored at the last two lengths, so that
    scoring a prefix one token longer than a known one costs one token (beam search asks for
    exactly those, all beams at once or one by one); any other prefix is run from scratch."""

    def __init__(self, model: Transformer | None = None):
        self._model = model  # None: SmolLM2 in float64, loaded at the first call
        self.known: dict[tuple, list] = {}  # prefix -> per layer (k, v), each (KV, len, D)

    @property
    def model(self) -> Transformer:
        if self._model is None:
            self._model = smollm64()
        return self._model

    @torch.inference_mode()
    def __call__(self, prefixes) -> torch.Tensor:
        prefixes = [tuple(int(t) for t in p) for p in prefixes]
        if prefixes and len({len(p) for p in prefixes}) == 1 and all(p[:-1] in self.known for p in prefixes):
            logits, caches = self._extend(prefixes)
        else:
            pairs = [self._from_scratch(p) for p in prefixes]
            logits, caches = torch.cat([lg for lg, _ in pairs]), [c for _, cs in pairs for c in cs]
        # keep what the next calls may extend: this length and the one before (a search that
        # asks for one beam per call still finds every parent)
        shortest = max(len(p) for p in prefixes) - 1 if prefixes else 0
        self.known = {p: c for p, c in self.known.items() if len(p) >= shortest} | dict(zip(prefixes, caches))
        return logits.double().log_softmax(-1)

    def _from_scratch(self, prefix: tuple) -> tuple[torch.Tensor, list]:
        self.model.setup_cache(1, len(prefix))
        try:
            logits = self.model(torch.tensor([prefix]))[:, -1]  # (1, V)
            return logits, self._read(1, len(prefix))
        finally:
            self.model.clear_cache()

    def _extend(self, prefixes: list[tuple]) -> tuple[torch.Tensor, list]:
        n, L = len(prefixes), len(prefixes[0])
        self.model.setup_cache(n, L)
        try:
            for i, layer in enumerate(self.model.layers):
                cache = layer.attn.kv_cache
                for row, p in enumerate(prefixes):
                    k, v = self.known[p[:-1]][i]
                    cache.k_cache[row, :, : L - 1] = k
                    cache.v_cache[row, :, : L - 1] = v
            logits = self.model(torch.tensor([p[-1:] for p in prefixes]), start=L - 1)[:, -1]  # (n, V)
            return logits, self._read(n, L)
        finally:
            self.model.clear_cache()

    def _read(self, n: int, L: int) -> list:
        caches = [layer.attn.kv_cache for layer in self.model.layers]
        return [[(c.k_cache[row, :, :L].clone(), c.v_cache[row, :, :L].clone()) for c in caches] for row in range(n)]


def step_for(source) -> MarkovStep | PrefixScorer:
    return MarkovStep(source) if isinstance(source, torch.Tensor) else PrefixScorer()


def run_beam_search(search, source, prompt: torch.Tensor, beam_width: int, max_new_tokens: int,
                    length_penalty: float, stop_id) -> tuple[torch.Tensor, torch.Tensor]:
    """Task 3.3: call the learner's search with a step function; (tokens, score) as tensors."""
    result = search(step_for(source), prompt.tolist(), beam_width, max_new_tokens, length_penalty, stop_id)
    try:
        tokens, score = result
        return torch.tensor([int(t) for t in tokens], dtype=torch.long), torch.tensor(float(score), dtype=torch.float64)
    except (TypeError, ValueError):
        raise TypeError(f"beam_search must return (tokens, score): a list of token ids and a float; got "
                        f"{type(result).__name__}") from None


# -- the accept/reject step, many times --------------------------------------------------------


def accept_trials(accept, p: torch.Tensor, q: torch.Tensor, n_trials: int) -> torch.Tensor:
    """Task 3.4: draw n_trials drafts from q (row i for draft position i), call the
    learner's accept_or_resample on each. Returns (n_trials, k + 2) long rows:
    draft tokens, number accepted, next token."""
    k = q.shape[0]
    draft_g, accept_g = torch.Generator().manual_seed(7), torch.Generator().manual_seed(11)
    drafts = torch.stack([torch.multinomial(q[i], n_trials, replacement=True, generator=draft_g) for i in range(k)], 1)
    rows = []
    for draft in drafts.tolist():
        result = accept(p.clone(), q.clone(), draft, accept_g)
        try:
            n_accepted, token = (int(x) for x in result)
        except (TypeError, ValueError):
            raise TypeError(f"accept_or_resample must return (n_accepted, token), two ints; got {result!r}") from None
        rows.append(draft + [n_accepted, token])
    return torch.tensor(rows, dtype=torch.long)
