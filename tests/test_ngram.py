"""N-gram drafter (drafters/ngram.py) against a pure-Python brute force, golden cases and edges."""

import random

import pytest
import torch

from drafters.ngram import NgramDrafter


def brute_occurrences(seq, max_ngram, min_ngram):
    """(n, ends): the longest suffix length with a proper earlier occurrence, and every end of one."""
    r = len(seq) - 1
    for n in range(max_ngram, min_ngram - 1, -1):
        if n > len(seq):
            continue
        suffix = seq[r - n + 1 :]
        ends = [p for p in range(n - 1, r) if seq[p - n + 1 : p + 1] == suffix]
        if ends:
            return n, ends
    return 0, []


def brute_chain(seq, max_ngram, min_ngram, max_nodes, max_chain=None):
    n, ends = brute_occurrences(seq, max_ngram, min_ngram)
    if not n:
        return 0, []
    limit = min(max_nodes, max_chain or max_nodes)
    return n, seq[max(ends) + 1 :][:limit]


def brute_children(seq, max_ngram, min_ngram, branches):
    """Ranked root children: (token, count, end of its most recent occurrence)."""
    n, ends = brute_occurrences(seq, max_ngram, min_ngram)
    stats = {}
    for p in ends:
        count, _ = stats.get(seq[p + 1], (0, -1))
        stats[seq[p + 1]] = (count + 1, p)  # ends ascend: the last one seen is the most recent
    ranked = sorted(((t, c, p) for t, (c, p) in stats.items()), key=lambda x: (-x[1], -x[2]))
    return n, ranked[:branches]


def random_batch(B, T, vocab, seed, min_len=1):
    """Ragged left-aligned history with garbage (random tokens, out-of-vocab) past each length."""
    g = random.Random(seed)
    lens = [g.randint(min_len, T) for _ in range(B)]
    lens[:3] = [min_len, 2, 3]  # shorter than most suffixes tried
    seqs = [[g.randrange(vocab) for _ in range(n)] for n in lens]
    history = torch.tensor([s + [g.randrange(-5, 1000) for _ in range(T - len(s))] for s in seqs])
    return seqs, history, torch.tensor(lens)


def chain_of(draft, b):
    return draft.tokens[b, : draft.count[b]].tolist()


CONFIGS = {  # (max_ngram, min_ngram, max_chain)
    "default": (4, 1, None),
    "trigram_only": (3, 3, None),
    "bigram_to_5": (5, 2, None),
    "unigram": (1, 1, None),
    "max_chain_3": (4, 1, 3),
}


@pytest.mark.parametrize("vocab", [2, 3, 7])
@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("max_nodes", [1, 5, 64])
def test_chain_matches_brute_force(vocab, config, max_nodes):
    max_ngram, min_ngram, max_chain = config
    drafter = NgramDrafter(max_ngram, min_ngram, max_chain=max_chain)
    for seed in range(4):
        seqs, history, lens = random_batch(B=9, T=37, vocab=vocab, seed=seed)
        draft = drafter.propose(history, lens, max_nodes)
        assert draft.tokens.shape == draft.parents.shape == (9, min(max_nodes, max_chain or max_nodes))
        assert torch.equal(draft.parents[0], torch.arange(-1, draft.tokens.shape[1] - 1))
        for b, seq in enumerate(seqs):
            n, want = brute_chain(seq, max_ngram, min_ngram, max_nodes, max_chain)
            assert draft.match_len[b].item() == n, (seed, b)
            assert chain_of(draft, b) == want, (seed, b)
            assert not draft.tokens[b, draft.count[b] :].any()  # padding is zero


