"""The small random decoder models unitune is checked on: model_type -> config overrides of a
2-layer model of hidden size 32 (tests/test_architectures.py on CPU, scripts/cuda_architectures.py
on a GPU). Only plain data here, so the GPU script needs nothing but torch and transformers."""

_LLAMA_LIKE = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}

# model_type -> config overrides for a 2-layer model of hidden size 32
ARCHITECTURES: dict[str, dict] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": {**_LLAMA_LIKE, "head_dim": 8},
    "gemma": {**_LLAMA_LIKE, "head_dim": 8},
    # a cap small enough that leaving it out would show (random logits are small)
    "gemma2": {**_LLAMA_LIKE, "head_dim": 8, "final_logit_softcapping": 0.05},
    "gemma3_text": {**_LLAMA_LIKE, "head_dim": 8, "final_logit_softcapping": 0.05},
    "phi3": {**_LLAMA_LIKE, "pad_token_id": 0},
    "gpt2": {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 128},
    "gpt_neox": {**_LLAMA_LIKE, "num_key_value_heads": None},
    "falcon": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4},
    "cohere": {**_LLAMA_LIKE, "logit_scale": 0.25},
    "cohere2": {**_LLAMA_LIKE, "logit_scale": 0.25},
    "granite": {**_LLAMA_LIKE, "logits_scaling": 0.125},
    "granitemoe": {**_LLAMA_LIKE, "logits_scaling": 0.125, "num_local_experts": 2},
    "olmo2": _LLAMA_LIKE,
    "stablelm": _LLAMA_LIKE,
    "mixtral": {**_LLAMA_LIKE, "num_local_experts": 2, "num_experts_per_tok": 1},
    "qwen2_moe": {
        **_LLAMA_LIKE,
        "moe_intermediate_size": 16,
        "shared_expert_intermediate_size": 16,
        "num_experts": 2,
        "num_experts_per_tok": 1,
    },
}
