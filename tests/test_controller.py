"""The speculation-length controller on synthetic cost and acceptance curves, and "auto" end to end."""

import pytest
import torch

import specdec
from specdec.controller import AcceptanceStats, CostModel, SpeculationController, non_decreasing
from specdec.profiling import nvtx_range
from tiny_models import tiny_model

BATCHES, WIDTHS = (1, 4, 16, 64), (1, 2, 3, 5, 9, 17)


def synthetic_cost(per_token):
    """A step costs 1 (weights read once) + per_token x (tokens in the forward): a roofline in miniature."""
    return CostModel(BATCHES, WIDTHS, [[1.0 + per_token * b * w for w in WIDTHS] for b in BATCHES])


def with_rate(alpha, max_k=16, n=100_000):
    """A controller that firmly believes in a chain accepting each next token with probability alpha."""
    c = SpeculationController(synthetic_cost(0.0), max_k=max_k)
    c.stats = AcceptanceStats(max_nodes=max_k)
    c.stats.tries += n
    c.stats.accepts += n * alpha ** torch.arange(1, max_k + 1, dtype=torch.float64)
    return c


def best_by_brute_force(alphas, step_cost, max_k, weights=None):
    """Every allocation of draft sizes (K_b), each 0..max_k: the best expected tokens per second,
    each request's tokens counted weights[b] times. Request b accepts each next token with
    probability alphas[b] (a chain)."""
    import itertools

    best = (0.0, None)
    weights = [1.0] * len(alphas) if weights is None else weights
    for sizes in itertools.product(range(max_k + 1), repeat=len(alphas)):
        tokens = sum(w * (1 - a ** (k + 1)) / (1 - a) for a, k, w in zip(alphas, sizes, weights))
        rate = tokens / step_cost(len(alphas), len(alphas) + sum(sizes))
        if rate > best[0] + 1e-12:
            best = (rate, sizes)
    return best


def charged(c):
    """The step cost the controller's objective charges: a drafted step's raised by the margin."""
    return lambda B, T: c.step_cost(B, T) * (1 + c.margin(B) * (T > B))


def rate_of(c, alphas, sizes):
    tokens = sum((1 - a ** (k + 1)) / (1 - a) for a, k in zip(alphas, sizes.tolist()))
    return tokens / charged(c)(len(alphas), len(alphas) + int(sizes.sum()))


