"""The speculative engine: lossless greedy for adversarial drafters, exact sampling, edge cases."""

import itertools

import pytest
import torch

import specdec
import specdec.engine as engine
from specdec.generate import make_controller
from drafters import REGISTRY, Drafter, DraftTree
from kernels.verify import VerifyResult
from tiny_models import tiny_model

VOCAB = 64
PROMPTS = [[5, 9, 11], [7] * 9, [3], [12, 40, 33, 8, 19], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]]


@pytest.fixture(scope="module")
def model():
    return tiny_model(vocab=VOCAB, hidden=32, layers=2, heads=4, kv_heads=2, ffn=48, seed=3)


@pytest.fixture(scope="module")
def reference(model):
    return specdec.generate(model, PROMPTS, max_new_tokens=24).token_ids


class Oracle(Drafter):
    """Knows the AR output; drafts it (right=True) or a token surely different from it."""

    def __init__(self, prompts, outputs, right=True, branches=1):
        self.seqs = [p + o for p, o in zip(prompts, outputs)]
        self.right, self.branches = right, branches

    def start(self, history, lens):
        self.rows = list(range(history.shape[0]))

    def retain(self, index):
        self.rows = [self.rows[i] for i in index.tolist()]

    def propose(self, history, lens, max_nodes):
        B = history.shape[0]
        tokens = torch.zeros(B, max_nodes, dtype=torch.long)
        for b, (r, n) in enumerate(zip(self.rows, lens.tolist())):
            truth = self.seqs[r][n : n + max_nodes]
            truth = truth + [0] * (max_nodes - len(truth))
            tokens[b] = torch.tensor(truth) if self.right else (torch.tensor(truth) + 1) % VOCAB
        tree = DraftTree.chains(tokens, torch.full((B,), max_nodes))
        if self.branches > 1:  # wrong siblings of the root first, then the right chain
            m = min(self.branches - 1, max_nodes - 1)
            wrong = (tokens[:, :1] + 1 + torch.arange(m)) % VOCAB  # (B, m), never the right token
            chain = tokens[:, : max_nodes - m]
            parents = [-1] * m + [-1] + [m + i for i in range(chain.shape[1] - 1)]
            tree = DraftTree(torch.cat([wrong, chain], 1), torch.tensor(parents).expand(B, -1),
                             torch.full((B,), max_nodes))
        return tree


class RandomTrees(Drafter):
    def __init__(self, seed=0, vocab=VOCAB):
        self.g, self.vocab = torch.Generator().manual_seed(seed), vocab

    def propose(self, history, lens, max_nodes):
        B, K = history.shape[0], max_nodes
        tokens = torch.randint(0, self.vocab, (B, K), generator=self.g)
        # parent of node k: uniform in [-1, k)
        parents = (torch.rand(B, K, generator=self.g) * (torch.arange(K) + 1)).long() - 1
        count = torch.randint(0, K + 1, (B,), generator=self.g)
        return DraftTree(tokens, parents, count)


class EveryOtherStep(Drafter):
    """Wraps a drafter and proposes nothing on odd steps (the engine's plain decode steps)."""

    def __init__(self, inner):
        self.inner, self.steps = inner, 0

    def start(self, history, lens):
        self.inner.start(history, lens)

    def retain(self, index):
        self.inner.retain(index)

    def propose(self, history, lens, max_nodes):
        self.steps += 1
        if self.steps % 2 == 0:
            return DraftTree.empty(history.shape[0], history.device)
        return self.inner.propose(history, lens, max_nodes)


def drafters_under_test(reference):
    return {
        "no-drafts": Drafter(),
        "always-right": Oracle(PROMPTS, reference, right=True),
        "always-wrong": Oracle(PROMPTS, reference, right=False),
        "right-after-wrong-siblings": Oracle(PROMPTS, reference, right=True, branches=3),
        "random-trees": RandomTrees(),
        "right-every-other-step": EveryOtherStep(Oracle(PROMPTS, reference)),
        "ngram": "ngram",
    }


@pytest.mark.parametrize("name", ["no-drafts", "always-right", "always-wrong", "right-after-wrong-siblings",
                                  "random-trees", "right-every-other-step", "ngram"])
