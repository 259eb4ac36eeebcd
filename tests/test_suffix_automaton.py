"""SAM-Decoding's suffix automata (drafters/suffix_automaton.py) against brute force, and the
drafter end to end (greedy speculative output == greedy autoregressive output)."""

import random

import numpy as np
import pytest
import torch

import specdec
from drafters.corpus import Corpus
from drafters.suffix_automaton import SEP, SAMDrafter, StaticIndex, SuffixAutomaton, best_first_tree
from tiny_models import tiny_model


def random_text(g, alphabet, n):
    return [g.randrange(alphabet) for _ in range(n)]


def substrings(text, max_len):
    return {tuple(text[i : i + n]) for n in range(1, max_len + 1) for i in range(len(text) - n + 1)}


def accepts(sam, w):
    s = 0
    for t in w:
        s = sam.next[s].get(t)
        if s is None:
            return None
    return s


def occurrences(text, w):
    """End positions of w in text."""
    n = len(w)
    return [i + n - 1 for i in range(len(text) - n + 1) if text[i : i + n] == list(w)]


def brute_match(text, query):
    """(longest suffix of query that is a substring of text, its first end in text)."""
    for n in range(len(query), 0, -1):
        ends = occurrences(text, query[len(query) - n :])
        if ends:
            return n, ends[0]
    return 0, None


CASES = [(2, 1), (2, 17), (3, 40), (4, 60), (5, 33), (2, 60)]  # (alphabet, length)


@pytest.mark.parametrize("alphabet,n", CASES, ids=[f"a{a}-n{n}" for a, n in CASES])
def test_automaton_against_brute_force(alphabet, n):
    g = random.Random(alphabet * 100 + n)
    for _ in range(3):
        text = random_text(g, alphabet, n)
        sam = SuffixAutomaton.build(text)
        assert len(sam) <= max(2 * n - 1, 2)
        subs = substrings(text, 8)
        counts = sam.counts()
        for w in substrings(text + [alphabet], 8):  # every substring, and some that are not
            s = accepts(sam, w)
            assert (s is not None) == (w in subs), w
            if s is not None:
                ends = occurrences(text, w)
                assert counts[s] == len(ends) and sam.first_end[s] == ends[0], w
        for _ in range(20):  # random (non-)substrings, longer
            w = tuple(random_text(g, alphabet, g.randint(1, 12)))
            assert (accepts(sam, w) is not None) == bool(occurrences(text, w))
        # Longest-suffix matching of a random stream.
        query = random_text(g, alphabet + 1, 40)  # token `alphabet` never occurs
        s, m = 0, 0
        for i, t in enumerate(query):
            s, m = sam.step(s, m, t)
            want_m, want_end = brute_match(text, query[: i + 1])
            assert m == want_m, (i, query[: i + 1])
            if m:
                assert sam.first_end[s] == want_end and sam.length[sam.link[s]] < m <= sam.length[s]
            else:
                assert s == 0


def test_incremental_equals_batch_and_repeated_suffix():
    g = random.Random(7)
    text = random_text(g, 3, 50)
    sam = SuffixAutomaton()
    for i, t in enumerate(text):
        sam.extend(t)
        prefix = text[: i + 1]
        once = SuffixAutomaton.build(prefix)
        a, b = sam.to_arrays(), once.to_arrays()  # also recomputes counts after every extend
        assert all(np.array_equal(a[k], b[k]) for k in a)
        # Longest suffix occurring earlier (ending before i), and its first occurrence.
        m, end = sam.repeated_suffix()
        want = 0, -1
        for n in range(i, 0, -1):
            ends = [p for p in occurrences(prefix, prefix[i + 1 - n :]) if p < i]
            if ends:
                want = n, ends[0]
                break
        assert (m, end if m else -1) == want, prefix


