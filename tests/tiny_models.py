"""Tiny random Llama models for tests: a transformers model and ours, from the same weights."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from specdec.loading import Model, build_transformer, config_from_hf


def hf_llama(vocab=96, hidden=48, layers=2, heads=4, kv_heads=2, ffn=80, head_dim=None, tie=False,
             rope_scaling=None, max_context=256, seed=0) -> LlamaForCausalLM:
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    if rope_scaling:
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, intermediate_size=ffn, head_dim=head_dim or hidden // heads,
                      tie_word_embeddings=tie, max_position_embeddings=max_context, rope_parameters=rope,
                      rms_norm_eps=1e-5, initializer_range=0.1, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms away from 1 so a misplaced norm weight shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def ours_from_hf(hf: LlamaForCausalLM, dtype=torch.float32, device="cpu") -> Model:
    config = config_from_hf(hf.config.to_dict())
    net = build_transformer(config, dict(hf.state_dict()), torch.device(device), dtype)
    return Model(net=net, config=config, tokenizer=None, name="tiny")


def tiny_model(seed=0, **kw) -> Model:
    return ours_from_hf(hf_llama(seed=seed, **kw))
