"""Hardware-aware speculation length (SSSD's insight): draft only as much as pays on this device.

One verification step of B requests with trees of N = 1 + K nodes costs c(B, N) seconds and
adds, per request b, E_b(K) tokens in expectation. The engine pads every tree to one width, so
the controller picks one K per step:

    K* = argmax_K  sum_b E_b(K) / (c(B, 1 + K) + d)          K in 0..K_max  (K = 0: plain AR)

with d the drafting time per step. E_b(K) = 1 + sum_{k<K} p_k, where p_k is the online estimate
of P(draft node k is accepted): drafters order nodes best first, so for a chain p_k is the chance
of k + 1 correct tokens and for a tree the chance that its k-th likeliest node lies on the accepted
path. Kept per drafter and per match-length bucket when the drafter reports one (longer suffix
matches are accepted more).
At batch 1 verification costs little more than a decode step, so K grows; at large batch the
forward becomes compute-bound, c(B, 1 + K) grows with K, and K* shrinks toward 0.

c(B, N) is measured once per (device, model, dtype) on a grid and cached as JSON.
"""

import json
import math
import time
from pathlib import Path

import torch

BATCHES = (1, 2, 4, 8, 16, 32, 64)
WIDTHS = (1, 2, 3, 5, 9, 17, 33)


