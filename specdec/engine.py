"""The speculative decoding engine: draft -> verify (one forward) -> accept (one kernel) -> commit.

Invariant between steps, per active request b:
    history[b, :lens[b]]  prompt + every committed token; the last one is the ROOT, already
                          chosen but not yet in the KV cache, so cache.lens[b] == lens[b] - 1.
A step feeds the root and its draft tree (node 0 = root, nodes 1.. = drafts) through the model
in one forward, verifies the tree against the target's logits, keeps the root and the accepted
path in the cache, and appends the accepted tokens plus the next token (bonus or resampled) to
the history; that next token is the new root. Lossless by construction: the verification rule
emits exactly the target's greedy choice or a draw from the target's distribution.
"""

import time
from collections import Counter
from dataclasses import dataclass, field

import torch

from drafters.base import Drafter, DraftTree
from kernels.sampling import sample, uniforms
from kernels.tree_attention import tree_from_parents
from kernels.verify import VerifyResult, sample_tokens, verify
from specdec.generate import SamplingParams, eos_tensor, prefill
from specdec.loading import Model
from specdec.model import survivors
from specdec.profiling import nvtx_range


@dataclass
class StepStats:
    """What one generate call's speculation did; `summary()` goes into GenerationResult.stats."""

    steps: int = 0  # verification steps
    tokens: int = 0  # tokens added by those steps (the model's own token included)
    accept_hist: Counter = field(default_factory=Counter)  # accepted draft tokens per request-step
    shadow_looks: int = 0  # drafts scored against the plain steps after them, not verified
    seconds: dict = field(default_factory=lambda: {"draft": 0.0, "verify": 0.0, "bookkeeping": 0.0})

    def summary(self) -> dict:
        request_steps = sum(self.accept_hist.values())
        return dict(
            verify_steps=self.steps,
            mean_accepted_tokens=self.tokens / max(request_steps, 1),
            accepted_length_histogram=dict(sorted(self.accept_hist.items())),
            shadow_looks=self.shadow_looks,
            time_split={k: round(v, 6) for k, v in self.seconds.items()},
        )


@dataclass
class Batch:
    """Per-request state of the requests still decoding (row b of every tensor is one request)."""

    ids: torch.Tensor  # (B,) original request index
    history: torch.Tensor  # (B, T) int64
    lens: torch.Tensor  # (B,) int64
    generated: torch.Tensor  # (B,) int64 tokens generated so far
    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    seeds: torch.Tensor
    offsets: torch.Tensor  # (B,) int64 random-number counters
    ones: torch.Tensor  # (B,) int64, all 1: a plain step's token count per request

    def keep(self, index: torch.Tensor) -> "Batch":
        return Batch(*(getattr(self, f)[index] for f in self.__dataclass_fields__))


def truncate(draft: DraftTree, sizes: torch.Tensor) -> DraftTree:
    """The first sizes[b] nodes of request b's tree (a prefix of a tree is a tree: parents come first)."""
    sizes = sizes.to(draft.count.device)
    count = torch.minimum(draft.count, sizes)
    width = int(sizes.max()) if sizes.numel() else 0
    probs = None if draft.probs is None else draft.probs[:, : width + 1]
    return DraftTree(draft.tokens[:, :width], draft.parents[:, :width], count, probs, draft.siblings,
                     draft.match_len)


def pack(roots: torch.Tensor, draft: DraftTree, width: int):
    """The verification tree: node 0 = root, node k + 1 = draft node k.

    width: the widest real draft (draft.count.max()); padding nodes past it would cost a forward's
    worth of rows. Returns tokens (B, N), parents (B, N), num_nodes (B,), with N = 1 + width.
    """
    B = roots.shape[0]
    tokens = torch.cat([roots.view(B, 1), draft.tokens[:, :width]], dim=1)
    dp = draft.parents[:, :width]
    parents = torch.cat([torch.full((B, 1), -1, dtype=torch.int64, device=roots.device), dp + 1], dim=1)
    k = torch.arange(tokens.shape[1], device=roots.device).view(1, -1)
    num_nodes = 1 + draft.count
    parents = torch.where(k < num_nodes.view(B, 1), parents, -1)  # padding nodes: lone roots
    parents[:, 0] = -1
    return tokens, parents, num_nodes


