"""A minimal Llama-style decoder and its KV cache.

One forward serves prefill, decode and draft-tree verification: each sequence of a batch
brings N new tokens with explicit positions, they are appended to a preallocated cache
after that sequence's `lens[b]` committed tokens, and they attend to the committed prefix
plus (for a draft tree) their ancestors and themselves. Attention goes through
`kernels.tree_attention`, a Triton kernel on CUDA and a PyTorch reference elsewhere.

Letters: B batch, N new tokens, S cache capacity, H query heads, Hkv KV heads,
D head dim, E hidden size, F FFN size, V vocabulary, L layers.
"""

import functools
import math
import statistics
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels.tree_attention import AttentionBatch, tree_attention


@dataclass
class RopeScaling:
    """Llama-3-style frequency scaling (rope_type "llama3")."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int  # E
    num_layers: int  # L
    num_heads: int  # H
    num_kv_heads: int  # Hkv
    intermediate_size: int  # F
    head_dim: int | None = None  # D; hidden_size // num_heads when None
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = False
    max_context: int = 2048
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    name: str = "llama"

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")


# Known configurations, for tests and for sizing benchmarks without weights.
CONFIGS = {
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3,
                         intermediate_size=1536, rope_theta=100000.0, tie_embeddings=True, max_context=8192),
    "llama-3-8b": dict(vocab_size=128256, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                       intermediate_size=14336, rope_theta=500000.0, max_context=8192),
}


def rope_frequencies(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies (D/2,) float32, with Llama-3 scaling applied when configured."""
    D = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    s = config.rope_scaling
    if s is not None:
        wavelen = 2 * math.pi / inv_freq
        low_wavelen = s.original_max_position / s.low_freq_factor
        high_wavelen = s.original_max_position / s.high_freq_factor
        smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
        scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
        mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
        inv_freq = torch.where(mid, (1 - smooth) * inv_freq / s.factor + smooth * inv_freq, scaled)
    return inv_freq.float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate halves (the Hugging Face layout): x (B, N, h, D); cos, sin (B, N, 1, D/2)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out if out.dtype == x.dtype else out.to(x.dtype)


class Linear(nn.Linear):
    """nn.Linear (no bias) that can run from a oneDNN-prepacked copy of its weight on CPU.

    MKL's sgemm re-packs the weight matrix on every call, which doubles the memory traffic of
    a forward over a few tokens, and on AMD CPUs takes a generic code path: verifying 8 tokens
    then costs 2x one token. oneDNN's JIT with weights packed once for a batch of ~16 rows
    keeps a few-token forward close to the one-token cost (the verification cost curve).

    A product of M rows runs padded to pad_to[M] rows (packed path only; M past the table as it is).
    oneDNN picks its kernel by row count, and which one streams a packed weight fastest differs from
    machine to machine: on a 2-core EPYC on 2026-11-25 the kernels for one or two rows were ~10%
    slower than the one for five (30 cache-cold 576x3072 weights: 344 / 375 us each at 1 / 2 rows,
    304 us at 5), so padding made a decode step 6-7% faster; on the same kind of machine on
    2026-12-04 one row took 36 ms over the model's weights and five 50 ms, and the same padding made
    a decode step 26% slower. So the table is measured on the machine (`calibrate_padding`).
    """

    packed = None
    pad_to: tuple = ()

    def pack(self, batch_hint: int = 16):
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), batch_hint)

    def forward(self, x):
        if self.packed is None:
            return F.linear(x, self.weight)
        rows = x.reshape(-1, x.shape[-1])
        M = rows.shape[0]
        if M < len(self.pad_to) and self.pad_to[M] > M:
            rows = F.pad(rows, (0, 0, 0, self.pad_to[M] - M))
        y = torch.ops.mkldnn._linear_pointwise(rows, self.packed, None, "none", [], "")
        return y[:M].view(*x.shape[:-1], -1)


def pack_for_cpu(net: nn.Module) -> bool:
    """Prepack every Linear's weight for oneDNN when the model is float32 on a CPU with oneDNN."""
    p = next(net.parameters())
    if p.device.type != "cpu" or p.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return False
    for m in net.modules():
        if isinstance(m, Linear):
            m.pack()
    return True


