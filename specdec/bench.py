"""`specdec bench`: Spec-Bench-style end-to-end comparison of drafters against AR decoding.

Every method decodes the same questions with the same settings in one process, interleaved
per question in an order that turns from question to question (so drift in machine speed, and
whatever running first or last does, hits all methods alike). Following Spec-Bench:
    speedup  = mean over questions of the method's tokens/s  /  the same mean for "none"
    MAT      = tokens added per verification step, averaged over all steps (model's own token included)
and beside them the decode-only speedup: the same ratio on tokens/s after each turn's prefill
(on a CPU a long prompt's prefill is a large share of a short answer's time, for every method).
A multi-turn question continues the conversation with the method's own earlier answer.
"""

import datetime
import itertools
import json
import math
import platform
import random
import time
from collections import defaultdict
from importlib import resources
from pathlib import Path
from statistics import fmean as mean
from statistics import stdev

import torch

from specdec.generate import clone_drafter, generate


def default_questions() -> Path:
    return Path(resources.files("specdec") / "data" / "questions.jsonl")


def load_questions(path=None, per_category=None, limit=None, seed=0):
    path = Path(path) if path else default_questions()
    if not path.exists():
        raise FileNotFoundError(f"no question file at {path}")
    questions = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        q = json.loads(line)
        if not {"question_id", "category", "turns"} <= q.keys() or not q["turns"]:
            raise ValueError(f"{path}:{n}: expected question_id, category and non-empty turns")
        questions.append(q)
    if per_category:  # a reproducible sample of every category
        by_cat = defaultdict(list)
        for q in questions:
            by_cat[q["category"]].append(q)
        rng = random.Random(seed)
        questions = [q for cat in by_cat for q in sorted(rng.sample(by_cat[cat], min(per_category, len(by_cat[cat]))),
                                                            key=lambda q: q["question_id"])]
    return questions[:limit] if limit else questions


def conversation_ids(tokenizer, messages):
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    return list(ids["input_ids"] if isinstance(ids, dict) else ids)


class HFRunner:
    """transformers' own generate on the same weights: greedy, or with prompt lookup decoding."""

    def __init__(self, model_path, prompt_lookup: int):
        from transformers import AutoModelForCausalLM

        from specdec.loading import default_model_path

        path = Path(model_path) if model_path else default_model_path()
        kw = dict(gguf_file=path.name) if path.suffix == ".gguf" else {}
        self.model = AutoModelForCausalLM.from_pretrained(str(path.parent if kw else path), dtype=torch.float32,
                                                          **kw).eval()
        self.prompt_lookup = prompt_lookup

    def __call__(self, ids, max_new_tokens, pad_id, eos_ids):
        x = torch.tensor([ids])
        extra = dict(prompt_lookup_num_tokens=self.prompt_lookup) if self.prompt_lookup else {}
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                                      do_sample=False, pad_token_id=pad_id, eos_token_id=list(eos_ids), **extra)
        seconds = time.perf_counter() - t0
        new = out[0, len(ids):].tolist()
        for i, t in enumerate(new):
            if t in eos_ids:
                new = new[: i + 1]
                break
        return new, seconds


