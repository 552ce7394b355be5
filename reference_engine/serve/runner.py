"""One forward over a continuous batch: ragged chunks, keys and values in a paged pool.

A step of continuous batching mixes requests at different places: some feed one token
(decoding), some a chunk of their prompt, each at its own position and with its own
history. `Transformer.forward` takes a rectangular batch with one cache slot for every row,
which this does not fit. `forward_step` runs the same modules on the step's tokens laid end
to end, one row of N tokens:

  - every matmul (Q/K/V, output projection, MLP, head) sees all N tokens at once, which is
    where batching pays: the weights are read once per step, not once per request;
  - RoPE uses each token's own position;
  - keys and values are written into the pool at each token's slot, found through its
    request's block table: slot = table[pos // block_size] * block_size + pos % block_size;
  - attention is the only per-request part: the decoding requests are gathered into one
    padded batch (one query each, keys masked past each one's length), each prompt chunk
    attends to its own keys causally. Gathering costs a copy per layer; where the compiled
    kernels are built, the decoding requests' attention reads the pool in place instead
    (`paged_attention`, csrc/paged_attention.cpp), for float32 activations and a float32,
    float16 or int8 pool with the model's own attention function, and a step in which
    every request decodes runs each block as one compiled call (`PagedRunner`).

The result is the logits of the last token of each chunk that samples (`Step.samples`).
The rows never mix: in float64 each request's greedy output is exactly what it gets alone
(tests check it); in float32, matmuls of other shapes may round differently in the last bits.
"""

from __future__ import annotations

import torch

from .. import cpu_kernels, fused_decode
from ..attention import ATTENTION_IMPLS
from ..errors import DojoError
from ..kv_cache import dequantize_kv, int8_scale_shape, quantize_kv
from ..model import Transformer