@dataclass
class Shadow:
    """A draft proposed at a look but not verified: the steps after it score it instead."""

    draft: DraftTree
    start: torch.Tensor  # (B,) history lengths when it was proposed
    record: dict  # the controller's sizing of it (`SpeculationController.choose_shadow`)
    seconds: float  # what the look cost (drafting and sizing)
    anc: torch.Tensor  # (B, K, K) its `draft_ancestors`, computed once
    depth: int  # its deepest node: every request has produced that many tokens after as many steps
    steps: int = 0  # steps since (each adds at least one token to every request)
    check: int = 1  # steps at which to look at the verdicts next: 1, 2, 4, ..., depth

    def due(self) -> bool:
        """One more step taken: whether to look at the verdicts now. Most drafts miss within a token
        or two, so the verdicts are looked at after 1, 2, 4, ... steps (a look costs ~0.4 ms at batch
        16 on a 2-core CPU), and every one is in after `depth` steps."""
        self.steps += 1
        if self.steps < min(self.check, self.depth):
            return False
        self.check *= 2
        return True


def draft_ancestors(draft: DraftTree) -> torch.Tensor:
    """(B, K, K) bool: node j is node k's ancestor-or-self, among each request's real draft nodes."""
    B, K = draft.tokens.shape
    valid = torch.arange(K, device=draft.count.device).view(1, K) < draft.count.view(B, 1)
    return tree_from_parents(torch.where(valid, draft.parents, -1))


def draft_depth(draft: DraftTree, anc: torch.Tensor) -> int:
    """The deepest real node of any request's draft (one host sync); anc from `draft_ancestors`."""
    B, K = draft.tokens.shape
    valid = torch.arange(K, device=draft.count.device).view(1, K) < draft.count.view(B, 1)
    return int(torch.where(valid, anc.sum(-1), 0).max()) if K else 0


def shadow_verdict(draft: DraftTree, start: torch.Tensor, history: torch.Tensor, lens: torch.Tensor,
                   anc: torch.Tensor | None = None):
    """What verification would have said of a draft proposed when request b had start[b] tokens,
    read off the tokens the target produced since (history[b, start[b]:lens[b]]).

    Greedy, this is verification's verdict exactly: a node is accepted iff it and its ancestors
    equal the target's choices along the way. Sampling, for a draft without probabilities, it has
    the same distribution: verification accepts node token x with probability p(x), the target's
    probability of x, which is the probability that its sample is x.

    anc: the draft's `draft_ancestors`, if already at hand. Returns on_path (B, K) bool, draft node k
    on the target's path, and known (B,) int64, how many leading nodes have a verdict: a node deeper
    than the tokens produced has none, unless one of its ancestors already missed."""
    B, K = draft.tokens.shape
    k = torch.arange(K, device=start.device).view(1, K)
    valid = k < draft.count.view(B, 1)
    anc = draft_ancestors(draft) if anc is None else anc  # (B, K, K) ancestor-or-self
    depth = anc.sum(-1)  # (B, K), 1 for a child of the root
    made = (lens - start).view(B, 1)  # tokens produced since
    actual = history.gather(1, (start.view(B, 1) + depth - 1).clamp(max=history.shape[1] - 1))
    seen = depth <= made
    hit = seen & (draft.tokens == actual)  # (B, K)
    on_path = valid & ~(anc & ~hit.view(B, 1, K)).any(-1)  # every ancestor-or-self hit
    known = seen | (anc & (seen & ~hit).view(B, 1, K)).any(-1)
    known = torch.cumprod((known | ~valid).long(), dim=1).sum(1)  # the leading run
    return on_path, torch.minimum(known, draft.count)


def verify_forward(net, cache, tokens, tree, depth, num_nodes):
    """One forward over every request's tree (depth (B, N) of each node): logits (B, N, V)."""
    positions = cache.lens.long().view(-1, 1) + depth
    return net(tokens, cache, positions=positions, num_new=num_nodes.to(torch.int32), tree=tree)


def commit(cache, result: VerifyResult):
    """Keep the root and the accepted path in the KV cache."""
    B, N = result.accept_nodes.shape
    # At most N - 1 drafts are accepted
    path = torch.cat([torch.zeros(B, 1, dtype=torch.int64, device=result.accept_len.device),
                      result.accept_nodes[:, : N - 1].clamp(min=0)], dim=1)
    cache.commit(path, 1 + result.accept_len)