def run(model, questions, drafters, max_new_tokens=128, num_draft_tokens=8, temperature=0.0,
        hf_reference=False, model_path=None, drafter_options=None, progress=True):
    """Decode every question with "none" and each drafter; return the report dict."""
    from tqdm import tqdm

    methods = ["none"] + [d for d in drafters if d != "none"]
    hf = {}
    if hf_reference:
        hf = {"hf": HFRunner(model_path, 0), "hf-prompt-lookup": HFRunner(model_path, 10)}
    from drafters import make_drafter

    # One drafter instance per method for the whole run, as a server keeps them: static indexes are
    # built once, and drafters that learn across requests (SuffixDecoding) do so here too.
    instances = {m: make_drafter(m, **(drafter_options or {}).get(m, {})) for m in methods if m != "none"}
    for m in methods:  # warm-up, untimed: lazy builds, the controller's cost curve, first-call overheads
        generate(model, "Say hello.", max_new_tokens=4, drafter=instances.get(m, "none"),
                 num_draft_tokens=num_draft_tokens)
    tok = model.tokenizer
    eos_ids = set(model.config.eos_token_ids) | ({tok.eos_token_id} if tok.eos_token_id is not None else set())
    rows = []
    order = [*methods, *hf]
    for i, q in enumerate(tqdm(questions, desc="bench", disable=not progress)):
        history = {m: [] for m in order}
        # interleaved: every method runs this question before the next one, the order turning from
        # question to question so that whatever a position does to a run's speed falls on each alike
        for m in turned(order, i):
            row = dict(question_id=q["question_id"], category=q["category"], method=m, tokens=0, seconds=0.0,
                       steps=0, draft_seconds=0.0, step_seconds=0.0, prefill_seconds=None, outputs=[])
            for turn in q["turns"]:
                history[m].append({"role": "user", "content": turn})
                ids = conversation_ids(tok, history[m])
                budget = min(max_new_tokens, model.config.max_context - len(ids))
                if m in hf:
                    new, seconds = hf[m](ids, budget, tok.pad_token_id, eos_ids)
                    steps = None
                else:
                    r = generate(model, [ids], max_new_tokens=budget, drafter=instances.get(m, "none"),
                                 temperature=temperature, num_draft_tokens=num_draft_tokens, seed=q["question_id"])
                    new, seconds = r.token_ids[0], r.stats["seconds"]
                    steps = r.stats.get("verify_steps", len(new))
                    row["prefill_seconds"] = (row["prefill_seconds"] or 0.0) + r.stats["prefill_seconds"]
                    split = r.stats.get("time_split", {})
                    row["draft_seconds"] += split.get("draft", 0.0)
                    row["step_seconds"] += sum(split.values())
                row["tokens"] += len(new)
                row["seconds"] += seconds
                row["steps"] = None if steps is None else row["steps"] + steps
                row["outputs"].append(new)
                history[m].append({"role": "assistant", "content": tok.decode(new, skip_special_tokens=True)})
            rows.append(row)
    return summarize(rows, [*methods, *hf], temperature, run_settings(
        model, max_new_tokens=max_new_tokens, num_draft_tokens=num_draft_tokens, temperature=temperature,
        questions=len(questions), threads=torch.get_num_threads()))


def run_settings(model, **fields) -> dict:
    """A saved report's settings: the model, its device and dtype, then `fields`, then today's date."""
    return dict(model=model.name, device=device_name(model.device), dtype=str(model.dtype).replace("torch.", ""),
                **fields, date=datetime.date.today().isoformat())


def write_rows(path, model, rows, **fields):
    """A measurement's JSON report at `path`: {"settings": `run_settings(model, **fields)`, "rows": rows}."""
    Path(path).write_text(json.dumps(dict(settings=run_settings(model, **fields), rows=rows), indent=1))


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {name}, {torch.get_num_threads()} threads"


def _decode_rate(row) -> float:
    """Tokens per second after the prefills, not counting the token each turn's prefill gave."""
    turns = len(row["outputs"])
    return (row["tokens"] - turns) / max(row["seconds"] - row["prefill_seconds"], 1e-9)


def summarize(rows, methods, temperature, settings):
    by = defaultdict(list)  # (method, category) -> rows; category "overall" holds all
    for r in rows:
        by[(r["method"], r["category"])].append(r)
        by[(r["method"], "overall")].append(r)
    categories = sorted({r["category"] for r in rows}) + ["overall"]
    table = {}
    for m in methods:
        for c in categories:
            rs, base = by[(m, c)], by[("none", c)]
            tps = mean(r["tokens"] / r["seconds"] for r in rs)
            steps = [r["steps"] for r in rs]
            entry = dict(tokens_per_s=tps, speedup=tps / mean(r["tokens"] / r["seconds"] for r in base))
            # Decode only: after each turn's prefill (whose token is the turn's first), which no drafter
            # changes; on a CPU a long prompt's prefill is a large share of a short answer's time.
            if all(r.get("prefill_seconds") is not None for r in [*rs, *base]):
                entry["decode_speedup"] = mean(map(_decode_rate, rs)) / mean(map(_decode_rate, base))
            entry["mean_accepted_tokens"] = (sum(r["tokens"] for r in rs) / sum(steps)) if None not in steps else None
            step_seconds = sum(r.get("step_seconds", 0.0) for r in rs)
            entry["draft_fraction"] = sum(r.get("draft_seconds", 0.0) for r in rs) / step_seconds if step_seconds else None
            table.setdefault(m, {})[c] = entry
    report = dict(settings=settings, table=table, rows=rows)
    if temperature == 0:
        none_out = {r["question_id"]: r["outputs"] for r in rows if r["method"] == "none"}
        report["greedy_mismatches"] = {
            m: [r["question_id"] for r in rows if r["method"] == m and r["outputs"] != none_out[r["question_id"]]]
            for m in methods if m != "none"}
    return report


