"""Token Recycling (Luo et al., 2024, "Turning Trash into Treasure"): draft from the target's own
discarded candidates.

Every verification forward computes the target's distribution after every tree node, and all but
the accepted path's are normally thrown away. Token Recycling keeps them in an adjacency matrix

    M (V, k) int64:  M[t] = the top-k tokens the target last predicted right after token t

and drafts by walking M from the root along a fixed tree TEMPLATE: a list of nodes (parent, rank),
parent -1 for a child of the root, meaning "this node's token is the rank-th candidate after its
parent's token":

    token(node) = M[token(parent), rank]            (token(-1) = the root)

so a draft is a few gathers, and learning (`observe`) is one top-k and one scatter per step:

    M[tokens[b, n]] <- topk(logits[b, n], k).indices     for every valid node n of every request b

Where one token occurs at several nodes of a step, any one of those writes wins (index_copy_
with repeated indices does not say which); each is a fresh top-k after that token. The matrix is not reset between
generate calls on the same vocabulary and device: as in the paper it keeps warming up across
requests (`reset()` starts over). A cold row is the placeholder M[t, j] = (t + 1 + j) % V: no
information, but distinct within a row, so a cold tree has no duplicate siblings; a request whose
root's row is still cold gets no draft that step.

Warm start from a corpus (our addition, an option; the paper starts cold and warms up over its
queries). A server's matrix has seen earlier traffic; a benchmark's starts cold, and on the
Spec-Bench sample of the README 31% of a cold run's roots still had no row. With `corpus` (the
model's own responses, as SAM-Decoding's static automaton uses), row t starts as the k tokens that
most often follow t there (ties to the smaller id; a row with fewer successors is topped up with
the corpus's most frequent tokens). Those are the target's own greedy choices after t in other
contexts, an estimate of what its top-k after t holds; every verification then overwrites rows as
usual. An offline replay of that sample (every position as a root, K-node default template) found
cold roots 31% -> 8.5% and mean accepted drafts at 4 / 8 nodes 0.51 -> 0.59 / 0.64 -> 0.75; filling
rows from the target's logits over the corpus did no better (0.57 / 0.73) at the cost of a forward
over it.

The prompt (our addition; `from_prompt=False` turns it off). A request's own text is where its
answer most often copies from, and the matrix never sees the prompt: verification forwards start
after it. With `from_prompt`, `start` writes each prompt's successors: for every pair (t, u) of
neighbours in the prompt and its first generated token, in reading order, u goes to rank 0 of
row t and the row's other candidates move down one (a repeated one moves up), so the row stays
distinct: row t starts with t's prompt successors, the newest first. Rank 0 is what a
verification after t would have written there had the target chosen that successor; SAM's
dynamic automaton and SuffixDecoding's per-request tree index the prompt the same way. In the
offline replay above it raised mean accepted drafts at 4 / 8 nodes from 0.59 / 0.75 to 0.73 /
0.93; writing the target's top-k at each prompt position instead (an lm_head over the whole
prompt) reached 0.65 / 0.83.

The streak (our addition; the controller's input, reported as the draft's `match_len`). Suffix
drafters tell the controller how long their match is, and longer matches are accepted more; Token
Recycling has no match, so every draft would look alike to the controller, a copied passage's and a
free answer's. Its analog: how many tokens in a row the matrix, as it stood before the target saw
them, had as the top-1 successor of the token before. In a passage the text has been through before
(a copied source, a repeated list, a loop) the streak grows and deep drafts pay; elsewhere it is short
and a few nodes are worth their cost. `observe` reads it off every verification before writing the
matrix: the root's old top-1 against the target's choice after the root, then along the template's
top-1 spine (rank 0 below rank 0) as far as the request's draft reaches. Where all of it agreed the
streak grows by that many, else it starts again at 0. On device, no host sync.

Chains on a long streak (our addition; `chain_streak`, None turns it off). Within the 16 nodes "auto"
drafts at most, the template's top-1 spine reaches depth 4, so where the text repeats itself (a copied
source, an answer looping) recycle drafts 4 tokens where prompt lookup copies 16. A request whose streak
has reached `chain_streak` drafts the matrix's top-1 chain instead, root -> M[root, 0] -> M[that, 0] ...,
as deep as its node budget; its streak is then checked along that chain. The streak sizes that budget
too: "auto" learns acceptance per streak. On the Spec-Bench sample (CPU, 2026-12-04) it is a wash
overall, 1.01x and 1.03x per question at 96 and 256 new tokens (intervals 0.96-1.07 and 0.95-1.11),
but where an answer repeats its source or itself it is large: a looping translation ran at 78 against
47 tokens/s (96 tokens) and 102 against 41 (256), past prompt lookup's 69 and 67.

Template order: the default template is built best-first from a prior on how often the rank-r
candidate is the target's next token (node score = product of its path's priors), so parents
precede children, siblings come in rank order and EVERY PREFIX is the best tree of that size
under the prior; `max_nodes` keeps a prefix. A user template must satisfy the same (checked).

Best-first trees (our addition, `shape="best_first"`; the template is the default). Each candidate
keeps the probability the target gave it when its row was written (the softmax of that forward;
for a corpus row, the successor's share of what follows t there; for a prompt successor,
`prompt_confidence`), and each request's tree is grown best-first by the product of those along
the path, as SuffixDecoding grows its trees: deep where the records are sure, wide where they are
not. Its `match_len` is a bucket of the tree's summed scores (`confidence_bucket`). The records do
predict acceptance: replaying the Spec-Bench sample with 16-node template drafts, a node whose
parent was accepted was itself accepted 5% of the time where its recorded probability was below
0.1, 20% at 0.2-0.3, 60% at 0.8-0.9 and 70-74% above 0.95. Yet on a CPU the template with the
streak does better: on 13 Spec-Bench questions priced by the cost curve, best-first trees 1.27x
over AR, the template 1.29x, ngram 1.31x (`profiling/predicted_speed.py`; 2026-12-05). Translation
loses most (3.5x against 4.4x): its loops copy, and the streak finds them where the records,
written in other contexts, are unsure.

Shapes: B batch, T history width, V vocab, N verified nodes, K draft nodes, k candidates per token.
"""

