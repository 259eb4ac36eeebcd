"""Tree attention: the Triton kernel against SDPA with a dense mask and compiled flex_attention.

Every case verifies a random draft tree of `nodes` nodes per sequence over a prefix of
`prefix` cached tokens, bf16. Times are `triton.testing.do_bench` medians of one layer's
attention; the per-forward metadata (packed tree bits, dense mask, block mask) is built once
outside the timing, as in the model. Bandwidth counts the bytes of K and V the op must read,
B * Hkv * (prefix + nodes) * D * 2 (K and V) * 2 bytes, against a device-to-device copy
(bytes read + bytes written per second).

    python profiling/bench_tree_attention.py [--quick] [--out results.json]
"""

import argparse
import datetime
import json
import os
import re
import sys

import torch
import torch._dynamo
import torch.nn.functional as F
import triton
import triton.testing
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kernels.tree_attention import AttentionBatch, tree_attention_triton, tree_from_parents  # noqa: E402

LAYOUTS = {  # name: (query heads, KV heads, head dim)
    "smollm2": (9, 3, 64),
    "llama3-8b": (32, 8, 128),
}
FULL = dict(batch=(1, 8, 32, 64), prefix=(512, 2048, 8192), nodes=(8, 32, 64))
QUICK = dict(batch=(1, 64), prefix=(2048, 8192), nodes=(32,))


def make_case(layout, B, prefix, nodes, device, dtype=torch.bfloat16, seed=0):
    """q (B, N, H, D), K/V caches (B, Hkv, prefix + N, D) and a random draft tree per sequence."""
    H, HKV, D = LAYOUTS[layout]
    gen = torch.Generator(device=device).manual_seed(seed)
    S = prefix + nodes
    q = torch.randn(B, nodes, H, D, device=device, dtype=dtype, generator=gen)
    k = torch.randn(B, HKV, S, D, device=device, dtype=dtype, generator=gen)
    v = torch.randn(B, HKV, S, D, device=device, dtype=dtype, generator=gen)
    i = torch.arange(nodes, device=device)
    parents = (torch.rand(B, nodes, device=device, generator=gen) * i).long()  # any earlier node
    parents[:, 0] = -1
    full = torch.full((B,), prefix, device=device, dtype=torch.int32)
    batch = AttentionBatch(full, torch.full((B,), nodes, device=device, dtype=torch.int32),
                           tree_from_parents(parents), max_prefix=prefix)
    return q, k, v, batch


def sdpa_dense(q, k, v, batch):
    """One SDPA call in the input dtype with the reference's dense (B, 1, N, S) bool mask."""
    H = q.shape[2]
    mask = batch.dense_mask(q.shape[1], k.shape[2])
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask, enable_gqa=k.shape[1] != H)
    return out.transpose(1, 2)


def flex_block_mask(batch, nodes, kv_len, device, compile_mask=True):
    prefix, tree = batch.prefix_lens, batch.tree

    def mask_mod(b, h, q_idx, kv_idx):
        rel = kv_idx - prefix[b]
        in_tree = (rel >= 0) & (rel < nodes) & tree[b, q_idx, rel.clamp(0, nodes - 1)]
        return (kv_idx < prefix[b]) | in_tree

    B = prefix.shape[0]
    return create_block_mask(mask_mod, B, None, nodes, kv_len, device=device, _compile=compile_mask)


def flex(q, k, v, block_mask, fn):
    out = fn(q.transpose(1, 2), k, v, block_mask=block_mask, enable_gqa=k.shape[1] != q.shape[2])
    return out.transpose(1, 2)