def format_report(report) -> str:
    s, table = report["settings"], report["table"]
    methods = list(table)
    cats = list(next(iter(table.values())))
    lines = [f"model {s['model']} on {s['device']} ({s['dtype']}), {s['questions']} questions, "
             f"max_new_tokens={s['max_new_tokens']}, draft tokens={s['num_draft_tokens']}, T={s['temperature']}"]
    head = f"{'category':<16}" + "".join(f"{m:>28}" for m in methods)
    lines += [head, f"{'':<16}" + "".join(f"{'tok/s  speedup   MAT':>28}" for _ in methods)]
    for c in cats:
        cells = []
        for m in methods:
            e = table[m][c]
            mat = "-" if e["mean_accepted_tokens"] is None else f"{e['mean_accepted_tokens']:.2f}"
            cells.append(f"{e['tokens_per_s']:>12.1f} {e['speedup']:>7.2f}x {mat:>6}")
        lines.append(f"{c:<16}" + "".join(f"{x:>28}" for x in cells))
    decode = [f"{m} {table[m]['overall']['decode_speedup']:.2f}x" for m in methods
              if m != "none" and "decode_speedup" in table[m]["overall"]]
    if decode:
        lines.append("decode-only speedup (overall, prefill excluded): " + ", ".join(decode))
    shares = [f"{m} {100 * table[m]['overall']['draft_fraction']:.1f}%" for m in methods
              if table[m]["overall"].get("draft_fraction") is not None]
    if shares:
        lines.append("drafting share of step time (overall): " + ", ".join(shares))
    for m, bad in report.get("greedy_mismatches", {}).items():
        verdict = "identical to 'none' on every question" if not bad else f"DIFFERS from 'none' on questions {bad}"
        lines.append(f"greedy check: {m}: {verdict}")
    return "\n".join(lines)


def build_corpus(model, questions, max_new_tokens=256, batch_size=16, progress=True):
    """The model's own greedy responses to every turn-1 prompt, as a Corpus."""
    from tqdm import tqdm

    from drafters.corpus import Corpus

    prompts = [conversation_ids(model.tokenizer, [{"role": "user", "content": q["turns"][0]}]) for q in questions]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths batch with less padding
    responses = [None] * len(prompts)
    for i in tqdm(range(0, len(order), batch_size), desc="corpus", disable=not progress):
        chunk = order[i : i + batch_size]
        budget = min(max_new_tokens, model.config.max_context - max(len(prompts[j]) for j in chunk))
        for j, ids in zip(chunk, generate(model, [prompts[j] for j in chunk], max_new_tokens=budget).token_ids):
            responses[j] = ids
    return Corpus(responses, model.config.vocab_size, sources=[q["question_id"] for q in questions])


def check_corpus(path, questions):
    """Refuse a corpus built from any of the measured `questions`: the retrieval drafters would
    find the very answer they are timed on. A corpus that does not record its prompts (one made
    elsewhere) cannot be checked: a warning says so. Returns the corpus's prompt ids (None: unknown)."""
    import sys

    from drafters.corpus import Corpus

    sources = Corpus.sources_of(path)
    if sources is None:
        print(f"specdec: warning: {path} does not record the prompts it was built from; make sure none of the "
              f"measured questions is among them", file=sys.stderr)
        return None
    seen = sorted({str(q["question_id"]) for q in questions} & set(sources), key=lambda x: (len(x), x))
    if seen:
        raise ValueError(f"the corpus {path} was built from {len(seen)} of the measured questions "
                         f"(ids {', '.join(seen[:8])}{', ...' if len(seen) > 8 else ''}): build it with "
                         f"`specdec corpus --exclude-sample N` for the sample measured, or measure other questions")
    return sources


