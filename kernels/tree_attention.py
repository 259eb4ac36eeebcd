"""Tree attention over a KV cache: prefill, decode and draft-tree verification in one op.

Each sequence b of a batch has `prefix_lens[b]` cached tokens and `num_new[b]` new tokens
(N = max over the batch; the rest is padding). New token i of sequence b has already been
written to cache slot `prefix_lens[b] + i`. Query i attends to

    every cached slot j < prefix_lens[b]            (the committed prefix)
    new slot prefix_lens[b] + j where tree[b, i, j] (its ancestors in the draft tree, and itself)

    out[b, i, h] = softmax(q[b, i, h] . K[b, g(h), allowed]^T * scale) @ V[b, g(h), allowed]

with g(h) = h // G the KV head of query head h (grouped-query attention, G = H / Hkv).
`tree=None` means causal among the new tokens (prefill, decode, a chain of drafts).
Nodes are in topological order (an ancestor precedes its descendants), as `tree_from_parents`
requires. Rows i >= num_new[b] are padding: their output is zero.

The kernel: one program owns a tile of BLOCK_M query rows of one KV head, the (node, g) pairs
of its G query heads flattened as row = node * G + g (so G = 3 wastes no rows: only the last
tile is partly masked), and each K/V block is read once per KV head and tile, shared by all G
heads and all nodes of the tile. It streams K/V blocks with an online softmax in fp32 (base 2:
p = exp2(q.k * scale * log2 e - m)). The new tokens' keys are masked per (row, key) by a bit
test on the tree packed as int32 words. When B * Hkv * tiles is too few programs to fill the
GPU, the prefix is split into chunks (split-KV, as in flash-decoding): each program writes its
chunk's normalized partial output and log2-sum-exp, the program owning the last chunk also
attends to the new tokens, and a second kernel merges
    out = sum_s 2^(lse_s - M) o_s / sum_s 2^(lse_s - M),   M = max_s lse_s.

Shapes: B batch, N new tokens, H query heads, Hkv KV heads, G = H / Hkv, S cache capacity,
D head dim, W = ceil(N / 32) words of packed tree bits, C candidates of L tokens each.
    q        (B, N, H, D)
    k_cache  (B, Hkv, S, D)   v_cache likewise
    tree     (B, N, N) bool, tree[b, i, j]: node j is an ancestor of node i or i itself
    bits     (B, N, W) int32, bit j % 32 of word j // 32 is tree[b, i, j]
"""

import functools
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.dispatch import nvtx_range, use_triton


@dataclass
class AttentionBatch:
    """What every layer's attention needs about the batch; built once per forward."""

    prefix_lens: torch.Tensor  # (B,) int32, cached tokens before the new ones
    num_new: torch.Tensor  # (B,) int32, valid new tokens (<= N)
    tree: torch.Tensor | None = None  # (B, N, N) bool ancestor-or-self mask; None: causal
    max_prefix: int | None = None  # host-known bound on prefix_lens: sizes split-KV, no sync
    _dense: dict = field(default_factory=dict, repr=False)  # memoized reference masks
    _bits: torch.Tensor | None = field(default=None, repr=False)  # memoized packed tree

    def dense_mask(self, n: int, kv_len: int) -> torch.Tensor:
        """(B, 1, N, kv_len) bool mask over cache slots, for the reference path."""
        key = (n, kv_len)
        if key not in self._dense:
            self._dense[key] = _dense_mask(self.prefix_lens, self.num_new, self.tree, n, kv_len)
        return self._dense[key]

    def tree_bits(self) -> torch.Tensor | None:
        """(B, N, W) int32 packed tree for the kernel (None for causal); packed once per forward."""
        if self.tree is not None and self._bits is None:
            self._bits = pack_tree_bits(self.tree)
        return self._bits


def pack_tree_bits(tree: torch.Tensor) -> torch.Tensor:
    """(B, N, N) bool -> (B, N, ceil(N/32)) int32 with bit j % 32 of word j // 32 = tree[..., j]."""
    B, N, _ = tree.shape
    W = triton.cdiv(N, 32)
    t = F.pad(tree.to(torch.int64), (0, 32 * W - N)).view(B, N, W, 32)
    words = (t << torch.arange(32, device=tree.device)).sum(-1)  # (B, N, W) in [0, 2^32)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def tree_from_parents(parents: torch.Tensor) -> torch.Tensor:
    """Ancestor-or-self mask (B, N, N) from parent indices (B, N), -1 for a root.

    Parents must precede their children (parents[b, i] < i). Runs on the device with
    ceil(log2 N) boolean matrix squarings and no host synchronization.
    """
    B, N = parents.shape
    has_parent = (parents >= 0).unsqueeze(-1)  # (B, N, 1)
    edge = F.one_hot(parents.clamp(min=0).long(), N).to(torch.float32) * has_parent
    reach = edge + torch.eye(N, device=parents.device)  # (B, N, N): parent-or-self
    steps = max(1, (N - 1).bit_length())
    for _ in range(steps):  # reach[i, j] after k squarings: j within 2^k generations of i
        reach = (torch.bmm(reach, reach) > 0).float()
    return reach > 0


