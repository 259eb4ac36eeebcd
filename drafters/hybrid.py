"""SAM-Decoding's adaptive combination (Hu et al., 2024): retrieval when the match is long, a
helper drafter otherwise.

Per request and step, both drafters propose; the request takes the primary's (retrieval) tree when
its match length reaches `threshold`, else the helper's:

    use_primary[b] = primary_draft.match_len[b] >= threshold

`match_len` is read from the primary's DraftTree and must already be the EFFECTIVE length the rule
compares: for the suffix automaton drafter max(dynamic, static - bias), the static (corpus) match
discounted by `bias` (SAMDrafter's `static_bias`, which this class sets for its default primary).
Any drafter that reports match_len can be the primary.

The two trees are padded to the wider one and merged row by row with `where`s (no host sync);
every node past the chosen count is token 0 with parent -1. Both drafters see every call (prepare,
start, observe, update, retain, finish) so their state stays current whichever side drafted.

Shapes: B batch, T history width, K draft nodes.
"""

import torch

from drafters.base import Drafter, DraftTree
from drafters.corpus import Corpus


def _pad(draft: DraftTree, K: int):
    """tokens, parents (B, K), padded with 0 and -1."""
    extra = K - draft.tokens.shape[1]
    tokens = torch.nn.functional.pad(draft.tokens, (0, extra), value=0)
    parents = torch.nn.functional.pad(draft.parents, (0, extra), value=-1)
    return tokens, parents


class HybridDrafter(Drafter):
    """The primary's draft where its match_len >= threshold, the helper's elsewhere.

    primary: default `SAMDrafter(corpus=corpus, static_bias=bias)`; helper: default
    `TokenRecyclingDrafter(corpus=corpus)`. `bias` configures only the default primary, `corpus`
    whichever of the two is the default (an error when neither is).
    `uses` counts request-steps drafted by each side in the current generate call;
    `last_use_primary` (B,) bool is the last step's choice.
    """

    name = "hybrid"

    def __init__(self, primary: Drafter | None = None, helper: Drafter | None = None, threshold: int = 5,
                 bias: int = 5, corpus=None):
        if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 0:
            raise ValueError(f"threshold must be an int >= 0, got {threshold!r}")
        if corpus is not None and primary is not None and helper is not None:
            raise ValueError("corpus configures the default primary and helper; pass it to your own drafters instead")
        corpus = Corpus.of(corpus)  # a path is loaded once, for both
        if primary is None:
            from drafters.suffix_automaton import SAMDrafter

            primary = SAMDrafter(corpus=corpus, static_bias=bias)
        if helper is None:
            from drafters.token_recycling import TokenRecyclingDrafter

            helper = TokenRecyclingDrafter(corpus=corpus)
        self.primary, self.helper = primary, helper
        self.threshold, self.bias = threshold, bias
        self._uses = None  # (2,) int64 on the device: request-steps by primary, helper
        self.last_use_primary = None

    @property
    def uses(self) -> dict:
        """{"primary": n, "helper": m} request-steps this generate call (reading it syncs)."""
        n, m = self._uses.tolist() if self._uses is not None else (0, 0)
        return {"primary": n, "helper": m}

    def prepare(self, vocab_size: int, device) -> None:
        self._uses = torch.zeros(2, dtype=torch.int64, device=device)
        self.primary.prepare(vocab_size, device)
        self.helper.prepare(vocab_size, device)

    def start(self, history, lens) -> None:
        self.primary.start(history, lens)
        self.helper.start(history, lens)

    def propose(self, history: torch.Tensor, lens: torch.Tensor, max_nodes: int) -> DraftTree:
        p = self.primary.propose(history, lens, max_nodes)
        h = self.helper.propose(history, lens, max_nodes)
        if p.match_len is None:
            raise ValueError(f"primary {type(self.primary).__name__} reports no match_len")
        if p.probs is not None or h.probs is not None:
            raise ValueError("HybridDrafter merges deterministic drafts only (no probs)")
        B = history.shape[0]
        K = max(p.tokens.shape[1], h.tokens.shape[1])
        use = p.match_len >= self.threshold  # (B,)
        (pt, pp), (ht, hp) = _pad(p, K), _pad(h, K)
        row = use.view(B, 1)
        count = torch.where(use, p.count, h.count)  # (B,)
        real = torch.arange(K, device=history.device).view(1, K) < count.view(B, 1)  # (B, K)
        # Every node past count, the sub-drafter's padding included, becomes token 0 under the root.
        tokens = torch.where(real, torch.where(row, pt, ht), 0)  # (B, K)
        parents = torch.where(real, torch.where(row, pp, hp), -1)  # (B, K)
        self.last_use_primary = use
        if self._uses is None:  # propose without prepare (tests): count on the history's device
            self._uses = torch.zeros(2, dtype=torch.int64, device=history.device)
        n = use.sum()
        self._uses += torch.stack([n, B - n])
        return DraftTree(tokens, parents, count, match_len=p.match_len)

    def observe(self, tokens, logits, num_nodes) -> None:
        self.primary.observe(tokens, logits, num_nodes)
        self.helper.observe(tokens, logits, num_nodes)

    def update(self, history, lens, accepted) -> None:
        self.primary.update(history, lens, accepted)
        self.helper.update(history, lens, accepted)

    def retain(self, index) -> None:
        self.primary.retain(index)
        self.helper.retain(index)

    def finish(self) -> None:
        self.primary.finish()
        self.helper.finish()
