"""Hardware-aware speculation length (SSSD's insight): draft only as much as pays on this device.

One verification step of B requests whose trees bring T = B + sum_b K_b tokens costs c(B, T)
seconds (the model runs only the real tokens: `specdec.model.Layout`) and adds, per request b,
E_b(K_b) tokens in expectation. Each step the controller sizes every request's draft:

    {K_b} = argmax  sum_b w_b E_b(K_b) / (c(B, B + sum_b K_b) + o + v [any K_b > 0])     0 <= K_b <= K_max

with w_b what a token of request b takes off the batch's end (a batch ends with its last request:
tokens for a request that is ahead are worth little, for the one that finishes last a whole step;
`SpeculationController.request_weights`, 1 at batch 1), o the step's other fixed work and v a drafted
step's fixed extra (both fitted online), and a drafted step's cost raised by a margin: 1% (min_gain)
against a prediction's error, more at a batch size where drafted steps have realized less than
predicted. E_b(K) = 1 + sum_{k<K} p_k, where p_k is the online estimate of P(draft node k is accepted):
drafters order nodes best first, so for a chain p_k is the chance of k + 1 correct tokens and for a
tree the chance that its k-th likeliest node lies on the accepted path. Kept per drafter and per
match-length bucket when the drafter reports one (longer suffix matches are accepted more). Every extra
node costs the same, so the best allocation for a given T takes the T - B likeliest nodes of the whole
batch (each at its request's worth); the controller sorts them and picks T.
At batch 1 verification costs little more than a decode step, so K grows; at large batch the
forward becomes compute-bound, each node costs a request's share of a step, and only the nodes
likelier than that share are drafted: the requests with long matches that are not yet ahead keep
drafting, the rest stop.

c(B, N) is measured once per (device, model, dtype) on a grid and cached as JSON.
"""

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

BATCHES = (1, 2, 4, 8, 16, 32, 64)
WIDTHS = (1, 1.0625, 1.25, 1.5, 2, 3, 5, 9, 17, 33)  # new tokens per request, on average


def non_decreasing(values) -> list:
    """The least-squares non-decreasing fit to `values` (pool adjacent violators): a point that
    came out dearer than the next ones is averaged with them, not carried up to all that follow
    (as a running maximum would)."""
    blocks = []  # [sum, count] of pooled runs, their means ascending
    for v in values:
        blocks.append([float(v), 1])
        while len(blocks) > 1 and blocks[-2][0] * blocks[-1][1] > blocks[-1][0] * blocks[-2][1]:
            total, count = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += count
    return [total / count for total, count in blocks for _ in range(count)]


