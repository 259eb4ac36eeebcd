"""Drafter variants on the Spec-Bench sample, priced by the cost curve instead of the clock.

    python profiling/predicted_speed.py --questions ../shared/data/spec_bench/question.jsonl \
        --corpus ~/.cache/specdec/corpus/SmolLM2-135M-Instruct.Q4_1.npz \
        --variants ngram,recycle,recycle:best_first [--every 2] --out profiling/results/x.json

Each turn is decoded as `ab_recycle.py` decodes it (96 new tokens, "auto"), and every verification
forward is priced at c(1, 1 + K), the controller's measured cost of a forward over the root and K
draft nodes at batch 1; steps without a draft at c(1, 1). The predicted speedup over AR is
tokens x c(1, 1) / that sum. Drafting time and the clock's noise stay out (a 2-core machine's wall
time moves by 5-10% between runs; this figure moved by 0.3% when a variant was run twice), so
small changes to what a drafter proposes can be screened in one pass. It is a screen, not a
verdict: it leaves out each step's work beyond the forward, and on 2026-12-05 it put recycle 7-8%
closer to ngram than timed runs did, and a chain threshold of 2 3% ahead of 4 where timing found
0.99x (results/README.md). A change that should count is timed (`ab_recycle.py`). "auto" still reads the clock for its fitted overheads, so run it
alone. Variants: those of `ab_recycle.py`. --every 2 takes every second question (13 of 26, 4
minutes a variant on a 2-core CPU).
"""

import argparse
import collections
import json

import specdec
import specdec.engine as engine
from ab_recycle import make_variant
from specdec import bench
from specdec.controller import CostModel
from specdec.generate import generate


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--questions", default=None, help="Spec-Bench question.jsonl (default: the built-in prompts)")
    p.add_argument("--corpus", default=None, help="corpus .npz (see `specdec corpus`)")
    p.add_argument("--variants", default="ngram,recycle,recycle:best_first")
    p.add_argument("--per-category", type=int, default=2)
    p.add_argument("--every", type=int, default=1, help="take every n-th question")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)

    widths = []  # verified nodes (root included) of every verification forward, batch 1
    verify = engine.verify

    def counting_verify(logits, tokens, parents, num_nodes, *args, **kwargs):
        widths.append(int(num_nodes[0]))
        return verify(logits, tokens, parents, num_nodes, *args, **kwargs)

    engine.verify = counting_verify
    model = specdec.load_model()
    cost = CostModel.cached(model.net, model.name)
    questions = bench.load_questions(a.questions, per_category=a.per_category)[:: a.every]
    summary = {}
    for name in a.variants.split(","):
        drafter = make_variant(name, a.corpus)
        generate(model, "Say hello.", max_new_tokens=4, drafter=drafter)  # first-call overheads
        tokens = steps = drafted = nodes = 0
        priced = 0.0
        per_category = collections.defaultdict(lambda: [0, 0.0])
        for q in questions:
            history = []
            for turn in q["turns"]:
                history.append({"role": "user", "content": turn})
                widths.clear()
                r = generate(model, [bench.conversation_ids(model.tokenizer, history)],
                             max_new_tokens=a.max_new_tokens, drafter=drafter)
                history.append({"role": "assistant",
                                "content": model.tokenizer.decode(r.token_ids[0], skip_special_tokens=True)})
                # the prefill's token and the verified steps' are counted; the rest came from plain steps
                plain = r.stats["verify_steps"] - len(widths)
                price = sum(cost(1, w) for w in widths) + plain * cost(1, 1)
                tokens += r.stats["tokens"] - 1
                steps += r.stats["verify_steps"]
                drafted += sum(w > 1 for w in widths)
                nodes += sum(w - 1 for w in widths)
                priced += price
                per_category[q["category"]][0] += r.stats["tokens"] - 1
                per_category[q["category"]][1] += price
        base = cost(1, 1)
        summary[name] = dict(predicted_speedup=tokens * base / priced, mean_accepted_tokens=tokens / steps,
                             drafted_share=drafted / steps, draft_nodes_per_step=nodes / steps,
                             per_category={c: t * base / s for c, (t, s) in per_category.items()})
        print(name, json.dumps(summary[name]), flush=True)
    if a.out:
        bench.write_rows(a.out, model, [], summary=summary, questions=len(questions),
                         max_new_tokens=a.max_new_tokens, num_draft_tokens="auto", corpus=a.corpus,
                         cost_curve=dict(batch=1, plain_step_seconds=base,
                                         relative={n: cost(1, 1 + n) / base for n in (1, 2, 4, 8, 16)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