def multi_candidate_parents(C: int, L: int, device=None) -> torch.Tensor:
    """Parents (1 + C*L,) int64 of a root (node 0) and C chains of L drafts hanging from it.

    Candidate c's token t is node 1 + c*L + t; its parent is the root for t = 0, else node - 1.
    """
    node = torch.arange(1, 1 + C * L, device=device)
    parents = torch.where((node - 1) % L == 0, 0, node - 1)
    return torch.cat([torch.full((1,), -1, device=device, dtype=torch.int64), parents])


@triton.jit
def _attend_block(b_q, b_k, b_v, b_acc, b_m, b_l, b_allowed, qk_scale, DOT_PRECISION: tl.constexpr):
    # One online-softmax step over a K/V block; b_allowed (BLOCK_M, BLOCK_S) masks the scores.
    b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION) * qk_scale
    b_s = tl.where(b_allowed, b_s, float("-inf"))
    m_new = tl.maximum(b_m, tl.max(b_s, 1))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing seen yet stays at 0
    alpha = tl.exp2(b_m - m_ref)
    b_p = tl.exp2(b_s - m_ref[:, None])
    b_l = b_l * alpha + tl.sum(b_p, 1)
    b_acc = b_acc * alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=DOT_PRECISION)
    return b_acc, m_new, b_l