class CostModel:
    """Verification cost c(B, N) in seconds, interpolated from a measured grid: linearly in the
    token count within a measured batch size, log-linearly between batch sizes.

    `first_extra` (optional, per batch size): c(B, B + 1), one request bringing one extra token.
    A ragged batch takes the packed path, so that first token can cost far more than the next
    ones (on a 2-core CPU +12% of a step at batch 4 and 16, +3% at 64). The grid's first width
    past 1 brings no extra token at batch 1 and 4 and 4 extra tokens at batch 64: without this
    point the first token's price would be a guess along a line."""

    def __init__(self, batches, widths, seconds, first_extra=None):
        self.batches, self.widths = list(batches), list(widths)
        self.seconds = [list(row) for row in seconds]  # [len(batches)][len(widths)]
        self.first_extra = None if first_extra is None else list(first_extra)  # [len(batches)]
        self._rows = {}

    def _row(self, i):
        """(tokens, seconds) of batch row i: the token counts measured (as `measure` runs them), ascending."""
        if i not in self._rows:
            B = self.batches[i]
            points = {}
            for w, sec in zip(self.widths, self.seconds[i]):
                points[max(B, round(B * w))] = sec  # a wider width at the same count: the later, larger
            if self.first_extra is not None:
                points[B + 1] = self.first_extra[i]
            tokens = np.array(sorted(points), dtype=np.float64)
            self._rows[i] = tokens, np.maximum.accumulate([points[t] for t in sorted(points)])
        return self._rows[i]

    def __call__(self, batch: int, width: float) -> float:
        """Seconds for B requests with `width` new tokens each (a mean: T = B x width in all)."""
        grid = self.batches
        b = min(max(batch, grid[0]), grid[-1])
        i = next((k for k in range(len(grid) - 1) if b <= grid[k + 1]), len(grid) - 2) if len(grid) > 1 else 0
        value = float(np.interp(grid[i] * width, *self._row(i)))
        if len(grid) > 1:
            s = (math.log(b) - math.log(grid[i])) / (math.log(grid[i + 1]) - math.log(grid[i]))
            value = value * (1 - s) + float(np.interp(grid[i + 1] * width, *self._row(i + 1))) * s
        if batch > grid[-1]:  # beyond the grid: cost grows in proportion to the batch
            value *= batch / grid[-1]
        return value

    def to_json(self):
        d = dict(batches=self.batches, widths=self.widths, seconds=self.seconds)
        return d if self.first_extra is None else {**d, "first_extra": self.first_extra}

    @classmethod
    def from_json(cls, d):
        return cls(d["batches"], d["widths"], d["seconds"], d.get("first_extra"))

    @classmethod
    def measure(cls, net, context=256, batches=BATCHES, widths=WIDTHS, reps=5, max_tokens=None):
        """Time one verification forward of B requests bringing T = round(B x width) new tokens,
        spread as evenly as they go (chains of 1 + j // B or 2 + j // B nodes), at `context` cached
        tokens, as the engine runs it: a ragged batch takes the packed path, whose first extra token
        costs more than the next ones, so c(B, B + 1) is measured too (`first_extra`).

        A batch size's points are timed in `reps` rounds (after one that warms up), each round
        visiting every point in turn, and each point's median taken: a spell of machine noise then
        lands on one run of many points, not on every run of a few (on a shared 2-core CPU, timing
        each point's runs back to back gave rows with a plain step dearer than one with an extra
        token). The medians are then fitted non-decreasing in T (`non_decreasing`: a wider tree
        never costs less).

        On CPU the grid stops where T exceeds `max_tokens` (default 1024 on CPU); the rest is
        extrapolated linearly in the token count, which is what a compute-bound forward does.
        """
        from kernels.tree_attention import tree_from_parents

        device = net.device
        max_tokens = max_tokens or (10**9 if device.type == "cuda" else 1024)

        def forward_seconds(cache, B, T):
            num_new = 1 + (T - B) // B + (torch.arange(B, device=device) < (T - B) % B).int()  # (B,)
            N = int(num_new.max())
            x = torch.full((B, N), 7, device=device)
            tree = tree_from_parents(torch.arange(-1, N - 1, device=device).expand(B, N))
            positions = cache.lens.long().view(B, 1) + torch.arange(N, device=device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            net(x, cache, positions=positions, num_new=num_new, tree=tree)
            if device.type == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - t0

        seconds, first_extra = [], []
        with torch.inference_mode():
            for B in batches:
                cache = net.new_cache(B, context + math.ceil(max(widths)) + 1)
                cache.lens.fill_(context)
                counts = [max(B, round(B * w)) for w in widths]
                measured = sorted({T for T in counts if T <= max_tokens or T == counts[0]} | {B + 1})
                runs = {T: [] for T in measured}
                for r in range(reps + 1):
                    for T in measured:
                        t = forward_seconds(cache, B, T)
                        if r:  # the first round warms up
                            runs[T].append(t)
                fitted = dict(zip(measured, non_decreasing([float(np.median(runs[T])) for T in measured])))
                row, last = [], max(T for T in counts if T in fitted)
                for T in counts:
                    row.append(fitted[T] if T in fitted else fitted[last] * T / last)
                seconds.append(row)
                first_extra.append(fitted[B + 1])
        return cls(batches, widths, seconds, first_extra)

    @classmethod
    def cached(cls, net, name: str, path_dir=None):
        """Load c(B, N) for this (device, model, dtype) from the cache, measuring it the first time."""
        from specdec.loading import cache_dir

        dev = torch.cuda.get_device_name(net.device) if net.device.type == "cuda" else f"cpu{torch.get_num_threads()}"
        # v9: the CPU padding of few-row products is measured per machine (specdec.model.Linear.pad_to),
        # and a curve holds for one padding; a curve measured by an older version is not reused
        pad = "".join(map(str, getattr(net.lm_head, "pad_to", ())[1:]))
        key = f"v9-{dev}-{name}-{str(net.dtype).replace('torch.', '')}" + (f"-pad{pad}" if pad else "")
        key = key.replace(" ", "_").replace("/", "_")
        path = Path(path_dir or cache_dir() / "costs") / f"{key}.json"
        if path.exists():
            return cls.from_json(json.loads(path.read_text()))
        import sys

        print(f"specdec: measuring the verification cost curve of this device once (cached in {path})",
              file=sys.stderr)
        if net.device.type == "cuda":
            model = cls.measure(net)
        else:  # a coarser grid: a CPU forward over many tokens takes seconds
            model = cls.measure(net, batches=(1, 4, 16, 64), widths=WIDTHS[:-1], max_tokens=512)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(model.to_json()))
        return model


