"""The transformer: norms, attention block, MLP, the stack, and the LM head.

Read top to bottom: building blocks first, then `Block`, then `Transformer`.
One code path serves both families (see `config.py`); the choice is made per module
from the config, never by `if` inside the hot loop.

Two fusions keep batch-1 decoding close to the memory-bandwidth bound on a CPU, where
every kernel launch costs microseconds of Python and dispatch:
  - Q, K and V are one matmul (`wqkv`), their rows stacked [Q; K; V];
  - the SwiGLU gate and up projections are one matmul (`w13`), rows stacked [gate; up].
The math is unchanged: a stacked matmul is the same dot products, done in one call.
Where the compiled kernels are built, a decode step of a Llama-family model goes further
and runs each block as one C++ call (`fused_decode.py`, chosen once per forward).
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_kernels, fused_decode
from .attention import ATTENTION_IMPLS
from .config import ModelConfig
from .errors import DojoError
from .kv_cache import BlockAllocator, Int8KVCache, KVCache, PagedKVCache
from .positional import alibi_bias, apply_rope, rope_tables, sinusoidal_table


class PackedWeight:
    """A copy of a weight matrix laid out for small-batch CPU matmuls (decoding).

    subtle: decoding multiplies a few rows of activations by each weight matrix, so its
    speed is the speed of streaming the weights from memory. On some CPUs (AMD EPYC among
    them) MKL, which F.linear calls, runs these skinny products at about a third of the
    memory bandwidth. Where the compiled kernels are built (`cpu_kernels.py`) the copy is
    in their layout, column blocks of 16 outputs (`blocks`); otherwise it is in oneDNN's
    blocked layout (`blocked`), which oneDNN, also inside PyTorch, runs 2x faster than MKL.
    The copy doubles the memory of the matrices. It is used only while the original is
    unchanged: replacing or editing the weight in place makes `linear` fall back to
    F.linear, so a stale copy can never give wrong results.
    """

    MAX_ROWS = 64  # larger inputs (prefill) are compute-bound: MKL's gemm does well there

    def __deepcopy__(self, memo):
        """A deep copy of a model drops its packed copies (they hold the compiled module,
        which cannot be copied): the copy multiplies through F.linear, the same values."""
        return None

    def __init__(self, weight: torch.Tensor):
        self.source = weight
        self.version = weight._version
        self.address = (weight.data_ptr(), weight.dtype)  # model.double() swaps .data under the same Parameter
        self.kernels = cpu_kernels.kernels() if weight.is_contiguous() else None
        self.blocks = self.kernels.pack_weight(weight.detach()) if self.kernels else None  # (out/16, in, 16)
        self.blocked = None if self.kernels else torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 16)

    def current(self, weight: torch.Tensor) -> bool:
        """True while `weight` is the very tensor that was copied, unchanged since."""
        return (weight is self.source and weight._version == self.version
                and (weight.data_ptr(), weight.dtype) == self.address)

    def fits(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        """A current copy, a small input, and no gradient wanted (the kernels have none)."""
        wants_grad = torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad)
        return (self.current(weight) and not wants_grad and x.dtype == weight.dtype
                and x.numel() <= self.MAX_ROWS * x.shape[-1])

    @staticmethod
    def supported(weight: torch.Tensor) -> bool:
        return (weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.dim() == 2
                and torch.backends.mkldnn.is_available())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           packed: PackedWeight | None = None) -> torch.Tensor:
    """y = x W^T + b. With a current packed copy of W and at most 64 rows in x (decoding):
    the compiled kernel of `cpu_kernels.py` where built, oneDNN otherwise; anything else
    through F.linear."""
    if packed is None or not packed.fits(x, weight):
        return F.linear(x, weight, bias)
    if packed.blocks is None:
        return torch.ops.mkldnn._linear_pointwise(x, packed.blocked, bias, "none", [], "")
    rows = x.numel() // x.shape[-1]
    y = packed.kernels.packed_linear(x.reshape(rows, x.shape[-1]).contiguous(), packed.blocks, weight.shape[0])
    y = y.view(*x.shape[:-1], weight.shape[0])
    return y if bias is None else y + bias


class Linear(nn.Linear):
    """nn.Linear that can keep a `PackedWeight` copy for decoding (see `Transformer.pack_for_cpu`)."""

    packed: PackedWeight | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.packed)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = x / sqrt(mean(x^2) + eps) * weight, the statistic in float32 at least (`RMSNorm`)."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))  # float32 and float64 unchanged
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight).to(x.dtype)


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight  (no mean subtraction, no bias).

    subtle: in a bfloat16 or float16 model the statistic is computed in float32: float16
    overflows once |x| passes 256 (x^2 > 65504, SmolLM2's residual stream gets there), and
    a mean of 576 squares in bfloat16 keeps only 8 bits of it."""

    fused = None  # f(x, weight, eps): a fused kernel doing the same (`Transformer.set_kernels`)

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused is not None:
            return self.fused(x, self.weight, self.eps)
        return rms_norm(x, self.weight, self.eps)


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.d_model, config.norm_eps)
    return nn.LayerNorm(config.d_model, eps=config.norm_eps)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        qkv_rows = (config.n_heads + 2 * config.n_kv_heads) * config.head_dim
        self.wqkv = Linear(config.d_model, qkv_rows, bias=config.bias)  # rows: [Q; K; V]
        self.wo = Linear(config.n_heads * config.head_dim, config.d_model, bias=config.bias)
        self.rope_layout = config.rope_layout if config.pos_encoding == "rope" else None
        self.kv_cache: KVCache | PagedKVCache | None = None
        self.attend = ATTENTION_IMPLS[config.attn_impl]  # (q, k, v, mask, is_causal) -> (B, H, T, D)
        self.rotate = apply_rope  # (x, cos, sin, layout) -> x rotated (`Transformer.set_kernels`)

    def use_cache(self, cache) -> None:
        """Attach a KV cache (anything with update(start, k, v)), or None to detach it. Kept
        out of the module tree on purpose: a cache holds no weights, and a cache class that
        is not an nn.Module must be accepted too."""
        self._modules.pop("kv_cache", None)
        self.__dict__["kv_cache"] = cache

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                start: int, mask: torch.Tensor | None) -> torch.Tensor:
        B, T, _ = x.shape
        H, KV, D = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = self.wqkv(x).view(B, T, H + 2 * KV, D)  # (B, T, H+2KV, D)
        qk, v = qkv[:, :, : H + KV], qkv[:, :, H + KV :]
        if self.rope_layout is not None:
            qk = self.rotate(qk, *rope, self.rope_layout)  # Q and K heads rotated in one call
        q = qk[:, :, :H].transpose(1, 2)  # (B, H, T, D)
        k = qk[:, :, H:].transpose(1, 2)  # (B, KV, T, D)
        v = v.transpose(1, 2)  # (B, KV, T, D)
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(start, k, v)  # (B, KV, start+T, D)
            if k.dtype != q.dtype:  # a cache in another dtype (`set_kv_dtype`): stored rounded, used as q's
                k, v = k.to(q.dtype), v.to(q.dtype)
        # subtle: is_causal aligns the mask top-left, which is right only when queries and
        # keys start at the same slot; the model passes a mask (causal included) otherwise.
        y = self.attend(q, k, v, mask, T > 1 and mask is None)  # (B, H, T, D)
        return self.wo(y.transpose(1, 2).reshape(B, T, H * D))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.swiglu = config.mlp == "swiglu"
        up_rows = 2 * config.ffn_dim if self.swiglu else config.ffn_dim
        self.w13 = Linear(config.d_model, up_rows, bias=config.bias)  # rows: [gate; up]
        self.w2 = Linear(config.ffn_dim, config.d_model, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.w13(x)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            return self.w2(F.silu(gate) * up)
        return self.w2(F.gelu(h, approximate="tanh"))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attn_norm = make_norm(config)
        self.attn = Attention(config)
        self.ffn_norm = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, rope, start, mask):
        x = x + self.attn(self.attn_norm(x), rope, start, mask)
        return x + self.mlp(self.ffn_norm(x))