def warmup_questions(questions, measured, n, corpus_sources=None):
    """Up to n questions to warm a sweep's drafters and controllers on: never a measured one, and
    first those whose answers are not in the corpus (`corpus_sources`: its prompt ids, None when
    unknown or no corpus). A controller warmed on prompts the corpus answers word for word learns
    long matches that the measured prompts do not have; a warning says when some had to be used."""
    import sys

    pool = round_robin(exclude(questions, measured))
    if corpus_sources is not None:
        known = {str(x) for x in corpus_sources}
        outside = [q for q in pool if str(q["question_id"]) not in known]
        if len(outside) < n:
            print(f"specdec: warning: only {len(outside)} warm-up questions lie outside the corpus; "
                  f"{min(n, len(pool)) - len(outside)} more come from its prompts", file=sys.stderr)
        pool = outside + [q for q in pool if str(q["question_id"]) in known]
    return pool[:n]


def exclude(questions, measured):
    ids = {q["question_id"] for q in measured}
    return [q for q in questions if q["question_id"] not in ids]


def round_robin(questions):
    """Questions reordered to take one of every category in turn: any prefix mixes categories."""
    by_cat = defaultdict(list)
    for q in questions:
        by_cat[q["category"]].append(q)
    lists = list(by_cat.values())
    return [lst[i] for i in range(max(map(len, lists), default=0)) for lst in lists if i < len(lst)]


