"""Fused verification (kernels/verify.py): golden trees, exact and statistical losslessness, edges.

Distribution tests use a bigram "language": the target after the committed prefix is p0, after one
more token x it is p1[x], so the target at a child differs from its parent's. The first two emitted
tokens (accepted or drawn) must follow the joint p0(a) p1[a](b). Depth-2 trees give both in one
verify call whenever the first is accepted; when it is rejected the second is drawn from p1 directly.
"""

import itertools

import pytest
import torch

import kernels.verify
from kernels.sampling import filtered_probs, sample, sample_inverse_cdf, uniforms as counter_uniforms
from kernels.verify import _accept_prob, _after_reject, sample_tokens, verify, verify_reference, verify_triton

IMPLS = {"torch": verify_reference, "triton": verify_triton}
FIELDS = ("accept_nodes", "accept_tokens", "accept_len", "next_token")
ALPHA = 1e-4  # significance of every statistical test
MODES = {  # draft tokens are drawn by: (sampler, draft_probs given, siblings rule)
    "deterministic": ("arbitrary", False, "iid"),
    "iid_chain": ("with_replacement", True, "iid"),
    "iid_tree": ("with_replacement", True, "iid"),
    "without_replacement_tree": ("without_replacement", True, "without_replacement"),
}
CHAIN = [-1, 0, 1]
TREE = [-1, 0, 0, 0, 1, 1, 2, 3]  # three drafts after the root, then two, one and one
SMALL_TREE = [-1, 0, 0, 1, 2]  # two drafts after the root, one after each


@pytest.fixture(autouse=True)
def one_thread():
    # Many ops on small (B, 8) tensors: one intra-op thread is faster, and fair to tests running beside.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def assert_same(a, b):
    for f in FIELDS:
        assert torch.equal(getattr(a, f), getattr(b, f)), f


def g_test(counts, probs):
    """p-value of the G-test (likelihood ratio) of counts against probabilities over the same cells."""
    counts, probs = counts.double().flatten(), probs.double().flatten()
    if counts[probs <= 0].sum() > 0:  # an impossible outcome was seen
        return 0.0
    o, e = counts[probs > 0], probs[probs > 0] * counts.sum()
    g = 2 * torch.where(o > 0, o * torch.log(o / e), 0.0).sum()
    df = torch.tensor(float(len(o) - 1), dtype=torch.float64)
    return float(torch.special.gammaincc(df / 2, g / 2))


class Bigram:
    """Target and draft: p0/q0 after the prefix, p1[x]/q1[x] after one more token x."""

    def __init__(self, V, seed, sharp=1.5, temperature=1.0, top_k=0, top_p=1.0):
        g = torch.Generator().manual_seed(seed)
        self.V, self.t, self.k, self.p = V, temperature, top_k, top_p
        self.l0, self.l1 = torch.randn(V, generator=g) * sharp, torch.randn(V, V, generator=g) * sharp
        self.q0 = torch.softmax(torch.randn(V, generator=g) * sharp, -1)
        self.q1 = torch.softmax(torch.randn(V, V, generator=g) * sharp, -1)

    def target(self, logits):  # (R, V) logits -> (R, V) filtered probabilities
        R = logits.shape[0]
        return filtered_probs(logits, torch.full((R,), self.t), torch.full((R,), self.k), torch.full((R,), self.p))

    def joint(self):  # (V, V): P(first = a, second = b)
        return self.target(self.l0[None])[0][:, None] * self.target(self.l1)

    def batch(self, parents, sampler, B, g):
        """Draft trees for B trials: (logits, tokens, parents, num_nodes, t, k, p, draft_probs)."""
        N, V = len(parents), self.V
        tokens = torch.zeros(B, N, dtype=torch.int64)
        for node in range(N):
            kids = [i for i in range(N) if parents[i] == node]
            if not kids:
                continue
            q = self.q0.expand(B, V) if node == 0 else self.q1[tokens[:, node]]
            if sampler == "arbitrary":  # a model-free drafter: any tokens, duplicates included
                tokens[:, kids] = torch.randint(0, V, (B, len(kids)), generator=g)
            else:
                tokens[:, kids] = torch.multinomial(q, len(kids), sampler == "with_replacement", generator=g)
        logits = self.l1[tokens]  # (B, N, V): node i is followed by p1[token i] ...
        logits[:, 0] = self.l0  # ... and the root by p0
        draft = self.q1[tokens]
        draft[:, 0] = self.q0
        return (logits, tokens, torch.tensor(parents).expand(B, N), torch.full((B,), N), torch.full((B,), self.t),
                torch.full((B,), self.k), torch.full((B,), self.p), draft)

    def emitted_pairs(self, out, g):
        """(B,) first * V + second emitted token; the second drawn from p1 if the first was rejected."""
        n, first_acc, second_acc = out.accept_len, out.accept_tokens[:, 0], out.accept_tokens[:, 1]
        first = torch.where(n >= 1, first_acc, out.next_token)
        direct = torch.multinomial(self.target(self.l1)[first], 1, generator=g)[:, 0]
        second = torch.where(n >= 2, second_acc, torch.where(n == 1, out.next_token, direct))
        return first * self.V + second


