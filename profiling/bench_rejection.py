"""Fused verification + rejection sampling against the unfused PyTorch path and FlashInfer.

    python profiling/bench_rejection.py [--quick] [--out profiling/results/rejection_<device>.json]

Each request carries a chain of N - 1 draft tokens drawn from a draft distribution q close to the
target (so some prefix is accepted), bf16 logits (B, N, V) and fp32 draft_probs (B, N, V).
    fused          kernels.verify.verify_triton, siblings="iid" (one launch, nothing written but tokens)
    fused_filtered the same with temperature 0.7, top-k 50, top-p 0.9 (adds the bisection passes)
    torch          softmax over every node, gather, compare, cumprod, residual, multinomial
    flashinfer     softmax + flashinfer.sampling.chain_speculative_sampling, where installed
Times are triton.testing.do_bench medians. "GB/s" divides the bytes of the logits tensor by the time:
the unfused paths read all of it (and more), the fused kernel only the rows its walk visits, so its
figure is an effective rate, compared with a measured device-to-device copy.
"""

import argparse
import datetime
import json
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VOCABS, BATCHES, NODES = (49152, 128256, 151936), (1, 16, 64), (4, 16, 64)


def make_inputs(B, N, V, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(B, N, V, device=device, generator=g) * 3
    noise = torch.randn(B, N, V, device=device, generator=g)
    draft = torch.softmax(logits + noise, -1)  # (B, N, V) fp32: a draft close to the target
    tokens = torch.zeros(B, N, dtype=torch.int64, device=device)
    tokens[:, 1:] = torch.multinomial(draft[:, :-1].reshape(-1, V), 1, generator=g).view(B, N - 1)
    parents = torch.arange(-1, N - 1, device=device).expand(B, N).contiguous()
    return dict(logits=logits.to(torch.bfloat16), draft=draft, tokens=tokens, parents=parents,
                num_nodes=torch.full((B,), N, device=device), u=torch.rand(B, N, device=device, generator=g))


def torch_chain(logits, draft, tokens, u, temperature):
    """The unfused chain path: every probability tensor materialized in memory."""
    B, N, V = logits.shape
    K = N - 1
    p = torch.softmax(logits.float() / temperature.view(B, 1, 1), -1)  # (B, N, V)
    x = tokens[:, 1:, None]  # (B, K, 1)
    px, qx = p[:, :K].gather(2, x).squeeze(-1), draft[:, :K].gather(2, x).squeeze(-1)  # (B, K)
    accept = u[:, 1:] * qx < px
    n = accept.int().cumprod(1).sum(1)  # accepted prefix length
    rows = torch.arange(B, device=logits.device)
    q_n = torch.where((n < K).view(B, 1), draft[rows, n.clamp(max=K - 1)], 0.0)
    residual = (p[rows, n] - q_n).clamp(min=0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p[rows, n])
    return n, torch.multinomial(residual, 1)


def flashinfer_chain():
    try:
        from flashinfer.sampling import chain_speculative_sampling
    except Exception:  # not installed, or built for another torch
        return None

    def run(logits, draft, tokens, u, temperature):
        B, N, V = logits.shape
        target = torch.softmax(logits.float() / temperature.view(B, 1, 1), -1)
        ids = tokens[:, 1:].to(torch.int32)
        try:
            return chain_speculative_sampling(draft[:, :-1].contiguous(), ids, target)
        except TypeError:  # older releases take the uniforms explicitly
            return chain_speculative_sampling(draft[:, :-1].contiguous(), ids, u.contiguous(), target)

    return run


def copy_bandwidth(do_bench, device):
    src = torch.empty(1 << 28, dtype=torch.float32, device=device)  # 1 GiB
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * src.numel() * 4 / ms / 1e6  # read + write, GB/s


def bench_config(V, B, N, do_bench, ceiling, flashinfer, device="cuda"):
    """Rows {V, B, N, impl, ms, GBps, frac_of_copy, mean_accepted} for one shape."""
    from kernels.verify import verify_triton

    d = make_inputs(B, N, V, device)
    walk = (d["logits"], d["tokens"], d["parents"], d["num_nodes"])
    t = torch.ones(B, device=device)
    plain = (t, torch.zeros(B, dtype=torch.int64, device=device), torch.ones(B, device=device))
    filtered = (torch.full((B,), 0.7, device=device), torch.full((B,), 50, device=device),
                torch.full((B,), 0.9, device=device))
    impls = {
        "fused": lambda: verify_triton(*walk, *plain, d["u"], d["draft"]),
        "fused_filtered": lambda: verify_triton(*walk, *filtered, d["u"], d["draft"]),
        "torch": lambda: torch_chain(d["logits"], d["draft"], d["tokens"], d["u"], t),
    }
    if flashinfer is not None:
        impls["flashinfer"] = lambda: flashinfer(d["logits"], d["draft"], d["tokens"], d["u"], t)
    accepted = float(impls["fused"]().accept_len.float().mean())
    nbytes = d["logits"].numel() * d["logits"].element_size()
    rows = []
    for impl, fn in impls.items():
        try:
            ms = do_bench(fn, return_mode="median")
        except Exception as e:  # e.g. an incompatible FlashInfer build
            print(f"{V:>7} {B:>3} {N:>3} {impl:>15} failed: {type(e).__name__}: {e}")
            continue
        gbs = nbytes / ms / 1e6
        rows.append(dict(V=V, B=B, N=N, impl=impl, ms=ms, GBps=gbs, frac_of_copy=gbs / ceiling, mean_accepted=accepted))
        print(f"{V:>7} {B:>3} {N:>3} {impl:>15} {ms:>9.4f} {gbs:>8.0f} {gbs / ceiling:>8.2f} {accepted:>9.2f}")
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="V=151936, B in {1, 64}, N in {4, 16}")
    ap.add_argument("--out", default=None, help="JSON path (default profiling/results/rejection_<device>.json)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_rejection: no CUDA device, nothing to measure.")
        return 0

    from triton.testing import do_bench

    name = torch.cuda.get_device_name()
    slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    out = Path(args.out or Path(__file__).resolve().parent / "results" / f"rejection_{slug}.json")
    vocabs, batches, nodes = ((151936,), (1, 64), (4, 16)) if args.quick else (VOCABS, BATCHES, NODES)
    ceiling = copy_bandwidth(do_bench, "cuda")
    flashinfer = flashinfer_chain()
    print(f"{name}: copy bandwidth {ceiling:.0f} GB/s; flashinfer {'found' if flashinfer else 'not installed'}")
    print(f"{'V':>7} {'B':>3} {'N':>3} {'impl':>15} {'ms':>9} {'GB/s':>8} {'of copy':>8} {'accepted':>9}")
    rows = []
    for V in vocabs:
        for B in batches:
            for N in nodes:
                rows += bench_config(V, B, N, do_bench, ceiling, flashinfer)
                torch.cuda.empty_cache()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(device=name, date=datetime.date.today().isoformat(), torch=torch.__version__,
                                   logits_dtype="bfloat16", copy_GBps=ceiling, rows=rows), indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