class AcceptanceStats:
    """Online P(draft node k is on the accepted path | node k was offered), per node index k and
    per match-length bucket (bucket 0: no match reported).

    Drafters put their likelier nodes first (a K-node draft is the first K nodes of a longer one),
    so E(K) = 1 + sum_{k < K} p_k whether the draft is a chain or a tree. Counts fade by `memory`
    per step (a window of ~200 steps): a drafter that warms up (Token Recycling's matrix) or a
    text that turns repetitive is re-estimated, and a length given up on drifts back to its
    prior, so it is retried after some tens of steps. Each p_k is shrunk toward a prior worth
    `strength` observations: 1/2 for node 0, decay * p_0 for node 1, and for node k > 1 the chain
    extrapolation p_{k-1} * min(decay, p_{k-1} / p_{k-2}) of the nodes before it. So a bucket whose first nodes
    are almost always accepted expects deep nodes to be too, and gets to try them (a fixed
    decaying prior would never offer, hence never learn, a long draft); `decay` < 1 keeps the
    nodes nobody has tried from adding up to much (ten of them at a flat 0.2 would promise two
    tokens, and a deep draft built on that promise costs whole steps at large batch).
    """

    def __init__(self, max_nodes=64, buckets=9, strength=2.0, memory=0.995, decay=0.8):
        self.memory = float(memory)  # per recorded step: old counts fade (drafters warm up, text shifts)
        self.tries = torch.zeros(buckets, max_nodes, dtype=torch.float64)
        self.accepts = torch.zeros(buckets, max_nodes, dtype=torch.float64)
        self.strength, self.decay = float(strength), float(decay)
        self.buckets = buckets
        self._p, self._table = None, {}  # cached estimates, cleared by record
        self._fading = 1.0  # fade still to apply (`fade`)

    def fade(self):
        """A step that offered nothing: the counts only fade. Deferred to the next `record` or
        estimate, so that a plain step costs a multiplication."""
        self._fading *= self.memory

    def _settle(self):
        if self._fading != 1.0:
            self.tries *= self._fading
            self.accepts *= self._fading
            self._fading = 1.0
            self._p, self._table = None, {}

    def rates(self) -> torch.Tensor:
        """(buckets, max_nodes) estimated p_k."""
        self._settle()
        if self._p is None:  # numpy: a step's controller work is a few hundred tiny array operations
            tries, accepts, s = self.tries.numpy(), self.accepts.numpy(), self.strength
            p = np.empty_like(tries)
            prev = prev2 = None  # p_{k-1} and p_{k-2}
            for k in range(tries.shape[1]):
                if k == 0:
                    prior = np.full(self.buckets, 0.5)
                elif k == 1:  # no ratio yet: the root is always accepted, so p_0 / 1 would square p_0
                    prior = prev * self.decay
                else:
                    prior = prev * np.minimum(prev / np.maximum(prev2, 1e-12), self.decay)
                p[:, k] = (accepts[:, k] + s * prior) / (tries[:, k] + s)
                prev, prev2 = p[:, k], prev
            self._p = torch.from_numpy(p)
        return self._p

    def bucket(self, match_len):
        if match_len is None:
            return None
        return match_len.long().clamp(0, self.buckets - 1).cpu()

    def record(self, offered, accepted, match_len=None):
        """offered (B,) draft nodes verified; accepted (B, K) bool, node k on the accepted path,
        or (B,) the accepted length of a chain (nodes 0..accepted-1)."""
        self._settle()
        offered, accepted = offered.long().cpu().numpy(), accepted.cpu().numpy()
        K = self.tries.shape[1]
        k = np.arange(K).reshape(1, -1)
        if accepted.ndim == 1:
            ok = k < accepted.astype(np.int64).reshape(-1, 1)
        else:
            ok = np.zeros((accepted.shape[0], K), dtype=bool)
            w = min(K, accepted.shape[1])
            ok[:, :w] = accepted[:, :w].astype(bool)
        tried = k < offered.reshape(-1, 1)
        rows = self.bucket(match_len)
        rows = np.zeros_like(offered) if rows is None else rows.numpy()
        tries, accepts = self.tries.numpy(), self.accepts.numpy()  # views: updated in place
        tries *= self.memory
        accepts *= self.memory
        np.add.at(tries, rows, tried)
        np.add.at(accepts, rows, ok & tried)
        self._p, self._table = None, {}

    def table(self, max_k: int) -> torch.Tensor:
        """(buckets, max_k + 1): expected tokens per step for K = 0..max_k, per match-length bucket.

        Point estimates, no upper confidence bonus: the controller takes the nodes that look
        likeliest, so their estimates are biased upward already (the winner's curse), and a bonus
        on a node tried a few times lifts it above its own prior. Measured at batch 4, a bonus of
        one standard error promised 115 accepted tokens where 53 came (point estimates: 85).
        """
        self._settle()
        if max_k not in self._table:
            p = self.rates()[:, :max_k]  # (buckets, max_k)
            self._table[max_k] = torch.cat([torch.ones(self.buckets, 1, dtype=torch.float64), 1 + torch.cumsum(p, dim=1)],
                                           dim=1)
        return self._table[max_k]

    def expected_tokens(self, max_k: int, match_len=None, batch_size: int = 1) -> torch.Tensor:
        """(B, max_k + 1): E_b(K) for K = 0..max_k."""
        e = self.table(max_k)
        rows = self.bucket(match_len)
        if rows is None:
            return e[0].expand(batch_size, -1)
        return e[rows]