def write_history(s: "Batch", out: torch.Tensor, count: torch.Tensor, capacity: int):
    """Append out[b, :count[b]] to request b's history."""
    B = out.shape[0]
    rows = torch.arange(B, device=out.device).view(B, 1)
    j = torch.arange(out.shape[1], device=out.device).view(1, -1)
    slots = (s.lens.view(B, 1) + j).clamp(max=capacity - 1)
    write = j < count.view(B, 1)
    s.history[rows.expand_as(slots)[write], slots[write]] = out[write]
    s.lens += count


def emitted_tokens(result: VerifyResult, remaining: torch.Tensor, eos: torch.Tensor):
    """Tokens this step adds per request (accepted drafts, then the next token), clipped at
    the token budget and just after the first EOS. Returns tokens (B, N), count (B,), hit_eos (B,)."""
    B, N = result.accept_tokens.shape
    j = torch.arange(N + 1, device=remaining.device).view(1, -1)
    out = torch.cat([result.accept_tokens, torch.full((B, 1), -1, device=remaining.device, dtype=torch.int64)], 1)
    out = torch.where(j == result.accept_len.view(B, 1), result.next_token.view(B, 1), out)
    count = torch.minimum(result.accept_len + 1, remaining)
    is_eos = torch.isin(out, eos) & (j < count.view(B, 1))
    hit_eos = is_eos.any(dim=1)
    first_eos = torch.where(is_eos, j, N + 1).min(dim=1).values
    count = torch.where(hit_eos, first_eos + 1, count)
    return out, count, hit_eos


@dataclass
class StepOutcome:
    """What one step's verification decided (history and cache already updated)."""

    out: torch.Tensor  # (B, W) tokens the step adds per request, the first count[b] valid
    count: torch.Tensor  # (B,) int64
    hit_eos: torch.Tensor  # (B,) bool
    on_path: torch.Tensor  # (B, width) bool: draft node k on the accepted path
    accept_len: torch.Tensor | None  # (B,) accepted drafts; None when none were offered
    observe_seconds: float  # the drafter's `observe` (counted as drafting time)
    accepted_at: float  # perf_counter() once the next tokens were chosen


def plain_step(net, cache, s: Batch, params: SamplingParams, eos, drafter: Drafter, capacity: int) -> StepOutcome:
    """No request has a draft: the model's causal decode step and AR's sampler, no tree."""
    B = s.ids.shape[0]
    with nvtx_range("verify_forward"):
        roots = s.history.gather(1, (s.lens - 1).view(B, 1))  # (B, 1)
        logits = net(roots, cache)
    t_obs = time.perf_counter()
    with nvtx_range("observe"):
        drafter.observe(roots, logits, s.ones)
    t_obs = time.perf_counter() - t_obs
    with nvtx_range("accept"):
        u = None if params.greedy else uniforms(s.seeds, s.offsets, 1)[:, 0]
        token = sample(logits[:, 0], s.temperature, s.top_k, s.top_p, u)  # (B,)
    accepted_at = time.perf_counter()
    with nvtx_range("commit"):
        if not params.greedy:  # greedy decoding reads no random numbers
            s.offsets += 1
        cache.advance(1)
        s.history.scatter_(1, s.lens.view(B, 1), token.view(B, 1))  # write_history of one token (lens < capacity)
        s.lens += 1
    no_nodes = torch.zeros(B, 0, dtype=torch.bool, device=token.device)
    return StepOutcome(token.view(B, 1), s.ones, torch.isin(token, eos), no_nodes, None, t_obs, accepted_at)


