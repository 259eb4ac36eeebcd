"""When should "auto" ask the drafter, and how much should it draft? An in-process A/B of the controller's
rules, against AR.

    python profiling/ab_ask_rule.py --questions ../shared/data/spec_bench/question.jsonl \
        --drafter ngram --batch 1 --variants old,new,always,fixed4 [--rounds 2] [--out results/x.json]

Variants of `SpeculationController.proposals_pay` (the verdict that asking the drafter has paid lately)
and of its calibration:
  new      the controller's own rule (since f3c89ea: the fading sums of what asking saved and cost,
           with one accepted token's worth of doubt in asking's favour)
  old      the rule before it: the bare sums
  always   asking always pays (the controller still sizes the drafts, and may draft nothing)
  shared   the controller's own rule, without each request's own calibration factor (one kappa for
           all requests, as before it had one per request)
  verified the controller's own rule with its looks at a drafter that does not pay verified, as before
           shadow looks (a drafted step each), not scored against the plain steps after them
  never    the drafter is never asked: every step a plain one through the engine (the floor under "auto")
  fixedK   no controller: K draft tokens every step
Optional suffix on old/new/always: `@m` for sums fading by m an ask (default 0.95), e.g. new@0.98.

Every variant decodes the same batches as AR, in one process, the order of configurations turning
from batch to batch; each round starts from copies of one drafter warmed on a batch of unmeasured
prompts. Reported: the paired geometric mean of AR's decode time over the variant's (greedy, so the
same tokens) with its 95% interval, and the mean accepted tokens.
"""

import argparse
import math
import types
from collections import defaultdict

import specdec
from drafters import make_drafter
from specdec import bench
from specdec.generate import clone_drafter, make_controller


def bare_sums(self, batch_size: int) -> bool:
    entry = self._ledger(batch_size)
    return entry.saved >= entry.spent


def configure(model, drafter, variant: str):
    """(drafter argument, num_draft_tokens) for one variant, its controller patched as it says."""
    if variant.startswith("fixed"):
        return drafter, int(variant[5:])
    rule, _, memory = variant.partition("@")
    controller = make_controller(model, "auto", drafter)
    controller.ledger_memory = float(memory or 0.95)
    if rule == "old":
        controller.proposals_pay = types.MethodType(bare_sums, controller)
    elif rule == "always":
        controller.proposals_pay = lambda batch_size: True
    elif rule == "shared":
        controller.request_prior = None
    elif rule == "verified":
        controller.shadow_looks = False
    elif rule == "never":
        controller.worth_drafting = lambda batch_size, remaining=None: False
    elif rule != "new":
        raise ValueError(f"unknown variant {variant!r}")
    return drafter, "auto"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model path (default: SmolLM2-135M-Instruct)")
    p.add_argument("--questions", default=None, help="Spec-Bench question.jsonl (default: the built-in prompts)")
    p.add_argument("--drafter", default="ngram")
    p.add_argument("--variants", default="old,new,always,fixed4")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)

    model = specdec.load_model(a.model) if a.model else specdec.load_model()
    # enough questions for the measured requests and a warm-up batch, categories in turn (13 in Spec-Bench)
    per_category = max(5, -(-(a.requests + a.batch) // 13))
    questions = bench.round_robin(bench.load_questions(a.questions, per_category=per_category))
    prompts = [bench.conversation_ids(model.tokenizer, [{"role": "user", "content": q["turns"][0]}])
               for q in questions]
    measured, warm = prompts[: a.requests], prompts[a.requests : a.requests + a.batch]
    if len(warm) < a.batch:
        raise SystemExit(f"{len(prompts)} prompts: not enough for {a.requests} measured requests "
                         f"and a warm-up batch of {a.batch}")
    variants = a.variants.split(",")
    base = make_drafter(a.drafter)
    specdec.generate(model, warm, a.max_new_tokens, drafter=base)  # untimed: warms the drafter and its controller
    configs = ["none"] + variants
    logs, accepted = defaultdict(list), defaultdict(list)
    turn = 0
    for _ in range(a.rounds):
        setups = {v: configure(model, clone_drafter(base), v) for v in variants}
        for i in range(0, len(measured), a.batch):
            batch, seconds = measured[i : i + a.batch], {}
            for c in bench.turned(configs, turn):
                drafter, k = ("none", 0) if c == "none" else setups[c]
                out = specdec.generate(model, batch, a.max_new_tokens, drafter=drafter, num_draft_tokens=k)
                seconds[c] = out.stats["seconds"] - out.stats["prefill_seconds"]
                accepted[c].append(out.stats.get("mean_accepted_tokens", 1.0))
            turn += 1
            for v in variants:
                logs[v].append(math.log(seconds["none"] / seconds[v]))
    rows = []
    first = variants[0]
    for v in variants:
        r = bench.paired_ratio(logs[v])
        # against the first variant, on the same batches: the A/B itself, free of AR's own noise
        f = bench.paired_ratio([x - y for x, y in zip(logs[v], logs[first])])
        rows.append(dict(variant=v, speed_vs_ar=r["paired_speedup"], ci95=r["paired_ci95"], pairs=r["pairs"],
                         speed_vs_first=f["paired_speedup"], ci95_vs_first=f["paired_ci95"],
                         mean_accepted_tokens=sum(accepted[v]) / len(accepted[v])))
        ci = " ({:.3f}-{:.3f})".format(*r["paired_ci95"]) if r["paired_ci95"] else ""
        vs = " ({:.3f}-{:.3f})".format(*f["paired_ci95"]) if v != first and f["paired_ci95"] else ""
        print(f"{v:12s} speed vs AR {r['paired_speedup']:.4f}{ci}  vs {first} {f['paired_speedup']:.4f}{vs}  "
              f"pairs {r['pairs']}  mean accepted tokens {rows[-1]['mean_accepted_tokens']:.3f}")
    if a.out:
        bench.write_rows(a.out, model, rows, drafter=a.drafter, batch=a.batch, requests=len(measured),
                         rounds=a.rounds, max_new_tokens=a.max_new_tokens,
                         timing="decode only, configurations interleaved per batch, order turning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
