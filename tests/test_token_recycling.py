"""Token Recycling (drafters/token_recycling.py): the matrix update, the template walk against a
pure-Python BFS, template truncation, and lossless decoding end to end."""

import math
import random

import numpy as np
import pytest
import torch

import specdec
from drafters import make_drafter
from drafters.corpus import Corpus
from drafters.token_recycling import TokenRecyclingDrafter, check_tree, confidence_bucket, corpus_rows, default_tree
from tiny_models import tiny_model

PROMPTS = [[5, 9, 11], [7] * 9, [3], [12, 40, 33, 8, 19], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]]


def brute_tree(M, root, tree):
    """Node tokens by walking the template from the root, one node at a time."""
    tokens = []
    for parent, rank in tree:
        tokens.append(M[root if parent < 0 else tokens[parent]][rank])
    return tokens


def assert_valid_tree(parents, count):
    for b in range(parents.shape[0]):
        for k, p in enumerate(parents[b, : count[b]].tolist()):
            assert -1 <= p < k, (b, k, p)


def test_registry_and_cold_matrix():
    d = make_drafter("recycle", top_k=4)
    assert isinstance(d, TokenRecyclingDrafter) and d.name == "recycle"
    d.prepare(10, "cpu")
    assert d.M.shape == (10, 4) and d.M.dtype == torch.int64
    assert d.M[9].tolist() == [0, 1, 2, 3]  # (t + 1 + j) % V


@pytest.mark.parametrize("top_k", [1, 3, 8])
def test_observe_writes_latest_topk_of_valid_nodes_only(top_k):
    V, B, N = 50, 3, 6
    d = TokenRecyclingDrafter(top_k=top_k)
    d.prepare(V, "cpu")
    cold = d.M.clone()
    tokens = torch.randperm(V)[: B * N].view(B, N)  # all distinct: no write races
    tokens[2, 4:] = torch.tensor([-7, 10**6])  # padding may hold anything, even out-of-vocabulary
    num_nodes = torch.tensor([6, 2, 4])
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, N, V, generator=g)
    d.observe(tokens, logits, num_nodes)
    for b in range(B):
        for n in range(N):
            t = tokens[b, n].item()
            if n < num_nodes[b]:
                assert d.M[t].tolist() == logits[b, n].topk(top_k).indices.tolist(), (b, n)
            elif 0 <= t < V:
                assert torch.equal(d.M[t], cold[t]), (b, n)  # padding nodes are not written
    # A later observation of the same token replaces the row.
    again = torch.randn(1, 1, V, generator=g)
    d.observe(tokens[:1, :1], again, torch.tensor([1]))
    assert d.M[tokens[0, 0]].tolist() == again[0, 0].topk(top_k).indices.tolist()


def test_observe_duplicate_token_one_write_wins():
    V, k = 20, 3
    d = TokenRecyclingDrafter(top_k=k)
    d.prepare(V, "cpu")
    tokens = torch.tensor([[4, 4, 9], [4, 1, 4]])
    logits = torch.randn(2, 3, V, generator=torch.Generator().manual_seed(1))
    d.observe(tokens, logits, torch.tensor([3, 3]))
    candidates = [logits[b, n].topk(k).indices.tolist() for b, n in [(0, 0), (0, 1), (1, 0), (1, 2)]]
    assert d.M[4].tolist() in candidates


TEMPLATES = {
    "default": None,
    "chain": [(-1, 0), (0, 0), (1, 0), (2, 0)],
    "star": [(-1, r) for r in range(5)],
    "mixed": [(-1, 0), (-1, 2), (0, 1), (1, 0), (0, 0), (2, 4), (5, 3), (-1, 1), (3, 2)],
}