@pytest.mark.parametrize("alpha", [0.3, 0.6, 0.9])
@pytest.mark.parametrize("per_token", [0.002, 0.02, 0.2])
@pytest.mark.parametrize("batch", [1, 4, 16, 64])
def test_picks_the_length_that_maximizes_expected_tokens_per_second(alpha, per_token, batch):
    c = with_rate(alpha)
    c.cost = synthetic_cost(per_token)
    sizes = c.choose(batch)
    assert sizes.shape == (batch,) and int(sizes.max()) - int(sizes.min()) <= 1  # like requests, like drafts
    # Alone, the exhaustive search over K; in a batch, against every total number of nodes.
    if batch == 1:
        want, _ = best_by_brute_force([alpha], charged(c), c.max_k)
    else:
        want = max(rate_of(c, [alpha] * batch, t // batch + (torch.arange(batch) < t % batch).long())
                   for t in range(batch * c.max_k + 1))  # every total, spread as evenly as it goes
    assert rate_of(c, [alpha] * batch, sizes) == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize("per_token", [0.01, 0.05, 0.2])
def test_sizes_each_request_by_its_own_acceptance(per_token):
    """Requests in different match-length buckets (accepting 0.2, 0.5, 0.8, 0.95 per token): the
    chosen sizes reach the exhaustive optimum over all 17^4 allocations, and likelier requests
    draft more."""
    c = SpeculationController(synthetic_cost(per_token), max_k=16)
    alphas = [0.2, 0.5, 0.8, 0.95]
    c.stats = AcceptanceStats(max_nodes=16, buckets=4)
    c.stats.tries += 100_000
    for bucket, a in enumerate(alphas):
        c.stats.accepts[bucket] = 100_000 * a ** torch.arange(1, 17, dtype=torch.float64)
    sizes = c.choose(4, match_len=torch.arange(4))
    want, want_sizes = best_by_brute_force(alphas, charged(c), 16)
    assert rate_of(c, alphas, sizes) == pytest.approx(want, rel=1e-9), (sizes, want_sizes)
    assert sizes.tolist() == sorted(sizes.tolist())


def test_a_token_is_worth_what_it_takes_off_the_batchs_end():
    """A batch ends when its last request does. Requests ordered by tokens left (most first): the
    k-th saves c(k, k) - c(k - 1, k - 1) per token, ties share their places' worth, and the weights
    (in units of c(B, B) / B) sum to B. With the step price 1 + 0.1 x tokens, at batch 4: plain
    steps cost 1.1, 1.2, 1.3, 1.4 at batch 1-4."""
    batches = (1, 2, 3, 4)
    c = SpeculationController(CostModel(batches, WIDTHS, [[1 + 0.1 * b * w for w in WIDTHS] for b in batches]), max_k=4)
    w = c.request_weights(4, torch.tensor([10, 30, 20, 30]))
    assert w == pytest.approx([0.1, 0.6, 0.1, 0.6] * (4 / 1.4 * torch.ones(4)).numpy())
    assert w.sum() == pytest.approx(4)
    assert c.request_weights(4, torch.tensor([7, 7, 7, 7])) == pytest.approx([1, 1, 1, 1])  # all tied
    assert c.request_weights(4, None).tolist() == [1, 1, 1, 1] and c.request_weights(1, torch.tensor([3])).tolist() == [1]


@pytest.mark.parametrize("per_token", [0.0, 0.01, 0.05])
def test_drafts_go_to_the_requests_that_finish_last(per_token):
    """Four requests alike (accepting 0.8 a token), two of them 20 tokens behind: the chosen sizes
    reach the exhaustive optimum with each request's tokens at its worth. Where a step costs the
    same at any batch size (per_token 0: a request ahead takes nothing off the end), only the two
    behind draft."""
    c = with_rate(0.8, max_k=6)
    c.cost = synthetic_cost(per_token)
    remaining = torch.tensor([10, 30, 10, 30])
    sizes = c.choose(4, remaining=remaining)
    w = c.request_weights(4, remaining)
    want, want_sizes = best_by_brute_force([0.8] * 4, charged(c), 6, weights=w)
    tokens = sum(wb * (1 - 0.8 ** (k + 1)) / 0.2 for wb, k in zip(w, sizes.tolist()))
    assert tokens / charged(c)(4, 4 + int(sizes.sum())) == pytest.approx(want, rel=1e-9), (sizes, want_sizes)
    assert sizes[1] == sizes[3] > 0 and sizes[0] == sizes[2] <= sizes[1]
    if per_token == 0.0:
        assert sizes[0] == sizes[2] == 0


def test_shrinks_toward_zero_as_the_cost_curve_steepens():
    c = with_rate(0.7)
    chosen = []
    for per_token in [0.0, 0.001, 0.01, 0.05, 0.2, 1.0]:
        c.cost = synthetic_cost(per_token)
        chosen.append(int(c.choose(16).sum()))
    assert chosen == sorted(chosen, reverse=True) and chosen[0] > 4 * 16 and chosen[-1] == 0


@pytest.mark.parametrize("min_gain", [0.0, 0.03, 0.1])
def test_a_draft_must_promise_min_gain_over_a_plain_step(min_gain):
    """One request accepting 0.5 of a one-node draft whose node costs 0.45 of a step: a drafted
    step promises 1.5 / 1.45 = +3.4% tokens per second. Taken at min_gain 0 and 0.03, not at 0.1."""
    c = with_rate(0.5, max_k=1)
    c.min_gain = min_gain
    c.cost = CostModel((1, 2), (1, 2), [[1.0, 1.45], [2.0, 2.9]])
    assert c.choose(1).tolist() == [int(1.5 / 1.45 > 1 + min_gain)]
    assert c.worth_drafting(1) == (1.5 / 1.45 > 1 + min_gain)


def test_drafted_steps_that_realize_less_than_predicted_raise_that_batch_sizes_margin():
    """Drafted steps at batch 4 take 15% longer than the time model says (their predicted gain of
    5.6% realizes as -3%): the margin at batch 4 rises and it stops drafting. Batch 1, whose drafts
    came true, keeps min_gain. Left alone, the raised margin fades back."""
    c = with_rate(0.9, max_k=1)
    c.cost = CostModel((1, 4), (1, 1.25, 2), [[1.0, 1.0, 1.45], [4.0, 4.8, 7.2]])
    assert c.margin(4) == c.margin(1) == c.min_gain and int(c.choose(4).sum()) == 4
    for _ in range(100):
        for B in (1, 4):
            sizes = c.choose(B)
            if int(sizes.sum()) == 0:
                continue
            predicted = float(c.step_seconds(B, int(sizes.sum()))[-1])
            c.observe(sizes, torch.ones(B, dtype=torch.int64), step_seconds=predicted * (1.15 if B == 4 else 1.0))
            c.fit = type(c.fit)()  # keep the time model as it was: only the shortfall may learn
            c.promised = c.delivered = 0.0
    assert c.margin(4) > 0.056 and c.margin(1) == c.min_gain
    assert int(c.choose(4).sum()) == 0 and int(c.choose(1).sum()) == 1
    for _ in range(300):  # plain steps at batch 4
        c.observe(torch.zeros(4, dtype=torch.int64), torch.zeros(4, dtype=torch.int64), step_seconds=4.0)
    assert c.margin(4) == c.min_gain


def test_larger_batches_draft_less():
    c = with_rate(0.7)
    c.cost = synthetic_cost(0.01)
    chosen = [float(c.choose(b).float().mean()) for b in (1, 4, 16, 64)]
    assert chosen == sorted(chosen, reverse=True) and chosen[-1] < chosen[0]


def test_acceptance_is_learned_per_node_and_match_length():
    s = AcceptanceStats(max_nodes=4, buckets=3, strength=1.0)
    # bucket 2 (long matches) accepts everything offered; bucket 1 nothing
    for _ in range(200):
        s.record(torch.tensor([4, 4]), torch.tensor([4, 0]), match_len=torch.tensor([2, 1]))
    e = s.expected_tokens(4, match_len=torch.tensor([2, 1]))
    assert e[0, 4] > 4.9 and e[1, 4] < 1.02
    assert torch.all(e[:, 1:] >= 1)


def test_cost_interpolation_is_exact_on_the_grid_and_monotone_between():
    c = synthetic_cost(0.01)
    for b in BATCHES:
        for w in WIDTHS:
            assert c(b, w) == pytest.approx(1.0 + 0.01 * b * w)
    assert c(4, 2) < c(6, 2) < c(16, 2) and c(4, 3) < c(4, 4) < c(4, 5)
    assert c(128, 2) == pytest.approx(2 * c(64, 2))  # beyond the grid: proportional to the batch


def test_the_first_extra_token_is_priced_as_measured():
    """A ragged batch's first extra token costs a jump the width grid does not see at batch 64
    (its first width past 1 brings 4 extra tokens): with `first_extra` measured, c(B, B + 1) is
    exactly that, and a draft that pays only at the grid's straight-line price is not taken."""
    widths = (1, 1.0625, 2)
    grid = [[1.0, 1.0, 2.0], [4.0, 4.2, 8.0]]  # batch 64: 4 extra tokens cost 5% of a step...
    line, jumped = CostModel((1, 64), widths, grid), CostModel((1, 64), widths, grid, first_extra=[1.5, 4.15])
    assert line(64, 65 / 64) == pytest.approx(4.05) and jumped(64, 65 / 64) == pytest.approx(4.15)  # ...the first 3.75%
    assert jumped(64, 68 / 64) == pytest.approx(4.2) and jumped(64, 1) == pytest.approx(4.0)
    assert jumped(64, 66 / 64) == pytest.approx(4.15 + 0.05 / 3)
    assert CostModel.from_json(jumped.to_json())(64, 65 / 64) == pytest.approx(4.15)
    e = torch.ones(64, 2, dtype=torch.float64)
    e[0, 1] = 2.0  # one request of 64 has a node that is surely accepted
    for cost, drafts in ((line, 1), (jumped, 0)):  # 65 / 4.05 > 64 / 4 > 65 / 4.15
        c = with_rate(0.5, max_k=1)
        c.min_gain, c.cost = 0.0, cost
        c.stats.expected_tokens = lambda *a, **k: e
        assert int(c.choose(64).sum()) == drafts


def test_a_noisy_point_is_pooled_with_its_neighbours_not_carried_to_every_wider_one():
    assert non_decreasing([1.0, 2.0, 3.0]) == [1.0, 2.0, 3.0]
    assert non_decreasing([1.0, 3.0, 2.0, 4.0]) == pytest.approx([1.0, 2.5, 2.5, 4.0])
    spike = non_decreasing([1.0, 1.6, 1.1, 1.2, 1.3, 2.0])  # a running maximum would give 1.6 to four points
    assert spike == pytest.approx([1.0, 1.3, 1.3, 1.3, 1.3, 2.0])
    assert all(a <= b for a, b in zip(spike, spike[1:])) and non_decreasing([]) == []


def test_measured_cost_is_cached(tmp_path):
    m = tiny_model(vocab=64, hidden=32, layers=2, heads=4, kv_heads=2, ffn=48)
    a = CostModel.cached(m.net, "tiny", path_dir=tmp_path)
    assert len(list(tmp_path.glob("*.json"))) == 1
    assert CostModel.cached(m.net, "tiny", path_dir=tmp_path).seconds == a.seconds
    assert all(x > 0 for row in a.seconds for x in row)
    assert len(a.first_extra) == len(a.batches) and all(f >= row[0] for f, row in zip(a.first_extra, a.seconds))
    assert all(a <= b for row in a.seconds for a, b in zip(row, row[1:]))
    assert CostModel.cached(m.net, "tiny", path_dir=tmp_path).first_extra == a.first_extra


def test_auto_is_lossless(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path))
    m = tiny_model(vocab=64, hidden=32, layers=2, heads=4, kv_heads=2, ffn=48, seed=3)
    prompts = [[5, 9, 11], [7] * 9, [3], [12, 40, 33, 8, 19]]
    ar = specdec.generate(m, prompts, max_new_tokens=24).token_ids
    for drafter in ("ngram", "recycle"):
        out = specdec.generate(m, prompts, max_new_tokens=24, drafter=drafter, num_draft_tokens="auto")
        assert out.token_ids == ar