def tree_step(net, cache, s: Batch, params: SamplingParams, eos, drafter: Drafter, draft: DraftTree, width: int,
              max_new_tokens: int, capacity: int) -> StepOutcome:
    """Verify every request's draft tree (at most `width` nodes) in one forward and keep what the
    target would have produced."""
    B, device = s.ids.shape[0], s.ids.device
    with nvtx_range("verify_forward"):
        roots = s.history.gather(1, (s.lens - 1).view(B, 1))[:, 0]
        tokens, parents, num_nodes = pack(roots, draft, width)
        tree = tree_from_parents(parents)  # (B, N, N) ancestor-or-self
        depth = tree.sum(-1) - 1  # (B, N)
        logits = verify_forward(net, cache, tokens, tree, depth, num_nodes)
    t_obs = time.perf_counter()
    with nvtx_range("observe"):
        drafter.observe(tokens, logits, num_nodes)
    t_obs = time.perf_counter() - t_obs
    with nvtx_range("accept"):
        N = tokens.shape[1]
        # greedy verification reads no random numbers
        u = torch.zeros(B, N, device=device) if params.greedy else uniforms(s.seeds, s.offsets, N)
        probs = None if draft.probs is None else draft.probs[:, :N]
        result = verify(logits, tokens, parents, num_nodes, s.temperature, s.top_k, s.top_p, u, probs,
                        draft.siblings)
    accepted_at = time.perf_counter()
    with nvtx_range("commit"):
        if not params.greedy:
            s.offsets += N
        commit(cache, result)
        out, count, hit_eos = emitted_tokens(result, max_new_tokens - s.generated, eos)
        write_history(s, out, count, capacity)
    on_path = torch.zeros(B, N, dtype=torch.bool, device=device)  # tree node index, root = 0
    on_path.scatter_(1, result.accept_nodes.clamp(min=0), result.accept_nodes >= 0)
    return StepOutcome(out, count, hit_eos, on_path[:, 1:], result.accept_len, t_obs, accepted_at)


