"""SuffixDecoding's drafter (drafters/suffix_tree.py): the suffix tree against brute-force substring
counts, speculation trees against brute-force scores and a hand-checked example, global learning
and eviction, bad corpora, and greedy losslessness end to end."""

import copy
import math
import random
import statistics
import time
from collections import Counter

import numpy as np
import pytest
import torch

import specdec
from drafters import make_drafter
from drafters.corpus import Corpus
from drafters.suffix_tree import Leaf, SuffixTree, SuffixTreeDrafter
from tiny_models import tiny_model

# --- brute force ------------------------------------------------------------------------------


def brute_counts(seqs, max_depth) -> Counter:
    """Occurrences of every substring of length 1 .. max_depth."""
    c = Counter()
    for s in seqs:
        for i in range(len(s)):
            for j in range(i + 1, min(len(s), i + max_depth) + 1):
                c[tuple(s[i:j])] += 1
    return c


def brute_match(counts, context, max_depth) -> int:
    for m in range(min(max_depth, len(context)), 0, -1):
        if counts[tuple(context[len(context) - m :])]:
            return m
    return 0


def brute_children(counts, s, vocab) -> dict:
    """token -> count of s + token."""
    return {t: counts[s + (t,)] for t in range(vocab) if counts[s + (t,)]}


def walk(tree):
    """(nodes, leaves) reachable from the root."""
    nodes, leaves, stack = 0, 0, [tree.root]
    while stack:
        node = stack.pop()
        nodes += 1
        for child in (node.children or {}).values():
            if type(child) is Leaf:
                leaves += 1
            else:
                stack.append(child)
    return nodes, leaves


def check_tree(tree, seqs, vocab, g):
    D = tree.max_depth
    counts = brute_counts(seqs, D)
    for s, n in counts.items():
        assert tree.count(s) == n, s
    for _ in range(100):  # absent strings, and strings longer than max_depth
        s = tuple(g.randrange(vocab) for _ in range(g.randint(1, D + 2)))
        assert tree.count(s) == (counts[s] if len(s) <= D else 0), s
    assert tree.root.count == sum(map(len, seqs))
    assert walk(tree) == (tree.num_nodes, tree.num_leaves)
    return counts


def random_seqs(g, vocab, n, max_len):
    return [[g.randrange(vocab) for _ in range(g.randint(0, max_len))] for _ in range(n)]


# --- the suffix tree --------------------------------------------------------------------------


@pytest.mark.parametrize("vocab", [2, 3, 5])
@pytest.mark.parametrize("max_depth", [1, 2, 3, 7])
def test_counts_match_brute_force_through_extend_and_eviction(vocab, max_depth):
    for seed in range(6):
        g = random.Random(seed)
        tree = SuffixTree(max_depth)
        live = {tree.add_sequence(s): s for s in random_seqs(g, vocab, g.randint(1, 6), 20)}
        check_tree(tree, list(live.values()), vocab, g)
        ids = list(live)
        for _ in range(30):  # interleaved appends to several sequences
            sid, t = g.choice(ids), g.randrange(vocab)
            tree.extend(sid, t)
            live[sid].append(t)
        check_tree(tree, list(live.values()), vocab, g)
        for sid in g.sample(ids, len(ids)):  # evict them all, one by one
            tree.remove_sequence(sid)
            del live[sid]
            if live:  # a survivor keeps growing
                survivor, t = next(iter(live)), g.randrange(vocab)
                tree.extend(survivor, t)
                live[survivor].append(t)
            check_tree(tree, list(live.values()), vocab, g)
        assert (tree.num_nodes, tree.num_leaves, tree.root.count, tree.root.children) == (1, 0, 0, None)


def test_deep_copy_is_independent_and_needs_no_recursion():
    """A copy of a tree over long text (its graph is deeper than Python's recursion limit) counts
    exactly what the original does, and each then grows and evicts on its own."""
    g = random.Random(7)
    tree = SuffixTree(64)
    seqs = {tree.add_sequence(x): x for x in random_seqs(g, 3, 8, 150)}  # default deepcopy: RecursionError
    twin, first_tokens = copy.deepcopy((tree, tree.sequence(0)))
    assert first_tokens is twin.sequence(0)  # a holder of the tree's own list shares the copy's
    check_tree(twin, list(seqs.values()), 3, g)
    first = next(iter(seqs))
    twin.remove_sequence(first)
    twin.extend(first + 1, 2)
    check_tree(tree, list(seqs.values()), 3, g)  # the original is untouched
    rest = {k: list(v) for k, v in seqs.items() if k != first}
    rest[first + 1].append(2)
    check_tree(twin, list(rest.values()), 3, g)