def test_profiling_hooks_are_no_ops_without_cuda(monkeypatch):
    monkeypatch.setenv("SPECDEC_NVTX", "1")
    if torch.cuda.is_available():
        pytest.skip("CUDA present: NVTX ranges are live")
    with nvtx_range("draft") as r:
        assert r is None


def test_tree_acceptance_counts_nodes_on_the_accepted_path():
    s = AcceptanceStats(max_nodes=4, buckets=1, strength=1e-9)
    # a star of 4 children: the second is always the one accepted
    for _ in range(50):
        s.record(torch.tensor([4]), torch.tensor([[False, True, False, False]]))
    p = s.rates()[0]
    assert p[1] == pytest.approx(1.0) and p[0] < 1e-6 and p[2] < 1e-6
    assert s.expected_tokens(4)[0].tolist() == pytest.approx([1, 1, 2, 2, 2])


def test_unseen_deep_nodes_are_extrapolated_from_the_shallow_ones():
    s = AcceptanceStats(max_nodes=12, buckets=2, decay=0.8)
    for _ in range(100):  # bucket 1 offers 4 nodes and all are accepted; bucket 0 rejects them
        s.record(torch.tensor([4, 4]), torch.tensor([4, 0]), match_len=torch.tensor([1, 0]))
    p = s.rates()
    assert p[1, 4] > 0.75  # never offered, yet expected: worth trying
    assert p[0, 4:].max() < 0.01
    # each unseen node at most `decay` of the one before: untried nodes cannot add up to much
    assert torch.allclose(p[1, 5:], 0.8 * p[1, 4:-1], rtol=1e-3)
    assert torch.all(p[0, 5:] <= p[0, 4:-1] + 1e-12)


