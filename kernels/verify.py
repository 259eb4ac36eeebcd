"""Fused tree verification and rejection sampling: one launch per decoding step, lossless.

Request b carries a draft tree: node 0 is the root (the last committed token, never tested), nodes
1..num_nodes[b]-1 are drafts with parents[b, i] < i, later nodes are padding. The target p at node i
is kernels.sampling's distribution (temperature, top-k, top-p) for logits[b, i]: the token that
follows node i. From the root, the current node's children x are tried in index order, each with its
own u = uniforms[b, child]:

    greedy (temperature 0)  accept iff x == argmax logits; the next token is that argmax
    no draft_probs          accept iff u < p(x);               on rejection p(x) <- 0, renormalized
    draft q, "iid"          accept iff u < min(1, p(x)/q(x));  on rejection p <- norm(max(0, p - q))
    "without_replacement"   the same, and on rejection also q(x) <- 0, renormalized. q(x) = 0 rejects.

An accepted child becomes the current node, with the fresh target that follows it. When every child
is rejected the next token is drawn from the residual p with uniforms[b, 0] (inverse CDF); a walk that
ends at a leaf draws the bonus token from the full target there. Each rule emits exactly p: by
induction over siblings, the residual is the target given a rejection, whatever the next sibling's
draft (from q, from q without the rejected tokens, or any fixed token for model-free drafters).
A rejection that leaves at most RESIDUAL_EPS of residual mass (p == q and a draft with q(x) = 0, say)
had at most that probability; p is then left as it was (a total-variation cost <= RESIDUAL_EPS). A
point-mass residual left empty draws from p.

The kernel: one program per request walks its tree, reading the vocabulary in BLOCK_V tiles; no
probability vector is ever written.
  * A visited node costs one online-softmax pass (max, min and sum of exp(z - max), z = logits / T).
    top-k: the exact k-th largest z by bisection over the ordered int32 patterns of fp32 (the largest
    v with count(z >= v) >= k, ~32 counting passes); top-p: the smallest v with mass(z > v) < top_p
    times the kept mass (~32 passes); each only when on. Then p(x) is one load and one exp.
  * Residuals are recomputed, not stored. After j rejections of drafts from q the residual is
    max(0, p - c_j q) / S_j, with c_0 = 0, S_0 = 1, c_{j+1} = c_j + S_j / Q_j and
    S_{j+1} = sum max(0, p - c_{j+1} q) (one pass); Q_j is 1 ("iid") or the q mass not yet rejected
    (without replacement: a rejected token already has residual 0, as x is rejected only when
    p_j(x) < q_j(x)). Point-mass drafts only take tokens out: their mass is subtracted, and the final
    draw masks them.
  * The draw: the first x with cumsum(w)[x] > u * sum(w), tile by tile, with an fp64 carry.
  Greedy requests take one argmax pass per visited node.

Shapes: B requests, N tree nodes (num_nodes[b] <= N), V vocabulary (any size).
    logits (B, N, V) fp32/fp16/bf16       draft_probs (B, N, V) fp32: row i is the q that node i's
    tokens, parents (B, N) int64            children were drawn from (rows sum to 1)
    (tokens of real nodes in [0, V))      num_nodes (B,) int; temperature, top_p (B,) float;
    uniforms (B, N) fp32 in [0, 1)        top_k (B,) int, 0 = off
"""

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.dispatch import nvtx_range, use_triton
from kernels.sampling import filtered_probs, sample, sample_inverse_cdf

RESIDUAL_EPS = 1e-6
SIBLINGS = ("iid", "without_replacement")
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Interpreted, every tile op costs Python time: big tiles there (tests lower it to cover tile edges).
MAX_BLOCK_V = 16384 if _INTERPRET else 2048


@dataclass
class VerifyResult:
    accept_nodes: torch.Tensor  # (B, N) int64 accepted draft nodes in path order, padded with -1
    accept_tokens: torch.Tensor  # (B, N) int64 their tokens, padded with -1
    accept_len: torch.Tensor  # (B,) int64 number of accepted drafts
    next_token: torch.Tensor  # (B,) int64 bonus or resampled token