GOLDEN = [  # (tokens, max_ngram, max_nodes, expected draft, expected match_len)
    ("a b c d a b", 4, 8, "c d a b", 2),
    ("a b c d a b", 4, 2, "c d", 2),
    ("a b c d a b", 1, 8, "c d a b", 1),
    ("a b x a c a", 4, 8, "c a", 1),  # most recent occurrence of "a", not the first
    ("x a b y a b z a b", 4, 8, "z a b", 2),
    ("a a a a", 4, 8, "a", 3),  # overlaps the suffix: only the root follows
    ("a b c d", 4, 8, "", 0),
    ("a", 4, 8, "", 0),
    ("a b c a b d a b c", 4, 8, "a b d a b c", 3),  # longest n beats recency
]


@pytest.mark.parametrize("text,max_ngram,max_nodes,want,n", GOLDEN, ids=[g[0] for g in GOLDEN])
def test_golden(text, max_ngram, max_nodes, want, n):
    vocab = {c: i for i, c in enumerate("abcdxyz")}
    seq = [vocab[c] for c in text.split()]
    draft = NgramDrafter(max_ngram).propose(torch.tensor([seq]), torch.tensor([len(seq)]), max_nodes)
    assert chain_of(draft, 0) == [vocab[c] for c in want.split()]
    assert draft.match_len.tolist() == [n]


@pytest.mark.parametrize("branches", [1, 2, 3, 5])
def test_padding_never_matters(branches):
    drafter = NgramDrafter(3, 1, branches=branches)
    _, history, lens = random_batch(B=6, T=30, vocab=3, seed=1)
    a = drafter.propose(history, lens, 8)
    garbage = history.clone()
    garbage[torch.arange(30) >= lens.view(-1, 1)] = 2  # an in-vocabulary token extends every match
    b = drafter.propose(garbage, lens, 8)
    wider = torch.cat([history, torch.randint(0, 3, (6, 11))], dim=1)
    c = drafter.propose(wider, lens, 8)
    for d in (b, c):
        assert torch.equal(a.count, d.count) and torch.equal(a.match_len, d.match_len)
        for x, y in ((a.tokens, d.tokens), (a.parents, d.parents)):
            k = max(a.count.max().item(), 0)
            assert torch.equal(x[:, :k], y[:, :k])


def check_tree(draft, b, max_nodes):
    """Valid structure; returns {child index: its chain's tokens (the child's first)}."""
    count = draft.count[b].item()
    assert 0 <= count <= max_nodes
    parents = draft.parents[b, :count].tolist()
    chains = {}
    for k, q in enumerate(parents):
        assert -1 <= q < k
        if q == -1:
            chains[k] = [k]
        else:
            (child,) = [c for c, nodes in chains.items() if nodes[-1] == q]  # one chain per branch
            chains[child].append(k)
    return {c: draft.tokens[b, nodes].tolist() for c, nodes in chains.items()}


@pytest.mark.parametrize("vocab", [2, 3, 5])
@pytest.mark.parametrize("branches", [2, 3, 6])
@pytest.mark.parametrize("max_nodes,max_chain", [(1, None), (3, None), (8, None), (40, None), (12, 2)])
def test_tree_matches_brute_force(vocab, branches, max_nodes, max_chain):
    drafter = NgramDrafter(3, 1, branches=branches, max_chain=max_chain)
    for seed in range(3):
        seqs, history, lens = random_batch(B=8, T=41, vocab=vocab, seed=seed)
        draft = drafter.propose(history, lens, max_nodes)
        for b, seq in enumerate(seqs):
            n, ranked = brute_children(seq, 3, 1, branches)
            ranked = ranked[:max_nodes]
            assert draft.match_len[b].item() == n
            chains = check_tree(draft, b, max_nodes)
            assert list(chains) == sorted(chains)  # siblings in index order ...
            assert [c[0] for c in chains.values()] == [t for t, _, _ in ranked]  # ... in rank order
            depth_cap = max_chain or max_nodes
            caps = [min(len(seq) - p - 1, depth_cap) for _, _, p in ranked]
            for chain, (_, _, p), cap in zip(chains.values(), ranked, caps):
                assert chain == seq[p + 1 : p + 1 + len(chain)]  # continues its most recent occurrence
                assert len(chain) <= cap
            assert draft.count[b].item() == min(max_nodes, sum(caps))  # the budget is used up
            if chains:
                lengths = [len(c) for c in chains.values()]
                assert lengths[0] == max(lengths) or lengths[0] == caps[0]  # the top branch is deepest