def joint_counts(model, parents, mode, trials, impl=verify_reference, seed=0, siblings=None, chunk=250_000):
    sampler, use_q, rule = MODES[mode]
    g = torch.Generator().manual_seed(seed)
    counts = torch.zeros(model.V * model.V, dtype=torch.int64)
    for start in range(0, trials, chunk):
        B = min(chunk, trials - start)
        *args, draft = model.batch(parents, sampler, B, g)
        u = torch.rand(B, len(parents), generator=g)
        out = impl(*args, u, draft if use_q else None, siblings or rule)
        counts += torch.bincount(model.emitted_pairs(out, g), minlength=model.V**2)
    return counts


# ---- golden cases ---------------------------------------------------------------------------------

def one_hot_logits(B, N, V, hot):  # hot (B, N): the only token with mass at each node
    logits = torch.full((B, N, V), float("-inf"))
    return logits.scatter(2, hot[..., None], 0.0)


def golden_tree():
    # Root children 1 (token 4, no mass), 2 (token 2: accepted), 3 (token 2 too: never tried).
    # Node 2's children 4 (token 0, no mass), 6 (token 7: accepted); node 5 hangs under node 1.
    # Node 6's children 7 and 8 are both rejected: the next token is node 6's only token, 5.
    parents = torch.tensor([[-1, 0, 0, 0, 2, 1, 2, 6, 6]])
    tokens = torch.tensor([[9, 4, 2, 2, 0, 3, 7, 1, 1]])
    hot = torch.tensor([[2, 6, 7, 0, 0, 0, 5, 0, 0]])  # target's token after each node
    return parents, tokens, hot


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["greedy", "deterministic", "draft"])
def test_golden(impl, mode, poison_empty):
    V = 10
    parents, tokens, hot = golden_tree()
    chain_parents = torch.tensor([[-1, 0, 1], [-1, 0, 1]])
    chain_tokens = torch.tensor([[0, 3, 5], [0, 8, 5]])  # request 1's first draft has no mass
    chain_hot = torch.tensor([[3, 5, 6], [3, 5, 6]])
    cases = [  # (parents, tokens, hot, accept_nodes, next_token)
        (chain_parents, chain_tokens, chain_hot, [[1, 2], []], [6, 3]),
        (parents, tokens, hot, [[2, 6]], [5]),
    ]
    for par, tok, h, nodes, nxt in cases:
        B, N = tok.shape
        logits = one_hot_logits(B, N, V, h)
        if mode == "greedy":  # finite logits with the same argmax
            logits = torch.where(logits == 0, 5.0, torch.randn(B, N, V).clamp(-1, 1))
        temperature = torch.full((B,), 0.0 if mode == "greedy" else 1.0)
        # A draft that proposed the children's tokens: q uniform over them.
        q = torch.zeros(B, N, V)
        for i in range(1, N):
            q[torch.arange(B), par[:, i], tok[:, i]] = 1.0
        q = q / q.sum(-1, keepdim=True).clamp(min=1)
        u = torch.full((B, N), 0.999)
        out = IMPLS[impl](logits, tok, par, torch.full((B,), N), temperature, torch.zeros(B, dtype=torch.int64),
                          torch.ones(B), u, q if mode == "draft" else None)
        want = torch.full((B, N), -1)
        for b, path in enumerate(nodes):
            want[b, : len(path)] = torch.tensor(path, dtype=torch.int64)
        assert torch.equal(out.accept_nodes, want)
        assert torch.equal(out.accept_tokens, torch.where(want >= 0, tok.gather(1, want.clamp(min=0)), -1))
        assert torch.equal(out.accept_len, (want >= 0).sum(1))
        assert torch.equal(out.next_token, torch.tensor(nxt))


# ---- exactness: enumeration, then sampling --------------------------------------------------------