# The CPU tests run these kernels in Triton's interpreter, which re-patches triton.language (~3 ms)
# on every call of a nested @triton.jit function. Two things keep that from dominating the tests:
# helpers are plain Python functions there (run inside the calling kernel, which is patched), and
# tl.sum/max/min/cumsum, themselves @jit wrappers, are spelled as the tl.reduce/tl.associative_scan
# builtins with the same combine functions (the same program on a GPU for fp32/int32 tensors).


def _device_fn(fn):
    return fn if _INTERPRET else triton.jit(fn)


_SUM, _MAX, _MIN = tl.standard._sum_combine, tl.standard._elementwise_max, tl.standard._elementwise_min


@_device_fn
def _flip(bits):
    # fp32 bit pattern <-> an integer of the same order (self-inverse): negative floats' magnitude
    # bits are reversed, so integer comparison and bisection follow float order.
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


@_device_fn
def _count_ge(row_ptr, V, t, thr, BLOCK_V: tl.constexpr):
    cnt = tl.full([], 0, tl.int32)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        z = tl.math.div_rn(tl.load(row_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32), t)
        cnt += tl.reduce(((z >= thr) & (offs < V)).to(tl.int32), 0, _SUM)
    return cnt


@_device_fn
def _mass(row_ptr, V, t, m, lo, above, BLOCK_V: tl.constexpr):
    # sum of exp(z - m) over z >= lo and z > above
    s = tl.full([], 0.0, tl.float32)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        z = tl.math.div_rn(tl.load(row_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32), t)
        s += tl.reduce(tl.where((z >= lo) & (z > above), tl.exp(z - m), 0.0), 0, _SUM)
    return s


@_device_fn
def _target_stats(row_ptr, V, t, top_k, top_p, BLOCK_V: tl.constexpr):
    """(m, zthr, Z) with z = logits / t: the target is p(x) = exp(z - m) / Z where z >= zthr, else 0."""
    m = tl.full([], float("-inf"), tl.float32)
    Z = tl.full([], 0.0, tl.float32)
    for start in range(0, V, BLOCK_V):  # online softmax: running max and rescaled sum
        offs = start + tl.arange(0, BLOCK_V)
        # IEEE division, as torch's logits.float() / temperature (Triton's `/` is approximate on GPUs)
        z = tl.math.div_rn(tl.load(row_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32), t)
        m_new = tl.maximum(m, tl.reduce(z, 0, _MAX))
        # exp(-inf - -inf) is NaN: -inf logits (and padding lanes) contribute nothing.
        scale = tl.where(m == float("-inf"), 0.0, tl.exp(m - m_new))
        Z = Z * scale + tl.reduce(tl.where(z == float("-inf"), 0.0, tl.exp(z - m_new)), 0, _SUM)
        m = m_new
    zthr = tl.full([], float("-inf"), tl.float32)
    # Bisection over keys: int64 with the order of fp32 (negatives have their magnitude bits flipped).
    # 0xFF800000 is -inf, whose key is -2139095041.
    if top_k > 0:
        lo = tl.full([], -2139095041, tl.int64)  # count(z >= -inf) = V >= k
        bits = m.to(tl.int32, bitcast=True)
        hi = _flip(bits).to(tl.int64) + 1  # count(z > max) = 0 < k
        while hi - lo > 1:  # the largest value v with count(z >= v) >= k: the k-th largest z
            bits = (lo + ((hi - lo) >> 1)).to(tl.int32)
            v = _flip(bits).to(tl.float32, bitcast=True)
            if _count_ge(row_ptr, V, t, v, BLOCK_V) >= top_k:
                lo = lo + ((hi - lo) >> 1)
            else:
                hi = lo + ((hi - lo) >> 1)
        bits = lo.to(tl.int32)
        zthr = _flip(bits).to(tl.float32, bitcast=True)
        Z = _mass(row_ptr, V, t, m, zthr, float("-inf"), BLOCK_V)
    if top_p < 1.0:
        bits = zthr.to(tl.int32, bitcast=True)
        lo = _flip(bits).to(tl.int64) - 1  # mass above lo: Z >= top_p Z
        bits = m.to(tl.int32, bitcast=True)
        hi = _flip(bits).to(tl.int64)  # mass above the max: 0
        limit = top_p * Z
        while hi - lo > 1:  # the smallest value v with mass(z > v) < top_p: keep z >= v
            bits = (lo + ((hi - lo) >> 1)).to(tl.int32)
            v = _flip(bits).to(tl.float32, bitcast=True)
            if _mass(row_ptr, V, t, m, zthr, v, BLOCK_V) < limit:
                hi = lo + ((hi - lo) >> 1)
            else:
                lo = lo + ((hi - lo) >> 1)
        bits = hi.to(tl.int32)
        zthr = _flip(bits).to(tl.float32, bitcast=True)
        Z = _mass(row_ptr, V, t, m, zthr, float("-inf"), BLOCK_V)
    return m, zthr, Z


