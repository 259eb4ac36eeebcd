"""Tree attention: the Triton kernel against the reference and against attention computed
path by path with plain softmax. On CPU the kernel runs in Triton's interpreter, so the
shapes are small (each interpreted program costs milliseconds) but cross every edge:
one node, odd N, N*G over a tile, prefixes of 0, 1, odd and over a KV block, split-KV."""

import math
from dataclasses import dataclass

import pytest
import torch
from conftest import DEVICE

from kernels.tree_attention import (
    AttentionBatch,
    multi_candidate_parents,
    pack_tree_bits,
    tree_attention,
    tree_attention_reference,
    tree_attention_triton,
    tree_from_parents,
)

TOL = dict(atol=1e-4, rtol=1e-4)  # fp32 in, fp32 accumulation on both sides


def random_parents(B, N, gen, forest=False):
    """(B, N) int64: node i's parent uniform among 0..i-1; with forest, a fifth are roots."""
    i = torch.arange(N)
    parents = (torch.rand(B, N, generator=gen) * i).long()
    if forest:
        parents = torch.where(torch.rand(B, N, generator=gen) < 0.2, -1, parents)
    parents[:, 0] = -1
    return parents


def ancestors(parents_row, i):
    """Node i's root-to-node path (a list of node indices), by walking parent links."""
    path = [i]
    while parents_row[path[-1]] >= 0:
        path.append(int(parents_row[path[-1]]))
    return path[::-1]


def make_qkv(B, N, H, HKV, D, S, gen, device=DEVICE, dtype=torch.float32):
    q = torch.randn(B, N, H, D, generator=gen).to(device, dtype)
    k = torch.randn(B, HKV, S, D, generator=gen).to(device, dtype)
    v = torch.randn(B, HKV, S, D, generator=gen).to(device, dtype)
    return q, k, v


def path_attention(q, k, v, prefix_lens, num_new, parents, scale=None):
    """out[b, i] = softmax over the prefix and exactly i's root-to-node path; plain torch, fp32."""
    B, N, H, D = q.shape
    G = H // k.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    out = torch.zeros(B, N, H, D, dtype=torch.float32)
    for b in range(B):
        pre = int(prefix_lens[b])
        for i in range(int(num_new[b])):
            path = ancestors(parents[b].tolist(), i) if parents is not None else list(range(i + 1))
            slots = list(range(pre)) + [pre + j for j in path]
            kb = k[b, :, slots].float().cpu().repeat_interleave(G, 0)  # (H, L, D)
            vb = v[b, :, slots].float().cpu().repeat_interleave(G, 0)
            p = torch.softmax(torch.einsum("hd,hld->hl", q[b, i].float().cpu(), kb) * scale, -1)
            out[b, i] = torch.einsum("hl,hld->hd", p, vb)
    return out


def poison_unused_slots(k, v, prefix_lens, num_new):
    """NaN in every cache slot past prefix + num_new: the kernel must never read one."""
    k, v = k.clone(), v.clone()
    for b in range(k.shape[0]):
        end = int(prefix_lens[b] + num_new[b])
        k[b, :, end:] = float("nan")
        v[b, :, end:] = float("nan")
    return k, v


def i32(xs):
    return torch.tensor(xs, dtype=torch.int32, device=DEVICE)


# --- tree construction ---------------------------------------------------------------------


@pytest.mark.parametrize("N", [1, 2, 7, 33, 64], ids=lambda n: f"N{n}")
@pytest.mark.parametrize("forest", [False, True], ids=["tree", "forest"])
def test_tree_from_parents_matches_ancestor_walk(N, forest):
    parents = random_parents(3, N, torch.Generator().manual_seed(N), forest)
    expected = torch.zeros(3, N, N, dtype=torch.bool)
    for b in range(3):
        for i in range(N):
            expected[b, i, ancestors(parents[b].tolist(), i)] = True
    assert torch.equal(tree_from_parents(parents), expected)