def emitted_exact(p, q, drafts, siblings):
    """Distribution of the token emitted at one node, for each row of drafts (R, s): the rule's own
    acceptance probabilities and residuals (kernels.verify helpers) in float64, no sampling."""
    R, V = drafts.shape[0], p.numel()
    P, Q = p.expand(R, V), None if q is None else q.expand(R, V)
    dist, alive = torch.zeros(R, V, dtype=torch.float64), torch.ones(R, dtype=torch.float64)
    for j in range(drafts.shape[1]):
        x = drafts[:, j]
        a = _accept_prob(P, Q, x)
        dist.scatter_add_(1, x[:, None], (alive * a)[:, None])
        alive = alive * (1 - a)
        P, Q = _after_reject(P, Q, x, torch.ones(R, dtype=torch.bool), siblings)
    return dist + alive[:, None] * P / P.sum(-1, keepdim=True)


def draft_weights(q, drafts, without_replacement):
    w, left = torch.ones(len(drafts), dtype=torch.float64), torch.ones(len(drafts), dtype=torch.float64)
    for j in range(drafts.shape[1]):
        qx = q[drafts[:, j]]
        if without_replacement:
            seen = (drafts[:, :j] == drafts[:, j : j + 1]).any(1)
            w, left = w * torch.where(seen, 0.0, qx / left), left - qx
        else:
            w = w * qx
    return w


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_enumeration(seed):
    """Sum over every draft of 3 siblings (V = 6): the emitted token is distributed exactly as p."""
    V, s = 6, 3
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(V, generator=g, dtype=torch.float64) * 2, -1)
    p[V - 1] = 0  # a token the target never emits
    p = p / p.sum()
    q = torch.softmax(torch.randn(V, generator=g, dtype=torch.float64) * 2, -1)
    drafts = torch.tensor(list(itertools.product(range(V), repeat=s)))
    # Point-mass drafts: every single draft (duplicates included) must give p.
    torch.testing.assert_close(emitted_exact(p, None, drafts, "iid"), p.expand(len(drafts), V), atol=1e-12, rtol=0)
    for rule, wor in [("iid", False), ("without_replacement", True)]:
        mix = (draft_weights(q, drafts, wor)[:, None] * emitted_exact(p, q, drafts, rule)).sum(0)
        torch.testing.assert_close(mix, p, atol=1e-12, rtol=0)
    # The i.i.d. rule on drafts drawn without replacement is measurably wrong (see the negative control).
    wrong = (draft_weights(q, drafts, True)[:, None] * emitted_exact(p, q, drafts, "iid")).sum(0)
    assert (wrong - p).abs().max() > 1e-3


# Power: 10^6 trials over V^2 = 64 cells (df = 63, critical G = 113.5 at ALPHA). The test rejects
# with probability > 1/2 once the noncentrality n * sum (f - p)^2 / p exceeds 52: a chi-square
# distance of 5.2e-5 between the emitted and the target joint, e.g. a 0.7% relative error on every
# cell, or 0.064% of the mass moved between two cells of mass 1/64. The negative control is at 7e-3.
@pytest.mark.parametrize("mode", MODES)
def test_joint_distribution_reference(mode):
    filtered = mode == "iid_tree"  # one run with temperature, top-k and top-p on
    model = Bigram(8, seed=1, temperature=0.7 if filtered else 1.0, top_k=6 if filtered else 0,
                   top_p=0.9 if filtered else 1.0)
    counts = joint_counts(model, CHAIN if mode == "iid_chain" else TREE, mode, 1_000_000)
    assert g_test(counts, model.joint()) > ALPHA


def test_negative_control_is_rejected():
    """The i.i.d. rule on siblings drawn without replacement: the same test must reject it."""
    model = Bigram(8, seed=1)
    counts = joint_counts(model, TREE, "without_replacement_tree", 1_000_000, siblings="iid")
    assert g_test(counts, model.joint()) < ALPHA


# Power, interpreted kernel: 1200 trials over 16 cells (df = 15) reject with probability > 1/2 at a
# chi-square distance of 0.026 (2.8% of the mass moved between two cells of mass 1/16): coarse, but
# this model (seed 8) makes the i.i.d. rule on these drafts fail it at p ~ 1e-44. The kernel must
# also equal the reference on these very inputs, which carries the 10^6-trial tests over.
@pytest.mark.parametrize("mode", ["without_replacement_tree"])
def test_joint_distribution_kernel(mode, poison_empty):
    model, trials = Bigram(4, seed=8, sharp=0.7), 1200
    sampler, _, rule = MODES[mode]
    g = torch.Generator().manual_seed(5)
    *args, draft = model.batch(SMALL_TREE, sampler, trials, g)
    u = torch.rand(trials, len(SMALL_TREE), generator=g)
    out = verify_triton(*args, u, draft, rule)
    assert_same(out, verify_reference(*args, u, draft, rule))
    counts = torch.bincount(model.emitted_pairs(out, g), minlength=16)
    assert g_test(counts, model.joint()) > ALPHA