@pytest.mark.parametrize("vocab", [2, 4])
@pytest.mark.parametrize("max_depth", [1, 3, 6])
def test_match_is_the_longest_suffix_that_occurs(vocab, max_depth):
    for seed in range(5):
        g = random.Random(100 + seed)
        seqs = random_seqs(g, vocab, 4, 25)
        tree = SuffixTree(max_depth)
        for s in seqs:
            tree.add_sequence(s)
        counts = brute_counts(seqs, max_depth)
        for _ in range(60):
            context = [g.randrange(vocab + 1) for _ in range(g.randint(0, 3 * max_depth))]  # vocab: unseen
            place, m = tree.match(context)
            assert m == brute_match(counts, context, max_depth), context
            suffix = tuple(context[len(context) - m :]) if m else ()
            assert tree.count_at(place) == (counts[suffix] if m else tree.root.count)


def test_suffix_nodes_are_the_repeated_suffixes():
    g = random.Random(7)
    tree = SuffixTree(5)
    seqs = {tree.add_sequence(s): s for s in random_seqs(g, 3, 3, 12)}
    for _ in range(40):
        sid, t = g.choice(list(seqs)), g.randrange(3)
        tree.extend(sid, t)
        seqs[sid].append(t)
        counts = brute_counts(list(seqs.values()), 5)
        for sid, s in seqs.items():
            nodes = tree.suffix_nodes(sid)
            assert nodes[0] is tree.root
            for j, node in enumerate(nodes[1:], 1):
                assert node.count == counts[tuple(s[-j:])]
            j = len(nodes)  # the next longer suffix, if any, occurs once: it lies along a leaf
            assert j > min(len(s), 4) or counts[tuple(s[-j:])] == 1


def test_unique_text_is_compressed():
    """Unique tails are leaves: random text over a big vocabulary makes ~1 leaf per token, not ~64 nodes."""
    g = random.Random(0)
    tree = SuffixTree(64)
    for _ in range(20):
        tree.add_sequence([g.randrange(30000) for _ in range(200)])
    assert tree.num_leaves <= 4000 and tree.num_nodes < 1000


# --- speculation trees ------------------------------------------------------------------------


def check_speculation(tree, counts, vocab, match, tokens, parents, scores, max_tokens, min_prob):
    """Valid tree, brute-force scores, and best first: nothing left out beats what was taken."""
    D = tree.max_depth
    assert len(tokens) == len(parents) == len(scores) <= max_tokens
    paths = []
    for k, (t, q) in enumerate(zip(tokens, parents)):
        assert -1 <= q < k
        path = (paths[q] if q >= 0 else match) + (t,)
        prefix = path[:-1]
        followed = sum(brute_children(counts, prefix, vocab).values()) if len(prefix) < D else 0
        want = (scores[q] if q >= 0 else 1.0) * counts[path] / followed
        assert scores[k] == pytest.approx(want) and scores[k] >= min_prob
        paths.append(path)
    assert all(a >= b for a, b in zip(scores, scores[1:]))  # so siblings come best first
    assert len(set(paths)) == len(paths)
    taken = set(paths)
    for parent, score in [(match, 1.0), *zip(paths, scores)]:
        if len(parent) >= D:
            continue
        children = brute_children(counts, parent, vocab)
        for t, n in children.items():
            left = score * n / sum(children.values())
            if parent + (t,) not in taken:
                assert left < min_prob or (len(tokens) == max_tokens and left <= scores[-1] + 1e-12)