import heapq
import math

import numpy as np
import torch

from drafters.base import Drafter, DraftTree
from drafters.corpus import Corpus

# P(the target's next token is the rank-r recycled candidate), a rough shape: the top candidate
# is right about half the time, the rest share a long tail. Only the ORDER of products matters.
RANK_PRIOR = (0.5, 0.16, 0.09, 0.06, 0.045, 0.035, 0.03, 0.025)


SHAPES = ("template", "best_first")

# A best-first draft's bucket for the controller (reported as its match_len): where the sum of its
# nodes' scores (probabilities recorded with the candidates, multiplied along each path) falls
# among these edges. The controller learns acceptance per bucket; the edges only need to separate
# confident drafts from hopeful ones.
CONFIDENCE_EDGES = (0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.5, 7.0)


def confidence_bucket(confidence: torch.Tensor) -> torch.Tensor:
    """(B,) float -> (B,) int64 in 0..len(CONFIDENCE_EDGES)."""
    edges = torch.tensor(CONFIDENCE_EDGES, dtype=torch.float64, device=confidence.device)
    return torch.bucketize(confidence.double(), edges, right=True)


def default_tree(size: int = 80, top_k: int = 8, max_depth: int = 8) -> list[tuple[int, int]]:
    """The `size` likeliest nodes under RANK_PRIOR, best first: [(parent, rank), ...].

    80 nodes, top_k 8: widths 8, 23, 28, 13, 6, 1, 1 at depths 1..7, like the paper's static tree
    (wide near the root, a thin spine of top-1 candidates reaching deep).
    """
    prior = RANK_PRIOR[:top_k] + (RANK_PRIOR[-1],) * max(0, top_k - len(RANK_PRIOR))
    heap = [(-prior[r], r, -1, 1) for r in range(top_k)]  # (-score, rank, parent, depth)
    nodes = []
    while heap and len(nodes) < size:
        neg_score, rank, parent, depth = heapq.heappop(heap)
        nodes.append((parent, rank))
        if depth < max_depth:
            for r in range(top_k):
                heapq.heappush(heap, (neg_score * prior[r], r, len(nodes) - 1, depth + 1))
    return nodes


