"""Static and dynamic graphs: one decode step three ways (eager, torch.compile, ONNX Runtime).

PyTorch runs eagerly: each operation is dispatched from Python as it is reached, which
costs microseconds per operation (a SmolLM2 step has about 600 of them). A graph
compiler sees the whole step at once and can fuse element-wise work, plan memory and drop
the Python. It can do that only when the step looks the same every time: the same shapes
and the same control flow. The engine's own decode step is dynamic on purpose: the cache
returns slots [0, start+1) (a shape that grows by one every token) and attention takes a
mask only when one is needed. `StaticStep` is the same model written for a compiler:

  - the KV cache is one fixed-size tensor per layer, written at `slots` with index_copy,
    and attention always reads all of it, with a mask that hides the slots not written yet;
  - the position is a tensor (an input of the graph), never a Python int (a constant of it).

So every decode step has identical shapes, and `torch.compile(fullgraph=True)` compiles it
once for a whole generation (`CompileCounter` counts). The same function exported to ONNX
takes the caches as explicit inputs and returns them updated as outputs (ONNX graphs are
functional), and runs in ONNX Runtime without PyTorch.

Llama-family float models only (SmolLM2): quantized layers, learned positions or LayerNorm
are refused with a message.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import DojoError
from .positional import apply_rope

BACKENDS = ("eager", "compile", "onnx")  # what a CPU runs; "cudagraphs" needs a GPU
GPU_BACKENDS = ("cudagraphs",)


def check_graphable(model) -> None:
    """Raise a DojoError naming what `StaticStep` cannot express."""
    c = model.config
    if (c.norm, c.pos_encoding, c.mlp, c.bias) != ("rmsnorm", "rope", "swiglu", False):
        raise DojoError("graph backends support Llama-family models (RMSNorm, RoPE, SwiGLU, no biases); "
                        f"this one has norm={c.norm}, pos_encoding={c.pos_encoding}, mlp={c.mlp}, bias={c.bias}")
    for name, module in model.named_modules():
        if hasattr(module, "prepare_kernel"):  # a QuantizedLinear
            raise DojoError(f"graph backends need float weights; {name} is quantized. Load the model without --quantize.")


class StaticStep(nn.Module):
    """forward(tokens, start, k_cache, v_cache) -> (logits, k_cache, v_cache).

    tokens (B, T) int64, fed into cache slots start .. start+T-1; start: int64 tensor of
    shape (); caches (n_layers, B, n_kv_heads, L, head_dim). Returns float32 logits of the
    last token (B, vocab) and the caches with the new slots written: the same tensors,
    updated in place (`inplace=True`, what torch.compile wants), or new ones (for ONNX).
    """

    def __init__(self, model, inplace: bool = True):
        super().__init__()
        check_graphable(model)
        self.model, self.inplace = model, inplace

    def forward(self, tokens: torch.Tensor, start: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor):
        m, c = self.model, self.model.config
        B, T = tokens.shape
        H, KV, D = c.n_heads, c.n_kv_heads, c.head_dim
        L = k_cache.shape[3]
        slots = start + torch.arange(T, device=tokens.device)  # (T,)
        visible = torch.arange(L, device=tokens.device)[None, :] <= slots[:, None]  # (T, L): causal, unwritten hidden
        cos = m.rope_cos[slots][None, :, None]  # (1, T, 1, D)
        sin = m.rope_sin[slots][None, :, None]
        x = m.tok_embeddings.weight[tokens]  # (B, T, d_model)
        new_k, new_v = [], []
        for i, layer in enumerate(m.layers):
            qkv = F.linear(layer.attn_norm(x), layer.attn.wqkv.weight).view(B, T, H + 2 * KV, D)
            qk = apply_rope(qkv[:, :, : H + KV], cos, sin, c.rope_layout)  # (B, T, H+KV, D)
            q = qk[:, :, :H].transpose(1, 2)  # (B, H, T, D)
            k = qk[:, :, H:].transpose(1, 2)  # (B, KV, T, D)
            v = qkv[:, :, H + KV :].transpose(1, 2)  # (B, KV, T, D)
            if self.inplace:
                keys, values = k_cache[i].index_copy_(2, slots, k), v_cache[i].index_copy_(2, slots, v)
            else:
                keys, values = k_cache[i].index_copy(2, slots, k), v_cache[i].index_copy(2, slots, v)
                new_k.append(keys)
                new_v.append(values)
            y = grouped_attention(q, keys, values, visible)  # (B, H, T, D)
            x = x + F.linear(y.transpose(1, 2).reshape(B, T, H * D), layer.attn.wo.weight)
            gate, up = F.linear(layer.ffn_norm(x), layer.mlp.w13.weight).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, layer.mlp.w2.weight)
        logits = F.linear(m.norm(x[:, -1]), m.tok_embeddings.weight if "lm_head" not in m._modules
                          else m.lm_head.weight).float()  # (B, vocab)
        if self.inplace:
            return logits, k_cache, v_cache
        return logits, torch.stack(new_k), torch.stack(new_v)


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D), hidden slots at -inf) v with KV < H heads, written with plain
    matmuls (every exporter and compiler handles them). q (B, H, T, D); k, v (B, KV, L, D);
    visible (T, L) bool. The H query heads are grouped under their KV head instead of
    copying K and V H/KV times."""
    B, H, T, D = q.shape
    KV = k.shape[1]
    qg = q.reshape(B, KV, H // KV * T, D)  # (B, KV, rep*T, D): heads of a group in a row
    scores = qg @ k.transpose(-1, -2) / math.sqrt(D)  # (B, KV, rep*T, L)
    scores = scores.view(B, KV, H // KV, T, -1).masked_fill(~visible, float("-inf"))
    weights = torch.softmax(scores, dim=-1).view(B, KV, H // KV * T, -1)
    return (weights @ v).view(B, H, T, D)


def empty_caches(model, batch_size: int, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroed (n_layers, B, KV, max_len, D) key and value caches on the model's device and dtype."""
    c, w = model.config, model.tok_embeddings.weight
    shape = (c.n_layers, batch_size, c.n_kv_heads, max_len, c.head_dim)
    return torch.zeros(shape, dtype=w.dtype, device=w.device), torch.zeros(shape, dtype=w.dtype, device=w.device)


@dataclass
class CompileCounter:
    """A torch.compile backend that counts the graphs it is handed, then runs Inductor.

    Dynamo hands the backend one graph per new specialisation: a count that grows with the
    number of tokens is a step that recompiles every token (a shape or a Python int changed)."""

    compiles: int = 0

    def __call__(self, graph_module, example_inputs):
        self.compiles += 1
        return torch._dynamo.lookup_backend("inductor")(graph_module, example_inputs)


@dataclass
class Run:
    """What `greedy` measured: new tokens, decode tokens/s, the time to get the step ready
    (compile or export, with the first call), and, for torch.compile, the graphs compiled."""

    backend: str
    tokens: list[int] = field(default_factory=list)
    decode_tokens_per_s: float = 0.0
    setup_s: float = 0.0
    compiles: int | None = None
    last_logits: torch.Tensor | None = None


def make_step(model, backend: str, max_len: int, onnx_path: str | Path | None = None):
    """step(tokens (B, T), start int, k, v) -> (logits, k, v) for a backend of BACKENDS, and
    the CompileCounter (torch.compile) or None. ONNX exports to onnx_path (a temporary
    file when None) and runs in ONNX Runtime on the CPU."""
    if backend not in BACKENDS + GPU_BACKENDS:
        raise DojoError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS + GPU_BACKENDS)}")
    check_graphable(model)
    device = model.tok_embeddings.weight.device
    if backend == "onnx":
        return OnnxStep(model, max_len, onnx_path), None
    step = StaticStep(model, inplace=True)
    if backend == "eager":
        return lambda tokens, start, k, v: step(tokens, as_index(start, device), k, v), None
    if backend == "cudagraphs":
        return cuda_graph_step(model, step, max_len), None
    counter = CompileCounter()
    compiled = torch.compile(step, backend=counter, fullgraph=True)

    def run(tokens, start, k, v):
        # The prompt (T > 1) runs eagerly: only the decode step, T = 1, is compiled, once.
        fn = compiled if tokens.shape[1] == 1 else step
        return fn(tokens, as_index(start, device), k, v)

    return run, counter


def as_index(start, device="cpu") -> torch.Tensor:
    return start if isinstance(start, torch.Tensor) else torch.tensor(start, dtype=torch.int64, device=device)


class CachedStep(nn.Module):
    """The static step with its caches as buffers of the module: what CUDA graphs need, since
    a recorded graph replays with the same memory addresses (mutating a graph's *inputs*
    makes torch.compile skip the CUDA graph; mutating its buffers does not)."""

    def __init__(self, step: StaticStep, k_cache: torch.Tensor, v_cache: torch.Tensor):
        super().__init__()
        self.step = step
        self.register_buffer("k_cache", k_cache, persistent=False)
        self.register_buffer("v_cache", v_cache, persistent=False)

    def forward(self, tokens: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        return self.step(tokens, start, self.k_cache, self.v_cache)[0]


def cuda_graph_step(model, step: StaticStep, max_len: int):
    """step(tokens, start, k, v) -> (logits, k, v) whose decode calls replay one CUDA graph
    (torch.compile mode="reduce-overhead"). The caches live in the module: the k and v
    arguments are ignored and returned unchanged. GPU only."""
    device = model.tok_embeddings.weight.device
    if device.type != "cuda":
        raise DojoError("the cudagraphs backend records CUDA graphs: it needs the model on a GPU (--device cuda)")
    cached = compiled = None

    def run(tokens, start, k, v):
        nonlocal cached, compiled
        if cached is None or cached.k_cache.shape[1] != tokens.shape[0]:
            cached = CachedStep(step, *empty_caches(model, tokens.shape[0], max_len))
            compiled = torch.compile(cached, mode="reduce-overhead", fullgraph=True)
        fn = compiled if tokens.shape[1] == 1 else cached  # the prompt runs eagerly
        logits = fn(tokens, as_index(start, device))
        return logits.clone(), k, v  # clone: the graph's output buffer is reused by the next replay

    return run


@torch.inference_mode()
def greedy(model, prompt: list[int], n_new: int, backend: str = "eager", batch_size: int = 1,
           onnx_path: str | Path | None = None) -> Run:
    """Greedy decoding of n_new tokens after `prompt` (the same prompt in every batch row)
    through a backend's static step. setup_s covers making the step (export for ONNX)
    plus the first decode call (where torch.compile compiles); tokens/s is timed over the
    remaining n_new - 2 steps."""
    if n_new < 3:
        raise DojoError(f"greedy needs at least 3 new tokens to time decoding, got {n_new}")
    max_len = len(prompt) + n_new
    t0 = time.perf_counter()
    step, counter = make_step(model, backend, max_len, onnx_path)
    device = model.tok_embeddings.weight.device
    k, v = empty_caches(model, batch_size, max_len)
    ids = torch.tensor([prompt] * batch_size, device=device)
    logits, k, v = step(ids, 0, k, v)
    tokens = [int(logits[0].argmax())]
    setup_s = timed_from = 0.0
    for i in range(n_new - 1):
        if i == 1:
            timed_from = time.perf_counter()
        token = torch.full((batch_size, 1), tokens[-1], dtype=torch.int64, device=device)
        logits, k, v = step(token, len(prompt) + i, k, v)
        tokens.append(int(logits[0].argmax()))
        if i == 0:
            setup_s = time.perf_counter() - t0  # making the step, the prompt, the first (compiling) decode call
    elapsed = time.perf_counter() - timed_from
    return Run(backend, tokens, batch_size * (n_new - 2) / elapsed, setup_s,
               counter.compiles if counter else None, logits.float())


class OnnxStep:
    """The static step exported to ONNX (dynamo exporter) and run by ONNX Runtime on the CPU.

    Inputs tokens (B, T), start (), k_cache, v_cache; outputs logits (B, vocab) and the
    updated caches. B and T are dynamic dimensions, the cache length is fixed at export."""

    def __init__(self, model, max_len: int, path: str | Path | None = None):
        onnx, ort = import_onnx()
        import tempfile

        self._tmp = None
        if path is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="dojo-onnx-")
            path = Path(self._tmp.name) / "step.onnx"
        self.path = Path(path)
        self.export_s = export_onnx(model, max_len, self.path)
        options = ort.SessionOptions()
        options.log_severity_level = 3  # warnings about unused initialisers are noise here
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])

    def __call__(self, tokens, start, k, v):
        feeds = {"tokens": tokens.cpu().numpy(), "start": as_index(start).cpu().numpy(),
                 "k_cache": k.cpu().numpy(), "v_cache": v.cpu().numpy()}
        logits, k_new, v_new = self.session.run(None, feeds)
        return torch.from_numpy(logits), torch.from_numpy(k_new), torch.from_numpy(v_new)