def test_a_length_given_up_on_is_retried_once_its_counts_fade():
    c = SpeculationController(synthetic_cost(0.3), max_k=8)  # one extra token: +23% on a step
    for _ in range(3):  # three unlucky steps: node 0 rejected, p0 = 0.2 < 0.23
        c.observe(torch.tensor([1]), torch.tensor([0]))
    assert c.choose(1).item() == 0
    retried = None
    for step in range(300):  # steps without a draft: the counts fade back toward the prior
        c.observe(torch.tensor([0]), torch.tensor([0]))
        if c.choose(1).item() > 0:
            retried = step
            break
    assert retried is not None and 20 < retried < 200
    for _ in range(400):  # now truly rejected, again and again
        c.observe(torch.tensor([8]), torch.tensor([0]))
    assert c.choose(1).item() == 0


def test_requests_without_a_draft_expect_nothing_from_it():
    c = with_rate(0.7)
    c.cost = synthetic_cost(0.01)
    assert c.choose(16).sum() > 0
    assert c.choose(16, count=torch.zeros(16, dtype=torch.int64)).sum() == 0  # nobody has a draft
    count = torch.tensor([0, 2] * 8)
    sizes = c.choose(16, count=count)
    assert torch.all(sizes <= count) and sizes.sum() > 0  # more nodes than drafted gain nothing


def test_no_proposal_when_no_match_length_could_pay():
    c = with_rate(0.9)
    c.cost = synthetic_cost(10.0)  # every extra token about doubles a step: never worth it
    assert not c.worth_drafting(4)
    c.cost = synthetic_cost(0.0)
    assert c.worth_drafting(4)


def test_engine_skips_the_drafter_when_speculation_cannot_pay(tmp_path, monkeypatch):
    from drafters.ngram import NgramDrafter
    from specdec.generate import make_controller

    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path))
    m = tiny_model(vocab=64, hidden=32, layers=2, heads=4, kv_heads=2, ffn=48, seed=3)
    prompts = [[5, 9, 11, 5, 9], [7] * 9]
    calls = []

    class Spy(NgramDrafter):
        def propose(self, history, lens, max_nodes):
            calls.append(max_nodes)
            return super().propose(history, lens, max_nodes)

    spy = Spy()
    controller = make_controller(m, "auto", spy)
    controller.cost = synthetic_cost(10.0)
    out = specdec.generate(m, prompts, max_new_tokens=12, drafter=spy, num_draft_tokens="auto")
    assert calls == [] and out.stats["mean_accepted_tokens"] == 1.0
    assert out.token_ids == specdec.generate(m, prompts, max_new_tokens=12).token_ids
    assert make_controller(m, "auto", spy) is controller  # what it learned carries to the next call
    assert make_controller(m, "auto", Spy()) is not controller
    assert out.stats["prefill_seconds"] > 0 and out.stats["decode_tokens_per_s"] > 0


