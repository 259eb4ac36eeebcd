"""SuffixDecoding's drafter (Oliaro et al., 2024): speculation trees grown from suffix trees over
earlier text, no draft model.

Two suffix trees feed every request's draft:
  GLOBAL       earlier responses: a corpus's documents, then the response of every request that
               finishes; at most max_global_sequences of them, the oldest evicted first.
  PER-REQUEST  the request's own prompt and response so far, extended as tokens commit.

The suffix tree is depth-limited: a trie of every substring of length <= max_depth (each suffix of
each sequence, truncated to max_depth). A string's count is how often it occurs (how many suffix
starts pass through its node). Every node links to the node of its string minus the first token
(the suffix link, always there: the trie holds every substring), so the longest suffix of a context
that is in the trie is found in one left-to-right pass, as in Aho-Corasick matching.

Unique tails are compressed. A string that occurs once, and so every extension of it, is not a
chain of nodes but one Leaf: (sequence, position) of its occurrence. Most deep strings occur once,
so nodes number the REPEATED substrings plus at most one leaf per suffix start, instead of about
max_depth per token (100 responses of 200 random tokens at depth 64: 4k nodes and 20k leaves, not
1.1M nodes). Appending a token to a sequence touches only its suffixes that are nodes (a suffix
that occurs once is a leaf pointing into the sequence, so it grows with it): O(longest repeated
suffix), at most O(max_depth); adding a sequence is O(len * that). A leaf whose string occurs
again splits into a node (count 2) and a leaf for the old occurrence's continuation.

A draft, per request and per tree (K = the engine's budget, capped by max_spec):
  1. match: the longest suffix of the history, m <= max_depth - K tokens (room below it for a
     K-deep draft), that has a continuation in the tree. In the per-request tree the history's
     suffixes that occurred before are nodes already: the longest with a child.
  2. grow best first: a candidate child's score is its parent's score times the empirical
     probability of its token after the parent's string, count(child) / followed(parent), where
     followed(parent) = the parent's occurrences that have a next token = the sum of its children's
     counts. That is count(parent) except for occurrences at the very end of a sequence; the one
     that matters is the live request's current position, which has no next token yet and would
     otherwise shave one occurrence off every per-request probability (a passage seen once would
     continue with probability 1/2, not 1). Expand the best frontier node; stop at
     min(K, floor(alpha * m + offset)) nodes or when no candidate scores >= min_token_prob.
The tree's score, the sum of its node scores, is the expected number of accepted tokens under the
empirical model; the tree with the higher score (per-request on ties) is the draft.

Defaults: alpha = 2, offset = 0 (a 1-token match earns 2 drafts, a 3-token match 6; no match, no
draft), min_token_prob = 0.1 as in the paper.

Shapes: B batch, T history width, K draft nodes.
"""

import heapq
import math
from collections import deque

import torch

from drafters.base import Drafter, DraftTree
from drafters.corpus import Corpus


