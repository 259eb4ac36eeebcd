"""profiling/retrieval_headroom.py: its oracle and its acceptance rule against brute force."""

import importlib.util
import random
from pathlib import Path

import pytest

from drafters.suffix_tree import SuffixTree

spec = importlib.util.spec_from_file_location(
    "retrieval_headroom", Path(__file__).parents[1] / "profiling" / "retrieval_headroom.py")
headroom = importlib.util.module_from_spec(spec)
spec.loader.exec_module(headroom)


def brute_oracle(sources, context, future, c, max_nodes):
    """Longest L: context[-c:] + future[:L] is a substring of a source, followed there by more tokens
    when L = 0 (a draft needs a continuation)."""
    head, best = context[-c:], 0
    for L in range(1, min(max_nodes, len(future)) + 1):
        pat = head + future[:L]
        if any(src[i : i + len(pat)] == pat for src in sources for i in range(len(src) - len(pat) + 1)):
            best = L
        else:
            break
    return best


@pytest.mark.parametrize("seed", range(4))
def test_oracle_run_equals_brute_force(seed):
    rng = random.Random(seed)
    sources = [[rng.randrange(4) for _ in range(rng.randrange(5, 40))] for _ in range(3)]
    trees = []
    for group in (sources[:2], sources[2:]):
        tree = SuffixTree(max_depth=16)
        for src in group:
            tree.add_sequence(src)
        trees.append(tree)
    runs = []
    for _ in range(60):
        context = [rng.randrange(4) for _ in range(5)]
        future = [rng.randrange(4) for _ in range(rng.randrange(0, 8))]
        c, max_nodes = rng.randrange(1, 4), rng.randrange(1, 9)
        got = headroom.oracle_run(trees, context, future, c, max_nodes)
        assert got == brute_oracle(sources, context, future, c, max_nodes), (context, future, c, max_nodes)
        runs.append(got)
    assert 0 < max(runs)  # the cases reach past the trivial answer


def brute_accepted(tokens, parents, future):
    """Deepest node whose root path spells future's prefix."""
    best = 0
    for i in range(len(tokens)):
        path, j = [], i
        while j >= 0:
            path.append(tokens[j])
            j = parents[j]
        path.reverse()
        if path == future[: len(path)]:
            best = max(best, len(path))
    return best


@pytest.mark.parametrize("seed", range(4))
def test_accepted_length_equals_brute_force(seed):
    rng = random.Random(seed)
    for _ in range(100):
        n = rng.randrange(0, 10)
        parents = [rng.randrange(-1, i) for i in range(n)]
        tokens = [rng.randrange(3) for _ in range(n)]
        future = [rng.randrange(3) for _ in range(rng.randrange(0, 6))]
        assert headroom.accepted_length(tokens, parents, future) == brute_accepted(tokens, parents, future)


def test_accepted_length_follows_the_path_not_any_matching_token():
    # node 1 holds future[1] but hangs below a wrong first token: nothing past the root is accepted
    assert headroom.accepted_length([9, 5], [-1, 0], [4, 5]) == 0
    assert headroom.accepted_length([9, 4, 5], [-1, -1, 1], [4, 5, 6]) == 2