def gather(pool: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Rows of a pool (KV, S, D) at slots of any shape -> (*slots.shape, KV, D)."""
    rows = pool.index_select(1, slots.reshape(-1))  # (KV, n, D)
    return rows.view(pool.shape[0], *slots.shape, pool.shape[2]).movedim(0, -2)


class LayerPool:
    """One layer's keys and values for every pool row, head by head: (n_kv_heads, rows,
    head_dim) each, so that a request's rows of one head lie D values apart as in the static
    cache (csrc/paged_attention.cpp says what that is worth). Stored in the model's KV dtype
    (`Transformer.set_kv_dtype`): as they are, rounded to 16 bits, or as int8 codes with a
    float32 scale per 32 values (`kv_cache.quantize_kv`, the static cache's arithmetic). Read
    back in the weights' dtype, as the static caches are."""

    def __init__(self, rows: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype, device):
        self.codes = dtype == torch.int8
        scales = int8_scale_shape(n_kv_heads, rows, head_dim=head_dim) if self.codes else (0,)
        self.k, self.v = (torch.zeros(n_kv_heads, rows, head_dim, dtype=dtype, device=device) for _ in "kv")
        self.k_scale, self.v_scale = (torch.zeros(scales, device=device) for _ in "kv")

    def write(self, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Keys and values (N, KV, D) of N new tokens into pool rows `rows` (N,)."""
        for pool, scale, x in ((self.k, self.k_scale, k), (self.v, self.v_scale, v)):
            if self.codes:
                codes, s = quantize_kv(x)  # (N, KV, D), (N, KV, D / 32)
                pool.index_copy_(1, rows, codes.transpose(0, 1))
                scale.index_copy_(1, rows, s.transpose(0, 1))
            else:
                pool.index_copy_(1, rows, x.transpose(0, 1).to(pool.dtype))

    def read(self, slots: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values at pool rows `slots` (any shape), (*slots.shape, KV, D) in `dtype`."""
        def one(pool: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
            x = gather(pool, slots)
            return (dequantize_kv(x, gather(scale, slots)) if self.codes else x).to(dtype)

        return one(self.k, self.k_scale), one(self.v, self.v_scale)

    def compiled(self) -> bool:
        """True where `paged_attention` reads this pool: a dtype the compiled attention reads
        (bfloat16 has no loader there), heads of 16 to 512 values in steps of 16, on the CPU,
        with the kernels built and loaded."""
        return (cpu_kernels._loaded is not None and self.k.device.type == "cpu"
                and self.k.dtype in (torch.float32, torch.float16, torch.int8) and self.k.shape[2] % 16 == 0
                and self.k.shape[2] <= 512)

    @property
    def bytes_per_row(self) -> int:
        """Bytes of one pool row: its keys and values in every head (and an int8 pool's scales)."""
        return sum(t[:, 0].numel() * t.element_size() for t in (self.k, self.v, self.k_scale, self.v_scale)
                   if t.numel())


class PagedRunner:
    """The KV pool of every layer (`LayerPool`, n_blocks * block_size rows each) and the
    forward that reads and writes it. Where the compiled kernels apply, a decoding request
    goes the fastest of three ways, and `decode_path` can hold it to a slower one (what
    `bench-serve --step` compares, side by side):

      "fused":    a step in which every request decodes one token (continuous batching's
                  steady state) runs each block as one compiled call that writes and reads
                  the pool through each request's rows (`llama_block_decode_paged`, the math
                  of chapter 3's fused block); other steps run as below;
      "in_place": the blocks run as modules; the decoding requests' attention reads the
                  pool in place (`paged_attention`);
      "gathered": the readable path of the module docstring, nothing compiled but what the
                  modules themselves call."""

    DECODE_PATHS = ("fused", "in_place", "gathered")
    decode_path = "fused"

    def __init__(self, model: Transformer, n_blocks: int, block_size: int):
        c = model.config
        if c.pos_encoding == "alibi":
            raise DojoError("serving takes models with RoPE, learned or sinusoidal positions; ALiBi's "
                            "per-request distance mask is not built here")
        self.model, self.block_size = model, block_size
        p = model.tok_embeddings.weight
        dtype = model.kv_dtype or p.dtype
        self.pools = [LayerPool(n_blocks * block_size, c.n_kv_heads, c.head_dim, dtype, p.device)
                      for _ in model.layers]

    @property
    def bytes_per_token(self) -> int:
        """K and V of one token in every layer (and an int8 pool's scales)."""
        return len(self.pools) * self.pools[0].bytes_per_row

    def slots(self, table: list[int], positions: range) -> torch.Tensor:
        """Pool rows of these positions of a request. Example: block_size 4, table [7, 2]:
        positions 3..5 -> [7*4+3, 2*4+0, 2*4+1] = [31, 8, 9]."""
        bs = self.block_size
        return torch.tensor([table[p // bs] * bs + p % bs for p in positions], dtype=torch.long)

    @torch.inference_mode()
    def forward_step(self, chunks: list[tuple[list[int], int, list[int], bool]]) -> torch.Tensor:
        """chunks: (token ids, position of the first, block table, sample?) per request.
        Returns float32 logits (number of chunks that sample, vocab), in chunk order."""
        if self.decode_path not in self.DECODE_PATHS:
            raise DojoError(f"decode_path must be one of {', '.join(self.DECODE_PATHS)}, not {self.decode_path!r}")
        model = self.model
        device = model.tok_embeddings.weight.device
        ids = torch.tensor([t for tokens, *_ in chunks for t in tokens], device=device)[None]  # (1, N)
        spans = [range(start, start + len(tokens)) for tokens, start, *_ in chunks]
        positions = torch.tensor([p for span in spans for p in span], device=device)[None]  # (1, N)
        new_slots = torch.cat([self.slots(c[2], span) for c, span in zip(chunks, spans)]).to(device)  # (N,)
        self._check_distinct(new_slots)
        plan = self._attention_plan(chunks, spans, device)
        decode, prompts = plan
        blocks = self._fused_plan() if decode is not None and not prompts else None
        if blocks is not None:  # every chunk one token: ids and positions are (1, B)
            return self._fused_decode(blocks, chunks, ids[0], positions[0], new_slots, decode)
        x, rope, _ = model.embed(ids, 0, positions, None)  # (1, N, d_model); RoPE at each token's position
        for i, layer in enumerate(model.layers):
            h = layer.attn_norm(x)
            x = x + self._attention(layer.attn, h, rope, self.pools[i], new_slots, plan)
            x = x + layer.mlp(layer.ffn_norm(x))
        ends = [sum(len(c[0]) for c in chunks[: j + 1]) - 1 for j, c in enumerate(chunks) if c[3]]
        return model.head(model.norm(x[:, ends]))[0]  # (n sampled, vocab)

    def _fused_plan(self) -> fused_decode.Plan | None:
        """The compiled blocks' arguments (`fused_decode.Plan` without a static cache) where a
        step of decodes may run fused: the model qualifies (`fused_decode.applies`: its own
        modules, unhooked, weights packed and unedited, float32 on the CPU) and the compiled
        attention reads the pool."""
        if self.decode_path != "fused" or not self.pools[0].compiled():
            return None
        return fused_decode.plan_for(self.model, cache=False)

    def _fused_decode(self, blocks: fused_decode.Plan, chunks, ids: torch.Tensor, positions: torch.Tensor,
                      new_slots: torch.Tensor, decode) -> torch.Tensor:
        """The step when every chunk is one decoding token (ids, positions (B,)): x (B, d_model)
        through one compiled call per block, each request's key and value written to its pool
        row and its attention read from its own rows; then the final norm and the head, as in
        `forward_step`."""
        model, kernels = self.model, cpu_kernels._loaded
        _, rows, _, lengths = decode
        x, cos, sin = fused_decode.step_inputs(model, ids, positions)
        for block, pool in zip(blocks.blocks, self.pools):
            attn_norm, ffn_norm, eps, wqkv, wo, w13, w2, _, _, n_heads, adjacent, _, _ = block  # (no static cache)
            kernels.llama_block_decode_paged(x, attn_norm, ffn_norm, eps, wqkv, wo, w13, w2, pool.k, pool.v,
                                             pool.k_scale, pool.v_scale, new_slots, rows, lengths, cos, sin, n_heads,
                                             adjacent)
        sampled = [j for j, c in enumerate(chunks) if c[3]]
        return model.head(model.norm(x[sampled][None]))[0]  # (n sampled, vocab)

    @staticmethod
    def _check_distinct(new_slots: torch.Tensor) -> None:
        """Two new tokens writing one pool row would leave one of them lost (index_copy_ keeps
        either; the fused block refuses): the scheduler never builds such tables, and a
        caller that does gets told, down every path alike."""
        rows, counts = torch.unique(new_slots, return_counts=True)
        shared = counts > 1
        if bool(shared.any()):
            row, n = int(rows[shared][0]), int(counts[shared][0])
            raise DojoError(f"forward_step: {n} new tokens would write pool row {row}; each token needs a row of "
                            "its own (check the block tables and positions of the chunks)")

    def _attention_plan(self, chunks, spans, device) -> tuple:
        """Which tokens attend to which pool rows, worked out once for all layers:
        (decode token indices, their key slots (B, L) padded, mask (B, 1, 1, L) or None,
        lengths (B,)) and, per prompt chunk, (its token indices, its key slots, mask or None
        when plain causal)."""
        offsets, n = [], 0
        for tokens, *_ in chunks:
            offsets.append(n)
            n += len(tokens)
        decodes = [j for j, c in enumerate(chunks) if len(c[0]) == 1]
        decode = None
        if decodes:
            # every slot of every decoding request at once, as `slots` finds them one by one (per
            # request and position in Python, that took 0.6 ms of an 8 ms step at batch 16 over
            # 200 slots): row = table[pos // bs] * bs + pos % bs for pos < its length
            bs, lengths = self.block_size, torch.tensor([spans[j].stop for j in decodes])  # (B,)
            L = int(lengths.max())
            n_blocks = -(-L // bs)
            tables = torch.tensor([(chunks[j][2] + [0] * n_blocks)[:n_blocks] for j in decodes])  # (B, n_blocks)
            slots = (tables[:, :, None] * bs + torch.arange(bs)).view(len(decodes), -1)[:, :L]  # (B, L)
            valid = torch.arange(L) < lengths[:, None]  # (B, L)
            slots = slots.masked_fill(~valid, 0)  # padding reads row 0, masked out
            mask = None if bool(valid.all()) else valid[:, None, None, :].to(device)
            decode = (torch.tensor([offsets[j] for j in decodes], device=device), slots.to(device), mask, lengths)
        prompts = []
        for j, (tokens, start, table, _) in enumerate(chunks):
            if len(tokens) > 1:
                T, L = len(tokens), spans[j].stop
                # queries are the last T of L keys: query i sees keys 0 .. start + i
                mask = None if start == 0 else torch.ones(T, L, dtype=torch.bool, device=device).tril(start)
                prompts.append((range(offsets[j], offsets[j] + T), self.slots(table, range(L)).to(device), mask))
        return decode, prompts

    def _attention(self, attn, h: torch.Tensor, rope, pool: LayerPool, new_slots, plan) -> torch.Tensor:
        """`Attention.forward` for ragged chunks: the same projections and RoPE, keys and values
        written to the pool, then attention per group (module docstring)."""
        _, N, _ = h.shape
        H, KV, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
        qkv = attn.wqkv(h).view(1, N, H + 2 * KV, D)  # (1, N, H+2KV, D)
        qk, v = qkv[:, :, : H + KV], qkv[0, :, H + KV :]
        if attn.rope_layout is not None:
            qk = attn.rotate(qk, *rope, attn.rope_layout)
        q, k = qk[0, :, :H], qk[0, :, H:]  # (N, H, D), (N, KV, D)
        pool.write(new_slots, k, v)  # each new token's K and V into its pool row
        y = torch.empty(N, H, D, dtype=h.dtype, device=h.device)
        decode, prompts = plan
        if decode is not None:
            rows, slots, mask, lengths = decode
            if (self.decode_path != "gathered" and q.dtype == torch.float32 and pool.compiled()
                    and attn.attend is ATTENTION_IMPLS[self.model.config.attn_impl]):
                # the same softmax(q k^T / sqrt(D)) v, each request's rows read where they are
                y[rows] = cpu_kernels._loaded.paged_attention(q[rows].contiguous(), pool.k, pool.v, pool.k_scale,
                                                              pool.v_scale, slots, lengths)
            else:
                keys, values = (t.transpose(1, 2) for t in pool.read(slots, q.dtype))  # (B, L, KV, D) -> (B, KV, L, D)
                y[rows] = attn.attend(q[rows][:, :, None], keys, values, mask, False)[:, :, 0]  # (B, H, D)
        for rows, slots, mask in prompts:
            keys, values = (t.transpose(0, 1)[None] for t in pool.read(slots, q.dtype))  # (L, KV, D) -> (1, KV, L, D)
            qs = q[rows.start : rows.stop].transpose(0, 1)[None]  # (1, H, T, D)
            y[rows.start : rows.stop] = attn.attend(qs, keys, values, mask, mask is None)[0].transpose(0, 1)
        return attn.wo(y.view(1, N, H * D))