def check_tree(tree, top_k: int) -> list[tuple[int, int]]:
    """A template as a list of (parent, rank) int pairs; raises unless it is a valid tree."""
    nodes, seen = [], set()
    for i, node in enumerate(tree):
        parent, rank = (int(x) for x in node)
        if not -1 <= parent < i:
            raise ValueError(f"template node {i}: parent {parent} must be -1 or an earlier node")
        if not 0 <= rank < top_k:
            raise ValueError(f"template node {i}: rank {rank} outside [0, top_k={top_k})")
        if (parent, rank) in seen:
            raise ValueError(f"template node {i}: (parent {parent}, rank {rank}) appears twice")
        seen.add((parent, rank))
        nodes.append((parent, rank))
    return nodes


def template_levels(tree, device):
    """Per depth 1, 2, ...: (node indices, parent indices, ranks), each (n_d,) int64 on `device`."""
    depth = []
    for parent, _ in tree:
        depth.append(1 if parent < 0 else depth[parent] + 1)
    levels = []
    for d in range(1, max(depth, default=0) + 1):
        idx = [i for i, x in enumerate(depth) if x == d]
        levels.append(tuple(torch.tensor(v, dtype=torch.int64, device=device) for v in
                            (idx, [tree[i][0] for i in idx], [tree[i][1] for i in idx])))
    return levels


def corpus_rows(corpus: Corpus, top_k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens (R,), rows (R, top_k)) int64 and freqs (R, top_k) float32: for every token t followed
    by something in a corpus document, its top_k most frequent successors (count descending, then id
    ascending), topped up with the corpus's most frequent tokens not already in the row; freqs[i, j]
    the share of t's successors that are rows[i, j] (0 for a top-up)."""
    text = corpus.tokens.astype(np.int64)
    ends = corpus.offsets[1:] - 1  # a document's last token has no successor in it
    cur, nxt = np.delete(text, ends), np.delete(np.roll(text, -1), ends)
    V = corpus.vocab_size
    if cur.size == 0:  # one-token documents only: nothing follows anything
        return np.zeros(0, dtype=np.int64), np.zeros((0, top_k), dtype=np.int64), np.zeros((0, top_k), np.float32)
    pairs, counts = np.unique(cur * V + nxt, return_counts=True)
    first, then = pairs // V, pairs % V
    order = np.lexsort((then, -counts, first))  # by token, then count descending, then id
    first, then, counts = first[order], then[order], counts[order]
    starts = np.flatnonzero(np.r_[True, first[1:] != first[:-1]])  # each token's run
    run = np.repeat(np.arange(starts.size), np.diff(np.r_[starts, first.size]))  # each pair's run
    rank = np.arange(first.size) - starts[run]
    keep = rank < top_k
    tokens = first[starts]
    rows = np.full((tokens.size, top_k), -1, dtype=np.int64)
    rows[run[keep], rank[keep]] = then[keep]
    freqs = np.zeros((tokens.size, top_k), dtype=np.float32)
    total = np.bincount(run, weights=counts)  # each token's successors in all
    freqs[run[keep], rank[keep]] = counts[keep] / total[run[keep]]
    uni = np.bincount(corpus.tokens, minlength=V)
    common = np.argsort(-uni, kind="stable")[: 2 * top_k].tolist()  # enough to top up any row
    for i in np.flatnonzero(rows[:, -1] < 0):  # rows with fewer than top_k distinct successors
        row = [x for x in rows[i].tolist() if x >= 0]
        row += [x for x in common if x not in row][: top_k - len(row)]
        rows[i, : len(row)] = row
    return tokens, rows, freqs


