"""Decoding one token per row with compiled Llama blocks (`csrc/decode_kernels.cpp`).

A decode step at batch 1 does little arithmetic: its time is the time to read the weights
(about 17 ms for SmolLM2's 538 MB here) plus the cost of launching every small operator
around the matmuls. The PyTorch path of `model.py` launches about 35 of them per block,
over 1000 per token, which adds 5-7 ms of Python and dispatch to each token. This path
runs each block as one C++ call (`llama_block_decode`: the math of `Block.forward` for one
token per row) and leaves only the embedding lookup, the final norm and the head to
PyTorch.

It is taken only where it computes what the modules would (`applies`): the kernels are
built; the model is a float32 Llama-family model on the CPU, with heads a multiple of 16
floats wide (the compiled attention's vectors) and a float32, float16 or int8 cache; the weights are the ones
packed (not edited since), float32 or quantized (`QuantizedLinear` with its codes repacked
for the integer matmul, `compression/kernel_layout.py`); and nothing was swapped in: every block, attention, MLP and norm
is the engine's own class with no hooks, attention is the configured implementation (RoPE
and the norms PyTorch's own, not functions set in their place), the
cache is the engine's static `KVCache` or its `Int8KVCache`. A learner's attention function, cache class or
forward hook therefore always runs. No gradients flow through it, so it is also skipped
while autograd records.
"""

from __future__ import annotations

import itertools
import operator

import torch

from . import cpu_kernels
from . import model as m
from .attention import ATTENTION_IMPLS
from .compression.qlinear import QuantizedLinear
from .kv_cache import Int8KVCache, KVCache
from .positional import apply_rope

_NONE = torch.empty(0)  # the scales passed for a float cache (only an int8 cache has them)
_OWN_MODULES = {"attn_norm": "RMSNorm", "attn": "Attention", "ffn_norm": "RMSNorm", "mlp": "MLP"}


def applies(model: "m.Transformer", cache: bool = True) -> bool:
    """True when `forward` below gives the same logits as the modules for a T = 1 step
    (cache=False: everything but the static cache, for the serving pool's fused step,
    `serve/runner.py`, which checks its pool itself)."""
    c = model.config
    if cpu_kernels._loaded is None or torch.is_grad_enabled() or _global_hooks():
        return False
    if (c.norm, c.pos_encoding, c.mlp, c.bias) != ("rmsnorm", "rope", "swiglu", False) or c.head_dim % 16:
        return False  # (the compiled attention works on heads of 16-float vectors)
    if c.head_dim > 512:
        return False  # (and keeps a rotated head on the stack)
    if model.tok_embeddings.weight.dtype != torch.float32 or model.tok_embeddings.weight.device.type != "cpu":
        return False
    attend = ATTENTION_IMPLS[c.attn_impl]
    return all(_own_block(layer, attend, cache) for layer in model.layers)


def _global_hooks() -> bool:
    return bool(torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks)