@pytest.mark.parametrize("k", [1, 5])
def test_greedy_is_lossless(model, reference, name, k):
    drafter = drafters_under_test(reference)[name]
    out = specdec.generate(model, PROMPTS, max_new_tokens=24, drafter=drafter, num_draft_tokens=k)
    assert out.token_ids == reference
    if name == "always-right":  # every draft accepted: k + 1 tokens per step until the budget runs out
        assert out.stats["mean_accepted_tokens"] > k
    if name == "always-wrong":
        assert out.stats["accepted_length_histogram"] == {0: out.stats["accepted_length_histogram"][0]}


def test_a_step_without_drafts_is_a_plain_decode_step(model, reference, monkeypatch):
    """Where no request has a draft, the engine takes the model's causal decode path (no tree, no
    positions) and samples without the verification kernel; drafted steps verify trees."""
    forwards, verified = [], []
    forward, verify = type(model.net).forward, engine.verify

    def spy_forward(net, tokens, cache, **kwargs):
        forwards.append((tokens.shape[1], kwargs.get("tree") is None and kwargs.get("positions") is None))
        return forward(net, tokens, cache, **kwargs)

    def spy_verify(logits, *args, **kwargs):
        verified.append(logits.shape[1])
        return verify(logits, *args, **kwargs)

    monkeypatch.setattr(type(model.net), "forward", spy_forward)
    monkeypatch.setattr(engine, "verify", spy_verify)
    drafter = EveryOtherStep(Oracle(PROMPTS[:1], reference[:1]))
    out = specdec.generate(model, PROMPTS[:1], max_new_tokens=24, drafter=drafter, num_draft_tokens=3)
    assert out.token_ids == reference[:1]
    steps = forwards[1:]  # after the prefill
    assert steps[0] == (4, False) and steps[1] == (1, True)  # drafted (root + 3), then plain
    assert all(plain == (width == 1) for width, plain in steps)
    assert len(verified) == sum(width > 1 for width, _ in steps) == (len(steps) + 1) // 2


def test_batch_of_mixed_prompts_equals_each_alone(model):
    batch = specdec.generate(model, PROMPTS, max_new_tokens=16, drafter=RandomTrees(1), num_draft_tokens=4)
    for p, ids in zip(PROMPTS, batch.token_ids):
        alone = specdec.generate(model, p, max_new_tokens=16, drafter=RandomTrees(2), num_draft_tokens=4)
        assert alone.token_ids[0] == ids


def test_eos_inside_an_accepted_run_stops_there(model, reference):
    ids = reference[3]
    eos = model.config.eos_token_ids
    model.config.eos_token_ids = (ids[6],)  # an EOS in the middle of a run the oracle drafts
    try:
        out = specdec.generate(model, PROMPTS[3], max_new_tokens=24,
                               drafter=Oracle([PROMPTS[3]], [ids]), num_draft_tokens=8).token_ids[0]
    finally:
        model.config.eos_token_ids = eos
    assert out == ids[: ids.index(ids[6]) + 1]


class Mirror(Drafter):
    """Wraps a drafter and keeps its own copy of every request's tokens from `start` and `update`
    alone, checked against the engine's history whenever the drafter is asked for a draft."""

    def __init__(self, inner):
        self.inner, self.updates, self.proposals = inner, 0, 0

    def start(self, history, lens):
        self.rows = [history[b, :n].tolist() for b, n in enumerate(lens.tolist())]
        self.ids, self.finished = list(range(len(self.rows))), {}
        self.inner.start(history, lens)

    def update(self, history, lens, accepted):
        self.updates += 1
        for row, b, a, n in zip(self.rows, range(len(self.rows)), accepted.tolist(), lens.tolist()):
            row.extend(history[b, n - a : n].tolist())
        self.inner.update(history, lens, accepted)

    def retain(self, index):
        keep = index.tolist()
        for i in set(range(len(self.rows))) - set(keep):  # leavers: their last update came first
            self.finished[self.ids[i]] = self.rows[i]
        self.rows, self.ids = [self.rows[i] for i in keep], [self.ids[i] for i in keep]
        self.inner.retain(index)

    def finish(self):
        self.finished.update(zip(self.ids, self.rows))

    def propose(self, history, lens, max_nodes):
        self.proposals += 1
        assert self.rows == [history[b, :n].tolist() for b, n in enumerate(lens.tolist())]
        return self.inner.propose(history, lens, max_nodes)