class TokenRecyclingDrafter(Drafter):
    """Drafts a fixed-shape tree from an adjacency matrix of the target's recent top-k candidates.

    top_k: candidates kept per token (the matrix's width); tree: the template [(parent, rank)],
    best first (default: `default_tree(80, top_k)`), truncated to max_nodes at each propose.
    corpus: None (start cold), a drafters.corpus.Corpus or the path of a saved one: the matrix
    starts from its successor counts. from_prompt: write each request's prompt successors at start.
    chain_streak: a request whose streak has reached it drafts the top-1 chain (None: never).
    shape: "template" (the paper's: every draft is the template read from the matrix) or
    "best_first" (each request's tree grown from the matrix by the product of its candidates'
    recorded probabilities; `tree` and `chain_streak` then do not apply). prompt_confidence: the
    probability recorded for a prompt successor (best_first). See the module's docstring.
    """

    name = "recycle"

    def __init__(self, top_k: int = 8, tree=None, corpus=None, from_prompt: bool = True, chain_streak: int | None = 4,
                 shape: str = "template", prompt_confidence: float = 0.5):
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be an int >= 1, got {top_k!r}")
        corpus = Corpus.of(corpus)
        if corpus is not None and top_k > corpus.vocab_size:
            raise ValueError(f"top_k ({top_k}) exceeds the corpus's vocabulary ({corpus.vocab_size})")
        if not isinstance(from_prompt, bool):
            raise TypeError(f"from_prompt must be a bool, got {from_prompt!r}")
        if chain_streak is not None and (isinstance(chain_streak, bool) or not isinstance(chain_streak, int)
                                         or chain_streak < 0):
            raise ValueError(f"chain_streak must be None or an int >= 0, got {chain_streak!r}")
        if shape not in SHAPES:
            raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
        if shape == "best_first" and tree is not None:
            raise ValueError("a tree template applies to shape='template' only (best_first grows its own trees)")
        if isinstance(prompt_confidence, bool) or not isinstance(prompt_confidence, (int, float)) \
                or not 0 < prompt_confidence <= 1:
            raise ValueError(f"prompt_confidence must be a probability in (0, 1], got {prompt_confidence!r}")
        self.shape = shape
        self.prompt_confidence = float(prompt_confidence)
        self.chain_streak = chain_streak if shape == "template" else None
        self.top_k = top_k
        self.corpus = corpus
        self.from_prompt = from_prompt
        self._corpus_rows = None if corpus is None else corpus_rows(corpus, top_k)
        self.tree = check_tree(default_tree(80, top_k) if tree is None else tree, top_k)
        self.M = None  # (V, k) view of _table
        self._table = None  # (V + 1, k): row V is a sink for padding nodes' writes
        self._levels = {}  # (K, device) -> (template_levels, parents (K,)) of the K-node prefix
        self._spines = {}  # (N, device) -> (node columns, parent columns) of the top-1 spine in an N-node tree
        self._streak = None  # (B,) int64: see the module's docstring
        self._logp = None  # (V + 1, k) float32: log of the probability recorded with each candidate
        self._chained = None  # (B,) bool: which requests the last proposal drafted as a top-1 chain

    def prepare(self, vocab_size: int, device) -> None:
        device = torch.empty(0, device=device).device  # canonical: "cuda" -> "cuda:0"
        if self.M is not None and self.M.shape[0] == vocab_size and self.M.device == device:
            return  # keep what earlier calls learned
        if self.top_k > vocab_size:
            raise ValueError(f"top_k ({self.top_k}) exceeds the vocabulary ({vocab_size})")
        if self.corpus is not None:
            self.corpus.check_vocab(vocab_size)
        j = torch.arange(self.top_k, device=device)
        t = torch.arange(vocab_size + 1, device=device).view(-1, 1)
        self._table = (t + 1 + j) % vocab_size  # (V + 1, k) cold placeholder
        self.M = self._table[:vocab_size]
        self._warm = torch.zeros(vocab_size + 1, dtype=torch.bool, device=device)  # row written yet?
        self._logp = torch.full((vocab_size + 1, self.top_k), -math.inf, device=device)  # cold: probability 0
        if self._corpus_rows is not None:
            tokens, rows, freqs = (torch.from_numpy(x).to(device) for x in self._corpus_rows)
            self._table[tokens] = rows
            self._logp[tokens] = freqs.log()
            self._warm[tokens] = True

    def reset(self) -> None:
        """Forget everything learned (the next prepare starts again: cold, or from the corpus)."""
        self.M = self._table = self._warm = self._logp = None

    def start(self, history: torch.Tensor, lens: torch.Tensor) -> None:
        """Write the prompts' successors (see the module's docstring); one host round trip."""
        self._streak = torch.zeros(history.shape[0], dtype=torch.int64, device=history.device)
        if not self.from_prompt or self.M is None:
            return
        k, n = self.top_k, lens.tolist()
        succ = {}  # token -> its successors, the newest first (at most k)
        for row, L in zip(history[:, : max(n, default=0)].cpu().tolist(), n):  # in reading order
            for a, b in zip(row[: L - 1], row[1:L]):
                newest = succ.setdefault(a, [])
                if b in newest:
                    newest.remove(b)
                newest.insert(0, b)
                del newest[k:]
        if not succ:
            return
        tokens = torch.tensor(list(succ), dtype=torch.int64, device=self.M.device)
        rows, logps, new_logp = [], [], math.log(self.prompt_confidence)
        for new, old, old_logp in zip(succ.values(), self.M[tokens].tolist(), self._logp[tokens].tolist()):
            kept = [(x, lp) for x, lp in zip(old, old_logp) if x not in new][: k - len(new)]
            rows.append(new + [x for x, _ in kept])
            logps.append([new_logp] * len(new) + [lp for _, lp in kept])
        self._table[tokens] = torch.tensor(rows, dtype=torch.int64, device=self.M.device)
        self._logp[tokens] = torch.tensor(logps, dtype=self._logp.dtype, device=self.M.device)
        self._warm[tokens] = True

    def retain(self, index: torch.Tensor) -> None:
        if self._streak is not None:
            self._streak = self._streak[index]
        self._chained = None

    def _spine(self, N: int, device):
        """Verification columns (column 0 the root, column i + 1 draft node i) of the template's top-1
        spine within N columns, below the root, and their parents' columns: (S,), (S,) int64."""
        key = (N, device)
        if key not in self._spines:
            cols, parents, on_spine = [], [], {-1}
            for i, (parent, rank) in enumerate(self.tree[: N - 1]):
                if rank == 0 and parent in on_spine:
                    on_spine.add(i)
                    cols.append(i + 1)
                    parents.append(parent + 1)
            self._spines[key] = tuple(torch.tensor(x, dtype=torch.int64, device=device) for x in (cols, parents))
        return self._spines[key]

    def _advance_streak(self, tokens, top1, num_nodes):
        """tokens (B, N) the verified tree, top1 (B, N) the target's choice after each node."""
        B, N = tokens.shape
        old = self.M[tokens[:, 0], 0]  # (B,) the root's top-1 before this step writes it
        first = old == top1[:, 0]  # the spine's first node is the root's old top-1

        def along(cols, parents):  # (B,) the spine's deeper nodes a draft reached all right, (B,) how many
            if cols.numel() <= 1:
                return torch.ones_like(first), torch.zeros_like(self._streak)
            reached = cols[1:].view(1, -1) < num_nodes.view(B, 1)  # (B, S - 1)
            right = tokens[:, cols[1:]] == top1[:, parents[1:]]
            return (right | ~reached).all(dim=1), reached.sum(dim=1)

        agree, count = along(*self._spine(N, tokens.device))
        chained = self._chained
        if chained is not None and chained.shape[0] == B:  # those requests' spine is their whole chain
            cols = torch.arange(1, N, device=tokens.device)
            chain_agree, chain_count = along(cols, cols - 1)
            agree, count = torch.where(chained, chain_agree, agree), torch.where(chained, chain_count, count)
        self._streak = torch.where(first & agree, self._streak + 1 + count, 0)

    def observe(self, tokens: torch.Tensor, logits: torch.Tensor, num_nodes: torch.Tensor) -> None:
        B, N = tokens.shape
        V = self.M.shape[0]
        top = logits.topk(self.top_k, dim=-1)
        cand = top.indices  # (B, N, k)
        if self.shape == "template" and self._streak is not None and self._streak.shape[0] == B:
            self._advance_streak(tokens, cand[..., 0], num_nodes)
        self._chained = None  # it described this tree only
        valid = torch.arange(N, device=tokens.device).view(1, N) < num_nodes.view(B, 1)  # (B, N)
        # Padding nodes write to the sink row V: no mask-and-compact, so no host sync.
        rows = torch.where(valid, tokens, V).view(B * N)
        self._table.index_copy_(0, rows, cand.view(B * N, self.top_k))
        self._warm[rows] = True
        if self.shape == "best_first":  # the candidates' log-probabilities under the target
            logp = top.values.float() - logits.float().logsumexp(dim=-1, keepdim=True)  # (B, N, k)
            self._logp.index_copy_(0, rows, logp.view(B * N, self.top_k))

    def propose(self, history: torch.Tensor, lens: torch.Tensor, max_nodes: int) -> DraftTree:
        B = history.shape[0]
        K = min(max_nodes, len(self.tree))
        if K <= 0 or B == 0:
            return DraftTree.empty(B, history.device)
        if self.M is None:
            raise RuntimeError("TokenRecyclingDrafter.propose before prepare(vocab_size, device)")
        if self.shape == "best_first":
            return self._grow(history.gather(1, (lens - 1).view(B, 1)).view(B), max_nodes)
        key = (K, history.device)
        if key not in self._levels:
            parents = torch.tensor([p for p, _ in self.tree[:K]], dtype=torch.int64, device=history.device)
            self._levels[key] = template_levels(self.tree[:K], history.device), parents
        levels, parents = self._levels[key]
        flat = self.M.reshape(-1)  # (V * k,)
        # Column 0 is the root, column i + 1 node i, so a parent index p reads column p + 1.
        tok = torch.zeros(B, K + 1, dtype=torch.int64, device=history.device)  # (B, 1 + K)
        tok[:, 0] = history.gather(1, (lens - 1).view(B, 1)).view(B)
        for idx, par, rank in levels:  # one gather per depth level
            tok[:, idx + 1] = flat[tok[:, par + 1] * self.top_k + rank]  # (B, n_d)
        parents = parents.expand(B, K)
        streak = self._streak if self._streak is not None and self._streak.shape[0] == B else None
        self._chained = None
        if streak is not None and self.chain_streak is not None:
            chained = streak >= self.chain_streak  # (B,)
            chain = torch.empty_like(tok)
            chain[:, 0] = tok[:, 0]
            for i in range(K):  # one gather per depth: node i + 1 is the top-1 after node i
                chain[:, i + 1] = self.M[chain[:, i], 0]
            tok = torch.where(chained.view(B, 1), chain, tok)
            parents = torch.where(chained.view(B, 1), torch.arange(-1, K - 1, device=tok.device), parents)
            self._chained = chained
        # A root whose row was never written has no candidates: no draft (verifying the cold
        # placeholder would only waste a forward's rows and teach the controller nothing).
        count = torch.where(self._warm[tok[:, 0]], K, 0)
        return DraftTree(tok[:, 1:], parents.contiguous(), count, match_len=streak)

    def _grow(self, root: torch.Tensor, K: int) -> DraftTree:
        """Best-first trees below `root` (B,): K rounds, each taking every request's likeliest
        candidate not yet in its tree (score: the sum of recorded log-probabilities along its path)
        and offering that node's row as new candidates. A child scores at most its parent, so the
        nodes come out in non-increasing score, parents first, and every prefix is the best tree of
        its size under the scores. A request runs out where only never-written rows remain
        (score -inf): its count stops there. On device, no host sync: K rounds of a few gathers."""
        B, k, device = root.shape[0], self.top_k, root.device
        b = torch.arange(B, device=device)
        ftok = torch.zeros(B, k * (K + 1), dtype=torch.int64, device=device)  # the candidates offered so far
        fpar = torch.full_like(ftok, -1)  # their parents (node indices; -1 the root)
        fscore = torch.full((B, k * (K + 1)), -math.inf, device=device)
        ftok[:, :k], fscore[:, :k] = self.M[root], self._logp[root]
        tokens, parents = torch.empty(B, K, dtype=torch.int64, device=device), torch.empty_like(ftok[:, :K])
        scores = torch.empty(B, K, device=device)
        for i in range(K):
            j = fscore.argmax(dim=1)  # (B,)
            t, s = ftok[b, j], fscore[b, j]
            tokens[:, i], parents[:, i], scores[:, i] = t, fpar[b, j], s
            fscore[b, j] = -math.inf
            slots = slice(k * (i + 1), k * (i + 2))
            ftok[:, slots], fscore[:, slots], fpar[:, slots] = self.M[t], s.view(B, 1) + self._logp[t], i
        count = (scores > -math.inf).sum(dim=1)
        confidence = scores.exp().sum(dim=1)  # the draft's expected accepted tokens, were the records calibrated
        return DraftTree(tokens, parents, count, match_len=confidence_bucket(confidence))