@pytest.mark.parametrize("max_nodes", [1, 2, 7, 80, 200])
@pytest.mark.parametrize("template", TEMPLATES.values(), ids=TEMPLATES.keys())
def test_propose_matches_brute_force_walk(template, max_nodes):
    V, k, B, T = 37, 5, 7, 19
    d = TokenRecyclingDrafter(top_k=k, tree=template if template else default_tree(80, k))
    d.prepare(V, "cpu")
    g = random.Random(max_nodes)
    d.M.copy_(torch.tensor([[g.randrange(V) for _ in range(k)] for _ in range(V)]))
    d._warm.fill_(True)  # as if every row had been observed
    lens = torch.tensor([g.randint(1, T) for _ in range(B)])
    history = torch.tensor([[g.randrange(V) for _ in range(T)] for _ in range(B)])
    history[torch.arange(T) >= lens.view(B, 1)] = -1  # garbage past each length is never read
    draft = d.propose(history, lens, max_nodes)
    tree = d.tree[:max_nodes]
    K = len(tree)
    assert draft.tokens.shape == draft.parents.shape == (B, K)
    assert draft.count.tolist() == [K] * B
    assert_valid_tree(draft.parents, draft.count)
    assert torch.equal(draft.parents, torch.tensor([p for p, _ in tree]).expand(B, K))
    M = d.M.tolist()
    for b in range(B):
        assert draft.tokens[b].tolist() == brute_tree(M, history[b, lens[b] - 1].item(), tree), b


def test_propose_no_budget_is_empty():
    d = TokenRecyclingDrafter()
    d.prepare(64, "cpu")
    draft = d.propose(torch.tensor([[1, 2]]), torch.tensor([2]), 0)
    assert draft.tokens.shape == (1, 0) and draft.count.tolist() == [0]


@pytest.mark.parametrize("size,top_k", [(1, 1), (13, 2), (80, 8), (200, 8), (64, 12)])
def test_default_template_every_prefix_is_a_tree(size, top_k):
    tree = check_tree(default_tree(size, top_k), top_k)
    assert len(tree) == size
    depth = []
    for parent, rank in tree:
        depth.append(1 if parent < 0 else depth[parent] + 1)
    # Parents precede children, so every prefix is a tree; siblings come in rank order.
    for i, (parent, rank) in enumerate(tree):
        assert parent < i
        earlier = [r for p, r in tree[:i] if p == parent]
        assert earlier == list(range(rank)), (i, parent, rank)
    if size >= 80 and top_k == 8:
        assert depth.count(1) == 8 and max(depth) >= 5  # wide at the root, a deep top-1 spine


@pytest.mark.parametrize("tree,match", [
    ([(0, 0)], "parent 0"),
    ([(-1, 0), (2, 0), (0, 1)], "parent 2"),
    ([(-1, 8)], "rank 8"),
    ([(-1, 0), (-1, 0)], "twice"),
], ids=["self-parent", "forward-parent", "rank>=top_k", "duplicate"])
def test_bad_templates(tree, match):
    with pytest.raises(ValueError, match=match):
        TokenRecyclingDrafter(top_k=8, tree=tree)


def test_bad_options():
    with pytest.raises(ValueError, match="top_k"):
        TokenRecyclingDrafter(top_k=0)
    for bad in (-1, 2.0, True):
        with pytest.raises(ValueError, match="chain_streak"):
            TokenRecyclingDrafter(chain_streak=bad)
    with pytest.raises(ValueError, match="exceeds"):
        TokenRecyclingDrafter(top_k=8).prepare(4, "cpu")


def test_matrix_persists_across_prepare_until_vocab_changes():
    d = TokenRecyclingDrafter(top_k=2)
    d.prepare(10, "cpu")
    d.M[3] = torch.tensor([7, 7])
    d.prepare(10, "cpu")
    assert d.M[3].tolist() == [7, 7]
    d.prepare(11, "cpu")
    assert d.M.shape == (11, 2) and d.M[3].tolist() == [4, 5]
    d.M[3] = torch.tensor([7, 7])
    d.reset()
    d.prepare(11, "cpu")
    assert d.M[3].tolist() == [4, 5]


@pytest.fixture(scope="module")
def model():
    return tiny_model(vocab=64, hidden=32, layers=2, heads=4, kv_heads=2, ffn=48, seed=3)


