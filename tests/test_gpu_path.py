"""Chapter 7's engine: the static-shape decode step (eager, torch.compile, ONNX Runtime),
the Triton kernels inside the model, and the device/dtype/kernels choices with their errors.

A GPU is never needed: the Triton path runs in the interpreter, torch.compile on the CPU
generates C++, and the CUDA errors are what a machine without a GPU must say."""

from __future__ import annotations

import sys

import pytest
import torch

from reference_engine import graphs
from reference_engine.cli import main
from reference_engine.config import ModelConfig
from reference_engine.errors import DojoError
from reference_engine.generate import generate
from reference_engine.load import check_device
from reference_engine.kernels import layers
from reference_engine.model import Transformer
from tiny_gguf import tiny_llama


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama(seed=3).requires_grad_(False)


def engine_logits(model, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tokens]))[0, -1]


def test_static_step_equals_the_model_for_prompts_and_decode_steps(tiny):
    prompt = [5, 9, 2, 7, 1, 3]
    step = graphs.StaticStep(tiny, inplace=False)
    k, v = graphs.empty_caches(tiny, 1, 12)
    with torch.no_grad():
        logits, k, v = step(torch.tensor([prompt[:4]]), torch.tensor(0), k, v)
        assert torch.allclose(logits[0], engine_logits(tiny, prompt[:4]), atol=1e-5)
        for i in (4, 5):  # one token at a time into slots 4 and 5
            logits, k, v = step(torch.tensor([[prompt[i]]]), torch.tensor(i), k, v)
            assert torch.allclose(logits[0], engine_logits(tiny, prompt[: i + 1]), atol=1e-5)


def test_eager_static_decoding_reproduces_the_engine(tiny):
    prompt = [4, 8, 15, 16, 23]
    ref = generate(tiny, [prompt], max_new_tokens=8, stop_ids=()).tokens[0]
    assert graphs.greedy(tiny, prompt, 8, backend="eager").tokens == ref


def test_torch_compile_compiles_the_decode_step_once(tiny):
    prompt = [4, 8, 15, 16, 23]
    ref = generate(tiny, [prompt], max_new_tokens=10, stop_ids=()).tokens[0]
    run = graphs.greedy(tiny, prompt, 10, backend="compile")
    assert run.tokens == ref
    assert run.compiles == 1, f"{run.compiles} graphs for 9 decode steps: the step recompiles as the cache grows"


def test_onnx_runtime_matches_the_engine_within_1e_4(tiny, tmp_path):
    """Several prompt and cache lengths, batch 1 and 3, through one exported graph."""
    onnx_step = graphs.OnnxStep(tiny, max_len=20, path=tmp_path / "step.onnx")
    for batch, prompt in ((1, [3, 1, 4]), (3, [2, 7, 1, 8, 2, 8, 1])):
        k, v = graphs.empty_caches(tiny, batch, 20)
        ids = torch.tensor([prompt] * batch)
        logits, k, v = onnx_step(ids, 0, k, v)
        assert (logits[0] - engine_logits(tiny, prompt)).abs().max() < 1e-4
        tokens = list(prompt)
        for _ in range(4):
            tokens.append(int(logits[0].argmax()))
            logits, k, v = onnx_step(torch.tensor([[tokens[-1]]] * batch), len(tokens) - 1, k, v)
            assert logits.shape == (batch, tiny.config.vocab_size)
            assert (logits - engine_logits(tiny, tokens)).abs().max() < 1e-4


def test_backend_table_names_each_backend_and_flags_different_tokens():
    rows = [{"backend": "engine", "setup_s": 0.0, "decode_tokens_per_s": 50.0, "compiles": None, "same_tokens": True},
            {"backend": "eager", "setup_s": 0.5, "decode_tokens_per_s": 20.0, "compiles": None, "same_tokens": True},
            {"backend": "compile", "setup_s": 40.0, "decode_tokens_per_s": 30.0, "compiles": 1, "same_tokens": False}]
    table = graphs.format_backends_table(rows)
    assert "1.50x" in table and "DIFFER" in table and table.count("\n") == 3