def test_arrays_sorted_and_save_load(tmp_path):
    g = random.Random(3)
    docs = [random_text(g, 5, g.randint(1, 30)) for _ in range(6)]
    sam = SuffixAutomaton.from_documents(docs)
    arr = sam.to_arrays()
    start, tok = arr["trans_start"], arr["trans_token"]
    assert start[0] == 0 and start[-1] == len(tok) == len(arr["trans_target"])
    for a, b in zip(start[:-1], start[1:]):
        assert np.all(np.diff(tok[a:b]) > 0)  # strictly ascending tokens within a state
    sam.save(tmp_path / "sam.npz")
    back = SuffixAutomaton.load(tmp_path / "sam.npz")
    again = back.to_arrays()
    assert set(again) == set(arr) and all(np.array_equal(arr[k], again[k]) for k in arr)
    back.extend(4)  # a loaded automaton keeps growing like the original
    sam.extend(4)
    assert all(np.array_equal(sam.to_arrays()[k], back.to_arrays()[k]) for k in arr)
    np.savez(tmp_path / "bad.npz", len=arr["len"])
    with pytest.raises(ValueError, match="not a saved suffix automaton"):
        SuffixAutomaton.load(tmp_path / "bad.npz")


@pytest.mark.parametrize("alphabet", [2, 5])
def test_batched_stepper_equals_python(alphabet):
    g = random.Random(alphabet)
    docs = [random_text(g, alphabet, g.randint(1, 40)) for _ in range(5)]
    sam = SuffixAutomaton.from_documents(docs)
    index = StaticIndex(sam.to_arrays(), "cpu")
    B, steps = 37, 50
    streams = [random_text(g, alphabet + 2, steps) for _ in range(B)]  # some tokens never occur
    active = [[g.random() < 0.8 for _ in range(steps)] for _ in range(B)]
    want = [(0, 0)] * B
    state = torch.zeros(B, dtype=torch.int64)
    match_len = torch.zeros(B, dtype=torch.int64)
    for j in range(steps):
        token = torch.tensor([s[j] for s in streams])
        act = torch.tensor([a[j] for a in active])
        state, match_len = index.step(state, match_len, token, act)
        want = [sam.step(*w, s[j]) if a[j] else w for w, s, a in zip(want, streams, active)]
        assert torch.equal(torch.stack([state, match_len], 1), torch.tensor(want)), j


# ---- the drafter ------------------------------------------------------------------------------


def brute_dynamic(seq):
    """(n, first end) of the longest suffix that also ends before the last position."""
    r = len(seq) - 1
    for n in range(r, 0, -1):
        ends = [p for p in occurrences(seq, seq[r + 1 - n :]) if p < r]
        if ends:
            return n, ends[0]
    return 0, None


def brute_static(docs, seq):
    """(n, first end in the SEP-joined text) of the longest suffix of seq inside one document."""
    text = [t for d in docs for t in list(d) + [SEP]]
    return brute_match(text, seq), text


def brute_tree(docs, w, budget):
    """best_first_tree with counts recomputed from scratch: occurrences of strings in the docs."""
    occ = lambda x: sum(len(occurrences(list(d), x)) for d in docs)  # noqa: E731
    alphabet = sorted({t for d in docs for t in d})
    tokens, parents, heap, serial = [], [], [], 0
    import heapq

    def push(x, parent, prob):
        nonlocal serial
        kids = sorted(((occ(x + [t]), t) for t in alphabet if occ(x + [t])), key=lambda k: (-k[0], k[1]))
        for c, t in kids:
            heapq.heappush(heap, (-prob * c / occ(x), serial, t, x + [t], parent))
            serial += 1

    push(list(w), -1, 1.0)
    while heap and len(tokens) < budget:
        neg, _, t, x, parent = heapq.heappop(heap)
        tokens.append(t)
        parents.append(parent)
        if len(tokens) < budget:
            push(x, len(tokens) - 1, -neg)
    return tokens, parents