class StepTimeFit:
    """What a step really costs beyond the measured forward, fitted online:

        step - c(B, B) - drafting  =  o + v [T > B] + s * (c(B, T) - c(B, B))

    o is the step's fixed work outside the forward (bookkeeping), less what the grid over-charges
    for a plain decode step; v the fixed price of verifying any draft at all beyond the grid's
    (a plain step takes the model's causal path and samples; a drafted one builds tree masks, runs
    the verification kernel and moves accepted entries in the cache); s scales the measured price
    of the extra tokens, which the grid (requests' drafts spread evenly, 256 cached tokens) gets
    wrong when a few requests bring deep trees or contexts are much longer. A least-squares fit with
    fading weights (memory per step), shrunk toward s = 1 by `prior` steps' worth of evidence at a
    typical extra cost `x0` seconds, toward v = 0 by a tenth of that and toward o = 0 by a
    thousandth, so that where every step drafts (batch 1: v cannot be told from o, and the extra
    cost barely varies) the fixed part goes to o, not into v or s.
    """

    def __init__(self, memory=0.98, prior=4.0, x0=0.01):
        self.memory, self.prior, self.x0 = memory, prior, x0
        self.ff = np.zeros((3, 3))  # fading sums of f f^T and f y, f = (1, drafted, extra cost)
        self.fy = np.zeros(3)
        self._solution = None  # `solve`'s answer until the next `add` (a step reads it several times)

    def add(self, extra_cost: float, residual: float, drafted: bool | None = None):
        """One step: the grid's price of its extra tokens and what the step took beyond c(B, B)
        and drafting; `drafted` defaults to whether it had extra tokens."""
        self.ff *= self.memory
        self.fy *= self.memory
        if extra_cost == 0 and not drafted:  # a plain step, f = (1, 0, 0): two scalar updates
            self.ff[0, 0] += 1.0
            self.fy[0] += residual
        else:
            f = np.array([1.0, float(extra_cost > 0 if drafted is None else drafted), extra_cost])
            self.ff += np.outer(f, f)
            self.fy += f * residual
        self._solution = None

    def solve(self):
        """(o, v, s): ridge regression with pseudo-observations o = 0 (faint), v = 0 (weak) and s = 1."""
        if self._solution is None:
            lam = self.prior * self.x0 ** 2
            m = self.ff + np.diag([self.prior / 1000, self.prior / 10, lam])
            o, v, s = np.linalg.solve(m, self.fy + np.array([0.0, 0.0, lam]))
            self._solution = float(o), float(v), min(max(float(s), 0.5), 8.0)
        return self._solution


@dataclass
class Ledger:
    """What asking the drafter has done lately at one batch size (`SpeculationController.worth_drafting`):
    fading sums over the steps that asked, and where the looks at a drafter that does not pay stand."""

    saved: float = 0.0  # seconds its accepted tokens saved
    spent: float = 0.0  # seconds asking cost
    asks: float = 0.0  # steps that asked
    interval: int = 8  # steps from one look to the next while it does not pay
    skipped: int = 0  # steps skipped since it was last asked
    wait: int = 0  # steps this run of skips lasts: min(interval, look_interval), set as it starts
    look_seconds: float = 0.0  # what shadow looks cost (fading, as the sums above)
    looks: float = 0.0  # shadow looks taken

    def copy(self) -> "Ledger":
        return Ledger(self.saved, self.spent, self.asks, self.interval, look_seconds=self.look_seconds,
                      looks=self.looks)


