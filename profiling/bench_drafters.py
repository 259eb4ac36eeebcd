"""Drafter costs, without a model: the per-token cost of the host-side dynamic structures (SAM's
per-request suffix automaton, SuffixDecoding's per-request suffix tree) and the per-step cost of
each drafter's update + propose at batch 1 and 16, on a token stream taken from a corpus.

    python profiling/bench_drafters.py --corpus ~/.cache/specdec/corpus/<model>.npz [--out results/x.json]

Every figure is a median over repeats, in microseconds. The stream is the corpus's own documents
(so suffix matches occur as they do in decoding); each step commits 2 tokens, a typical accepted
length, and asks for a draft of 8 nodes.
"""

import argparse
import datetime
import json
import time
from pathlib import Path

import numpy as np
import torch

from drafters import make_drafter
from drafters.corpus import Corpus
from drafters.suffix_automaton import SuffixAutomaton
from drafters.suffix_tree import SuffixTree
from specdec.bench import device_name


def per_token_us(fn, tokens, reps=3):
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn(tokens)
        times.append((time.perf_counter() - t0) / len(tokens) * 1e6)
    return sorted(times)[len(times) // 2]


def sam_dynamic(tokens):
    sam = SuffixAutomaton()
    for t in tokens:
        sam.extend(t)
        sam.repeated_suffix()


def suffix_dynamic(tokens):
    tree = SuffixTree(max_depth=64)
    seq = tree.add_sequence([])
    for t in tokens:
        tree.extend(seq, t)


def drafter_step_us(name, corpus, stream, batch, steps=64, accept=2, max_nodes=8, vocab=49152):
    options = {"corpus": corpus} if name in ("sam", "suffix", "hybrid") else {}
    drafter = make_drafter(name, **options)
    prompt = 64
    T = prompt + steps * accept + 1
    history = torch.stack([torch.as_tensor(stream[b * 97 : b * 97 + T]) for b in range(batch)]).long()
    lens = torch.full((batch,), prompt, dtype=torch.int64)
    drafter.prepare(vocab, "cpu")
    drafter.start(history, lens)
    times = []
    logits = torch.randn(batch, 1 + max_nodes, vocab)  # stands in for the forward's (untimed)
    with torch.inference_mode():
        for _ in range(steps):
            t0 = time.perf_counter()
            draft = drafter.propose(history, lens, max_nodes)
            n = 1 + max_nodes
            tokens = torch.cat([history.gather(1, (lens - 1).view(-1, 1)), draft.tokens[:, : n - 1]], 1)
            if name in ("recycle", "hybrid"):  # Token Recycling learns from the forward's logits
                drafter.observe(tokens, logits[:, : tokens.shape[1]], 1 + draft.count)
            lens = lens + accept
            drafter.update(history, lens, torch.full((batch,), accept))
            times.append((time.perf_counter() - t0) * 1e6)
    drafter.finish()
    return sorted(times)[len(times) // 2]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    corpus = Corpus.load(args.corpus)
    stream = np.asarray(corpus.tokens[:20000], dtype=np.int64)
    report = dict(device=device_name(torch.device("cpu")), corpus_tokens=int(corpus.tokens.size),
                  date=datetime.date.today().isoformat(), per_token_us={}, step_us={})
    for name, fn in (("sam_dynamic_extend", sam_dynamic), ("suffix_tree_extend", suffix_dynamic)):
        report["per_token_us"][name] = per_token_us(fn, stream[:5000].tolist())
        print(f"{name:>22}: {report['per_token_us'][name]:7.1f} us per token")
    for name in ("ngram", "sam", "suffix", "recycle", "hybrid"):
        for batch in (1, 16):
            us = drafter_step_us(name, corpus, stream, batch)
            report["step_us"][f"{name}@{batch}"] = us
            print(f"{name:>10} batch {batch:>2}: update + propose {us / 1000:7.2f} ms per step")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