def copy_bandwidth():
    """Bytes read + written per second by a 2 GiB device-to-device copy."""
    src = torch.empty(2**30, device="cuda", dtype=torch.int16)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def bench_case(layout, B, prefix, nodes, flex_fn, copy_bps):
    """One row of the table: medians in ms, the kernel's K/V read rate, speedups."""
    H, HKV, D = LAYOUTS[layout]
    q, k, v, batch = make_case(layout, B, prefix, nodes, "cuda")
    batch.tree_bits()  # per forward, not per layer: outside the timing, like the masks below
    batch.dense_mask(nodes, k.shape[2])
    ours = tree_attention_triton(q, k, v, batch)
    torch.testing.assert_close(ours, sdpa_dense(q, k, v, batch), atol=2e-2, rtol=2e-2)
    bench = triton.testing.do_bench
    t_ours = bench(lambda: tree_attention_triton(q, k, v, batch), return_mode="median")
    t_sdpa = bench(lambda: sdpa_dense(q, k, v, batch), return_mode="median")
    try:  # a baseline that fails to build (an older torch) leaves a gap, not a crash
        block_mask = flex_block_mask(batch, nodes, k.shape[2], "cuda")
        flex_out = flex(q, k, v, block_mask, flex_fn)
        t_flex = bench(lambda: flex(q, k, v, block_mask, flex_fn), return_mode="median")
    except Exception as e:  # noqa: BLE001
        print(f"  flex_attention failed: {type(e).__name__}: {str(e)[:200]}")
        flex_out, t_flex = None, float("nan")
    if flex_out is not None:
        torch.testing.assert_close(ours, flex_out, atol=2e-2, rtol=2e-2)
    kv_bytes = 2 * B * HKV * (prefix + nodes) * D * k.element_size()
    bps = kv_bytes / (t_ours * 1e-3)
    return dict(layout=layout, H=H, Hkv=HKV, D=D, batch=B, prefix=prefix, nodes=nodes, dtype="bf16",
                triton_ms=t_ours, flex_ms=t_flex, sdpa_ms=t_sdpa, kv_bytes=kv_bytes,
                triton_gbps=bps / 1e9, frac_of_copy=bps / copy_bps,
                speedup_vs_flex=t_flex / t_ours, speedup_vs_sdpa=t_sdpa / t_ours)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small subset of the grid")
    parser.add_argument("--out", help="JSON path (default profiling/results/tree_attention_<device>.json)")
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_tree_attention: CUDA is not available; nothing to measure.")
        return 0

    # one compiled flex_attention serves every shape: let it recompile for each
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 4096)
    flex_fn = torch.compile(flex_attention)
    device_name = torch.cuda.get_device_name()
    copy_bps = copy_bandwidth()
    print(f"{device_name}: device copy {copy_bps / 1e9:.0f} GB/s (read + write), bf16, do_bench medians")
    header = (f"{'layout':10} {'B':>3} {'prefix':>6} {'N':>3} | {'triton ms':>9} {'KV GB/s':>7} {'%copy':>5} | "
              f"{'flex ms':>8} {'sdpa ms':>8} | {'x flex':>6} {'x sdpa':>6}")
    print(header + "\n" + "-" * len(header))
    grid = QUICK if args.quick else FULL
    rows = []
    for layout in args.layouts:
        for B in grid["batch"]:
            for prefix in grid["prefix"]:
                for nodes in grid["nodes"]:
                    r = bench_case(layout, B, prefix, nodes, flex_fn, copy_bps)
                    rows.append(r)
                    print(f"{layout:10} {B:>3} {prefix:>6} {nodes:>3} | {r['triton_ms']:9.4f} "
                          f"{r['triton_gbps']:7.0f} {100 * r['frac_of_copy']:5.1f} | {r['flex_ms']:8.4f} "
                          f"{r['sdpa_ms']:8.4f} | {r['speedup_vs_flex']:6.2f} {r['speedup_vs_sdpa']:6.2f}")
                    torch.cuda.empty_cache()

    slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")
    here = os.path.dirname(os.path.abspath(__file__))
    out = args.out or os.path.join(here, "results", f"tree_attention_{slug}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    meta = dict(device=device_name, date=datetime.date.today().isoformat(), torch=torch.__version__,
                triton=triton.__version__, quick=args.quick, copy_gbps=copy_bps / 1e9, dtype="bf16",
                timing="triton.testing.do_bench median, ms")
    with open(out, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1, allow_nan=True)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
