"""Command line: `specdec generate "prompt"` and `specdec bench`."""

import argparse
import json
import sys
from pathlib import Path

import torch


def _draft_size(text):
    return text if text == "auto" else int(text)


def _model_args(p):
    p.add_argument("--model", default=None, help="HF checkpoint directory or .gguf file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--num-draft-tokens", type=_draft_size, default="auto",
                   help="draft tokens per step, or 'auto' (the hardware-aware controller; default)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)


def _load(args):
    from specdec import load_model

    return load_model(args.model, device=args.device, dtype=getattr(torch, args.dtype) if args.dtype else None)


def cmd_generate(args):
    from specdec import generate

    model = _load(args)
    r = generate(model, args.prompt, max_new_tokens=args.max_new_tokens, drafter=args.drafter,
                 num_draft_tokens=args.num_draft_tokens, temperature=args.temperature, top_k=args.top_k,
                 top_p=args.top_p, seed=args.seed, chat=not args.no_chat,
                 **_drafter_options(args, [args.drafter]).get(args.drafter, {}))
    print(r.texts[0])
    s = r.stats
    line = f"[{s['drafter']}] {s['tokens']} tokens in {s['seconds']:.2f} s = {s['tokens_per_s']:.1f} tokens/s"
    if "mean_accepted_tokens" in s:
        line += f", mean accepted tokens {s['mean_accepted_tokens']:.2f} over {s['verify_steps']} steps"
    print(line, file=sys.stderr)


CORPUS_DRAFTERS = ("sam", "suffix", "recycle", "hybrid")


def _option_value(text: str):
    """A drafter option's value from the command line: an int, a float, true/false/none, or a string."""
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def _drafter_options(args, names):
    """{drafter name: {option: value}}: --corpus for the drafters that draw on one, then every
    --drafter-option [DRAFTER.]KEY=VALUE (without DRAFTER, for every drafter named)."""
    options = {n: {"corpus": args.corpus} for n in names if n in CORPUS_DRAFTERS and getattr(args, "corpus", None)}
    for item in getattr(args, "drafter_option", None) or []:
        key, sep, value = item.partition("=")
        target, _, key = key.rpartition(".")
        if not sep or not key.isidentifier():
            raise ValueError(f"--drafter-option takes [DRAFTER.]KEY=VALUE, got {item!r}")
        if target and target not in names:
            raise ValueError(f"--drafter-option {item!r}: drafter {target!r} is not among those run: {list(names)}")
        targets = [target] if target else [n for n in names if n != "none"]
        if not targets or targets == ["none"]:
            raise ValueError(f"--drafter-option {item!r}: 'none' (plain decoding) takes no drafter options")
        for n in targets:
            options.setdefault(n, {})[key] = _option_value(value)
    return options


def cmd_corpus(args):
    from specdec import bench

    questions = bench.load_questions(args.questions, per_category=args.per_category, seed=args.seed)
    if args.exclude_sample:  # never learn from what the benchmark will measure
        measured = bench.load_questions(args.questions, per_category=args.exclude_sample)
        questions = bench.exclude(questions, measured)
    if args.limit:
        questions = questions[: args.limit]
    if not questions:
        raise ValueError("no questions left to build a corpus from")
    model = _load(args)
    corpus = bench.build_corpus(model, questions, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    out = Path(args.out) if args.out else default_corpus_path(model)
    corpus.save(out)
    print(f"corpus of {len(corpus)} responses, {corpus.tokens.size} tokens -> {out}")


def default_corpus_path(model):
    from specdec.loading import cache_dir

    return cache_dir() / "corpus" / f"{model.name}.npz"


def _write(report, out, plot, quiet=False):
    """The report as JSON at `out` and its plot beside it (.png), when `out` is given."""
    if not out:
        return
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    plot(report, out.with_suffix(".png"))
    if not quiet:
        print(f"wrote {out} and {out.with_suffix('.png')}")


def cmd_bench(args):
    from specdec import bench

    questions = bench.load_questions(args.questions, per_category=args.per_category, limit=args.limit)
    drafters = [d for d in args.drafters.split(",") if d]
    uses_corpus = bool(args.corpus and set(drafters) & set(CORPUS_DRAFTERS))
    sources = bench.check_corpus(args.corpus, questions) if uses_corpus else None
    model = _load(args)
    if args.batch_sizes:
        sizes = [int(x) for x in args.batch_sizes.split(",")]
        if any(b < 1 for b in sizes):
            raise ValueError(f"batch sizes must be >= 1, got {sizes}")
        lengths = [int(x) for x in args.draft_lengths.split(",") if x]
        warm = bench.warmup_questions(bench.load_questions(args.questions), questions, args.warmup, sources)
        report = bench.sweep(model, questions, drafters, sizes, lengths, max_new_tokens=args.max_new_tokens,
                             drafter_options=_drafter_options(args, drafters), warmup=warm,
                             requests=args.requests, repeats=args.repeats,
                             on_batch=lambda partial: _write(partial, args.out, bench.plot_sweep, quiet=True))
        print(bench.format_sweep(report))
        _write(report, args.out, bench.plot_sweep)
        return
    report = bench.run(model, questions, drafters, max_new_tokens=args.max_new_tokens,
                       num_draft_tokens=args.num_draft_tokens, temperature=args.temperature,
                       hf_reference=args.hf_reference, model_path=args.model,
                       drafter_options=_drafter_options(args, drafters))
    print(bench.format_report(report))
    _write(report, args.out, bench.plot_report)
    if any(report.get("greedy_mismatches", {}).values()):
        sys.exit(1)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="specdec", description="Lossless speculative decoding.")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="complete one prompt and print one stats line")
    g.add_argument("prompt")
    _model_args(g)
    g.add_argument("--drafter", default="ngram", help="none, ngram, ...")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    g.add_argument("--corpus", default=None, help="corpus .npz for sam/suffix/recycle/hybrid (see `specdec corpus`)")
    g.add_argument("--drafter-option", action="append", metavar="KEY=VALUE",
                   help="a drafter constructor option, e.g. shape=best_first (repeatable)")
    g.set_defaults(func=cmd_generate)

    b = sub.add_parser("bench", help="Spec-Bench-style comparison against autoregressive decoding")
    b.add_argument("--questions", default=None, help="Spec-Bench-format JSONL (default: a small built-in set)")
    b.add_argument("--per-category", type=int, default=None, help="sample this many questions per category")
    b.add_argument("--limit", type=int, default=None)
    b.add_argument("--drafters", default="ngram", help="comma-separated; 'none' always runs")
    b.add_argument("--hf-reference", action="store_true",
                   help="add transformers' generate, greedy and with prompt lookup, as reference rows")
    b.add_argument("--out", default=None, help="write the JSON report here")
    b.add_argument("--batch-sizes", default=None, metavar="1,4,16,64",
                   help="sweep batch sizes instead: throughput per drafter at fixed draft lengths and 'auto'")
    b.add_argument("--draft-lengths", default="2,4,8", help="fixed draft lengths for --batch-sizes ('' for 'auto' alone)")
    b.add_argument("--requests", type=int, default=8, metavar="N",
                   help="--batch-sizes: at batch B, decode max(N, B) different questions (B at a time)")
    b.add_argument("--repeats", type=int, default=1, metavar="R",
                   help="--batch-sizes: decode the measured batches R times (rounds); rows give each "
                        "round's lowest and highest speedup, the noise on a ratio")
    b.add_argument("--warmup", type=int, default=64, metavar="N",
                   help="--batch-sizes: up to N questions not measured warm each configuration up, untimed "
                        "(0: every configuration starts cold)")
    b.add_argument("--corpus", default=None, help="corpus .npz for sam/suffix/recycle/hybrid (see `specdec corpus`)")
    b.add_argument("--drafter-option", action="append", metavar="[DRAFTER.]KEY=VALUE",
                   help="a drafter constructor option, e.g. recycle.shape=best_first; without DRAFTER, for "
                        "every drafter run (repeatable)")
    _model_args(b)
    b.set_defaults(func=cmd_bench)

    c = sub.add_parser("corpus", help="build a drafting corpus from the model's own responses")
    c.add_argument("--questions", default=None, help="Spec-Bench-format JSONL of prompts (turn 1 is used)")
    c.add_argument("--per-category", type=int, default=None, help="sample this many questions per category")
    c.add_argument("--seed", type=int, default=1, help="sampling seed (bench samples with seed 0)")
    c.add_argument("--exclude-sample", type=int, default=None, metavar="N",
                   help="leave out the questions `bench --per-category N` measures")
    c.add_argument("--limit", type=int, default=None)
    c.add_argument("--batch-size", type=int, default=16, help="prompts decoded together")
    c.add_argument("--out", default=None, help="default: the cache's corpus/<model>.npz")
    _model_args(c)
    c.set_defaults(func=cmd_corpus, max_new_tokens=256)

    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, TypeError) as e:
        parser.exit(2, f"specdec: error: {e}\n")


if __name__ == "__main__":
    main()
