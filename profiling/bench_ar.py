"""Autoregressive baseline and verification cost curve: specdec against transformers, same weights.

1. Greedy AR tokens/s at batch 1 (and optional larger batches) for specdec and transformers'
   `generate`, interleaved per prompt.
2. The verification cost curve: the time of one forward over q new tokens at a context of
   `--context` tokens, q = 1, 2, 4, ..., 64, for both models (all q rows' logits computed, as
   verification needs them). Speculation pays only while cost(q) stays near cost(1).

    python profiling/bench_ar.py --out profiling/results/ar_cpu.json
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import specdec
from specdec.bench import device_name
from specdec.generate import encode_prompts, prefill
from specdec.loading import default_model_path

PROMPTS = [
    "Explain how a bicycle works.",
    "Write a short story about a robot who learns to paint.",
    "List five tips for learning a new language.",
]


def median_ms(fn, reps):
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def cost_curve_ours(model, context, qs, reps):
    net = model.net
    cache = net.new_cache(1, context + max(qs) + 1)
    prefill(net, cache, [[(7 * i) % 1000 + 100 for i in range(context)]])
    out = {}
    with torch.inference_mode():
        for q in qs:
            x = torch.full((1, q), 42, device=model.device)
            out[q] = median_ms(lambda: net(x, cache), reps)  # cache.lens unchanged: same context each time
    return out


def cost_curve_hf(hf, context, qs, reps):
    from transformers import DynamicCache

    ids = torch.tensor([[(7 * i) % 1000 + 100 for i in range(context)]])
    out = {}
    with torch.inference_mode():
        cache = DynamicCache()
        hf(ids, past_key_values=cache, use_cache=True)
        for q in qs:
            x = torch.full((1, q), 42)

            def step():
                hf(x, past_key_values=cache, use_cache=True)
                cache.crop(-q)  # drop the q tokens again: every call sees the same context

            out[q] = median_ms(step, reps)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    model = specdec.load_model()
    path = default_model_path()
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    ours_tps, hf_tps, equal = [], [], True
    for p in PROMPTS:
        ids = encode_prompts(model, [p])
        r = specdec.generate(model, ids, max_new_tokens=args.max_new_tokens)
        ours_tps.append(r.stats["tokens"] / r.stats["seconds"])
        x = torch.tensor(ids)
        t0 = time.perf_counter()
        with torch.inference_mode():
            y = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=args.max_new_tokens, do_sample=False,
                            pad_token_id=model.tokenizer.pad_token_id)
        hf_tps.append((y.shape[1] - x.shape[1]) / (time.perf_counter() - t0))
        equal &= y[0, x.shape[1]:].tolist()[: len(r.token_ids[0])] == r.token_ids[0]
    qs = [1, 2, 4, 8, 16, 32, 64]
    ours_curve = cost_curve_ours(model, args.context, qs, args.reps)
    hf_curve = cost_curve_hf(hf, args.context, qs, args.reps)
    report = dict(
        device=device_name(model.device), model=model.name, dtype=str(model.dtype), batch=1,
        date=time.strftime("%Y-%m-%d"), ar_tokens_per_s=dict(specdec=statistics.mean(ours_tps),
                                                            transformers=statistics.mean(hf_tps)),
        greedy_outputs_equal=equal, context=args.context,
        cost_ms=dict(specdec=ours_curve, transformers=hf_curve),
        cost_ratio_to_q1=dict(specdec={q: ours_curve[q] / ours_curve[1] for q in qs},
                              transformers={q: hf_curve[q] / hf_curve[1] for q in qs}),
    )
    print(f"{report['device']}: greedy AR, batch 1, {args.max_new_tokens} new tokens")
    print(f"  specdec      {report['ar_tokens_per_s']['specdec']:6.1f} tokens/s")
    print(f"  transformers {report['ar_tokens_per_s']['transformers']:6.1f} tokens/s   (outputs equal: {equal})")
    print(f"forward over q new tokens at context {args.context} (ms, and ratio to q=1)")
    print(f"{'q':>4} {'specdec':>14} {'transformers':>18}")
    for q in qs:
        print(f"{q:>4} {ours_curve[q]:8.1f} {ours_curve[q] / ours_curve[1]:4.2f}x "
              f"{hf_curve[q]:10.1f} {hf_curve[q] / hf_curve[1]:4.2f}x")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