@pytest.fixture(scope="module")
def reference(model):
    return specdec.generate(model, PROMPTS, max_new_tokens=24).token_ids


@pytest.fixture(scope="module")
def first_run(model):
    drafter = TokenRecyclingDrafter()
    out = specdec.generate(model, PROMPTS, max_new_tokens=24, drafter=drafter, num_draft_tokens=8)
    return drafter, out


def test_lossless_ragged_batch(reference, first_run):
    assert first_run[1].token_ids == reference


def test_lossless_wide_tree(model, reference):
    # 30 nodes: the template's prefix reaches depth 5; greedy outputs are prefixes of longer ones.
    out = specdec.generate(model, PROMPTS[:2], max_new_tokens=12, drafter="recycle", num_draft_tokens=30)
    assert out.token_ids == [r[:12] for r in reference[:2]]


def test_accepts_after_warm_up(model, reference, first_run):
    # The tiny random model falls into loops (PROMPTS[1] -> 49 49 49 ...): once a loop's tokens have
    # been verified, their rows hold its continuation and whole chains are accepted (2.13 here).
    drafter, out = first_run
    assert out.stats["mean_accepted_tokens"] > 1.5
    # A second call starts from the learned matrix (not cold) and stays lossless.
    assert not torch.equal(drafter.M[49], torch.arange(50, 58) % 64)
    warm = specdec.generate(model, PROMPTS, max_new_tokens=24, drafter=drafter, num_draft_tokens=8)
    assert warm.token_ids == reference and warm.stats["mean_accepted_tokens"] > 1.5


def test_a_cold_root_gets_no_draft():
    V, k = 30, 3
    d = TokenRecyclingDrafter(top_k=k)
    d.prepare(V, "cpu")
    history = torch.tensor([[1, 2, 3], [4, 5, 6]])
    lens = torch.tensor([3, 3])
    assert d.propose(history, lens, 4).count.tolist() == [0, 0]  # nothing observed yet
    d.observe(torch.tensor([[6]]), torch.randn(1, 1, V), torch.tensor([1]))  # root 6 gets candidates
    assert d.propose(history, lens, 4).count.tolist() == [0, 4]


def brute_corpus_rows(docs, V, k, freqs=False):
    """Per token: successors by count descending then id, topped up with the most frequent tokens;
    with freqs, each candidate's share of the token's successors (0 for a top-up) instead."""
    from collections import Counter

    follow, uni = {}, Counter()
    for d in docs:
        uni.update(d)
        for a, b in zip(d, d[1:]):
            follow.setdefault(a, Counter())[b] += 1
    common = sorted(range(V), key=lambda t: (-uni[t], t))
    rows = {}
    for a, c in follow.items():
        row = [b for b, _ in sorted(c.items(), key=lambda x: (-x[1], x[0]))][:k]
        rows[a] = row + [t for t in common if t not in row][: k - len(row)]
        if freqs:
            rows[a] = [c[b] / sum(c.values()) for b in rows[a]]
    return rows


@pytest.mark.parametrize("seed", range(6))
def test_corpus_rows_match_brute_force(seed):
    g = random.Random(seed)
    V, k = g.choice([5, 12, 40]), g.choice([1, 3, 4])
    docs = [[g.randrange(V) for _ in range(g.randint(1, 30))] for _ in range(g.randint(1, 6))]
    if seed == 0:
        docs = [[3], [1], [3]]  # one-token documents: no successors at all
    tokens, rows, freqs = corpus_rows(Corpus(docs, V), k)
    expect = brute_corpus_rows(docs, V, k)
    assert tokens.tolist() == sorted(expect)  # a document's last token gets no successor from the next
    assert {t: r for t, r in zip(tokens.tolist(), rows.tolist())} == expect
    shares = brute_corpus_rows(docs, V, k, freqs=True)
    for t, f in zip(tokens.tolist(), freqs.tolist()):
        assert f == pytest.approx(shares[t]), t
    assert all(len(set(r)) == k for r in rows.tolist())  # no duplicate siblings