class SpeculationController:
    """Sizes each request's draft every step; `observe` feeds it what verification accepted and
    what the step took.

    The objective's denominator is o + c(B, B) + v [T > B] + s (c(B, T) - c(B, B)): the measured
    forward with its extra tokens' price scaled by s, plus the step's other fixed work o and a
    drafted step's fixed extra v (all fitted online, `StepTimeFit`). Whether to call the drafter at
    all (`worth_drafting`) is decided by the drafting time d (a running mean) and by a ledger of
    what calling it has saved and cost lately at this batch size; once it has proposed, its time is
    spent whatever the sizes. Where calling it has not paid, it is looked at now and then, and the
    engine scores a look's draft against the plain steps that follow instead of verifying it
    (`shadow_looks`): what it would have saved is learned for the price of drafting.

    The numerator is calibrated on the controller's own record: every expected gain E_b(K) - 1
    is scaled by kappa = (accepted + a) / (promised + a), the draft tokens verification accepted
    over those the chosen sizes promised, fading with the acceptance counts (a = `calibration_prior`
    tokens of agreement). Choosing the nodes whose estimates came out highest promises more than
    they deliver (selection bias), most where the estimates rest on few steps; kappa < 1 then
    raises the bar where a draft's gain is slim (larger batches), and barely moves it at batch 1.

    Requests differ more than match lengths tell: a translation copies its source for hundreds of
    tokens, a free answer matches four tokens of its prompt and leaves it. So each request of the
    batch being decoded (`start`, `retain`) also has its own factor, the same ratio over its own
    drafts, relative to what kappa predicted for them (a = `request_prior` tokens; None: off).
    """

    def __init__(self, cost: CostModel, max_k: int = 16, draft_seconds: float = 0.0, stats=None,
                 min_gain: float = 0.01):
        self.cost, self.max_k = cost, max_k
        # A step drafts only if it promises min_gain more tokens per second than a plain step: where
        # gains are slim (large batches) a predicted gain inside the predictions' error is a coin
        # toss that still costs drafting (on a 2-core CPU at batch 64, a drafted step predicted to
        # gain 0.8% lost 6%, before c(B, B + 1) and v were modelled). 3% cut drafting at batch 1
        # (mean accepted tokens 1.24 -> 1.16); 1% keeps a hedge. Sizes among drafted allocations
        # are unaffected.
        self.min_gain = float(min_gain)
        self.stats = stats or AcceptanceStats(max_nodes=max(max_k, 1))
        self.draft_seconds = draft_seconds
        self.fit = StepTimeFit()
        # Per batch size, fading sums over the steps that asked the drafter: the seconds its
        # accepted tokens saved (each at a plain step's price per token), the seconds the asking
        # cost (drafting, plus a drafted step's time over a plain one) and the number of asks.
        # Where the savings fall short, the drafter is asked again after `explore_every` steps,
        # then after twice as many each time it still does not pay, up to `explore_max`, but never
        # so rarely that looking would cost less than `look_budget` of the plain steps' time
        # (`worth_drafting`).
        self.ledger = {}  # batch size -> Ledger
        # The sums fade by ledger_memory per ask (a window of ~20 asks): a drafter whose asks cost
        # less than a twentieth of a token's worth is never given up on (`proposals_pay`); at batch
        # 1 on a 2-core CPU ours cost ~1 ms an ask against 34 a token. A window of 50 (0.98) kept
        # losing drafts going at batch 4 (0.980x of AR against 0.996x, 24 pairs).
        self.ledger_memory, self.explore_every, self.explore_max = 0.95, 8, 64
        self.look_budget = 0.01
        self.calibration_prior = 8.0
        self.promised = self.delivered = 0.0  # fading sums of expected and accepted draft tokens
        self._promise = None  # this step's expected accepted draft tokens, from `choose`
        # Per request of the batch in flight: sums of the tokens its drafts were promised (after
        # kappa) and of those accepted, fading by request_memory a step (a long answer may stop
        # copying); None before `start`.
        self.request_prior, self.request_memory = 4.0, 0.98
        self._requests = None  # (2, B): promised, delivered
        self._request_promise = None  # (B,) this step's promise per request, from `choose`
        # Per batch size: fading sums of the predicted and of the realized rate gains of drafted
        # steps. What kappa and the step-time fit leave uncorrected (a draft chosen because its
        # estimate came out high; acceptance and cost erring together) shows up here and raises
        # that batch size's margin (`margin`).
        self.shortfall = {}
        self.shortfall_prior, self.shortfall_memory = 8.0, 0.98
        self._predicted_gain = None  # this step's predicted rate gain over a plain step, from `choose`
        self._weights = None  # this step's request weights, from `choose`
        # A look at a drafter that does not pay is a SHADOW look where the engine can score a draft
        # without verifying it (`specdec.engine.shadow_verdict`: greedy, or a draft without
        # probabilities): the drafter proposes, `choose_shadow` sizes the draft as a drafted step
        # would, the engine takes a plain step, and the tokens the target goes on to produce give
        # verification's verdict (`observe_shadow`). A look then costs the drafting alone, not a
        # drafted step (the first extra token costs 10% of a plain step at batch 16 on a 2-core
        # CPU), so looks come often (`look_interval`) and what they learn is learned for free: a
        # request that starts copying at batch 16 is seen within a few steps.
        self.shadow_looks = True
        self.shadow_look = False  # whether the last `worth_drafting` that said yes was a shadow look

    @property
    def cost(self) -> CostModel:
        return self._cost

    @cost.setter
    def cost(self, cost: CostModel):
        self._cost = cost
        self._curves = {}  # batch size -> (B * max_k + 1,) c(B, B + j) for j extra tokens
        self._plains = {}  # batch size B -> (B + 1,) c(k, k) for k = 0..B
        self._weights_of = None  # the last `request_weights`: (key, remaining, weights)

    def step_cost(self, batch_size: int, tokens: int) -> float:
        """c(B, T): the measured forward over T new tokens of B requests."""
        return self.cost(batch_size, tokens / batch_size)

    def _curve(self, batch_size: int) -> np.ndarray:
        if batch_size not in self._curves:
            B = batch_size
            self._curves[B] = np.array([self.step_cost(B, B + j) for j in range(B * self.max_k + 1)])
        return self._curves[batch_size]

    def step_seconds(self, batch_size: int, extra: int | None = None) -> np.ndarray:
        """Predicted step seconds with j = 0..extra extra tokens (all of them when None)."""
        c = self._curve(batch_size)
        c = c if extra is None else c[: extra + 1]
        o, v, s = self.fit.solve()
        out = o + c[0] + s * (c - c[0])
        out[1:] += v
        return out

    def margin(self, batch_size: int) -> float:
        """The gain over a plain step that a drafted step must promise at this batch size: min_gain,
        or by how much the predicted gains of drafted steps exceed the realized ones, as a ratio of
        sums (shrunk toward none by `shortfall_prior` steps that came true), where that is larger."""
        predicted, realized = self.shortfall.get(batch_size, (0.0, 0.0))
        a = self.shortfall_prior
        return max(self.min_gain, (predicted + a) / (realized + a) - 1.0)

    @property
    def kappa(self) -> float:
        """Accepted over promised draft tokens, shrunk toward 1 (see the class docstring)."""
        a = self.calibration_prior
        return (self.delivered + a) / (self.promised + a)

    def start(self, batch_size: int):
        """A new batch of requests: no record of their own yet."""
        self._requests = np.zeros((2, batch_size))
        self._request_promise = None

    def retain(self, index: torch.Tensor):
        """Requests left the batch: row i is now old row index[i] (as `Drafter.retain`)."""
        if self._requests is not None:
            self._requests = self._requests[:, index.cpu().numpy()]

    def request_kappa(self, batch_size: int) -> np.ndarray:
        """(B,) each request's accepted over promised draft tokens, shrunk toward 1."""
        if self.request_prior is None or self._requests is None or self._requests.shape[1] != batch_size:
            return np.ones(batch_size)
        a = self.request_prior
        return (self._requests[1] + a) / (self._requests[0] + a)

    def _allocate(self, e: np.ndarray, weights: np.ndarray, draft_seconds: float = 0.0):
        """Draft sizes (B,) maximizing sum_b w_b E_b(K_b) / (step seconds + d [any K_b > 0]), and
        that rate. e (B, max_k + 1): E_b(K), -inf where request b has no K-th node; weights (B,): w_b
        (`request_weights`)."""
        B, K = e.shape[0], self.max_k
        with np.errstate(invalid="ignore"):  # -inf - -inf past a request's last node
            # (B, K) node k's acceptance probability, calibrated, times what a token of request b is worth
            gain = (e[:, 1:] - e[:, :-1]) * self.kappa * weights.reshape(-1, 1)
        gain = np.minimum.accumulate(np.nan_to_num(gain, nan=-1.0, neginf=-1.0), axis=1)  # nodes come in order
        order = np.argsort(-gain.ravel(), kind="stable")  # likeliest first; within a row, k order
        j, rate = self._best_total(gain.ravel()[order], B, draft_seconds)
        return torch.from_numpy(np.bincount(order[:j] // K, minlength=B)), rate

    def _best_total(self, ranked: np.ndarray, batch_size: int, draft_seconds: float):
        """How many of the ranked node gains (descending) to draft, and the rate that gives (a
        drafted step's discounted by `min_gain`)."""
        usable = int((ranked > 0).sum())
        total = batch_size + np.concatenate([[0.0], np.cumsum(ranked[:usable])])
        seconds = self.step_seconds(batch_size, usable)  # a fresh array
        seconds[1:] += draft_seconds
        seconds[1:] *= 1.0 + self.margin(batch_size)
        rate = total / seconds
        j = int(np.argmax(rate))  # the first best: fewer nodes on a tie
        return j, float(rate[j])

    def choose(self, batch_size: int, match_len=None, count=None, remaining=None) -> torch.Tensor:
        """Draft sizes K_b (B,) int64 for this step. count (B,): the nodes each request's draft
        actually has (a request with a K-node budget but a 2-node draft gains at most E(2));
        remaining (B,): the tokens each request has left to generate (`request_weights`)."""
        e = self.stats.expected_tokens(self.max_k, match_len, batch_size).numpy()  # (B, max_k + 1)
        e = np.broadcast_to(e, (batch_size, e.shape[-1]))
        if count is not None:
            k = np.arange(self.max_k + 1).reshape(1, -1)
            e = np.where(k <= count.cpu().numpy().reshape(-1, 1), e, -np.inf)
        self._weights = self.request_weights(batch_size, remaining)
        sizes, rate = self._allocate(e, self._weights * self.request_kappa(batch_size))
        plain_rate = batch_size / float(self.step_seconds(batch_size, 0)[0])
        self._predicted_gain = rate * (1 + self.margin(batch_size)) / plain_rate if int(sizes.sum()) else None
        promise = np.take_along_axis(e, sizes.numpy().reshape(-1, 1), 1)[:, 0] - 1  # (B,) uncalibrated E
        self._promise = float(promise.sum())  # as kappa measures it
        self._request_promise = promise * self.kappa  # as each request's factor measures it
        return sizes

    def request_weights(self, batch_size: int, remaining=None) -> np.ndarray:
        """(B,) what a token of each request is worth, in units of a plain step's share per request
        (c(B, B) / B); they sum to B.

        A batch decodes until its last request is done, so a token brings the end nearer only
        through the request it goes to. Order the requests by the tokens they have left, most first
        (k = 1 is the one that finishes last): request k leaves the batch when k requests are left,
        and one token sooner saves one step's price of a request at that size, c(k, k) - c(k - 1,
        k - 1). The last to finish saves a whole batch-1 step; the first, a request's marginal price
        in a full batch, which on a 2-core CPU is about nothing up to batch 4 (c(4, 4) = c(1, 1):
        the weights are read once whatever the batch) and ~2 ms of 72 at batch 16. Requests tied on
        the tokens left share their places' worth equally; at the start (all tied) every weight is
        1, so drafting goes where acceptance is best, and the request it speeds up stops drafting
        once it is ahead. Without `remaining` (or at batch 1) every weight is 1."""
        if remaining is None or batch_size == 1:
            return np.ones(batch_size)
        # the engine asks twice a step (worth_drafting, then choose) with one tensor, unchanged in
        # between: the second time is a lookup
        key = (batch_size, self.fit.solve()[0])
        if self._weights_of is not None and self._weights_of[1] is remaining and self._weights_of[0] == key:
            return self._weights_of[2]
        left = remaining.cpu().numpy().reshape(-1) if torch.is_tensor(remaining) else np.asarray(remaining).reshape(-1)
        plain = self._plain_steps(batch_size)
        order = np.argsort(-left, kind="stable")  # k - 1 = place in this order
        weights = np.empty(batch_size)
        start = 0
        for end in range(1, batch_size + 1):  # groups of equal tokens left share their places' worth
            if end == batch_size or left[order[end]] != left[order[start]]:
                weights[order[start:end]] = (plain[end] - plain[start]) / (end - start)
                start = end
        weights *= batch_size / plain[batch_size]
        self._weights_of = key, remaining, weights
        return weights

    def _plain_steps(self, batch_size: int) -> np.ndarray:
        """(B + 1,) a plain step's predicted seconds at batch k = 0..B (0 at k = 0), made
        non-decreasing in k (a noisy grid can price batch 4 below batch 1)."""
        if batch_size not in self._plains:
            self._plains[batch_size] = np.array([0.0] + [self.cost(k, 1.0) for k in range(1, batch_size + 1)])
        o = self.fit.solve()[0]
        return np.maximum.accumulate(self._plains[batch_size] + o * (np.arange(batch_size + 1) > 0))

    def proposals_pay(self, batch_size: int) -> bool:
        """Whether asking the drafter has paid at this batch size: the seconds its accepted tokens
        saved against the seconds asking cost, over the recent steps that asked (fading sums). Asking
        pays when B + a tokens in t + s seconds beat B in t, i.e. when a * t / B > s. Optimistic
        until it has been tried.

        The verdict that it does not pay must survive one more accepted token (a request's share of
        a plain step, t / B): tokens come one at a time, so a window of asks that found none is
        often bad luck where each token is worth many asks. At batch 1 on a 2-core CPU an n-gram
        ask costs ~1 ms and a token saves ~34: asks found 0.07 tokens each in stretches the bare
        sums had given up on, twice what they cost, and skipping them lost 2% of the decode speed.
        Where an ask is dear (a drafted step at batch 16 costs a third of a plain step or more, a token
        saves a sixteenth) one fruitless ask still outweighs the token."""
        entry = self._ledger(batch_size)
        token = float(self.step_seconds(batch_size, 0)[0]) / batch_size
        return entry.saved + token >= entry.spent

    def _ledger(self, batch_size: int) -> Ledger:
        """This batch size's ledger entry. A batch size not seen yet (a batch shrinks one request
        at a time as requests finish) starts from the sums and interval of the nearest one seen: at 15
        requests asking pays about as it did at 16, and a fresh optimistic entry per size would ask
        a drafter that has not paid at 16 once more at every size on the way down."""
        if batch_size not in self.ledger:
            near = min(self.ledger, key=lambda b: abs(math.log(b / batch_size)), default=None)
            self.ledger[batch_size] = self.ledger[near].copy() if near is not None else Ledger(interval=self.explore_every)
        return self.ledger[batch_size]

    def look_interval(self, batch_size: int) -> int:
        """The most steps to skip between looks at a drafter that does not pay: as many as make a
        look's cost (an ask's mean cost lately) `look_budget` of the plain steps' time in between.
        A cheap look is taken often: a drafter whose asks cost 3% of a plain step is asked every 3
        or 4 steps (not after 8 to 64 skipped ones: a request whose prompt it can copy from would be
        missed for most of its answer); a dear one (a drafted step at batch 16 costing half a plain
        step) is spaced up to `explore_max`."""
        entry = self._ledger(batch_size)
        if self.shadow_looks and entry.looks > 0:
            per_look = entry.look_seconds / entry.looks
        elif entry.asks <= 0:
            return self.explore_max
        else:
            per_look = entry.spent / entry.asks
        plain = float(self.step_seconds(batch_size, 0)[0])
        return max(1, min(self.explore_max, math.ceil(per_look / (self.look_budget * plain))))

    def worth_drafting(self, batch_size: int, remaining=None) -> bool:
        """Whether to ask the drafter this step: not where drafting could not pay even if every
        request had the best match length seen so far (drafting time included), and where asking
        has not paid lately (`proposals_pay`) only once in a while, so that a text turning
        repetitive is noticed: after `explore_every` skipped steps, then twice as many after each
        look that finds it still not paying, up to `explore_max`, or sooner where looking costs
        little (`look_interval`); once it pays, every step again. (At batch 16 on a 2-core CPU,
        verified looks every 8 steps cost about 1% of the decode time and found nothing worth
        drafting 17 times in 20.) A look is a shadow look (`shadow_look`, see `shadow_looks`) where
        those are on: it is taken whatever the best bucket promises, since it costs only the
        drafting. If not, the engine takes a plain AR step."""
        entry = self._ledger(batch_size)
        self.shadow_look = False
        if self.proposals_pay(batch_size):
            entry.interval = self.explore_every
        else:
            if entry.skipped == 0:  # a run of skips starts
                entry.wait = min(entry.interval, self.look_interval(batch_size))
            if entry.skipped < entry.wait - 1:
                entry.skipped += 1
                return False
            entry.interval = min(2 * entry.interval, self.explore_max)  # a look: the next one comes later unless it pays
            if self.shadow_looks:  # a shadow look costs only the drafting: take it whatever it promises
                entry.skipped = 0
                self.shadow_look = True
                return True
        entry.skipped = 0
        best = self.stats.table(self.max_k).numpy().max(axis=0)  # the most optimistic bucket, for every request
        gain = np.minimum.accumulate((best[1:] - best[:-1]) * self.kappa)
        # every request at the best bucket, each token at its request's worth, the likeliest nodes first
        worth = self.request_weights(batch_size, remaining) * self.request_kappa(batch_size)
        ranked = np.sort(np.outer(worth, gain).ravel())[::-1]
        j, _ = self._best_total(ranked, batch_size, self.draft_seconds)
        return j > 0

    def choose_shadow(self, batch_size: int, match_len=None, count=None, remaining=None) -> dict:
        """`choose` for a shadow look: the sizes a drafted step would have had, and what `observe`
        would have read of them, kept for `observe_shadow` (the step itself is a plain one)."""
        sizes = self.choose(batch_size, match_len, count, remaining)
        record = dict(sizes=sizes, promise=self._promise, request_promise=self._request_promise,
                      weights=self._weights)
        self._promise = self._request_promise = self._predicted_gain = self._weights = None
        return record

    def observe_shadow(self, record: dict, known, on_path, match_len=None, look_seconds: float = 0.0,
                       settled: bool = True):
        """A shadow look's draft scored on the tokens the target produced after it: known (B,) its
        leading nodes with a verdict, on_path (B, K) bool as `AcceptanceStats.record` reads it;
        look_seconds what the look cost. Every node with a verdict goes into the acceptance
        statistics. Where every verdict is in (`settled`), the sizes `choose_shadow` picked are
        scored as a drafted step's would be (kappa, each request's factor) and the ledger is told
        what drafting them would have saved and cost: the accepted tokens at their requests'
        worth, against the look plus the predicted price of verifying them."""
        self.stats.record(known, on_path, match_len)
        self.draft_seconds = 0.9 * self.draft_seconds + 0.1 * look_seconds
        sizes = record["sizes"].to(on_path.device)
        B, K = on_path.shape
        entry, m = self._ledger(B), self.ledger_memory
        entry.look_seconds = m * entry.look_seconds + look_seconds
        entry.looks = m * entry.looks + 1
        if not settled:
            return
        k = torch.arange(K, device=on_path.device).view(1, K)
        per_request = (on_path & (k < sizes.view(B, 1))).sum(dim=1).cpu().numpy()  # accepted of the sized draft
        m_stats = self.stats.memory
        self.promised = m_stats * self.promised + record["promise"]
        self.delivered = m_stats * self.delivered + float(per_request.sum())
        if self._requests is not None and self._requests.shape[1] == B:
            self._requests *= self.request_memory
            self._requests[0] += record["request_promise"]
            self._requests[1] += per_request
        weights = record["weights"]
        worth = float((per_request * (1.0 if weights is None else weights)).sum())
        seconds = self.step_seconds(B, int(sizes.sum()))
        entry.saved = m * entry.saved + worth * float(seconds[0]) / B
        entry.spent = m * entry.spent + look_seconds + float(seconds[-1] - seconds[0])
        entry.asks = m * entry.asks + 1

    def observe_plain(self, batch_size: int, step_seconds=None):
        """A step that did not ask the drafter: what `observe` does with nothing drafted and no
        drafting time, in a few scalar updates (the engine's plain steps must cost what AR's do)."""
        self.stats.fade()
        rec, m = self.shortfall.setdefault(batch_size, [0.0, 0.0]), self.shortfall_memory
        rec[0], rec[1] = m * rec[0], m * rec[1]
        self._predicted_gain = self._weights = None
        if step_seconds is not None:
            c0 = float(self._curve(batch_size)[0])
            self.fit.add(0.0, step_seconds - c0, False)

    def observe(self, drafted, accepted, match_len=None, draft_seconds=None, step_seconds=None):
        """drafted (B,) nodes verified per request, accepted: as `AcceptanceStats.record`;
        draft_seconds: the drafter's time this step (None: it was not called); step_seconds: the
        whole step's time, drafting included."""
        self.stats.record(drafted, accepted, match_len)
        per_request = accepted.sum(dim=1) if accepted.dim() == 2 else accepted.clamp(max=drafted)
        got = float(per_request.sum())
        B, offered = int(drafted.shape[0]), int(drafted.sum())
        # the accepted tokens at their requests' worth (`request_weights`, as `choose` weighed them)
        weights, self._weights = self._weights, None
        worth = got if weights is None or len(weights) != B else float((per_request.cpu().numpy() * weights).sum())
        # a plain step's predicted time, for a step that drafted or asked the drafter
        plain = float(self.step_seconds(B, 0)[0]) if step_seconds and (offered or draft_seconds is not None) else None
        rec, m = self.shortfall.setdefault(B, [0.0, 0.0]), self.shortfall_memory
        rec[:] = [m * rec[0], m * rec[1]]  # fades every step: a bar raised so high that nothing drafts comes down
        if self._predicted_gain is not None and step_seconds and offered > 0:
            realized = (B + worth) / step_seconds * plain / B
            rec[0] += self._predicted_gain
            rec[1] += realized
        self._predicted_gain = None
        if self._promise is not None:  # a step whose sizes `choose` set: score its promise
            m = self.stats.memory
            self.promised = m * self.promised + self._promise
            self.delivered = m * self.delivered + got
            self._promise = None
        if self._request_promise is not None and self._requests is not None and self._requests.shape[1] == B:
            self._requests *= self.request_memory
            self._requests[0] += self._request_promise
            self._requests[1] += per_request.cpu().numpy()
        self._request_promise = None
        if draft_seconds is not None:  # running mean per step
            self.draft_seconds = 0.9 * self.draft_seconds + 0.1 * draft_seconds
            if step_seconds:
                spent = draft_seconds + (step_seconds - draft_seconds - plain if offered > 0 else 0.0)
                entry, m = self._ledger(B), self.ledger_memory
                entry.saved = m * entry.saved + worth * plain / B
                entry.spent = m * entry.spent + spent
                entry.asks = m * entry.asks + 1
        if step_seconds is not None:
            c = self._curve(B)
            extra = min(offered, c.shape[0] - 1)
            self.fit.add(float(c[extra] - c[0]), step_seconds - (draft_seconds or 0.0) - float(c[0]), extra > 0)