def packed_linears(net: nn.Module) -> list:
    """The net's prepacked Linears, in forward order."""
    return [m for m in net.modules() if isinstance(m, Linear) and m.packed is not None]


def set_padding(net: nn.Module, pad_to: tuple):
    for m in packed_linears(net):
        m.pad_to = tuple(pad_to)


def _pass_seconds(linears: list, rows: int) -> float:
    """One product of `rows` rows with every weight in turn, unpadded: the weights come from memory,
    as in a forward (a model's weights outgrow the caches)."""
    xs = [torch.randn(rows, m.in_features) for m in linears]
    t = time.perf_counter()
    for m, x in zip(linears, xs):
        torch.ops.mkldnn._linear_pointwise(x, m.packed, None, "none", [], "")
    return time.perf_counter() - t


def calibrate_padding(net: nn.Module, max_rows: int = 4, max_pad: int = 8, rounds: int = 7, min_gain: float = 0.03,
                      timer=None, budget_s: float = 15.0) -> tuple:
    """Linear.pad_to for this machine: for M = 1..max_rows, the row count in M..max_pad at which a pass
    over the net's packed weights takes least time, where that beats M rows by at least `min_gain`.

    Every row count 1..max_pad is timed once a round, rounds interleaved (a spell of machine noise
    falls on all alike; the first round warms up), and medians compared. A model whose warm-up round
    shows that `rounds` would outlast `budget_s` gets fewer, three at the least (SmolLM2-135M on a
    2-core CPU: 0.4 s a round). timer(rows) -> seconds replaces the measurement (tests). pad_to[0] is 0.
    """
    timer = timer or functools.partial(_pass_seconds, packed_linears(net))
    runs = {n: [] for n in range(1, max_pad + 1)}
    with torch.inference_mode():
        warm_up = sum(timer(n) for n in runs)
        rounds = max(3, min(rounds, int(budget_s / max(warm_up, 1e-9))))
        for _ in range(rounds):
            for n in runs:
                runs[n].append(timer(n))
    median = {n: statistics.median(v) for n, v in runs.items()}
    pad_to = [0]
    for M in range(1, max_rows + 1):
        best = min(range(M, max_pad + 1), key=median.get)
        pad_to.append(best if median[best] < (1 - min_gain) * median[M] else M)
    return tuple(pad_to)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        if x.dtype == torch.float32:  # one fused op
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class KVCache(nn.Module):
    """Preallocated keys and values for every layer, with per-sequence committed lengths.

    k, v: (L, B, Hkv, S, D). Slots [0, lens[b]) of sequence b are committed. A forward writes
    its new tokens at slots lens[b] + i without moving `lens`; the caller then either
    `advance`s (keep them all), `commit`s an accepted subset (a tree's accepted path), or
    leaves `lens` as it was (drop them). `rollback` truncates.
    """

    def __init__(self, config: ModelConfig, batch_size: int, capacity: int, device=None, dtype=None):
        super().__init__()
        shape = (config.num_layers, batch_size, config.num_kv_heads, capacity, config.head_dim)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("lens", torch.zeros(batch_size, dtype=torch.int32, device=device), persistent=False)

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    def write(self, layer: int, k_new, v_new, rows, slots):
        """k_new, v_new (*, Hkv, D) into sequence rows (*) at slots (*) of `layer` ((B, 1) and
        (B, N) for a padded batch, (T,) and (T,) for packed tokens)."""
        self.k[layer][rows, :, slots] = k_new
        self.v[layer][rows, :, slots] = v_new

    def advance(self, num_new: torch.Tensor | int):
        """Keep every sequence's num_new (B,) (or int: the same for all) just-written tokens."""
        self.lens += num_new if isinstance(num_new, int) else num_new.to(self.lens.dtype)

    def rollback(self, lens: torch.Tensor):
        """Truncate each sequence b to lens[b] tokens (lens[b] <= current length)."""
        self.lens.copy_(torch.minimum(self.lens, lens.to(self.lens.dtype)))

    def commit(self, nodes: torch.Tensor, count: torch.Tensor):
        """Keep the just-written new tokens at node indices `nodes` (B, K), the first count[b].

        The kept tokens move to slots lens[b] + 0..count[b]-1, so the cache equals one built
        by feeding only those tokens. nodes must be increasing along each row (a tree path in
        topological order), which makes nodes[b, j] >= j and the gather-then-write safe, and
        start at node 0 (a path starts at the tree's root, the first new token).
        """
        B, K = nodes.shape
        if K == 0:
            return
        if K == 1:  # only the root (a step without drafts): it is already in place
            self.lens += count.to(self.lens.dtype)
            return
        j = torch.arange(K, device=nodes.device).view(1, K)
        keep = j < count.view(B, 1)
        base = self.lens.long().view(B, 1)
        src = base + torch.where(keep, nodes.long(), j)  # rows past count copy onto themselves
        dst = base + j
        # A path of the first nodes (every accepted chain) is in place already. On a CPU the test
        # costs ~20 us and the copy ~0.4 ms (batch 1, SmolLM2-135M); on a GPU it would cost a sync.
        if nodes.device.type == "cpu" and torch.equal(src, dst):
            self.lens += count.to(self.lens.dtype)
            return
        b = torch.arange(B, device=nodes.device).view(B, 1)
        for cache in (self.k, self.v):
            moved = cache[:, b, :, src]  # (B, K, L, Hkv, D): advanced indices come first
            cache[:, b, :, dst] = moved
        self.lens += count.to(self.lens.dtype)

    def reorder(self, index: torch.Tensor):
        """Keep only the sequences `index` (B',), in that order (finished requests leave).

        Only the rows that change are copied, and the batch is cut to B' rows by a view: with
        `survivors`' index that is one row per leaving request, where gathering every kept row
        would copy the whole cache (3 s at batch 64 and 1,100 slots on a 2-core CPU)."""
        n = index.numel()
        moved = (index != torch.arange(n, device=index.device)).nonzero()[:, 0]
        if moved.numel():
            src = index[moved]
            for cache in (self.k, self.v):
                cache[:, moved] = cache[:, src]  # the right side is gathered before the write
        self.k, self.v = self.k[:, :n], self.v[:, :n]
        self.lens = self.lens[index]