def test_corpus_warm_start(tmp_path):
    V, k = 20, 2
    corpus = Corpus([[3, 4, 3, 5, 3, 4], [6, 7]], V)
    d = TokenRecyclingDrafter(top_k=k, corpus=corpus)
    d.prepare(V, "cpu")
    assert d.M[3].tolist() == [4, 5] and d.M[4].tolist() == [3, 4] and d.M[6].tolist() == [7, 3]
    assert d._warm[:V].nonzero().view(-1).tolist() == [3, 4, 5, 6]  # 7 ends a document: still cold
    history, lens = torch.tensor([[1, 3], [1, 7]]), torch.tensor([2, 2])
    assert d.propose(history, lens, 2).count.tolist() == [2, 0]
    d.observe(torch.tensor([[3]]), torch.eye(V)[[9]].view(1, 1, V), torch.tensor([1]))  # learning overwrites
    assert d.M[3, 0].item() == 9
    d.reset()
    d.prepare(V, "cpu")
    assert d.M[3].tolist() == [4, 5]  # reset starts over from the corpus
    corpus.save(tmp_path / "c.npz")
    assert TokenRecyclingDrafter(top_k=k, corpus=tmp_path / "c.npz")._corpus_rows[1].tolist() == \
        d._corpus_rows[1].tolist()


def test_corpus_errors():
    with pytest.raises(ValueError, match="another tokenizer"):
        TokenRecyclingDrafter(top_k=2, corpus=Corpus([[1, 30]], 40)).prepare(20, "cpu")
    with pytest.raises(TypeError, match="corpus"):
        TokenRecyclingDrafter(corpus=[[1, 2]])
    with pytest.raises(ValueError, match="exceeds the corpus"):
        TokenRecyclingDrafter(top_k=8, corpus=Corpus([[1, 2]], 4))
    with pytest.raises(FileNotFoundError, match="specdec corpus"):
        TokenRecyclingDrafter(corpus="/nonexistent/corpus.npz")


def test_lossless_from_a_corpus(model, reference):
    # A corpus holding continuations of the outputs, and one of noise: either way the output is AR's.
    for docs in (reference, [[random.Random(i).randrange(64) for _ in range(50)] for i in range(4)]):
        drafter = TokenRecyclingDrafter(corpus=Corpus(docs, 64))
        out = specdec.generate(model, PROMPTS, max_new_tokens=24, drafter=drafter, num_draft_tokens=8)
        assert out.token_ids == reference


@pytest.mark.parametrize("seed", range(5))
def test_start_writes_prompt_successors_newest_first(seed):
    g = random.Random(seed)
    V, k, B, T = g.choice([6, 30]), g.choice([1, 3, 5]), g.randint(1, 3), 12
    d = TokenRecyclingDrafter(top_k=k)
    d.prepare(V, "cpu")
    d.M.copy_(torch.stack([torch.randperm(V, generator=torch.Generator().manual_seed(seed * 100 + t))[:k]
                           for t in range(V)]))
    warm = {t for t in range(V) if g.random() < 0.3}
    d._warm[list(warm)] = True
    before = d.M.tolist()
    lens = torch.tensor([g.randint(1, T) for _ in range(B)])
    history = torch.tensor([[g.randrange(V) for _ in range(T)] for _ in range(B)])
    d.start(history, lens)
    expect = [list(r) for r in before]
    for b in range(B):  # one pair at a time, in reading order: u to the front of row t
        row = history[b, : lens[b]].tolist()
        for t, u in zip(row, row[1:]):
            expect[t] = [u] + [x for x in expect[t] if x != u][: k - 1]
            warm.add(t)
    assert d.M.tolist() == expect
    assert {t for t in range(V) if d._warm[t]} == warm
    assert all(len(set(r)) == k for r in d.M.tolist())