class CostModel:
    """Verification cost c(B, N) in seconds, interpolated log-linearly from a measured grid."""

    def __init__(self, batches, widths, seconds):
        self.batches, self.widths = list(batches), list(widths)
        self.seconds = [list(row) for row in seconds]  # [len(batches)][len(widths)]

    @staticmethod
    def _bracket(grid, x):
        x = min(max(x, grid[0]), grid[-1])
        for i in range(len(grid) - 1):
            if x <= grid[i + 1]:
                lo, hi = grid[i], grid[i + 1]
                t = 0.0 if hi == lo else (math.log(x) - math.log(lo)) / (math.log(hi) - math.log(lo))
                return i, t
        return len(grid) - 2, 1.0

    def __call__(self, batch: int, width: int) -> float:
        i, s = self._bracket(self.batches, batch)
        j, t = self._bracket(self.widths, width)
        c = self.seconds
        top = c[i][j] * (1 - t) + c[i][j + 1] * t
        bottom = c[i + 1][j] * (1 - t) + c[i + 1][j + 1] * t
        value = top * (1 - s) + bottom * s
        if batch > self.batches[-1]:  # beyond the grid: cost grows in proportion to the batch
            value *= batch / self.batches[-1]
        return value

    def to_json(self):
        return dict(batches=self.batches, widths=self.widths, seconds=self.seconds)

    @classmethod
    def from_json(cls, d):
        return cls(d["batches"], d["widths"], d["seconds"])

    @classmethod
    def measure(cls, net, context=256, batches=BATCHES, widths=WIDTHS, reps=5, max_tokens=None):
        """Time one verification forward (a chain-shaped tree of N nodes per request, as the
        engine runs it) of B x N new tokens at `context` cached tokens, for the grid: the median
        of `reps` runs, made non-decreasing in N (a wider tree never costs less; a dip is noise).

        On CPU the grid stops where B x N exceeds `max_tokens` (default 1024 on CPU); the rest is
        extrapolated linearly in the token count, which is what a compute-bound forward does.
        """
        from kernels.tree_attention import tree_from_parents

        device = net.device
        max_tokens = max_tokens or (10**9 if device.type == "cuda" else 1024)
        seconds = []
        with torch.inference_mode():
            for B in batches:
                cache = net.new_cache(B, context + max(widths) + 1)
                cache.lens.fill_(context)
                row = []
                for N in widths:
                    if B * N > max_tokens and row:
                        row.append(row[-1] * (B * N) / (B * widths[len(row) - 1]))
                        continue
                    x = torch.full((B, N), 7, device=device)
                    tree = tree_from_parents(torch.arange(-1, N - 1, device=device).expand(B, N))
                    positions = cache.lens.long().view(B, 1) + torch.arange(N, device=device)
                    num_new = torch.full((B,), N, dtype=torch.int32, device=device)
                    times = []
                    for _ in range(reps + 1):
                        if device.type == "cuda":
                            torch.cuda.synchronize()
                        t0 = time.perf_counter()
                        net(x, cache, positions=positions, num_new=num_new, tree=tree)
                        if device.type == "cuda":
                            torch.cuda.synchronize()
                        times.append(time.perf_counter() - t0)
                    row.append(sorted(times[1:])[len(times[1:]) // 2])  # median, first run warms up
                seconds.append([max(row[: j + 1]) for j in range(len(row))])
        return cls(batches, widths, seconds)

    @classmethod
    def cached(cls, net, name: str, path_dir=None):
        """Load c(B, N) for this (device, model, dtype) from the cache, measuring it the first time."""
        from specdec.loading import cache_dir

        dev = torch.cuda.get_device_name(net.device) if net.device.type == "cuda" else f"cpu{torch.get_num_threads()}"
        key = f"{dev}-{name}-{str(net.dtype).replace('torch.', '')}".replace(" ", "_").replace("/", "_")
        path = Path(path_dir or cache_dir() / "costs") / f"{key}.json"
        if path.exists():
            return cls.from_json(json.loads(path.read_text()))
        import sys

        print(f"specdec: measuring the verification cost curve of this device once (cached in {path})",
              file=sys.stderr)
        if net.device.type == "cuda":
            model = cls.measure(net)
        else:  # a coarser grid: a CPU forward over many tokens takes seconds
            model = cls.measure(net, batches=(1, 4, 16, 64), widths=(1, 2, 3, 5, 9, 17), max_tokens=512)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(model.to_json()))
        return model


class AcceptanceStats:
    """Online P(draft node k is on the accepted path | node k was offered), per node index k and
    per match-length bucket (bucket 0: no match reported).

    Drafters put their likelier nodes first (a K-node draft is the first K nodes of a longer one),
    so E(K) = 1 + sum_{k < K} p_k whether the draft is a chain or a tree. Counts fade by `memory`
    per step (a window of ~200 steps): a drafter that warms up (Token Recycling's matrix) or a
    text that turns repetitive is re-estimated, and a length given up on is eventually retried. Each p_k is shrunk
    toward a prior worth `strength` observations: 1/2 for node 0, and for node k the chain
    extrapolation p_{k-1} * min(1, p_{k-1} / p_{k-2}) of the nodes before it. So a bucket whose
    first nodes are almost always accepted expects deep nodes to be too, and gets to try them
    (a fixed decaying prior would never offer, hence never learn, a long draft).
    """

    def __init__(self, max_nodes=64, buckets=9, strength=2.0, memory=0.995):
        self.memory = float(memory)  # per recorded step: old counts fade (drafters warm up, text shifts)
        self.tries = torch.zeros(buckets, max_nodes, dtype=torch.float64)
        self.accepts = torch.zeros(buckets, max_nodes, dtype=torch.float64)
        self.strength = float(strength)
        self.buckets = buckets
        self._p = None  # cached estimates, cleared by record

    def rates(self) -> torch.Tensor:
        """(buckets, max_nodes) estimated p_k."""
        if self._p is None:
            s, p = self.strength, torch.empty_like(self.tries)
            prev, prev2 = torch.ones(self.buckets, dtype=torch.float64), None
            for k in range(self.tries.shape[1]):
                prior = prev * 0.5 if prev2 is None else prev * (prev / prev2.clamp(min=1e-12)).clamp(max=1.0)
                p[:, k] = (self.accepts[:, k] + s * prior) / (self.tries[:, k] + s)
                prev, prev2 = p[:, k], prev
            self._p = p
        return self._p

    def bucket(self, match_len):
        if match_len is None:
            return None
        return match_len.long().clamp(0, self.buckets - 1).cpu()

    def record(self, offered, accepted, match_len=None):
        """offered (B,) draft nodes verified; accepted (B, K) bool, node k on the accepted path,
        or (B,) the accepted length of a chain (nodes 0..accepted-1)."""
        offered, accepted = offered.long().cpu(), accepted.cpu()
        K = self.tries.shape[1]
        k = torch.arange(K).view(1, -1)
        if accepted.dim() == 1:
            ok = k < accepted.long().view(-1, 1)
        else:
            ok = torch.zeros(accepted.shape[0], K, dtype=torch.bool)
            w = min(K, accepted.shape[1])
            ok[:, :w] = accepted[:, :w].bool()
        tried = k < offered.view(-1, 1)
        rows = self.bucket(match_len)
        rows = torch.zeros_like(offered) if rows is None else rows
        self.tries.mul_(self.memory).index_add_(0, rows, tried.double())
        self.accepts.mul_(self.memory).index_add_(0, rows, (ok & tried).double())
        self._p = None

    def table(self, max_k: int, optimistic: bool = False) -> torch.Tensor:
        """(buckets, max_k + 1): expected tokens per step for K = 0..max_k, per match-length bucket.

        optimistic: each p_k raised by one standard error, sqrt(p (1 - p) / n), so a length that
        looked poor on few observations is tried again (without this, a bucket whose first
        estimate said "do not draft" would never be offered a draft, hence never re-estimated).
        """
        p = self.rates()[:, :max_k]  # (buckets, max_k)
        if optimistic:
            n = self.tries[:, :max_k] + self.strength
            p = (p + (p * (1 - p) / n).sqrt()).clamp(max=1.0)
        return torch.cat([torch.ones(self.buckets, 1, dtype=torch.float64), 1 + torch.cumsum(p, dim=1)], dim=1)

    def expected_tokens(self, max_k: int, match_len=None, batch_size: int = 1, optimistic=False) -> torch.Tensor:
        """(B, max_k + 1): E_b(K) for K = 0..max_k."""
        e = self.table(max_k, optimistic)
        rows = self.bucket(match_len)
        if rows is None:
            return e[0].expand(batch_size, -1)
        return e[rows]


class SpeculationController:
    """Chooses the draft length each step; `observe` feeds it what verification accepted.

    The objective's denominator is c(B, 1 + K) + d [K > 0] + o: the measured forward, the
    drafting time d (a running mean, paid only when drafting) and the step's other fixed work o
    (verification kernel, cache commit, bookkeeping; a running mean, paid by every step).
    """

    def __init__(self, cost: CostModel, max_k: int = 16, draft_seconds: float = 0.0, stats=None):
        self.cost, self.max_k = cost, max_k
        self.stats = stats or AcceptanceStats(max_nodes=max(max_k, 1))
        self.draft_seconds = draft_seconds
        self.overhead_seconds = 0.0
        self.optimistic = True  # decide on upper confidence bounds of the acceptance rates

    def _rates(self, e, batch_size: int):
        """Expected tokens per second for K = 0..max_k, from summed expectations e (max_k + 1,)."""
        o = self.overhead_seconds
        return [float(e[k]) / (self.cost(batch_size, 1 + k) + o + (self.draft_seconds if k else 0.0))
                for k in range(self.max_k + 1)]

    def choose(self, batch_size: int, match_len=None, count=None) -> int:
        """The draft size K for this step; count (B,): the nodes each request's draft actually has
        (a request with a K-node budget but a 2-node draft gains at most E(2))."""
        e = self.stats.expected_tokens(self.max_k, match_len, batch_size, self.optimistic)  # (B, max_k + 1)
        if count is not None:
            k = torch.arange(self.max_k + 1).view(1, -1)
            e = e.expand(count.shape[0], -1).gather(1, torch.minimum(k, count.cpu().long().view(-1, 1)))
        e = e.sum(dim=0)  # (max_k + 1,)
        rate = self._rates(e, batch_size)
        return max(range(self.max_k + 1), key=rate.__getitem__)

    def worth_drafting(self, batch_size: int) -> bool:
        """Whether drafting could pay at this batch size even if every request had the best match
        length seen so far; if not, the engine skips the drafter's proposal (a plain AR step).

        On point estimates, not upper bounds: exploring costs a whole batch's verification, so at
        batch sizes where drafting does not pay, it is retried only once fading counts have
        drifted back toward the prior (hundreds of steps), not every few steps."""
        e = self.stats.table(self.max_k).max(dim=0).values * batch_size  # the most optimistic bucket, for every request
        rate = self._rates(e, batch_size)
        return max(range(self.max_k + 1), key=rate.__getitem__) > 0

    def observe(self, drafted, accepted, match_len=None, draft_seconds=None, overhead_seconds=None):
        self.stats.record(drafted, accepted, match_len)
        if draft_seconds is not None:  # running means per step
            self.draft_seconds = 0.9 * self.draft_seconds + 0.1 * draft_seconds
        if overhead_seconds is not None:
            self.overhead_seconds = 0.9 * self.overhead_seconds + 0.1 * overhead_seconds