def test_graph_backends_refuse_models_they_cannot_express(tiny):
    gpt2 = Transformer(ModelConfig.from_name("tiny-gpt2"))
    with pytest.raises(DojoError, match="Llama-family"):
        graphs.StaticStep(gpt2)
    with pytest.raises(DojoError, match="eager, compile, onnx"):
        graphs.backend_names("eager,tensorrt")


NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="what a machine without a GPU says")


def test_triton_kernels_in_the_model_give_the_same_logits_and_tokens():
    model = tiny_llama(seed=5).requires_grad_(False)
    ids = torch.randint(0, model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    padded = [[1, 2, 3, 4, 5], [6, 7, 8]]  # left-padded: the masked steps fall back to PyTorch
    unpadded = [[9, 2, 6, 5, 3, 5]]  # the prompt causal in the kernel, then one query per step, no mask
    with torch.no_grad():
        ref_logits = model(ids)
    ref_tokens = [generate(model, p, max_new_tokens=6, stop_ids=()).tokens for p in (padded, unpadded)]
    calls = []
    model.set_kernels("triton")
    model.layers[0].attn.attend = lambda *a: calls.append(a[3] is None) or layers.attention(*a)  # unmasked: the kernel
    with torch.no_grad():
        assert (model(ids) - ref_logits).abs().max() < 1e-4
    assert [generate(model, p, max_new_tokens=6, stop_ids=()).tokens for p in (padded, unpadded)] == ref_tokens
    assert calls.count(True) >= 6, "the prompt and decode steps without a mask must go through the flash kernel"
    model.set_kernels("torch")
    assert model.layers[0].attn_norm.fused is None


@NO_GPU
def test_device_and_dtype_errors_name_the_fix():
    with pytest.raises(DojoError, match="no CUDA GPU is visible"):
        check_device("cuda", "float32")
    with pytest.raises(DojoError, match="unknown dtype 'fp8'"):
        check_device("cpu", "fp8")
    with pytest.raises(DojoError, match="unknown device"):
        check_device("gpu0", "float32")
    assert check_device("cpu", "bfloat16") == (torch.device("cpu"), torch.bfloat16)


@pytest.mark.parametrize("argv,message", [
    pytest.param(["generate", "hi", "--device", "cuda"], "no CUDA GPU is visible", marks=NO_GPU),
    (["generate", "hi", "--dtype", "float8"], "unknown dtype"),
    pytest.param(["generate", "hi", "--kernels", "triton", "--dtype", "bfloat16"], "computes bfloat16 tl.dot wrongly",
                 marks=NO_GPU),
    (["bench", "--backend", "tensorrt"], "--backend takes"),
    (["prune", "out.gguf", "--device", "cuda"], "runs on the CPU in float32"),
    (["demo", "--device", "cuda"], "works with generate, chat, perplexity and bench --backend"),
    (["bench", "--backend", "cudagraphs"], "needs --device cuda"),
    (["bench", "--backend", "onnx", "--dtype", "bfloat16"], "float32 model on the CPU"),
    pytest.param(["gpu-figures"], "has none visible to PyTorch", marks=NO_GPU),
])
def test_cli_refuses_bad_devices_dtypes_and_backends_in_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_cli_without_triton_says_how_to_install_it(monkeypatch, capsys):
    for name in [m for m in sys.modules if m == "triton" or m.startswith(("triton.", "reference_engine.kernels"))]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton now raises ImportError
    assert main(["generate", "hi", "--kernels", "triton", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "pip install triton" in err


def test_a_packed_model_converted_to_another_dtype_drops_its_packed_copies():
    """model.to(dtype) swaps each weight's data under the same Parameter: the packed float32
    copies must not be used for it (they would be stale, and of the wrong dtype)."""
    model = tiny_llama(seed=2).requires_grad_(False)
    model.pack_for_cpu()
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        expected = model(ids).double()
        model.double()
        assert (model(ids) - expected).abs().max() < 1e-4