def test_from_prompt_off_leaves_the_matrix():
    d = TokenRecyclingDrafter(top_k=3, from_prompt=False)
    d.prepare(20, "cpu")
    cold = d.M.clone()
    d.start(torch.tensor([[1, 2, 3, 1, 4]]), torch.tensor([5]))
    assert torch.equal(d.M, cold) and not d._warm.any()
    with pytest.raises(TypeError, match="from_prompt"):
        TokenRecyclingDrafter(from_prompt=1)


def test_lossless_with_and_without_the_prompt(model, reference):
    for from_prompt in (True, False):
        out = specdec.generate(model, PROMPTS, max_new_tokens=24, num_draft_tokens=8,
                               drafter=TokenRecyclingDrafter(from_prompt=from_prompt))
        assert out.token_ids == reference


def brute_streaks(M, steps, tree, B, chained=None):
    """The streak by hand: per step, the root's old top-1 against the target's choice after the root,
    then the top-1 spine's nodes within the draft against the target's choice after their parents.
    chained[s][b]: that step's draft of request b was a chain, every node on its spine."""
    M = [row[:] for row in M]
    streak = [0] * B
    for s, (tokens, logits, num_nodes) in enumerate(steps):
        top1 = logits.argmax(-1).tolist()
        for b in range(B):
            toks, n = tokens[b].tolist(), int(num_nodes[b])
            checks = [M[toks[0]][0] == top1[b][0]]
            if chained is not None and chained[s][b]:
                checks += [toks[i + 1] == top1[b][i] for i in range(1, n - 1)]
                streak[b] = streak[b] + len(checks) if all(checks) else 0
                continue
            spine = {-1}
            for i, (parent, rank) in enumerate(tree[: n - 1]):
                if rank == 0 and parent in spine:
                    spine.add(i)
                    if parent >= 0:  # the spine's first node is the root's old top-1, checked above
                        checks.append(toks[i + 1] == top1[b][parent + 1])
            streak[b] = streak[b] + len(checks) if all(checks) else 0
        for b in range(B):  # then the step's writes, as observe makes them
            for j in range(int(num_nodes[b])):
                M[tokens[b, j].item()] = logits[b, j].topk(len(M[0])).indices.tolist()
    return streak


@pytest.mark.parametrize("seed", range(4))
def test_streak_counts_the_tokens_the_old_matrix_had_right(seed):
    """Random trees whose nodes mostly follow the matrix's own top-1 and logits that mostly agree with
    it (so streaks grow and break), against the streak computed by hand after every step."""
    V, B, top_k = 12, 3, 3
    g = torch.Generator().manual_seed(seed)
    tree = default_tree(7, top_k)
    d = TokenRecyclingDrafter(top_k=top_k, tree=tree, from_prompt=False)
    d.prepare(V, "cpu")
    d.start(torch.zeros(B, 4, dtype=torch.int64), torch.full((B,), 4))
    cold, steps, seen = d.M.tolist(), [], set()
    for step in range(12):
        N = 1 if step % 3 == 0 else 1 + len(tree)
        root = torch.randint(0, V, (B,), generator=g)
        tokens = torch.zeros(B, N, dtype=torch.int64)
        tokens[:, 0] = root
        for i, (parent, rank) in enumerate(tree[: N - 1]):  # the draft as propose would read it
            tokens[:, i + 1] = d.M[tokens[:, parent + 1], rank]
        num_nodes = torch.randint(1, N + 1, (B,), generator=g)
        logits = torch.randn(B, N, V, generator=g)
        follow = torch.rand(B, N, generator=g) < 0.8  # the target mostly picks the old top-1
        old_top1 = d.M[tokens, 0]
        logits[follow] += 10 * torch.nn.functional.one_hot(old_top1[follow], V).float()
        steps.append((tokens, logits, num_nodes))
        d.observe(tokens, logits, num_nodes)
        assert d._streak.tolist() == brute_streaks(cold, steps, tree, B), step
        seen.update(d._streak.tolist())
    assert max(seen) > 2 and 0 in seen  # streaks grew and broke


