"""How far can retrieval drafting go on the Spec-Bench sample? Bounds that no drafter copying from
the corpus, earlier answers and the request's own text can beat, beside what `suffix` reaches.

    python profiling/retrieval_headroom.py --questions ../shared/data/spec_bench/question.jsonl \
        --corpus ~/.cache/specdec/corpus/SmolLM2-135M-Instruct.Q4_1.npz \
        --out profiling/results/retrieval_headroom_cpu.json

AR decodes the sample (2 questions per category, every turn, 96 new tokens a turn, greedy), and its
outputs are replayed offline the way speculative decoding meets them: a step drafts from where the
answer stands, is accepted as far as it agrees with AR's output, and adds one token of the target's
own. Lossless decoding makes that replay exact: any drafter's output is AR's.

The oracle of context c drafts, each step, the longest run of the true continuation that follows
the request's last c tokens somewhere in the sources a retrieval drafter has (the corpus, the run's
earlier answers, this prompt and answer so far), capped at `--max-nodes`. Among all the places where
those c tokens occur it takes the one that turns out right, which a drafter cannot know, and it
drafts nothing it will not get accepted, so each step costs only the verification of its run. Its
mean accepted tokens and its decode speedup under this machine's measured cost curve (the one
"auto" uses, batch 1) bound every retrieval drafter whose drafts follow a match of c tokens or more.
`suffix` is replayed on the same steps with its trees at the full node budget (no controller), and
"oracle-pruned": the same trees, each step verifying only the path that will be accepted, the best any
controller could do with its proposals.
The whole-generation bound adds AR's measured prefill, the same for every method.
"""

import argparse
import json
import time

import specdec
from drafters.suffix_tree import SuffixTreeDrafter, _Request
from specdec import bench
from specdec.controller import CostModel
from specdec.generate import generate


def decode_sample(model, questions, max_new_tokens):
    """AR's answers, turn by turn: [{category, prompt, output, prefill_s, decode_s}]."""
    turns, tok = [], model.tokenizer
    for q in questions:
        history = []
        for text in q["turns"]:
            history.append({"role": "user", "content": text})
            ids = bench.conversation_ids(tok, history)
            r = generate(model, [ids], max_new_tokens=max_new_tokens, drafter="none")
            out = [int(t) for t in r.token_ids[0]]
            turns.append(dict(category=q["category"], prompt=[int(t) for t in ids], output=out,
                              prefill_s=r.stats["prefill_seconds"], decode_s=r.stats["seconds"] - r.stats["prefill_seconds"]))
            history.append({"role": "assistant", "content": tok.decode(out, skip_special_tokens=True)})
    return turns


def oracle_run(trees, context: list, future: list, c: int, max_nodes: int) -> int:
    """Longest L <= max_nodes such that context[-c:] + future[:L] occurs in one of `trees`
    (SuffixTrees; each occurrence must go on past those tokens, as a draft does)."""
    head, L = context[-c:], 0
    while L < min(max_nodes, len(future)) and any(t.count(head + future[: L + 1]) for t in trees):
        L += 1
    return L


def accepted_length(tokens: list, parents: list, future: list) -> int:
    """How many tokens of `future` the draft tree (tokens, parents: -1 = a child of the root) holds
    as a path from the root, as greedy verification accepts it."""
    depth, on_path, best = {}, set(), 0
    for i, (t, p) in enumerate(zip(tokens, parents)):
        depth[i] = 0 if p < 0 else depth[p] + 1
        if (p < 0 or p in on_path) and depth[i] < len(future) and future[depth[i]] == t:
            on_path.add(i)
            best = max(best, depth[i] + 1)
    return best