def speculative(model: Model, prompt_ids, max_new_tokens: int, params: SamplingParams, drafter: Drafter,
                num_draft_tokens, controller=None):
    """Decode with speculation; yields (request ids, new tokens per request) after every step.

    num_draft_tokens: an int, or "auto" with a `controller` (specdec.controller) choosing it
    each step. The first yield is the first token of every request (from the prefill's
    logits); the generator's return value is the StepStats.
    """
    net, device = model.net, model.device
    B = len(prompt_ids)
    K = controller.max_k if num_draft_tokens == "auto" else num_draft_tokens
    temperature, top_k, top_p, seeds = params.tensors(B, device)
    eos = eos_tensor(model, device)
    lmax = max(len(p) for p in prompt_ids)
    capacity = lmax + max_new_tokens + K + 1  # room for a full tree past the last committed token
    history = torch.zeros(B, capacity, dtype=torch.int64)
    for b, p in enumerate(prompt_ids):
        history[b, : len(p)] = torch.tensor(p)
    lens = torch.tensor([len(p) for p in prompt_ids], dtype=torch.int64, device=device)
    cache = net.new_cache(B, capacity)
    stats = StepStats()

    logits = prefill(net, cache, prompt_ids)
    zero = torch.zeros(B, dtype=torch.int64, device=device)
    first = sample_tokens(logits, temperature, top_k, top_p, uniforms(seeds, zero, 1)[:, 0])
    s = Batch(torch.arange(B, device=device), history.to(device), lens, torch.ones_like(lens),
              temperature, top_k, top_p, seeds, zero + 1, zero + 1)
    s.history[torch.arange(B, device=device), s.lens] = first
    s.lens += 1
    done = torch.isin(first, eos) | (max_new_tokens <= 1)
    yield s.ids.tolist(), [[t] for t in first.tolist()]
    drafter.prepare(model.config.vocab_size, device)
    drafter.start(s.history, s.lens)
    if controller is not None:
        controller.start(B)
    ids = s.ids.tolist()
    # Plain steps the drafter has not been shown yet (one token per request each): `update` waits
    # until the drafter is next used (propose, retain, finish), so a run of plain steps costs it
    # one call, not one a step.
    unseen = 0

    def show_drafter():
        nonlocal unseen
        if unseen:
            drafter.update(s.history, s.lens, torch.full((s.ids.shape[0],), unseen, dtype=torch.int64, device=device))
            unseen = 0

    # A look at a drafter that has not paid lately, where its draft can be scored without verifying
    # it (greedy, or a draft without probabilities): sized as "auto" would, then scored against the
    # tokens the next steps produce (`shadow_verdict`). The look costs the drafting, not a drafted
    # step. One is pending at a time; steps go on as the controller says meanwhile.
    shadow = None
    can_shadow = params.greedy

    def score_shadow(leaving=False):
        """Hand the pending look's verdicts to the controller once all are in, or, where requests are
        about to leave (their rows move), the ones there are."""
        nonlocal shadow
        on_path, known = shadow_verdict(shadow.draft, shadow.start, s.history, s.lens, shadow.anc)
        settled = bool((known >= shadow.draft.count).all())
        if settled or leaving:
            controller.observe_shadow(shadow.record, known, on_path, shadow.draft.match_len, shadow.seconds,
                                      settled=settled)
            shadow = None

    while True:
        if bool(done.any()):
            show_drafter()  # the leavers' last tokens, before it drops them
            if shadow is not None:
                score_shadow(leaving=True)
            index = survivors(~done)  # a request's row may change: s.ids follows it
            if index.numel() == 0:
                break
            s = s.keep(index)
            cache.reorder(index)
            drafter.retain(index)
            if controller is not None:
                controller.retain(index)
            ids = s.ids.tolist()
        Bn = s.ids.shape[0]
        t0 = time.perf_counter()
        looked = 0.0  # a shadow look's seconds, this step's
        with nvtx_range("draft"):
            budget = int(min(K, max_new_tokens - 1))  # drafts past the token budget are wasted
            # tokens each request has left: the batch ends when its last request does
            remaining = None if controller is None else max_new_tokens - s.generated
            if controller is not None and not controller.worth_drafting(Bn, remaining):
                budget = 0  # verification is too dear at this batch size: a plain AR step
            elif controller is not None and controller.shadow_look and shadow is not None:
                budget = 0  # a look is due, but the last one's verdicts are not all in
            if budget > 0:
                show_drafter()
                draft = drafter.propose(s.history, s.lens, budget)
                if controller is not None and controller.shadow_look and (can_shadow or draft.probs is None):
                    record = controller.choose_shadow(Bn, draft.match_len, draft.count, remaining)
                    looked = time.perf_counter() - t0
                    kept = DraftTree(draft.tokens.clone(), draft.parents.clone(), draft.count.clone(),
                                     match_len=None if draft.match_len is None else draft.match_len.clone())
                    anc = draft_ancestors(kept)
                    shadow = Shadow(kept, s.lens.clone(), record, looked, anc, draft_depth(kept, anc))
                    stats.shadow_looks += 1
                    budget = 0  # scored against the plain steps that follow, not verified
                elif controller is not None:
                    draft = truncate(draft, controller.choose(Bn, draft.match_len, draft.count, remaining))
            # the verification tree's width (one host sync; none when nothing was proposed)
            width = int(draft.count.max()) if budget > 0 else 0
        t1 = time.perf_counter()
        if width == 0:  # nothing to verify: a plain decode step, as lean as AR's
            step = plain_step(net, cache, s, params, eos, drafter, capacity)
        else:
            step = tree_step(net, cache, s, params, eos, drafter, draft, width, max_new_tokens, capacity)
        t_obs, t2, count = step.observe_seconds, step.accepted_at, step.count
        with nvtx_range("update"):
            s.generated += count
            done = step.hit_eos | (s.generated >= max_new_tokens)
            if width == 0:
                unseen += 1
                new = [[t] for t in step.out[:, 0].tolist()]
            else:
                drafter.update(s.history, s.lens, count)
                new = [row[:c] for row, c in zip(step.out.tolist(), count.tolist())]
            if shadow is not None and shadow.due():
                score_shadow()
        t3 = time.perf_counter()
        if controller is not None and budget == 0:  # a shadow look's drafting is the look's, not the step's
            controller.observe_plain(Bn, t3 - t0 - looked)
        elif controller is not None:
            controller.observe(draft.count, step.on_path, draft.match_len, t1 - t0 + t_obs, t3 - t0)
        stats.steps += 1
        stats.tokens += sum(map(len, new))
        if step.accept_len is None:
            stats.accept_hist[0] += Bn
        else:
            stats.accept_hist.update(step.accept_len.tolist())
        for k, dt in zip(("draft", "verify", "bookkeeping"), (t1 - t0 + t_obs, t2 - t1 - t_obs, t3 - t2)):
            stats.seconds[k] += dt
        yield ids, new
    drafter.finish()  # the last requests' tokens were shown before the loop ended
    return stats