def test_streak_follows_its_request_and_is_the_drafts_match_len():
    d = TokenRecyclingDrafter(top_k=2, from_prompt=False)
    d.prepare(10, "cpu")
    history = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    d.start(history, torch.tensor([3, 3, 3]))
    d._streak = torch.tensor([5, 0, 2])
    d.retain(torch.tensor([2, 0]))
    assert d._streak.tolist() == [2, 5]
    d.observe(history[[2, 0], 2:], torch.randn(2, 1, 10), torch.tensor([1, 1]))  # warms the roots' rows
    draft = d.propose(history[[2, 0]], torch.tensor([3, 3]), 4)
    assert torch.equal(draft.match_len, d._streak)


def brute_chain(M, root, K):
    tokens = [root]
    for _ in range(K):
        tokens.append(M[tokens[-1]][0])
    return tokens[1:]


@pytest.mark.parametrize("max_nodes", [1, 5, 16])
def test_a_long_streak_drafts_the_top1_chain(max_nodes):
    """Requests whose streak reached chain_streak draft root -> M[root, 0] -> ...; the others the
    template's prefix, in the same batch."""
    V, k, T = 37, 4, 9
    d = TokenRecyclingDrafter(top_k=k, chain_streak=3, from_prompt=False)
    d.prepare(V, "cpu")
    g = random.Random(max_nodes)
    d.M.copy_(torch.tensor([[g.randrange(V) for _ in range(k)] for _ in range(V)]))
    d._warm.fill_(True)
    history = torch.tensor([[g.randrange(V) for _ in range(T)] for _ in range(4)])
    lens = torch.full((4,), T)
    d.start(history, lens)
    d._streak = torch.tensor([0, 2, 3, 9])
    draft = d.propose(history, lens, max_nodes)
    K, M = min(max_nodes, len(d.tree)), d.M.tolist()
    assert_valid_tree(draft.parents, draft.count)
    assert torch.equal(draft.match_len, d._streak)
    for b, chained in enumerate([False, False, True, True]):
        root = history[b, -1].item()
        if chained:
            assert draft.tokens[b].tolist() == brute_chain(M, root, K), b
            assert draft.parents[b].tolist() == list(range(-1, K - 1)), b
        else:
            assert draft.tokens[b].tolist() == brute_tree(M, root, d.tree[:K]), b
            assert draft.parents[b].tolist() == [p for p, _ in d.tree[:K]], b
    off = TokenRecyclingDrafter(top_k=k, chain_streak=None, from_prompt=False)
    off.prepare(V, "cpu")
    off.M.copy_(d.M)
    off._warm.fill_(True)
    off.start(history, lens)
    off._streak = torch.tensor([0, 2, 3, 9])
    assert torch.equal(off.propose(history, lens, max_nodes).parents, torch.tensor([p for p, _ in d.tree[:K]]).expand(4, K))


@pytest.mark.parametrize("seed", range(4))
def test_streak_runs_along_a_chain(seed):
    """Proposals from the drafter itself (chains where the streak is long, the template elsewhere),
    logits that mostly agree with the old top-1: the streak after every step against the hand count."""
    V, B, top_k, K = 12, 3, 3, 6
    g = torch.Generator().manual_seed(seed)
    tree = default_tree(7, top_k)
    d = TokenRecyclingDrafter(top_k=top_k, tree=tree, from_prompt=False, chain_streak=2)
    d.prepare(V, "cpu")
    d._warm.fill_(True)
    d.start(torch.zeros(B, 4, dtype=torch.int64), torch.full((B,), 4))
    cold, steps, chained, seen = d.M.tolist(), [], [], set()
    for step in range(14):
        history = torch.randint(0, V, (B, 3), generator=g)
        chained.append((d._streak >= 2).tolist())
        draft = d.propose(history, torch.full((B,), 3), K)
        tokens = torch.cat([history[:, -1:], draft.tokens], dim=1)
        num_nodes = torch.randint(1, K + 2, (B,), generator=g)
        logits = torch.randn(B, K + 1, V, generator=g)
        follow = torch.rand(B, K + 1, generator=g) < 0.85
        old_top1 = d.M[tokens, 0]
        logits[follow] += 10 * torch.nn.functional.one_hot(old_top1[follow], V).float()
        steps.append((tokens, logits, num_nodes))
        d.observe(tokens, logits, num_nodes)
        assert d._streak.tolist() == brute_streaks(cold, steps, tree, B, chained), step
        seen.update(d._streak.tolist())
    assert any(any(c) for c in chained) and max(seen) > K  # chains were drafted and went deep