@pytest.mark.parametrize("asked", ["every step", "every fourth step"])
def test_drafters_see_every_committed_token_once(model, reference, asked):
    """Steps without a draft are shown to the drafter together, before its next propose, retain
    or finish: what it has seen then is the whole history, and a finished request's whole text."""
    eos = model.config.eos_token_ids
    model.config.eos_token_ids = (reference[3][6],)  # requests finish at different steps
    try:
        expected = specdec.generate(model, PROMPTS, max_new_tokens=24).token_ids
        mirror = Mirror(EveryOtherStep(Oracle(PROMPTS, reference)))
        if asked == "every step":
            out = specdec.generate(model, PROMPTS, max_new_tokens=24, drafter=mirror, num_draft_tokens=2)
        else:  # "auto" with a controller that lets the drafter be asked one step in four
            controller, calls = make_controller(model, "auto", mirror), itertools.count()
            controller.worth_drafting = lambda batch_size, remaining=None: next(calls) % 4 == 0
            out = specdec.generate(model, PROMPTS, max_new_tokens=24, drafter=mirror, num_draft_tokens="auto")
    finally:
        model.config.eos_token_ids = eos
    assert out.token_ids == expected
    assert any(len(e) < 24 for e in expected)  # some left the batch early
    assert mirror.finished == {b: p + o for b, (p, o) in enumerate(zip(PROMPTS, expected))}
    steps = out.stats["verify_steps"]
    if asked == "every step":
        assert mirror.proposals == steps
    else:  # runs of steps without a draft were shown in one update each
        assert mirror.proposals == (steps + 3) // 4 and mirror.updates < steps


@pytest.mark.parametrize("max_new", [1, 2, 7])
def test_never_more_than_max_new_tokens(model, reference, max_new):
    out = specdec.generate(model, PROMPTS, max_new_tokens=max_new, drafter=Oracle(PROMPTS, reference),
                           num_draft_tokens=5)
    assert out.token_ids == [r[:max_new] for r in reference]


def test_stats(model, reference):
    s = specdec.generate(model, PROMPTS, max_new_tokens=24, drafter=Oracle(PROMPTS, reference),
                         num_draft_tokens=3).stats
    assert s["tokens"] == sum(len(r) for r in reference)
    assert s["mean_accepted_tokens"] == pytest.approx(4.0, abs=0.5)
    assert set(s["time_split"]) == {"draft", "verify", "bookkeeping"}


def test_stream_yields_the_same_text(model, reference):
    class Tok:  # decode ids as space-separated numbers
        eos_token_id = None

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    model.tokenizer = Tok()
    try:
        pieces = list(specdec.stream(model, [PROMPTS[0]], max_new_tokens=24, drafter=Oracle([PROMPTS[0]], reference[:1]),
                                      num_draft_tokens=4))
    finally:
        model.tokenizer = None
    assert "".join(pieces) == " ".join(map(str, reference[0]))
    assert len(pieces) > 1


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(drafter="nope"), ValueError, "unknown drafter"),
    (dict(drafter="ngram", num_draft_tokens=-1), ValueError, "num_draft_tokens"),
    (dict(drafter="ngram", num_draft_tokens=2.5), ValueError, "num_draft_tokens"),
    (dict(drafter="none", max_ngram=3), TypeError, "unexpected options"),
], ids=["unknown-drafter", "negative-draft-size", "fractional-draft-size", "options-for-none"])
def test_bad_input(model, kwargs, error, match):
    with pytest.raises(error, match=match):
        specdec.generate(model, PROMPTS[0], max_new_tokens=4, **kwargs)


def test_make_drafter_says_none_is_not_a_drafter():
    from drafters import make_drafter

    with pytest.raises(ValueError, match="plain autoregressive decoding"):
        make_drafter("none")


# --- The sampled distribution -------------------------------------------------------------------------
#
# A tiny model with V = 8: the exact joint law of the first three generated tokens is computed by
# enumeration (V^2 forwards), then T requests are decoded with speculation (random-tree drafts, so
# acceptance, rejection and residual sampling all happen) and a G-test compares the counts. Cells with
# an expected count below 5 are pooled. Power: with T = 20000 and ~100 pooled cells, the negative
# control below (drafts accepted without verification) shifts the law by a total-variation distance of
# ~0.4 and is rejected at p < 1e-30; a shift of 0.05 TV would already be rejected at p < 1e-4.