def embedding(rows: int, dim: int) -> nn.Embedding:
    """nn.Embedding, initialised at random except on the meta device, where load.py builds
    the model before the file's weights replace everything: a random initialisation there
    runs PyTorch's Python decompositions, about a second in every fresh process."""
    if torch.empty(0).is_meta:
        return nn.Embedding(rows, dim, _weight=torch.empty(rows, dim))
    return nn.Embedding(rows, dim)


class Transformer(nn.Module):
    """`model(input_ids)` -> float32 logits (batch, seq, vocab), no cache involved.

    With a cache (`setup_cache`), `forward(ids, start=s)` feeds tokens into cache slots
    s, s+1, ...; `generate.py` builds prefill and decode on top of that.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = embedding(config.vocab_size, config.d_model)
        if config.pos_encoding == "learned":
            self.pos_embeddings = embedding(config.max_seq_len, config.d_model)
        self.make_position_tables()
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = make_norm(config)
        if not config.tie_embeddings:
            self.lm_head = Linear(config.d_model, config.vocab_size, bias=False)

    tied_head_packed: PackedWeight | None = None

    def make_position_tables(self) -> None:
        """(Re)build the fixed tables the config asks for: the sinusoid added to the
        embeddings, or RoPE's cos/sin. Not saved in the state dict: they follow the config."""
        c, device = self.config, self.tok_embeddings.weight.device
        if device.type == "meta":  # load.py makes them once the weights are in (meta ops cost a second)
            return
        if c.pos_encoding == "sinusoidal":
            self.register_buffer("pos_table", sinusoidal_table(c.max_seq_len, c.d_model).to(device), persistent=False)
        elif c.pos_encoding == "rope":
            cos, sin = rope_tables(c.head_dim, c.max_seq_len, c.rope_base, c.rope_layout,
                                   c.rope_scaling, c.rope_scaling_factor)
            self.register_buffer("rope_cos", cos.to(device), persistent=False)  # (max_seq_len, head_dim)
            self.register_buffer("rope_sin", sin.to(device), persistent=False)

    def pack_for_cpu(self) -> bool:
        """Give every matmul a copy of its weight laid out for fast small-batch decoding:
        float32 weights a packed copy (see `PackedWeight`); quantized ones their codes
        repacked for the compiled integer matmul, and int8 activations per block of 32
        (`QuantizedLinear.prepare_kernel`; formats it does not cover stay as they are).
        Returns False, changing nothing, where unsupported (not float32, not on the CPU,
        PyTorch built without oneDNN)."""
        head = self.tok_embeddings.weight
        if not PackedWeight.supported(head):
            return False
        cpu_kernels.kernels()  # load them where built (never builds)
        for module in self.modules():
            if isinstance(module, Linear):
                module.packed = PackedWeight(module.weight)
            elif hasattr(module, "prepare_kernel"):  # a QuantizedLinear
                module.prepare_kernel()
        if "lm_head" not in self._modules:  # the embedding is the head (not when a quantized copy is)
            self.tied_head_packed = PackedWeight(head)
        return True

    def quantize(self, fmt: str, tokenizer=None, **options) -> "Transformer":
        """Quantize in place (see `compression.quantize.quantize_model`): fmt "int8",
        "int4-g32", "int4-g32-gptq", "w8a8", "w8a8-smooth", "q8_0", "bf16", ... The calibrated
        formats take tokenizer= (or calibration= token windows). Returns the model."""
        from .compression.quantize import quantize_model

        return quantize_model(self, fmt, tokenizer=tokenizer, **options)

    def set_rope(self, **changes) -> None:
        """Change how RoPE is applied, weights untouched: any of rope_layout, rope_scaling,
        rope_scaling_factor, rope_base, max_seq_len. Example, to read 4x past the trained
        length: model.set_rope(rope_scaling="ntk", rope_scaling_factor=4.0, max_seq_len=32768).
        subtle: rope_layout must match the order of the Q/K rows; changing it alone is the
        classic loader bug (it still runs, as a worse model)."""
        allowed = {"rope_layout", "rope_scaling", "rope_scaling_factor", "rope_base", "max_seq_len"}
        if self.config.pos_encoding != "rope" or not set(changes) <= allowed:
            raise DojoError(f"set_rope changes {sorted(allowed)} of a RoPE model; got {sorted(changes)} "
                            f"for pos_encoding={self.config.pos_encoding!r}")
        self.config = replace(self.config, **changes)
        self.make_position_tables()
        for layer in self.layers:
            layer.attn.rope_layout = self.config.rope_layout

    def set_attention(self, impl) -> None:
        """Switch every layer's attention: a name from `attention.ATTENTION_IMPLS` ("sdpa",
        "math", "tiled") or your own function f(q, k, v, mask, is_causal) -> (B, H, T, D),
        with q (B, H, T, D), k and v (B, KV, L, D), mask bool (B, 1, T, L) or None."""
        if isinstance(impl, str) and impl not in ATTENTION_IMPLS:
            raise DojoError(f"unknown attention {impl!r}; choose one of {sorted(ATTENTION_IMPLS)} or pass a function")
        fn = ATTENTION_IMPLS[impl] if isinstance(impl, str) else impl
        if not callable(fn):
            raise DojoError(f"set_attention expects a name in {sorted(ATTENTION_IMPLS)} or a function, got {fn!r}")
        for layer in self.layers:
            layer.attn.attend = fn

    def set_kernels(self, kind: str) -> None:
        """"triton": RMSNorm, RoPE and attention run as the Triton kernels of `kernels/`
        (compiled on a GPU, interpreted on a CPU); "torch": back to PyTorch's operations.
        Example: model.set_kernels("triton") on a CUDA model (load_model does it there)."""
        if kind not in ("torch", "triton"):
            raise DojoError(f"set_kernels takes 'torch' or 'triton', got {kind!r}")
        if kind == "torch":
            fused, rotate, attend = None, apply_rope, ATTENTION_IMPLS[self.config.attn_impl]
        else:
            from .kernels import layers  # imports triton (a DojoError says how to install it)

            fused, rotate, attend = layers.rmsnorm, layers.rope, layers.attention
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.fused = fused
            elif isinstance(module, Attention):
                module.rotate, module.attend = rotate, attend

    # -- cache management -------------------------------------------------------------

    cache_class: type = KVCache  # what a "static" cache is built from (`set_kv_cache`)
    allocator_class: type = BlockAllocator  # what hands out the blocks of a "paged" one
    kv_dtype: torch.dtype | None = None  # what the caches store (`set_kv_dtype`); None: the weights' dtype

    def set_kv_dtype(self, dtype: torch.dtype | str | None) -> None:
        """Store the keys and values of the engine's own caches that `setup_cache` builds
        (static or paged) in `dtype` from its next call on; None: the weights' dtype (the
        default). Attention still computes in the weights' dtype: each key and value is
        rounded once, when written. float16 halves the cache's bytes (SmolLM2: 23 KB per
        token instead of 46), which a decode step reads in whole at every token: at batch 16
        or over long prompts that read is a large part of the step. float16 keeps 11
        significant bits and values up to 65504; bfloat16 keeps 8 bits and float32's range.
        int8 (the static cache, not the paged one) stores 8-bit codes with a float32 scale per
        block of 32 values (`Int8KVCache`, as GGUF's Q8_0): 28% of float32's bytes, each value
        within 1/254 of its block's largest.
        (Chapter 9's serving pool, `serve/runner.py`, stores the same dtypes, int8 included;
        chapter 8's pipeline stages keep their own caches.)"""
        from .load import DTYPES  # the names --dtype takes (load imports this module)

        stored = {**DTYPES, "int8": torch.int8}.get(dtype, dtype) if isinstance(dtype, str) else dtype
        if stored not in (None, torch.float32, torch.float16, torch.bfloat16, torch.int8):
            raise DojoError(f"the KV cache stores float32, float16, bfloat16 or int8; got {dtype!r}")
        self.kv_dtype = stored

    def set_kv_cache(self, kind: str | type, allocator: type | None = None) -> None:
        """Choose the KV cache that `setup_cache` builds from now on:
          - "static" or "paged" (the engine's own);
          - your own class, built as cls(batch_size, n_kv_heads, max_seq_len, head_dim) in
            every layer, with update(start, k, v) -> (keys, values) as in `KVCache.update`;
          - "paged" with allocator=your class, built as cls(n_blocks, block_size, n_sequences),
            with ensure(seq, n_slots), release(seq) and locate(seq, slots) as in `BlockAllocator`.
        Example: model.set_kv_cache(MyCache); generate(model, prompts) now decodes with it."""
        if isinstance(kind, str):
            if kind not in ("static", "paged") or (allocator is not None and kind != "paged"):
                raise DojoError(f"set_kv_cache takes 'static', 'paged' (optionally with allocator=your class) "
                                f"or a cache class; got {kind!r} with allocator={allocator!r}")
            self.config = replace(self.config, kv_cache=kind)
            self.cache_class, self.allocator_class = KVCache, allocator or BlockAllocator
        elif isinstance(kind, type) and allocator is None:
            self.config = replace(self.config, kv_cache="static")
            self.cache_class, self.allocator_class = kind, BlockAllocator
        else:
            raise DojoError(f"set_kv_cache expects 'static', 'paged' or a class, got {kind!r}")

    def setup_cache(self, batch_size: int, max_seq_len: int | None = None) -> None:
        """A fresh KV cache in every layer for up to max_seq_len slots, of the kind the config
        names: "static" (allocated whole now) or "paged" (a pool of blocks with room for the
        same number of slots, handed to each sequence as it grows)."""
        c = self.config
        max_seq_len = max_seq_len or c.max_seq_len
        p = self.tok_embeddings.weight
        dtype = self.kv_dtype or p.dtype
        if dtype == torch.int8 and (c.kv_cache == "paged" or self.cache_class is not KVCache):
            raise DojoError("the int8 KV cache is the static one: use set_kv_cache('static'), or store a float type "
                            "(--kv-dtype float16, or set_kv_dtype) with the paged cache or your own")
        if c.kv_cache == "paged":
            n_blocks = batch_size * -(-max_seq_len // c.kv_block_size)
            allocator = self.allocator_class(n_blocks, c.kv_block_size, batch_size)  # one table for all layers
            for layer in self.layers:
                layer.attn.use_cache(PagedKVCache(allocator, n_blocks, c.n_kv_heads, c.head_dim, max_seq_len,
                                                  block_size=c.kv_block_size, dtype=dtype, device=p.device))
            return
        for layer in self.layers:
            if dtype == torch.int8:
                layer.attn.use_cache(Int8KVCache(batch_size, c.n_kv_heads, max_seq_len, c.head_dim, device=p.device))
            elif self.cache_class is KVCache:
                layer.attn.use_cache(KVCache(batch_size, c.n_kv_heads, max_seq_len, c.head_dim,
                                             dtype=dtype, device=p.device))
            else:
                layer.attn.use_cache(self.cache_class(batch_size, c.n_kv_heads, max_seq_len, c.head_dim))

    def reorder_cache(self, rows: torch.Tensor) -> None:
        """Batch row i of the cache becomes a copy of old row rows[i] (beam search)."""
        first = self.layers[0].attn.kv_cache
        holder = first.allocator if isinstance(first, PagedKVCache) else first
        if not hasattr(holder, "reorder"):
            raise DojoError(f"{type(holder).__name__} has no reorder(rows) method, which beam search needs "
                            "to copy cache rows between beams")
        if isinstance(first, PagedKVCache):
            src, dst = holder.reorder(rows.tolist())
            for layer in self.layers:
                layer.attn.kv_cache.copy_blocks(src, dst)
        else:
            for layer in self.layers:
                layer.attn.kv_cache.reorder(rows)

    def clear_cache(self) -> None:
        for layer in self.layers:
            layer.attn.use_cache(None)

    @property
    def cache_len(self) -> int | None:
        cache = self.layers[0].attn.kv_cache
        return None if cache is None else cache.max_seq_len

    # -- forward ------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, start: int = 0, positions: torch.Tensor | None = None,
                key_valid: torch.Tensor | None = None, last_only: bool = False,
                exit_layer: int | None = None) -> torch.Tensor:
        """input_ids: (B, T) LongTensor, fed into cache slots [start, start+T).

        positions: (B, T) position of each token (default start..start+T-1); left-padded
            batches pass their own so that padding does not shift the positions.
        key_valid: (B, start+T) bool, False for padding slots that no query may attend to.
        last_only: compute logits for the last token only (what generation needs).
        exit_layer: run only the first exit_layer blocks, then the final norm and head: a
            cheap draft of the full model for speculative decoding.
        Returns float32 logits (B, T, vocab), or (B, 1, vocab) with last_only.
        """
        B, T = input_ids.shape
        if start + T > self.config.max_seq_len:
            raise ValueError(f"{start + T} tokens exceed the model's context of {self.config.max_seq_len}")
        if positions is None:
            positions = torch.arange(start, start + T, device=input_ids.device).expand(B, T)
        plan = fused_decode.plan_for(self) if T == 1 and exit_layer is None else None
        if plan is not None:
            return fused_decode.forward(self, plan, input_ids, start, positions, key_valid)  # same math, compiled
        x, rope, mask = self.embed(input_ids, start, positions, key_valid)
        for layer in self.layers if exit_layer is None else self.layers[:exit_layer]:
            x = layer(x, rope, start, mask)
        if last_only:
            x = x[:, -1:]
        return self.head(self.norm(x))

    def embed(self, input_ids: torch.Tensor, start: int, positions: torch.Tensor,
              key_valid: torch.Tensor | None) -> tuple[torch.Tensor, tuple | None, torch.Tensor | None]:
        """What every block is called with: x = layer(x, rope, start, mask) for each layer.
        Returns the token embeddings (plus learned or sinusoidal positions) (B, T, d_model),
        RoPE's (cos, sin) for these positions or None, and the attention mask or None."""
        T = input_ids.shape[1]
        x = self.tok_embeddings(input_ids)  # (B, T, d_model)
        rope = None
        if self.config.pos_encoding == "learned":
            x = x + self.pos_embeddings(positions)
        elif self.config.pos_encoding == "sinusoidal":
            x = x + self.pos_table[positions].to(x.dtype)
        elif self.config.pos_encoding == "rope":
            rope = (self.rope_cos[positions].unsqueeze(2), self.rope_sin[positions].unsqueeze(2))  # (B, T, 1, D)
        mask = self._attention_mask(T, start, key_valid, x.device)
        if self.config.pos_encoding == "alibi":
            mask = self._alibi_mask(T, start, mask, x.dtype)
        return x, rope, mask

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """float32 logits from final-normed hidden states: the LM head (its own matrix, or a
        quantized copy of the tied one), else the embedding matrix itself."""
        if "lm_head" in self._modules:
            return self.lm_head(x).float()
        return linear(x, self.tok_embeddings.weight, packed=self.tied_head_packed).float()

    def _alibi_mask(self, T: int, start: int, mask: torch.Tensor | None, dtype) -> torch.Tensor:
        """float (B or 1, H, T, start+T): ALiBi's distance penalty, -inf where the bool mask
        (or, without one, causality) hides the key. Distances count cache slots, which equal
        position differences between real tokens because padding only ever comes first."""
        bias = alibi_bias(self.config.n_heads, T, start + T, self.tok_embeddings.weight.device)  # (H, T, L)
        if mask is not None:
            bias = bias.masked_fill(~mask, float("-inf"))  # (B, H, T, L)
        return (bias if bias.dim() == 4 else bias[None]).to(dtype)

    @staticmethod
    def _attention_mask(T: int, start: int, key_valid: torch.Tensor | None, device) -> torch.Tensor | None:
        """bool (B, 1, T, start+T) mask, or None when plain causal attention is exact:
        no padding, and either one query (sees every key) or queries start at slot 0."""
        if key_valid is None and (T == 1 or start == 0):
            return None
        L = start + T
        causal = torch.ones(T, L, dtype=torch.bool, device=device).tril(diagonal=start)  # (T, L)
        mask = causal[None, None]  # (1, 1, T, L)
        if key_valid is not None:
            # subtle: a padding query would see no key at all, and softmax over nothing is
            # NaN, which then leaks through 0 * NaN in later layers. Every query may always
            # attend to its own slot, which keeps padding rows finite (and ignored).
            own_slot = torch.zeros(T, L, dtype=torch.bool, device=device)
            own_slot[:, start:] = torch.eye(T, dtype=torch.bool, device=device)
            mask = (mask & key_valid[:, None, None, :L]) | own_slot  # (B, 1, T, L)
        return mask
