"""The model against transformers' LlamaForCausalLM, and the KV cache's invariants."""

import pytest
import torch

from kernels.tree_attention import tree_from_parents
from tiny_models import hf_llama, ours_from_hf, tiny_model

CONFIGS = {
    "mha": dict(heads=4, kv_heads=4),
    "gqa2": dict(heads=4, kv_heads=2),
    "gqa3-odd": dict(hidden=54, heads=9, kv_heads=3, ffn=70, vocab=101),
    "mqa": dict(hidden=36, heads=6, kv_heads=1),
    "head-dim-not-hidden/heads": dict(hidden=40, heads=4, kv_heads=2, head_dim=12),
    "tied": dict(tie=True),
    "llama3-rope": dict(rope_scaling=True),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_equal_transformers(name):
    hf = hf_llama(**CONFIGS[name])
    ours = ours_from_hf(hf).net
    vocab = hf.config.vocab_size
    ids = torch.randint(0, vocab, (2, 100), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
    out = ours(ids, ours.new_cache(2, 128))
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def tiny():
    return ours_from_hf(hf_llama(vocab=64, hidden=32, layers=2, heads=4, kv_heads=2, ffn=48)).net


def ids(n, seed=0, batch=1):
    return torch.randint(0, 64, (batch, n), generator=torch.Generator().manual_seed(seed))


def test_token_by_token_equals_all_at_once(tiny):
    x = ids(17)
    full = tiny(x, tiny.new_cache(1, 32))
    cache = tiny.new_cache(1, 32)
    steps = []
    for t in range(17):
        steps.append(tiny(x[:, t : t + 1], cache))
        cache.advance(torch.ones(1, dtype=torch.int32))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_chunked_prefill_equals_all_at_once(tiny):
    x = ids(20, seed=3)
    full = tiny(x, tiny.new_cache(1, 32))
    cache = tiny.new_cache(1, 32)
    parts = []
    for a, b in [(0, 7), (7, 8), (8, 20)]:
        parts.append(tiny(x[:, a:b], cache))
        cache.advance(torch.tensor([b - a], dtype=torch.int32))
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


def test_rollback_then_reappend_equals_never_appended(tiny):
    x, junk = ids(10, seed=1), ids(6, seed=2)
    clean = tiny.new_cache(1, 32)
    tiny(x, clean)
    clean.advance(torch.tensor([10], dtype=torch.int32))
    dirty = tiny.new_cache(1, 32)
    tiny(torch.cat([x, junk], dim=1), dirty)
    dirty.advance(torch.tensor([16], dtype=torch.int32))
    dirty.rollback(torch.tensor([10]))
    nxt = ids(3, seed=4)
    torch.testing.assert_close(tiny(nxt, dirty), tiny(nxt, clean), atol=1e-5, rtol=1e-5)


def test_commit_tree_path_equals_feeding_only_the_path(tiny):
    prefix = ids(9, seed=5)
    #        node: 0   1  2  3  4  5  6  7
    parents = torch.tensor([[-1, 0, 0, 1, 1, 3, 2, 5]])
    tokens = ids(8, seed=6)
    path = torch.tensor([[0, 1, 3, 5, 7]])  # root -> 1 -> 3 -> 5 -> 7
    tree = tree_from_parents(parents)
    depth = tree.sum(-1) - 1  # (1, N)

    cache = tiny.new_cache(1, 32)
    tiny(prefix, cache)
    cache.advance(torch.tensor([9], dtype=torch.int32))
    tree_logits = tiny(tokens, cache, positions=9 + depth, tree=tree)
    cache.commit(path, torch.tensor([5]))

    ref_cache = tiny.new_cache(1, 32)
    tiny(prefix, ref_cache)
    ref_cache.advance(torch.tensor([9], dtype=torch.int32))
    path_logits = tiny(tokens[:, path[0]], ref_cache)
    ref_cache.advance(torch.tensor([5], dtype=torch.int32))
    # each node's logits in the tree equal the chain's at the same depth
    torch.testing.assert_close(tree_logits[:, path[0]], path_logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(cache.lens, ref_cache.lens)
    n = int(cache.lens)
    torch.testing.assert_close(cache.k[:, :, :, :n], ref_cache.k[:, :, :, :n], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(cache.v[:, :, :, :n], ref_cache.v[:, :, :, :n], atol=1e-6, rtol=1e-6)
    nxt = ids(2, seed=7)
    torch.testing.assert_close(tiny(nxt, cache), tiny(nxt, ref_cache), atol=1e-5, rtol=1e-5)


def test_commit_of_the_root_alone_keeps_it_in_place(tiny):
    cache = tiny.new_cache(2, 16)
    tiny(ids(4, seed=40, batch=2), cache)
    before = cache.k.clone()
    cache.commit(torch.zeros(2, 1, dtype=torch.int64), torch.tensor([1, 1]))
    assert cache.lens.tolist() == [1, 1] and torch.equal(cache.k, before)
    ref = tiny.new_cache(2, 16)  # fed only the first token of each row
    tiny(ids(4, seed=40, batch=2)[:, :1], ref)
    ref.advance(torch.ones(2, dtype=torch.int32))
    nxt = ids(1, seed=41, batch=2)
    torch.testing.assert_close(tiny(nxt, cache), tiny(nxt, ref), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("paths, counts, moves", [
    ([[0, 1, 2, 3], [0, 1, -1, -1]], [4, 2], False),  # chains of the first nodes: already in place
    ([[0, 1, 2, 3], [0, 2, 3, -1]], [4, 3], True),  # row 1 skips node 1: its nodes 2, 3 move down
])
def test_commit_moves_only_a_path_that_is_not_in_place(tiny, paths, counts, moves):
    """Each row keeps its path's nodes, as if fed only them; where every row's path is its first
    nodes, nothing is copied."""
    x = ids(4, seed=42, batch=2)
    tree = tree_from_parents(torch.tensor([[-1, 0, 1, 2], [-1, 0, 0, 2]]))  # a chain; a fork at the root
    cache = tiny.new_cache(2, 16)
    tiny(x, cache, positions=tree.sum(-1) - 1, tree=tree)
    before = cache.k.clone()
    cache.commit(torch.tensor(paths).clamp(min=0), torch.tensor(counts))
    assert cache.lens.tolist() == counts
    assert torch.equal(cache.k, before) != moves
    for b, (path, n) in enumerate(zip(paths, counts)):
        ref = tiny.new_cache(1, 16)
        tiny(x[b : b + 1, path[:n]], ref)
        torch.testing.assert_close(cache.k[:, b, :, :n], ref.k[:, 0, :, :n], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(cache.v[:, b, :, :n], ref.v[:, 0, :, :n], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("alive", [[1, 0, 1, 1, 0, 1], [0, 0, 0, 0, 1, 1], [1, 1, 1, 1, 1, 0], [0, 1, 0, 0, 0, 0]])
def test_survivors_move_only_rows_past_the_new_batch(alive):
    from specdec.model import survivors

    alive = torch.tensor(alive, dtype=torch.bool)
    index = survivors(alive)
    n = int(alive.sum())
    assert sorted(index.tolist()) == alive.nonzero()[:, 0].tolist()  # every survivor once
    stay = index == torch.arange(n)
    assert torch.equal(stay, alive[:n])  # a survivor within the new batch keeps its row


@pytest.mark.parametrize("index", [[3, 1, 5, 2], [4, 5], [2, 0, 1], [0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0]])
def test_reorder_equals_gathering_the_kept_rows(tiny, index):
    cache = tiny.new_cache(6, 16)
    tiny(ids(5, seed=42, batch=6), cache)
    cache.advance(torch.arange(6, dtype=torch.int32) + 1)
    k, v, lens = cache.k.clone(), cache.v.clone(), cache.lens.clone()
    index = torch.tensor(index)
    cache.reorder(index)
    assert torch.equal(cache.k, k[:, index]) and torch.equal(cache.v, v[:, index])
    assert torch.equal(cache.lens, lens[index])
    nxt = ids(1, seed=43, batch=len(index))  # and it goes on decoding from there
    ref = tiny.new_cache(len(index), 16)
    ref.k.copy_(k[:, index]), ref.v.copy_(v[:, index]), ref.lens.copy_(lens[index])
    torch.testing.assert_close(tiny(nxt, cache), tiny(nxt, ref), atol=1e-6, rtol=1e-6)


def test_ragged_batch_equals_each_alone(tiny):
    seqs = [ids(n, seed=10 + n)[0] for n in (3, 11, 1, 7)]
    B, N = len(seqs), 11
    tokens = torch.zeros(B, N, dtype=torch.long)
    for b, s in enumerate(seqs):
        tokens[b, : len(s)] = s
    lens = torch.tensor([len(s) for s in seqs], dtype=torch.int32)
    cache = tiny.new_cache(B, 32)
    batch_logits = tiny(tokens, cache, num_new=lens)
    cache.advance(lens)
    nxt = ids(2, seed=20, batch=B)
    batch_next = tiny(nxt, cache)
    for b, s in enumerate(seqs):
        alone = tiny.new_cache(1, 32)
        logits = tiny(s.view(1, -1), alone)
        alone.advance(torch.tensor([len(s)], dtype=torch.int32))
        torch.testing.assert_close(batch_logits[b, : len(s)], logits[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(batch_next[b], tiny(nxt[b : b + 1], alone)[0], atol=1e-5, rtol=1e-5)


def test_logits_at_selects_rows(tiny):
    x = ids(8, seed=8, batch=2)
    full = tiny(x, tiny.new_cache(2, 16))
    at = torch.tensor([[7], [3]])
    picked = tiny(x, tiny.new_cache(2, 16), logits_at=at)
    torch.testing.assert_close(picked[:, 0], full[torch.arange(2), at[:, 0]], atol=1e-6, rtol=1e-6)


def test_ragged_trees_run_packed_and_equal_each_alone(tiny):
    """Trees of 1, 4 and 2 nodes in one forward: only the 7 real tokens go through the matrix
    products; every node's logits equal its request's tree run alone, padding rows are zero."""
    prefix = ids(6, seed=30, batch=3)
    parents = torch.tensor([[-1, -1, -1, -1], [-1, 0, 0, 1], [-1, 0, -1, -1]])
    num_new = torch.tensor([1, 4, 2], dtype=torch.int32)
    tokens = ids(4, seed=31, batch=3)
    tree = tree_from_parents(parents)
    positions = 6 + tree.sum(-1) - 1
    cache = tiny.new_cache(3, 16)
    tiny(prefix, cache)
    cache.advance(torch.full((3,), 6, dtype=torch.int32))
    logits = tiny(tokens, cache, positions=positions, num_new=num_new, tree=tree)
    for b, n in enumerate(num_new.tolist()):
        alone = tiny.new_cache(1, 16)
        tiny(prefix[b : b + 1], alone)
        alone.advance(torch.tensor([6], dtype=torch.int32))
        ref = tiny(tokens[b : b + 1, :n], alone, positions=positions[b : b + 1, :n], tree=tree[b : b + 1, :n, :n])
        torch.testing.assert_close(logits[b, :n], ref[0], atol=1e-5, rtol=1e-5)
        assert torch.all(logits[b, n:] == 0)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")
@pytest.mark.parametrize("pad_to", [(), (0, 5, 5), (0, 1, 3, 3, 8)], ids=["unpadded", "1-2-to-5", "2-to-3-4-to-8"])
@pytest.mark.parametrize("shape", [(1, 1), (1, 2), (2, 1), (3,), (1, 4), (2, 3), (7,)])
def test_prepacked_linear_equals_f_linear_at_every_row_count(shape, pad_to):
    """The oneDNN-packed path, padded as pad_to says, returns exactly the rows asked for, each equal
    to F.linear's."""
    from specdec.model import Linear

    g = torch.Generator().manual_seed(sum(shape))
    layer = Linear(48, 80, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(80, 48, generator=g))
    x = torch.randn(*shape, 48, generator=g)
    ref = torch.nn.functional.linear(x, layer.weight)
    layer.pack()
    layer.pad_to = pad_to
    with torch.inference_mode():
        out = layer(x)
    assert out.shape == (*shape, 80)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("seconds, expected", [
    # 1 and 2 rows slower than 5 (the machine of 2026-11-25): both padded to 5; 3 and 4 gain too little
    ({1: 1.00, 2: 1.10, 3: 0.94, 4: 0.93, 5: 0.92, 6: 1.2, 7: 1.3, 8: 1.4}, (0, 5, 5, 3, 4)),
    # cost rising with rows (2026-12-04): nothing padded
    ({1: 0.36, 2: 0.40, 3: 0.41, 4: 0.49, 5: 0.50, 6: 0.54, 7: 0.57, 8: 0.59}, (0, 1, 2, 3, 4)),
    # a faster count only 2% faster (inside min_gain): not padded
    ({1: 1.00, 2: 0.98, 3: 1.5, 4: 1.6, 5: 1.7, 6: 1.8, 7: 1.9, 8: 2.0}, (0, 1, 2, 3, 4)),
], ids=["pad-to-5", "rising", "within-min-gain"])
def test_calibrated_padding_takes_the_fastest_row_count_that_beats_the_unpadded_one(seconds, expected):
    from specdec.model import calibrate_padding

    calls = []

    def timer(rows):
        calls.append(rows)
        return seconds[rows]

    assert calibrate_padding(None, rounds=3, timer=timer) == expected
    assert calls == list(range(1, 9)) * 4  # every count once a round, interleaved, one warm-up round


def test_calibration_of_a_large_model_takes_fewer_rounds():
    from specdec.model import calibrate_padding

    calls = []

    def timer(rows):  # a pass of 1 s: 8 s a round, so a 30 s budget allows 3 rounds, not 7
        calls.append(rows)
        return 1.0 + 0.01 * rows

    assert calibrate_padding(None, timer=timer, budget_s=30.0) == (0, 1, 2, 3, 4)
    assert len(calls) == 8 * (1 + 3)


def test_calibrated_padding_uses_medians_not_single_runs():
    """One slow spell on the unpadded count must not make padding look better."""
    from specdec.model import calibrate_padding

    runs = iter([1.0] * 8 + [5.0, *[0.9 + 0.1 * n for n in range(2, 9)]] + [0.5, *[0.9 + 0.1 * n for n in range(2, 9)]] * 2)
    assert calibrate_padding(None, max_rows=1, rounds=3, timer=lambda rows: next(runs)) == (0, 1)


def test_cpu_padding_is_measured_once_per_machine_and_shapes(tmp_path, monkeypatch):
    from specdec import loading

    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path))
    monkeypatch.setattr(loading, "PADDING_MIN_BYTES", 0)
    calls = []
    monkeypatch.setattr(loading, "calibrate_padding", lambda net: calls.append(net) or (0, 5, 5, 3, 4))
    a, _ = tiny_model(), tiny_model(hidden=64, heads=4, kv_heads=2)
    calls.clear()
    assert loading.cpu_padding(a.net) == (0, 5, 5, 3, 4) and calls == []  # cached when a was built
    assert [m.pad_to for m in (a.net.lm_head, a.net.layers[0].mlp.down)] == [(0, 5, 5, 3, 4)] * 2
    assert len(list((tmp_path / "costs").glob("padding-*.json"))) == 2  # one per set of weight shapes


def test_small_models_are_not_calibrated(monkeypatch):
    from specdec import loading

    monkeypatch.setattr(loading, "calibrate_padding", lambda net: pytest.fail("calibrated a test model"))
    assert tiny_model().net.lm_head.pad_to == ()