def import_onnx():
    try:
        import onnx  # noqa: F401
        import onnxruntime as ort
        import onnxscript  # noqa: F401  (the dynamo exporter writes through it)
    except ImportError as e:
        raise DojoError(f"the onnx backend needs onnx, onnxscript and onnxruntime ({e.name} is missing): "
                        "pip install onnx onnxscript onnxruntime") from None
    return onnx, ort


def export_onnx(model, max_len: int, path: Path) -> float:
    """Export `StaticStep(model, inplace=False)` to path; returns the seconds it took.

    subtle: the example inputs use batch 2 and 2 tokens: the exporter specialises a
    dimension of size 0 or 1 to that constant, so size-1 examples would give a graph that
    accepts only one token or one sequence."""
    import_onnx()
    if model.tok_embeddings.weight.dtype != torch.float32 or model.tok_embeddings.weight.device.type != "cpu":
        raise DojoError("the ONNX export runs on a float32 model on the CPU; load it without --dtype/--device")
    t0 = time.perf_counter()
    step = StaticStep(model, inplace=False)
    k, v = empty_caches(model, 2, max_len)
    example = (torch.zeros(2, 2, dtype=torch.int64), torch.tensor(0, dtype=torch.int64), k, v)
    batch, seq = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("seq", min=1, max=max_len)
    dynamic = {"tokens": {0: batch, 1: seq}, "start": None, "k_cache": {1: batch}, "v_cache": {1: batch}}
    import contextlib
    import io
    import warnings

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(step, example, str(path), dynamo=True, dynamic_shapes=dynamic,
                          input_names=["tokens", "start", "k_cache", "v_cache"],
                          output_names=["logits", "k_out", "v_out"], external_data=False)
    return time.perf_counter() - t0