@triton.jit
def _tree_attention_kernel(
    q_ptr,  # (B, N, H, D)
    k_ptr,  # (B, Hkv, S, D)
    v_ptr,  # (B, Hkv, S, D)
    prefix_ptr,  # (B,) int32
    num_new_ptr,  # (B,) int32
    bits_ptr,  # (B, N, W) int32, unused when not HAS_TREE
    o_ptr,  # (B, N, H, D) output, or (SPLITS, B, N, H, D) fp32 partials when SPLIT_KV
    lse_ptr,  # (SPLITS, B, N, H) fp32 log2-sum-exp of the partials, unused unless SPLIT_KV
    qk_scale,  # scale * log2(e)
    stride_qb, stride_qn, stride_qh,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_os, stride_ob, stride_on, stride_oh,
    stride_ls, stride_lb, stride_ln,
    N, S, W, CHUNK, SPLITS,
    HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, SPLIT_KV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_TREE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_m, pid_bh, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_kvh = pid_bh // HKV, pid_bh % HKV
    i_b64 = i_b.to(tl.int64)  # batch offsets into a large cache overflow int32
    prefix = tl.load(prefix_ptr + i_b)
    n_new = tl.load(num_new_ptr + i_b)

    o_r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # flattened (node, head-in-group) rows
    o_node, o_h = o_r // G, i_kvh * G + o_r % G
    o_s, o_d = tl.arange(0, BLOCK_S), tl.arange(0, BLOCK_D)
    m_row, m_d = o_node < n_new, o_d < D
    # load q: the tile stays in registers for the whole sweep over K/V
    p_q = q_ptr + i_b64 * stride_qb + o_node[:, None] * stride_qn + o_h[:, None] * stride_qh + o_d[None, :]
    b_q = tl.load(p_q, mask=m_row[:, None] & m_d[None, :], other=0.0)

    # this program's prefix chunk; the last chunk also runs to the end of the prefix, so a
    # short max_prefix hint costs balance, never correctness
    n_chunks = tl.minimum(tl.maximum(tl.cdiv(prefix, CHUNK), 1), SPLITS)
    live = (pid_m * BLOCK_M // G < n_new) & (pid_s < n_chunks)
    lo = pid_s * CHUNK
    hi = tl.where(pid_s == n_chunks - 1, prefix, tl.minimum(lo + CHUNK, prefix))
    hi = tl.where(live, tl.minimum(hi, S), lo)

    b_m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    b_l = tl.zeros([BLOCK_M], tl.float32)
    b_acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    p_k = k_ptr + i_b64 * stride_kb + i_kvh * stride_kh + o_s[:, None] * stride_ks + o_d[None, :]
    p_v = v_ptr + i_b64 * stride_vb + i_kvh * stride_vh + o_s[:, None] * stride_vs + o_d[None, :]
    for start in range(lo, hi, BLOCK_S):
        m_s = start + o_s < hi
        m_kv = m_s[:, None] & m_d[None, :]
        # each K/V block is read once here and serves all G heads and all nodes of the tile
        b_k = tl.load(p_k + start * stride_ks, mask=m_kv, other=0.0)
        b_v = tl.load(p_v + start * stride_vs, mask=m_kv, other=0.0)
        b_acc, b_m, b_l = _attend_block(b_q, b_k, b_v, b_acc, b_m, b_l, m_s[None, :], qk_scale,
                                        DOT_PRECISION)

    # the new tokens, in the slots right after the prefix: keys j <= the tile's last node
    # (ancestors precede descendants), attended by the program owning the last chunk, 32 keys
    # at a time so that one word of tree bits per row masks the block
    last_node = tl.minimum((pid_m * BLOCK_M + BLOCK_M - 1) // G, n_new - 1)
    t_hi = tl.where(live & (pid_s == n_chunks - 1), tl.minimum(last_node + 1, S - prefix), 0)
    o_t = tl.arange(0, 32)
    p_w = bits_ptr + (i_b * N + o_node) * W  # (BLOCK_M,) rows of packed tree words
    p_kt = k_ptr + i_b64 * stride_kb + i_kvh * stride_kh + o_t[:, None] * stride_ks + o_d[None, :]
    p_vt = v_ptr + i_b64 * stride_vb + i_kvh * stride_vh + o_t[:, None] * stride_vs + o_d[None, :]
    for start in tl.range(0, t_hi, 32, num_stages=1):  # <= 4 blocks: not worth SRAM buffers
        o_j = start + o_t
        m_j = o_j < t_hi
        m_kv = m_j[:, None] & m_d[None, :]
        b_k = tl.load(p_kt + (prefix + start) * stride_ks, mask=m_kv, other=0.0)
        b_v = tl.load(p_vt + (prefix + start) * stride_vs, mask=m_kv, other=0.0)
        if HAS_TREE:
            b_w = tl.load(p_w + start // 32, mask=m_row, other=0)  # (BLOCK_M,) bits of keys start..+31
            b_allowed = ((b_w[:, None] >> o_t[None, :]) & 1) != 0
        else:
            b_allowed = o_j[None, :] <= o_node[:, None]
        b_acc, b_m, b_l = _attend_block(b_q, b_k, b_v, b_acc, b_m, b_l, b_allowed & m_j[None, :],
                                        qk_scale, DOT_PRECISION)

    b_o = b_acc / tl.where(b_l == 0.0, 1.0, b_l)[:, None]
    o_off = o_node[:, None] * stride_on + o_h[:, None] * stride_oh + o_d[None, :]
    if not SPLIT_KV:  # final output; padding rows (and whole padding tiles) get their zeros here
        b_o = tl.where(m_row[:, None], b_o, 0.0)
        p_o = o_ptr + i_b64 * stride_ob + o_off
        tl.store(p_o, b_o.to(o_ptr.dtype.element_ty), mask=(o_node < N)[:, None] & m_d[None, :])
    else:  # partials of valid rows only; the merge reads exactly these
        m_out = tl.where(pid_s < n_chunks, m_row, False)  # a valid row's tile is live in each chunk
        p_o = o_ptr + pid_s.to(tl.int64) * stride_os + i_b64 * stride_ob + o_off
        tl.store(p_o, b_o, mask=m_out[:, None] & m_d[None, :])
        b_lse = tl.where(b_l == 0.0, float("-inf"), b_m + tl.log2(tl.where(b_l == 0.0, 1.0, b_l)))
        p_lse = lse_ptr + pid_s.to(tl.int64) * stride_ls + i_b64 * stride_lb + o_node * stride_ln + o_h
        tl.store(p_lse, b_lse, mask=m_out)


@triton.jit
def _merge_splits_kernel(
    part_ptr,  # (SPLITS, B, N, H, D) fp32
    lse_ptr,  # (SPLITS, B, N, H) fp32
    out_ptr,  # (B, N, H, D)
    prefix_ptr,  # (B,) int32
    num_new_ptr,  # (B,) int32
    stride_ps, stride_pb, stride_pn, stride_ph,
    stride_ls, stride_lb, stride_ln,
    stride_ob, stride_on, stride_oh,
    N, H, CHUNK, SPLITS,
    D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # one program per (b, node), all heads at once
    pid = tl.program_id(0)
    i_b, i_n = pid // N, pid % N
    prefix = tl.load(prefix_ptr + i_b)
    n_chunks = tl.minimum(tl.maximum(tl.cdiv(prefix, CHUNK), 1), SPLITS)
    n_chunks = tl.where(i_n < tl.load(num_new_ptr + i_b), n_chunks, 0)  # padding rows: zeros
    o_h, o_d = tl.arange(0, BLOCK_H), tl.arange(0, BLOCK_D)
    m_hd = (o_h < H)[:, None] & (o_d < D)[None, :]
    b_m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    b_l = tl.zeros([BLOCK_H], tl.float32)
    b_acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    p_lse = lse_ptr + i_b.to(tl.int64) * stride_lb + i_n * stride_ln + o_h
    p_p = part_ptr + i_b.to(tl.int64) * stride_pb + i_n * stride_pn + o_h[:, None] * stride_ph + o_d[None, :]
    for _ in range(0, n_chunks):
        b_lse = tl.load(p_lse, mask=o_h < H, other=float("-inf"))
        b_p = tl.load(p_p, mask=m_hd, other=0.0)
        m_new = tl.maximum(b_m, b_lse)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha, w = tl.exp2(b_m - m_ref), tl.exp2(b_lse - m_ref)
        b_acc = b_acc * alpha[:, None] + b_p * w[:, None]
        b_l = b_l * alpha + w
        b_m = m_new
        p_lse += stride_ls
        p_p += stride_ps
    b_o = b_acc / tl.where(b_l == 0.0, 1.0, b_l)[:, None]
    p_o = out_ptr + i_b.to(tl.int64) * stride_ob + i_n * stride_on + o_h[:, None] * stride_oh + o_d[None, :]
    tl.store(p_o, b_o.to(out_ptr.dtype.element_ty), mask=m_hd)


@functools.lru_cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _config(rows: int, D: int, dtype: torch.dtype, on_gpu: bool):
    """BLOCK_M, BLOCK_S, BLOCK_D, num_warps, num_stages for N*G query rows per KV head."""
    BLOCK_D = max(16, triton.next_power_of_2(D))
    BLOCK_M = min(128, max(16, triton.next_power_of_2(rows)))
    if not on_gpu:  # interpreter: small tiles, so short test shapes cross tile and block edges
        return min(BLOCK_M, 32), 32, BLOCK_D, 4, 1
    if dtype == torch.float32:  # tests' dtype: split-tf32 dots (three MMAs each) need small tiles
        return min(BLOCK_M, 32), 32, BLOCK_D, 4, 2
    # K and V blocks of 64 x 128 (or 128 x 64) 16-bit values: 32 KB a stage, 2-3 stages in flight
    BLOCK_S = 64 if BLOCK_D >= 128 else 128
    num_warps = 8 if BLOCK_M >= 128 else 4
    return BLOCK_M, BLOCK_S, BLOCK_D, num_warps, 2 if BLOCK_M * BLOCK_D >= 128 * 128 else 3


def tree_attention_triton(q, k_cache, v_cache, batch: AttentionBatch, scale=None, *, num_splits=None):
    """The Triton kernel (see module doc). num_splits overrides the split-KV heuristic (1: off)."""
    B, N, H, D = q.shape
    _, HKV, S, _ = k_cache.shape
    assert k_cache.shape == (B, HKV, S, D) and v_cache.shape == k_cache.shape, "k/v cache shape"
    assert H % HKV == 0, f"{H} query heads do not group over {HKV} KV heads"
    assert batch.tree is None or batch.tree.shape == (B, N, N), "tree must be (B, N, N)"
    G = H // HKV
    q, k_cache, v_cache = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k_cache, v_cache))
    prefix = batch.prefix_lens.to(device=q.device, dtype=torch.int32)
    num_new = batch.num_new.to(device=q.device, dtype=torch.int32)
    bits = batch.tree_bits()
    W = 0 if bits is None else bits.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale

    BLOCK_M, BLOCK_S, BLOCK_D, num_warps, num_stages = _config(N * G, D, q.dtype, q.is_cuda)
    m_tiles = triton.cdiv(N * G, BLOCK_M)
    # split-KV: enough programs to fill the GPU twice over, chunks of at least 4 * BLOCK_M keys
    # (then writing fp32 partials costs at most a quarter of the chunk's K/V reads)
    hint = S if batch.max_prefix is None else batch.max_prefix
    kv_bound = max(1, min(S, hint))
    if num_splits is None:
        target, programs = 2 * _sm_count(q.device), B * HKV * m_tiles
        num_splits = 1 if programs >= target else min(triton.cdiv(target, programs),
                                                      triton.cdiv(kv_bound, max(256, 4 * BLOCK_M)))
    chunk = triton.cdiv(triton.cdiv(kv_bound, max(1, num_splits)), BLOCK_S) * BLOCK_S
    splits = triton.cdiv(kv_bound, chunk)

    out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    if splits == 1:
        part, lse = out, out  # lse unused
        part_strides, lse_strides = (0,) + out.stride()[:3], (0, 0, 0)
    else:
        part = torch.empty((splits, B, N, H, D), device=q.device, dtype=torch.float32)
        lse = torch.empty((splits, B, N, H), device=q.device, dtype=torch.float32)
        part_strides, lse_strides = part.stride()[:4], lse.stride()[:3]
    grid = (m_tiles, B * HKV, splits)
    _tree_attention_kernel[grid](
        q, k_cache, v_cache, prefix, num_new, prefix if bits is None else bits, part, lse,
        scale * math.log2(math.e),
        *q.stride()[:3], *k_cache.stride()[:3], *v_cache.stride()[:3], *part_strides, *lse_strides,
        N, S, W, chunk, splits,
        HKV=HKV, G=G, D=D, SPLIT_KV=splits > 1, BLOCK_M=BLOCK_M, BLOCK_S=BLOCK_S, BLOCK_D=BLOCK_D,
        HAS_TREE=bits is not None, DOT_PRECISION="tf32x3" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages,
    )
    if splits > 1:
        _merge_splits_kernel[(B * N,)](
            part, lse, out, prefix, num_new, *part.stride()[:4], *lse.stride()[:3], *out.stride()[:3],
            N, H, chunk, splits, D=D, BLOCK_H=triton.next_power_of_2(H), BLOCK_D=BLOCK_D,
            num_warps=4,
        )
    return out


def _dense_mask(prefix_lens, num_new, tree, n, kv_len):
    device = prefix_lens.device
    pre = prefix_lens.long().view(-1, 1, 1)  # (B, 1, 1)
    i = torch.arange(n, device=device).view(1, -1, 1)  # (1, N, 1)
    j = torch.arange(kv_len, device=device).view(1, 1, -1)  # (1, 1, T)
    rel = j - pre  # slot's index among the new tokens
    if tree is None:
        among_new = (rel >= 0) & (rel <= i)
    else:
        rel_c = rel.clamp(0, n - 1).expand(tree.shape[0], n, kv_len)
        among_new = (rel >= 0) & (rel < n) & torch.gather(tree, 2, rel_c)
    mask = (j < pre) | among_new  # (B, N, T)
    valid_row = i < num_new.long().view(-1, 1, 1)
    # A padding row still sees its own slot, so softmax has no empty row (no NaN).
    mask = torch.where(valid_row, mask, rel == i)
    return mask.unsqueeze(1)


# On the CPU path a product of its own (an SDPA call with its slicing) costs about as much as this
# many (query row, key) pairs of the batch's product beyond its own rows: fitted to a split-or-not
# A/B on a 2-core EPYC (SmolLM2-135M: 9 heads / 3 KV heads, head dim 64) at batch 4, 16 and 64
# over 250 to 1300 cached tokens, where every break-even lay between 2,100 and 3,900 pairs.
SPLIT_COST = 3_500


def _reference_plan(batch: AttentionBatch, n: int, capacity: int):
    """(kv_len, dense mask, padding-row mask or None, requests with extra tokens or None),
    computed once per forward, not per layer (host syncs: fine on the CPU path).

    A ragged batch may run in parts, since on a CPU the attention of a padding row costs as much
    as a real one. Prompts of very different lengths (32 or more new tokens, padding over 3x: a
    prefill) run request by request, each on its own tokens and cache length (`extra` =
    ("each", [(b, new tokens, end slot)])): one long prompt in a batch of short ones would
    otherwise make every request pay for its length, squared. Draft trees of different sizes run
    as every request's first token in one product, then the other tokens of each request that has
    some on a view of its own cache (`extra`: the list of those requests), when that costs less:
    each product of its own SPLIT_COST pairs plus its rows, (num_new - 1) kv_len pairs, against
    the B (n - 1) kv_len pairs of a padded product's rows past the first. So at large batch and
    long contexts a few requests' trees go apart (even one extra token: at batch 16 over 700
    cached tokens it costs +8 ms apart and +22 ms padded); many trees share one padded product."""
    key = ("plan", n, capacity)
    if key not in batch._dense:
        kv_len = min(int((batch.prefix_lens + n).max()), capacity)
        valid = torch.arange(n, device=batch.num_new.device).view(1, n) < batch.num_new.view(-1, 1)
        padded, extra = None, None
        if not bool(valid.all()):
            padded = valid.view(-1, n, 1, 1)
            B = valid.shape[0]
            if n >= 32 and valid.numel() > 3 * int(batch.num_new.sum()):  # ragged prompts: each request alone
                ends = (batch.prefix_lens + batch.num_new).clamp(max=capacity)
                extra = ("each", list(zip(range(B), batch.num_new.tolist(), ends.tolist())))
            else:
                trees = (batch.num_new > 1).nonzero()[:, 0].tolist()
                own_rows = int(batch.num_new.sum()) - B  # the trees' tokens past their first
                if len(trees) * SPLIT_COST + own_rows * kv_len < B * (n - 1) * kv_len:
                    extra = trees
        batch._dense[key] = (kv_len, batch.dense_mask(n, kv_len), padded, extra)
    return batch._dense[key]


def _sdpa_grouped(q, k, v, mask, scale):
    """q (B, N, H, D), k and v (B, Hkv, S, D), mask (B, 1, N, S): (B, N, H, D) in fp32.

    The G query heads of a KV head go in as G x N rows of one head (row g * N + i), as the
    kernel does: the cache is read in place, never repeated G times (SDPA's GQA fallback on CPU
    copies K and V per query head, which costs more than the attention itself)."""
    B, N, H, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = H // Hkv
    qg = q.float().view(B, N, Hkv, G, D).permute(0, 2, 3, 1, 4).reshape(B, Hkv, G * N, D)
    mask = mask.unsqueeze(2).expand(B, 1, G, N, S).reshape(B, 1, G * N, S)
    out = F.scaled_dot_product_attention(qg, k.float(), v.float(), attn_mask=mask, scale=scale)
    return out.view(B, Hkv, G, N, D).permute(0, 3, 1, 2, 4).reshape(B, N, H, D)


def tree_attention_reference(q, k_cache, v_cache, batch: AttentionBatch, scale=None):
    """Dense-mask SDPA in fp32: the ground truth and the CPU path.

    A ragged batch may run in parts, so that padding rows cost nothing: see `_reference_plan`."""
    B, N, H, D = q.shape
    kv_len, mask, valid, extra = _reference_plan(batch, N, k_cache.shape[2])
    k, v = k_cache[:, :, :kv_len], v_cache[:, :, :kv_len]
    if extra is None:
        out = _sdpa_grouped(q, k, v, mask, scale)
        return out.to(q.dtype) if valid is None else torch.where(valid, out, 0.0).to(q.dtype)
    out = torch.zeros(B, N, H, D, dtype=torch.float32, device=q.device)
    if isinstance(extra, tuple):  # (b, its new tokens, its end slot) per request; padding stays zero
        for b, n, end in extra[1]:
            out[b : b + 1, :n] = _sdpa_grouped(q[b : b + 1, :n], k[b : b + 1, :, :end], v[b : b + 1, :, :end],
                                               mask[b : b + 1, :, :n, :end], scale)
        return out.to(q.dtype)
    out[:, :1] = _sdpa_grouped(q[:, :1], k, v, mask[:, :, :1], scale)
    for b in extra:  # each tree's other tokens on a view of its cache (a gathered copy costs more)
        out[b : b + 1, 1:] = _sdpa_grouped(q[b : b + 1, 1:], k[b : b + 1], v[b : b + 1], mask[b : b + 1, :, 1:], scale)
    # where, not a product: a padding row past the cache's end holds NaN
    return torch.where(valid, out, 0.0).to(q.dtype)


def tree_attention(q, k_cache, v_cache, batch: AttentionBatch, scale=None):
    """Attention of new tokens (a draft tree, a chain, a prompt) over the KV cache.

    q (B, N, H, D); k_cache, v_cache (B, Hkv, S, D); returns (B, N, H, D) in q's dtype.
    """
    fn = tree_attention_triton if use_triton(q) else tree_attention_reference
    with nvtx_range("tree_attention"):
        return fn(q, k_cache, v_cache, batch, scale)
