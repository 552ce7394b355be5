"""The engine on the real SmolLM2-135M-Instruct file."""

from dataclasses import replace

import torch

from reference_engine import fused_decode
from reference_engine.commands.common import stop_ids
from reference_engine.generate import generate
from reference_engine.perplexity import perplexity

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "<|im_start|>user\nWhat is 12 * 7?<|im_end|>\n<|im_start|>assistant\n",
    "In 1969, the first humans walked on the Moon. Their names were",
]


def test_logits_match_hf_transformers_reading_the_same_file(smollm64, hf_model):
    """The engine's math (float64, so that only HF's float32 rounding is left) against
    HF transformers' own GGUF loader and Llama implementation."""
    model, tokenizer = smollm64
    for prompt in PROMPTS:
        ids = torch.tensor([tokenizer.encode(prompt)])
        with torch.inference_mode():
            ours, theirs = model(ids), hf_model(ids).logits.float()
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4, msg=lambda m: f"{prompt!r}: {m}")


def test_float32_decoding_stays_close_to_float64(smollm, smollm64):
    """The default model (float32, packed weights and fused blocks while decoding) only adds rounding."""
    ids = torch.tensor([smollm[1].encode(PROMPTS[3])])
    with torch.inference_mode():
        exact = smollm64[0](ids)
        model = smollm[0]
        model.setup_cache(1, ids.shape[1])
        assert fused_decode.plan_for(model) is not None, "the decode steps below run the compiled blocks"
        steps = [model(ids[:, :4])] + [model(ids[:, t:t + 1], start=t) for t in range(4, ids.shape[1])]
        model.clear_cache()
    torch.testing.assert_close(torch.cat(steps, dim=1), exact, rtol=0, atol=5e-4)


def test_what_a_16_bit_or_an_int8_cache_costs_in_accuracy(smollm):
    """Keys and values stored in float16 (the fused steps read them): 32 decode steps after a
    256-token prompt keep float32's distributions (KL under 1e-4 nats per step, the same
    greedy tokens); bfloat16's 8 significant bits cost more, and the measure sees it; int8
    codes with a scale per 32 values (read by the fused steps too) more again (3.6e-4 here),
    still well under what 8-bit activations cost (about 3e-3)."""
    from reference_engine.perplexity import reference_text

    model, tokenizer = smollm
    ids = torch.tensor([tokenizer.encode(reference_text())[:256 + 32]])

    def decode(dtype):
        model.set_kv_dtype(dtype)
        model.setup_cache(1, ids.shape[1])
        try:
            assert dtype == torch.bfloat16 or fused_decode.plan_for(model) is not None, dtype
            model(ids[:, :256])
            return torch.cat([model(ids[:, t:t + 1], start=t)[:, -1] for t in range(256, ids.shape[1])]).log_softmax(-1)
        finally:
            model.clear_cache()
            model.set_kv_dtype(None)

    with torch.inference_mode():
        full, half, brain, codes = decode(None), decode(torch.float16), decode(torch.bfloat16), decode("int8")
    kl = {name: (full.exp() * (full - x)).sum(-1).mean().item()
          for name, x in (("float16", half), ("bfloat16", brain), ("int8", codes))}
    assert 0 < kl["float16"] < 1e-4 and kl["float16"] < kl["bfloat16"] / 4, kl
    assert kl["bfloat16"] < kl["int8"] < 1.5e-3, kl
    assert torch.equal(full.argmax(-1), half.argmax(-1))


def test_every_attention_implementation_gives_the_same_logits(smollm):
    model, tokenizer = smollm
    ids = torch.tensor([tokenizer.encode(PROMPTS[3])])
    with torch.inference_mode():
        expected = model(ids)
        try:
            for impl in ("math", "tiled"):
                model.set_attention(impl)
                torch.testing.assert_close(model(ids), expected, rtol=0, atol=1e-4, msg=lambda m: f"{impl}: {m}")
        finally:
            model.set_attention("sdpa")


def test_both_rope_layouts_give_the_same_logits_and_a_mixed_up_one_does_not(smollm):
    """The file's adjacent-pair rows with adjacent RoPE == un-permuted rows with half-split
    RoPE. The file's rows rotated half-split (the classic loader bug): another model."""
    from reference_engine import load_model

    model, tokenizer = smollm
    adjacent, _ = load_model(rope_layout="adjacent", pack=False)
    ids = torch.tensor([tokenizer.encode(PROMPTS[3])])
    with torch.inference_mode():
        expected = model(ids)
        torch.testing.assert_close(adjacent(ids), expected, rtol=0, atol=1e-3)
        adjacent.set_rope(rope_layout="half")
        assert (adjacent(ids) - expected).abs().max() > 1.0


def test_greedy_chat_knows_the_capital_of_france(smollm):
    model, tokenizer = smollm
    out = generate(model, [tokenizer.encode_chat("What is the capital of France?")], max_new_tokens=24,
                   stop_ids=stop_ids(tokenizer))
    answer = tokenizer.decode(out.tokens[0])
    assert "Paris" in answer and out.finish_reasons == ["stop"], answer


def test_batched_chat_rows_answer_independently(smollm):
    model, tokenizer = smollm
    questions = ["Say hello.", "What is the capital of France?", "Name a color."]
    out = generate(model, [tokenizer.encode_chat(q) for q in questions], max_new_tokens=24,
                   stop_ids=stop_ids(tokenizer))
    assert "Paris" in tokenizer.decode(out.tokens[1])
    assert len({len(t) for t in out.tokens}) > 1, "rows should stop at different lengths"


def test_perplexity_on_real_text_is_that_of_a_working_model(smollm):
    model, tokenizer = smollm
    ppl = perplexity(model, tokenizer, max_windows=2)
    # A uniform guess scores 49152; broken RoPE layouts or norms land in the hundreds.
    assert 3 < ppl < 25, ppl


def test_speculative_decoding_reproduces_greedy_chat(smollm):
    """Greedy output is the same token for token, with either draft; the figures that make
    it worthwhile (acceptance, speed) are the lesson's and the benchmark's business."""
    from reference_engine.decoding import speculative_generate

    model, tokenizer = smollm
    ids = tokenizer.encode_chat("List the days of the week.")
    expected = generate(model, [ids], max_new_tokens=24).tokens[0]
    for draft in ("layers", "lookup"):
        result = speculative_generate(model, ids, max_new_tokens=24, k=4, draft=draft, draft_layers=10)
        assert result.tokens == expected, draft
        assert result.target_forwards < 24, f"{draft}: no draft token was ever accepted"


def test_beam_search_and_the_paged_cache_on_the_real_model(smollm):
    from reference_engine.decoding import beam_search

    model, tokenizer = smollm
    ids = tokenizer.encode_chat("What is the capital of France?")
    best = beam_search(model, ids, beam_width=3, max_new_tokens=12, stop_ids=stop_ids(tokenizer))[0]
    assert "Paris" in tokenizer.decode(best.tokens)
    greedy = generate(model, [ids], max_new_tokens=12).tokens
    model.config = replace(model.config, kv_cache="paged", kv_block_size=16)
    try:
        assert generate(model, [ids], max_new_tokens=12).tokens == greedy
    finally:
        model.config = replace(model.config, kv_cache="static")
