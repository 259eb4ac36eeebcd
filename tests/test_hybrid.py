"""SAM-Decoding's adaptive combination (drafters/hybrid.py): the per-request rule, merged trees,
call forwarding, and lossless decoding with a fake primary, n-gram and (if present) SAM."""

import pytest
import torch

import specdec
from drafters import Drafter, DraftTree, make_drafter
from drafters.corpus import Corpus
from drafters.hybrid import HybridDrafter
from drafters.ngram import NgramDrafter
from drafters.token_recycling import TokenRecyclingDrafter
from tiny_models import tiny_model

VOCAB = 64
PROMPTS = [[5, 9, 11], [7] * 9, [3], [12, 40, 33, 8, 19], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]]


class Recorder(Drafter):
    """Logs every call and keeps a per-row id list that `retain` must reorder."""

    def __init__(self, inner=None):
        self.inner, self.calls, self.rows = inner or Drafter(), [], None

    def _log(self, name, *args):
        self.calls.append(name)
        return getattr(self.inner, name)(*args)

    def prepare(self, vocab_size, device):
        self._log("prepare", vocab_size, device)

    def start(self, history, lens):
        self.rows = list(range(history.shape[0]))
        self._log("start", history, lens)

    def propose(self, history, lens, max_nodes):
        return self._log("propose", history, lens, max_nodes)

    def observe(self, tokens, logits, num_nodes):
        self._log("observe", tokens, logits, num_nodes)

    def update(self, history, lens, accepted):
        self._log("update", history, lens, accepted)

    def retain(self, index):
        self.rows = [self.rows[i] for i in index.tolist()]
        self._log("retain", index)

    def finish(self):
        self._log("finish")


class FakePrimary(Drafter):
    """Drafts a chain of `width` tokens 50 + b + k, claiming match_len[b] (cycled per step)."""

    def __init__(self, match_lens, width=3):
        self.match_lens, self.width, self.step = match_lens, width, 0

    def propose(self, history, lens, max_nodes):
        B, K = history.shape[0], min(self.width, max_nodes)
        ml = self.match_lens[self.step % len(self.match_lens)]
        self.step += 1
        tokens = (50 + torch.arange(B).view(B, 1) + torch.arange(K)) % VOCAB  # (B, K)
        draft = DraftTree.chains(tokens, torch.full((B,), K))
        draft.match_len = torch.tensor([ml[b % len(ml)] for b in range(B)])
        return draft


class FakeHelper(Drafter):
    """A two-level tree of `width` nodes: node 0 under the root, the rest its children."""

    def __init__(self, width=8):
        self.width = width

    def propose(self, history, lens, max_nodes):
        B, K = history.shape[0], min(self.width, max_nodes)
        tokens = (10 + torch.arange(B).view(B, 1) * 2 + torch.arange(K)) % VOCAB
        parents = torch.tensor([-1] + [0] * (K - 1))[:K].expand(B, K)
        return DraftTree(tokens, parents, torch.full((B,), K) - torch.arange(B) % 2)


def padded(draft, b, K):
    c = draft.count[b].item()
    t, p = draft.tokens[b, :c].tolist(), draft.parents[b, :c].tolist()
    return t + [0] * (K - c), p + [-1] * (K - c), c


@pytest.mark.parametrize("widths", [(3, 8), (8, 3), (5, 5), (0, 4)], ids=["primary<helper", "primary>helper",
                                                                          "equal", "primary-empty"])
def test_rule_and_merge(widths):
    wp, wh = widths
    match_len = [0, 4, 5, 9, -1, 5]
    primary, helper = FakePrimary([match_len], wp), FakeHelper(wh)
    hybrid = HybridDrafter(primary=Recorder(primary), helper=Recorder(helper), threshold=5)
    B = len(match_len)
    history, lens = torch.randint(0, VOCAB, (B, 7)), torch.tensor([1, 2, 3, 7, 5, 6])
    hybrid.prepare(VOCAB, "cpu")
    draft = hybrid.propose(history, lens, 8)
    primary.step = 0
    p, h = primary.propose(history, lens, 8), helper.propose(history, lens, 8)
    K = max(wp, wh)
    assert draft.tokens.shape == draft.parents.shape == (B, K)
    assert draft.match_len.tolist() == match_len
    for b, m in enumerate(match_len):
        want = padded(p if m >= 5 else h, b, K)
        assert (draft.tokens[b].tolist(), draft.parents[b].tolist(), draft.count[b].item()) == want, b
        c = draft.count[b].item()
        assert all(-1 <= q < k for k, q in enumerate(draft.parents[b, :c].tolist()))
        assert draft.parents[b, c:].eq(-1).all()  # padding hangs off the root, beyond count
    assert hybrid.last_use_primary.tolist() == [m >= 5 for m in match_len]
    assert hybrid.uses == {"primary": 3, "helper": 3}
    hybrid.propose(history, lens, 8)
    assert hybrid.uses == {"primary": 6, "helper": 6}  # counted per request-step
    hybrid.prepare(VOCAB, "cpu")
    assert hybrid.uses == {"primary": 0, "helper": 0}  # per generate call


