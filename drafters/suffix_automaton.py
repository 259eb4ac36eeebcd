"""SAM-Decoding (Hu et al., 2024): drafts from suffix automata over a static corpus and over each
request's own tokens.

A suffix automaton over a text accepts exactly its substrings. State v stands for the set of
substrings with the same end positions in the text (endpos); len[v] is the longest of them, and the
suffix link link[v] goes to the state of the longest suffix with a strictly larger endpos set. Per
state we keep first_end[v] = min endpos (where its substrings first end; a clone inherits the
original's, since the clone only adds a later end) and count[v] = |endpos| (occurrences).

Matching a stream against the automaton keeps (state, match_len): the longest suffix of the stream
that is a substring of the text. On token t, follow state's transition on t (match_len + 1), else
walk suffix links (match_len = len of the state reached) until one has it, or fall to the root (0).

Two automata per request, as in the paper:
  STATIC   over a corpus (documents joined with SEP = -1 after each; queries never hold SEP, so no
           match spans two documents). Its arrays live on the model's device and every request's
           match state advances at once (`StaticIndex.step`): transitions are CSR, sorted by token
           within a state, so key = state * W + token + 1 is globally sorted and one
           `torch.searchsorted` is the per-row binary search; suffix-link walks are masked
           iterations until no row still walks (bounded by the suffix-link tree's depth). Only
           the prompt is matched on the host (`start`: ~1 us a token in Python, where the device
           would pay a dozen launches per token of the longest prompt).
  DYNAMIC  over the request's prompt + committed tokens, extended on the host as tokens commit. The
           whole text trivially matches itself; the longest suffix that also occurs EARLIER is the
           state link[last] (the last state's endpos is {r}; its link's endpos is a strict superset,
           so it also ends before r), and first_end of that state is its first occurrence: O(1).

Draft rule, per request: the static match counts static_bias tokens less; the longer (effective)
match wins, the dynamic one on ties. With raw length m of the winner the draft has at most
min(max_nodes, max_draft, 1 + length_scale * m) nodes (0 when m == 0):
  dynamic  the chain of tokens after the first occurrence's end, up to the root;
  static   static_tree=False: the chain after the first occurrence's end, up to its document's end;
           static_tree=True: a best-first tree over occurrence counts: a child's priority is its
           parent's times count[child] / count[parent]; siblings pop in rank order and parents
           precede children.

Shapes: B batch, T history width, K draft nodes, S automaton states, E transitions.
"""

import heapq
from pathlib import Path

import numpy as np
import torch

from drafters.base import Drafter, DraftTree
from drafters.corpus import Corpus

SEP = -1  # document separator in the static automaton's text; never a query token
ARRAY_KEYS = ("len", "link", "first_end", "count", "trans_start", "trans_token", "trans_target", "text")