def test_a_cloned_drafter_learns_apart_from_its_original(tmp_path, monkeypatch):
    """`clone_drafter` copies the drafter and its controller: decoding with the clone leaves the
    original's global suffix tree and acceptance counts as they were (a benchmark's rounds)."""
    from drafters.suffix_tree import SuffixTreeDrafter
    from specdec.generate import clone_drafter, make_controller

    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path))
    m = tiny_model(vocab=64, hidden=32, layers=2, heads=4, kv_heads=2, ffn=48, seed=3)
    prompts = [[5, 9, 11, 5, 9, 11, 5, 9], [7] * 9]
    original = SuffixTreeDrafter()
    specdec.generate(m, prompts, max_new_tokens=12, drafter=original)
    controller = make_controller(m, "auto", original)
    tries, fit, learned = controller.stats.tries.clone(), controller.fit.ff.copy(), original.global_tree.num_nodes
    twin = clone_drafter(original)
    assert torch.equal(make_controller(m, "auto", twin).stats.tries, tries)  # it starts from what was learned
    twin_out = specdec.generate(m, [[3, 4, 3, 4, 3, 4]], max_new_tokens=12, drafter=twin)
    assert make_controller(m, "auto", twin) is not controller
    assert torch.equal(controller.stats.tries, tries) and original.global_tree.num_nodes == learned
    assert (controller.fit.ff == fit).all()
    # the twin did learn: its step-time fit moved with every step (whether or not it chose to draft)
    assert not (make_controller(m, "auto", twin).fit.ff == fit).all()
    assert twin_out.token_ids == specdec.generate(m, [[3, 4, 3, 4, 3, 4]], max_new_tokens=12).token_ids
    assert clone_drafter("none") == "none"


def test_step_time_fit_recovers_fixed_work_and_the_price_of_extra_tokens():
    from specdec.controller import StepTimeFit

    fit = StepTimeFit(memory=1.0)
    g = torch.Generator().manual_seed(0)
    for i in range(400):  # 3 ms of fixed work, 2 ms more for any draft, extra tokens 1.5x dearer than the grid
        x = float(torch.rand((), generator=g)) * 0.04 if i % 3 else 0.0  # a third of the steps plain
        fit.add(x, 0.003 + 0.002 * (x > 0) + 1.5 * x + 0.0005 * float(torch.randn((), generator=g)))
    o, v, s = fit.solve()
    assert o == pytest.approx(0.003, abs=3e-4) and v == pytest.approx(0.002, abs=3e-4)
    assert s == pytest.approx(1.5, abs=0.05)
    flat = StepTimeFit(memory=1.0)
    for _ in range(400):  # batch 1: every step drafts at the same extra cost; the fixed part goes to o
        flat.add(0.001, 0.004)
    o, v, s = flat.solve()
    assert s == pytest.approx(1.0, abs=0.1) and o == pytest.approx(0.003, abs=3e-4) and abs(v) < 1e-4


def test_a_drafted_steps_fixed_extra_is_learned_and_raises_the_bar():
    """At batch 64 one request has a node that is surely accepted (+1/64 tokens) at the grid's
    0.2% of a step: drafted. Once steps show that any drafted step costs 3% more than the grid
    says, whatever its size, that node is no longer worth a step."""
    c = with_rate(0.5, max_k=1)
    c.min_gain, c.cost = 0.0, synthetic_cost(0.002)
    e = torch.ones(64, 2, dtype=torch.float64)
    e[0, 1] = 2.0
    c.stats.expected_tokens = lambda *a, **k: e
    assert int(c.choose(64).sum()) == 1
    step = c.step_cost(64, 64)
    for i in range(300):  # half the steps plain, the others with 1..16 extra tokens
        j = 0 if i % 2 else i % 16 + 1
        x = c.step_cost(64, 64 + j) - step
        c.fit.add(x, x + 0.03 * step * (j > 0), drafted=j > 0)
    assert c.fit.solve()[1] == pytest.approx(0.03 * step, rel=0.1)
    assert int(c.choose(64).sum()) == 0


