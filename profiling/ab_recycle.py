"""Token Recycling's variants beside ngram on the Spec-Bench sample: 2 questions per category, both
turns, 96 new tokens a turn, interleaved per question in a turning order, whole generations timed,
every output checked equal across the variants.

    python profiling/ab_recycle.py --questions ../shared/data/spec_bench/question.jsonl \
        --corpus ~/.cache/specdec/corpus/SmolLM2-135M-Instruct.Q4_1.npz \
        --variants ngram,recycle,recycle:chain=off [--max-new-tokens 256] --out profiling/results/x.json

A variant is "ngram", "recycle" (its defaults), "recycle:chain=N" or "recycle:chain=off" (the top-1
chain from a streak of N, or never) or "recycle:nostreak" (drafts that report no streak, so no chain
either: Token Recycling before the streak) or "recycle:best_first" (trees grown per request by the
recorded probabilities, not the template). Prints and writes the per-question paired ratio of every
pair of variants (geometric mean, 95% interval) and each one's tokens/s and mean accepted tokens.
15 minutes for three variants on a 2-core CPU.
"""

import argparse
import itertools
import json
import math

import specdec
from drafters import make_drafter
from drafters.token_recycling import TokenRecyclingDrafter
from specdec import bench
from specdec.generate import generate


class NoStreak(TokenRecyclingDrafter):
    """Token Recycling as it was before the streak: its drafts report no match length."""

    def propose(self, history, lens, max_nodes):
        draft = super().propose(history, lens, max_nodes)
        draft.match_len = None
        return draft


def make_variant(name: str, corpus):
    if name == "ngram":
        return make_drafter("ngram")
    kind, _, option = name.partition(":")
    if kind != "recycle":
        raise SystemExit(f"unknown variant {name!r}")
    if option == "":
        return TokenRecyclingDrafter(corpus=corpus)
    if option == "nostreak":
        return NoStreak(corpus=corpus, chain_streak=None)
    if option == "best_first":
        return TokenRecyclingDrafter(corpus=corpus, shape="best_first")

    if option.startswith("chain="):
        value = option.removeprefix("chain=")
        return TokenRecyclingDrafter(corpus=corpus, chain_streak=None if value == "off" else int(value))
    raise SystemExit(f"unknown variant {name!r}")


def decode_question(model, drafter, question, max_new_tokens) -> dict:
    """Every turn of one question, the conversation continued with the drafter's own answers."""
    tok, history = model.tokenizer, []
    row = dict(tokens=0, seconds=0.0, steps=0, outputs=[])
    for turn in question["turns"]:
        history.append({"role": "user", "content": turn})
        r = generate(model, [bench.conversation_ids(tok, history)], max_new_tokens=max_new_tokens, drafter=drafter)
        row["tokens"] += len(r.token_ids[0])
        row["seconds"] += r.stats["seconds"]
        row["steps"] += r.stats["verify_steps"]
        row["outputs"].append(r.token_ids[0])
        history.append({"role": "assistant", "content": tok.decode(r.token_ids[0], skip_special_tokens=True)})
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--questions", default=None, help="Spec-Bench question.jsonl (default: the built-in prompts)")
    p.add_argument("--corpus", default=None, help="corpus .npz (see `specdec corpus`)")
    p.add_argument("--variants", default="ngram,recycle,recycle:chain=off")
    p.add_argument("--per-category", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)

    model = specdec.load_model()
    questions = bench.load_questions(a.questions, per_category=a.per_category)
    drafters = {name: make_variant(name, a.corpus) for name in a.variants.split(",")}
    for d in drafters.values():  # untimed: first-call overheads, the controllers' cost curve
        generate(model, "Say hello.", max_new_tokens=4, drafter=d)
    rows = []
    for i, q in enumerate(questions):
        res = {m: decode_question(model, drafters[m], q, a.max_new_tokens) for m in bench.turned(list(drafters), i)}
        outputs = [r.pop("outputs") for r in res.values()]
        if any(o != outputs[0] for o in outputs):
            raise SystemExit(f"question {q['question_id']}: outputs differ between drafters (greedy must agree)")
        rows.append(dict(question_id=q["question_id"], category=q["category"], **res))
        print(i, q["category"], {m: round(r["tokens"] / r["seconds"], 1) for m, r in res.items()}, flush=True)

    def rate(r):
        return r["tokens"] / r["seconds"]

    summary = {}
    for y, x in itertools.combinations(drafters, 2):
        summary[f"{x}_vs_{y}"] = bench.paired_ratio([math.log(rate(r[x]) / rate(r[y])) for r in rows])
    for m in drafters:
        tokens = sum(r[m]["tokens"] for r in rows)
        summary[m] = dict(tokens_per_s=tokens / sum(r[m]["seconds"] for r in rows),
                          mean_accepted_tokens=tokens / sum(r[m]["steps"] for r in rows))
    print(json.dumps(summary, indent=1))
    if a.out:
        bench.write_rows(a.out, model, rows, summary=summary, questions=len(questions),
                         max_new_tokens=a.max_new_tokens, num_draft_tokens="auto", corpus=a.corpus)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