@_device_fn
def _argmax(row_ptr, V, BLOCK_V: tl.constexpr):
    best = tl.full([], float("-inf"), tl.float32)
    best_i = tl.full([], 0, tl.int32)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        x = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        tile_max = tl.reduce(x, 0, _MAX)
        tile_i = tl.reduce(tl.where(x == tile_max, offs, V), 0, _MIN)  # lowest index among ties
        best_i = tl.where(tile_max > best, tile_i, best_i)
        best = tl.maximum(best, tile_max)
    return best_i


@_device_fn
def _residual_scan(row_ptr, q_row_ptr, V, t, m, zthr, Z, c, rej, residual, target,
                   HAS_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    """Walk the weights w tile by tile: w = max(0, p - c q) (draft model) or p without the rejected
    children `rej` (point masses) where residual is 1, the plain exp(z - m) where it is 0.
    Returns (sum of w over the tiles walked, the first x with cumsum(w)[x] > target and w[x] > 0,
    else the last x with w[x] > 0). target = +inf walks the whole row: a sum."""
    carry = tl.full([], 0.0, tl.float64)  # fp64 carry: the fp32 cumsum only ever sums one tile
    pick = tl.full([], -1, tl.int32)
    last = tl.full([], -1, tl.int32)
    offs_n = tl.arange(0, BLOCK_N)
    start = tl.full([], 0, tl.int32)
    while (start < V) & (pick < 0):
        offs = start + tl.arange(0, BLOCK_V)
        z = tl.math.div_rn(tl.load(row_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32), t)
        w = tl.where(z >= zthr, tl.exp(z - m), 0.0)
        if HAS_Q:
            q = tl.load(q_row_ptr + offs, mask=offs < V * residual, other=0.0)  # residual is 0 or 1
            w = tl.where(residual != 0, tl.maximum(w / Z - c * q, 0.0), w)
        else:
            hits = tl.reduce(((rej >= start) & (rej < start + BLOCK_V)).to(tl.int32), 0, _SUM)
            if (residual != 0) & (hits > 0):  # only tiles holding a rejected token pay for the mask
                for j in range(0, BLOCK_N):
                    w = tl.where(offs == tl.reduce(tl.where(offs_n == j, rej, 0), 0, _SUM), 0.0, w)
        cs = tl.associative_scan(w, 0, _SUM)
        local = (target - carry).to(tl.float32)
        pick = tl.reduce(tl.where((cs > local) & (w > 0.0), offs, 2147483647), 0, _MIN)
        pick = tl.where(pick == 2147483647, -1, pick)
        last = tl.maximum(last, tl.reduce(tl.where(w > 0.0, offs, -1), 0, _MAX))
        carry += tl.reduce(w, 0, _SUM).to(tl.float64)
        start += BLOCK_V
    return carry.to(tl.float32), tl.where(pick >= 0, pick, last)


@triton.jit
def _verify_kernel(
    logits_ptr,  # (B, N, V) fp32/fp16/bf16
    q_ptr,  # (B, N, V) fp32 draft distributions (unused without HAS_Q)
    tokens_ptr,  # (B, N) int64
    parents_ptr,  # (B, N) int64
    num_nodes_ptr,  # (B,) int32
    temperature_ptr,  # (B,) fp32
    top_k_ptr,  # (B,) int64
    top_p_ptr,  # (B,) fp32
    u_ptr,  # (B, N) fp32
    acc_nodes_ptr,  # (B, N) int64 out
    acc_tokens_ptr,  # (B, N) int64 out
    acc_len_ptr,  # (B,) int64 out
    next_ptr,  # (B,) int64 out
    N, V,
    HAS_Q: tl.constexpr, WITHOUT_REPLACEMENT: tl.constexpr, EPS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    bN = b * N  # this request's row in every (B, N) tensor
    offs_n = tl.arange(0, BLOCK_N)
    n = tl.load(num_nodes_ptr + b)
    tl.store(acc_nodes_ptr + bN + offs_n, tl.full([BLOCK_N], -1, tl.int64), mask=offs_n < N)
    tl.store(acc_tokens_ptr + bN + offs_n, tl.full([BLOCK_N], -1, tl.int64), mask=offs_n < N)
    # The tree stays in registers; padding nodes are nobody's child.
    b_par = tl.load(parents_ptr + bN + offs_n, mask=offs_n < n, other=-2)
    b_tok = tl.load(tokens_ptr + bN + offs_n, mask=offs_n < n, other=-1)
    temperature = tl.load(temperature_ptr + b)
    t = tl.where(temperature > 0.0, temperature, 1.0)
    top_k = tl.load(top_k_ptr + b)
    top_k = tl.where(top_k < V, top_k, 0)  # k >= V keeps everything
    top_p = tl.load(top_p_ptr + b)

    node = tl.full([], 0, tl.int32)
    length = tl.full([], 0, tl.int32)
    walking = tl.full([], 1, tl.int32)
    best = tl.full([], 0, tl.int32)
    m = tl.full([], 0.0, tl.float32)
    zthr = tl.full([], 0.0, tl.float32)
    Z = tl.full([], 1.0, tl.float32)
    c = tl.full([], 0.0, tl.float32)  # residual max(0, p - c q) / S
    S = tl.full([], 1.0, tl.float32)
    Q = tl.full([], 1.0, tl.float32)  # q mass not yet rejected (without replacement)
    rem = tl.full([], 1.0, tl.float32)  # target mass not yet rejected (point-mass drafts)
    nrej = tl.full([], 0, tl.int32)
    while walking > 0:
        row = logits_ptr + (bN + node) * V
        q_row = q_ptr + (bN + node) * V
        if temperature > 0.0:
            m, zthr, Z = _target_stats(row, V, t, top_k, top_p, BLOCK_V)
        else:
            best = _argmax(row, V, BLOCK_V)
        c = tl.full([], 0.0, tl.float32)
        S = tl.full([], 1.0, tl.float32)
        Q = tl.full([], 1.0, tl.float32)
        rem = Z
        nrej = tl.full([], 0, tl.int32)
        accepted = tl.full([], -1, tl.int32)
        child = tl.reduce(tl.where(b_par == node, offs_n, BLOCK_N), 0, _MIN)
        while (child < BLOCK_N) & (accepted < 0):
            x = tl.load(tokens_ptr + bN + child)
            u = tl.load(u_ptr + bN + child)
            dup = tl.full([], 0, tl.int1)  # x was a sibling's token already: i.i.d. rules do not care
            if WITHOUT_REPLACEMENT or not HAS_Q:
                dup = tl.reduce(((b_par == node) & (offs_n < child) & (b_tok == x)).to(tl.int32), 0, _SUM) > 0
            ok = x == best
            wx = tl.full([], 0.0, tl.float32)
            q0 = tl.full([], 0.0, tl.float32)
            if temperature > 0.0:
                wx = tl.math.div_rn(tl.load(row + x).to(tl.float32), t)
                wx = tl.where(wx >= zthr, tl.exp(wx - m), 0.0)
                if HAS_Q:
                    q0 = tl.load(q_row + x)
                    qx = q0 / tl.where(Q > 0.0, Q, 1.0)
                    if WITHOUT_REPLACEMENT:
                        qx = tl.where(dup | (Q <= 0.0), 0.0, qx)
                    px = tl.maximum(wx / Z - c * q0, 0.0) / S
                    ok = (qx > 0.0) & (u < px / tl.where(qx > 0.0, qx, 1.0))
                else:
                    ok = (rem > 0.0) & (u < tl.where(dup, 0.0, wx) / tl.where(rem > 0.0, rem, 1.0))
            if ok:
                accepted = child
            else:
                nrej += 1
                if temperature > 0.0:
                    if HAS_Q:
                        if Q > 0.0:  # an exhausted q (all of it rejected) leaves p as it is
                            c_new = c + S / Q
                            S_new, _ = _residual_scan(row, q_row, V, t, m, zthr, Z, c_new, b_tok, 1,
                                                      float("inf"), HAS_Q, BLOCK_N, BLOCK_V)
                            if S_new > EPS * S:
                                c = c_new
                                S = S_new
                        if WITHOUT_REPLACEMENT:
                            Q = tl.where(dup, Q, Q - q0)
                    else:
                        rem = tl.where(dup, rem, rem - wx)
            child = tl.reduce(tl.where((b_par == node) & (offs_n > child), offs_n, BLOCK_N), 0, _MIN)
        if accepted >= 0:
            tl.store(acc_nodes_ptr + bN + length, accepted.to(tl.int64))
            tl.store(acc_tokens_ptr + bN + length, tl.load(tokens_ptr + bN + accepted))
            length += 1
            node = accepted
        else:
            walking = 0

    # Every child of `node` was rejected (or it has none): draw from what is left.
    nxt = best
    if temperature > 0.0:
        row = logits_ptr + (bN + node) * V
        q_row = q_ptr + (bN + node) * V
        rej = tl.where(b_par == node, b_tok, -1)
        total = Z
        if HAS_Q:
            residual = (c > 0.0).to(tl.int32)
            total = tl.where(residual != 0, S, Z)
        else:
            residual = (nrej > 0).to(tl.int32)
            if residual != 0:
                total, _ = _residual_scan(row, q_row, V, t, m, zthr, Z, c, rej, residual, float("inf"),
                                          HAS_Q, BLOCK_N, BLOCK_V)
            residual = tl.where(total > 0.0, residual, 0)  # no mass left: draw from the target itself
            total = tl.where(residual != 0, total, Z)
        target = (tl.load(u_ptr + bN) * total).to(tl.float64)  # u * total in fp32, as the reference
        _, nxt = _residual_scan(row, q_row, V, t, m, zthr, Z, c, rej, residual, target, HAS_Q, BLOCK_N, BLOCK_V)
    tl.store(acc_len_ptr + b, length.to(tl.int64))
    tl.store(next_ptr + b, nxt.to(tl.int64))


def _check(logits, tokens, parents, num_nodes, uniforms, draft_probs, siblings):
    B, N, V = logits.shape
    assert tokens.shape == parents.shape == uniforms.shape == (B, N), "tokens/parents/uniforms must be (B, N)"
    assert num_nodes.shape == (B,), "num_nodes must be (B,)"
    assert draft_probs is None or draft_probs.shape == (B, N, V), "draft_probs must be (B, N, V)"
    assert siblings in SIBLINGS, f"siblings={siblings!r}: expected one of {SIBLINGS}"


def verify_triton(logits, tokens, parents, num_nodes, temperature, top_k, top_p, uniforms,
                  draft_probs=None, siblings="iid") -> VerifyResult:
    """The fused kernel: one program per request walks its tree. Shapes in the module doc."""
    _check(logits, tokens, parents, num_nodes, uniforms, draft_probs, siblings)
    B, N, V = logits.shape
    dev = logits.device
    logits = logits.contiguous()
    q = logits if draft_probs is None else draft_probs.to(torch.float32).contiguous()
    nodes = torch.empty((B, N), dtype=torch.int64, device=dev)
    toks = torch.empty((B, N), dtype=torch.int64, device=dev)
    length = torch.empty((B,), dtype=torch.int64, device=dev)
    nxt = torch.empty((B,), dtype=torch.int64, device=dev)
    BLOCK_V = min(triton.next_power_of_2(V), MAX_BLOCK_V)
    _verify_kernel[(B,)](
        logits, q, tokens.long().contiguous(), parents.long().contiguous(), num_nodes.to(torch.int32).contiguous(),
        temperature.to(torch.float32).contiguous(), top_k.long().contiguous(), top_p.to(torch.float32).contiguous(),
        uniforms.to(torch.float32).contiguous(), nodes, toks, length, nxt, N, V,
        HAS_Q=draft_probs is not None, WITHOUT_REPLACEMENT=siblings == "without_replacement", EPS=RESIDUAL_EPS,
        BLOCK_N=max(2, triton.next_power_of_2(N)), BLOCK_V=BLOCK_V, num_warps=8 if BLOCK_V >= 2048 else 4,
        enable_fp_fusion=False,  # IEEE a * b + c, as the torch reference rounds it
    )
    return VerifyResult(nodes, toks, length, nxt)


def _accept_prob(p, q, x):
    """P(accept draft token x) under the residual target p (B, V) and draft q (B, V) or None. (B,)"""
    px = p.gather(1, x[:, None]).squeeze(1)
    if q is None:
        return px / p.sum(-1)
    qx = q.gather(1, x[:, None]).squeeze(1)
    return torch.where(qx > 0, px / torch.where(qx > 0, qx, 1.0), 0.0).clamp(max=1.0)


def _after_reject(p, q, x, rej, siblings):
    """(p, q) after rejecting x on rows rej (B,): the residual target, and q without x if sampled
    without replacement. A point-mass draft (q None) just removes x from p."""
    if q is None:
        px = p.gather(1, x[:, None])
        return p.scatter(1, x[:, None], torch.where(rej[:, None], 0.0, px)), None
    r = (p - q).clamp(min=0.0)
    s = r.sum(-1, keepdim=True)
    p = torch.where(rej[:, None] & (s > RESIDUAL_EPS), r / s.clamp(min=RESIDUAL_EPS), p)
    if siblings == "without_replacement":
        q_new = q.scatter(1, x[:, None], 0.0)
        qs = q_new.sum(-1, keepdim=True)
        q = torch.where(rej[:, None], torch.where(qs > 0, q_new / qs.clamp(min=1e-30), q_new), q)
    return p, q


def _verify_greedy(logits, tokens, parents, num_nodes) -> VerifyResult:
    """The greedy rule alone (every request at temperature 0), without a walk: a node is accepted
    when its token is its parent's argmax, no earlier sibling's is, and the same holds for each of
    its ancestors. One argmax over all nodes, a sibling test, then the ancestors' verdicts folded
    in by pointer jumping (log2 N rounds, not a round per level). At batch 1, 9 nodes, on a 2-core
    CPU: 0.6 ms -> 0.4 ms, most of it the argmax over the vocabulary. Accepted nodes lie on one
    path, so in index order they are in path order."""
    B, N, V = logits.shape
    dev = logits.device
    # (B, N) the target's token after each node (over rows of a 2-D view: on a CPU 1.5x faster)
    best = logits.reshape(B * N, V).argmax(-1).view(B, N)
    k = torch.arange(N, device=dev)
    valid = k.view(1, N) < num_nodes.to(dev).view(B, 1)
    parents = torch.where(valid, parents.long(), -2)  # padding nodes are nobody's child
    hit = valid & (tokens.long() == best.gather(1, parents.clamp(min=0)))  # node matches its parent's argmax
    hit[:, 0] = False  # the root is never tested
    # an earlier sibling that matches too wins (siblings in index order): [b, i, j] j < i share a parent
    earlier = (parents.view(B, N, 1) == parents.view(B, 1, N)) & (k.view(1, 1, N) < k.view(1, N, 1))
    ok = hit & ~(earlier & hit.view(B, 1, N)).any(-1)
    ok[:, 0] = True  # the root: every path's start
    up = parents.clamp(min=0)  # a child of the root points at node 0, and so does node 0
    for _ in range(max(N - 1, 1).bit_length()):  # after r rounds, ok folds in 2^r ancestors
        ok = ok & ok.gather(1, up)
        up = up.gather(1, up)
    ok[:, 0] = False
    length = ok.sum(1)
    nodes = torch.where(ok, k.view(1, N), N).sort(1).values
    nodes = torch.where(nodes < N, nodes, -1)
    last = torch.where(ok, k.view(1, N), 0).max(1).values  # the deepest accepted node, or the root
    toks = torch.where(nodes >= 0, tokens.long().gather(1, nodes.clamp(min=0)), -1)
    return VerifyResult(nodes, toks, length, best.gather(1, last.view(B, 1))[:, 0])


def verify_reference(logits, tokens, parents, num_nodes, temperature, top_k, top_p, uniforms,
                     draft_probs=None, siblings="iid") -> VerifyResult:
    """The rules of the module doc, literally, vectorized over requests (a loop over depth and nodes)."""
    _check(logits, tokens, parents, num_nodes, uniforms, draft_probs, siblings)
    if bool((temperature <= 0).all()):
        return _verify_greedy(logits, tokens, parents, num_nodes)
    B, N, V = logits.shape
    dev = logits.device
    flat = logits.reshape(B * N, V)
    base = torch.arange(B, device=dev) * N  # row of node 0 in flat
    greedy = temperature <= 0
    safe_t = torch.where(greedy, torch.ones_like(temperature), temperature).float()
    top_p = None if top_p is None or bool((top_p >= 1).all()) else top_p  # skips a sort per level
    valid = torch.arange(N, device=dev)[None, :] < num_nodes.to(dev).view(B, 1)
    parents = torch.where(valid, parents.long(), -2)  # padding nodes are nobody's child
    tokens = tokens.long().clamp(0, V - 1)
    nodes = torch.full((B, N), -1, dtype=torch.int64, device=dev)
    length = torch.zeros(B, dtype=torch.int64, device=dev)
    node = torch.zeros(B, dtype=torch.int64, device=dev)
    final_p = final_p0 = torch.zeros(B, V, device=dev)
    final_best = torch.zeros(B, dtype=torch.int64, device=dev)
    active = torch.ones(B, dtype=torch.bool, device=dev)
    while bool(active.any()):
        node_logits = flat[base + node]  # (B, V) target logits at each request's current node
        best = node_logits.argmax(-1)
        p0 = p = filtered_probs(node_logits, safe_t, top_k, top_p)
        q = None if draft_probs is None else draft_probs.reshape(B * N, V)[base + node].float()
        chosen = torch.full((B,), -1, dtype=torch.int64, device=dev)
        for i in range(1, N):  # siblings in index order
            trying = active & (parents[:, i] == node) & (chosen < 0)
            if not bool(trying.any()):
                continue
            x = tokens[:, i]
            ok = torch.where(greedy, x == best, uniforms[:, i] < _accept_prob(p, q, x))
            p, q = _after_reject(p, q, x, trying & ~ok & ~greedy, siblings)
            chosen = torch.where(trying & ok, i, chosen)
        adv = chosen >= 0
        stop = (active & ~adv)[:, None]
        final_p, final_p0 = torch.where(stop, p, final_p), torch.where(stop, p0, final_p0)
        final_best = torch.where(stop[:, 0], best, final_best)
        slot = length.clamp(max=N - 1)[:, None]
        nodes.scatter_(1, slot, torch.where(adv[:, None], chosen[:, None], nodes.gather(1, slot)))
        length += adv.long()
        node = torch.where(adv, chosen, node)
        active = adv
    final_p = torch.where(final_p.sum(-1, keepdim=True) > 0, final_p, final_p0)
    drawn = sample_inverse_cdf(final_p, uniforms[:, 0])
    toks = torch.where(nodes >= 0, tokens.gather(1, nodes.clamp(min=0)), -1)
    return VerifyResult(nodes, toks, length, torch.where(greedy, final_best, drawn))


def verify(logits, tokens, parents, num_nodes, temperature, top_k, top_p, uniforms,
           draft_probs=None, siblings="iid") -> VerifyResult:
    """Accept a prefix of each request's draft tree and draw the next token (shapes in the module doc)."""
    fn = verify_triton if use_triton(logits) else verify_reference
    with nvtx_range("verify_kernel"):
        return fn(logits, tokens, parents, num_nodes, temperature, top_k, top_p, uniforms, draft_probs, siblings)


def sample_tokens(logits, temperature, top_k, top_p, u):
    """One token per row of logits (B, V) with uniforms u (B,): the decoder's sampler. (B,) int64."""
    if not use_triton(logits):
        return sample(logits, temperature, top_k, top_p, u)
    B = logits.shape[0]
    zeros = torch.zeros((B, 1), dtype=torch.int64, device=logits.device)
    ones = torch.ones((B,), dtype=torch.int32, device=logits.device)
    out = verify_triton(logits[:, None, :], zeros, zeros - 1, ones, temperature, top_k, top_p, u.view(B, 1))
    return out.next_token