def test_fitted_price_of_extra_tokens_changes_the_choice():
    c = with_rate(0.6)
    c.cost = synthetic_cost(0.02)
    cheap = int(c.choose(16).sum())
    grid = c.cost(16, 5) - c.cost(16, 1)  # what 64 extra tokens cost on the grid
    for _ in range(200):  # every extra token turns out 3x dearer than the grid says
        c.fit.add(grid, 3 * grid)
    assert 0 <= int(c.choose(16).sum()) < cheap


def asking(c, d):
    """ask(steps, accepted, B): run `steps` steps at batch B; where the controller asks the drafter,
    asking costs d seconds and the draft (4 nodes a request, or none) brings `accepted` tokens a
    request. A plain step costs 1 s. Returns the steps that asked."""

    def ask(steps, accepted, B=4):
        asked = []
        for _ in range(steps):
            asked.append(c.worth_drafting(B))
            if asked[-1]:
                n = 4 if accepted else 0
                c.choose(B, count=torch.full((B,), n))
                drafted = torch.full((B,), n)
                got = torch.full((B,), accepted)
                c.observe(drafted, got, draft_seconds=d, step_seconds=1.0 + d + (0.1 if n else 0.0))
        return [i for i, a in enumerate(asked) if a]

    return ask


def test_asking_the_drafter_backs_off_where_it_does_not_pay_and_resumes_where_it_does():
    """Proposals that come back empty cost drafting time and save nothing: after the first, a
    drafter that is dear to ask (half a plain step) is asked after `explore_every` steps, then
    after twice as many each time, up to `explore_max`. One that brings accepted tokens worth more
    than all that drafting (a token saves a request's share of a step) has it asked every step
    again. A batch size not seen yet starts from the nearest one's record; with no record at all
    the controller is optimistic."""
    c = with_rate(0.9)
    c.cost = synthetic_cost(0.0)  # a plain step costs 1 s
    c.explore_max = 32
    ask = asking(c, d=0.5)

    assert c.explore_every == 8
    useless = ask(120, 0)
    assert useless == [0, 8, 24, 56, 88]  # gaps 8, 16, 32 (the cap), 32
    assert ask(1, 0, B=3) == [] and ask(1, 0, B=64) == []  # the record at batch 4 carries over
    # steps 89-119 were skipped, so the next step asks; it brings 16 tokens (worth 4 s): then every step asks
    assert ask(1 + c.explore_every, 4) == list(range(1 + c.explore_every))
    fresh = with_rate(0.9)
    assert fresh.worth_drafting(16)  # nothing learned yet: ask


@pytest.mark.parametrize("d, every, first", [(0.028, 3, 12), (0.0001, 1, 60), (0.12, 12, 3)])
def test_a_cheap_look_at_a_drafter_that_does_not_pay_is_taken_often(d, every, first):
    """A drafter that finds nothing is asked every step until its asks outweigh one accepted token
    (a request's share of a plain step, 0.25 s at batch 4): 12 asks at 2.8% of a plain step, 3 at
    12%, never at 0.01% (the sums fade by 0.95 an ask: they never pass 0.002 s). From then on, looks cost at
    most `look_budget` (1%) of the plain steps between them: at 2.8% every third step; at 12% every
    12th once the backoff (8, then 16) reaches that."""
    c = with_rate(0.9)
    c.cost = synthetic_cost(0.0)
    assert c.look_budget == 0.01
    asked = asking(c, d)(60, 0)
    assert asked[:first] == list(range(first))
    gaps = [b - a for a, b in zip(asked[first - 1:], asked[first:])]
    assert gaps == ([min(c.explore_every, every)] + [every] * (len(gaps) - 1) if gaps else [])


def test_a_cheap_drafter_whose_tokens_come_now_and_then_is_asked_every_step():
    """Batch 1, as on a 2-core CPU: an ask costs 3% of a plain step and 19 asks in 20 find nothing;
    the 20th drafts and one token is accepted (a whole plain step saved, for 0.7 s of asking). Asking
    pays, so every step asks. Negative control: the bare sums (without the one token of doubt)
    give up on it right after its first empty asks."""
    c = with_rate(0.9)
    c.cost = synthetic_cost(0.0)  # a plain step costs 1 s
    asked, bare = [], []
    for i in range(200):
        entry = c._ledger(1)
        bare.append(entry.saved >= entry.spent)
        asked.append(c.worth_drafting(1))
        lucky = i % 20 == 19
        n = 4 if lucky else 0
        c.choose(1, count=torch.full((1,), n))
        c.observe(torch.full((1,), n), torch.full((1,), int(lucky)), draft_seconds=0.03,
                  step_seconds=1.03 + (0.1 if lucky else 0.0))
    assert all(asked)
    assert not all(bare[:20])


