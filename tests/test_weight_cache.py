"""The disk cache of dequantized weights: the second load reads the cache (and gives the
same model, bit for bit), a damaged entry is ignored and written again, a changed file or
layout gets its own entry, and the cache can be switched off."""

import os

import pytest
import torch

from reference_engine import load_model, weight_cache
from tiny_gguf import tiny_llama, write_gguf


@pytest.fixture
def gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("DOJO_WEIGHT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(weight_cache, "MIN_FILE_BYTES", 0)  # the tiny model is cached like SmolLM2
    path = tmp_path / "tiny.gguf"
    write_gguf(tiny_llama(), path, "Q8_0")
    return path


def logits(model):
    with torch.inference_mode():
        return model(torch.tensor([[1, 2, 3, 4, 5]]))


def test_the_second_load_reads_the_cache_and_is_identical(gguf, monkeypatch):
    first, _ = load_model(gguf, pack=False)
    entries = list((gguf.parent / "cache").glob("*.safetensors"))
    assert len(entries) == 1 and "tiny-half-" in entries[0].name

    def no_dequantizing(*args):
        raise AssertionError("the weights were dequantized again")

    monkeypatch.setattr("reference_engine.load.state_dict_from_gguf", no_dequantizing)
    second, _ = load_model(gguf, pack=False)
    assert torch.equal(logits(first), logits(second))
    second.layers[0].mlp.w2.weight.data.mul_(2)  # the cached tensors are the model's own memory
    assert not torch.equal(logits(first), logits(second))


def test_a_damaged_entry_is_ignored_and_rewritten(gguf):
    reference, _ = load_model(gguf, pack=False)
    entry = next((gguf.parent / "cache").glob("*.safetensors"))
    entry.write_bytes(entry.read_bytes()[:1000])
    again, _ = load_model(gguf, pack=False)
    assert torch.equal(logits(reference), logits(again))
    assert weight_cache.read(entry) is not None, "the entry was written again"


def test_a_changed_file_or_layout_gets_its_own_entry(gguf):
    load_model(gguf, pack=False)
    load_model(gguf, pack=False, rope_layout="adjacent")
    write_gguf(tiny_llama(seed=3), gguf, "Q8_0")
    os.utime(gguf, ns=(1, 1))  # another modification time
    changed, _ = load_model(gguf, pack=False)
    assert len(list((gguf.parent / "cache").glob("*.safetensors"))) == 3
    assert torch.allclose(logits(changed), logits(load_model(gguf, pack=False)[0]))


def test_the_cache_can_be_switched_off(gguf, monkeypatch):
    monkeypatch.setenv("DOJO_WEIGHT_CACHE", "off")
    load_model(gguf, pack=False)
    assert not (gguf.parent / "cache").exists()


def test_an_unwritable_cache_costs_nothing_but_time(gguf, monkeypatch):
    blocker = gguf.parent / "not-a-folder"
    blocker.write_text("a file where the cache folder would be")
    monkeypatch.setenv("DOJO_WEIGHT_CACHE", str(blocker))
    model, _ = load_model(gguf, pack=False)
    assert logits(model).isfinite().all() and blocker.read_text().startswith("a file")
    assert not list(gguf.parent.glob("**/.partial-*"))


def test_float_files_are_not_cached_and_old_entries_go(gguf, tmp_path, monkeypatch):
    float_file = tmp_path / "float.gguf"
    write_gguf(tiny_llama(), float_file, "F32")  # what save_gguf writes: nothing to dequantize
    load_model(float_file, pack=False)
    assert not (tmp_path / "cache").exists()
    monkeypatch.setattr(weight_cache, "MAX_ENTRIES", 1)
    load_model(gguf, pack=False)
    load_model(gguf, pack=False, rope_layout="adjacent")
    assert [p.name.split("-")[1] for p in (tmp_path / "cache").glob("*.safetensors")] == ["adjacent"]
