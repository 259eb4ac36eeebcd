"""What "sampling from the target" means, exactly, for every path in specdec.

Autoregressive decoding, the fused verification kernel and its reference all draw from the
same distribution, defined here once:

    p = softmax(logits / temperature)                      temperature > 0 (0 means argmax)
    top-k: keep x iff logits[x] >= the k-th largest logit   (ties kept; k = 0 keeps all)
    top-p: keep x iff the mass of tokens strictly more probable than x is < top_p
           (computed on the top-k-renormalized p; ties kept; top_p = 1 keeps all)
    greedy: argmax, the lowest index among ties

A sample is drawn by inverse CDF from a uniform u in [0, 1): the first x with
cumsum(p)[x] > u * sum(p). Uniforms come from a counter-based hash of (seed, counter), so a
request's random numbers depend on its own seed and step alone, never on its batch
neighbours, and a kernel and its reference can be fed the very same numbers.

Shapes: B rows (requests or tree nodes), V vocabulary.
"""

import torch

_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, m: int) -> torch.Tensor:
    # (x * m) mod 2^32 for x < 2^32 without int64 overflow: split m into 16-bit halves.
    return ((x * (m & 0xFFFF)) + (((x * (m >> 16)) & 0xFFFF) << 16)) & _M32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    # A 32-bit integer finalizer (xor-shift-multiply, two rounds) with good avalanche.
    x = x & _M32
    x = _mul32(x ^ (x >> 16), 0x7FEB352D)
    x = _mul32(x ^ (x >> 15), 0x846CA68B)
    return x ^ (x >> 16)


def uniforms(seed: torch.Tensor, offset: torch.Tensor, n: int) -> torch.Tensor:
    """Counter-based uniforms in [0, 1): (B, n) float32 from seed (B,) and offset (B,).

    Element [b, i] depends only on (seed[b], offset[b] + i); draw with a fresh offset each time.
    """
    seed = seed.long().view(-1, 1)
    counter = offset.long().view(-1, 1) + torch.arange(n, device=seed.device).view(1, -1)
    h = _hash32(_hash32(seed & _M32) ^ _hash32((seed >> 32) & _M32) + counter)
    h = _hash32(h ^ _hash32(counter & _M32) ^ _hash32(counter >> 32))
    return (h >> 8).to(torch.float32) * (1.0 / (1 << 24))


def filtered_probs(logits, temperature, top_k=None, top_p=None):
    """Target probabilities (B, V) float32 after temperature, top-k and top-p (see module doc).

    logits (B, V); temperature (B,) > 0; top_k (B,) int, 0 = off; top_p (B,) float, 1 = off.
    """
    B, V = logits.shape
    z = logits.float() / temperature.float().view(B, 1)
    if top_k is not None and int(top_k.max()) > 0:  # host sync: reference path only
        kmax = min(int(top_k.max()), V)
        top_values = torch.topk(z, kmax, dim=-1).values  # (B, kmax), descending
        k = top_k.long().clamp(1, kmax).view(B, 1)
        thresh = torch.gather(top_values, 1, k - 1)
        z = torch.where((top_k.view(B, 1) > 0) & (z < thresh), float("-inf"), z)
    p = torch.softmax(z, dim=-1)
    if top_p is not None:
        tp = top_p.float().view(B, 1)
        sorted_p, _ = torch.sort(p, dim=-1, descending=True)
        mass_before = torch.cumsum(sorted_p, dim=-1) - sorted_p  # exclusive cumsum
        last = (mass_before < tp).sum(dim=-1, keepdim=True) - 1  # last kept sorted index
        thresh = torch.gather(sorted_p, 1, last.clamp(min=0))
        p = torch.where((tp < 1.0) & (p < thresh), 0.0, p)
        p = p / p.sum(dim=-1, keepdim=True)
    return p


def sample_inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """First x with cumsum(probs)[x] > u * sum(probs); never a zero-probability token.

    probs (B, V) >= 0, not necessarily normalized; u (B,) in [0, 1). Returns (B,) int64.
    """
    cdf = torch.cumsum(probs.float(), dim=-1)
    target = u.float().view(-1, 1) * cdf[:, -1:]
    x = (cdf <= target).sum(dim=-1)  # count of entries at or below the target
    # Rounding can push x past the last token with mass: fall back to that token.
    last_nonzero = probs.shape[-1] - 1 - torch.argmax((probs.flip(-1) > 0).int(), dim=-1)
    return torch.minimum(x, last_nonzero)


def sample(logits, temperature, top_k, top_p, u):
    """One token per row: argmax where temperature == 0, else an inverse-CDF draw. (B,) int64."""
    greedy = temperature <= 0
    tokens = torch.argmax(logits, dim=-1)
    if bool(greedy.all()):
        return tokens
    safe_t = torch.where(greedy, torch.ones_like(temperature), temperature)
    drawn = sample_inverse_cdf(filtered_probs(logits, safe_t, top_k, top_p), u)
    return torch.where(greedy, tokens, drawn)