def replay(turns, corpus, contexts, max_nodes, step_cost, vocab_size):
    """Per method (each oracle context, and `suffix`): steps, tokens and summed step cost of the
    decode steps, plus per category. The global tree learns each answer after its turn, as `suffix`
    does in a run; each method replays the same steps its own way."""
    methods = [f"oracle, context {c}" for c in contexts] + ["suffix", "suffix, oracle-pruned"]
    totals = {m: dict(steps=0, tokens=0, cost=0.0, first_wrong=0, by_category={}) for m in methods}
    drafter = SuffixTreeDrafter(corpus=corpus)
    drafter.prepare(vocab_size, "cpu")
    for turn in turns:
        out = turn["output"]
        for m in methods:
            req = _Request(turn["prompt"] + out[:1], len(turn["prompt"]), drafter.max_depth)
            i, acc = 1, totals[m]
            cat = acc["by_category"].setdefault(turn["category"], dict(steps=0, tokens=0))
            while i < len(out):
                future = out[i:-1]  # the last token comes as the target's own, whatever was drafted
                if m.startswith("suffix"):
                    _, _, tokens, parents = drafter.draft_one(req, max_nodes)
                    a = accepted_length(tokens, parents, future)
                    nodes = len(tokens) if m == "suffix" else a  # pruned: verifies only what it keeps
                    acc["first_wrong"] += a == 0 and len(tokens) > 0
                else:
                    c = contexts[methods.index(m)]
                    a = nodes = oracle_run([drafter.global_tree, req.tree], req.tokens, future, c, max_nodes)
                for t in out[i : i + a + 1]:
                    req.tree.extend(req.seq, t)
                i += a + 1
                acc["steps"] += 1
                acc["tokens"] += a + 1
                acc["cost"] += step_cost(nodes)
                cat["steps"] += 1
                cat["tokens"] += a + 1
        drafter.add_global(out)
    return totals


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--questions", default=None, help="Spec-Bench question.jsonl (default: the built-in prompts)")
    p.add_argument("--per-category", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--corpus", required=True, help="the corpus `sam`/`suffix` draw on (`specdec corpus`)")
    p.add_argument("--max-nodes", type=int, default=16, help="draft node budget (\"auto\"'s default cap)")
    p.add_argument("--contexts", default="1,2,3", help="oracle context lengths")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)

    model = specdec.load_model()
    questions = bench.load_questions(a.questions, per_category=a.per_category)
    bench.check_corpus(a.corpus, questions)
    cost = CostModel.cached(model.net, model.name)
    plain = cost(1, 1)

    def step_cost(nodes):  # a verification forward over root + nodes, in plain steps
        return cost(1, 1 + nodes) / plain

    t0 = time.perf_counter()
    turns = decode_sample(model, questions, a.max_new_tokens)
    print(f"AR decoded {len(turns)} turns in {time.perf_counter() - t0:.0f} s")
    contexts = [int(c) for c in a.contexts.split(",")]
    from drafters.corpus import Corpus

    totals = replay(turns, Corpus.load(a.corpus), contexts, a.max_nodes, step_cost, model.config.vocab_size)
    prefill = sum(t["prefill_s"] for t in turns)
    decode = sum(t["decode_s"] for t in turns)
    rows = {}
    for m, t in totals.items():
        decode_speedup = t["tokens"] / t["cost"]
        rows[m] = dict(mean_accepted_tokens=t["tokens"] / t["steps"], decode_speedup=decode_speedup,
                       whole_speedup=(prefill + decode) / (prefill + decode / decode_speedup),
                       mean_accepted_by_category={c: v["tokens"] / v["steps"] for c, v in t["by_category"].items()})
        if m.startswith("suffix"):
            rows[m]["first_token_wrong_share"] = t["first_wrong"] / t["steps"]
        print(f"{m:18s} mean accepted tokens {rows[m]['mean_accepted_tokens']:.2f}   decode speedup "
              f"{decode_speedup:.2f}x   with prefill {rows[m]['whole_speedup']:.2f}x")
    print(f"AR: prefill {prefill:.1f} s, decode {decode:.1f} s ({prefill / (prefill + decode):.0%} prefill)")
    if a.out:
        bench.write_rows(a.out, model, rows, questions=len(questions), turns=len(turns),
                         max_new_tokens=a.max_new_tokens, max_nodes=a.max_nodes, prefill_seconds=prefill,
                         decode_seconds=decode, cost_curve_batch1={n: step_cost(n) for n in (1, 2, 4, 8, 16)})


if __name__ == "__main__":
    main()