class SuffixAutomaton:
    """The online suffix automaton (host side, plain Python), extended one token at a time."""

    def __init__(self):
        self.length, self.link, self.first_end = [0], [-1], [-1]
        self.next: list[dict] = [{}]  # per state: token -> state
        self.text: list[int] = []
        self.last = 0  # the state of the whole text
        self._count = None

    @classmethod
    def build(cls, tokens) -> "SuffixAutomaton":
        sam = cls()
        for t in tokens:
            sam.extend(t)
        return sam

    @classmethod
    def from_documents(cls, documents) -> "SuffixAutomaton":
        """Over the documents, each followed by SEP, so no match spans two of them."""
        sam = cls()
        for doc in documents:
            for t in np.asarray(doc).tolist():
                sam.extend(t)
            sam.extend(SEP)
        return sam

    def __len__(self) -> int:
        return len(self.length)

    def extend(self, token: int) -> int:
        """Append one token (amortized O(1)); returns the new last state."""
        token = int(token)
        length, link, nxt, first_end = self.length, self.link, self.next, self.first_end
        pos = len(self.text)
        self.text.append(token)
        cur = len(length)
        length.append(pos + 1)
        link.append(0)
        first_end.append(pos)
        nxt.append({})
        p = self.last
        while p != -1 and token not in nxt[p]:
            nxt[p][token] = cur
            p = link[p]
        if p != -1:
            q = nxt[p][token]
            if length[p] + 1 == length[q]:
                link[cur] = q
            else:  # q's class splits: the shorter strings (now also ending at pos) move to a clone
                clone = len(length)
                length.append(length[p] + 1)
                link.append(link[q])
                first_end.append(first_end[q])
                nxt.append(dict(nxt[q]))
                while p != -1 and nxt[p].get(token) == q:
                    nxt[p][token] = clone
                    p = link[p]
                link[q] = link[cur] = clone
        self.last = cur
        self._count = None
        return cur

    def step(self, state: int, match_len: int, token: int) -> tuple[int, int]:
        """Longest-suffix match: (state, match_len) after the query stream gains `token`."""
        nxt, link, length = self.next, self.link, self.length
        while state and token not in nxt[state]:
            state = link[state]
            match_len = length[state]
        target = nxt[state].get(token)
        return (0, 0) if target is None else (target, match_len + 1)

    def repeated_suffix(self) -> tuple[int, int]:
        """(length, first end) of the longest suffix of the text that also ends earlier in it."""
        v = self.link[self.last] if self.last else 0
        return self.length[v], self.first_end[v]

    def counts(self) -> np.ndarray:
        """(S,) int64 |endpos| per state: 1 for each state created as a new last state (its
        length is its first end + 1; clones are shorter), summed up the suffix links by
        decreasing len. The root gets len(text)."""
        if self._count is None:
            length = np.asarray(self.length)
            own = (length == np.asarray(self.first_end) + 1).astype(np.int64)
            own[0] = 0
            count = own.tolist()
            link = self.link
            for v in np.argsort(-length, kind="stable").tolist():
                if v:
                    count[link[v]] += count[v]
            self._count = np.asarray(count, dtype=np.int64)
        return self._count

    def to_arrays(self) -> dict:
        """len, link, first_end, count (S,); trans_start (S + 1,) and trans_token, trans_target
        (E,) as CSR sorted by token within each state; text (n,). All int64 numpy."""
        rows = [sorted(d.items()) for d in self.next]
        deg = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
        pairs = np.array([kv for r in rows for kv in r], dtype=np.int64).reshape(-1, 2)
        return dict(len=np.asarray(self.length, dtype=np.int64), link=np.asarray(self.link, dtype=np.int64),
                    first_end=np.asarray(self.first_end, dtype=np.int64), count=self.counts().copy(),
                    trans_start=np.concatenate([[0], np.cumsum(deg)]).astype(np.int64),
                    trans_token=pairs[:, 0].copy(), trans_target=pairs[:, 1].copy(),
                    text=np.asarray(self.text, dtype=np.int64))

    @classmethod
    def from_arrays(cls, arrays) -> "SuffixAutomaton":
        sam = cls()
        sam.length = np.asarray(arrays["len"]).tolist()
        sam.link = np.asarray(arrays["link"]).tolist()
        sam.first_end = np.asarray(arrays["first_end"]).tolist()
        sam.text = np.asarray(arrays["text"]).tolist()
        start = np.asarray(arrays["trans_start"]).tolist()
        tok, tgt = np.asarray(arrays["trans_token"]).tolist(), np.asarray(arrays["trans_target"]).tolist()
        sam.next = [dict(zip(tok[a:b], tgt[a:b])) for a, b in zip(start[:-1], start[1:])]
        sam.last = int(np.argmax(arrays["len"]))  # the whole text is the unique longest state
        sam._count = np.asarray(arrays["count"], dtype=np.int64).copy()
        return sam

    def save(self, path):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, **self.to_arrays())

    @classmethod
    def load(cls, path) -> "SuffixAutomaton":
        with np.load(Path(path)) as z:
            missing = set(ARRAY_KEYS) - set(z.files)
            if missing:
                raise ValueError(f"{path} is not a saved suffix automaton (missing {sorted(missing)})")
            return cls.from_arrays({k: z[k] for k in ARRAY_KEYS})