@pytest.mark.parametrize("min_prob", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("max_tokens", [1, 4, 16])
def test_speculation_is_best_first_with_brute_force_scores(min_prob, max_tokens):
    for seed in range(8):
        g = random.Random(200 + seed)
        vocab, D = g.choice([2, 3]), g.choice([3, 5, 8])
        seqs = random_seqs(g, vocab, 4, 20)
        tree = SuffixTree(D)
        for s in seqs:
            tree.add_sequence(s)
        counts = brute_counts(seqs, D)
        for _ in range(10):
            context = [g.randrange(vocab) for _ in range(g.randint(1, 10))]
            place, m = tree.match(context)
            tokens, parents, scores = tree.speculate(place, m, max_tokens, min_prob)
            match = tuple(context[len(context) - m :]) if m else ()
            check_speculation(tree, counts, vocab, match, tokens, parents, scores, max_tokens, min_prob)


A, B_, C, D_, E, F, X, Q = 1, 2, 3, 4, 5, 6, 7, 8
# After "a b": c 4 times (then d 3 times, e once), f once; every document ends there.
GLOBAL_DOCS = [[A, B_, C, D_]] * 3 + [[A, B_, C, E], [A, B_, F]]


def draft_for(drafter, seq, max_nodes=8):
    drafter.prepare(16, "cpu")
    draft = drafter.propose(torch.tensor([seq]), torch.tensor([len(seq)]), max_nodes)
    n = draft.count[0].item()
    return draft.tokens[0, :n].tolist(), draft.parents[0, :n].tolist(), draft.match_len[0].item()


HAND = [  # (drafter options, max_nodes, expected tokens, parents)
    # c 4/5 = 0.8, d 0.8 * 3/4 = 0.6, then f 0.2 and e 0.8 * 1/4 = 0.2 (tie: f was a candidate first)
    (dict(alpha=4.0), 8, [C, D_, F, E], [-1, 0, -1, 0]),
    (dict(alpha=1.0, offset=1.0), 8, [C, D_, F], [-1, 0, -1]),  # floor(1 * 2 + 1) = 3 nodes
    (dict(alpha=4.0, min_token_prob=0.25), 8, [C, D_], [-1, 0]),  # f and e score 0.2
    (dict(alpha=4.0, max_spec=1), 8, [C], [-1]),
    (dict(alpha=4.0), 2, [C, D_], [-1, 0]),  # the engine's budget
    (dict(alpha=0.5), 8, [C], [-1]),  # floor(0.5 * 2) = 1
]


@pytest.mark.parametrize("options,max_nodes,tokens,parents", HAND)
def test_hand_checked_global_speculation(options, max_nodes, tokens, parents):
    drafter = SuffixTreeDrafter(corpus=Corpus(GLOBAL_DOCS, 16), **options)
    assert draft_for(drafter, [X, A, B_], max_nodes) == (tokens, parents, 2)  # "x a b" matches "a b"
    place, m = drafter.global_tree.match([X, A, B_])
    _, _, scores = drafter.global_tree.speculate(place, m, 8, 0.1)
    assert scores == pytest.approx([0.8, 0.6, 0.2, 0.2])


def test_live_occurrence_does_not_dilute_the_request_tree():
    # "p q" occurred once before, followed by "r s": that continuation has probability 1 (not 1/2,
    # as it would with count(parent) counting the live "p q" that has no next token yet).
    p, q, r, s = 9, 10, 11, 12
    drafter = SuffixTreeDrafter(alpha=2.0)
    drafter.prepare(16, "cpu")
    seq = [p, q, r, s, p, q]
    drafter.propose(torch.tensor([seq]), torch.tensor([6]), 8)
    score, m, tokens, parents = drafter.draft_one(drafter._requests[0], 8)
    assert (m, tokens, parents) == (2, [r, s, p, q], [-1, 0, 1, 2]) and score == 4.0  # 2 * m nodes


def test_the_better_tree_wins():
    # Global: "a b" -> "c d e f" every time (4 nodes, score 4). Per-request: "a b" -> "q a b" (score 3).
    glob = SuffixTreeDrafter(corpus=Corpus([[A, B_, C, D_, E, F]] * 5, 16), alpha=2.0)
    assert draft_for(glob, [A, B_, Q, A, B_])[0] == [C, D_, E, F]
    local = SuffixTreeDrafter(corpus=Corpus([[A, B_, C, D_, E, F]] * 5, 16), alpha=1.5)  # 3 nodes each: a tie
    assert draft_for(local, [A, B_, Q, A, B_])[0] == [Q, A, B_]  # ties go to the request's own text
    assert draft_for(SuffixTreeDrafter(corpus=Corpus(GLOBAL_DOCS, 16), alpha=4.0), [A, B_, X, A, B_])[0] == [X, A, B_]


def test_propose_shapes_and_the_size_rule():
    g = random.Random(5)
    docs = random_seqs(g, 4, 30, 40)
    for options in (dict(), dict(alpha=1.0, offset=0.5), dict(max_spec=3, max_depth=6), dict(min_token_prob=0.0)):
        drafter = SuffixTreeDrafter(corpus=Corpus([d for d in docs if d], 4), **options)
        drafter.prepare(4, "cpu")
        lens = torch.tensor([1, 2, 17, 40, 33, 9])
        history = torch.tensor([[g.randrange(4) for _ in range(45)] for _ in range(6)])
        for K in (0, 1, 5, 12):
            draft = drafter.propose(history, lens, K)
            assert draft.tokens.shape == draft.parents.shape and draft.tokens.shape[1] <= K
            for b in range(6):
                n, m = draft.count[b].item(), draft.match_len[b].item()
                cap = min(K, drafter.max_spec or K, math.floor(drafter.alpha * m + drafter.offset))
                assert n <= max(cap, 0)
                parents = draft.parents[b].tolist()
                assert all(-1 <= q < k for k, q in enumerate(parents[:n]))
                assert all(q == -1 for q in parents[n:]) and not draft.tokens[b, n:].any()


def test_incremental_state_equals_a_rebuild():
    """start + update (extend) give the drafts that a drafter seeing the whole history builds."""
    g = random.Random(11)
    corpus = Corpus(random_seqs(g, 3, 10, 30), 3)
    live, fresh = SuffixTreeDrafter(corpus=corpus), SuffixTreeDrafter(corpus=corpus)
    live.prepare(3, "cpu")
    fresh.prepare(3, "cpu")
    history = torch.tensor([[g.randrange(3) for _ in range(80)] for _ in range(4)])
    lens = torch.tensor([3, 10, 1, 25])
    live.start(history, lens)
    for _ in range(8):
        a = live.propose(history, lens, 6)
        fresh._requests = []  # forget: rebuild from the history
        b = fresh.propose(history, lens, 6)
        for f in ("tokens", "parents", "count", "match_len"):
            assert torch.equal(getattr(a, f), getattr(b, f)), f
        accepted = torch.tensor([g.randint(1, 4) for _ in range(4)])
        lens = lens + accepted
        live.update(history, lens, accepted)


# --- the global tree: learning and eviction ---------------------------------------------------


def test_global_tree_learns_finished_responses():
    drafter = SuffixTreeDrafter()
    drafter.prepare(50, "cpu")
    history = torch.zeros(3, 20, dtype=torch.int64)
    prompts = [[1, 2, 3], [4, 5], [6]]
    for b, p in enumerate(prompts):
        history[b, : len(p) + 1] = torch.tensor(p + [10 + b])  # prompt + first token
    lens = torch.tensor([4, 3, 2])
    drafter.start(history, lens)
    for b in range(3):  # request b commits tokens at lens[b], lens[b] + 1
        history[b, lens[b] : lens[b] + 2] = torch.tensor([30 + b, 40 + b])
    accepted = torch.tensor([2, 2, 1])
    lens = lens + accepted
    drafter.update(history, lens, accepted)
    drafter.retain(torch.tensor([2, 0]))  # request 1 finished
    assert [drafter.global_tree.sequence(i) for i in drafter.global_tree.sequence_ids()] == [[11, 31, 41]]
    drafter.finish()  # requests 2 and 0, in their current order
    got = [drafter.global_tree.sequence(i) for i in drafter.global_tree.sequence_ids()]
    assert got == [[11, 31, 41], [12, 32], [10, 30, 40]]


def test_eviction_keeps_the_newest():
    g = random.Random(3)
    docs = random_seqs(g, 3, 9, 15)
    docs = [d for d in docs if d]
    drafter = SuffixTreeDrafter(corpus=Corpus(docs[:4], 3), max_global_sequences=3, max_depth=4)
    drafter.prepare(3, "cpu")
    assert len(drafter.global_tree) == 3  # the corpus's oldest document is gone already
    for d in docs[4:]:
        drafter.add_global(d)
        assert len(drafter.global_tree) <= 3
    kept = [drafter.global_tree.sequence(i) for i in drafter.global_tree.sequence_ids()]
    assert kept == docs[-3:]
    check_tree(drafter.global_tree, kept, 3, g)
    off = SuffixTreeDrafter(corpus=Corpus(docs, 3), max_global_sequences=0)
    off.prepare(3, "cpu")
    assert len(off.global_tree) == 0


# --- bad input --------------------------------------------------------------------------------


def test_bad_corpora(tmp_path):
    with pytest.raises(ValueError, match="empty corpus"):
        SuffixTreeDrafter(corpus=Corpus([[], []], 10))
    empty = tmp_path / "empty.npz"
    np.savez(empty, tokens=np.zeros(0, np.int32), offsets=np.zeros(1, np.int64), vocab_size=10)
    with pytest.raises(ValueError, match="empty corpus"):
        SuffixTreeDrafter(corpus=empty)
    with pytest.raises(FileNotFoundError):
        SuffixTreeDrafter(corpus=tmp_path / "missing.npz")
    with pytest.raises(TypeError):
        SuffixTreeDrafter(corpus=[[1, 2, 3]])
    wide = SuffixTreeDrafter(corpus=Corpus([[1, 2, 99]], 128))
    with pytest.raises(ValueError, match="outside the model's vocabulary of 64"):
        wide.prepare(64, "cpu")
    wide.prepare(100, "cpu")  # ids below the model's vocabulary are fine, whatever the corpus's says


@pytest.mark.parametrize("kwargs", [
    dict(max_depth=1), dict(max_depth=8.0), dict(max_spec=0), dict(alpha=-1.0), dict(alpha="2"),
    dict(min_token_prob=1.5), dict(min_token_prob=-0.1), dict(max_global_sequences=-1), dict(offset=True),
])
def test_invalid_arguments(kwargs):
    with pytest.raises(ValueError):
        SuffixTreeDrafter(**kwargs)


def test_registry():
    drafter = make_drafter("suffix", max_depth=16)
    assert isinstance(drafter, SuffixTreeDrafter) and drafter.name == "suffix" and drafter.max_depth == 16


# --- end to end -------------------------------------------------------------------------------

VOCAB = 64
PROMPTS = [[5, 9, 11, 5, 9, 11, 5, 9, 11], [7] * 9, [3, 4], [12, 40, 33, 8, 19, 12, 40, 33, 8, 19, 12, 40],
           [20, 21, 22, 20]]
OTHER = [[20, 21, 22, 20, 21, 22], [30, 31] * 4, [44, 45, 46, 47], [5, 9, 11]]


@pytest.fixture(scope="module")
def model():
    return tiny_model(vocab=VOCAB, hidden=32, layers=2, heads=4, kv_heads=2, ffn=48, seed=3)


def test_greedy_is_lossless_and_learns(model, tmp_path):
    corpus = Corpus(specdec.generate(model, OTHER, max_new_tokens=24).token_ids, VOCAB)
    corpus.save(tmp_path / "corpus.npz")
    reference = specdec.generate(model, PROMPTS, max_new_tokens=24).token_ids
    drafter = SuffixTreeDrafter(corpus=tmp_path / "corpus.npz")
    first = specdec.generate(model, PROMPTS, max_new_tokens=24, drafter=drafter, num_draft_tokens=6)
    assert first.token_ids == reference
    assert first.stats["mean_accepted_tokens"] > 1
    assert len(drafter.global_tree) == len(OTHER) + len(PROMPTS)  # every response was learned
    second = specdec.generate(model, PROMPTS, max_new_tokens=24, drafter=drafter, num_draft_tokens=6)
    assert second.token_ids == reference
    assert second.stats["mean_accepted_tokens"] >= first.stats["mean_accepted_tokens"]
    by_name = specdec.generate(model, PROMPTS[1:4], max_new_tokens=17, drafter="suffix", num_draft_tokens=3)
    assert by_name.token_ids == specdec.generate(model, PROMPTS[1:4], max_new_tokens=17).token_ids


# --- cost -------------------------------------------------------------------------------------


def synthetic_text(g, pool, length, vocab):
    """Phrases from a shared pool (80%) between random tokens: text that repeats, as responses do."""
    out = []
    while len(out) < length:
        out += g.choice(pool) if g.random() < 0.8 else [g.randrange(vocab)]
    return out[:length]


def test_propose_cost():
    """propose() with ~500-token histories and a global tree of 100 responses of 200 tokens (run
    with -s to see the numbers). The bound is loose: this is a shared 2-core machine."""
    g, V = random.Random(0), 32000
    pool = [[g.randrange(V) for _ in range(g.randint(3, 12))] for _ in range(300)]
    drafter = SuffixTreeDrafter()
    for _ in range(100):
        drafter.add_global(synthetic_text(g, pool, 200, V))
    for B in (1, 16):
        history = torch.tensor([synthetic_text(g, pool, 600, V) for _ in range(B)])
        lens = torch.full((B,), 500)
        drafter.start(history, lens)
        times, nodes = [], []
        for _ in range(20):
            t0 = time.perf_counter()
            draft = drafter.propose(history, lens, 8)
            times.append(time.perf_counter() - t0)
            nodes.append(draft.count.float().mean().item())
            accepted = torch.full((B,), 3)
            lens = lens + accepted
            drafter.update(history, lens, accepted)
        median = statistics.median(times)
        print(f"\npropose B={B}: median {median * 1e3:.2f} ms, {statistics.mean(nodes):.1f} nodes per request")
        assert median < 0.02 * B