def test_promises_that_verification_does_not_keep_raise_the_bar():
    """The estimates say 0.6 per chain node; verification accepts half of what the chosen sizes
    promise. The controller learns kappa ~ 0.5 and drafts less; kept promises leave it at ~1."""
    def run(keep):
        c = with_rate(0.6)
        c.cost = synthetic_cost(0.02)
        first = int(c.choose(16).sum())
        c.stats.record = lambda *a, **k: None  # keep the firm 0.6 estimates: this tests kappa alone
        for _ in range(300):
            sizes = c.choose(16)
            promised = c._promise
            # accepted chains totalling `keep` x the promise: one token at a time, round robin
            per, left = torch.zeros(16, dtype=torch.long), round(keep * promised)
            while left > 0 and bool((per < sizes).any()):
                for b in (per < sizes).nonzero()[:, 0].tolist()[:left]:
                    per[b] += 1
                    left -= 1
            c.observe(sizes, per)
        return first, int(c.choose(16).sum()), c.kappa

    first, later, kappa = run(0.5)
    assert kappa == pytest.approx(0.5, abs=0.08) and later < first
    first, later, kappa = run(1.0)
    assert kappa == pytest.approx(1.0, abs=0.1) and later == first


def test_a_second_node_is_expected_at_decay_times_the_first_not_its_square():
    # A suffix tree's second node is often a sibling: at a short match, node 0 is accepted 18% of the
    # time and node 1 14% (SmolLM2 on Spec-Bench). A prior of p0 ** 2 = 3% would never offer node 1,
    # hence never learn it.
    s = AcceptanceStats(max_nodes=4, buckets=1, decay=0.8)
    for step in range(100):  # one node offered, accepted every fifth step
        s.record(torch.tensor([1]), torch.tensor([int(step % 5 == 0)]))
    p = s.rates()[0].tolist()
    assert p[0] == pytest.approx(0.2, abs=0.02)
    assert p[1] == pytest.approx(0.8 * p[0], rel=1e-6)


def test_a_plain_step_observed_cheaply_leaves_the_controller_as_a_full_observe_would():
    """`observe_plain` (a step that did not ask the drafter) defers the counts' fade and skips the
    tensor work, but every estimate after it equals what `observe` with an empty draft gives."""
    import copy

    a = with_rate(0.6, max_k=4)
    a.stats.tries[:] = torch.rand(a.stats.tries.shape, generator=torch.Generator().manual_seed(0)) * 50
    a.stats.accepts[:] = a.stats.tries * 0.5
    b = copy.deepcopy(a)
    for step in range(30):
        if step % 7 == 3:  # now and then a drafted step, observed in full by both
            for c in (a, b):
                c.choose(4)
                c.observe(torch.full((4,), 2), torch.tensor([2, 0, 1, 0]), draft_seconds=0.01, step_seconds=1.3)
        else:
            a.observe(torch.zeros(4, dtype=torch.int64), torch.zeros(4, 0, dtype=torch.bool), step_seconds=1.0 + step / 100)
            b.observe_plain(4, step_seconds=1.0 + step / 100)
    assert torch.allclose(a.stats.rates(), b.stats.rates(), rtol=1e-12)
    assert torch.allclose(a.stats.tries, b.stats.tries, rtol=1e-12)
    assert a.fit.solve() == pytest.approx(b.fit.solve(), rel=1e-12)
    assert a.shortfall[4] == pytest.approx(b.shortfall[4]) and a.kappa == pytest.approx(b.kappa)
    assert a.choose(4).tolist() == b.choose(4).tolist()


def test_request_weights_asked_twice_in_a_step_are_computed_once():
    c = SpeculationController(synthetic_cost(0.25))
    remaining = torch.tensor([10, 30, 20, 30])
    w = c.request_weights(4, remaining)
    assert c.request_weights(4, remaining) is w  # the same tensor: a lookup
    again = c.request_weights(4, remaining.clone())
    assert again is not w and again.tolist() == w.tolist()
    c.fit.add(0.0, 0.5, False)  # a step later the fitted fixed work moved: recomputed
    assert c.request_weights(4, remaining) is not w


def test_each_request_learns_its_own_factor():
    """Two requests in one match-length bucket (firm estimates of 0.6 a chain node): one accepts all it
    is offered, the other nothing. Each request's factor moves apart and the failing one stops
    drafting; with per-request factors off both keep the same size (the control)."""
    def run(request_prior):
        c = with_rate(0.6)
        c.cost = synthetic_cost(0.02)
        c.request_prior = request_prior
        c.stats.record = lambda *a, **k: None  # firm estimates: this tests the factors alone
        c.start(2)
        for _ in range(60):
            sizes = c.choose(2)
            c.observe(sizes, torch.stack([sizes[0], torch.tensor(0)]))
        return c.choose(2).tolist(), c.request_kappa(2)

    (good, bad), factor = run(4.0)
    assert factor[0] > 1.5 and factor[1] < 0.2
    assert good > 0 and bad == 0
    (good, bad), factor = run(None)
    assert good == bad > 0 and factor.tolist() == [1.0, 1.0]