class StaticIndex:
    """An automaton's arrays as tensors on one device; `step` advances every request at once."""

    def __init__(self, arrays: dict, device):
        t = {k: torch.as_tensor(np.asarray(arrays[k]), dtype=torch.int64, device=device) for k in ARRAY_KEYS}
        self.length, self.link, self.first_end, self.count, self.text = (
            t["len"], t["link"], t["first_end"], t["count"], t["text"])
        self.trans_start, self.trans_token, self.trans_target = t["trans_start"], t["trans_token"], t["trans_target"]
        tokens = np.asarray(arrays["trans_token"])
        self.max_token = int(tokens.max()) if tokens.size else 0
        # Shifted tokens: SEP -> 0, t -> t + 1; W - 1 stands for every token the text lacks.
        self.W = self.max_token + 3
        start = np.asarray(arrays["trans_start"])
        owner = np.repeat(np.arange(len(start) - 1, dtype=np.int64), np.diff(start))  # (E,)
        # Keys ascend; a sentinel past the last makes every lower bound a valid index (no clamp).
        keys = np.append(owner * self.W + tokens + 1, np.iinfo(np.int64).max)  # (E + 1,)
        self.keys = torch.as_tensor(keys, device=device)
        self._target = torch.cat([self.trans_target, self.trans_target.new_zeros(1)])  # (E + 1,)
        self._up = self.link.clamp(min=0)  # (S,) the root is its own parent: walks stop there
        # A step walks at most depth(state) suffix links before it moves or reaches the root.
        length, link = np.asarray(arrays["len"]), np.asarray(arrays["link"])
        depth = np.zeros(len(length), dtype=np.int64)
        for v in np.argsort(length, kind="stable")[1:].tolist():
            depth[v] = depth[link[v]] + 1
        self.max_walk = int(depth.max()) + 1
        self.device = torch.device(device)

    @torch.no_grad()
    def step(self, state, match_len, token, active=None):
        """state, match_len, token (B,) int64 -> (state, match_len) after the token; rows with
        active False are left as they are."""
        valid = (token >= 0) & (token <= self.max_token)
        key_token = torch.where(valid, token + 1, self.W - 1)  # (B,)
        pending = torch.ones_like(valid) if active is None else active.clone()
        for _ in range(self.max_walk):
            key = torch.add(key_token, state, alpha=self.W)  # (B,)
            i = torch.searchsorted(self.keys, key)  # (B,) lower bound: the row's binary search
            hit = self.keys[i] == key
            take = pending & hit
            stuck = pending ^ take
            # A stuck row walks one suffix link; at the root it stays with match_len 0 and stops.
            up = self._up[state]
            match_len = torch.where(take, match_len + 1, torch.where(stuck, self.length[up], match_len))
            pending = stuck & (state != 0)
            state = torch.where(take, self._target[i], torch.where(stuck, up, state))
            if not bool(pending.any()):
                break
        return state, match_len

    def advance(self, state, match_len, tokens, num):
        """Feed row b its first num[b] tokens of tokens (B, J)."""
        for j in range(tokens.shape[1]):
            state, match_len = self.step(state, match_len, tokens[:, j], active=num > j)
        return state, match_len

    def continuation(self, state, budget, K: int):
        """The chain after each state's first end, up to its document's end: tokens (B, K), count (B,)."""
        B = state.shape[0]
        k = torch.arange(K, device=state.device)  # (K,)
        src = (self.first_end[state].view(B, 1) + 1 + k).clamp(max=self.text.numel() - 1)  # (B, K)
        tokens = self.text[src]
        inside = (tokens != SEP).cumprod(dim=1).sum(dim=1)  # (B,) text ends with SEP: never runs off
        count = torch.minimum(inside, budget)
        return torch.where(k < count.view(B, 1), tokens, 0), count


