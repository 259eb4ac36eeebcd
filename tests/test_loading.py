"""Loading: HF directories (sharded too), GGUF in every supported type, and clear errors."""

import json

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import dequantize, quantize

import specdec
from specdec.loading import _read_gguf
from tiny_models import hf_llama

GGUF_TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("shard", [None, "20KB"], ids=["one-file", "sharded"])
def test_save_pretrained_round_trip(tmp_path, shard):
    hf = hf_llama(tie=False)
    kw = {"max_shard_size": shard} if shard else {}
    hf.save_pretrained(tmp_path / "ckpt", **kw)
    if shard:
        assert len(list((tmp_path / "ckpt").glob("*.safetensors"))) > 1
    model = specdec.load_model(tmp_path / "ckpt", device="cpu")
    ids = torch.randint(0, 96, (1, 30))
    with torch.no_grad():
        ref = hf(ids).logits
    torch.testing.assert_close(model.net(ids, model.net.new_cache(1, 64)), ref, atol=2e-5, rtol=1e-4)


def _permute_qk(w: np.ndarray, heads: int) -> np.ndarray:
    # llama.cpp's conversion: HF row (h, 2, i) goes to GGUF row (h, i, 2)
    return w.reshape(heads, 2, w.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, hf, qtype: str, arch="llama"):
    c = hf.config
    w = GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_eos_token_id(2)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    layer = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    expected = {}
    for name, t in hf.state_dict().items():
        a = t.float().numpy()
        kind = GGMLQuantizationType[qtype] if a.ndim == 2 else GGMLQuantizationType.F32  # norms stay F32
        # Quantization works on blocks within a row, so it commutes with the q/k row permutation:
        # the loader must give back exactly the dequantized original, in Hugging Face's layout.
        expected[name] = torch.from_numpy(dequantize(quantize(a, kind), kind).reshape(a.shape).copy())
        if name in names:
            gname = names[name]
        else:
            _, _, i, *rest = name.split(".")
            gname = f"blk.{i}.{layer['.'.join(rest[:-1])]}.weight"
            if rest[-2] == "q_proj":
                a = _permute_qk(a, c.num_attention_heads)
            elif rest[-2] == "k_proj":
                a = _permute_qk(a, c.num_key_value_heads)
        q = quantize(a, kind)
        w.add_tensor(gname, q, raw_shape=q.shape, raw_dtype=kind)  # raw_shape: bytes per row
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


@pytest.mark.parametrize("qtype", GGUF_TYPES)
def test_gguf_types_load(tmp_path, qtype):
    hf = hf_llama(hidden=64, heads=4, kv_heads=2, ffn=64, vocab=64)  # rows of 32-element blocks
    expected = write_gguf(tmp_path / "m.gguf", hf, qtype)
    config, state = _read_gguf(tmp_path / "m.gguf")
    assert (config.num_heads, config.num_kv_heads, config.num_layers) == (4, 2, 2)
    for name, ref in expected.items():
        torch.testing.assert_close(state[name], ref, atol=0, rtol=0, msg=name)
    if qtype == "F32":  # lossless: logits equal the source model's
        model = specdec.load_model(tmp_path / "m.gguf", device="cpu")
        ids = torch.randint(0, 64, (1, 20))
        with torch.no_grad():
            ref = hf(ids).logits
        torch.testing.assert_close(model.net(ids, model.net.new_cache(1, 32)), ref, atol=2e-5, rtol=1e-4)


def test_gguf_unsupported_quantization(tmp_path):
    hf = hf_llama(hidden=64, heads=4, kv_heads=2, ffn=64, vocab=64)
    write_gguf(tmp_path / "m.gguf", hf, "Q5_0")
    with pytest.raises(ValueError, match="unsupported type Q5_0"):
        specdec.load_model(tmp_path / "m.gguf", device="cpu")


def test_gguf_non_llama(tmp_path):
    hf = hf_llama(hidden=64, heads=4, kv_heads=2, ffn=64, vocab=64)
    write_gguf(tmp_path / "m.gguf", hf, "F32", arch="gpt2")
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'"):
        specdec.load_model(tmp_path / "m.gguf", device="cpu")


def test_missing_path():
    with pytest.raises(FileNotFoundError, match="no model at"):
        specdec.load_model("/nonexistent/model.gguf")


def test_unknown_format(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    with pytest.raises(ValueError, match="unknown model format"):
        specdec.load_model(tmp_path / "weights.bin")


def test_directory_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        specdec.load_model(tmp_path)


def test_hf_non_llama(tmp_path):
    hf = hf_llama()
    hf.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported architecture"):
        specdec.load_model(tmp_path)