SMALL_V = 8


@pytest.fixture(scope="module")
def small():
    m = tiny_model(vocab=SMALL_V, hidden=32, layers=2, heads=4, kv_heads=2, ffn=48, seed=11)
    m.config.eos_token_ids = ()  # every request generates exactly three tokens
    return m


def exact_joint(model, prompt, temperature):
    net = model.net
    V = SMALL_V

    def probs(seqs):
        x = torch.tensor(seqs)
        logits = net(x, net.new_cache(len(seqs), x.shape[1]))[:, -1]
        return torch.softmax(logits / temperature, -1).double()

    p1 = probs([prompt])[0]  # (V,)
    p2 = probs([prompt + [a] for a in range(V)])  # (V, V)
    p3 = probs([prompt + [a, b] for a in range(V) for b in range(V)]).view(V, V, V)
    return p1.view(V, 1, 1) * p2.view(V, V, 1) * p3


def g_test(counts, expected):
    small_cells = expected < 5
    obs = torch.cat([counts[~small_cells], counts[small_cells].sum().view(1)])
    exp = torch.cat([expected[~small_cells], expected[small_cells].sum().view(1)])
    g = 2 * (obs * torch.log(torch.where(obs > 0, obs / exp, 1.0))).sum()
    dof = obs.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0), g / 2))


def sampled_counts(model, prompt, trials, drafter, temperature):
    out = specdec.generate(model, [prompt] * trials, max_new_tokens=3, drafter=drafter, num_draft_tokens=4,
                           temperature=temperature, seed=1234)
    seqs = torch.tensor(out.token_ids)
    code = seqs[:, 0] * SMALL_V**2 + seqs[:, 1] * SMALL_V + seqs[:, 2]
    return torch.bincount(code, minlength=SMALL_V**3).double()


@pytest.mark.parametrize("plain_steps", [False, True], ids=["drafts-every-step", "plain-every-other-step"])
def test_sampling_distribution_equals_the_target(small, plain_steps):
    prompt, T, temp = [1, 5, 3], 20000, 1.3
    expected = exact_joint(small, prompt, temp).flatten() * T
    drafter = RandomTrees(5, vocab=SMALL_V)
    drafter = EveryOtherStep(drafter) if plain_steps else drafter
    p = g_test(sampled_counts(small, prompt, T, drafter, temp), expected)
    print(f"G-test p = {p:.3g}")
    assert p > 1e-4, p


def sampled_with(small, drafter, T=20000, temp=1.3):
    """(counts, expected, accepting) for T requests decoded with `drafter` from a prompt that holds the
    model's own greedy continuation twice: every retrieval drafter finds matches to draft from, right
    often enough to matter. accepting: the share of request-steps that accepted a drafted token."""
    greedy = specdec.generate(small, [[1, 5, 3]], max_new_tokens=8).token_ids[0]
    prompt = [1, 5, 3] + greedy + [1, 5, 3] + greedy[:4]
    out = specdec.generate(small, [prompt] * T, max_new_tokens=3, drafter=drafter, num_draft_tokens=4,
                           temperature=temp, seed=1234)
    seqs = torch.tensor(out.token_ids)
    counts = torch.bincount(seqs[:, 0] * SMALL_V**2 + seqs[:, 1] * SMALL_V + seqs[:, 2], minlength=SMALL_V**3)
    hist = out.stats["accepted_length_histogram"]
    accepting = sum(n for a, n in hist.items() if a > 0) / sum(hist.values())
    return counts.double(), exact_joint(small, prompt, temp).flatten() * T, accepting


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_registered_drafter_samples_the_target_distribution(small, name):
    """The same G-test (same power) with each real drafter. At least 5% of request-steps accept a
    drafted token (9-16% here); the rest reject theirs or draft nothing, so acceptance, rejection and
    the residual all occur."""
    counts, expected, accepting = sampled_with(small, name)
    p = g_test(counts, expected)
    print(f"{name}: G-test p = {p:.3g}, request-steps accepting a draft {accepting:.3f}")
    assert accepting > 0.05
    assert p > 1e-4, p