def test_lossless_with_chains(model, reference):
    for chain_streak in (0, 2):
        drafter = TokenRecyclingDrafter(chain_streak=chain_streak)
        out = specdec.generate(model, PROMPTS, max_new_tokens=24, num_draft_tokens=8, drafter=drafter)
        assert out.token_ids == reference


# --- Best-first trees (shape="best_first") -----------------------------------------------------------


def brute_best_first(M, logp, root, K):
    """One request's tree the slow way: a list of offered candidates (score, order offered, token,
    parent); K times take the best (ties to the one offered first) and offer its row. float32 sums,
    as the drafter adds. Returns tokens, parents and scores of the nodes taken before only -inf
    candidates were left."""
    offered = [(np.float32(logp[root][r]), r, M[root][r], -1) for r in range(len(M[root]))]
    nodes = []
    for i in range(K):
        best = max((c for c in offered if c is not None), key=lambda c: (c[0], -c[1]), default=None)
        if best is None or best[0] == -np.inf:
            break
        offered[best[1]] = None
        nodes.append((best[2], best[3], float(best[0])))
        base = len(offered)
        offered += [(np.float32(best[0] + np.float32(lp)), base + r, t, i)
                    for r, (t, lp) in enumerate(zip(M[best[2]], logp[best[2]]))]
    return nodes


def random_records(d, V, k, seed, cold=0.2):
    """Rows of distinct candidates with recorded log-probabilities; a share of rows never written."""
    g = torch.Generator().manual_seed(seed)
    d.M.copy_(torch.stack([torch.randperm(V, generator=g)[:k] for _ in range(V)]))
    logp = torch.rand(V, k, generator=g).log()
    logp[torch.rand(V, generator=g) < cold] = -math.inf
    d._logp[:V] = logp
    d._warm[:V] = logp[:, 0] > -math.inf


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("K", [1, 6, 16])
def test_best_first_trees_match_a_brute_force(seed, K):
    V, k, B, T = 23, 3, 6, 9
    d = TokenRecyclingDrafter(top_k=k, shape="best_first", from_prompt=False)
    d.prepare(V, "cpu")
    random_records(d, V, k, seed)
    g = random.Random(seed)
    lens = torch.tensor([g.randint(1, T) for _ in range(B)])
    history = torch.tensor([[g.randrange(V) for _ in range(T)] for _ in range(B)])
    draft = d.propose(history, lens, K)
    assert draft.tokens.shape == draft.parents.shape == (B, K)
    assert_valid_tree(draft.parents, torch.full((B,), K))  # padding nodes too hang below earlier ones
    M, logp = d.M.tolist(), d._logp.tolist()
    for b in range(B):
        want = brute_best_first(M, logp, history[b, lens[b] - 1].item(), K)
        n = draft.count[b].item()
        assert n == len(want), b
        assert draft.tokens[b, :n].tolist() == [t for t, _, _ in want]
        assert draft.parents[b, :n].tolist() == [p for _, p, _ in want]
        siblings = {}
        for t, p in zip(draft.tokens[b, :n].tolist(), draft.parents[b, :n].tolist()):
            assert t not in siblings.setdefault(p, set())  # distinct candidates per row: distinct siblings
            siblings[p].add(t)
        expect_bucket = confidence_bucket(torch.tensor([sum(math.exp(s) for _, _, s in want)]))
        assert draft.match_len[b].item() == expect_bucket.item()


