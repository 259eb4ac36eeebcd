"""The drafter interface: what the speculative engine asks of every drafter.

A step of the engine, seen from a drafter:

    drafter.prepare(vocab_size, device)     once per generate call, before anything else
    drafter.start(history, lens)            once, after the prompts (and the first token) are known
    draft = drafter.propose(history, lens, max_nodes)   each step, for every active request
    drafter.observe(tokens, logits, num_nodes)          the verification forward's tree and logits
    drafter.update(history, lens, accepted)             after verification committed tokens
                                                        (steps without a draft: before the next use)
    drafter.retain(index)                               requests left the batch

`history` (B, T) int64 on the model's device holds each request's tokens (prompt, then every
committed token) left-aligned; `lens` (B,) int64 says how many are valid. The last valid token
of a request is the ROOT of its next draft tree: the token whose successor the target predicts
first, already chosen but not yet in the KV cache.

A draft tree hangs below that root. Node k (0 <= k < K) of request b has token tokens[b, k] and
parent parents[b, k]: -1 for a child of the root, else an index < k (parents precede children).
Nodes k >= count[b] are padding. Siblings are verified in index order, so put the likelier first.
"""

from dataclasses import dataclass

import torch


@dataclass
class DraftTree:
    tokens: torch.Tensor  # (B, K) int64
    parents: torch.Tensor  # (B, K) int64, -1 = child of the root
    count: torch.Tensor  # (B,) int64 valid nodes per request (0 = no draft)
    # Optional, for drafters that sample from a distribution (draft models): (B, K + 1, V) float32,
    # probs[b, 0] the distribution the root's children were drawn from, probs[b, k + 1] node k's.
    probs: torch.Tensor | None = None
    siblings: str = "iid"  # how siblings were drawn from probs: "iid" or "without_replacement"
    # (B,) int64, the controller's input: a suffix drafter's match length, Token Recycling's streak
    match_len: torch.Tensor | None = None

    @staticmethod
    def empty(batch_size: int, device) -> "DraftTree":
        z = torch.zeros(batch_size, 0, dtype=torch.int64, device=device)
        return DraftTree(z, z.clone(), torch.zeros(batch_size, dtype=torch.int64, device=device))

    @staticmethod
    def chains(tokens: torch.Tensor, count: torch.Tensor) -> "DraftTree":
        """A single chain per request: node k's parent is k - 1."""
        B, K = tokens.shape
        parents = torch.arange(-1, K - 1, device=tokens.device).expand(B, K).contiguous()
        return DraftTree(tokens, parents, count)


class Drafter:
    """Base class: a drafter that never drafts (the engine then decodes autoregressively)."""

    name = "base"

    def prepare(self, vocab_size: int, device) -> None:
        """Once per generate call: the target's vocabulary size and device (where state should live)."""

    def start(self, history: torch.Tensor, lens: torch.Tensor) -> None:
        """The batch's prompts plus first tokens; row b is request b until `retain` reorders."""

    def propose(self, history: torch.Tensor, lens: torch.Tensor, max_nodes: int) -> DraftTree:
        return DraftTree.empty(history.shape[0], history.device)

    def observe(self, tokens: torch.Tensor, logits: torch.Tensor, num_nodes: torch.Tensor) -> None:
        """After each verification forward: the tree's tokens (B, N), the target's logits (B, N, V)
        at every node, and the valid node counts (B,). Drafters that learn from the target
        (Token Recycling) read it here; the default ignores it."""

    def update(self, history: torch.Tensor, lens: torch.Tensor, accepted: torch.Tensor) -> None:
        """`accepted` (B,) int64: how many tokens each request committed since the last update (the
        ends of history). After a drafted step it comes at once; steps without a draft are shown
        together, before the drafter's next propose, retain or finish."""

    def retain(self, index: torch.Tensor) -> None:
        """Keep per-request state only for requests `index` (B',), in that order.

        Requests that leave are finished; the last `update` showed their final tokens, so a drafter
        that learns from finished responses can take them from there before dropping them."""

    def finish(self) -> None:
        """The generate call is over (drafters that learn across requests learn here)."""