def trusting(verify_real):
    """A verification that accepts every chain draft whole, unchecked (trees are verified as usual)."""

    def trust_the_drafter(logits, tokens, parents, num_nodes, *args, **kwargs):
        right = verify_real(logits, tokens, parents, num_nodes, *args, **kwargs)
        B, N = tokens.shape
        chain = (parents == torch.arange(-1, N - 1)).all(dim=1) & (num_nodes > 1)
        n = torch.where(chain, num_nodes - 1, 0)
        j = torch.arange(N).view(1, -1)
        nodes = torch.where(j < n.view(-1, 1), j + 1, -1)
        toks = torch.where(nodes >= 0, tokens.gather(1, nodes.clamp(min=0)), -1)
        return VerifyResult(torch.where(chain.view(-1, 1), nodes, right.accept_nodes),
                            torch.where(chain.view(-1, 1), toks, right.accept_tokens),
                            torch.where(chain, n, right.accept_len), right.next_token)

    return trust_the_drafter


def test_negative_control_a_real_drafter_trusted_is_detected(small, monkeypatch):
    """The per-drafter test above, with ngram's chains accepted unchecked: it must fail."""
    monkeypatch.setattr(engine, "verify", trusting(engine.verify))
    p = g_test(*sampled_with(small, "ngram")[:2])
    print(f"negative control (ngram trusted) G-test p = {p:.3g}")
    assert p < 1e-4, p


def test_negative_control_wrong_acceptance_is_detected(small, monkeypatch):
    """Accepting every draft without verification must fail the same test."""
    monkeypatch.setattr(engine, "verify", trusting(engine.verify))
    prompt, T, temp = [1, 5, 3], 20000, 1.3
    expected = exact_joint(small, prompt, temp).flatten() * T

    class Chains(RandomTrees):
        def propose(self, history, lens, max_nodes):
            t = super().propose(history, lens, max_nodes)
            return DraftTree.chains(t.tokens, t.count)

    p = g_test(sampled_counts(small, prompt, T, Chains(6, vocab=SMALL_V), temp), expected)
    print(f"negative control G-test p = {p:.3g}")
    assert p < 1e-4, p


# Shadow looks: a draft scored against the plain steps after it instead of verified.


def path_to(parents, k):
    """Node k's path from the root's child down: node path[i] sits at depth i + 1."""
    nodes = []
    while k >= 0:
        nodes.append(k)
        k = parents[k]
    return nodes[::-1]


def brute_force_verdict(parents, tokens, count, start, seq, made):
    """Node k of one request's draft: on the target's path iff it and every ancestor equal the
    target's token at its depth; known iff it lies within the `made` tokens produced, or an ancestor
    there missed. Returns (on_path list, leading known nodes)."""
    on, known = [], []
    for k in range(len(tokens)):
        if k >= count:
            on.append(False), known.append(True)
            continue
        p = path_to(parents, k)
        hits = [i < made and tokens[n] == seq[start + i] for i, n in enumerate(p)]
        on.append(len(p) <= made and all(hits))
        known.append(len(p) <= made or any(i < made and not h for i, h in enumerate(hits)))
    lead = 0
    while lead < len(known) and known[lead]:
        lead += 1
    return on, min(lead, count)


@pytest.mark.parametrize("made", [0, 1, 3, 9])
def test_shadow_verdict_is_verifications_on_the_tokens_that_came(made):
    """Random trees over a 5-token alphabet, half their tokens the right ones for some depth: every
    node's verdict and the leading run of known verdicts equal a brute force over each node's path.
    Negative control: a verdict that checks each node's own token alone (not its ancestors')
    disagrees with the brute force here."""
    g = torch.Generator().manual_seed(made)
    B, K, T = 6, 9, 40
    history = torch.randint(0, 5, (B, T), generator=g)
    start = torch.randint(1, 20, (B,), generator=g)
    lens = start + made
    parents = (torch.rand(B, K, generator=g) * (torch.arange(K) + 1)).long() - 1
    right = history.gather(1, (start.view(B, 1) + torch.randint(0, 4, (B, K), generator=g)).clamp(max=T - 1))
    tokens = torch.where(torch.rand(B, K, generator=g) < 0.5, right, torch.randint(0, 5, (B, K), generator=g))
    count = torch.randint(0, K + 1, (B,), generator=g)
    count[0] = K
    draft = DraftTree(tokens, parents, count)
    on_path, known = engine.shadow_verdict(draft, start, history, lens)
    own_token_only_differs = False
    for b in range(B):
        par, tok, seq, s0 = parents[b].tolist(), tokens[b].tolist(), history[b].tolist(), int(start[b])
        expect_on, expect_known = brute_force_verdict(par, tok, int(count[b]), s0, seq, made)
        assert on_path[b].tolist() == expect_on, b
        assert int(known[b]) == expect_known, b
        for k in range(int(count[b])):
            d = len(path_to(par, k))
            own = d <= made and tok[k] == seq[s0 + d - 1]
            own_token_only_differs |= own != expect_on[k]
    assert own_token_only_differs == (made >= 3)
    assert engine.draft_depth(draft, engine.draft_ancestors(draft)) == max(len(path_to(parents[b].tolist(), k))
                                            for b in range(B) for k in range(int(count[b])))


