"""The floor under "auto": what the speculative engine's step costs when it does not draft, against
autoregressive decoding's step, split into the model's forward and everything else.

    python profiling/bench_plain_steps.py --questions ../shared/data/spec_bench/question.jsonl \
        --drafters ngram,suffix --batch 4 [--requests 16] [--rounds 4] [--out results/x.json]

Where speculation does not pay (large batches on a CPU) "auto" takes plain decode steps, and the
best it can do is this engine's plain step. Each drafter is run with a controller that never asks
it (it sees every committed token, as under "auto"), against AR on the same requests: one
process, configurations interleaved per batch, their order turning each batch. Reported per decode
step: the forward's milliseconds, the rest, and the paired ratio of decode time (engine / AR; above
1 is slower). A request's prefill is excluded from both.
"""

import argparse
import math
import sys
import time

import torch

import specdec
from drafters import make_drafter
from specdec import bench
from specdec.generate import make_controller


def timed_forward(net, log: list):
    """Wrap net.forward so that each decode forward (no `logits_at`: not a prefill) adds its seconds to log."""
    forward = net.forward

    def run(*args, **kwargs):
        t0 = time.perf_counter()
        out = forward(*args, **kwargs)
        if kwargs.get("logits_at") is None:
            log.append(time.perf_counter() - t0)
        return out

    net.forward = run


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model path (default: SmolLM2-135M-Instruct)")
    p.add_argument("--questions", default=None, help="Spec-Bench question.jsonl (default: the built-in prompts)")
    p.add_argument("--drafters", default="ngram,suffix")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--corpus", default=None, help="corpus for sam/suffix/hybrid")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)

    model = specdec.load_model(a.model) if a.model else specdec.load_model()
    questions = bench.round_robin(bench.load_questions(a.questions, per_category=max(1, a.requests // 13 + 1)))
    prompts = [bench.conversation_ids(model.tokenizer, [{"role": "user", "content": q["turns"][0]}])
               for q in questions[: a.requests]]
    forwards = []
    timed_forward(model.net, forwards)
    configs = ["none"]
    drafters = {}
    for name in a.drafters.split(","):
        options = {"corpus": a.corpus} if a.corpus and name in ("sam", "suffix", "hybrid") else {}
        drafters[name] = make_drafter(name, **options)
        controller = make_controller(model, "auto", drafters[name])
        controller.worth_drafting = lambda batch_size, remaining=None: False  # never ask: plain steps only
        configs.append(name)
    specdec.generate(model, prompts[: a.batch], max_new_tokens=8)  # warm up
    for d in drafters.values():
        specdec.generate(model, prompts[: a.batch], max_new_tokens=8, drafter=d)

    sums = {c: dict(steps=0, decode_seconds=0.0, forward_seconds=0.0) for c in configs}
    logs = {c: [] for c in configs if c != "none"}
    turn = 0
    for _ in range(a.rounds):
        for i in range(0, len(prompts), a.batch):
            batch, seconds = prompts[i : i + a.batch], {}
            for c in bench.turned(configs, turn):
                del forwards[:]
                drafter = "none" if c == "none" else drafters[c]
                out = specdec.generate(model, batch, max_new_tokens=a.max_new_tokens, drafter=drafter)
                seconds[c] = out.stats["seconds"] - out.stats["prefill_seconds"]
                s = sums[c]
                s["steps"] += len(forwards)
                s["decode_seconds"] += seconds[c]
                s["forward_seconds"] += sum(forwards)
            turn += 1
            for c in logs:
                logs[c].append(math.log(seconds[c] / seconds["none"]))

    rows = []
    for c in configs:
        s = sums[c]
        n = max(s["steps"], 1)
        row = dict(config="AR" if c == "none" else f"engine, {c}, never drafting", **s,
                   forward_ms_per_step=1e3 * s["forward_seconds"] / n,
                   other_ms_per_step=1e3 * (s["decode_seconds"] - s["forward_seconds"]) / n,
                   ms_per_step=1e3 * s["decode_seconds"] / n)
        if c in logs:
            r = bench.paired_ratio(logs[c])
            row.update(decode_time_vs_ar=r["paired_speedup"], decode_time_vs_ar_ci95=r["paired_ci95"], pairs=r["pairs"])
        rows.append(row)
        extra = "" if c not in logs else (f"  time vs AR {row['decode_time_vs_ar']:.3f}"
                                          + (" ({:.3f}-{:.3f})".format(*row["decode_time_vs_ar_ci95"])
                                             if row["decode_time_vs_ar_ci95"] else ""))
        print(f"{row['config']:32s} steps {s['steps']:5d}  forward {row['forward_ms_per_step']:6.2f} ms  "
              f"other {row['other_ms_per_step']:5.2f} ms  step {row['ms_per_step']:6.2f} ms{extra}")
    if a.out:
        bench.write_rows(a.out, model, rows, batch=a.batch, requests=len(prompts), rounds=a.rounds,
                         max_new_tokens=a.max_new_tokens,
                         timing="decode only, configurations interleaved per batch, order turning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