def backend_names(spec: str) -> list[str]:
    """"eager,compile" -> ["eager", "compile"]; "all" -> every backend. Unknown names fail."""
    names = list(BACKENDS) if spec == "all" else [s.strip() for s in spec.split(",") if s.strip()]
    wrong = [n for n in names if n not in BACKENDS + GPU_BACKENDS]
    if wrong or not names:
        raise DojoError(f"--backend takes a comma-separated list of {', '.join(BACKENDS + GPU_BACKENDS)} or 'all' "
                        f"(the CPU's three); got {spec!r}")
    return names


def run_backends(model, prompt: list[int], names: list[str], n_new: int = 32, batch_size: int = 1) -> list[dict]:
    """Greedy decoding through each backend on the same prompt, with the engine's own decode
    path (`generate`, compiled C++ blocks where built) first as the reference for tokens."""
    from .generate import generate

    generate(model, [prompt] * batch_size, max_new_tokens=4, stop_ids=())  # warm-up
    ref = generate(model, [prompt] * batch_size, max_new_tokens=n_new, stop_ids=())
    rows = [{"backend": "engine", "setup_s": 0.0, "decode_tokens_per_s": batch_size * ref.decode_steps / ref.decode_s,
             "compiles": None, "same_tokens": True}]
    for name in names:
        run = greedy(model, prompt, n_new, backend=name, batch_size=batch_size)
        rows.append({"backend": name, "setup_s": run.setup_s, "decode_tokens_per_s": run.decode_tokens_per_s,
                     "compiles": run.compiles, "same_tokens": run.tokens == ref.tokens[0]})
    return rows


def format_backends_table(rows: list[dict]) -> str:
    eager = next((r["decode_tokens_per_s"] for r in rows if r["backend"] == "eager"), None)
    lines = [f"{'backend':<8} {'set-up s':>9} {'decode tok/s':>13} {'vs eager':>9} {'compiles':>9}  tokens"]
    for r in rows:
        ratio = f"{r['decode_tokens_per_s'] / eager:.2f}x" if eager else "-"
        compiles = "-" if r["compiles"] is None else str(r["compiles"])
        same = "same as engine" if r["same_tokens"] else "DIFFER from engine"
        lines.append(f"{r['backend']:<8} {r['setup_s']:>9.1f} {r['decode_tokens_per_s']:>13.1f} {ratio:>9} "
                     f"{compiles:>9}  {same}")
    return "\n".join(lines)