def _positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _real(name: str, value, lo: float, hi: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise ValueError(f"{name} must be a number in [{lo}, {hi}], got {value!r}")
    return float(value)


class Node:
    """A string that occurs (or once occurred) at least twice; spelled by the path from the root."""

    __slots__ = ("children", "count", "link")

    def __init__(self, link):
        self.children = None  # dict token -> Node | Leaf, None without children
        self.count = 0  # occurrences of the string
        self.link = link  # the node of the string without its first token (the root's: None)


class Leaf:
    """Below node u by token t: the strings u + t + ..., each occurring once, at sequence `seq`
    from position `pos` (where t is) on, as far as the sequence and max_depth go."""

    __slots__ = ("seq", "pos")
    count = 1

    def __init__(self, seq, pos: int):
        self.seq, self.pos = seq, pos


# A place in the tree, the node of a string: (node, None, 0) at a Node, or (node, leaf, k) for the
# string node + the first k >= 1 tokens of the leaf.


class SuffixTree:
    """Depth-limited suffix trie over sequences of token ids, with occurrence counts."""

    def __init__(self, max_depth: int = 64):
        self.max_depth = _positive_int("max_depth", max_depth)
        self.root = Node(None)  # count = tokens in all sequences (every suffix start passes it)
        self.num_nodes, self.num_leaves = 1, 0
        self._tokens = {}  # seq_id -> list of its tokens
        self._suffixes = {}  # seq_id -> its suffixes that are Nodes, by length: 0 .. J <= max_depth - 1
        self._next_id = 0

    def __len__(self) -> int:
        return len(self._tokens)

    def __deepcopy__(self, memo):
        """Node by node, without recursion: through children and suffix links the object graph is
        far deeper than Python's recursion limit, so `copy.deepcopy`'s default walk fails. Nodes
        and sequences go into `memo`, so a copied holder of them (a request's `tokens`, which is
        the tree's own list) shares the copies as the original shares the originals."""
        twin = SuffixTree.__new__(SuffixTree)
        memo[id(self)] = twin
        new, order = {id(self.root): Node(None)}, [self.root]
        for node in order:  # every Node reachable by children or links, each copied once
            more = [] if node.link is None else [node.link]
            more += [c for c in (node.children or {}).values() if isinstance(c, Node)]
            for m in more:
                if id(m) not in new:
                    new[id(m)] = Node(None)
                    order.append(m)
        for node in order:
            c = new[id(node)]
            c.count, c.link = node.count, None if node.link is None else new[id(node.link)]
            if node.children is not None:
                c.children = {t: new[id(x)] if isinstance(x, Node) else Leaf(x.seq, x.pos)
                              for t, x in node.children.items()}
        twin.max_depth, twin.root, twin._next_id = self.max_depth, new[id(self.root)], self._next_id
        twin.num_nodes, twin.num_leaves = self.num_nodes, self.num_leaves
        twin._tokens = {k: list(v) for k, v in self._tokens.items()}
        twin._suffixes = {k: [new[id(n)] for n in v] for k, v in self._suffixes.items()}
        memo.update((id(node), new[id(node)]) for node in order)
        memo.update((id(self._tokens[k]), twin._tokens[k]) for k in self._tokens)
        return twin

    def sequence_ids(self) -> list:
        return list(self._tokens)

    def sequence(self, seq_id) -> list:
        """The sequence's tokens (the tree's own list: read, do not modify)."""
        return self._tokens[seq_id]

    def suffix_nodes(self, seq_id) -> list:
        """Entry j: the Node of the sequence's last j tokens (j = 0: the root), for every j that
        has one (the suffixes that occur more than once, shorter than max_depth)."""
        return self._suffixes[seq_id]

    def add_sequence(self, tokens) -> int:
        """Adds every suffix of `tokens` (truncated to max_depth); returns the new sequence's id."""
        seq_id = self._next_id
        self._next_id += 1
        self._tokens[seq_id] = []
        self._suffixes[seq_id] = [self.root]
        for t in tokens:
            self.extend(seq_id, t)
        return seq_id

    def extend(self, seq_id, token) -> None:
        """Appends one token to a sequence: counts the substrings that end at it."""
        token = int(token)
        toks = self._tokens[seq_id]
        toks.append(token)
        end = len(toks) - 1
        self.root.count += 1
        prev = self.root  # the new suffix one token shorter: a new node's suffix link
        grown = [prev]
        for j, node in enumerate(self._suffixes[seq_id]):  # Node suffixes, shortest first
            kids = node.children
            if kids is None:
                kids = node.children = {}
            child = kids.get(token)
            if child is None:  # the new suffix occurs once, and so do the longer ones
                kids[token] = Leaf(seq_id, end)
                self.num_leaves += 1
                continue
            if type(child) is Leaf:
                child = self._split(kids, token, child, j + 1, prev)
            child.count += 1
            grown.append(child)
            prev = child
        # Unique suffixes are leaves pointing into `toks`: they grew with the append.
        del grown[self.max_depth :]  # a suffix of max_depth tokens can never grow
        self._suffixes[seq_id] = grown

    def _split(self, kids: dict, token: int, leaf: Leaf, depth: int, link: Node) -> Node:
        """The leaf's first string (at `depth`) occurs again: make it a Node, count 1 so far."""
        child = kids[token] = Node(link)
        child.count = 1
        self.num_nodes += 1
        self.num_leaves -= 1
        if depth < self.max_depth:
            toks, q = self._tokens[leaf.seq], leaf.pos + 1
            if q < len(toks):  # the old occurrence goes on: a leaf below the new node
                child.children = {toks[q]: Leaf(leaf.seq, q)}
                self.num_leaves += 1
            else:  # it ends its sequence: that sequence's suffix of this length is a Node now
                suffixes = self._suffixes[leaf.seq]
                assert len(suffixes) == depth, "suffix nodes out of step"
                suffixes.append(child)
        return child

    def remove_sequence(self, seq_id) -> None:
        """Removes a sequence's substrings: counts drop, strings nobody else has are pruned."""
        toks = self._tokens[seq_id]
        n, D = len(toks), self.max_depth
        self.root.count -= n
        for i in range(n):
            node = self.root
            for a in range(i, min(n, i + D)):
                kids = node.children
                child = kids[toks[a]]
                if type(child) is Leaf or child.count == 1:
                    # Its only occurrence is this one, so is every string below it: drop it whole.
                    # (Links into it come from strings that occur only at i - 1 here: removed too.)
                    del kids[toks[a]]
                    if not kids:
                        node.children = None
                    while type(child) is Node:  # a count-1 node has at most one child
                        self.num_nodes -= 1
                        child = next(iter(child.children.values())) if child.children else None
                    self.num_leaves -= child is not None
                    break
                child.count -= 1
                node = child
        del self._tokens[seq_id], self._suffixes[seq_id]

    # --- places: walking down, following links ----------------------------------------------

    def step(self, place, depth: int, token: int):
        """The place of the string at `place` (of length `depth`) + token, or None if absent."""
        node, leaf, k = place
        if leaf is None:
            child = node.children.get(token) if node.children else None
            if child is None:
                return None
            return (node, child, 1) if type(child) is Leaf else (child, None, 0)
        toks, q = self._tokens[leaf.seq], leaf.pos + k
        if depth < self.max_depth and q < len(toks) and toks[q] == token:
            return node, leaf, k + 1
        return None

    def _descend(self, node: Node, toks: list, a: int, b: int):
        """The place of node's string + toks[a:b], a string known to be in the tree."""
        while a < b:
            child = node.children[toks[a]]
            if type(child) is Leaf:
                return node, child, b - a  # the rest lies along the leaf
            node, a = child, a + 1
        return node, None, 0

    def link(self, place):
        """The place of the string without its first token (the string must not be empty)."""
        node, leaf, k = place
        if leaf is None:
            return node.link, None, 0
        toks = self._tokens[leaf.seq]
        if node is self.root:
            return self._descend(node, toks, leaf.pos + 1, leaf.pos + k)
        return self._descend(node.link, toks, leaf.pos, leaf.pos + k)

    def has_next(self, place, depth: int) -> bool:
        """Whether the string at `place` (of length `depth`) has a continuation in the tree."""
        node, leaf, k = place
        if leaf is None:
            return bool(node.children)
        return depth < self.max_depth and leaf.pos + k < len(self._tokens[leaf.seq])

    def count_at(self, place) -> int:
        return place[0].count if place[1] is None else 1

    def match(self, context):
        """(place, m): the longest suffix of `context` (<= max_depth tokens) in the tree, m its
        length (0: the root). O(len(context)) steps plus the walks that leave leaves."""
        if isinstance(context, torch.Tensor):
            context = context.tolist()
        place, m = (self.root, None, 0), 0
        for t in list(context[-self.max_depth :]):
            while True:
                nxt = self.step(place, m, t)
                if nxt is not None:
                    place, m = nxt, m + 1
                    break
                if m == 0:
                    break
                place, m = self.link(place), m - 1  # drop the oldest token, keep the rest
        return place, m

    def count(self, substring) -> int:
        """Occurrences of `substring` (0 if absent or longer than max_depth)."""
        place = (self.root, None, 0)
        for depth, t in enumerate(substring):
            place = self.step(place, depth, int(t))
            if place is None:
                return 0
        return self.count_at(place)

    # --- speculation ------------------------------------------------------------------------

    def speculate(self, place, depth: int, max_tokens: int, min_token_prob: float):
        """Best-first speculation tree below the string at `place` (of length `depth`).

        Returns lists tokens, parents (-1: a child of `place`, else an earlier index) and scores
        (products of count(child) / followed(parent) down the path), in expansion order: scores
        never increase, so siblings come best first."""
        tokens, parents, scores = [], [], []
        if max_tokens <= 0:
            return tokens, parents, scores
        D, seqs = self.max_depth, self._tokens
        heap, tick = [], 0  # (-score, tick, token, node, leaf, k, depth, parent); tick: first seen first
        (node, leaf, k), score, index = place, 1.0, -1
        while True:
            if leaf is None:
                kids = node.children
                if kids:
                    followed = 0
                    for child in kids.values():
                        followed += child.count
                    for t, child in kids.items():
                        s = score * child.count / followed
                        if s >= min_token_prob:
                            if type(child) is Leaf:
                                heapq.heappush(heap, (-s, tick, t, node, child, 1, depth + 1, index))
                            else:
                                heapq.heappush(heap, (-s, tick, t, child, None, 0, depth + 1, index))
                            tick += 1
            elif depth < D:  # along a leaf: one continuation, probability 1
                toks, q = seqs[leaf.seq], leaf.pos + k
                if q < len(toks):
                    heapq.heappush(heap, (-score, tick, toks[q], node, leaf, k + 1, depth + 1, index))
                    tick += 1
            if not heap:
                break
            neg, _, t, node, leaf, k, depth, parent = heapq.heappop(heap)
            score, index = -neg, len(tokens)
            tokens.append(t)
            parents.append(parent)
            scores.append(score)
            if len(tokens) >= max_tokens:
                break
        return tokens, parents, scores


class _Request:
    __slots__ = ("tree", "seq", "tokens", "prompt_len")

    def __init__(self, tokens: list, prompt_len: int, max_depth: int):
        self.tree = SuffixTree(max_depth)
        self.seq = self.tree.add_sequence(tokens)
        self.tokens = self.tree.sequence(self.seq)  # prompt + response so far (grows with extend)
        self.prompt_len = min(prompt_len, len(tokens))


class SuffixTreeDrafter(Drafter):
    """SuffixDecoding: the better of a global and a per-request suffix tree's speculation trees.

    corpus: None, a drafters.corpus.Corpus or the path of a saved one; its documents seed the
    global tree. max_depth: the trees' depth. max_spec: cap on draft nodes (None: the engine's
    budget). alpha, offset: a match of m tokens allows floor(alpha * m + offset) nodes.
    min_token_prob: smallest path probability a node may have. max_global_sequences: how many
    sequences (corpus documents first, then finished responses) the global tree keeps.
    A drafter reused across generate calls keeps its global tree, so it keeps learning.
    """

    name = "suffix"

    def __init__(self, corpus=None, max_depth: int = 64, max_spec: int | None = None, alpha: float = 2.0,
                 offset: float = 0.0, min_token_prob: float = 0.1, max_global_sequences: int = 4096):
        self.corpus = Corpus.of(corpus)
        self.max_depth = _positive_int("max_depth", max_depth, 2)
        self.max_spec = None if max_spec is None else _positive_int("max_spec", max_spec)
        self.alpha = _real("alpha", alpha, 0.0)
        self.offset = _real("offset", offset, -math.inf)
        self.min_token_prob = _real("min_token_prob", min_token_prob, 0.0, 1.0)
        self.max_global_sequences = _positive_int("max_global_sequences", max_global_sequences, 0)
        self.global_tree = SuffixTree(self.max_depth)
        self._global_ids = deque()  # oldest first
        self._max_token = -1  # largest token id ever added to the global tree
        self._seeded = False
        self._requests: list[_Request] = []

    # --- the global tree ---------------------------------------------------------------------

    def add_global(self, tokens) -> None:
        """Adds one sequence to the global tree, evicting the oldest beyond max_global_sequences."""
        tokens = [int(t) for t in tokens]
        if not tokens or self.max_global_sequences == 0:
            return
        self._global_ids.append(self.global_tree.add_sequence(tokens))
        self._max_token = max(self._max_token, max(tokens))
        while len(self._global_ids) > self.max_global_sequences:
            self.global_tree.remove_sequence(self._global_ids.popleft())

    def _learn(self, request: _Request) -> None:
        self.add_global(request.tokens[request.prompt_len :])

    # --- the drafter interface ---------------------------------------------------------------

    def prepare(self, vocab_size: int, device) -> None:
        if self.corpus is not None and not self._seeded:
            top = int(self.corpus.tokens.max())
            if top >= vocab_size:
                raise ValueError(f"corpus has token id {top}, outside the model's vocabulary of {vocab_size}")
            for doc in self.corpus.documents():
                self.add_global(doc.tolist())
        self._seeded = True
        if self._max_token >= vocab_size:
            raise ValueError(f"the global suffix tree has token id {self._max_token}, outside the model's "
                             f"vocabulary of {vocab_size} (a drafter used with another model?)")

    def start(self, history: torch.Tensor, lens: torch.Tensor) -> None:
        # The prompt is all but the last token: the first generated one, which starts the response.
        rows, L = history.tolist(), lens.tolist()
        self._requests = [_Request(row[:n], n - 1, self.max_depth) for row, n in zip(rows, L)]

    def update(self, history: torch.Tensor, lens: torch.Tensor, accepted: torch.Tensor) -> None:
        B = history.shape[0]
        acc = accepted.tolist()
        A = max(acc, default=0)
        if len(self._requests) != B or A <= 0:
            return  # out of step: propose rebuilds
        idx = (lens.view(B, 1) - A + torch.arange(A, device=lens.device)).clamp(min=0)  # (B, A)
        tails = history.gather(1, idx).tolist()
        for b, (req, tail, a, n) in enumerate(zip(self._requests, tails, acc, lens.tolist())):
            if a <= 0:
                continue
            if len(req.tokens) + a != n:  # missed a step: rebuild from the history
                self._requests[b] = _Request(history[b, :n].tolist(), req.prompt_len, self.max_depth)
                continue
            for t in tail[A - a :]:
                req.tree.extend(req.seq, t)

    def retain(self, index: torch.Tensor) -> None:
        keep = index.tolist()
        if not all(0 <= i < len(self._requests) for i in keep):
            self._requests = []  # out of step: propose rebuilds
            return
        kept = set(keep)
        for b, req in enumerate(self._requests):
            if b not in kept:  # finished: its final tokens came with the last update
                self._learn(req)
        self._requests = [self._requests[i] for i in keep]

    def finish(self) -> None:
        for req in self._requests:
            self._learn(req)
        self._requests = []

    def _sync(self, history: torch.Tensor, lens: torch.Tensor) -> None:
        """Rebuild per-request state that does not match (history, lens): a drafter called without
        start/update (tests, benchmarks) treats the whole history as prompt."""
        L = lens.tolist()
        if len(self._requests) != len(L):
            self._requests = [_Request(row[:n], n, self.max_depth) for row, n in zip(history.tolist(), L)]
            return
        for b, (req, n) in enumerate(zip(self._requests, L)):
            if len(req.tokens) != n:
                self._requests[b] = _Request(history[b, :n].tolist(), req.prompt_len, self.max_depth)

    def _grow(self, tree: SuffixTree, place, m: int, K: int):
        """(score, match length, tokens, parents) of the speculation tree below a match of m tokens."""
        n = min(K, max(0, math.floor(self.alpha * m + self.offset))) if m > 0 else 0
        tokens, parents, scores = tree.speculate(place, m, n, self.min_token_prob)
        return sum(scores), m, tokens, parents

    def draft_one(self, req: _Request, K: int):
        """Both trees' proposals for one request; returns the better (score, m, tokens, parents)."""
        P = max(1, self.max_depth - K)  # longest pattern: a K-deep draft still fits below it
        suffixes = req.tree.suffix_nodes(req.seq)
        m = min(P, len(suffixes) - 1)
        while m > 0 and not suffixes[m].children:  # only the current occurrence: back off
            m -= 1
        local = self._grow(req.tree, (suffixes[m], None, 0), m, K)
        tree = self.global_tree
        place, g = tree.match(req.tokens[-P:])
        while g > 0 and not tree.has_next(place, g):  # occurs only at the ends of responses: back off
            place, g = tree.link(place), g - 1
        glob = self._grow(tree, place, g, K)
        best = glob if glob[0] > local[0] else local
        if not best[2]:
            return 0.0, max(m, g), [], []
        return best

    def propose(self, history: torch.Tensor, lens: torch.Tensor, max_nodes: int) -> DraftTree:
        B, device = history.shape[0], history.device
        K = min(max_nodes, self.max_spec or max_nodes)
        self._sync(history, lens)
        if K <= 0:
            draft = DraftTree.empty(B, device)
            draft.match_len = torch.zeros(B, dtype=torch.int64, device=device)
            return draft
        rows = [self.draft_one(req, K) for req in self._requests]
        width = max((len(r[2]) for r in rows), default=0)
        tokens = torch.tensor([r[2] + [0] * (width - len(r[2])) for r in rows], dtype=torch.int64)
        parents = torch.tensor([r[3] + [-1] * (width - len(r[3])) for r in rows], dtype=torch.int64)
        count = torch.tensor([len(r[2]) for r in rows], dtype=torch.int64)
        match_len = torch.tensor([r[1] for r in rows], dtype=torch.int64)
        return DraftTree(tokens.view(B, width).to(device), parents.view(B, width).to(device), count.to(device),
                         match_len=match_len.to(device))