def test_best_first_goes_deep_where_the_records_are_sure():
    """A row chain recorded at probability ~1 is drafted as a chain; uncertain rows spread wide."""
    V, k = 12, 3
    d = TokenRecyclingDrafter(top_k=k, shape="best_first", from_prompt=False)
    d.prepare(V, "cpu")
    for t in range(V):
        d.M[t] = torch.tensor([(t + 1) % V, (t + 5) % V, (t + 7) % V])
    d._logp[:6] = torch.tensor([0.999, 0.0005, 0.0005]).log()
    d._logp[6:V] = torch.tensor([1 / 3] * 3).log()  # tokens 6..11: no idea what follows
    d._warm[:] = True
    draft = d.propose(torch.tensor([[0], [6]]), torch.tensor([1, 1]), 5)
    assert draft.tokens[0].tolist() == [1, 2, 3, 4, 5] and draft.parents[0].tolist() == [-1, 0, 1, 2, 3]
    assert draft.parents[1].tolist()[:3] == [-1, -1, -1]  # the root's three candidates first
    assert draft.match_len[0] > draft.match_len[1]


def test_best_first_records_the_targets_probabilities():
    V, k, B, N = 40, 4, 2, 3
    d = TokenRecyclingDrafter(top_k=k, shape="best_first")
    d.prepare(V, "cpu")
    tokens = torch.tensor([[1, 2, 3], [4, 5, 6]])
    logits = torch.randn(B, N, V, generator=torch.Generator().manual_seed(2)) * 3
    d.observe(tokens, logits, torch.tensor([3, 1]))
    for b, n in [(0, 0), (0, 1), (0, 2), (1, 0)]:
        want = logits[b, n].log_softmax(-1).topk(k)
        assert d.M[tokens[b, n]].tolist() == want.indices.tolist()
        assert torch.allclose(d._logp[tokens[b, n]], want.values, atol=1e-5)
    assert (d._logp[5] == -math.inf).all() and (d._logp[6] == -math.inf).all()  # padding: not written


def test_best_first_prompt_and_corpus_records():
    V, k = 12, 3
    corpus = Corpus([[2, 7, 2, 7, 2, 9, 2, 8]], V)  # after 2: 7 twice, 9 once, 8 once
    d = TokenRecyclingDrafter(top_k=k, shape="best_first", corpus=corpus, prompt_confidence=0.25)
    d.prepare(V, "cpu")
    assert d.M[2].tolist() == [7, 8, 9]
    assert d._logp[2].exp().tolist() == pytest.approx([0.5, 0.25, 0.25])
    d.start(torch.tensor([[3, 9, 2, 5]]), torch.tensor([4]))  # prompt successors: 3 -> 9, 9 -> 2, 2 -> 5
    assert d.M[2].tolist() == [5, 7, 8]  # 5 to the front, the others move down with their records
    assert d._logp[2].exp().tolist() == pytest.approx([0.25, 0.5, 0.25])
    assert d.M[3, 0].item() == 9 and d._logp[3, 0].exp().item() == pytest.approx(0.25)


def test_best_first_options():
    with pytest.raises(ValueError, match="shape"):
        TokenRecyclingDrafter(shape="widest")
    with pytest.raises(ValueError, match="template"):
        TokenRecyclingDrafter(shape="best_first", tree=[(-1, 0)])
    for bad in (0, 1.5, -0.1, True, "0.5"):
        with pytest.raises(ValueError, match="prompt_confidence"):
            TokenRecyclingDrafter(prompt_confidence=bad)


@pytest.mark.parametrize("num_draft_tokens", [1, 8, "auto"])
def test_best_first_is_lossless(model, reference, num_draft_tokens):
    drafter = TokenRecyclingDrafter(shape="best_first")
    for _ in range(2):  # cold, then from what the first call learned
        out = specdec.generate(model, PROMPTS, max_new_tokens=24, drafter=drafter, num_draft_tokens=num_draft_tokens)
        assert out.token_ids == reference
    if num_draft_tokens == 8:
        assert out.stats["mean_accepted_tokens"] > 1.5