def simulate(drafter, prompts, vocab, steps, max_nodes, seed, check):
    """Drive a drafter like the engine: start, then propose / append tokens / update, with retains."""
    g = random.Random(seed)
    seqs = [list(p) for p in prompts]
    T = max(map(len, seqs)) + steps * 5 + 1
    drafter.prepare(vocab, "cpu")

    def tensors():
        history = torch.tensor([s + [g.randrange(vocab)] * (T - len(s)) for s in seqs])  # garbage past lens
        return history, torch.tensor([len(s) for s in seqs])

    drafter.start(*tensors())
    for step in range(steps):
        history, lens = tensors()
        draft = drafter.propose(history, lens, max_nodes)
        for b, seq in enumerate(seqs):
            check(drafter, draft, b, seq)
        added = []
        for seq in seqs:  # sometimes copy a stretch of the sequence itself, so matches grow
            if g.random() < 0.5 and len(seq) > 3:
                i = g.randrange(len(seq) - 2)
                new = seq[i : i + g.randint(1, 4)]
            else:
                new = random_text(g, vocab, g.randint(1, 4))
            seq += new
            added.append(len(new))
        history, lens = tensors()
        drafter.update(history, lens, torch.tensor(added))
        if step % 4 == 3 and len(seqs) > 1:  # a request leaves
            keep = [b for b in range(len(seqs)) if b != step % len(seqs)]
            seqs = [seqs[b] for b in keep]
            drafter.retain(torch.tensor(keep))


def tree_of(draft, b):
    n = draft.count[b].item()
    return draft.tokens[b, :n].tolist(), draft.parents[b, :n].tolist()


@pytest.mark.parametrize("vocab,max_nodes", [(2, 6), (3, 1), (4, 16)])
def test_dynamic_draft_brute_force(vocab, max_nodes):
    g = random.Random(vocab)
    prompts = [random_text(g, vocab, n) for n in (1, 2, 5, 13, 30)]

    def check(drafter, draft, b, seq):
        n, end = brute_dynamic(seq)
        assert drafter.last_dynamic_len[b].item() == n and draft.match_len[b].item() == n
        assert drafter.last_static_len[b].item() == 0
        budget = min(max_nodes, 1 + 4 * n) if n else 0
        want = seq[end + 1 :][:budget] if n else []
        assert tree_of(draft, b) == (want, list(range(-1, len(want) - 1))), seq

    simulate(SAMDrafter(), prompts, vocab, steps=14, max_nodes=max_nodes, seed=vocab, check=check)


@pytest.mark.parametrize("static_tree", [False, True], ids=["chain", "tree"])
@pytest.mark.parametrize("bias", [0, 2])
def test_static_draft_brute_force(static_tree, bias):
    g = random.Random(11 + bias)
    vocab, max_nodes = 4, 7
    docs = [random_text(g, vocab, g.randint(1, 25)) for _ in range(8)]
    drafter = SAMDrafter(Corpus(docs, vocab), static_bias=bias, static_tree=static_tree)
    prompts = [random_text(g, vocab, n) for n in (1, 3, 9, 20)] + [docs[0][:6]]
    chosen = []

    def check(drafter, draft, b, seq):
        n_dyn, end_dyn = brute_dynamic(seq)
        (n_st, end_st), text = brute_static(docs, seq)
        assert drafter.last_dynamic_len[b].item() == n_dyn
        assert drafter.last_static_len[b].item() == n_st
        use_static = n_st > 0 and n_st - bias > n_dyn
        chosen.append(use_static)
        assert draft.match_len[b].item() == (n_st - bias if use_static else n_dyn)
        got = tree_of(draft, b)
        tokens, parents = got
        assert all(-1 <= p < k for k, p in enumerate(parents))
        if not use_static:
            budget = min(max_nodes, 1 + 4 * n_dyn) if n_dyn else 0
            want = seq[end_dyn + 1 :][:budget] if n_dyn else []
            assert got == (want, list(range(-1, len(want) - 1)))
            return
        budget = min(max_nodes, 1 + 4 * n_st)
        if static_tree:
            assert got == brute_tree(docs, seq[len(seq) - n_st :], budget)
        else:
            rest = text[end_st + 1 :]
            want = rest[: rest.index(SEP)][:budget]
            assert got == (want, list(range(-1, len(want) - 1)))
        for k in range(len(tokens)):  # every path is the match's continuation in some document
            path, j = [], k
            while j >= 0:
                path.append(tokens[j])
                j = parents[j]
            w = seq[len(seq) - n_st :] + path[::-1]
            assert any(occurrences(list(d), w) for d in docs)

    simulate(drafter, prompts, vocab, steps=12, max_nodes=max_nodes, seed=bias, check=check)
    assert any(chosen) and not all(chosen)


