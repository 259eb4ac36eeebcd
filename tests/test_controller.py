"""The speculation-length controller on synthetic cost and acceptance curves, and "auto" end to end."""

import pytest
import torch

import specdec
from specdec.controller import AcceptanceStats, CostModel, SpeculationController
from specdec.profiling import nvtx_range
from tiny_models import tiny_model

BATCHES, WIDTHS = (1, 4, 16, 64), (1, 2, 3, 5, 9, 17)


def synthetic_cost(per_token):
    """A step costs 1 (weights read once) + per_token x (tokens in the forward): a roofline in miniature."""
    return CostModel(BATCHES, WIDTHS, [[1.0 + per_token * b * w for w in WIDTHS] for b in BATCHES])


def with_rate(alpha, max_k=16, n=100_000):
    c = SpeculationController(synthetic_cost(0.0), max_k=max_k)
    c.stats = AcceptanceStats(max_depth=max_k, prior=(alpha * n, (1 - alpha) * n))  # a known rate, held firmly
    return c


def best_by_brute_force(alpha, cost, batch, max_k):
    rates = [(1 - alpha ** (k + 1)) / (1 - alpha) * batch / cost(batch, 1 + k) for k in range(max_k + 1)]
    return max(range(max_k + 1), key=rates.__getitem__)


@pytest.mark.parametrize("alpha", [0.3, 0.6, 0.9])
@pytest.mark.parametrize("per_token", [0.002, 0.02, 0.2])
@pytest.mark.parametrize("batch", [1, 4, 16, 64])
def test_picks_the_length_that_maximizes_expected_tokens_per_second(alpha, per_token, batch):
    c = with_rate(alpha)
    c.cost = synthetic_cost(per_token)
    assert c.choose(batch) == best_by_brute_force(alpha, c.cost, batch, c.max_k)


def test_shrinks_toward_zero_as_the_cost_curve_steepens():
    c = with_rate(0.7)
    chosen = []
    for per_token in [0.0, 0.001, 0.01, 0.05, 0.2, 1.0]:
        c.cost = synthetic_cost(per_token)
        chosen.append(c.choose(16))
    assert chosen == sorted(chosen, reverse=True) and chosen[0] > 4 and chosen[-1] == 0


def test_larger_batches_draft_less():
    c = with_rate(0.7)
    c.cost = synthetic_cost(0.01)
    chosen = [c.choose(b) for b in (1, 4, 16, 64)]
    assert chosen == sorted(chosen, reverse=True) and chosen[-1] < chosen[0]


def test_acceptance_is_learned_per_depth_and_match_length():
    s = AcceptanceStats(max_depth=4, buckets=3, prior=(0.5, 0.5))
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


def test_measured_cost_is_cached(tmp_path):
    m = tiny_model(vocab=64, hidden=32, layers=2, heads=4, kv_heads=2, ffn=48)
    a = CostModel.cached(m.net, "tiny", path_dir=tmp_path)
    assert len(list(tmp_path.glob("*.json"))) == 1
    assert CostModel.cached(m.net, "tiny", path_dir=tmp_path).seconds == a.seconds
    assert all(x > 0 for row in a.seconds for x in row)


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