def _hooked(module: torch.nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _own_block(layer, attend, cache: bool) -> bool:
    if type(layer) is not m.Block or _hooked(layer):
        return False
    for name, cls in _OWN_MODULES.items():
        part = getattr(layer, name)
        if type(part) is not getattr(m, cls) or _hooked(part):
            return False
    attn, mlp = layer.attn, layer.mlp
    if attn.attend is not attend or attn.rotate is not apply_rope:
        return False
    if layer.attn_norm.fused is not None or layer.ffn_norm.fused is not None:
        return False  # (a norm given its own function, `set_kernels`: it must run)
    if cache and (type(attn.kv_cache) not in (KVCache, Int8KVCache)
                  or attn.kv_cache.k_cache.dtype not in (torch.float32, torch.float16, torch.int8)):
        return False  # (the dtypes the compiled attention reads)
    return all(not _hooked(lin) and weight_parts(lin) is not None for lin in (attn.wqkv, attn.wo, mlp.w13, mlp.w2))


def weight_parts(lin) -> list[torch.Tensor] | None:
    """What `llama_block_decode` multiplies by: [packed] for a float32 `Linear` with a
    current compiled copy, [codes, d, m] for a `QuantizedLinear` with a current repacked
    copy (int8 activations, no bias); None where the block must run as modules."""
    if type(lin) is m.Linear:
        ok = lin.packed is not None and lin.packed.blocks is not None and lin.packed.current(lin.weight)
        return [lin.packed.blocks] if ok else None
    if type(lin) is QuantizedLinear and lin.activations == "int8" and lin.bias is None:
        k = lin.kernel
        return [k.codes, k.d, k.m] if k is not None and k.current(lin) else None
    return None


class Plan:
    """The fused step's arguments for every block, gathered once (`applies` walks ~300
    attributes: 0.7 ms, as long as 4% of a step), and a cheap test that they still hold:
    every object they were read from is still in place, unhooked, and unedited. With
    cache=False the blocks carry None for the static cache (the serving pool's plan)."""

    def __init__(self, model: "m.Transformer", cache: bool = True):
        self.watch = [(model.__dict__, "config", model.config), (model._modules, "layers", model.layers)]
        # the norms' functions, read as the modules read them: set on an instance, or on the
        # class where the instance has none of its own (a learner may set either)
        self.norms = [norm for layer in model.layers for norm in (layer.attn_norm, layer.ffn_norm)]
        self.modules, self.linears, self.blocks = [], [], []
        for i, layer in enumerate(model.layers):
            attn, mlp = layer.attn, layer.mlp
            linears = (attn.wqkv, attn.wo, mlp.w13, mlp.w2)
            self.watch += [(model.layers._modules, str(i), layer), (attn.__dict__, "attend", attn.attend),
                           (attn.__dict__, "rotate", attn.rotate),
                           (mlp._modules, "w13", mlp.w13), (mlp._modules, "w2", mlp.w2),
                           (attn._modules, "wqkv", attn.wqkv), (attn._modules, "wo", attn.wo)]
            self.watch += [(layer._modules, name, getattr(layer, name)) for name in _OWN_MODULES]
            caches, scales = (None, None), (_NONE, _NONE)
            if cache:
                kv = attn.kv_cache
                caches = (kv.k_cache, kv.v_cache)
                self.watch += [(attn.__dict__, "kv_cache", kv), (kv._buffers, "k_cache", kv.k_cache),
                               (kv._buffers, "v_cache", kv.v_cache)]
                if type(kv) is Int8KVCache:
                    scales = (kv.k_scale, kv.v_scale)
                    self.watch += [(kv._buffers, "k_scale", kv.k_scale), (kv._buffers, "v_scale", kv.v_scale)]
            self.watch += [(part._parameters, "weight", part.weight) for part in (layer.attn_norm, layer.ffn_norm)]
            self.watch += [(lin._parameters, "weight", lin.weight) for lin in linears if type(lin) is m.Linear]
            for lin in linears:
                if type(lin) is QuantizedLinear:  # the repacked copy, and the buffers it was made from
                    self.watch += [(lin.__dict__, "kernel", lin.kernel), (lin.__dict__, "activations", lin.activations),
                                   (lin._buffers, "bias", None)]  # the fused block has no bias
                    self.watch += [(lin._buffers, name, buf) for name, buf, _ in lin.kernel.sources]
            self.modules += [layer, layer.attn_norm, attn, layer.ffn_norm, mlp, *linears]
            self.linears += linears
            self.blocks.append((layer.attn_norm.weight, layer.ffn_norm.weight, layer.attn_norm.eps,
                                *(weight_parts(lin) for lin in linears), *caches,
                                attn.n_heads, attn.rope_layout == "adjacent", *scales))

        # what `holds` compares at every step, flattened so that the comparisons run as C loops
        # (map and operator.is_; a Python loop over these ~700 items cost 0.3 ms per token)
        self.wheres, self.keys, self.values = zip(*self.watch)
        self.hook_dicts = [hooks for module in self.modules for hooks in (module._forward_hooks,
                                                                           module._forward_pre_hooks)]
        self.tensors = [t for lin in self.linears for t in _sources(lin)]
        self.versions = [t._version for t in self.tensors]

    def holds(self) -> bool:
        return (cpu_kernels._loaded is not None and not torch.is_grad_enabled() and not _global_hooks()
                and all(map(operator.is_, map(dict.get, self.wheres, self.keys), self.values))
                and all(map(operator.is_, map(_FUSED, self.norms), itertools.repeat(None)))
                and not any(self.hook_dicts)
                and list(map(_VERSION, self.tensors)) == self.versions)


_VERSION = operator.attrgetter("_version")
_FUSED = operator.attrgetter("fused")


def _sources(lin) -> list[torch.Tensor]:
    """The tensors a linear's compiled copy was made from (an in-place edit bumps their version)."""
    if type(lin) is m.Linear:
        return [lin.packed.source]
    return [buf for _, buf, _ in lin.kernel.sources]


_PLAN_KEYS = {True: "_fused_plan", False: "_fused_plan_without_cache"}  # model.__dict__ keys, by `cache`


def forget(model: "m.Transformer") -> None:
    """Drop the model's plans (after a change that replaces its weights wholesale)."""
    for key in _PLAN_KEYS.values():
        model.__dict__.pop(key, None)


def plan_for(model: "m.Transformer", cache: bool = True) -> Plan | None:
    """The model's plan, made or remade where needed; None where the fused step does not
    apply. cache=False: the plan without the static cache (`applies`)."""
    key = _PLAN_KEYS[cache]
    plan = model.__dict__.get(key)
    if plan is not None and plan.holds():
        return plan
    model.__dict__[key] = plan = Plan(model, cache) if applies(model, cache) else None
    return plan


def step_inputs(model: "m.Transformer", ids: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """What the compiled blocks start from, for one new token per row: ids (B,), positions
    (B,) -> the embeddings x (B, d_model), which the blocks update in place, and RoPE's cos
    and sin at each row's position (B, head_dim). (Also the serving pool's fused step.)"""
    x = model.tok_embeddings(ids).contiguous()
    return x, model.rope_cos[positions].contiguous(), model.rope_sin[positions].contiguous()


def forward(model: "m.Transformer", plan: Plan, input_ids: torch.Tensor, start: int, positions: torch.Tensor,
            key_valid: torch.Tensor | None) -> torch.Tensor:
    """input_ids (B, 1) into cache slot `start`; positions (B, 1); key_valid (B, >= start+1)
    bool or None. Returns float32 logits (B, 1, vocab)."""
    kernels = cpu_kernels._loaded
    x, cos, sin = step_inputs(model, input_ids[:, 0], positions[:, 0])
    valid = (torch.empty(0, dtype=torch.bool) if key_valid is None
             else key_valid[:, : start + 1].contiguous())
    for (attn_norm, ffn_norm, eps, wqkv, wo, w13, w2, k_cache, v_cache, n_heads, adjacent, k_scale,
         v_scale) in plan.blocks:
        kernels.llama_block_decode(x, attn_norm, ffn_norm, eps, wqkv, wo, w13, w2, k_cache, v_cache, start,
                                   cos, sin, valid, n_heads, adjacent, k_scale, v_scale)
    return model.head(model.norm(x[:, None]))