def best_first_tree(sam: SuffixAutomaton, counts: list, state: int, budget: int):
    """Tokens and parents of at most `budget` nodes below `state`, best-first by the product of
    count ratios along the path (equal priorities: first pushed first, so siblings of equal count
    come in token order). A node's index is its pop order: parents precede children, and
    siblings, whose priorities are their parent's times their count, come in rank order."""
    tokens, parents, heap, serial = [], [], [], 0

    def push(s, parent, prob):
        nonlocal serial
        for tok, t in sorted(sam.next[s].items()):
            if tok != SEP:
                heapq.heappush(heap, (-prob * counts[t] / counts[s], serial, tok, t, parent))
                serial += 1

    push(state, -1, 1.0)
    while heap and len(tokens) < budget:
        neg, _, tok, t, parent = heapq.heappop(heap)
        tokens.append(tok)
        parents.append(parent)
        if len(tokens) < budget:
            push(t, len(tokens) - 1, -neg)
    return tokens, parents


def _int_option(name, value, minimum, allow_none=False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


class SAMDrafter(Drafter):
    """SAM-Decoding: the longer of the static (corpus) and dynamic (own tokens) suffix matches.

    corpus: None, a drafters.corpus.Corpus or the path of a saved one. max_draft: cap on draft
    nodes (None = max_nodes). static_bias: tokens a static match counts less. length_scale: a
    match of m tokens drafts at most 1 + length_scale * m nodes. static_tree: best-first trees
    (True) or first-occurrence chains (False) from the static automaton.

    After each propose, last_dynamic_len and last_static_len (B,) int64 hold the raw match lengths.
    """

    name = "sam"

    def __init__(self, corpus=None, max_draft=None, static_bias=5, length_scale=4, static_tree=True):
        corpus = Corpus.of(corpus)
        self.corpus = corpus
        self.max_draft = _int_option("max_draft", max_draft, 1, allow_none=True)
        self.static_bias = _int_option("static_bias", static_bias, -(2**62))
        self.length_scale = _int_option("length_scale", length_scale, 0)
        self.static_tree = bool(static_tree)
        self.static = None if corpus is None else SuffixAutomaton.from_documents(corpus.documents())
        self._arrays = None if corpus is None else self.static.to_arrays()
        self._counts = None if corpus is None else self._arrays["count"].tolist()
        self.index: StaticIndex | None = None
        self.device = torch.device("cpu")
        self._dyn: list[SuffixAutomaton] | None = None  # per request, with _n: tokens consumed
        self._n: list[int] = []
        self.last_dynamic_len = self.last_static_len = None

    def prepare(self, vocab_size: int, device) -> None:
        self.device = torch.device(device)
        if self.corpus is None:
            return
        self.corpus.check_vocab(vocab_size)
        if self.index is None or self.index.device != self.device:
            self.index = StaticIndex(self._arrays, self.device)

    def start(self, history: torch.Tensor, lens: torch.Tensor) -> None:
        n = lens.tolist()
        rows = history[:, : max(n, default=0)].cpu().tolist()
        self._dyn = [SuffixAutomaton.build(row[:k]) for row, k in zip(rows, n)]
        self._n = n
        # The prompt is matched on the host (see the module docstring); later tokens on the device.
        states = []
        for row, k in zip(rows, n):
            s, m = 0, 0
            for t in row[:k] if self.static is not None else ():
                s, m = self.static.step(s, m, t)
            states.append((s, m))
        st = torch.tensor(states, dtype=torch.int64).view(-1, 2).to(self.device)
        self._st_state, self._st_len = st[:, 0].contiguous(), st[:, 1].contiguous()
        self._upload_dynamic()

    def update(self, history: torch.Tensor, lens: torch.Tensor, accepted: torch.Tensor) -> None:
        if self._dyn is None:
            return self.start(history, lens)
        n = lens.tolist()
        new = [a - b for a, b in zip(n, self._n)]
        J = max(new, default=0)
        if J <= 0:
            return
        B, T = history.shape
        old = torch.tensor(self._n, dtype=torch.int64, device=history.device)  # (B,)
        idx = (old.view(B, 1) + torch.arange(J, device=history.device)).clamp(max=T - 1)  # (B, J)
        tokens = history.gather(1, idx)  # (B, J) the newly committed tokens
        if self.index is not None:
            num = torch.tensor(new, dtype=torch.int64, device=self.device)
            self._st_state, self._st_len = self.index.advance(self._st_state, self._st_len, tokens, num)
        for sam, row, k in zip(self._dyn, tokens.tolist(), new):
            for t in row[:k]:
                sam.extend(t)
        self._n = n
        self._upload_dynamic()

    def _upload_dynamic(self):
        dyn = torch.tensor([sam.repeated_suffix() for sam in self._dyn], dtype=torch.int64).view(-1, 2)
        dyn = dyn.to(self.device)
        self._dyn_len, self._dyn_end = dyn[:, 0].contiguous(), dyn[:, 1].contiguous()

    def retain(self, index: torch.Tensor) -> None:
        keep = index.tolist()
        self._dyn = [self._dyn[i] for i in keep]
        self._n = [self._n[i] for i in keep]
        index = index.to(self.device)
        self._st_state, self._st_len = self._st_state[index], self._st_len[index]
        self._dyn_len, self._dyn_end = self._dyn_len[index], self._dyn_end[index]

    def propose(self, history: torch.Tensor, lens: torch.Tensor, max_nodes: int) -> DraftTree:
        B, T = history.shape
        device = history.device
        if self._dyn is None:
            self.start(history, lens)
        dyn_len, dyn_end, st_len = self._dyn_len, self._dyn_end, self._st_len
        self.last_dynamic_len, self.last_static_len = dyn_len, st_len
        K = min(max_nodes, self.max_draft or max_nodes)
        use_static = (st_len > 0) & (st_len - self.static_bias > dyn_len)  # (B,) dynamic wins ties
        match_len = torch.where(use_static, st_len - self.static_bias, dyn_len)
        if K <= 0:
            draft = DraftTree.empty(B, device)
            draft.match_len = match_len
            return draft
        m = torch.where(use_static, st_len, dyn_len)  # (B,) raw length of the chosen match
        budget = torch.where(m > 0, (1 + self.length_scale * m).clamp(max=K), 0)  # (B,)
        # Dynamic: history after the first occurrence's end, up to the root.
        k = torch.arange(K, device=device)  # (K,)
        count = torch.minimum(torch.where(dyn_len > 0, lens - 1 - dyn_end, 0), budget)  # (B,)
        src = (dyn_end.view(B, 1) + 1 + k).clamp(min=0, max=T - 1)  # (B, K)
        tokens = torch.where(k < count.view(B, 1), history.gather(1, src), 0)  # (B, K)
        parents = (k - 1).expand(B, K)
        if self.index is not None and self.static_tree:
            tokens, parents, count = self._static_trees(use_static, budget, tokens, parents, count)
        elif self.index is not None:
            s_tokens, s_count = self.index.continuation(self._st_state, budget, K)
            tokens = torch.where(use_static.view(B, 1), s_tokens, tokens)
            count = torch.where(use_static, s_count, count)
        draft = DraftTree(tokens, parents.contiguous(), count)
        draft.match_len = match_len
        return draft

    def _static_trees(self, use_static, budget, tokens, parents, count):
        """Rows that chose the static match get best-first trees built on the host (one sync)."""
        rows = torch.stack([use_static.long(), self._st_state, budget], dim=1).tolist()
        tokens, parents, count = tokens.cpu(), parents.cpu().clone(), count.cpu()
        for b, (chosen, state, n) in enumerate(rows):
            if not chosen:
                continue
            tok, par = best_first_tree(self.static, self._counts, state, n)
            tokens[b] = 0
            tokens[b, : len(tok)] = torch.tensor(tok, dtype=torch.int64)
            parents[b] = -1
            parents[b, : len(par)] = torch.tensor(par, dtype=torch.int64)
            count[b] = len(tok)
        return tokens.to(self.device), parents.to(self.device), count.to(self.device)