def test_mean_accept_length_closed_form():
    """A chain of K i.i.d. drafts, the same p and q at every depth: E[accepted] = sum_i alpha^i."""
    K, V, B = 4, 8, 200_000
    g = torch.Generator().manual_seed(0)
    logits, q = torch.randn(V, generator=g), torch.softmax(torch.randn(V, generator=g), -1)
    alpha = float(torch.minimum(torch.softmax(logits, -1), q).sum())
    tokens = torch.multinomial(q, B * (K + 1), replacement=True, generator=g).view(B, K + 1)
    parents = torch.arange(-1, K).expand(B, K + 1)
    out = verify_reference(logits.expand(B, K + 1, V), tokens, parents, torch.full((B,), K + 1), torch.ones(B),
                           torch.zeros(B, dtype=torch.int64), torch.ones(B), torch.rand(B, K + 1, generator=g),
                           q.expand(B, K + 1, V))
    n = out.accept_len.double()
    expected = sum(alpha**i for i in range(1, K + 1))
    assert abs(float(n.mean()) - expected) < 5 * float(n.std()) / B**0.5


# ---- edges ----------------------------------------------------------------------------------------

def random_trees(B, N, V, seed, mode, dtype=torch.float32, greedy=0.25, filters=True):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, N, V, generator=g) * 3).to(dtype)
    parents = torch.full((B, N), -1, dtype=torch.int64)
    for i in range(1, N):
        parents[:, i] = torch.randint(0, i, (B,), generator=g)
    num_nodes = torch.randint(1, N + 1, (B,), generator=g)
    pad = torch.arange(N)[None] >= num_nodes[:, None]
    # Draft tokens likely under the parent's target, so that walks go deep: its argmax or a sample.
    parent_logits = logits.float().gather(1, parents.clamp(min=0)[..., None].expand(B, N, V))  # (B, N, V)
    sampled = torch.multinomial(torch.softmax(parent_logits, -1).view(B * N, V), 1, generator=g).view(B, N)
    tokens = torch.where(torch.rand(B, N, generator=g) < 0.4, parent_logits.argmax(-1), sampled)
    tokens = torch.where(pad, -7, tokens)  # garbage in the padding
    parents = torch.where(pad, 99, parents)
    temperature = torch.where(torch.rand(B, generator=g) < greedy, 0.0, 0.5 + torch.rand(B, generator=g))
    top_k = torch.where(torch.rand(B, generator=g) < 0.3, torch.randint(1, V, (B,), generator=g), 0) if filters \
        else torch.zeros(B, dtype=torch.int64)
    top_p = torch.where(torch.rand(B, generator=g) < 0.3, 0.2 + 0.7 * torch.rand(B, generator=g), 1.0) if filters \
        else torch.ones(B)
    u = counter_uniforms(torch.randint(0, 2**62, (B,), generator=g), torch.randint(0, 1000, (B,), generator=g), N)
    draft = None
    if mode != "deterministic":  # a draft near the target, with q = 0 for token 0
        draft = torch.softmax(logits.float() + torch.randn(B, N, V, generator=g), -1)
        draft[:, :, 0] = 0.0
        draft = draft / draft.sum(-1, keepdim=True)
    return logits, tokens, parents, num_nodes, temperature, top_k, top_p, u, draft


@pytest.mark.parametrize("mode", ["deterministic", "iid", "without_replacement"])
@pytest.mark.parametrize("seed, block_v, dtype", [(0, 8, torch.float32), (1, None, torch.bfloat16)],
                         ids=["fp32-tiles_of_8", "bf16-one_tile"])
def test_kernel_matches_reference_random_trees(mode, seed, block_v, dtype, poison_empty, monkeypatch):
    if block_v:  # V = 27 in tiles of 8: carries, rescaling and masks cross tile edges
        monkeypatch.setattr(kernels.verify, "MAX_BLOCK_V", block_v)
    *args, draft = random_trees(12, 9, 27, seed, mode, dtype=dtype)
    rule = "iid" if mode == "deterministic" else mode
    assert_same(verify_triton(*args, draft, rule), verify_reference(*args, draft, rule))


