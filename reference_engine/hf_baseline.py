"""The same weights in HF transformers' `LlamaForCausalLM`: the baseline the benchmark
compares against. Imported only by `bench`; needs the optional `transformers` package."""

from __future__ import annotations

from transformers import LlamaConfig, LlamaForCausalLM


def hf_llama_from_engine(model) -> LlamaForCausalLM:
    """LlamaForCausalLM holding the engine's weights (un-fused: q/k/v and gate/up split)."""
    c = model.config
    hf_config = LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.ffn_dim,
        num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads,
        head_dim=c.head_dim, max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps,
        rope_theta=c.rope_base, tie_word_embeddings=c.tie_embeddings, attention_bias=False,
        mlp_bias=False, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    q_rows, kv_rows = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    sd = {"model.embed_tokens.weight": model.tok_embeddings.weight, "model.norm.weight": model.norm.weight}
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        q, k, v = layer.attn.wqkv.weight.split([q_rows, kv_rows, kv_rows])
        gate, up = layer.mlp.w13.weight.chunk(2)
        sd.update({
            p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k,
            p + "self_attn.v_proj.weight": v, p + "self_attn.o_proj.weight": layer.attn.wo.weight,
            p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up,
            p + "mlp.down_proj.weight": layer.mlp.w2.weight,
            p + "input_layernorm.weight": layer.attn_norm.weight,
            p + "post_attention_layernorm.weight": layer.ffn_norm.weight,
        })
    hf = LlamaForCausalLM(hf_config).to(model.tok_embeddings.weight.dtype)
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    hf.tie_weights()
    return hf.eval()
