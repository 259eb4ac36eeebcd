"""The generate API on tiny models: validation, batching, EOS, seeded sampling."""

import pytest
import torch

import specdec
from tiny_models import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model(vocab=64, hidden=32, layers=2, heads=4, kv_heads=2, ffn=48, seed=3)


PROMPTS = [[5, 9, 11], [7] * 9, [3], [12, 40, 33, 8, 2 + 17]]


def test_greedy_matches_stepwise_argmax(model):
    out = specdec.generate(model, PROMPTS[0], max_new_tokens=12)
    seq = list(PROMPTS[0])
    net = model.net
    for _ in range(len(out.token_ids[0])):
        logits = net(torch.tensor([seq]), net.new_cache(1, 64))[0, -1]
        seq.append(int(torch.argmax(logits)))
    assert out.token_ids[0] == seq[len(PROMPTS[0]):]


def test_ragged_batch_equals_each_alone(model):
    batch = specdec.generate(model, PROMPTS, max_new_tokens=10)
    for p, ids in zip(PROMPTS, batch.token_ids):
        assert specdec.generate(model, p, max_new_tokens=10).token_ids[0] == ids


def test_stops_at_eos_and_max_new_tokens(model):
    out = specdec.generate(model, PROMPTS[1], max_new_tokens=20)
    ids = out.token_ids[0]
    eos = model.config.eos_token_ids
    assert len(ids) <= 20
    # make the 4th generated token an EOS: the output must end right there
    model.config.eos_token_ids = (ids[3],)
    try:
        stopped = specdec.generate(model, PROMPTS[1], max_new_tokens=20).token_ids[0]
    finally:
        model.config.eos_token_ids = eos
    first = ids.index(ids[3])
    assert stopped == ids[: first + 1]
    assert len(specdec.generate(model, PROMPTS[1], max_new_tokens=1).token_ids[0]) == 1


def test_requests_that_stop_early_leave_the_batch_without_changing_the_others(model):
    """AR drops a request from the batch when it emits EOS; the rest decode as they would alone."""
    alone = [specdec.generate(model, p, max_new_tokens=12).token_ids[0] for p in PROMPTS]
    eos = model.config.eos_token_ids
    model.config.eos_token_ids = (alone[1][2],)  # request 1 stops after 3 tokens
    try:
        want = [specdec.generate(model, p, max_new_tokens=12).token_ids[0] for p in PROMPTS]
        got = specdec.generate(model, PROMPTS, max_new_tokens=12).token_ids
        # the speculative engine too: the last request moves into the leaver's row, with its drafter state
        spec = {d: specdec.generate(model, PROMPTS, max_new_tokens=12, drafter=d, num_draft_tokens=3).token_ids
                for d in ("ngram", "suffix", "recycle")}
    finally:
        model.config.eos_token_ids = eos
    assert len(want[1]) <= 3 and any(len(w) == 12 for w in want)
    assert got == want
    assert spec == {d: want for d in spec}


def test_seeded_sampling_is_reproducible_and_independent_of_neighbours(model):
    kw = dict(max_new_tokens=15, temperature=1.0, seed=7)
    a = specdec.generate(model, [PROMPTS[0], PROMPTS[1]], **kw).token_ids
    b = specdec.generate(model, [PROMPTS[0], PROMPTS[3]], **kw).token_ids
    assert a == specdec.generate(model, [PROMPTS[0], PROMPTS[1]], **kw).token_ids
    assert a[0] == b[0]
    assert a != specdec.generate(model, [PROMPTS[0], PROMPTS[1]], **{**kw, "seed": 8}).token_ids


def test_top_k_1_is_greedy(model):
    greedy = specdec.generate(model, PROMPTS[3], max_new_tokens=10).token_ids
    assert specdec.generate(model, PROMPTS[3], max_new_tokens=10, temperature=0.9, top_k=1, seed=1).token_ids == greedy


def test_stats(model):
    s = specdec.generate(model, PROMPTS, max_new_tokens=5).stats
    assert s["tokens"] == 20 and s["seconds"] > 0 and s["tokens_per_s"] > 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-0.1), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=0), "top_k"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(drafter="nope"), "unknown drafter"),
], ids=["temperature<0", "top_p=0", "top_p>1", "top_k=0", "max_new_tokens=0", "unknown-drafter"])
def test_invalid_parameters(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        specdec.generate(model, PROMPTS[0], **kwargs)


@pytest.mark.parametrize("prompts, match", [
    ([], "non-empty"), ([[]], "empty token list"), ([""], "empty string"), ([[5, 64]], "outside"),
    ("text", "no tokenizer"),
], ids=["no-prompts", "empty-ids", "empty-string", "id-out-of-vocab", "text-without-tokenizer"])
def test_bad_prompts(model, prompts, match):
    with pytest.raises(ValueError, match=match):
        specdec.generate(model, prompts, max_new_tokens=4)


def test_prompt_longer_than_context(model):
    ctx = model.config.max_context
    with pytest.raises(ValueError, match="exceeds the model's context"):
        specdec.generate(model, [[5] * ctx], max_new_tokens=1)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        specdec.generate(model, [[5] * (ctx - 4)], max_new_tokens=8)