def sweep(model, questions, drafters, batch_sizes, draft_lengths=(2, 4, 8), max_new_tokens=64,
          drafter_options=None, warmup=(), requests=8, repeats=1, on_batch=None, progress=True):
    """Decode throughput by batch size.

    At batch size B the first max(`requests`, B) turn-1 prompts (categories taken in turn) are
    decoded B at a time, so a batch holds B different requests as a server's would (prompts repeat
    only when there are fewer than B), with "none" and each drafter at each fixed draft length and
    "auto", interleaved batch by batch (drift in machine speed hits every configuration alike), the
    order turning from batch to batch (so does whatever coming first or last does to a decode).
    Timing is decode only (after the prefill, which no drafter changes and which on CPU would
    otherwise dominate large batches of long prompts). Reports tokens/s of the batch, per-request
    seconds per output token, MAT, the drafting share of step time and the speedup over "none"
    at the same batch size.

    Every (drafter, length, batch size) gets a fresh drafter instance, so nothing learned from one
    configuration's outputs helps another. With `warmup` questions (disjoint from the measured
    ones), each configuration first decodes one untimed batch of B of them: its drafter and its
    controller start the measured prompts in the state a server would have them in, not cold.

    With `repeats` > 1 the measured batches are decoded that many times (rounds of every
    configuration in turn, each round from the warmed-up drafter and controller): rows total all
    rounds, and `speedup_range` gives the lowest and highest speedup over AR of a single round,
    the spread that machine noise alone puts on a ratio (what a difference of a few percent must
    clear). Beside it, `paired_speedup`: the geometric mean over every measured batch of every
    round of the configuration's tokens/s over AR's on that same batch (decoded in the same turn), with
    `paired_ci95`, a 95% Student-t interval on it (null with one batch); a ratio whose interval
    holds 1 is not told apart from AR. `on_batch(report)` is called with the report so far after
    each batch size (a long sweep can be written as it goes).
    """
    from tqdm import tqdm

    from drafters import make_drafter

    def turn_one(qs):
        return [conversation_ids(model.tokenizer, [{"role": "user", "content": q["turns"][0]}])
                for q in round_robin(qs)]

    def cyclic(ps, B, j):
        return [ps[(j * B + i) % len(ps)] for i in range(B)]

    if {q["question_id"] for q in warmup} & {q["question_id"] for q in questions}:
        raise ValueError("warm-up questions must not include measured ones")
    if requests < 1:
        raise ValueError(f"requests must be >= 1, got {requests}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    prompts, warm = turn_one(questions), turn_one(warmup)
    configs = [("none", 0)] + [(d, k) for d in drafters if d != "none" for k in [*draft_lengths, "auto"]]
    options = drafter_options or {}
    fresh = {}

    def drafter_for(d):
        if d == "none":
            return "none"
        if d not in fresh:  # built once (a static index from a corpus takes a while), then copied
            fresh[d] = make_drafter(d, **options.get(d, {}))
        return clone_drafter(fresh[d])

    def decode(batch, d, k, drafter):
        return generate(model, batch, max_new_tokens=max_new_tokens, drafter=drafter,
                        num_draft_tokens=k if d != "none" else 0)

    generate(model, "Say hello.", max_new_tokens=4)  # warm-up, untimed (and the controller's cost curve)
    generate(model, "Say hello.", max_new_tokens=4, drafter="ngram", num_draft_tokens="auto")
    settings = run_settings(model, max_new_tokens=max_new_tokens, questions=len(questions), requests=requests,
                            repeats=repeats, warmup_questions=len(warmup),
                            timing="decode only (after prefill), configurations interleaved per batch, their order turning")
    results = []
    for B in tqdm(batch_sizes, desc="batch sizes", disable=not progress):
        n = max(min(requests, len(prompts)), B)
        batches = [cyclic(prompts, B, j) for j in range(-(-n // B))]
        instances = {c: drafter_for(c[0]) for c in configs}
        if warm:
            for (d, k), drafter in instances.items():
                decode(cyclic(warm, B, 0), d, k, drafter)
        acc = {c: defaultdict(float) for c in configs}
        per_round = {c: [] for c in configs}  # tokens/s of each round
        log_ratios = {c: [] for c in configs}  # per batch: log(tokens/s over AR's on the same batch)
        batches_done = itertools.count()  # which configuration decodes the next batch first
        for _ in range(repeats):
            # every round starts from the warmed-up state: a drafter that learns from finished requests
            # (SuffixDecoding's global tree) must not have seen the answers it is measured on
            this_round = {c: [0, 0.0] for c in configs}
            drafters_now = {c: clone_drafter(drafter) for c, drafter in instances.items()}
            for batch in batches:
                rate = {}
                # the order turns from batch to batch: whatever a position in it does to a decode's
                # speed falls on every configuration alike
                for (d, k), drafter in turned(list(drafters_now.items()), next(batches_done)):
                    r = decode(batch, d, k, drafter)
                    st = r.stats
                    a, decode_s = acc[(d, k)], st["seconds"] - st["prefill_seconds"]
                    decoded_tokens = st["tokens"] - len(batch)  # after each request's first token
                    rate[(d, k)] = decoded_tokens / decode_s
                    a["tokens"] += decoded_tokens
                    a["seconds"] += decode_s
                    a["per_token"] += decode_s / max(1, max(len(t) for t in r.token_ids) - 1) * len(batch)
                    a["request_steps"] += sum(st.get("accepted_length_histogram", {}).values())
                    split = st.get("time_split", {})
                    a["draft"] += split.get("draft", 0.0)
                    a["total"] += sum(split.values())
                    this_round[(d, k)][0] += decoded_tokens
                    this_round[(d, k)][1] += decode_s
                for c in configs:
                    log_ratios[c].append(math.log(rate[c] / rate[("none", 0)]))
            for c, (tokens, secs) in this_round.items():
                per_round[c].append(tokens / secs)
        rows = []
        for (d, k), a in acc.items():
            decoded = len(batches) * B * repeats
            ratios = [x / y for x, y in zip(per_round[(d, k)], per_round[("none", 0)])]
            rows.append(dict(batch=B, drafter=d, num_draft_tokens=k, requests=len(batches) * B, rounds=repeats,
                             decode_tokens=int(a["tokens"]), decode_seconds=a["seconds"],
                             tokens_per_s=a["tokens"] / a["seconds"], seconds_per_token=a["per_token"] / decoded,
                             mean_accepted_tokens=a["tokens"] / a["request_steps"] if a["request_steps"] else 1.0,
                             draft_fraction=a["draft"] / a["total"] if a["total"] else 0.0,
                             speedup_range=[min(ratios), max(ratios)],
                             **paired_ratio(log_ratios[(d, k)])))
        base = next(r["tokens_per_s"] for r in rows if r["drafter"] == "none")
        for r in rows:
            r["speedup"] = r["tokens_per_s"] / base
        results.extend(rows)
        if on_batch is not None:
            on_batch(dict(settings=settings, sweep=list(results)))
    return dict(settings=settings, sweep=results)


def turned(items: list, k: int) -> list:
    """`items` turned by k places: turn k starts with item k (mod len), so over len(items) turns
    each item comes first, second, ... once."""
    k %= len(items)
    return items[k:] + items[:k]


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with df degrees of freedom (exact to 3 decimals below 10,
    a Cornish-Fisher expansion from 10 on, within 0.003)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    table = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262)
    if df <= len(table):
        return table[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def paired_ratio(log_ratios) -> dict:
    """Geometric mean of paired ratios, given their logs, with a 95% t interval (None for one pair)."""
    n = len(log_ratios)
    m = mean(log_ratios)
    if n < 2:
        return dict(paired_speedup=math.exp(m), paired_ci95=None, pairs=n)
    half = t_quantile_975(n - 1) * stdev(log_ratios) / math.sqrt(n)
    return dict(paired_speedup=math.exp(m), paired_ci95=[math.exp(m - half), math.exp(m + half)], pairs=n)


def format_sweep(report) -> str:
    lines = [f"{'batch':>5} {'drafter':>10} {'K':>5} {'tok/s':>9} {'s/token':>9} {'speedup':>8} {'rounds':>11} "
             f"{'paired (95% CI)':>21} {'MAT':>6} {'draft%':>7}"]
    for r in report["sweep"]:
        lo, hi = r.get("speedup_range", (r["speedup"], r["speedup"]))
        paired = ""
        if "paired_speedup" in r:  # reports written before paired ratios existed have none
            ci = r["paired_ci95"]
            paired = f"{r['paired_speedup']:.3f}" + (f" ({ci[0]:.3f}-{ci[1]:.3f})" if ci else "")
        lines.append(f"{r['batch']:>5} {r['drafter']:>10} {str(r['num_draft_tokens']):>5} {r['tokens_per_s']:>9.1f} "
                     f"{r['seconds_per_token']:>9.3f} {r['speedup']:>7.2f}x {lo:>5.2f}-{hi:<5.2f} {paired:>21} "
                     f"{r['mean_accepted_tokens']:>6.2f} {100 * r['draft_fraction']:>6.1f}%")
    best = {}
    for r in report["sweep"]:
        if r["drafter"] != "none" and r["num_draft_tokens"] != "auto":
            key = (r["batch"], r["drafter"])
            best[key] = max(best.get(key, 0.0), r["tokens_per_s"])
    for r in report["sweep"]:
        if r["num_draft_tokens"] == "auto" and (r["batch"], r["drafter"]) in best:
            b = best[(r["batch"], r["drafter"])]
            lines.append(f"auto vs best fixed length: batch {r['batch']} {r['drafter']}: "
                         f"{r['tokens_per_s'] / b:.2f}x of best, {r['speedup']:.2f}x of AR")
    return "\n".join(lines)


def plot_sweep(report, path):
    """Speedup over AR by batch size, one line per (drafter, draft length)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    series = {}
    for r in report["sweep"]:
        if r["drafter"] != "none":
            series.setdefault(f"{r['drafter']} K={r['num_draft_tokens']}", []).append((r["batch"], r["speedup"]))
    for name, pts in series.items():
        xs, ys = zip(*sorted(pts))
        ax.plot(xs, ys, marker="o", label=name, linewidth=2.5 if "auto" in name else 1)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    s = report["settings"]
    _finish_plot(fig, ax, path, f"{s['model']} on {s['device']}", legend_columns=2)


def plot_report(report, path):
    """Speedup over AR per category (bars), one group per category, one bar per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = report["table"]
    methods = [m for m in table if m != "none"]
    cats = list(table["none"])
    fig, ax = plt.subplots(figsize=(max(8, len(cats) * 0.9), 4.5))
    width = 0.8 / max(len(methods), 1)
    for i, m in enumerate(methods):
        ax.bar([c + i * width for c in range(len(cats))], [table[m][c]["speedup"] for c in cats], width, label=m)
    ax.set_xticks([c + 0.4 - width / 2 for c in range(len(cats))], cats, rotation=35, ha="right", fontsize=8)
    s = report["settings"]
    _finish_plot(fig, ax, path, f"{s['model']} on {s['device']}, {s['questions']} questions, greedy",
                 legend_columns=3)


def _finish_plot(fig, ax, path, title, legend_columns):
    """The parts every speedup plot shares: the AR line at 1, labels, legend; saved and closed."""
    import matplotlib.pyplot as plt

    ax.axhline(1.0, color="black", linestyle="--", linewidth=1)
    ax.set_ylabel("speedup over autoregressive")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=legend_columns)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