def test_best_first_tree_order():
    # After "a": b follows 3 times, c once; after "a b": c twice, d once.
    docs = [[0, 1, 2], [0, 1, 2], [0, 1, 3], [0, 2]]
    sam = SuffixAutomaton.from_documents(docs)
    counts = sam.counts().tolist()
    state = accepts(sam, [0])
    assert best_first_tree(sam, counts, state, 5) == ([1, 2, 2, 3], [-1, 0, -1, 0])
    assert best_first_tree(sam, counts, state, 2) == ([1, 2], [-1, 0])
    assert best_first_tree(sam, counts, accepts(sam, [2]), 5) == ([], [])  # only document ends follow


def test_bad_corpora(tmp_path):
    with pytest.raises(ValueError, match="empty corpus"):
        SAMDrafter(Corpus([[], []], 10))
    with pytest.raises(ValueError, match="outside"):
        Corpus([[1, -2]], 10)
    with pytest.raises(ValueError, match="vocab_size 64"):
        SAMDrafter(Corpus([[3, 70, 5]], 100)).prepare(64, "cpu")
    with pytest.raises(FileNotFoundError):
        SAMDrafter(tmp_path / "missing.npz")
    with pytest.raises(TypeError):
        SAMDrafter(corpus=[[1, 2]])
    with pytest.raises(ValueError, match="max_draft"):
        SAMDrafter(max_draft=0)
    Corpus([[1, 2, 3]], 10).save(tmp_path / "c.npz")
    drafter = SAMDrafter(str(tmp_path / "c.npz"))
    drafter.prepare(10, "cpu")
    assert drafter.static.text == [1, 2, 3, SEP]


# ---- end to end -------------------------------------------------------------------------------

VOCAB = 64
PROMPTS = [[5, 9, 11, 5, 9, 11, 5, 9], [7] * 9, [3], [12, 40, 33, 8, 19, 12, 40, 33],
           [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]]
OTHER = [[20, 21, 22], [30, 31], [44, 45, 46, 47], [50], [3, 17]]


@pytest.fixture(scope="module")
def model():
    return tiny_model(vocab=VOCAB, hidden=32, layers=2, heads=4, kv_heads=2, ffn=48, seed=3)


class Recording(SAMDrafter):
    def propose(self, history, lens, max_nodes):
        draft = super().propose(history, lens, max_nodes)
        self.seen = getattr(self, "seen", []) + [(self.last_static_len - self.static_bias > self.last_dynamic_len)
                                                 .logical_and(self.last_static_len > 0).any().item()]
        return draft


@pytest.fixture(scope="module")
def reference(model):
    return specdec.generate(model, PROMPTS, max_new_tokens=24).token_ids


@pytest.fixture(scope="module")
def corpus(model):
    """The model's own greedy responses to other prompts, some of them the test prompts' tails."""
    others = OTHER + [p[-2:] for p in PROMPTS if len(p) > 2]
    outs = specdec.generate(model, others, max_new_tokens=24).token_ids
    return Corpus([p + o for p, o in zip(others, outs)], VOCAB)


# static_bias 5 is the paper's; at 1 the corpus wins some steps for these prompts.
@pytest.mark.parametrize("static_tree,bias", [(True, 5), (True, 1), (False, 1)], ids=["tree-5", "tree-1", "chain-1"])
def test_lossless_greedy(model, reference, corpus, static_tree, bias):
    drafter = Recording(corpus=corpus, static_bias=bias, static_tree=static_tree)
    got = specdec.generate(model, PROMPTS, max_new_tokens=24, drafter=drafter, num_draft_tokens=5)
    assert got.token_ids == reference
    assert got.stats["mean_accepted_tokens"] > 1
    assert any(drafter.seen) or bias == 5  # the static automaton was chosen