@pytest.mark.parametrize("threshold", [0, 1, 3, 100])
def test_threshold(threshold):
    match_len = [0, 1, 2, 3, 4]
    hybrid = HybridDrafter(primary=FakePrimary([match_len]), helper=FakeHelper(), threshold=threshold)
    hybrid.propose(torch.zeros(5, 4, dtype=torch.long), torch.full((5,), 4), 8)
    assert hybrid.last_use_primary.tolist() == [m >= threshold for m in match_len]


def test_primary_without_match_len_is_an_error():
    hybrid = HybridDrafter(primary=FakeHelper(), helper=FakeHelper())
    with pytest.raises(ValueError, match="match_len"):
        hybrid.propose(torch.zeros(2, 4, dtype=torch.long), torch.full((2,), 4), 8)


def test_bad_options():
    with pytest.raises(ValueError, match="threshold"):
        HybridDrafter(primary=FakePrimary([[0]]), helper=FakeHelper(), threshold=-1)
    with pytest.raises(ValueError, match="corpus"):
        HybridDrafter(primary=FakePrimary([[0]]), helper=FakeHelper(), corpus=object())


@pytest.fixture(scope="module")
def model():
    return tiny_model(vocab=VOCAB, hidden=32, layers=2, heads=4, kv_heads=2, ffn=48, seed=3)


@pytest.fixture(scope="module")
def reference(model):
    return specdec.generate(model, PROMPTS, max_new_tokens=24).token_ids


def test_every_call_reaches_both_and_retain_reorders_both(model, reference):
    # Per step and row the fake claims a long or a short match, so both sides draft.
    primary = Recorder(FakePrimary([[9, 0, 5], [0, 7], [2]]))
    helper = Recorder(TokenRecyclingDrafter())
    hybrid = HybridDrafter(primary=primary, helper=helper, threshold=5)
    out = specdec.generate(model, PROMPTS, max_new_tokens=24, drafter=hybrid, num_draft_tokens=8)
    assert out.token_ids == reference  # lossless with wrong primary drafts and recycled ones
    assert primary.calls == helper.calls
    assert primary.calls[:2] == ["prepare", "start"] and primary.calls[-1] == "finish"
    for name in ("propose", "observe", "update", "retain"):
        assert name in primary.calls
    # Requests finish at different steps, so retain dropped rows; both kept the same survivors.
    assert primary.rows == helper.rows and len(primary.rows) < len(PROMPTS)
    uses = hybrid.uses
    assert uses["primary"] > 0 and uses["helper"] > 0
    assert sum(uses.values()) == sum(out.stats["accepted_length_histogram"].values())  # request-steps


def test_lossless_ngram_primary(model, reference):
    # NgramDrafter reports match_len too: long matches take its chain, short ones recycled tokens.
    hybrid = HybridDrafter(primary=NgramDrafter(max_ngram=4), helper=TokenRecyclingDrafter(), threshold=2)
    out = specdec.generate(model, PROMPTS, max_new_tokens=24, drafter=hybrid, num_draft_tokens=8)
    assert out.token_ids == reference
    assert hybrid.uses["primary"] > 0 and hybrid.uses["helper"] > 0
    assert out.stats["mean_accepted_tokens"] > 1.5


def test_lossless_default_sam_primary(model, reference):
    pytest.importorskip("drafters.suffix_automaton")
    try:
        hybrid = make_drafter("hybrid", threshold=2)
    except Exception as e:  # the module exists but does not work yet
        pytest.skip(f"SAMDrafter unavailable: {e!r}")
    assert type(hybrid.primary).__name__ == "SAMDrafter" and hybrid.primary.static_bias == 5
    out = specdec.generate(model, PROMPTS, max_new_tokens=24, drafter=hybrid, num_draft_tokens=8)
    assert out.token_ids == reference
    assert hybrid.uses["primary"] > 0 and hybrid.uses["helper"] > 0


def test_corpus_reaches_the_default_helper():
    corpus = Corpus([[3, 4, 3, 5]], 16)
    hybrid = HybridDrafter(corpus=corpus)
    assert hybrid.primary.corpus is corpus and hybrid.helper.corpus is corpus
    own = HybridDrafter(primary=FakePrimary([[0]]), corpus=corpus)  # the default helper still gets it
    assert own.helper.corpus is corpus