def test_a_shadow_looks_at_its_verdicts_after_1_2_4_steps_and_at_its_depth():
    shadow = engine.Shadow(DraftTree.empty(1, "cpu"), torch.zeros(1), {}, 0.0, None, depth=10)
    assert [step for step in range(1, 11) if shadow.due()] == [1, 2, 4, 8, 10]
    assert engine.Shadow(DraftTree.empty(1, "cpu"), torch.zeros(1), {}, 0.0, None, depth=0).due()


@pytest.mark.parametrize("right", [True, False])
def test_shadow_looks_score_drafts_as_verification_would_and_stay_lossless(model, reference, monkeypatch, right):
    """"auto" with a drafter that never pays has every look taken as a shadow look: nothing is
    verified (every step a plain one), the output is AR's, and each look's verdicts equal a brute
    force over the target's real continuation of that request."""
    seqs = {p[0]: p + o for p, o in zip(PROMPTS, reference)}  # prompts differ in their first token
    drafter = Oracle(PROMPTS, reference, right=right, branches=3)
    controller = make_controller(model, "auto", drafter)
    monkeypatch.setattr(controller, "proposals_pay", lambda batch_size: False)
    monkeypatch.setattr(controller, "look_interval", lambda batch_size: 1)
    seen = []
    real = engine.shadow_verdict

    def spy(draft, start, history, lens, anc=None):
        out = real(draft, start, history, lens, anc)
        seen.append((draft, start.clone(), history[:, 0].clone(), (lens - start).clone(), out))
        return out

    monkeypatch.setattr(engine, "shadow_verdict", spy)
    out = specdec.generate(model, PROMPTS, max_new_tokens=24, drafter=drafter, num_draft_tokens="auto")
    assert out.token_ids == reference
    assert set(out.stats["accepted_length_histogram"]) == {0}  # no step verified a draft
    assert out.stats["shadow_looks"] >= 2
    accepted = 0
    for draft, start, first, made, (on_path, known) in seen:
        for b in range(draft.tokens.shape[0]):
            expect_on, expect_known = brute_force_verdict(
                draft.parents[b].tolist(), draft.tokens[b].tolist(), int(draft.count[b]), int(start[b]),
                seqs[int(first[b])] + [-1] * 64, int(made[b]))
            assert on_path[b].tolist() == expect_on and int(known[b]) == expect_known
            accepted += sum(expect_on)
    assert (accepted > 0) == right


def test_a_drafter_that_would_pay_is_picked_up_by_a_shadow_look(model):
    """A ledger that says asking does not pay, and a drafter that is always right: the first shadow
    look finds every node accepted, the ledger turns, and real drafting resumes: steps verify drafts
    and accept them. Negative control: an always-wrong drafter is never verified."""
    from specdec.controller import Ledger

    reference = specdec.generate(model, PROMPTS, max_new_tokens=64).token_ids
    results = {}
    for right in (True, False):
        drafter = Oracle(PROMPTS, reference, right=right)
        controller = make_controller(model, "auto", drafter)
        for B in range(1, len(PROMPTS) + 1):  # 20 asks have each cost 30% of a plain step and saved nothing
            plain = float(controller.step_seconds(B, 0)[0])
            controller.ledger[B] = Ledger(saved=0.0, spent=20 * 0.3 * plain, asks=20.0, interval=2)
        out = specdec.generate(model, PROMPTS, max_new_tokens=64, drafter=drafter, num_draft_tokens="auto")
        assert out.token_ids == reference
        results[right] = set(out.stats["accepted_length_histogram"])  # accepted drafts per request-step
    assert max(results[True]) > 1 and results[False] == {0}
