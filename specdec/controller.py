"""Hardware-aware speculation length (SSSD's insight): draft only as much as pays on this device.

One verification step of B requests with trees of N = 1 + K nodes costs c(B, N) seconds and
adds, per request b, E_b(K) tokens in expectation. The engine pads every tree to one width, so
the controller picks one K per step:

    K* = argmax_K  sum_b E_b(K) / (c(B, 1 + K) + d)          K in 0..K_max  (K = 0: plain AR)

with d the drafting time per step. E_b(K) = 1 + sum_{i=1..K} prod_{j<=i} a_j, where a_j is the
online estimate of P(the depth-j draft is accepted | depth j-1 was), kept per drafter and per
match-length bucket when the drafter reports one (longer suffix matches are accepted more).
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
    def measure(cls, net, context=256, batches=BATCHES, widths=WIDTHS, reps=3, max_tokens=None):
        """Time one forward of B x N new tokens at `context` cached tokens, for the grid.

        On CPU the grid stops where B x N exceeds `max_tokens` (default 1024 on CPU); the rest is
        extrapolated linearly in the token count, which is what a compute-bound forward does.
        """
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
                    times = []
                    for _ in range(reps + 1):
                        if device.type == "cuda":
                            torch.cuda.synchronize()
                        t0 = time.perf_counter()
                        net(x, cache)
                        if device.type == "cuda":
                            torch.cuda.synchronize()
                        times.append(time.perf_counter() - t0)
                    row.append(sorted(times[1:])[len(times[1:]) // 2])  # median, first run warms up
                seconds.append(row)
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
    """Online per-depth acceptance rates, per match-length bucket (bucket 0: no match reported)."""

    def __init__(self, max_depth=64, buckets=9, prior=(1.0, 1.0)):
        # Beta-like prior: `prior` accepted out of `sum(prior)` tries at every depth.
        self.tries = torch.full((buckets, max_depth), float(sum(prior)), dtype=torch.float64)
        self.accepts = torch.full((buckets, max_depth), float(prior[0]), dtype=torch.float64)
        self.buckets = buckets

    def bucket(self, match_len):
        if match_len is None:
            return None
        return match_len.long().clamp(0, self.buckets - 1).cpu()

    def record(self, drafted, accepted, match_len=None):
        """drafted (B,) draft depth offered (longest path), accepted (B,) accepted depth."""
        drafted, accepted = drafted.long().cpu(), accepted.long().cpu()
        D = self.tries.shape[1]
        depth = torch.arange(1, D + 1).view(1, -1)
        tried = (depth <= drafted.view(-1, 1)) & (depth <= accepted.view(-1, 1) + 1)  # reached depth j
        ok = depth <= accepted.view(-1, 1)
        rows = self.bucket(match_len)
        rows = torch.zeros_like(drafted) if rows is None else rows
        self.tries.index_add_(0, rows, tried.double())
        self.accepts.index_add_(0, rows, ok.double())

    def expected_tokens(self, max_k: int, match_len=None, batch_size: int = 1) -> torch.Tensor:
        """(B, max_k + 1): E_b(K) for K = 0..max_k."""
        rate = (self.accepts / self.tries)[:, :max_k]  # (buckets, max_k)
        survive = torch.cumprod(rate, dim=1)
        e = torch.cat([torch.ones(self.buckets, 1, dtype=torch.float64), 1 + torch.cumsum(survive, dim=1)], dim=1)
        rows = self.bucket(match_len)
        if rows is None:
            return e[0].expand(batch_size, -1)
        return e[rows]


class SpeculationController:
    """Chooses the draft length each step; `observe` feeds it what verification accepted."""

    def __init__(self, cost: CostModel, max_k: int = 16, draft_seconds: float = 0.0):
        self.cost, self.max_k = cost, max_k
        self.stats = AcceptanceStats(max_depth=max(max_k, 1))
        self.draft_seconds = draft_seconds

    def choose(self, batch_size: int, match_len=None) -> int:
        e = self.stats.expected_tokens(self.max_k, match_len, batch_size).sum(dim=0)  # (max_k + 1,)
        rate = [float(e[k]) / (self.cost(batch_size, 1 + k) + (self.draft_seconds if k else 0.0))
                for k in range(self.max_k + 1)]
        return max(range(self.max_k + 1), key=rate.__getitem__)

    def observe(self, drafted, accepted, match_len=None, draft_seconds=None):
        self.stats.record(drafted, accepted, match_len)
        if draft_seconds is not None:  # a running mean of drafting time per step
            self.draft_seconds = 0.9 * self.draft_seconds + 0.1 * draft_seconds
