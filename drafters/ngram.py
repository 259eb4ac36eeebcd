"""N-gram matching drafter (prompt lookup decoding, SSSD's self-matching): no model, only the history.

For request b with root position r = lens[b] - 1, the suffix of length n is history[b, r-n+1 : r+1].
An occurrence of it ends at p < r (a proper earlier occurrence, possibly overlapping the suffix);
the draft is the tokens that followed it, history[b, p+1 : r+1] (it may run into the suffix, never
past lens[b]). The longest n in [min_ngram, max_ngram] with an occurrence wins; among its
occurrences the most recent (largest p).

All n are matched in one pass: walking back from p and from r together, the tokens agree for
j = 0, 1, ... until the first mismatch, so an n-gram occurrence ends at p exactly when the first n
agree, and score[b, p] = (longest such n, capped at max_ngram) - min_ngram + 1 (0 below min_ngram).
The longest match, most recent first, is then one argmax of score * T + p: O(B * T * max_ngram)
work, no host sync in chain mode.

With branches > 1 the root gets up to `branches` children: the distinct tokens that followed
occurrences of the longest matched n-gram, ranked by how often (ties: most recent occurrence
first), each followed by a chain continuing its most recent occurrence.

Shapes: B batch, T history width, K draft nodes.
"""

import torch

from drafters.base import Drafter, DraftTree