def survivors(alive: torch.Tensor) -> torch.Tensor:
    """The new row order when the requests not `alive` (B,) bool leave a batch: an index (B',)
    where row i of the smaller batch is old row index[i]. Survivors keep their rows, except that
    those beyond row B' move into the rows of leavers, so reordering a cache moves only them."""
    keep = alive.nonzero()[:, 0]
    n = keep.numel()
    index = torch.arange(n, device=alive.device)
    index[(~alive[:n]).nonzero()[:, 0]] = keep[keep >= n]
    return index


@dataclass
class Layout:
    """Where a forward's new tokens sit: a padded (B, N) grid, or packed to the T valid ones.

    When requests bring different numbers of new tokens (ragged prompts, draft trees of different
    sizes), the projections and the MLP run on the T valid tokens only: on a compute-bound device
    padding rows cost as much as real ones. Attention still takes the padded (B, N) grid.
    """

    B: int
    N: int
    rows: torch.Tensor  # (B, 1) or (T,): each token's sequence
    slots: torch.Tensor  # (B, N) or (T,): each token's cache slot
    index: torch.Tensor | None = None  # (T,) flat b * N + i of the valid tokens; None: not packed

    @staticmethod
    def build(slots, num_new, pack: bool) -> "Layout":
        """slots (B, N): cache slot of every new token, padding included."""
        (B, N), dev = slots.shape, slots.device
        rows = torch.arange(B, device=dev).view(B, 1)
        if not pack:
            return Layout(B, N, rows, slots)
        index = (torch.arange(N, device=dev).view(1, N) < num_new.view(B, 1)).view(-1).nonzero()[:, 0]
        return Layout(B, N, index // N, slots.view(-1)[index], index)

    def pack(self, x):
        """(B, N, ...) -> the layout's token shape: (B, N, ...) or (T, ...)."""
        return x if self.index is None else x.reshape(self.B * self.N, *x.shape[2:])[self.index]

    def unpack(self, x):
        """The layout's token shape -> (B, N, ...), zeros at padding."""
        if self.index is None:
            return x
        out = x.new_zeros(self.B * self.N, *x.shape[1:])
        return out.index_copy_(0, self.index, x).view(self.B, self.N, *x.shape[1:])


class Attention(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.c = c
        D = c.head_dim
        # One fused projection for q, k and v: a single matrix product per layer.
        self.qkv = Linear(c.hidden_size, (c.num_heads + 2 * c.num_kv_heads) * D, bias=False)
        self.o = Linear(c.num_heads * D, c.hidden_size, bias=False)

    def forward(self, x, cos, sin, cache: KVCache, layer: int, where: Layout, batch: AttentionBatch):
        """x (*, E) in the layout's token shape ((B, N) or (T,)); cos, sin (*, 1, D/2)."""
        lead = x.shape[:-1]
        c, D = self.c, self.c.head_dim
        qk, v = self.qkv(x).split([(c.num_heads + c.num_kv_heads) * D, c.num_kv_heads * D], dim=-1)
        qk = apply_rope(qk.view(*lead, c.num_heads + c.num_kv_heads, D), cos, sin)  # q and k heads at once
        q, k = qk.split([c.num_heads, c.num_kv_heads], dim=-2)  # (*, H, D), (*, Hkv, D)
        cache.write(layer, k, v.view(*lead, c.num_kv_heads, D), where.rows, where.slots)
        out = tree_attention(where.unpack(q), cache.k[layer], cache.v[layer], batch)  # (B, N, H, D)
        return self.o(where.pack(out).reshape(*lead, c.num_heads * D))


class MLP(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.gate_up = Linear(c.hidden_size, 2 * c.intermediate_size, bias=False)  # fused SwiGLU input
        self.down = Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.attn = Attention(c)
        self.mlp_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)

    def forward(self, x, cos, sin, cache, layer, where, batch):
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, layer, where, batch)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = c = config
        self.embed = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(Block(c) for _ in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.lm_head = Linear(c.hidden_size, c.vocab_size, bias=False)
        if c.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.register_buffer("inv_freq", rope_frequencies(c), persistent=False)

    @property
    def device(self):
        return self.embed.weight.device

    @property
    def dtype(self):
        return self.embed.weight.dtype

    def new_cache(self, batch_size: int, capacity: int | None = None) -> KVCache:
        capacity = capacity or self.config.max_context
        return KVCache(self.config, batch_size, capacity, self.device, self.dtype)

    def forward(self, tokens, cache: KVCache, positions=None, num_new=None, tree=None, logits_at=None):
        """Run N new tokens per sequence through the model, writing their K/V to the cache.

        tokens (B, N) int64; positions (B, N), default lens[b] + i; num_new (B,) valid new
        tokens, default N; tree (B, N, N) ancestor-or-self mask, default causal.
        logits_at (B, M) indices into N of the rows whose logits are wanted (default all).
        Returns logits (B, M, V) float32 (zeros at padding rows). `cache.lens` is left unchanged.
        With a ragged num_new the matrix products run on the valid tokens only (`Layout`).
        """
        B, N = tokens.shape
        lens = cache.lens
        ragged = num_new is not None and N > 1 and int(num_new.sum()) < B * N  # one host sync
        if num_new is None:
            num_new = torch.full((B,), N, dtype=torch.int32, device=tokens.device)
        slots = lens.long().view(B, 1) + torch.arange(N, device=tokens.device).view(1, N)
        where = Layout.build(slots, num_new, pack=ragged)
        if positions is None:
            positions = slots
        angles = where.pack(positions).float().unsqueeze(-1) * self.inv_freq  # (*, D/2)
        cos, sin = angles.cos().unsqueeze(-2), angles.sin().unsqueeze(-2)  # (*, 1, D/2)
        batch = AttentionBatch(lens, num_new.to(torch.int32), tree)

        x = self.embed(where.pack(tokens))  # (*, E)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache, i, where, batch)
        if logits_at is not None:  # only the rows that are sampled: the output layer is the largest matmul
            x = where.unpack(x)
            x = torch.gather(x, 1, logits_at.view(B, -1, 1).expand(-1, -1, x.shape[-1]))
            return self.lm_head(self.norm(x)).float()
        return where.unpack(self.lm_head(self.norm(x)).float())