def test_a_request_keeps_its_factor_when_others_leave():
    c = with_rate(0.6)
    c.start(3)
    c._requests[:] = [[10.0, 10.0, 10.0], [0.0, 10.0, 30.0]]
    before = c.request_kappa(3)
    c.retain(torch.tensor([2, 0]))
    assert c.request_kappa(2).tolist() == [before[2], before[0]]
    c.start(4)
    assert c.request_kappa(4).tolist() == [1.0] * 4


def test_the_engine_tells_the_controller_which_requests_stay(tmp_path, monkeypatch):
    from drafters.ngram import NgramDrafter
    from specdec.generate import make_controller

    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path))
    m = tiny_model(vocab=64, hidden=32, layers=2, heads=4, kv_heads=2, ffn=48, seed=3)
    prompts = [[5, 9, 11, 5, 9], [7] * 9, [12, 40, 33, 8, 19]]
    ar = specdec.generate(m, prompts, max_new_tokens=16).token_ids
    # an EOS that ends the first request early and no other: a request leaves mid-batch
    eos = next(t for t in ar[0][2:] if t not in ar[1] and t not in ar[2])
    m.config.eos_token_ids = (eos,)
    seen = {"drafter": [], "controller": []}

    class Spy(NgramDrafter):
        def retain(self, index):
            seen["drafter"].append(index.tolist())
            return super().retain(index)

    spy = Spy()
    controller = make_controller(m, "auto", spy)
    real_retain = controller.retain
    controller.retain = lambda index: seen["controller"].append(index.tolist()) or real_retain(index)
    out = specdec.generate(m, prompts, max_new_tokens=16, drafter=spy, num_draft_tokens="auto")
    assert out.token_ids == specdec.generate(m, prompts, max_new_tokens=16).token_ids
    assert seen["controller"] == seen["drafter"] and seen["drafter"]
    assert controller._requests.shape[1] == len(seen["drafter"][-1])


def test_a_shadow_look_costs_the_drafting_and_tells_the_ledger_what_drafting_would_have_done():
    """At a look at a drafter that has not paid (batch 4, plain step 1.04 s, each extra token 0.01 s),
    the draft is sized as a drafted step would be, and its verdicts, read off the tokens that came,
    go to the ledger as that step's: the accepted tokens' worth saved, the look plus the predicted
    price of the sized draft spent. Looks are then spaced by what a look costs (`look_budget`), and
    one whose draft would have paid turns the ledger: the next ask is a real one."""
    import math

    from specdec.controller import Ledger

    c = with_rate(0.9)
    c.cost = synthetic_cost(0.01)
    B, m = 4, c.ledger_memory
    c.ledger[B] = Ledger(saved=0.0, spent=2.0, asks=20.0, interval=8)
    assert [c.worth_drafting(B) for _ in range(8)] == [False] * 7 + [True] and c.shadow_look
    record = c.choose_shadow(B, count=torch.full((B,), 4))
    assert record["sizes"].tolist() == [4] * B
    assert c._promise is None and c._weights is None  # the step itself is a plain one
    tries = float(c.stats.tries.sum())
    c.observe_shadow(record, torch.full((B,), 4), torch.zeros(B, 4, dtype=torch.bool), look_seconds=0.02)
    assert float(c.stats.tries.sum()) == pytest.approx(tries * c.stats.memory + 16)
    plain, drafted = c.step_seconds(B, 16)[[0, -1]]
    entry = c.ledger[B]
    assert entry.saved == 0.0 and entry.spent == pytest.approx(m * 2.0 + 0.02 + drafted - plain)
    assert entry.looks == 1.0 and c.look_interval(B) == math.ceil(0.02 / (c.look_budget * plain)) == 2

    # a look before every verdict is in (requests left the batch) teaches the statistics alone
    c.observe_shadow(record, torch.full((B,), 2), torch.zeros(B, 4, dtype=torch.bool), look_seconds=0.02,
                     settled=False)
    assert c.ledger[B].asks == pytest.approx(m * 20 + 1)

    asked = [c.worth_drafting(B) for _ in range(2)]
    assert asked == [False, True] and c.shadow_look  # every second step: a look costs 2% of a step
    record = c.choose_shadow(B, count=torch.full((B,), 4))
    c.observe_shadow(record, torch.full((B,), 4), torch.ones(B, 4, dtype=torch.bool), look_seconds=0.02)
    assert c.proposals_pay(B)
    assert c.worth_drafting(B) and not c.shadow_look