def test_tree_single_branch_equals_chain():
    """With one distinct continuation a tree is the chain."""
    seq = [0, 1, 2, 3, 4, 0, 1]
    history, lens = torch.tensor([seq]), torch.tensor([7])
    tree = NgramDrafter(branches=4).propose(history, lens, 6)
    chain = NgramDrafter().propose(history, lens, 6)
    assert tree.count.tolist() == chain.count.tolist() == [5]
    assert torch.equal(tree.tokens[:, :5], chain.tokens[:, :5])
    assert torch.equal(tree.parents[:, :5], chain.parents[:, :5])


def test_tree_golden():
    # After "a": b (3 times, most recent at 6), c (twice, at 8), d (once); the root is the last "a".
    a, b, c, d = 0, 1, 2, 3
    seq = [a, b, a, c, a, b, a, b, a, c, a, d, a]
    draft = NgramDrafter(max_ngram=1, branches=2).propose(torch.tensor([seq]), torch.tensor([len(seq)]), 5)
    chains = check_tree(draft, 0, 5)
    # Counts 3 : 2 share the 3 nodes past the children 1 : 1, the leftover goes to the top branch.
    assert list(chains.values()) == [[b, a, c], [c, a]]
    assert draft.parents[0].tolist() == [-1, 0, 1, -1, 3]


def test_empty_and_no_match():
    drafter = NgramDrafter()
    history = torch.tensor([[1, 2, 3, 4], [7, 7, 7, 7]])
    draft = drafter.propose(history, torch.tensor([4, 1]), 5)
    assert draft.count.tolist() == [0, 0] and draft.match_len.tolist() == [0, 0]
    assert not draft.tokens.any()
    draft = drafter.propose(history, torch.tensor([4, 4]), 0)
    assert draft.tokens.shape == (2, 0) and draft.count.tolist() == [0, 0]
    for branches in (1, 3):
        draft = NgramDrafter(branches=branches).propose(torch.zeros(3, 0, dtype=torch.int64),
                                                         torch.zeros(3, dtype=torch.int64), 4)
        assert draft.count.tolist() == [0, 0, 0]
    tree = NgramDrafter(branches=3).propose(history, torch.tensor([4, 1]), 5)
    assert tree.count.tolist() == [0, 0] and tree.tokens.shape[0] == 2


@pytest.mark.parametrize("kwargs", [
    dict(max_ngram=0), dict(min_ngram=0), dict(max_ngram=2, min_ngram=3), dict(branches=0),
    dict(max_chain=0), dict(max_ngram=2.0), dict(branches=True), dict(max_chain="4"),
])
def test_invalid_arguments(kwargs):
    with pytest.raises(ValueError):
        NgramDrafter(**kwargs)


def test_interface():
    drafter = NgramDrafter()
    assert drafter.name == "ngram"
    history, lens = torch.tensor([[1, 2, 1, 2]]), torch.tensor([4])
    drafter.start(history, lens)
    drafter.update(history, lens, torch.tensor([1]))
    drafter.retain(torch.tensor([0]))
    assert chain_of(drafter.propose(history, lens, 4), 0) == [1, 2]


@pytest.mark.gpu
@pytest.mark.parametrize("branches", [1, 3])
def test_cuda_matches_cpu(branches):
    drafter = NgramDrafter(4, 1, branches=branches)
    _, history, lens = random_batch(B=16, T=300, vocab=4, seed=0)
    a = drafter.propose(history, lens, 10)
    b = drafter.propose(history.cuda(), lens.cuda(), 10)
    for f in ("tokens", "parents", "count", "match_len"):
        assert torch.equal(getattr(a, f), getattr(b, f).cpu()), f