@pytest.mark.parametrize("N", [1, 31, 32, 33, 64, 100], ids=lambda n: f"N{n}")
def test_pack_tree_bits_roundtrip(N):
    tree = torch.rand(2, N, N, generator=torch.Generator().manual_seed(N)) < 0.5
    bits = pack_tree_bits(tree)
    assert bits.shape == (2, N, (N + 31) // 32) and bits.dtype == torch.int32
    j = torch.arange(N)
    unpacked = (bits[:, :, j // 32] >> (j % 32)) & 1  # (B, N, N)
    assert torch.equal(unpacked.bool(), tree)
    batch = AttentionBatch(torch.zeros(2, dtype=torch.int32), torch.full((2,), N, dtype=torch.int32), tree)
    assert batch.tree_bits() is batch.tree_bits(), "packed once per forward, shared by all layers"


def test_multi_candidate_parents_layout():
    parents = multi_candidate_parents(3, 4)
    assert parents.dtype == torch.int64
    assert parents.tolist() == [-1, 0, 1, 2, 3, 0, 5, 6, 7, 0, 9, 10, 11]


# --- the kernel against the reference --------------------------------------------------------


@dataclass
class Case:
    id: str
    N: int
    H: int
    HKV: int
    D: int
    prefix: list  # per sequence; B = len(prefix)
    num_new: list
    forest: bool = False
    num_splits: int | None = None


CASES = [
    Case("N1-G1-decode", 1, 2, 2, 16, [0, 37], [1, 1]),
    Case("N7-G3-prefix0-1-45", 7, 6, 2, 16, [0, 1, 45], [7, 3, 5]),
    Case("N8-G4-prefix33-70", 8, 4, 1, 32, [33, 70], [8, 1]),
    Case("N16-G1-forest", 16, 2, 2, 16, [5, 0], [16, 9], forest=True),
    Case("N33-G3-tiles", 33, 3, 1, 16, [19, 64], [33, 2]),
    Case("N64-G1-forest-prefix0", 64, 1, 1, 16, [0], [64], forest=True),
    Case("N128-G1-max", 128, 1, 1, 16, [3], [128]),
    Case("N7-G3-D64-smollm", 7, 3, 1, 64, [40, 3], [7, 6]),
    Case("N8-G4-split3", 8, 4, 1, 16, [100, 9], [8, 5], num_splits=3),
    Case("N33-G3-split4-ragged", 33, 3, 1, 16, [130, 0, 65], [20, 33, 1], num_splits=4),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_random_tree_matches_reference(case, poison_empty):
    gen = torch.Generator().manual_seed(len(case.id))
    B, S = len(case.prefix), max(case.prefix) + case.N + 5
    q, k, v = make_qkv(B, case.N, case.H, case.HKV, case.D, S, gen)
    tree = tree_from_parents(random_parents(B, case.N, gen, case.forest)).to(DEVICE)
    batch = AttentionBatch(i32(case.prefix), i32(case.num_new), tree)
    out = tree_attention_triton(q, k, v, batch, num_splits=case.num_splits)
    assert not out.isnan().any()
    torch.testing.assert_close(out, tree_attention_reference(q, k, v, batch), **TOL)
    for b, n in enumerate(case.num_new):
        assert (out[b, n:] == 0).all(), "padding rows must be zero"


@pytest.mark.parametrize("num_splits", [1, 3], ids=["split-off", "split-on"])
def test_each_node_attends_to_exactly_its_path(num_splits, poison_empty):
    gen = torch.Generator().manual_seed(7)
    B, N, H, HKV, D = 2, 12, 3, 1, 16
    prefix, num_new = i32([50, 2]), i32([12, 10])
    q, k, v = make_qkv(B, N, H, HKV, D, 70, gen)
    parents = random_parents(B, N, gen, forest=True)
    batch = AttentionBatch(prefix, num_new, tree_from_parents(parents).to(DEVICE))
    expected = path_attention(q, k, v, prefix, num_new, parents)
    torch.testing.assert_close(tree_attention_reference(q, k, v, batch).cpu(), expected, **TOL)
    k_nan, v_nan = poison_unused_slots(k, v, prefix, num_new)
    out = tree_attention_triton(q, k_nan, v_nan, batch, num_splits=num_splits)
    assert not out.isnan().any()
    torch.testing.assert_close(out.cpu(), expected, **TOL)


@pytest.mark.parametrize("num_new, plan", [
    ([2, 1, 1, 1], "padded"),  # few padding rows over a short cache: one product
    ([9, 1, 1, 1, 1, 1], "views"),  # one deep tree: first tokens, then its rows on a view of its cache
    ([9, 4, 9] + [1] * 13, "views"),  # three trees among 16
    ([40, 1, 3, 1], "each"),  # prompts of very different lengths: request by request
], ids=["padded", "views1", "views3", "each"])
def test_reference_ragged_plans_attend_to_exactly_the_path(num_new, plan, monkeypatch):
    """The CPU reference splits a ragged batch in one of three ways; each must give every
    node exactly its path's attention and zero at padding. (These caches are short, so splits
    are forced by pricing a product of its own low.)"""
    from kernels import tree_attention as ta

    if plan == "views":
        monkeypatch.setattr(ta, "SPLIT_COST", 10)
    gen = torch.Generator().manual_seed(len(num_new))
    B, N = len(num_new), max(num_new)
    prefix = i32([(5 * b) % 23 for b in range(B)])
    q, k, v = make_qkv(B, N, 3, 1, 16, 23 + N, gen, device="cpu")
    parents = random_parents(B, N, gen, forest=True)
    batch = AttentionBatch(prefix.cpu(), i32(num_new).cpu(), tree_from_parents(parents))
    extra = ta._reference_plan(batch, N, k.shape[2])[3]
    assert {"padded": extra is None, "views": isinstance(extra, list) and len(extra) == sum(n > 1 for n in num_new),
            "each": isinstance(extra, tuple)}[plan]
    out = tree_attention_reference(q, k, v, batch)
    torch.testing.assert_close(out, path_attention(q, k, v, prefix.cpu(), i32(num_new).cpu(), parents), **TOL)
    for b, n in enumerate(num_new):
        assert (out[b, n:] == 0).all(), "padding rows must be zero"


def test_reference_splits_where_padding_rows_cost_more_than_products_of_their_own():
    """At batch 16, 5 nodes wide: over ~1300 cached tokens a few deep trees go apart and many share
    one padded product; over 64 tokens padding is cheap and one product wins."""
    from kernels.tree_attention import _reference_plan

    def plan(trees, cached):
        num_new = i32([5] * trees + [1] * (16 - trees)).cpu()
        tree = tree_from_parents(torch.where(torch.arange(5) < num_new.view(-1, 1), torch.arange(5) - 1, -1))
        return _reference_plan(AttentionBatch(i32([cached] * 16).cpu(), num_new, tree), 5, 2048)[3]

    assert plan(4, 1300) == [0, 1, 2, 3] and plan(12, 1300) is None and plan(4, 64) is None

    # One extra token over 700 cached tokens: its own product is cheaper than 15 padding rows.
    num_new = i32([2] + [1] * 15).cpu()
    tree = tree_from_parents(torch.where(torch.arange(2) < num_new.view(-1, 1), torch.arange(2) - 1, -1))
    assert _reference_plan(AttentionBatch(i32([700] * 16).cpu(), num_new, tree), 2, 2048)[3] == [0]


@pytest.mark.parametrize("N", [7, 16], ids=lambda n: f"N{n}")
def test_chain_equals_causal(N, poison_empty):
    gen = torch.Generator().manual_seed(N)
    prefix, num_new = i32([3, 40]), i32([N, N - 2])
    q, k, v = make_qkv(2, N, 4, 2, 16, 40 + N, gen)
    causal = AttentionBatch(prefix, num_new)
    chain_tree = tree_from_parents(torch.arange(N).repeat(2, 1) - 1).to(DEVICE)
    chain = AttentionBatch(prefix, num_new, chain_tree)
    out_causal = tree_attention_triton(q, k, v, causal)
    out_chain = tree_attention_triton(q, k, v, chain)
    expected = path_attention(q, k, v, prefix, num_new, None)
    torch.testing.assert_close(out_causal.cpu(), expected, **TOL)
    torch.testing.assert_close(out_chain, out_causal, **TOL)
    torch.testing.assert_close(tree_attention_reference(q, k, v, chain), out_causal, **TOL)


@pytest.mark.parametrize("prefix", [0, 1, 70], ids=lambda p: f"prefix{p}")
def test_single_node_is_plain_decode(prefix, poison_empty):
    gen = torch.Generator().manual_seed(prefix)
    H, HKV, D = 6, 2, 16
    q, k, v = make_qkv(1, 1, H, HKV, D, prefix + 1, gen)
    batch = AttentionBatch(i32([prefix]), i32([1]))
    out = tree_attention_triton(q, k, v, batch, num_splits=2)
    scores = torch.einsum("hd,hsd->hs", q[0, 0], k[0].repeat_interleave(H // HKV, 0)) / math.sqrt(D)
    expected = torch.einsum("hs,hsd->hd", torch.softmax(scores, -1), v[0].repeat_interleave(H // HKV, 0))
    torch.testing.assert_close(out[0, 0], expected, **TOL)


def test_multi_candidate_equals_independent_chains(poison_empty):
    """A root and C candidate chains verified in one tree = each candidate verified alone."""
    C, L, H, HKV, D = 3, 4, 4, 2, 16
    N = 1 + C * L
    gen = torch.Generator().manual_seed(3)
    prefix = i32([37, 5])
    q, k, v = make_qkv(2, N, H, HKV, D, 37 + N, gen)
    tree = tree_from_parents(multi_candidate_parents(C, L).repeat(2, 1)).to(DEVICE)
    out_tree = tree_attention_triton(q, k, v, AttentionBatch(prefix, i32([N, N]), tree))
    for c in range(C):
        nodes = [0] + list(range(1 + c * L, 1 + (c + 1) * L))  # root, then candidate c
        k_c, v_c = k.clone(), v.clone()
        for b in range(2):  # the chain's tokens sit in the slots right after the prefix
            slots = [int(prefix[b]) + j for j in nodes]
            k_c[b, :, int(prefix[b]):int(prefix[b]) + L + 1] = k[b, :, slots]
            v_c[b, :, int(prefix[b]):int(prefix[b]) + L + 1] = v[b, :, slots]
        chain = AttentionBatch(prefix, i32([L + 1, L + 1]))
        out_chain = tree_attention_triton(q[:, nodes].contiguous(), k_c, v_c, chain)
        torch.testing.assert_close(out_tree[:, nodes], out_chain, **TOL)


def test_split_kv_is_exact_and_hint_only_balances(poison_empty):
    gen = torch.Generator().manual_seed(11)
    q, k, v = make_qkv(2, 5, 4, 1, 16, 205, gen)
    parents = random_parents(2, 5, gen)
    tree = tree_from_parents(parents).to(DEVICE)
    batch = AttentionBatch(i32([200, 33]), i32([5, 4]), tree)
    expected = tree_attention_reference(q, k, v, batch)
    for num_splits in (1, 2, 7):
        out = tree_attention_triton(q, k, v, batch, num_splits=num_splits)
        torch.testing.assert_close(out, expected, **TOL)
    # a max_prefix hint that is too small shifts work to the last chunk, never drops keys
    short_hint = AttentionBatch(i32([200, 33]), i32([5, 4]), tree, max_prefix=64)
    torch.testing.assert_close(tree_attention_triton(q, k, v, short_hint, num_splits=2), expected, **TOL)


def test_scale_argument(poison_empty):
    gen = torch.Generator().manual_seed(5)
    q, k, v = make_qkv(1, 3, 2, 1, 16, 40, gen)
    batch = AttentionBatch(i32([37]), i32([3]))
    out = tree_attention_triton(q, k, v, batch, scale=0.3)
    torch.testing.assert_close(out, tree_attention_reference(q, k, v, batch, scale=0.3), **TOL)


# --- the reference (the model's CPU path) and dispatch --------------------------------------


def test_reference_padding_row_past_cache_end_is_zero():
    gen = torch.Generator().manual_seed(2)
    q, k, v = make_qkv(2, 4, 2, 1, 8, 10, gen, device="cpu")
    # sequence 0 fills the cache to its end with 2 new tokens: padding rows 2, 3 see no slot
    batch = AttentionBatch(torch.tensor([8, 1], dtype=torch.int32), torch.tensor([2, 4], dtype=torch.int32))
    out = tree_attention_reference(q, k, v, batch)
    assert not out.isnan().any() and (out[0, 2:] == 0).all()
    torch.testing.assert_close(out, path_attention(q, k, v, batch.prefix_lens, batch.num_new, None), **TOL)


def test_reference_keeps_low_precision_dtype():
    gen = torch.Generator().manual_seed(4)
    q, k, v = make_qkv(1, 3, 4, 2, 16, 20, gen, device="cpu", dtype=torch.bfloat16)
    batch = AttentionBatch(torch.tensor([10], dtype=torch.int32), torch.tensor([3], dtype=torch.int32))
    out = tree_attention_reference(q, k, v, batch)
    assert out.dtype == torch.bfloat16 and out.isfinite().all()
    expected = path_attention(q, k, v, batch.prefix_lens, batch.num_new, None)
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("choice", ["torch", "triton"])
def test_dispatch(choice, monkeypatch):
    monkeypatch.setenv("SPECDEC_KERNELS", choice)
    gen = torch.Generator().manual_seed(9)
    q, k, v = make_qkv(1, 2, 2, 1, 16, 12, gen)
    batch = AttentionBatch(i32([10]), i32([2]))
    torch.testing.assert_close(tree_attention(q, k, v, batch), tree_attention_reference(q, k, v, batch), **TOL)


# --- low precision on the GPU (the interpreter's bf16 tl.dot is not faithful) ----------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("H, HKV, D", [(9, 3, 64), (32, 8, 128)], ids=["smollm2", "llama3-8b"])
@pytest.mark.parametrize("N", [1, 33, 64, 128], ids=lambda n: f"N{n}")
@pytest.mark.parametrize("num_splits", [None, 1, 8], ids=["split-auto", "split-off", "split-8"])
def test_low_precision_on_gpu(dtype, H, HKV, D, N, num_splits, poison_empty):
    gen = torch.Generator().manual_seed(N)
    prefix, num_new = [0, 1, 777, 2048], [N, max(1, N // 2), 1, N]
    q, k, v = make_qkv(4, N, H, HKV, D, 2048 + N, gen, device="cuda", dtype=dtype)
    tree = tree_from_parents(random_parents(4, N, gen).cuda())
    batch = AttentionBatch(torch.tensor(prefix, dtype=torch.int32, device="cuda"),
                           torch.tensor(num_new, dtype=torch.int32, device="cuda"), tree)
    out = tree_attention_triton(q, k, v, batch, num_splits=num_splits)
    assert out.dtype == dtype and not out.isnan().any()
    torch.testing.assert_close(out, tree_attention_reference(q, k, v, batch), atol=2e-2, rtol=2e-2)