@pytest.mark.parametrize("V", [8193, 49152, 151936])
@pytest.mark.parametrize("mode", ["deterministic", "iid"])
def test_large_vocab(V, mode, poison_empty):
    dtype = {8193: torch.float32, 49152: torch.float16, 151936: torch.bfloat16}[V]
    *args, draft = random_trees(3, 2, V, V, mode, dtype=dtype, greedy=0.0, filters=False)
    args[1] = torch.randint(0, V, (3, 2), generator=torch.Generator().manual_seed(V))
    args[2] = torch.tensor([[-1, 0]] * 3)
    args[3] = torch.tensor([2, 1, 1])  # requests 1 and 2 have no draft ...
    args[4] = torch.tensor([0.9, 1.1, 0.0])  # ... and request 2 is greedy
    if V == 49152:  # top-k and top-p bisection across tiles
        args[5], args[6] = torch.tensor([50, 0, 0]), torch.tensor([0.9, 0.8, 1.0])
    rule = "iid"
    out = verify_triton(*args, draft, rule)
    assert_same(out, verify_reference(*args, draft, rule))
    assert bool(((out.next_token >= 0) & (out.next_token < V)).all())


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_residual_and_zero_draft_probability(impl, poison_empty):
    V, B = 16, 4
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, 2, V, generator=g)
    logits[:, :, 5:] = float("-inf")  # tokens >= 5 have no target mass
    p = torch.softmax(logits.float(), -1)
    tokens = torch.tensor([[0, 9]] * B)  # q(9) = 0 (and p(9) = 0): rejected; residual p - q is empty
    parents, n = torch.tensor([[-1, 0]] * B), torch.full((B,), 2)
    args = (torch.ones(B), torch.zeros(B, dtype=torch.int64), torch.ones(B))
    u = torch.tensor([[0.0, 0.0], [0.3, 0.5], [0.7, 0.2], [1 - 2**-24, 0.9]])
    out = IMPLS[impl](logits, tokens, parents, n, *args, u, p, "iid")
    assert torch.equal(out.accept_len, torch.zeros(B, dtype=torch.int64))
    assert bool(((out.next_token >= 0) & (out.next_token < 5)).all())
    assert torch.equal(out.next_token, sample_inverse_cdf(p[:, 0], u[:, 0]))
    # A draft token the target likes but the draft gave probability 0 is rejected, even at u = 0.
    q = torch.zeros(B, 2, V)
    q[:, :, 1] = 1.0
    tokens = torch.tensor([[0, 2]] * B)
    out = IMPLS[impl](logits, tokens, parents, n, *args, torch.zeros(B, 2), q, "iid")
    assert torch.equal(out.accept_len, torch.zeros(B, dtype=torch.int64))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("draft", [False, True])
def test_extreme_uniforms(impl, draft, poison_empty):
    """u = 0 accepts any draft with mass and draws the first token with mass; u = 1 - 2^-24 rejects
    (p(6) < q(6) = 0.9, or p(6) < 1 without a draft) and draws the last token with mass."""
    V = 12
    logits = torch.randn(2, 2, V, generator=torch.Generator().manual_seed(1))
    logits[:, :, :3] = float("-inf")
    logits[:, :, -2:] = float("-inf")  # mass on tokens 3..9
    q = torch.zeros(2, 2, V)
    q[:, :, 6], q[:, :, 3:6] = 0.9, 0.1 / 3  # q(9) = 0: the residual keeps token 9
    tokens, parents = torch.tensor([[0, 6], [0, 6]]), torch.tensor([[-1, 0], [-1, 0]])
    u = torch.tensor([[0.0, 0.0], [1 - 2**-24, 1 - 2**-24]])
    out = IMPLS[impl](logits, tokens, parents, torch.tensor([2, 2]), torch.ones(2), torch.zeros(2, dtype=torch.int64),
                      torch.ones(2), u, q if draft else None)
    assert out.accept_len.tolist() == [1, 0]
    assert out.next_token.tolist() == [3, 9]