def _positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _split_budget(budget: int, counts: list[int], caps: list[int]) -> list[int]:
    """Share `budget` extra nodes among branches in proportion to their counts, none above its cap;
    what rounding and caps leave over goes to branches in rank order (the top branch first)."""
    total = sum(counts)
    ext = [min(cap, budget * c // total) for c, cap in zip(counts, caps)]
    left = budget - sum(ext)
    for i, cap in enumerate(caps):
        more = min(cap - ext[i], left)
        ext[i] += more
        left -= more
    return ext


class NgramDrafter(Drafter):
    """Drafts the continuation of the longest, most recent earlier occurrence of the history's suffix.

    max_ngram, min_ngram: suffix lengths tried (longest first); branches: root children in tree
    mode (1 = a single chain); max_chain: cap on a chain's (a branch's) depth, None = max_nodes.
    """

    name = "ngram"

    def __init__(self, max_ngram: int = 4, min_ngram: int = 1, branches: int = 1,
                 max_chain: int | None = None):
        self.max_ngram = _positive_int("max_ngram", max_ngram)
        self.min_ngram = _positive_int("min_ngram", min_ngram)
        if min_ngram > max_ngram:
            raise ValueError(f"min_ngram ({min_ngram}) must be <= max_ngram ({max_ngram})")
        self.branches = _positive_int("branches", branches)
        self.max_chain = None if max_chain is None else _positive_int("max_chain", max_chain)

    def match(self, history: torch.Tensor, lens: torch.Tensor):
        """score (B, T) int32: n - min_ngram + 1 for the longest n-gram suffix match ending at each
        position, 0 where none does; match_len (B,) int64 the longest n (0 = none); end (B,) the
        most recent end of such a match."""
        B, T = history.shape
        pos = torch.arange(T, dtype=torch.int32, device=history.device)  # (T,)
        root = (lens - 1).view(B, 1)  # (B, 1)
        alive = pos.view(1, T) < root  # (B, T) occurrences end strictly before the root
        score = torch.zeros(B, T, dtype=torch.int32, device=history.device)
        for j in range(min(self.max_ngram, T)):
            # Token j steps back from the occurrence's end against token j steps back from the root.
            # Rows with root < j have no alive position left (p < root < j), so clamping is harmless.
            target = history.gather(1, (root - j).clamp(min=0))  # (B, 1)
            alive[:, j:] &= history[:, : T - j] == target
            alive[:, :j] = False  # the occurrence would start before the history
            if j + 1 >= self.min_ngram:
                score += alive
        # Longest first, then most recent. argmax + gather, not max(dim=1): on CPU the
        # (values, indices) reduction is orders of magnitude slower for these shapes.
        key = torch.add(pos, score, alpha=T)  # (B, T)
        end = key.argmax(dim=1)  # (B,)
        best = key.gather(1, end.view(B, 1)).view(B).long() // T  # (B,) n - min_ngram + 1, or 0
        match_len = torch.where(best > 0, best + self.min_ngram - 1, 0)  # (B,)
        return score, match_len, end

    def propose(self, history: torch.Tensor, lens: torch.Tensor, max_nodes: int) -> DraftTree:
        B, T = history.shape
        K = min(max_nodes, self.max_chain or max_nodes)
        if K <= 0 or T == 0:
            draft = DraftTree.empty(B, history.device)
            draft.match_len = torch.zeros(B, dtype=torch.int64, device=history.device)
            return draft
        score, match_len, end = self.match(history, lens)
        if self.branches > 1:
            return self._tree(history, lens, max_nodes, score, match_len)
        # The continuation is history[end + 1 : lens], clipped to K.
        count = torch.where(match_len > 0, lens - 1 - end, 0).clamp(max=K)  # (B,)
        k = torch.arange(K, device=history.device)  # (K,)
        src = (end.view(B, 1) + 1 + k).clamp(max=T - 1)  # (B, K)
        tokens = torch.where(k < count.view(B, 1), history.gather(1, src), 0)  # (B, K)
        draft = DraftTree.chains(tokens, count)
        draft.match_len = match_len
        return draft

    def _branches(self, history, lens, score, match_len):
        """Per request, the ranked root children: lists of (b, token, count, last_end) on the host,
        where last_end is the end of the most recent occurrence followed by that token."""
        B, T = history.shape
        need = (match_len - self.min_ngram + 1).view(B, 1)  # (B, 1) the longest match's score
        occ = (score >= need) & (match_len.view(B, 1) > 0)  # (B, T)
        b, p = occ.nonzero(as_tuple=True)  # (M,) each; p + 1 <= lens - 1, so p + 1 < T
        nxt = history[b, p + 1]  # (M,)
        groups, inverse, counts = torch.unique(torch.stack([b, nxt], dim=1), dim=0,
                                               return_inverse=True, return_counts=True)  # (G, 2)
        last = torch.full_like(counts, -1).scatter_reduce(0, inverse, p, reduce="amax")  # (G,)
        gb = groups[:, 0]
        # Sort by request, then count descending, then most recent occurrence first.
        order = torch.sort(gb * (T + 1) ** 2 + (T - counts) * (T + 1) + (T - 1 - last)).indices
        gb, tok, counts, last = gb[order], groups[order, 1], counts[order], last[order]
        rank = torch.arange(gb.numel(), device=gb.device) - torch.searchsorted(gb, gb)
        keep = rank < self.branches
        rows = torch.stack([gb, tok, counts, last], dim=1)[keep].tolist()
        per_request = [[] for _ in range(B)]
        for row in rows:
            per_request[row[0]].append(row)
        return per_request

    def _tree(self, history, lens, max_nodes, score, match_len) -> DraftTree:
        B, T = history.shape
        device = history.device
        roots = (lens - 1).tolist()
        src_rows, parent_rows = [], []  # per request: history positions of the nodes, their parents
        for b, children in enumerate(self._branches(history, lens, score, match_len)):
            children = children[:max_nodes]
            # Past the child, a branch can continue up to the root, at most max_chain deep in all.
            caps = [roots[b] - last - 1 for _, _, _, last in children]
            if self.max_chain is not None:
                caps = [min(c, self.max_chain - 1) for c in caps]
            counts = [c for _, _, c, _ in children]
            ext = _split_budget(max_nodes - len(children), counts, caps) if children else []
            src, parents = [], []
            for (_, _, _, last), e in zip(children, ext):
                # Depth-first: the child, then its chain; siblings keep rank order.
                first = len(src)
                src += range(last + 1, last + 2 + e)
                parents += [-1] + list(range(first, first + e))
            src_rows.append(src)
            parent_rows.append(parents)
        K = max((len(s) for s in src_rows), default=0)
        count = torch.tensor([len(s) for s in src_rows], dtype=torch.int64)
        src = torch.tensor([s + [0] * (K - len(s)) for s in src_rows], dtype=torch.int64).view(B, K)
        parents = torch.tensor([q + [-1] * (K - len(q)) for q in parent_rows], dtype=torch.int64).view(B, K)
        src, parents, count = src.to(device), parents.to(device), count.to(device)
        k = torch.arange(K, device=device)
        tokens = torch.where(k < count.view(B, 1), history.gather(1, src), 0)  # (B, K)
        return DraftTree(tokens, parents, count, match_len=match_len)