@pytest.mark.parametrize("impl", IMPLS)
def test_no_draft_and_sample_tokens(impl, poison_empty, monkeypatch):
    B, V = 6, 40
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(B, V, generator=g) * 2
    temperature = torch.tensor([0.0, 1.0, 0.7, 1.3, 0.0, 1.0])
    top_k = torch.tensor([0, 5, 0, 12, 3, 0])
    top_p = torch.tensor([1.0, 1.0, 0.8, 0.5, 1.0, 0.95])
    u = torch.rand(B, generator=g)
    want = sample(logits, temperature, top_k, top_p, u)
    out = IMPLS[impl](logits[:, None], torch.zeros(B, 1, dtype=torch.int64), torch.full((B, 1), -1),
                      torch.ones(B, dtype=torch.int64), temperature, top_k, top_p, u[:, None])
    assert torch.equal(out.next_token, want)
    assert torch.equal(out.accept_len, torch.zeros(B, dtype=torch.int64))
    assert torch.equal(out.accept_nodes, torch.full((B, 1), -1))
    monkeypatch.setenv("SPECDEC_KERNELS", impl)
    assert torch.equal(sample_tokens(logits, temperature, top_k, top_p, u), want)


@pytest.mark.parametrize("impl", IMPLS)
def test_top_k_top_p_stay_in_allowed_set(impl, poison_empty):
    B, V = 24, 32
    g = torch.Generator().manual_seed(3)
    logits = torch.randint(-4, 4, (1, 2, V), generator=g).float().expand(B, 2, V)  # many ties
    top_k = torch.tensor([3, 0, 7, 1] * 6)
    top_p = torch.tensor([1.0, 0.6, 0.9, 1.0] * 6)
    temperature = torch.full((B,), 0.8)
    allowed = filtered_probs(logits[:, 0], temperature, top_k, top_p) > 0  # (B, V)
    tokens = torch.randint(0, V, (B, 2), generator=g)
    u = torch.rand(B, 2, generator=g)
    out = IMPLS[impl](logits, tokens, torch.tensor([[-1, 0]] * B), torch.full((B,), 2), temperature, top_k, top_p, u)
    first = torch.where(out.accept_len > 0, out.accept_tokens[:, 0], out.next_token)
    assert bool(allowed.gather(1, first[:, None]).all())
    if impl == "triton":
        assert_same(out, verify_reference(logits, tokens, torch.tensor([[-1, 0]] * B), torch.full((B,), 2),
                                          temperature, top_k, top_p, u))


@pytest.mark.parametrize("impl", IMPLS)
def test_mixed_greedy_and_sampled_batch(impl, poison_empty):
    """Greedy and sampled requests side by side give what each gives alone."""
    *args, draft = random_trees(5, 6, 20, 7, "iid", greedy=0.0)
    args[4] = torch.tensor([0.0, 1.0, 0.0, 0.6, 1.2])
    both = IMPLS[impl](*args, draft, "iid")
    for b in range(5):
        alone = IMPLS[impl](*[a[b : b + 1] for a in args], draft[b : b + 1], "iid")
        for f in FIELDS:
            assert torch.equal(getattr(alone, f), getattr(both, f)[b : b + 1]), f
    for b in (0, 2):  # greedy: every accepted token and the next one are argmaxes along the path
        path = [0] + both.accept_nodes[b, : both.accept_len[b]].tolist()
        argmaxes = [int(args[0][b, i].argmax()) for i in path]
        assert both.accept_tokens[b, : len(path) - 1].tolist() + [int(both.next_token[b])] == argmaxes


@pytest.mark.parametrize("seed", range(3))
def test_all_greedy_batch_takes_the_argmax_walk(seed, poison_empty):
    """A batch where every request is greedy skips the sampling machinery (one argmax over all
    nodes, then the walk): the same result as the general walk and as the kernel."""
    *args, draft = random_trees(16, 9, 6, seed, "deterministic", greedy=1.0)
    assert (args[0].argmax(-1).gather(1, args[2].clamp(0, 8)) == args[1]).sum() > 16  # walks go deep
    fast = verify_reference(*args)
    sampled_row = [torch.cat([a, a[:1]]) for a in args]
    sampled_row[4][-1] = 1.0  # one sampled request: the general walk for the whole batch
    general = verify_reference(*sampled_row)
    kernel = verify_triton(*args)
    for f in FIELDS:
        assert torch.equal(getattr(fast, f), getattr(general, f)[:16]), f
        assert torch.equal(getattr(fast, f), getattr(kernel, f)), f


def test_dispatch(monkeypatch):
    *args, draft = random_trees(3, 4, 16, 11, "iid")
    monkeypatch.setenv("SPECDEC_KERNELS", "torch")
    ref = verify(*args, draft)
    monkeypatch.setenv("SPECDEC_KERNELS", "triton")
    assert_same(verify(*args, draft), ref)
